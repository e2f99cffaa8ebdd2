"""vNMI (APM §15.21.10, CPUID Fn8000_000A EDX bit 25; kvm-unit-tests' vnmi test): with
int_ctl's V_NMI_ENABLE (bit 26), V_NMI (bit 11) is an NMI pending for the guest, delivered
through its IDT when V_NMI_MASK (bit 12) is clear; delivery clears V_NMI and sets V_NMI_MASK,
the handler's IRET clears it, and #VMEXIT writes both back.  V_NMI_ENABLE without the NMI
intercept fails VMRUN (KVM's nested_vmcb_check_controls)."""
from __future__ import annotations

from ringminus import StopReason

from ..l1 import HLT, L2_CODE, NMI, GuestHypervisor, gate64
from ..helpers import asm

V_NMI, V_NMI_MASK, V_NMI_ENABLE = 1 << 11, 1 << 12, 1 << 26
HANDLER = L2_CODE + 0x800


def run(int_ctl: int, intercepts=(HLT, NMI), model: str = "max") -> GuestHypervisor:
    l2 = asm("mov rbx, 1\nhlt", 64, L2_CODE).ljust(0x800, b"\x90") + asm("mov r10, 0x99\niretq", 64, HANDLER)
    hv = GuestHypervisor(l2=l2, intercepts=intercepts, max_exits=1, cpu_model=model)
    hv.idt[2 * 16:3 * 16] = gate64(HANDLER)
    hv.control["int_ctl"] = int_ctl
    assert hv.run().stop.reason is StopReason.HLT
    return hv


def test_a_pending_virtual_nmi_is_delivered_and_its_iret_unblocks():
    hv = run(V_NMI_ENABLE | V_NMI)
    exit_ = hv.exits()[0]
    assert exit_.exitcode == HLT and exit_.rbx == 1
    assert hv.l2_registers()["r10"] == 0x99                       # the handler ran
    assert exit_.int_ctl & (V_NMI | V_NMI_MASK | V_NMI_ENABLE) == V_NMI_ENABLE


def test_a_blocked_virtual_nmi_stays_pending():
    hv = run(V_NMI_ENABLE | V_NMI | V_NMI_MASK)
    exit_ = hv.exits()[0]
    assert hv.l2_registers()["r10"] == 0
    assert exit_.int_ctl & (V_NMI | V_NMI_MASK) == V_NMI | V_NMI_MASK


def test_v_nmi_enable_needs_the_nmi_intercept():
    hv = run(V_NMI_ENABLE, intercepts=(HLT,))
    assert [e.exitcode for e in hv.exits()] == [-1]


def test_without_v_nmi_enable_or_vnmi_the_bit_injects_nothing():
    for hv in (run(V_NMI), run(V_NMI_ENABLE | V_NMI, model="qemu64")):
        assert hv.l2_registers()["r10"] == 0 and hv.exits()[0].exitcode == HLT
