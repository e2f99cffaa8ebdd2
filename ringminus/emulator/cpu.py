"""Architectural CPU state of the one Unicorn handle: registers, segment caches, CPL, mode."""
from __future__ import annotations

from unicorn import Uc
from unicorn import x86_const as X

from ..arch.control import (CR0_PE, CR0_PG, CR0_WP, CR4_FLUSHES_TLB, CR4_PAE, CR4_PSE, EFER_LMA, EFER_NXE, EFER_SVME,
                            MSR_EFER, RFLAGS_VM, TRANSLATION_CR4_BITS)
from ..arch.registers import CONTROL, GPRS, SEGMENT_REGISTERS, SYSTEM_SEGMENTS
from . import ucinternals as uci
from ..arch.segments import Segment

# Every register name the API and ``--set`` accept, mapped to Unicorn's id.  Narrow names
# (eax, ax, al, r8d …) write only their part, as the instruction set does.
_UC_NAMES = {name: getattr(X, f"UC_X86_REG_{name.upper()}") for name in (
    *GPRS, "rip", "eip", "ip", "rflags", "eflags", *CONTROL, "cr8",
    "dr0", "dr1", "dr2", "dr3", "dr6", "dr7", "fs_base", "gs_base",
    "eax", "ebx", "ecx", "edx", "esi", "edi", "ebp", "esp",
    "ax", "bx", "cx", "dx", "si", "di", "bp", "sp", "al", "bl", "cl", "dl", "ah", "bh", "ch", "dh",
    *(f"r{n}{s}" for n in range(8, 16) for s in "dwb"))}
REGISTER_NAMES = frozenset(_UC_NAMES) | {"efer"} | set(SEGMENT_REGISTERS)
_HFLAGS_KEPT = uci.HF_CPL_MASK | uci.HF_INHIBIT_IRQ      # what a loaded state says itself
_CONTROL_NAMES = frozenset({*CONTROL, "cr8", "rflags", "eflags"})
_PAGING_NAMES = frozenset({"cr0", "cr3", "cr4", "efer"})
_BREAKPOINT_NAMES = frozenset({"dr0", "dr1", "dr2", "dr3", "dr7"})
_DEBUG_RUN = slice(uci.DEBUG_REGISTERS, uci.DEBUG_REGISTERS + 8 * 8)   # dr0-dr7 in the context


