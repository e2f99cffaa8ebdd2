"""Exception and interrupt delivery, done in Python because Unicorn reports events but never
delivers them (reference/unicorn.md §3): the real-mode IVT, protected-mode IDT gates with a
privilege change through the TSS, long-mode 64-bit gates with IST, error codes, and the
double-fault rules, ending in shutdown (triple fault) when #DF itself cannot be delivered.
Task gates and virtual-8086 delivery are not implemented: they end the run as `unsupported`.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from enum import Enum
from typing import Callable

from .cpu import Cpu
from ..arch.control import RFLAGS_AC, RFLAGS_IF, RFLAGS_NT, RFLAGS_RF, RFLAGS_TF, RFLAGS_VM
from ..arch.segments import (FLAG_DB, SYS_INT_GATE, SYS_INT_GATE16, SYS_TASK_GATE, SYS_TRAP_GATE,
                          SYS_TRAP_GATE16, TYPE_CODE, TYPE_CONFORMING, TYPE_EXPAND_DOWN,
                          TYPE_WRITABLE, Segment, unpack_descriptor, unpack_gate)
from .paging import LinearMemory
from .segmentation import canonical
from ..arch.exceptions import CONTRIBUTORY, PUSHES_ERROR_CODE, GuestFault, SecondStageFault, Vector


class EventKind(Enum):
    EXCEPTION = "exception"                  # a fault or trap raised by the processor
    SOFTWARE_INTERRUPT = "software"          # INT n (CD ib)
    SOFTWARE_EXCEPTION = "software-exception"  # INT3, INTO: exceptions that check gate DPL
    ICEBP = "icebp"                          # INT1 (F1): #DB without the DPL check
    EXTERNAL = "external"                    # INTR
    NMI = "nmi"

    @property
    def checks_gate_dpl(self) -> bool:
        return self in (EventKind.SOFTWARE_INTERRUPT, EventKind.SOFTWARE_EXCEPTION)

    @property
    def sets_ext(self) -> bool:
        """EXT bit of error codes raised while delivering this kind (SDM 6.13)."""
        return not self.checks_gate_dpl


@dataclass(frozen=True)
class Event:
    vector: int
    kind: EventKind
    return_rip: int                 # the RIP pushed (faulting instruction, or the next one)
    error_code: int | None = None
    cr2: int | None = None          # #PF: the faulting linear address
    instruction_rip: int | None = None  # start of the instruction that raised it, if different

    @property
    def pushes_error_code(self) -> bool:
        return self.kind is EventKind.EXCEPTION and self.vector in PUSHES_ERROR_CODE


class Delivered(Enum):
    DELIVERED = "delivered"
    INTERCEPTED = "intercepted"      # an exception intercept took it (intercept callback said so)
    SHUTDOWN = "shutdown"            # a fault while delivering #DF


#: ``intercept(event, during)`` is asked before an event is delivered and before a fault that
#: arises while delivering ``during`` is combined with it (semantics.md §B.2); True = L1 took it.
InterceptCallback = Callable[[Event, "Event | None"], bool]


class Unsupported(Exception):
    """An architectural path ringminus does not implement (task gates, VM86 delivery)."""


def combine(first: Event, second: Event) -> Event | None:
    """The event to deliver when ``second`` arises while delivering ``first``; None means
    shutdown (a fault while delivering #DF).  SDM Vol. 3 Table 6-5, APM §8.2.9."""
    if first.kind is EventKind.EXCEPTION and first.vector == Vector.DF:
        return None
    first_pf = first.kind is EventKind.EXCEPTION and first.vector == Vector.PF
    first_contributory = first.kind is EventKind.EXCEPTION and first.vector in CONTRIBUTORY
    if (first_contributory and second.vector in CONTRIBUTORY) or \
            (first_pf and (second.vector in CONTRIBUTORY or second.vector == Vector.PF)):
        return Event(Vector.DF, EventKind.EXCEPTION, second.return_rip, error_code=0)
    return second


class Delivery:
    def __init__(self, cpu: Cpu, linear: LinearMemory):
        self.cpu = cpu
        self.mem = linear
        self.intercept: InterceptCallback | None = None
        # A second stage refusing an access of the delivery: its hypervisor's exit, with the
        # event in flight (EXITINTINFO) and the RIP the event restarts at.
        self.second_stage_exit: Callable[[SecondStageFault, Event, int], None] | None = None

    def _intercepted(self, event: Event, during: Event | None) -> bool:
        return self.intercept is not None and self.intercept(event, during)

    def deliver(self, event: Event, injected: bool = False) -> Delivered:
        """Deliver ``event`` and any exceptions its delivery raises.  An ``injected`` event
        (VMRUN's EVENTINJ) is not checked against the exception intercepts itself; faults
        while delivering it are (APM §15.20)."""
        if not injected and self._intercepted(event, None):
            return Delivered.INTERCEPTED
        current = event
        while True:
            try:
                self._deliver_once(current)
                return Delivered.DELIVERED
            except SecondStageFault as fault:
                restart = current.instruction_rip if current.instruction_rip is not None else current.return_rip
                self.second_stage_exit(fault, current, restart)
                return Delivered.INTERCEPTED
            except GuestFault as fault:
                restart = current.instruction_rip if current.instruction_rip is not None else current.return_rip
                nested = Event(fault.vector, EventKind.EXCEPTION, restart, fault.error_code, fault.cr2)
                if self._intercepted(nested, current):          # checked before combining
                    return Delivered.INTERCEPTED
                combined = combine(current, nested)
                if combined is None:
                    return Delivered.SHUTDOWN
                if combined is not nested and self._intercepted(combined, current):
                    return Delivered.INTERCEPTED                  # the #DF itself
                current = combined

    # -- one attempt -----------------------------------------------------------------------
    def _deliver_once(self, event: Event) -> None:
        cpu = self.cpu
        if event.vector == Vector.PF and event.kind is EventKind.EXCEPTION and event.cr2 is not None:
            cpu["cr2"] = event.cr2
        if not cpu.protected:
            self._deliver_real(event)
        elif cpu.vm86:
            raise Unsupported("delivery from virtual-8086 mode")
        elif cpu.long_mode_active:
            self._deliver_long(event)
        else:
            self._deliver_protected(event)

    def _ext(self, event: Event) -> int:
        return 1 if event.kind.sets_ext else 0

    def _gate_error(self, event: Event) -> int:
        return event.vector * 8 + 2 + self._ext(event)

    def _deliver_real(self, event: Event) -> None:
        base, limit = self.cpu.table_register("idtr")
        if event.vector * 4 + 3 > limit:
            raise GuestFault(Vector.GP, 0)
        ip, cs = struct.unpack("<HH", self.mem.read(base + event.vector * 4, 4))
        ss = self.cpu.segment("ss")
        sp = self.cpu["rsp"] & 0xFFFF
        flags = self.cpu["rflags"]
        for value in (flags, self.cpu["cs"], event.return_rip):
            sp = (sp - 2) & 0xFFFF
            self.mem.write(ss.base + sp, struct.pack("<H", value & 0xFFFF))
        self.cpu["sp"] = sp
        self.cpu["rflags"] = flags & ~(RFLAGS_IF | RFLAGS_TF | RFLAGS_AC | RFLAGS_RF)
        old_cs = self.cpu.segment("cs")
        self.cpu.load_segments({"cs": replace(old_cs, selector=cs, base=cs << 4)})
        self.cpu.rip = ip

    def _read_gate(self, event: Event, long_mode: bool):
        size = 16 if long_mode else 8
        base, limit = self.cpu.table_register("idtr")
        if event.vector * size + size - 1 > limit:
            raise GuestFault(Vector.GP, self._gate_error(event))
        gate = unpack_gate(self.mem.read(base + event.vector * size, size), long_mode)
        valid = (SYS_INT_GATE, SYS_TRAP_GATE) if long_mode else \
            (SYS_TASK_GATE, SYS_INT_GATE16, SYS_TRAP_GATE16, SYS_INT_GATE, SYS_TRAP_GATE)
        if gate.type not in valid:
            raise GuestFault(Vector.GP, self._gate_error(event))
        if event.kind.checks_gate_dpl and gate.dpl < self.cpu.cpl:
            raise GuestFault(Vector.GP, event.vector * 8 + 2)
        if not gate.present:
            raise GuestFault(Vector.NP, self._gate_error(event))
        if gate.type == SYS_TASK_GATE:
            raise Unsupported("delivery through a task gate")
        return gate

    def read_descriptor(self, selector: int, error_vector: int, ext: int) -> Segment:
        """The descriptor ``selector`` names in the GDT or LDT; ``error_vector`` is raised with
        the selector as error code when it lies beyond the table."""
        if selector & 4:
            ldt = self.cpu.segment("ldtr")
            base, limit = ldt.base, ldt.limit
        else:
            base, limit = self.cpu.table_register("gdtr")
        index = selector & ~7
        if index + 7 > limit:
            raise GuestFault(error_vector, (selector & ~3) | ext)
        raw = self.mem.read(base + index, 8)
        return unpack_descriptor(raw, selector)

    def _target_code_segment(self, selector: int, ext: int, long_mode: bool) -> Segment:
        if selector & ~3 == 0:
            raise GuestFault(Vector.GP, ext)
        cs = self.read_descriptor(selector, Vector.GP, ext)
        bad = not cs.is_code or cs.dpl > self.cpu.cpl or (long_mode and (not cs.long or cs.big))
        if bad:
            raise GuestFault(Vector.GP, (selector & ~3) | ext)
        if not cs.present:
            raise GuestFault(Vector.NP, (selector & ~3) | ext)
        return cs

    def _inner_stack_32(self, new_cpl: int, ext: int) -> tuple[Segment, int]:
        """SS:ESP for ``new_cpl`` from a 32-bit TSS, with the #TS/#SS checks."""
        tr = self.cpu.segment("tr")
        slot = 4 + 8 * new_cpl
        if slot + 5 > tr.limit:
            raise GuestFault(Vector.TS, (tr.selector & ~3) | ext)
        esp, ss_selector = struct.unpack("<IH", self.mem.read(tr.base + slot, 6))
        if ss_selector & ~3 == 0:
            raise GuestFault(Vector.TS, ext)
        ss = self.read_descriptor(ss_selector, Vector.TS, ext)
        writable_data = ss.flags & (1 << 12) and not ss.type & TYPE_CODE and ss.type & TYPE_WRITABLE
        if (ss_selector & 3) != new_cpl or ss.dpl != new_cpl or not writable_data:
            raise GuestFault(Vector.TS, (ss_selector & ~3) | ext)
        if not ss.present:
            raise GuestFault(Vector.SS, (ss_selector & ~3) | ext)
        return ss, esp

    def _push_frame(self, ss: Segment, sp: int, values: list[int], size: int, error_code: int) -> int:
        """Write ``values`` below SS:SP (checking the segment limit) and return the new SP."""
        wide = ss.flags & FLAG_DB
        mask = 0xFFFFFFFF if wide else 0xFFFF
        new_sp = (sp - size * len(values)) & mask
        top = new_sp + size * len(values) - 1
        if ss.type & TYPE_EXPAND_DOWN:
            upper = 0xFFFFFFFF if wide else 0xFFFF
            outside = new_sp <= ss.limit or top > upper
        else:
            outside = top > ss.limit
        if outside:
            raise GuestFault(Vector.SS, error_code)
        frame = b"".join(v.to_bytes(8, "little")[:size] for v in reversed(values))
        self.mem.write(ss.base + new_sp, frame)
        return new_sp

    def _deliver_protected(self, event: Event) -> None:
        ext = self._ext(event)
        gate = self._read_gate(event, long_mode=False)
        cs = self._target_code_segment(gate.selector, ext, long_mode=False)
        cpl = self.cpu.cpl
        new_cpl = cpl if cs.type & TYPE_CONFORMING else cs.dpl
        size = 4 if gate.type in (SYS_INT_GATE, SYS_TRAP_GATE) else 2
        old_ss, old_sp = self.cpu.segment("ss"), self.cpu["rsp"]
        rflags = self.cpu["rflags"]
        frame = [rflags, self.cpu["cs"], event.return_rip]
        if new_cpl < cpl:
            ss, sp = self._inner_stack_32(new_cpl, ext)
            frame = [old_ss.selector, old_sp] + frame
            stack_error = (ss.selector & ~3) | ext
        else:
            ss, sp, stack_error = old_ss, old_sp, 0
        if event.pushes_error_code:
            frame.append(event.error_code or 0)
        new_sp = self._push_frame(ss, sp, frame, size, stack_error)
        self._enter_handler(gate, cs, new_cpl, ss, new_sp, rflags, keep_sp_high=not ss.flags & FLAG_DB)

    def _deliver_long(self, event: Event) -> None:
        ext = self._ext(event)
        gate = self._read_gate(event, long_mode=True)
        cs = self._target_code_segment(gate.selector, ext, long_mode=True)
        cpl = self.cpu.cpl
        new_cpl = cpl if cs.type & TYPE_CONFORMING else cs.dpl
        rsp = self.cpu["rsp"]
        if gate.ist or new_cpl < cpl:
            tr = self.cpu.segment("tr")
            slot = 0x24 + 8 * (gate.ist - 1) if gate.ist else 4 + 8 * new_cpl
            if slot + 7 > tr.limit:
                raise GuestFault(Vector.TS, (tr.selector & ~3) | ext)
            rsp = self.mem.read_u(tr.base + slot, 8)
        rsp &= ~0xF
        rflags = self.cpu["rflags"]
        frame = [self.cpu["ss"], self.cpu["rsp"], rflags, self.cpu["cs"], event.return_rip]
        if event.pushes_error_code:
            frame.append(event.error_code or 0)
        rsp = (rsp - 8 * len(frame)) & 0xFFFF_FFFF_FFFF_FFFF           # RSP wraps (QEMU: target_ulong)
        if not (canonical(rsp) and canonical(rsp + 8 * len(frame) - 1)):
            raise GuestFault(Vector.SS, ext)      # SDM Vol. 2A INT n: "StackAddress is non-canonical: #SS(EXT)"
        self.mem.write(rsp, b"".join(v.to_bytes(8, "little") for v in reversed(frame)))
        ss = self.cpu.segment("ss") if new_cpl == cpl else Segment(new_cpl, 0, 0, new_cpl << 13)
        self._enter_handler(gate, cs, new_cpl, ss, rsp, rflags, keep_sp_high=False)

    def _enter_handler(self, gate, cs: Segment, new_cpl: int, ss: Segment, sp: int, rflags: int,
                       keep_sp_high: bool) -> None:
        selector = (cs.selector & ~3) | new_cpl
        self.cpu.load_segments({"cs": replace(cs, selector=selector), "ss": ss}, cpl=new_cpl)
        if keep_sp_high:       # a 16-bit stack segment changes only SP
            self.cpu["sp"] = sp
        else:
            self.cpu["rsp"] = sp
        cleared = RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | RFLAGS_VM
        if gate.type in (SYS_INT_GATE, SYS_INT_GATE16):
            cleared |= RFLAGS_IF
        self.cpu["rflags"] = rflags & ~cleared
        offset = gate.offset if gate.type not in (SYS_INT_GATE16, SYS_TRAP_GATE16) else gate.offset & 0xFFFF
        self.cpu.rip = offset
