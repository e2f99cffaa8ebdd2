"""The staged checker: semantics.md §A.1's order for any decoded instruction, the three
intercept stages between the exception checks, exactly as KVM's ``x86_emulate_insn`` runs
them for an L2 guest.  Instructions only declare (decode/table.py); the order lives here."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..decode.table import ROWS, Flag, Stage
from ..arch.control import CR0_PE
from ..arch.exceptions import GuestFault, SecondStageFault, Vector
from .checks import CHECKS
from ..arch.exitcodes import exit_name
from .exitinfo import BUILDERS

if TYPE_CHECKING:
    from ..decode.decoder import Instruction
    from .guest import Guest


@dataclass(frozen=True, slots=True)
class VmExit:
    """A #VMEXIT as L1 would see it in the VMCB."""
    code: int
    info1: int = 0
    info2: int = 0
    rip: int = 0                  # guest RIP saved: the intercepted instruction
    next_rip: int = 0             # nRIP: instruction intercepts, INT3/INTO/BOUND; else 0
    stage: Stage | None = None    # None for event and exception exits
    exit_int_info: int = 0
    insn_bytes: bytes = b""       # VMCB 0xD0: filled on #PF/#NPF exits with decode assists

    @property
    def name(self) -> str:
        return exit_name(self.code)

    def as_dict(self) -> dict:
        return {"code": int(self.code), "name": self.name, "info1": self.info1, "info2": self.info2,
                "rip": self.rip, "next_rip": self.next_rip,
                "stage": self.stage.name if self.stage else None, "exit_int_info": self.exit_int_info,
                "insn_bytes": self.vmcb_instruction_bytes.hex()}

    @property
    def vmcb_instruction_bytes(self) -> bytes:
        """The 16 bytes at VMCB 0xD0: the count in bits 3:0 of the first, then the bytes
        (empty when the exit fills none)."""
        if not self.insn_bytes:
            return b""
        return bytes([len(self.insn_bytes)]) + self.insn_bytes.ljust(15, b"\0")


_MISSING = object()


@dataclass(frozen=True)
class Fault:
    """An exception the checks raise before the instruction executes."""
    vector: int
    error_code: int | None = None
    cr2: int | None = None


@dataclass(frozen=True)
class Complete:
    """The instruction completes without executing (a REP string instruction with rCX = 0)."""


def _stage(insn: "Instruction", guest: "Guest", stage: Stage) -> VmExit | None:
    intercept = insn.row.intercept
    if intercept is None or intercept.stage != stage:
        return None
    taken = BUILDERS[intercept.exit](insn, guest)
    if taken is None:
        return None
    return VmExit(taken.code, taken.info1, taken.info2, insn.address, insn.next_rip, stage)


def _rep_count_zero(insn: "Instruction", guest: "Guest") -> bool:
    if not (insn.row.flags & Flag.STRING and (insn.prefixes.rep or insn.prefixes.repne)):
        return False
    return guest.cpu["rcx"] & ((1 << (8 * insn.address_size)) - 1) == 0


def check(insn: "Instruction", guest: "Guest") -> VmExit | Fault | Complete | None:
    """Run every check and intercept stage for ``insn``.  None: nothing stops it — it
    executes."""
    row = insn.row
    intercept = row.intercept
    if intercept is not None and intercept.stage == Stage.PRE_EXCEPT and intercept.exit == "fixed" \
            and not insn.prefixes.lock:
        # Nothing precedes a fixed PRE_EXCEPT intercept: its outcome depends on the bytes and
        # L1's controls only (CPUID, PUSHF, POPF, IRET, RSM, PAUSE, ICEBP, XSETBV).
        key = (insn, guest.controls.vector)
        cached = guest.pre_except_exits.get(key, _MISSING)
        if cached is _MISSING:
            guest.pre_except_exits[key] = cached = _stage(insn, guest, Stage.PRE_EXCEPT)
        if cached is not None:
            return cached
    cpu = guest.cpu
    try:
        if insn.prefixes.lock:                                      # no table row is lockable
            raise GuestFault(Vector.UD)
        if exit_ := _stage(insn, guest, Stage.PRE_EXCEPT):
            return exit_
        if row.flags & Flag.PROT and (not cpu["cr0"] & CR0_PE or cpu.vm86):
            raise GuestFault(Vector.UD)
        if row.flags & Flag.PRIV and cpu.cpl != 0:
            raise GuestFault(Vector.UD) if row.flags & Flag.PRIV_UD else GuestFault(Vector.GP, 0)
        if row.check:
            CHECKS[row.check](insn, guest)
        if _rep_count_zero(insn, guest) and not guest.profile.rep_zero_count_intercepts:
            return Complete()                                       # F.18
        if exit_ := _stage(insn, guest, Stage.POST_EXCEPT):
            return exit_
        if _rep_count_zero(insn, guest):
            return Complete()
        if row.intercept and row.intercept.stage == Stage.POST_MEMACCESS and insn.memory \
                and row.flags & Flag.SRC_MEM and not row.flags & Flag.NO_ACCESS:
            guest.read_operand(insn)
        if exit_ := _stage(insn, guest, Stage.POST_MEMACCESS):
            return exit_
    except GuestFault as fault:
        return Fault(fault.vector, fault.error_code, fault.cr2)
    except SecondStageFault as fault:                              # reading the operand
        return guest.second_stage_exit(fault, None, insn.address)
    return None


def _verify_table() -> None:
    """Every check and exit builder a decode-table row names exists (at import, not mid-run)."""
    missing = ({row.check for row in ROWS if row.check} - set(CHECKS)) | \
        ({row.intercept.exit for row in ROWS if row.intercept} - set(BUILDERS))
    if missing:
        raise ImportError(f"decode-table rows name checks or exit builders that do not exist: {sorted(missing)}")


_verify_table()
