"""The core alone (emulator.Core, no feature plugged in) is a working machine: it runs,
reports, delivers its own events and takes snapshots; what features add is absent, not
broken."""
import numpy as np
import pytest

from ringminus import Machine
from ringminus.emulator import Core, StopReason

from ..helpers import asm, boot_guest


def test_the_core_runs_without_features():
    core = Core(memory_size=2 << 20)
    core.write_memory(0x7C00, asm("mov al, 0x48; out 0xe9, al; int 0x80; hlt", 16, 0x7C00))
    core.write_memory(0x80 * 4, (0x7E00).to_bytes(2, "little") + b"\0\0")       # IVT 0x80 -> 0:7E00
    core.write_memory(0x7E00, asm("inc bx; iret", 16, 0x7E00))
    core.boot("real", 0x7C00)
    snap = core.snapshot()
    result = core.run()
    assert result.stop.reason is StopReason.HLT and result.console == "H" and result.regs["rbx"] & 0xFFFF == 1
    assert set(result.as_dict()) == {"stop", "regs", "console", "instructions", "stats", "events"}
    core.restore(snap)
    assert core.run().as_dict() == result.as_dict()


def test_the_core_rejects_a_snapshot_from_a_machine_with_other_features():
    machine = Machine(memory_size=2 << 20)
    core = Core(memory_size=2 << 20)
    with pytest.raises(ValueError, match="features"):
        core.restore(machine.snapshot())


def test_python_writes_leave_the_guests_page_tables_alone():
    # Dropping stale translations after a write makes Unicorn look the physical address up
    # as a linear one through the guest's page tables, setting their Accessed bits.
    machine = boot_guest("hlt", "long")
    before = machine.memory.ram.copy()
    machine.write_memory(0x3000000, b"\x90")            # its page directory entry: not accessed
    assert np.flatnonzero(machine.memory.ram != before).tolist() == [0x3000000]


def test_switches_between_real_and_protected_mode_do_not_end_slices():
    # A MOV to CR0 that only toggles PE leaves linear addresses as they were (paging stays
    # off): it runs inside the slice, where one that turns paging on runs alone.
    machine = Machine(memory_size=4 << 20)
    machine.write_memory(0x100000, asm("""
        mov ecx, 100
    again:
        mov eax, cr0
        and eax, 0xfffffffe
        mov cr0, eax
        or eax, 1
        mov cr0, eax
        dec ecx
        jnz again
        hlt
    """, 32, 0x100000))
    machine.boot("protected", 0x100000)
    result = machine.run(timeout=30)
    assert result.stop.reason is StopReason.HLT and result.regs["cr0"] & 1
    assert result.stats["slices"] < 10
