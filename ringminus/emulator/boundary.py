"""What the CPU takes at an instruction boundary: one pending event, in KVM's order (INIT,
SMI, NMI, INTR, then a guest's virtual interrupt; semantics.md §B.3, §C.7, KVM's
``svm_check_nested_events``).  GIF = 0 holds them all.  As L2, an event L1 intercepts is a
#VMEXIT and stays pending; otherwise it is taken: INIT resets, an SMI enters SMM, NMI, INTR
and the virtual interrupt are delivered through the IDT."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, NamedTuple

from ..intercepts.checker import VmExit
from ..arch.exitcodes import ExitCode
from ..intercepts.vmcb import V_IGN_TPR, V_INTR_PRIO_MASK, V_INTR_PRIO_SHIFT, V_IRQ
from ..smm.world import enter_smm
from ..arch.control import RFLAGS_IF
from .delivery import Event, EventKind
from ..arch.exceptions import Vector

if TYPE_CHECKING:
    from .machine import Machine


def intercepted(machine: "Machine", code: int) -> bool:
    return machine.guest is not None and code in machine.guest.controls


def intr_ready(machine: "Machine") -> bool:
    """INTR is not masked (KVM's svm_interrupt_blocked): as L2 with V_INTR_MASKING, L1's
    RFLAGS.IF masks it, otherwise the running code's; an intercepted INTR ignores the
    interrupt shadow."""
    svm = machine.svm
    if svm.guest_mode and svm.v_intr_masking:
        if not svm.host_if:
            return False
    elif not machine.cpu["rflags"] & RFLAGS_IF:
        return False
    return intercepted(machine, ExitCode.INTR) or not machine.cpu.interrupt_shadow


def virtual_interrupt_ready(machine: "Machine") -> bool:
    """V_IRQ is taken (APM §15.21.4) when the guest's RFLAGS.IF is set, no shadow holds it,
    and its priority is above V_TPR unless V_IGN_TPR."""
    svm, cpu = machine.svm, machine.cpu
    if not svm.guest_mode or not cpu["rflags"] & RFLAGS_IF or cpu.interrupt_shadow:
        return False
    tpr = cpu["cr8"] if svm.v_intr_masking else svm.int_ctl & 0xF
    return bool(svm.int_ctl & V_IGN_TPR) or (svm.int_ctl & V_INTR_PRIO_MASK) >> V_INTR_PRIO_SHIFT > tpr


def waiting(machine: "Machine") -> bool:
    """An interrupt (physical or virtual) or an NMI is pending, taken at the next boundary or
    held: while one is, the instructions that can unmask it (STI, POPF, IRET) run alone, so
    the run loop looks again right after them."""
    return bool(machine.interrupts) or bool(machine.svm.int_ctl & V_IRQ) or machine.nmi_pending


def _take_smi(machine: "Machine") -> None:
    machine.smm.pending = False
    enter_smm(machine)                      # an SMI also ends a halt


def _take_nmi(machine: "Machine") -> None:
    machine.nmi_pending = False
    machine.deliver(Event(Vector.NMI, EventKind.NMI, machine.cpu.rip))
    machine.cpu.nmi_blocked = True


def _take_intr(machine: "Machine") -> None:
    vector = max(machine.interrupts)        # the highest vector first
    machine.interrupts.discard(vector)
    machine.deliver(Event(vector, EventKind.EXTERNAL, machine.cpu.rip))


def _take_virtual_interrupt(machine: "Machine") -> None:
    machine.svm.int_ctl &= ~V_IRQ
    machine.deliver(Event(machine.svm.v_intr_vector, EventKind.EXTERNAL, machine.cpu.rip))


def _consume_intr(machine: "Machine") -> None:
    machine.interrupts.discard(max(machine.interrupts))


def _consume_virtual_interrupt(machine: "Machine") -> None:
    machine.svm.int_ctl &= ~V_IRQ


class Source(NamedTuple):
    ready: Callable[["Machine"], bool]      # pending and not masked now
    exit_code: int                          # L1's intercept
    take: Callable[["Machine"], None]
    consume: Callable[["Machine"], None]    # no longer pending: a caller-L1 with on_exit "skip" handled it
    exit_info1: Callable[["Machine"], int] = lambda machine: 0


SOURCES = (
    Source(lambda m: m.smm.latched_init and not m.smm.in_smm, ExitCode.INIT, lambda m: m._process_init(),
           lambda m: setattr(m.smm, "latched_init", False)),
    Source(lambda m: m.smm.pending and not m.smm.in_smm, ExitCode.SMI, _take_smi,
           lambda m: setattr(m.smm, "pending", False),
           lambda m: int(m.profile.smi_exitinfo)),              # F.8
    Source(lambda m: m.nmi_pending and not m.cpu.nmi_blocked, ExitCode.NMI, _take_nmi,
           lambda m: setattr(m, "nmi_pending", False)),
    Source(lambda m: bool(m.interrupts) and intr_ready(m), ExitCode.INTR, _take_intr, _consume_intr),
    Source(lambda m: bool(m.svm.int_ctl & V_IRQ) and virtual_interrupt_ready(m), ExitCode.VINTR,
           _take_virtual_interrupt, _consume_virtual_interrupt),
)


def take_pending_event(machine: "Machine") -> bool:
    """Take the first ready source, or its #VMEXIT.  False when the run must stop."""
    if not machine.svm.gif:
        return True
    for source in SOURCES:
        if source.ready(machine):
            if intercepted(machine, source.exit_code):
                machine.halted = False
                exit_ = VmExit(source.exit_code, source.exit_info1(machine), rip=machine.cpu.rip)
                if machine.guest.on_exit == "skip":     # the caller, as L1, handled the event:
                    source.consume(machine)             # no instruction to skip, RIP stays
                    machine.record_exit(exit_)
                else:
                    machine._take_exit(exit_)
            else:
                source.take(machine)
            break
    return machine._stop is None
