"""Debian's SeaBIOS under ringminus's pc and q35 boards against QEMU 7.2 TCG, recorded in
data/ by tools/capture-seabios.sh (and compared live when QEMU and gdb are installed):

* the debug log, line for line, to "No bootable device." (bios-256k.bin and bios.bin);
* bios-256k.bin's SMI: where QEMU's ``-d int`` shows it taken, and the state-save map it
  wrote there, byte for byte;
* SMRAM once SeaBIOS is done (the A-segment, where it relocated SMBASE, and the default
  SMBASE's 0x30000-0x3FFFF), byte for byte.  bios.bin is built without SMM: no SMI at all."""
from __future__ import annotations

import functools
import gzip
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from ringminus import Machine, StopReason

DATA = Path(__file__).parent / "data"
TOOL = Path(__file__).parents[2] / "tools" / "capture-seabios.sh"
SEABIOS = Path("/usr/share/seabios")
KVMVAPIC = Path("/usr/share/qemu/kvmvapic.bin")           # QEMU gives SeaBIOS this option ROM
END = b"No bootable device.\n"
SMI_ENTRY, SAVE_MAP = 0x38000, 0x3FE00                     # at the reset SMBASE 0x30000
ASEG, ASEG_SAVE_MAP = 0xA0000, 0xFE00                      # SMRAM, and its map's offset there
RUNS = [(kind, image) for image in ("bios-256k", "bios") for kind in ("pc", "q35")]
# With 4 GiB, RAM past the PCI hole sits at 4 GiB: 3 GiB + 1 GiB on pc, 2 + 2 on q35.
BIG = [(kind, "bios-256k", "4096M") for kind in ("pc", "q35")]
ALL = [(kind, image, "128M") for kind, image in RUNS] + BIG

pytestmark = pytest.mark.skipif(not (SEABIOS.joinpath("bios-256k.bin").exists() and KVMVAPIC.exists()),
                                reason=f"SeaBIOS in {SEABIOS} or {KVMVAPIC} is not installed "
                                       "(Debian's seabios, qemu-system-data)")


@dataclass
class Booted:
    log: str
    serial: str
    smi_rips: list[int]
    smbase: int
    save_map: bytes | None          # what the SMI wrote at the reset SMBASE, read at its handler's entry
    aseg: bytes                     # the A-segment's SMRAM once SeaBIOS is done
    low: bytes                      # 0x30000-0x3FFFF then


@functools.cache
def ringminus_boot(kind: str, image: str, mem: str = "128M") -> Booted:
    machine = Machine(machine=kind, memory_size=int(mem[:-1]) << 20, debugcon_port=0x402)
    machine.load_bios((SEABIOS / f"{image}.bin").read_bytes())
    machine.board.add_option_rom("kvmvapic.bin", KVMVAPIC.read_bytes())
    machine.boot("bios")
    machine.stop_on_output(END)
    machine.break_at(SMI_ENTRY)
    result = machine.run(max_instructions=100_000_000)
    save_map = None
    if result.stop.reason is StopReason.BREAKPOINT:
        save_map = machine.read_memory(SAVE_MAP, 0x200)
        result = machine.run(max_instructions=100_000_000)
    assert result.stop.reason is StopReason.OUTPUT, result.stop
    return Booted(result.console, machine.board.uart.output.decode("latin-1"),
                  [event["rip"] for event in machine.events if event["kind"] == "smi"], machine.smm.smbase,
                  save_map, bytes(machine.smram.ranges[0].data), machine.read_memory(0x30000, 0x10000))


def recorded(kind: str, image: str, suffix: str, mem: str = "128M") -> Path:
    return DATA / f"seabios-{kind}-{image}{'' if mem == '128M' else '-' + mem}-qemu-7.2{suffix}"


def up_to_the_end(log: str) -> list[str]:
    return log[:log.index(END.decode()) + len(END)].splitlines()


@pytest.mark.parametrize("kind,image,mem", ALL)
def test_seabios_logs_what_it_logs_on_qemu(kind, image, mem):
    booted = ringminus_boot(kind, image, mem)
    assert up_to_the_end(booted.log) == up_to_the_end(recorded(kind, image, ".log", mem).read_text())
    assert "SeaBIOS (version" in booted.serial          # sercon on COM1


@pytest.mark.parametrize("kind,image,mem", ALL)
def test_seabios_takes_its_smi_where_qemu_does(kind, image, mem):
    booted = ringminus_boot(kind, image, mem)
    record = recorded(kind, image, "-smi.txt", mem)
    if not record.exists():                             # QEMU took none either
        assert booted.smi_rips == [] and booted.save_map is None
        return
    qemu_eip = int(re.search(r"^EIP=([0-9a-f]+)", record.read_text(), re.M).group(1), 16)
    assert booted.smi_rips == [qemu_eip] and booted.smbase == ASEG     # relocated to the A-segment


@pytest.mark.parametrize("kind,mem", [("pc", "128M"), ("q35", "128M"), ("pc", "4096M"), ("q35", "4096M")])
def test_seabios_leaves_smram_as_qemu_does(kind, mem):
    booted = ringminus_boot(kind, "bios-256k", mem)
    qemu = gzip.decompress(recorded(kind, "bios-256k", "-smram.bin.gz", mem).read_bytes())
    save_map, aseg, low = qemu[:0x200], qemu[0x200:0x20200], qemu[0x20200:]
    assert booted.save_map == save_map
    assert booted.aseg[:ASEG_SAVE_MAP] == aseg[:ASEG_SAVE_MAP]      # beyond: the recording's own SMI
    assert booted.low == low


LIVE = shutil.which("qemu-system-x86_64") and shutil.which("gdb")


@pytest.mark.skipif(not LIVE, reason="qemu-system-x86_64 and gdb are not installed (apt-get install qemu-system-x86 gdb)")
@pytest.mark.parametrize("kind,image,mem", ALL)
def test_the_recordings_are_what_qemu_records(kind, image, mem, tmp_path):
    subprocess.run(["bash", str(TOOL), kind, str(SEABIOS / f"{image}.bin"), str(tmp_path / "now"), mem],
                   check=True, capture_output=True, timeout=120)
    for suffix in (".log", "-smi.txt", "-smram.bin.gz"):
        now, then = tmp_path / f"now{suffix}", recorded(kind, image, suffix, mem)
        assert now.exists() == then.exists(), suffix
        if then.exists():
            assert now.read_bytes() == then.read_bytes(), suffix
