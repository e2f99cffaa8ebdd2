"""What the CPU takes at an instruction boundary: one pending event, in priority order —
KVM's (INIT, SMI, NMI, INTR, then a guest's virtual interrupt; semantics.md §B.3, §C.7, KVM's
``svm_check_nested_events``).  The core's sources are INIT, NMI and INTR; features add theirs
(SMM the SMI, SVM the virtual interrupt) and holds (GIF = 0 holds them all).  As L2, an event
L1 intercepts is a #VMEXIT and stays pending; otherwise it is taken."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..arch.exceptions import Vector
from ..arch.exitcodes import ExitCode
from .delivery import Event, EventKind
from .plugins import OnExit, Source

if TYPE_CHECKING:
    from .machine import Core


def intr_ready(machine: "Core") -> bool:
    """INTR is not masked (KVM's svm_interrupt_blocked): the running code's RFLAGS.IF, or what
    a feature decides instead (SVM's V_INTR_MASKING); an intercepted INTR ignores the
    interrupt shadow."""
    if not machine.intr_unmasked():
        return False
    return machine.intercepted(ExitCode.INTR) or not machine.cpu.interrupt_shadow


def waiting(machine: "Core") -> bool:
    """An event an instruction can unmask is pending (an interrupt, physical or virtual, or an
    NMI): while one is, STI, POPF and IRET run alone, so the run loop looks again right after."""
    return any(source.window and source.pending(machine) for source in machine._sources)


def _take_nmi(machine: "Core") -> None:
    machine.nmi_pending = False
    machine.deliver(Event(Vector.NMI, EventKind.NMI, machine.cpu.rip))
    machine.cpu.nmi_blocked = True


def intr_pending(machine: "Core") -> bool:
    """The INTR pin: a vector ``raise_intr`` queued, or an interrupt controller's output."""
    if machine.interrupts:
        return True
    for controller in machine.interrupt_controllers:
        if controller.intr_pending():
            return True
    return False


def _acknowledge(machine: "Core") -> int | None:
    """The CPU's interrupt acknowledge: the queue's highest vector first, else the vector the
    first asserting controller gives (None: it had nothing after all, a spurious INTR)."""
    if machine.interrupts:
        vector = max(machine.interrupts)
        machine.interrupts.discard(vector)
        return vector
    for controller in machine.interrupt_controllers:
        if controller.intr_pending():
            return controller.acknowledge()
    return None


def _take_intr(machine: "Core") -> None:
    from_device = not machine.interrupts
    vector = _acknowledge(machine)
    if vector is not None:
        if from_device:
            machine.stats["device_interrupts"] += 1
        machine.deliver(Event(vector, EventKind.EXTERNAL, machine.cpu.rip),
                        logged=not from_device or machine.log_device_interrupts)


def _no_longer_pending(name: str):
    return lambda machine: setattr(machine, name, False)


CORE_SOURCES = (
    Source(10, "init", lambda m: m.init_pending and not m.init_held(), lambda m: m.init_pending and not m.init_held(),
           ExitCode.INIT, lambda m: m.reset_cpu(), _no_longer_pending("init_pending")),
    Source(30, "nmi", lambda m: m.nmi_pending, lambda m: m.nmi_pending and not m.cpu.nmi_blocked, ExitCode.NMI,
           _take_nmi, _no_longer_pending("nmi_pending"), window=True),
    Source(40, "intr", intr_pending, lambda m: intr_pending(m) and intr_ready(m), ExitCode.INTR,
           _take_intr, _acknowledge, window=True),
)


def take_pending_event(machine: "Core") -> bool:
    """Take the first ready source, or its #VMEXIT.  False when the run must stop.  An event
    the caller, as L1, handled (on_exit skip) leaves the CPU where it was: the sources are
    looked at again at the same boundary, so where a run is cut never decides what is taken
    (each such exit consumes its event: the loop ends)."""
    while not machine.events_held():
        source = next((source for source in machine._sources if source.ready(machine)), None)
        if source is None:
            break
        if source.exit_code is None or not machine.intercepted(source.exit_code):
            source.take(machine)
            break
        machine.halted = False
        gate = machine.gate
        exit_ = gate.event_source_exit(source.exit_code, source.exit_info1(machine), machine.cpu.rip)
        if gate.on_exit is not OnExit.SKIP:
            gate.take_exit(exit_)
            break
        source.consume(machine)                 # the caller, as L1, handled the event:
        gate.record_exit(exit_)                 # no instruction to skip, RIP stays
        if machine.stop is not None:
            break
    return machine.stop is None
