"""The MSRs whose guest-visible value ringminus keeps itself: EFER (for SVME, which must stay
clear in Unicorn so that every SVM instruction traps as #UD — reference/unicorn.md §3),
VM_HSAVE_PA and VM_CR.  Unicorn cannot hook RDMSR/WRMSR; the machine arms their code sites
and calls ``read``/``write`` here for these MSRs only (every other MSR runs natively).

Rules (APM Vol. 2 §3.1.7, §15.30; KVM ``kvm_valid_efer``/``set_efer``, ``svm_set_vm_cr``):
RDMSR/WRMSR at CPL > 0 raise #GP(0) (the core's check, for every kept MSR); a WRMSR to EFER with a bit the CPU model does not
support, a change of LME while paging is on, or SVME while VM_CR.SVMDIS is set raise #GP(0);
LMA is read-only (the write keeps it).  VM_HSAVE_PA must be page-aligned and inside the
physical address width.  VM_CR: bits 4:0 exist; once SVMDIS is set, LOCK and SVMDIS cannot
change; setting SVMDIS while EFER.SVME is set raises #GP(0).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from ..arch.control import CR0_PG, EFER_LMA, EFER_LME, EFER_NXE, EFER_SCE, EFER_SVME, MSR_EFER
from ..arch.exceptions import gp
from ..intercepts.vmcb import MSR_VM_CR, MSR_VM_HSAVE_PA, VM_CR_LOCK, VM_CR_SVMDIS
from .cpuid import advertises_svm
from ..arch.models import max_physical_bits
from ..arch.models import LM, MODELS, NX, SVM, SYSCALL

if TYPE_CHECKING:
    from ..machine import Machine

VM_CR_BITS = 0x1F
# EFER bits each CPUID feature makes writable.
_EFER_FEATURES = ((SYSCALL, "ext_edx", EFER_SCE), (LM, "ext_edx", EFER_LME | EFER_LMA),
                  (NX, "ext_edx", EFER_NXE), (SVM, "ext_ecx", EFER_SVME))


def efer_supported(model_name: str) -> int:
    model = MODELS[model_name]
    return sum(bits for feature, word, bits in _EFER_FEATURES if getattr(model, word) & feature)


def _write_efer(machine: "Machine", value: int) -> None:
    cpu = machine.cpu
    current = cpu["efer"]
    if value & ~efer_supported(machine.cpu_model):
        raise gp()
    if cpu["cr0"] & CR0_PG and (value ^ current) & EFER_LME:
        raise gp()
    if value & EFER_SVME and machine.svm.vm_cr & VM_CR_SVMDIS:
        raise gp()
    cpu["efer"] = value & ~EFER_LMA | current & EFER_LMA


def _write_hsave(machine: "Machine", value: int) -> None:
    if value & 0xFFF or value >> max_physical_bits(machine.cpu_model):
        raise gp()
    machine.svm.hsave_pa = value


def _write_vm_cr(machine: "Machine", value: int) -> None:
    svm = machine.svm
    if value & ~VM_CR_BITS:
        raise gp()
    changeable = VM_CR_BITS & ~(VM_CR_LOCK | VM_CR_SVMDIS) if svm.vm_cr & VM_CR_SVMDIS else VM_CR_BITS
    if value & VM_CR_SVMDIS and machine.cpu["efer"] & EFER_SVME:
        raise gp()
    svm.vm_cr = svm.vm_cr & ~changeable | value & changeable


# msr -> (read, write)
EMULATED: dict[int, tuple[Callable[["Machine"], int], Callable[["Machine", int], None]]] = {
    MSR_EFER: (lambda m: m.cpu["efer"], _write_efer),
    MSR_VM_HSAVE_PA: (lambda m: m.svm.hsave_pa, _write_hsave),
    MSR_VM_CR: (lambda m: m.svm.vm_cr, _write_vm_cr),
}


def emulates(machine: "Machine", msr: int) -> bool:
    """EFER always; the SVM MSRs when the CPU model has SVM (else they run natively)."""
    return msr == MSR_EFER or msr in EMULATED and advertises_svm(machine.cpu_model)


def read(machine: "Machine", msr: int) -> int:
    """RDMSR of an emulated MSR at CPL 0 (the core faults the others)."""
    return EMULATED[msr][0](machine)


def write(machine: "Machine", msr: int, value: int) -> None:
    """WRMSR of an emulated MSR at CPL 0 (GuestFault on #GP)."""
    EMULATED[msr][1](machine, value)