class Cpu:
    """Reads and writes the guest CPU through Unicorn's API and, for what that API cannot
    reach (hidden segment state, CPL), through the saved context (ucinternals)."""

    def __init__(self, uc: Uc):
        self.uc = uc
        self.context = uci.Context(uc)
        self.fast = uci.FastAccess(uc)
        self.breakpoints = uci.DebugBreakpoints(uc)     # QEMU's objects for DR0-DR3, kept in step
        # Bumped whenever ringminus writes CR0/CR3/CR4/EFER: code sites sit on linear
        # addresses, so the machine re-arms them when this moves.
        self.paging_epoch = 0
        self._space: tuple = ()
        self._space_epoch = -1
        # The guest-visible EFER.SVME.  Unicorn's CPU model drops the bit, and it must stay
        # clear there anyway so every SVM instruction traps as #UD (reference/unicorn.md §3).
        self.svme = False
        # Bumped by every register write made through this class, so a caller holding
        # registers it read can tell whether anything (a device handler, say) changed them.
        self.version = 0

    # -- plain registers -------------------------------------------------------------------
    def __getitem__(self, name: str) -> int:
        if name == "efer":
            return self.fast.read_msr(MSR_EFER) | (EFER_SVME if self.svme else 0)
        if name in SEGMENT_REGISTERS or name in SYSTEM_SEGMENTS:
            return self.segment(name).selector
        return self.fast.read(_UC_NAMES[name])

    def paging_state(self) -> tuple[int, int, int, int, int]:
        """CR0, CR3, CR4, EFER (without SVME) and the CPL, from one context copy: what a
        page walk reads."""
        ctx = self.context.snapshot()
        return (ctx.u64(uci.CR), ctx.u64(uci.CR + 24), ctx.u64(uci.CR + 32), ctx.u64(uci.EFER),
                ctx.u32(uci.HFLAGS) & uci.HF_CPL_MASK)

    def __setitem__(self, name: str, value: int) -> None:
        self.version += 1
        if name in _PAGING_NAMES:
            self.paging_epoch += 1
        if name == "efer":
            self.svme = bool(value & EFER_SVME)
            self.uc.msr_write(MSR_EFER, value & ~EFER_SVME)
        elif name in _CONTROL_NAMES:
            self.uc.reg_write(_UC_NAMES[name], value)     # the binding keeps QEMU's hflags in step
        else:
            self.fast.write(_UC_NAMES[name], value)
            if name in _BREAKPOINT_NAMES:
                self.breakpoints.rearm()

    @property
    def rip(self) -> int:
        return self.fast.read(X.UC_X86_REG_RIP)

    @rip.setter
    def rip(self, value: int) -> None:
        self.version += 1
        self.fast.write(X.UC_X86_REG_RIP, value)

    # -- segments and privilege ------------------------------------------------------------
    def segment(self, name: str) -> Segment:
        cache = self.context.snapshot().segment(name)
        return Segment(cache.selector, cache.base, cache.limit, cache.flags)

    def table_register(self, name: str) -> tuple[int, int]:
        """(base, limit) of GDTR or IDTR."""
        _, base, limit, _ = self.uc.reg_read(X.UC_X86_REG_GDTR if name == "gdtr" else X.UC_X86_REG_IDTR)
        return base, limit

    def set_table_register(self, name: str, base: int, limit: int) -> None:
        self.version += 1
        self.uc.reg_write(X.UC_X86_REG_GDTR if name == "gdtr" else X.UC_X86_REG_IDTR, (0, base, limit, 0))

    @property
    def cpl(self) -> int:
        return self.context.snapshot().u32(uci.HFLAGS) & uci.HF_CPL_MASK

    def load_segments(self, segments: dict[str, Segment], cpl: int | None = None) -> None:
        """Write segment caches (selector + hidden part) and, optionally, the CPL, in one
        context round trip; hflags are re-derived the way QEMU derives them."""
        self.version += 1
        ctx = self.context.snapshot()
        for name, seg in segments.items():
            ctx.put_segment(name, uci.SegmentCache(seg.selector, seg.base, seg.limit, seg.flags))
        ctx.recompute_segment_hflags(ctx.u32(uci.HFLAGS) & 3 if cpl is None else cpl)
        ctx.commit()

    def edit_context(self) -> "uci.Context":
        """A fresh copy of the CPU's context to patch in place and ``commit`` (a codec's
        world-switch fields, laid out by ucinternals); it counts as a register write."""
        self.version += 1
        return self.context.snapshot()

    def set_mode_state(self, cr0: int, cr4: int, efer: int) -> None:
        """Set CR0/CR4/EFER exactly, including leaving long mode, which register writes on a
        64-bit handle cannot do (reference/unicorn.md §5): EFER, CR0 and the LMA/PE hflags
        are patched in the saved context."""
        self.version += 1
        self.paging_epoch += 1
        self.svme = bool(efer & EFER_SVME)
        self.uc.reg_write(X.UC_X86_REG_CR4, cr4)
        ctx = self.context.snapshot()
        ctx.put_u64(uci.CR, cr0)
        ctx.put_u64(uci.EFER, efer & ~EFER_SVME)
        ctx.recompute_segment_hflags(ctx.u32(uci.HFLAGS) & uci.HF_CPL_MASK)
        ctx.commit()

    def capture(self, context_is_current: bool = False, rflags: bool = True) -> "ArchState":
        """Every register a world switch moves, from one copy of the context (taken now,
        unless the caller has just taken it).  ``rflags=False`` leaves RFLAGS 0, for a caller
        about to replace it (RSM) — computing it is a call into QEMU's lazy flags."""
        ctx = self.context if context_is_current else self.context.snapshot()
        state = ArchState(uci.STATE.unpack_from(ctx.view))
        state.append(self.fast.read(X.UC_X86_REG_RFLAGS) if rflags else 0)
        if self.svme:
            state[At.efer] |= EFER_SVME
        return state

    def fill_rflags(self, state: "ArchState") -> None:
        """RFLAGS into a state captured with ``rflags=False``."""
        state[At.rflags] = self.fast.read(X.UC_X86_REG_RFLAGS)

    def load(self, state: "ArchState", context_is_current: bool = False) -> None:
        """Make ``state`` the CPU's, mode, CPL and NMI blocking included: one context round
        trip for what the register API cannot set, the C API for what QEMU must react to
        (CR4; DR0-DR3 and DR7, which its breakpoints follow), and a TLB flush when the translation regime changed.  Inside a
        code hook the caller must also write RIP through the API, as any change of control
        flow there must be (reference/unicorn.md §2).  ``context_is_current``: the caller's
        last capture is still the CPU's (RIP aside, which this overwrites), so no new copy
        is needed."""
        self.version += 1
        self.paging_epoch += 1
        values = state[:]                       # a plain list (quicker to index than an ArchState)
        cr0, cr3, cr4, efer, rflags = values[At.cr0], values[At.cr3], values[At.cr4], values[At.efer], values[At.rflags]
        self.svme = bool(efer & EFER_SVME)
        efer &= ~EFER_SVME
        ctx = self.context if context_is_current else self.context.snapshot()
        old_cr0, old_cr3, old_cr4, old_efer, old_dr7 = uci.SWITCH_CONTROLS.unpack_from(ctx.view)
        values[At.efer] = efer
        values[At.cr4] = old_cr4                # set below through the API, which QEMU reacts to
        hflags = values[At.hflags]
        (values[At.qemu_eflags], values[At.qemu_cc_src], values[At.qemu_cc_op],
         values[At.qemu_df]) = uci.eflags_fields(rflags)      # as a register write stores RFLAGS
        values[At.hflags] = uci.derive_hflags(
            ctx.u32(uci.HFLAGS) & ~_HFLAGS_KEPT | hflags & _HFLAGS_KEPT, cr0, efer, rflags, hflags & uci.HF_CPL_MASK,
            values[At.cs_flags], values[At.ss_flags], values[At.ds_base] | values[At.es_base] | values[At.ss_base])
        old_debug = bytes(ctx.view[_DEBUG_RUN])
        for run, offset, fields in uci.STATE_RUNS:
            run.pack_into(ctx.view, offset, *values[fields])
        # QEMU holds breakpoint objects only for what DR7 enables (L0-G3): none before, none after, nothing to redo
        rearm = (old_dr7 | values[At.dr7]) & 0xFF and bytes(ctx.view[_DEBUG_RUN]) != old_debug
        ctx.commit()
        if cr4 != old_cr4:
            self.fast.write(X.UC_X86_REG_CR4, cr4)     # QEMU re-derives its CR4 hflags (and may flush its TLB)
        if rearm:
            self.breakpoints.rearm()            # QEMU's breakpoints follow DR0-DR3 and DR7
        if not (cr4 ^ old_cr4) & CR4_FLUSHES_TLB and (
                (cr0 ^ old_cr0) & (CR0_PG | CR0_WP | CR0_PE) or cr3 != old_cr3
                or (cr4 ^ old_cr4) & TRANSLATION_CR4_BITS or (efer ^ old_efer) & (EFER_LMA | EFER_NXE)):
            self.fast.flush_tlb()               # QEMU's TLB entries depend on these (CPL selects its own TLB)
        self._space = _address_space(cr0, cr3, cr4, efer)
        self._space_epoch = self.paging_epoch

    def address_space(self) -> tuple:
        """What linear addresses mean now: (True, CR3, CR4.PAE|PSE, EFER.LMA), or (False,)
        with paging off.  Sites are armed per address space."""
        if self._space_epoch != self.paging_epoch:
            self._space = _address_space(self["cr0"], self["cr3"], self["cr4"], self["efer"])
            self._space_epoch = self.paging_epoch
        return self._space

    def _flag(self, word: int, mask: int) -> bool:
        """A bit of QEMU's hflags (``word`` uci.HFLAGS) or hflags2 (uci.HFLAGS2)."""
        return bool(self.context.snapshot().u32(word) & mask)

    def _set_flag(self, word: int, mask: int, on: bool) -> None:
        self.version += 1
        ctx = self.context.snapshot()
        value = ctx.u32(word)
        ctx.put_u32(word, value | mask if on else value & ~mask)
        ctx.commit()

    @property
    def nmi_blocked(self) -> bool:
        """NMIs blocked (after an NMI is delivered, and in SMM); the guest's IRET unblocks them."""
        return self._flag(uci.HFLAGS2, uci.HF2_NMI_MASK)

    @nmi_blocked.setter
    def nmi_blocked(self, blocked: bool) -> None:
        self._set_flag(uci.HFLAGS2, uci.HF2_NMI_MASK, blocked)

    @property
    def interrupt_shadow(self) -> bool:
        """The STI/MOV SS interrupt shadow (QEMU's HF_INHIBIT_IRQ)."""
        return self._flag(uci.HFLAGS, uci.HF_INHIBIT_IRQ)

    @interrupt_shadow.setter
    def interrupt_shadow(self, active: bool) -> None:
        self._set_flag(uci.HFLAGS, uci.HF_INHIBIT_IRQ, active)

    def clear_inflight_exception(self) -> None:
        """Forget the fault just handled, so the next one is not taken for a #DF
        (reference/unicorn.md §3)."""
        ctx = self.context.snapshot()
        ctx.put_i32(uci.OLD_EXCEPTION, -1)
        ctx.commit()

    # -- mode ------------------------------------------------------------------------------
    @property
    def long_mode_active(self) -> bool:
        return bool(self["efer"] & EFER_LMA)

    @property
    def protected(self) -> bool:
        return bool(self["cr0"] & CR0_PE)

    @property
    def vm86(self) -> bool:
        return bool(self["rflags"] & RFLAGS_VM)

    def code_bits(self) -> int:
        """Default operand size of the code now running: 16, 32 or 64."""
        return uci.code_bits(self.context.snapshot().u32(uci.HFLAGS))

    def snapshot(self) -> "CpuSnapshot":
        """The architectural registers now, cheaply: one copy of the context, parsed later."""
        return CpuSnapshot(bytes(self.context.snapshot().raw), self["rflags"], self.svme)


