"""Debian's SeaBIOS under ringminus's pc and q35 boards against QEMU 7.2 TCG's debug log
(data/seabios-*-qemu-7.2.log, recorded with the command in ``qemu_log`` below; compared live
when QEMU is installed).  pc: the whole log, line for line, to "No bootable device.".  q35:
the same but for the two lines naming the ACPI tables — QEMU rebuilds its tables when the
firmware first reads them, after PCI setup (acpi_build_update), and ringminus serves them as
QEMU built them at power-on (platform/tables.py), so the DSDT is 8,148 bytes, not 8,232."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from ringminus import Machine, StopReason

DATA = Path(__file__).parent / "data"
BIOS = Path("/usr/share/seabios/bios-256k.bin")
KVMVAPIC = Path("/usr/share/qemu/kvmvapic.bin")           # QEMU gives SeaBIOS this option ROM
END = b"No bootable device.\n"
ACPI_LINES = ("table(50434146)=", "ACPI: parse DSDT at")      # q35: QEMU's tables are rebuilt (above)

pytestmark = pytest.mark.skipif(not (BIOS.exists() and KVMVAPIC.exists()),
                                reason=f"{BIOS} or {KVMVAPIC} is not installed (Debian's seabios, qemu-system-data)")


def ringminus_log(kind: str) -> tuple[str, Machine]:
    machine = Machine(machine=kind, memory_size=128 << 20, debugcon_port=0x402)
    machine.load_bios(BIOS.read_bytes())
    machine.board.add_option_rom("kvmvapic.bin", KVMVAPIC.read_bytes())
    machine.boot("bios")
    machine.stop_on_output(END)
    result = machine.run(max_instructions=100_000_000)
    assert result.stop.reason is StopReason.OUTPUT, result.stop
    return result.console, machine


def qemu_log(kind: str, tmp_path: Path) -> str:
    log = tmp_path / "debug.log"
    subprocess.run(["timeout", "10", "qemu-system-x86_64", "-machine", kind, "-accel", "tcg", "-m", "128M", "-smp", "1",
                    "-bios", str(BIOS), "-nodefaults", "-nographic", "-no-reboot", "-monitor", "none",
                    "-serial", f"file:{tmp_path / 'serial.txt'}", "-chardev", f"file,id=dbg,path={log}",
                    "-device", "isa-debugcon,iobase=0x402,chardev=dbg"], capture_output=True)
    return log.read_text()


def comparable(log: str, kind: str) -> list[str]:
    lines = log[:log.index(END.decode()) + len(END)].splitlines()
    return [line for line in lines if kind == "pc" or not line.startswith(ACPI_LINES)]


@pytest.mark.parametrize("kind", ["pc", "q35"])
def test_seabios_logs_what_it_logs_on_qemu(kind):
    log, machine = ringminus_log(kind)
    recorded = (DATA / f"seabios-{kind}-bios-256k-qemu-7.2.log").read_text()
    assert comparable(log, kind) == comparable(recorded, kind)
    assert machine.smm.entries == 1 and machine.smm.smbase == 0xA0000      # SeaBIOS relocated SMBASE
    assert "SeaBIOS (version" in machine.board.uart.output.decode("latin-1")   # sercon on COM1


@pytest.mark.skipif(not shutil.which("qemu-system-x86_64"), reason="qemu-system-x86_64 is not installed")
@pytest.mark.parametrize("kind", ["pc", "q35"])
def test_the_recorded_logs_are_what_qemu_logs(kind, tmp_path):
    assert qemu_log(kind, tmp_path) == (DATA / f"seabios-{kind}-bios-256k-qemu-7.2.log").read_text()
