"""Last-branch recording: DEBUGCTL (MSR 1D9h) and LastBranchFromIP/ToIP (1DBh/1DCh), as AMD's
legacy LBR (APM Vol. 2 §13.1.1) and KVM without LBRV keep them: while DEBUGCTL.LBR is set,
each control transfer the CPU takes loads the pair with where it came from and where it went.

Unicorn has no such record, so while LBR is set (only then: a guest that asks for it pays for
it) a code hook sees every instruction and takes a transfer wherever the next instruction is
not the one after the last.  An instruction ringminus executes itself (VMRUN, VMMCALL, RSM,
the SVM instructions: Unicorn gives no size for them) ends the chain, so a world switch is
not a branch, as the #VMEXIT is not one on hardware (kvm-unit-tests' svm_lbrv tests); a REP
iteration (the same address again) is not one either.  Exceptions and interrupts are taken
as branches from the last instruction seen; LastExceptionFromIP/ToIP (1DDh/1DEh) read 0.
DEBUGCTL keeps bits 5:0 (KVM's rule: others are reserved, #GP); only LBR acts."""
from __future__ import annotations

from typing import TYPE_CHECKING

from unicorn import UC_HOOK_CODE

from ..arch.exceptions import gp

if TYPE_CHECKING:
    from .machine import Core

MSR_DEBUGCTL, MSR_LAST_BRANCH_FROM, MSR_LAST_BRANCH_TO = 0x1D9, 0x1DB, 0x1DC
MSR_LAST_EXCEPTION_FROM, MSR_LAST_EXCEPTION_TO = 0x1DD, 0x1DE
LBR_MSRS = frozenset({MSR_DEBUGCTL, MSR_LAST_BRANCH_FROM, MSR_LAST_BRANCH_TO, MSR_LAST_EXCEPTION_FROM,
                      MSR_LAST_EXCEPTION_TO})
DEBUGCTL_LBR = 1 << 0
DEBUGCTL_DEFINED = 0x3F
NO_SIZE = 16                # Unicorn's size for an instruction it cannot run is 0xF1F1F1F1


class BranchRecord:
    def __init__(self, core: "Core"):
        self._uc = core.uc
        self.debugctl = self.from_ip = self.to_ip = 0
        self._hook = None
        self._last = self._next = None          # the last instruction seen, and the one after it

    def read(self, msr: int) -> int:
        return {MSR_DEBUGCTL: self.debugctl, MSR_LAST_BRANCH_FROM: self.from_ip,
                MSR_LAST_BRANCH_TO: self.to_ip}.get(msr, 0)

    def write(self, msr: int, value: int) -> None:
        """A reserved DEBUGCTL bit is #GP(0).  The branch MSRs ignore writes."""
        if msr != MSR_DEBUGCTL:
            return
        if value & ~DEBUGCTL_DEFINED:
            raise gp()
        self.set_debugctl(value)

    def set_debugctl(self, value: int) -> None:
        self.debugctl = value
        recording = bool(value & DEBUGCTL_LBR)
        if recording and self._hook is None:
            self._last = self._next = None
            self._hook = self._uc.hook_add(UC_HOOK_CODE, self._seen)
            self._uc.ctl_flush_tb()             # code translated before carries no call to the hook
        elif not recording and self._hook is not None:
            self._uc.hook_del(self._hook)
            self._hook = None
            self._uc.ctl_flush_tb()

    def _seen(self, _uc, address: int, size: int, _data) -> None:
        if self._next is not None and address != self._next and address != self._last:
            self.from_ip, self.to_ip = self._last, address
        self._last, self._next = address, (address + size if size < NO_SIZE else None)

    def state(self) -> tuple:
        return self.debugctl, self.from_ip, self.to_ip

    def restore(self, state: tuple) -> None:
        debugctl, self.from_ip, self.to_ip = state
        self.set_debugctl(debugctl)
        self._last = self._next = None
