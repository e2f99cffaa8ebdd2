"""CPUID on the pc and q35 boards against QEMU 7.2 TCG's qemu64 (data/cpuid-qemu-7.2.bin:
what data/cpuid-probe.bin wrote to the debug console under ``qemu-system-x86_64 -machine
q35`` — pc gives the same bytes), and live against QEMU when it is installed."""
from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from ringminus import Machine, StopReason

DATA = Path(__file__).parent / "data"
LEAVES = (0, 1, 2, 4, 6, 7, 0xB, 0xD, 0x4000_0000, 0x4000_0001, 0x4000_0010, *range(0x8000_0000, 0x8000_0009),
          0x8000_000A)
SVM_LEAF = LEAVES.index(0x8000_000A)


def ringminus_answers(kind: str, profile: str = "qemu") -> list[tuple[int, ...]]:
    machine = Machine(machine=kind, debugcon_port=0x402, profile=profile)
    machine.load_bios((DATA / "cpuid-probe.bin").read_bytes())
    machine.boot("bios")
    assert machine.run(max_instructions=100_000).stop.reason is StopReason.HLT
    return list(struct.iter_unpack("<4I", bytes(machine.console.output)))


def qemu_answers(raw: bytes) -> list[tuple[int, ...]]:
    return list(struct.iter_unpack("<4I", raw))


@pytest.mark.parametrize("kind", ["pc", "q35"])
def test_cpuid_is_qemu_tcg_qemu64(kind):
    ours, qemu = ringminus_answers(kind), qemu_answers((DATA / "cpuid-qemu-7.2.bin").read_bytes())
    assert len(ours) == len(qemu) == len(LEAVES)
    for leaf, mine, theirs in zip(LEAVES, ours, qemu):
        if leaf == 0x8000_000A:        # SVM: ringminus always offers NRIPS (qemu64 needs +nrip-save)
            assert mine[:3] == theirs[:3] and mine[3] & ~0x8 == theirs[3]
        else:
            assert mine == theirs, f"leaf {leaf:#x}"


def test_the_bare_machine_has_no_apic():
    leaf1 = ringminus_answers("none")[1]
    assert not leaf1[3] & (1 << 9) and not leaf1[2] & (1 << 31)


@pytest.mark.skipif(not shutil.which("qemu-system-x86_64"), reason="qemu-system-x86_64 is not installed")
def test_live_qemu_answers_as_recorded(tmp_path):
    log = tmp_path / "cpuid.bin"
    subprocess.run(["timeout", "5", "qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-m", "128M",
                    "-bios", str(DATA / "cpuid-probe.bin"), "-nodefaults", "-nographic", "-no-reboot",
                    "-monitor", "none", "-chardev", f"file,id=dbg,path={log}",
                    "-device", "isa-debugcon,iobase=0x402,chardev=dbg"], capture_output=True)
    assert log.read_bytes() == (DATA / "cpuid-qemu-7.2.bin").read_bytes()


def test_disabling_the_apic_in_its_msr_clears_the_cpuid_bit():
    # QEMU clears CPUID.1:EDX[9] while IA32_APIC_BASE's global enable is clear.
    machine = Machine(machine="q35", debugcon_port=0x402)
    machine.board.lapic.write_msr(0xFEE0_0100)                 # BSP, global enable off
    machine.load_bios((DATA / "cpuid-probe.bin").read_bytes())
    machine.boot("bios")
    machine.run(max_instructions=100_000)
    leaf1 = list(struct.iter_unpack("<4I", bytes(machine.console.output)))[1]
    assert not leaf1[3] & (1 << 9) and leaf1[2] & (1 << 31)
