"""LBR virtualization (APM §15.23; kvm-unit-tests' svm_lbrv_nested_test1..3): with VMCB
0x0B8 bit 0 set, VMRUN gives the guest DEBUGCTL and LastBranchFromIP/ToIP from the VMCB
(save area 0x270/0x278/0x280) and #VMEXIT stores the guest's there and gives L1 its own
back.  Without it the MSRs are shared ("leak", svm_lbrv_test1..3)."""
from __future__ import annotations

import pytest

from ringminus import StopReason

from ..l1 import HLT, GuestHypervisor, addresses, read_vmcb

HOST_LBR_ON = """
    mov ecx, 0x1d9
    mov eax, 1
    xor edx, edx
    wrmsr
"""
GUEST = ["mov ecx, 0x1d9", "rdmsr", "mov r8, rax", "mov ecx, 0x1db", "rdmsr", "mov r9, rax",
         "mov ecx, 0x1d9", "mov eax, 1", "xor edx, edx", "wrmsr", "jmp 0x200100"]
L1_DEBUGCTL = "mov ecx, 0x1d9\nrdmsr\nmov [rbx + 0x3400], eax"


def run(lbrv: bool, model: str = "max") -> tuple[GuestHypervisor, object]:
    at = addresses(GUEST)
    l2 = bytearray(GuestHypervisor(l2="\n".join(GUEST)).l2.ljust(0x100, b"\x90"))
    l2 += b"\xf4"                                              # hlt at 0x200100
    hv = GuestHypervisor(l2=bytes(l2), setup=HOST_LBR_ON, done=L1_DEBUGCTL, max_exits=1, cpu_model=model)
    hv.control["virt_ext"] = 1 if lbrv else 0
    hv.save["dbgctl"], hv.save["br_from"], hv.save["br_to"] = 0, 0x1111, 0x2222
    assert hv.run().stop.reason is StopReason.HLT
    return hv, at


def test_the_guest_gets_the_vmcbs_record_and_l1_keeps_its_own():
    hv, at = run(lbrv=True)
    assert hv.exits()[0].exitcode == HLT
    seen = hv.l2_registers()
    assert (seen["r8"], seen["r9"]) == (0, 0x1111)                # DEBUGCTL and LBR from the VMCB
    save = read_vmcb(hv.machine)["save"]
    assert (int(save["dbgctl"]), int(save["br_from"]), int(save["br_to"])) == (1, at[-1], 0x200100)
    assert hv.result(0) == 1                                      # L1's DEBUGCTL is its own again


def test_without_lbr_virtualization_the_msrs_are_shared():
    hv, at = run(lbrv=False)
    assert hv.l2_registers()["r8"] == 1                           # L1's DEBUGCTL leaks into L2
    save = read_vmcb(hv.machine)["save"]
    assert (int(save["dbgctl"]), int(save["br_from"])) == (0, 0x1111)     # the VMCB is not touched
    assert hv.result(0) == 1


@pytest.mark.parametrize("model", ["qemu64"])
def test_a_model_without_lbrv_ignores_the_enable_bit(model):
    hv, _ = run(lbrv=True, model=model)
    assert hv.l2_registers()["r8"] == 1
