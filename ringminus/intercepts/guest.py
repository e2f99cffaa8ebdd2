"""The guest as L2: what L1 intercepts, under which profile, and the exits it takes —
for instructions (through the staged checker) and for exceptions and events (before
delivery and before #DF combination, semantics.md §B.2).  A Guest is the core's guest-mode
gate (emulator/plugins.Gate) while it runs."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from unicorn import x86_const as X

from ..arch.registers import GPRS_BY_NUMBER
from ..decode.decoder import Instruction
from ..emulator.delivery import Event, EventKind
from ..emulator.memory import UnbackedMemory
from ..emulator.plugins import OnExit
from ..emulator.result import StopReason
from ..emulator.segmentation import linear_address
from ..arch.exceptions import GuestFault, SecondStageFault, Vector
from .checker import Fault, VmExit, check
from .controls import EXCEPTION_BASE, InterceptControls
from .exitinfo import PauseFilter
from ..arch.exitcodes import ExitCode
from .profiles import DEFAULT_PROFILE, profile as profile_named
from .vmcb import V_IRQ, EventType, encode_event

if TYPE_CHECKING:
    from ..emulator.plugins import HookContext
    from ..emulator.machine import Core as Machine

# The EXITINTINFO type of each kind of event (APM Figure 15-1): INT1/INT3/INTO count as
# exceptions, only INTn as a software interrupt (§B.2).
EVENT_TYPE = {EventKind.EXTERNAL: EventType.INTR, EventKind.NMI: EventType.NMI,
              EventKind.EXCEPTION: EventType.EXCEPTION, EventKind.SOFTWARE_EXCEPTION: EventType.EXCEPTION,
              EventKind.ICEBP: EventType.EXCEPTION, EventKind.SOFTWARE_INTERRUPT: EventType.SOFTWARE_INT}
# Exceptions whose intercepts report the error code in EXITINFO1 (§B.2).
ERROR_CODE_IN_INFO1 = frozenset({Vector.DF, Vector.TS, Vector.NP, Vector.SS, Vector.GP, Vector.PF,
                                 Vector.AC, Vector.CP, Vector.SX})


def exit_int_info(event: Event | None) -> int:
    if event is None:
        return 0
    return encode_event(event.vector, EVENT_TYPE[event.kind], (event.error_code or 0) if event.pushes_error_code else None)


class Guest:
    def __init__(self, machine: "Machine", controls: InterceptControls, profile: str = DEFAULT_PROFILE,
                 on_exit: OnExit | str = OnExit.STOP, pre_except_exits: dict | None = None,
                 l1_exit: Callable[[VmExit, "HookContext | None"], None] | None = None):
        try:
            on_exit = OnExit(on_exit)
        except ValueError:
            raise ValueError(f"--on-exit must be one of {', '.join(o.value for o in OnExit)}") from None
        if on_exit is OnExit.L1 and l1_exit is None:
            raise ValueError("a guest whose own hypervisor takes its exits needs that hypervisor's #VMEXIT")
        self.machine = machine
        self.cpu = machine.cpu
        self.linear = machine.linear
        self.controls = controls
        self.profile = profile_named(profile)
        self.on_exit = on_exit
        self.l1_exit = l1_exit              # on_exit L1: the #VMEXIT into the guest's hypervisor (svm/)
        self.monitor_armed = False
        self.pause_filter: PauseFilter | None = None      # the guest's own hypervisor's (svm/)
        self._virtual_interrupt_pending = False
        # checker.py: outcomes that depend on nothing else (shareable between guests)
        self.pre_except_exits: dict = {} if pre_except_exits is None else pre_except_exits

    @property
    def virtual_interrupt_pending(self) -> bool:
        """V_IRQ (IDLE_HLT exits only without one): the VMCB's, when the guest's own
        hypervisor runs this guest; what the caller sets, when the caller plays L1."""
        if self.on_exit is OnExit.L1:
            return bool(self.machine.svm.int_ctl & V_IRQ)
        return self._virtual_interrupt_pending

    @virtual_interrupt_pending.setter
    def virtual_interrupt_pending(self, pending: bool) -> None:
        self._virtual_interrupt_pending = pending

    # -- operands ------------------------------------------------------------------------------
    def register(self, number: int, size: int) -> int:
        """General-purpose register ``number`` (encoding order), its low ``size`` bytes."""
        return self.cpu[GPRS_BY_NUMBER[number]] & ((1 << (8 * size)) - 1)

    def effective_address(self, insn: Instruction) -> int:
        m = insn.memory
        value = m.displacement
        if m.base is not None:
            value += self.register(m.base, m.address_size)
        if m.index is not None:
            value += self.register(m.index, m.address_size) * m.scale
        if m.rip_relative:
            value += insn.next_rip
        return value & ((1 << (8 * m.address_size)) - 1)

    def effective_linear(self, insn: Instruction) -> int:
        """The operand's linear address, without access checks (INVLPG's decode assist)."""
        segment = self.cpu.segment(insn.memory.segment)
        base = 0 if self.cpu.code_bits() == 64 and insn.memory.segment not in ("fs", "gs") else segment.base
        return (base + self.effective_address(insn)) & 0xFFFF_FFFF_FFFF_FFFF

    def read_operand(self, insn: Instruction) -> bytes:
        """Read the memory operand through segmentation and paging (#GP/#SS/#PF here)."""
        size = insn.row.operand_size or insn.operand_size
        address = linear_address(self.cpu, insn.memory.segment, self.effective_address(insn), size,
                                 False, insn.address_size)
        try:
            return self.linear.read(address, size, user=self.cpu.cpl == 3)
        except UnbackedMemory:
            raise GuestFault(Vector.GP, 0) from None

    def lmsw_source(self, insn: Instruction) -> int:
        if insn.memory is None:
            return self.register(insn.rm, 2)
        return int.from_bytes(self.read_operand(insn), "little")

    # -- exceptions and events -----------------------------------------------------------------
    def exception_exit(self, event: Event, during: Event | None) -> VmExit | None:
        """The exception intercept for ``event`` (raised while delivering ``during``), or None.
        INTn and external interrupts never match exception intercepts; neither does ICEBP."""
        if event.kind not in (EventKind.EXCEPTION, EventKind.SOFTWARE_EXCEPTION):
            return None
        code = EXCEPTION_BASE + event.vector
        if code not in self.controls:
            return None
        info1 = (event.error_code or 0) if event.vector in ERROR_CODE_IN_INFO1 else 0
        info2 = (event.cr2 or 0) if event.vector == Vector.PF else 0
        software = event.kind is EventKind.SOFTWARE_EXCEPTION
        rip = event.instruction_rip if software and event.instruction_rip is not None else event.return_rip
        next_rip = event.return_rip if software else 0
        if event.vector == Vector.BR and event.kind is EventKind.EXCEPTION:
            next_rip = rip + self.machine.instruction_length_at(rip)      # BOUND saves nRIP too (§A.9)
        insn_bytes = b""
        if event.vector == Vector.PF and self.profile.decode_assists:
            insn_bytes = self._instruction_bytes(rip)
        return VmExit(code, info1, info2, rip, next_rip, None, exit_int_info(during), insn_bytes)

    def shutdown_exit(self, rip: int) -> VmExit | None:
        return VmExit(ExitCode.SHUTDOWN, rip=rip) if ExitCode.SHUTDOWN in self.controls else None

    def second_stage_exit(self, fault: SecondStageFault, during: Event | None, rip: int) -> VmExit:
        """#NPF (APM §15.25.6): EXITINFO1 the nested fault's error code and walk bits,
        EXITINFO2 the guest-physical address; never optional (no intercept bit)."""
        insn_bytes = self._instruction_bytes(rip) if self.profile.decode_assists else b""
        return VmExit(ExitCode.NPF, fault.info, fault.address, rip, 0, None, exit_int_info(during), insn_bytes)

    def _instruction_bytes(self, rip: int) -> bytes:
        """Up to 15 bytes at CS:rIP, as the VMCB's guest-instruction-bytes field holds them."""
        linear = (self.cpu.segment("cs").base + rip) & 0xFFFF_FFFF_FFFF_FFFF
        for count in range(15, 0, -1):
            try:
                return self.linear.read(linear, count)
            except (GuestFault, SecondStageFault, UnbackedMemory):
                continue
        return b""

    # -- the gate (emulator/plugins.Gate) --------------------------------------------------
    def intercepts(self, exit_code: int) -> bool:
        return exit_code in self.controls

    def check(self, insn: Instruction) -> VmExit | GuestFault | None:
        """The staged checker's outcome for ``insn``: an exit, a fault, or None (it runs)."""
        outcome = check(insn, self)
        if isinstance(outcome, Fault):
            return GuestFault(outcome.vector, outcome.error_code, outcome.cr2)
        return outcome if isinstance(outcome, VmExit) else None

    event_exit = exception_exit

    def event_source_exit(self, exit_code: int, info1: int, rip: int) -> VmExit:
        return VmExit(exit_code, info1, rip=rip)

    def take_exit(self, exit_: VmExit, hook: "HookContext | None" = None) -> bool:
        """L1 takes ``exit_``: a guest hypervisor by a #VMEXIT (inside a ``hook``, or from the
        run loop); the caller as L1 by a stop at the intercepted instruction, or (on_exit
        skip) by going on after it.  True when the run must stop."""
        machine = self.machine
        if self.on_exit is OnExit.L1:          # the #VMEXIT records (and counts) it
            self.l1_exit(exit_, hook)
            return machine.stop is not None
        if self.on_exit is OnExit.SKIP:
            record_exit(machine, exit_)
            machine.cpu.fast.write(X.UC_X86_REG_RIP, exit_.next_rip or exit_.rip + machine.instruction_length_at(exit_.rip))
            return False
        record_exit(machine, exit_, log=False)
        machine.cpu.rip = exit_.rip
        machine.stop_at(StopReason.VMEXIT, exit_.rip, int(exit_.code), exit_.name)
        return True

    def record_exit(self, exit_: VmExit) -> None:
        record_exit(self.machine, exit_)


def record_exit(machine: "Machine", exit_: VmExit, record: dict | None = None, log: bool = True) -> None:
    """Note a #VMEXIT L1 took (``record``: the event to log instead of the exit itself;
    ``log``: False for an exit that stops the run, which the result reports instead)."""
    machine.stats["vmexits"] += 1
    machine.last_exit = exit_
    machine.record_event((exit_ if record is None else record) if log else None)
