"""Exit builders: given a decoded instruction whose intercept stage has come, the exit L1
takes (code, EXITINFO1, EXITINFO2) — or None when L1 does not intercept it.  One builder per
``Intercept.exit`` name in the decode-flag table; semantics.md §A.4-§A.8."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from ..decode.table import Flag
from ..arch.exitcodes import ExitCode as E

if TYPE_CHECKING:
    from ..decode.decoder import Instruction
    from .guest import Guest

DECODE_ASSIST_VALID = 1 << 63
CR0_TS, CR0_MP = 1 << 3, 1 << 1
SELECTIVE_CR0_IGNORED = CR0_TS | CR0_MP          # SVM_CR0_SELECTIVE_MASK
SEGMENT_NUMBER = {"es": 0, "cs": 1, "ss": 2, "ds": 3, "fs": 4, "gs": 5}

# IOIO EXITINFO1 (APM Figure 15-2)
IOIO_TYPE_IN, IOIO_STR, IOIO_REP = 1 << 0, 1 << 2, 1 << 3
IOIO_SIZE_SHIFT, IOIO_ADDRESS_SHIFT, IOIO_SEG_SHIFT, IOIO_PORT_SHIFT = 4, 7, 10, 16


@dataclass(frozen=True)
class Exit:
    code: int
    info1: int = 0
    info2: int = 0


Builder = Callable[["Instruction", "Guest"], "Exit | None"]


def fixed(insn, guest) -> Exit | None:
    code = insn.row.intercept.code
    return Exit(code) if code in guest.controls else None


class PauseFilter:
    """The pause filter (APM §15.14.4): VMRUN loads a counter with PAUSE_FILTER_COUNT; each
    PAUSE decrements it and the one that brings it to zero takes the intercept.  With a
    PAUSE_FILTER_THRESHOLD, a PAUSE more than that many cycles (TSC ticks) after the previous
    one first reloads the counter: only a tight spin loop exits (kvm-unit-tests'
    pause_filter_test).  ``now``: the cycle count (the virtual clock's nanoseconds, 1 GHz)."""

    def __init__(self, count: int, threshold: int):
        self.count, self.threshold = count, threshold
        self.left = count
        self.last: int | None = None

    def expires(self, now: int) -> bool:
        if self.threshold and self.last is not None and now - self.last > self.threshold:
            self.left = self.count
        self.last = now
        self.left -= 1
        if self.left > 0:
            return False
        self.left = self.count
        return True


def pause(insn, guest) -> Exit | None:
    if E.PAUSE not in guest.controls:
        return None
    held = guest.pause_filter is not None and not guest.pause_filter.expires(guest.machine.time_ns())
    return None if held else Exit(E.PAUSE)


def cr_read(insn, guest) -> Exit | None:
    code = E.CR0_READ + insn.reg
    if code not in guest.controls:
        return None
    return Exit(code, DECODE_ASSIST_VALID | insn.rm if guest.profile.decode_assists else 0)


def _cr0_write(guest: "Guest", changes_beyond_ts_mp: bool, info1: int) -> Exit | None:
    """§A.8: the ordinary CR0-write intercept has priority; the selective one exits only
    when a bit other than TS/MP changes (pre-Oct-2025 KVM compared first, F.16)."""
    ordinary, selective = E.CR0_WRITE in guest.controls, E.CR0_SEL_WRITE in guest.controls
    if guest.profile.selective_cr0_fixed:
        if ordinary:
            return Exit(E.CR0_WRITE, info1)
        return Exit(E.CR0_SEL_WRITE, info1) if selective and changes_beyond_ts_mp else None
    if selective and changes_beyond_ts_mp:
        return Exit(E.CR0_SEL_WRITE, info1)
    return Exit(E.CR0_WRITE, info1) if ordinary else None


def cr_write(insn, guest) -> Exit | None:
    info1 = DECODE_ASSIST_VALID | insn.rm if guest.profile.decode_assists else 0
    if insn.reg != 0:
        code = E.CR0_WRITE + insn.reg
        return Exit(code, info1) if code in guest.controls else None
    new = guest.register(insn.rm, 8)
    return _cr0_write(guest, bool((guest.cpu["cr0"] ^ new) & ~SELECTIVE_CR0_IGNORED & 0xFFFF_FFFF), info1)


def clts(insn, guest) -> Exit | None:
    return Exit(E.CR0_WRITE) if E.CR0_WRITE in guest.controls else None     # never selective


def lmsw(insn, guest) -> Exit | None:
    """LMSW treats the selective intercept as non-selective and always exits (§A.8); older
    KVM compared bits 3:0 with PE forced on, so MP/TS-only changes did not exit (F.16)."""
    if guest.profile.selective_cr0_fixed:
        return _cr0_write(guest, True, 0)
    old = guest.cpu["cr0"]
    source = guest.lmsw_source(insn)
    new = (old & ~0xE) | (source & 0xF) | (old & 1)
    return _cr0_write(guest, bool((old ^ new) & ~SELECTIVE_CR0_IGNORED & 0xF), 0)


def dr_read(insn, guest) -> Exit | None:
    code = E.DR0_READ + insn.reg
    return Exit(code, insn.rm if guest.profile.decode_assists else 0) if code in guest.controls else None


def dr_write(insn, guest) -> Exit | None:
    code = E.DR0_WRITE + insn.reg
    return Exit(code, insn.rm if guest.profile.decode_assists else 0) if code in guest.controls else None


def swint(insn, guest) -> Exit | None:
    if E.SWINT not in guest.controls:
        return None
    return Exit(E.SWINT, insn.immediate if guest.profile.decode_assists else 0)


def invlpg(insn, guest) -> Exit | None:
    if E.INVLPG not in guest.controls:
        return None
    return Exit(E.INVLPG, guest.effective_linear(insn) if guest.profile.decode_assists else 0)


def hlt(insn, guest) -> Exit | None:
    """IDLE_HLT exits only when the HLT intercept is clear and no virtual interrupt is
    pending (APM §15.9)."""
    if E.HLT in guest.controls:
        return Exit(E.HLT)
    if E.IDLE_HLT in guest.controls and not guest.virtual_interrupt_pending:
        return Exit(E.IDLE_HLT)
    return None


def monitor(insn, guest) -> Exit | None:
    if E.MONITOR in guest.controls:
        return Exit(E.MONITOR)
    guest.monitor_armed = True          # MONITOR runs: a later MWAIT is conditional-exit-able
    return None


def mwait(insn, guest) -> Exit | None:
    if E.MWAIT in guest.controls:
        return Exit(E.MWAIT)
    if E.MWAIT_CONDITIONAL in guest.controls and guest.monitor_armed:
        return Exit(E.MWAIT_CONDITIONAL)
    return None


def msr(insn, guest) -> Exit | None:
    write = insn.row.name == "wrmsr"
    if not guest.controls.msr_intercepted(guest.cpu["ecx"], write):
        return None
    return Exit(E.MSR, int(write))


def ioio(insn, guest) -> Exit | None:
    """EXITINFO1 of APM Figure 15-2; SEG and the address-size bits as the profile fills them
    (F.7); EXITINFO2 = the next rIP."""
    port = insn.immediate if insn.immediate is not None else guest.cpu["dx"] & 0xFFFF
    size = min(insn.operand_size, 4)
    if not guest.controls.port_intercepted(port, size):
        return None
    string = bool(insn.row.flags & Flag.STRING)
    info = (port << IOIO_PORT_SHIFT) | (size << IOIO_SIZE_SHIFT)
    if insn.row.name.startswith(("in", "ins")):
        info |= IOIO_TYPE_IN
    if string:
        info |= IOIO_STR
    if insn.prefixes.rep or insn.prefixes.repne:
        info |= IOIO_REP
    if guest.profile.ioio_address_size:
        info |= insn.address_size << (IOIO_ADDRESS_SHIFT - 1)       # 2 -> A16, 4 -> A32, 8 -> A64
    if guest.profile.ioio_segment and string and insn.row.name.startswith("outs"):
        info |= SEGMENT_NUMBER[insn.prefixes.segment or "ds"] << IOIO_SEG_SHIFT
    return Exit(E.IOIO, info, insn.next_rip)


BUILDERS: dict[str, Builder] = {
    "fixed": fixed, "cr_read": cr_read, "cr_write": cr_write, "clts": clts, "lmsw": lmsw,
    "dr_read": dr_read, "dr_write": dr_write, "swint": swint, "invlpg": invlpg, "hlt": hlt,
    "monitor": monitor, "mwait": mwait, "msr": msr, "ioio": ioio, "pause": pause,
}
