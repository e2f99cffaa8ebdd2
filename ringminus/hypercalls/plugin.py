"""The hypercall conduit as a feature of the machine: VMMCALL and VMCALL outside guest mode
(executors), the filter, a forwarded call that ``resume(ret)`` completes, and the
conduit's parts of snapshots and results."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..arch.exceptions import Vector
from ..emulator.delivery import Event, EventKind
from ..emulator.plugins import Part
from ..emulator.result import Section, StopReason
from .conduit import CONDUITS, Hypercall, complete, execute
from .filter import HypercallFilter

if TYPE_CHECKING:
    from ..decode.decoder import Instruction
    from ..machine import Machine


EXECUTES = tuple(sorted(CONDUITS))       # the decode-table rows this feature executes


def install(machine: "Machine") -> None:
    machine.hypercalls = HypercallFilter(lambda: machine.has_run)     # fixed once the machine has run
    machine.pending_hypercall = None         # forwarded, awaiting resume()
    machine.add_stat_keys("hypercalls")
    for row in EXECUTES:
        machine.add_executor(row, lambda insn: _conduit(machine, insn))
    machine.add_run_hook(lambda: setattr(machine, "pending_hypercall", None))   # not completed: it runs again
    machine.add_resume_handler(lambda ret: _resume(machine, ret))
    machine.add_snapshot_part(Part(56, "forwarded hypercall", lambda m: m.pending_hypercall,
                                   lambda m, pending: setattr(m, "pending_hypercall", pending)))
    machine.add_result_section(lambda stop: Section(
        "hypercall", machine.pending_hypercall.call if stop.reason is StopReason.HYPERCALL
        and machine.pending_hypercall is not None else None, Hypercall.as_dict, raw_name="call"))


def _conduit(machine: "Machine", insn: "Instruction") -> None:
    """ringminus is the host (semantics.md §D.3); as L2, an unintercepted one is #UD."""
    if machine.gate is not None:
        machine.deliver(Event(Vector.UD, EventKind.EXCEPTION, insn.address))
    else:
        execute(machine, insn)


def _resume(machine: "Machine", ret: int | None) -> bool:
    """After a ``hypercall`` stop, complete the forwarded call as KVM x86 does on re-entry
    (semantics.md §D.2): RAX := ``ret`` (a u32 outside 64-bit mode; None declines:
    −KVM_ENOSYS) and RIP past the instruction."""
    if machine.pending_hypercall is None:
        return False
    complete(machine, machine.pending_hypercall, ret)
    return True
