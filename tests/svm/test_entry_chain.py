"""A real hypervisor's entry and exit paths — CLGI; VMLOAD; VMRUN and VMSAVE; STGI after
the #VMEXIT — which ringminus executes one after the other inside one hook where nothing
could come between them (machine._chain_in_hook).  What must hold: every instruction does
what the APM says, and a breakpoint on any of them stops the run before it, as it would if
each arrived through its own hook."""
from __future__ import annotations

import pytest

from ringminus import Machine, StopReason

from ..helpers import asm
from ..l1 import CLGI, HLT, HSAVE, L1_CODE, L2_CODE, STGI, VMCB, VMLOAD, VMRUN, VMSAVE, addresses, new_vmcb, read_vmcb

ENTRY = ["mov rax, 0x300000", CLGI, VMLOAD, VMRUN, VMSAVE, STGI, "hlt"]
SETUP = f"""
    mov ecx, 0xC0000080
    rdmsr
    or eax, 0x1000
    wrmsr
    mov ecx, 0xC0010117
    mov eax, {HSAVE:#x}
    xor edx, edx
    wrmsr
"""
FS_SELECTOR, FS_BASE, LSTAR = 0x33, 0x7777_0000, 0xFFFF_8000_1234_0000


def machine_at(breakpoint: int | None = None) -> tuple[Machine, list[int]]:
    setup = asm(SETUP, 64, L1_CODE)
    at = addresses(ENTRY, base=L1_CODE + len(setup))
    machine = Machine(cpu_model="max")
    machine.write_memory(L1_CODE, setup + asm("\n".join(ENTRY), 64, L1_CODE + len(setup)))
    machine.write_memory(L2_CODE, asm("hlt", 64, L2_CODE))
    buffer, vmcb = new_vmcb("long", intercepts=(HLT,))
    vmcb["save"]["fs"]["selector"], vmcb["save"]["fs"]["base"] = FS_SELECTOR, FS_BASE
    vmcb["save"]["lstar"] = LSTAR
    machine.write_memory(VMCB, bytes(buffer))
    machine.boot("long", L1_CODE)
    if breakpoint is not None:
        machine.break_at(at[breakpoint])
    return machine, at


def test_the_whole_path_runs_and_each_instruction_does_its_part():
    machine, at = machine_at()
    result = machine.run(timeout=30)
    assert result.stop.reason is StopReason.HLT and result.stop.rip == at[-1] + 1
    assert machine.last_exit is not None and int(machine.last_exit.code) == HLT
    assert machine.gif is True                                     # STGI after the #VMEXIT
    assert machine.cpu.segment("fs").selector == FS_SELECTOR and machine.cpu.segment("fs").base == FS_BASE
    assert machine.cpu.fast.read_msr(0xC000_0082) == LSTAR         # VMLOAD, not undone by VMSAVE
    save = read_vmcb(machine)["save"]
    assert int(save["fs"]["selector"]) == FS_SELECTOR and int(save["lstar"]) == LSTAR


@pytest.mark.parametrize("index, gif, loaded", [(2, False, False), (3, False, True), (5, False, True)],
                         ids=["vmload", "vmrun", "stgi"])
def test_a_breakpoint_inside_the_path_stops_before_its_instruction(index, gif, loaded):
    machine, at = machine_at(breakpoint=index)
    result = machine.run(timeout=30)
    assert result.stop.reason is StopReason.BREAKPOINT and result.stop.rip == at[index]
    assert machine.gif is gif                                      # CLGI ran, STGI did not
    assert (machine.cpu.segment("fs").selector == FS_SELECTOR) is loaded
    assert machine.run(timeout=30).stop.reason is StopReason.HLT and machine.gif is True