def _address_space(cr0: int, cr3: int, cr4: int, efer: int) -> tuple:
    return (True, cr3, cr4 & (CR4_PAE | CR4_PSE), efer & EFER_LMA) if cr0 & CR0_PG else (False,)


STATE_NAMES = (*uci.STATE_FIELDS, "rflags")


class _StateIndices:
    """Where each register sits in an ArchState: ``At.cr0``, ``At.cs_base``, ``At.rflags``.
    An instance, not a class: world switches read these constantly, and CPython specialises
    attribute reads of instances, not of classes."""


At = _StateIndices()
for _index, _name in enumerate(STATE_NAMES):
    setattr(At, _name.replace(".", "_"), _index)


class ArchState(list):
    """The registers a world switch moves (SMM entry and RSM): the values of
    ``ucinternals.STATE_FIELDS`` — GPRs, RIP, hflags (CPL in bits 1:0), hflags2 (NMI
    blocking), the segment caches with GDTR/IDTR, CR0-CR4, EFER (with the guest-visible
    SVME), DR0-DR7 — then RFLAGS.  A flat list, so a whole state moves in one struct call."""

    def segment(self, name: str) -> Segment:
        at = getattr(At, f"{name}_selector")
        return Segment(self[at] & 0xFFFF, self[at + 1], self[at + 2], self[at + 3])

    @property
    def cpl(self) -> int:
        return self[At.hflags] & uci.HF_CPL_MASK

    @cpl.setter
    def cpl(self, cpl: int) -> None:
        self[At.hflags] = self[At.hflags] & ~uci.HF_CPL_MASK | cpl

    @property
    def protected(self) -> bool:
        return bool(self[At.cr0] & CR0_PE)

    @property
    def nmi_blocked(self) -> bool:
        return bool(self[At.hflags2] & uci.HF2_NMI_MASK)

    @nmi_blocked.setter
    def nmi_blocked(self, blocked: bool) -> None:
        self[At.hflags2] = self[At.hflags2] | uci.HF2_NMI_MASK if blocked else self[At.hflags2] & ~uci.HF2_NMI_MASK


class CpuSnapshot:
    """Registers as they were when taken; ``registers()`` names them (RunResult.regs)."""

    def __init__(self, raw: bytes, rflags: int, svme: bool):
        self._raw, self._rflags, self._svme = raw, rflags, svme

    def registers(self) -> dict:
        state = ArchState((*uci.STATE.unpack_from(self._raw), self._rflags))
        regs = {name: state[getattr(At, name)] for name in (*GPRS, "rip", "rflags", "cr0", "cr2", "cr3", "cr4")}
        regs["efer"] = state[At.efer] | (EFER_SVME if self._svme else 0)
        regs["dr6"], regs["dr7"] = state[At.dr6], state[At.dr7]
        for name in (*SEGMENT_REGISTERS, *SYSTEM_SEGMENTS):
            regs[name] = state.segment(name).as_dict()
        for name in ("gdtr", "idtr"):
            regs[name] = {"base": state[getattr(At, f"{name}_base")], "limit": state[getattr(At, f"{name}_limit")]}
        regs["cpl"] = state.cpl
        return regs
