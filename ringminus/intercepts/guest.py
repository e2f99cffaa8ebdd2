"""The guest as L2: what L1 intercepts, under which profile, and the exits it takes —
for instructions (through the staged checker) and for exceptions and events (before
delivery and before #DF combination, semantics.md §B.2)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..decode.decoder import GPR64, Instruction
from ..emulator.delivery import Event, EventKind
from ..emulator.memory import UnbackedMemory
from ..emulator.segmentation import linear_address
from ..arch.exceptions import GuestFault, Vector
from .checker import VmExit
from .controls import EXCEPTION_BASE, InterceptControls
from ..arch.exitcodes import ExitCode
from .profiles import DEFAULT_PROFILE, profile as profile_named
from .vmcb import V_IRQ, EventType, encode_event

if TYPE_CHECKING:
    from ..emulator.machine import Machine

# The EXITINTINFO type of each kind of event (APM Figure 15-1): INT1/INT3/INTO count as
# exceptions, only INTn as a software interrupt (§B.2).
EVENT_TYPE = {EventKind.EXTERNAL: EventType.INTR, EventKind.NMI: EventType.NMI,
              EventKind.EXCEPTION: EventType.EXCEPTION, EventKind.SOFTWARE_EXCEPTION: EventType.EXCEPTION,
              EventKind.ICEBP: EventType.EXCEPTION, EventKind.SOFTWARE_INTERRUPT: EventType.SOFTWARE_INT}
ON_EXIT = ("stop", "skip", "l1")         # l1: the guest's own hypervisor takes a #VMEXIT (svm/)
# Exceptions whose intercepts report the error code in EXITINFO1 (§B.2).
ERROR_CODE_IN_INFO1 = frozenset({Vector.DF, Vector.TS, Vector.NP, Vector.SS, Vector.GP, Vector.PF,
                                 Vector.AC, Vector.CP, Vector.SX})


def exit_int_info(event: Event | None) -> int:
    if event is None:
        return 0
    return encode_event(event.vector, EVENT_TYPE[event.kind], (event.error_code or 0) if event.pushes_error_code else None)


class Guest:
    def __init__(self, machine: "Machine", controls: InterceptControls, profile: str = DEFAULT_PROFILE,
                 on_exit: str = "stop", pre_except_exits: dict | None = None):
        if on_exit not in ON_EXIT:
            raise ValueError(f"--on-exit must be one of {', '.join(ON_EXIT)}")
        self.machine = machine
        self.cpu = machine.cpu
        self.linear = machine.linear
        self.controls = controls
        self.profile = profile_named(profile)
        self.on_exit = on_exit
        self.monitor_armed = False
        self._virtual_interrupt_pending = False
        # checker.py: outcomes that depend on nothing else (shareable between guests)
        self.pre_except_exits: dict = {} if pre_except_exits is None else pre_except_exits

    @property
    def virtual_interrupt_pending(self) -> bool:
        """V_IRQ (IDLE_HLT exits only without one): the VMCB's, when the guest's own
        hypervisor runs this guest; what the caller sets, when the caller plays L1."""
        if self.on_exit == "l1":
            return bool(self.machine.svm.int_ctl & V_IRQ)
        return self._virtual_interrupt_pending

    @virtual_interrupt_pending.setter
    def virtual_interrupt_pending(self, pending: bool) -> None:
        self._virtual_interrupt_pending = pending

    # -- operands ------------------------------------------------------------------------------
    def register(self, number: int, size: int) -> int:
        return self.cpu[GPR64[number]] & ((1 << (8 * size)) - 1)

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
            next_rip = rip + self.machine._length_at(rip)         # BOUND saves nRIP too (§A.9)
        insn_bytes = b""
        if event.vector == Vector.PF and self.profile.decode_assists:
            insn_bytes = self._instruction_bytes(rip)
        return VmExit(code, info1, info2, rip, next_rip, None, exit_int_info(during), insn_bytes)

    def shutdown_exit(self, rip: int) -> VmExit | None:
        return VmExit(ExitCode.SHUTDOWN, rip=rip) if ExitCode.SHUTDOWN in self.controls else None

    def _instruction_bytes(self, rip: int) -> bytes:
        """Up to 15 bytes at CS:rIP, as the VMCB's guest-instruction-bytes field holds them."""
        linear = (self.cpu.segment("cs").base + rip) & 0xFFFF_FFFF_FFFF_FFFF
        for count in range(15, 0, -1):
            try:
                return self.linear.read(linear, count)
            except (GuestFault, UnbackedMemory):
                continue
        return b""
