"""Architectural CPU state of the one Unicorn handle: registers, segment caches, CPL, mode."""
from __future__ import annotations

import struct
from dataclasses import dataclass

from unicorn import Uc
from unicorn import x86_const as X

from . import ucinternals as uci
from .descriptors import Segment

MSR_EFER = 0xC000_0080
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11
EFER_SVME = 1 << 12

CR0_PE = 1 << 0
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5

RFLAGS_TF = 1 << 8
RFLAGS_IF = 1 << 9
RFLAGS_NT = 1 << 14
RFLAGS_RF = 1 << 16
RFLAGS_VM = 1 << 17
RFLAGS_AC = 1 << 18

GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
SEGMENT_REGISTERS = ("cs", "ds", "es", "fs", "gs", "ss")
SYSTEM_SEGMENTS = ("ldtr", "tr")
CONTROL = ("cr0", "cr2", "cr3", "cr4")

# Every register name the API and ``--set`` accept, mapped to Unicorn's id.  Narrow names
# (eax, ax, al, r8d …) write only their part, as the instruction set does.
_UC_NAMES = {name: getattr(X, f"UC_X86_REG_{name.upper()}") for name in (
    *GPRS, "rip", "eip", "ip", "rflags", "eflags", *CONTROL, "cr8",
    "dr0", "dr1", "dr2", "dr3", "dr6", "dr7", "fs_base", "gs_base",
    "eax", "ebx", "ecx", "edx", "esi", "edi", "ebp", "esp",
    "ax", "bx", "cx", "dx", "si", "di", "bp", "sp", "al", "bl", "cl", "dl", "ah", "bh", "ch", "dh",
    *(f"r{n}{s}" for n in range(8, 16) for s in "dwb"))}
REGISTER_NAMES = frozenset(_UC_NAMES) | {"efer"} | set(SEGMENT_REGISTERS)
_CONTEXT_GPR_ORDER = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
                      "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
_SLOT_ORDER = tuple(sorted(uci.SEGMENT_SLOT, key=uci.SEGMENT_SLOT.get))      # es cs ss ds fs gs ldtr tr
_SEGMENT_SLOTS = struct.Struct("<" + "I4xQII" * 10)                       # ... then GDTR, IDTR
_CONTROL_NAMES = frozenset({*CONTROL, "cr8", "rflags", "eflags"})
_PAGING_NAMES = frozenset({"cr0", "cr3", "cr4", "efer"})


class Cpu:
    """Reads and writes the guest CPU through Unicorn's API and, for what that API cannot
    reach (hidden segment state, CPL), through the saved context (ucinternals)."""

    def __init__(self, uc: Uc):
        self.uc = uc
        self.context = uci.Context(uc)
        self.fast = uci.FastAccess(uc)
        # Bumped whenever ringminus writes CR0/CR3/CR4/EFER: code sites sit on linear
        # addresses, so the machine re-arms them when this moves.
        self.paging_epoch = 0
        # The guest-visible EFER.SVME.  Unicorn's CPU model drops the bit, and it must stay
        # clear there anyway so every SVM instruction traps as #UD (reference/unicorn.md §3).
        self.svme = False

    # -- plain registers -------------------------------------------------------------------
    def __getitem__(self, name: str) -> int:
        if name == "efer":
            return self.fast.read_msr(MSR_EFER) | (EFER_SVME if self.svme else 0)
        if name in SEGMENT_REGISTERS or name in SYSTEM_SEGMENTS:
            return self.segment(name).selector
        return self.fast.read(_UC_NAMES[name])

    def __setitem__(self, name: str, value: int) -> None:
        if name in _PAGING_NAMES:
            self.paging_epoch += 1
        if name == "efer":
            self.svme = bool(value & EFER_SVME)
            self.uc.msr_write(MSR_EFER, value & ~EFER_SVME)
        elif name in _CONTROL_NAMES:
            self.uc.reg_write(_UC_NAMES[name], value)     # the binding keeps QEMU's hflags in step
        else:
            self.fast.write(_UC_NAMES[name], value)

    @property
    def rip(self) -> int:
        return self.fast.read(X.UC_X86_REG_RIP)

    @rip.setter
    def rip(self, value: int) -> None:
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
        self.uc.reg_write(X.UC_X86_REG_GDTR if name == "gdtr" else X.UC_X86_REG_IDTR, (0, base, limit, 0))

    @property
    def cpl(self) -> int:
        return self.context.snapshot().u32(uci.HFLAGS) & uci.HF_CPL_MASK

    def load_segments(self, segments: dict[str, Segment], cpl: int | None = None) -> None:
        """Write segment caches (selector + hidden part) and, optionally, the CPL, in one
        context round trip; hflags are re-derived the way QEMU derives them."""
        ctx = self.context.snapshot()
        for name, seg in segments.items():
            ctx.put_segment(name, uci.SegmentCache(seg.selector, seg.base, seg.limit, seg.flags))
        ctx.recompute_segment_hflags(ctx.u32(uci.HFLAGS) & 3 if cpl is None else cpl)
        ctx.commit()

    def set_mode_state(self, cr0: int, cr4: int, efer: int) -> None:
        """Set CR0/CR4/EFER exactly, including leaving long mode, which register writes on a
        64-bit handle cannot do (reference/unicorn.md §5): EFER, CR0 and the LMA/PE hflags
        are patched in the saved context."""
        self.paging_epoch += 1
        self.uc.reg_write(X.UC_X86_REG_CR4, cr4)
        ctx = self.context.snapshot()
        ctx.put_u64(uci.CR, cr0)
        ctx.put_u64(uci.EFER, efer)
        hflags = ctx.u32(uci.HFLAGS) & ~(uci.HF_LMA | uci.HF_PE | 0xE00)
        hflags |= (uci.HF_LMA if efer & EFER_LMA else 0) | (uci.HF_PE if cr0 & CR0_PE else 0)
        hflags |= ((cr0 >> 1) & 7) << 9            # MP, EM, TS -> HF_MP/EM/TS (bits 9-11)
        ctx.put_u32(uci.HFLAGS, hflags)
        ctx.recompute_segment_hflags(hflags & 3)
        ctx.commit()

    def capture(self) -> "ArchState":
        """Every register a world switch saves, from one copy of the context."""
        ctx = self.context.snapshot()
        gprs = dict(zip(_CONTEXT_GPR_ORDER, struct.unpack_from("<16Q", ctx.view, uci.GPRS)))
        raw = _SEGMENT_SLOTS.unpack_from(ctx.view, uci.SEGMENTS)
        segments = {name: Segment(raw[4 * slot] & 0xFFFF, *raw[4 * slot + 1:4 * slot + 4])
                    for name, slot in uci.SEGMENT_SLOT.items()}
        cr0, _, cr2, cr3, cr4 = struct.unpack_from("<5Q", ctx.view, uci.CR)
        return ArchState(gprs, ctx.u64(uci.EIP), self.fast.read(X.UC_X86_REG_RFLAGS), segments,
                         (raw[33], raw[34]), (raw[37], raw[38]), cr0, cr3, cr4,
                         ctx.u64(uci.EFER) | (EFER_SVME if self.svme else 0),
                         ctx.u64(uci.DEBUG_REGISTERS + 6 * 8), ctx.u64(uci.DEBUG_REGISTERS + 7 * 8),
                         ctx.u32(uci.HFLAGS) & uci.HF_CPL_MASK)

    def load(self, state: "ArchState", nmi_blocked: bool | None = None) -> None:
        """Make ``state`` the CPU's, mode included (one context round trip for everything the
        register API cannot set, the C API for the rest); optionally set NMI blocking too."""
        self.paging_epoch += 1
        self.svme = bool(state.efer & EFER_SVME)
        self.fast.write(X.UC_X86_REG_CR4, state.cr4)
        ctx = self.context.snapshot()
        struct.pack_into("<16Q", ctx.view, uci.GPRS, *(state.gprs[n] & 0xFFFF_FFFF_FFFF_FFFF for n in _CONTEXT_GPR_ORDER))
        ctx.put_u64(uci.EIP, state.rip)
        slots = []
        for name in _SLOT_ORDER:
            seg = state.segments[name]
            slots += (seg.selector, seg.base & 0xFFFF_FFFF_FFFF_FFFF, seg.limit & 0xFFFF_FFFF, seg.flags & 0xFFFF_FFFF)
        slots += (0, state.gdtr[0], state.gdtr[1], 0, 0, state.idtr[0], state.idtr[1], 0)
        _SEGMENT_SLOTS.pack_into(ctx.view, uci.SEGMENTS, *slots)
        if nmi_blocked is not None:
            hflags2 = ctx.u32(uci.HFLAGS2)
            ctx.put_u32(uci.HFLAGS2, hflags2 | uci.HF2_NMI_MASK if nmi_blocked else hflags2 & ~uci.HF2_NMI_MASK)
        ctx.put_u64(uci.CR, state.cr0)
        ctx.put_u64(uci.EFER, state.efer & ~EFER_SVME)
        hflags = ctx.u32(uci.HFLAGS) & ~(uci.HF_LMA | uci.HF_PE | 0xE00)
        hflags |= (uci.HF_LMA if state.efer & EFER_LMA else 0) | (uci.HF_PE if state.cr0 & CR0_PE else 0)
        hflags |= ((state.cr0 >> 1) & 7) << 9
        ctx.put_u32(uci.HFLAGS, hflags)
        ctx.recompute_segment_hflags(state.cpl)
        ctx.commit()
        self.fast.write(X.UC_X86_REG_CR3, state.cr3)
        self.fast.write(X.UC_X86_REG_RFLAGS, state.rflags)
        self.fast.write(X.UC_X86_REG_DR6, state.dr6)
        self.fast.write(X.UC_X86_REG_DR7, state.dr7)

    @property
    def nmi_blocked(self) -> bool:
        """NMIs blocked (after an NMI is delivered, and in SMM); the guest's IRET unblocks them."""
        return bool(self.context.snapshot().u32(uci.HFLAGS2) & uci.HF2_NMI_MASK)

    @nmi_blocked.setter
    def nmi_blocked(self, blocked: bool) -> None:
        ctx = self.context.snapshot()
        hflags2 = ctx.u32(uci.HFLAGS2)
        ctx.put_u32(uci.HFLAGS2, hflags2 | uci.HF2_NMI_MASK if blocked else hflags2 & ~uci.HF2_NMI_MASK)
        ctx.commit()

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


@dataclass
class ArchState:
    """The architectural state a world switch moves (SMM entry/RSM, snapshots)."""
    gprs: dict[str, int]
    rip: int
    rflags: int
    segments: dict[str, Segment]       # cs ds es fs gs ss ldtr tr
    gdtr: tuple[int, int]              # (base, limit)
    idtr: tuple[int, int]
    cr0: int
    cr3: int
    cr4: int
    efer: int
    dr6: int
    dr7: int
    cpl: int


class CpuSnapshot:
    """Registers as they were when taken; ``registers()`` names them (RunResult.regs)."""

    def __init__(self, raw: bytes, rflags: int, svme: bool):
        self._raw, self._rflags, self._svme = raw, rflags, svme

    def registers(self) -> dict:
        ctx = uci.Context.from_bytes(self._raw)
        regs = dict(zip(_CONTEXT_GPR_ORDER, struct.unpack_from("<16Q", ctx.view, uci.GPRS)))
        regs = {name: regs[name] for name in GPRS}
        regs["rip"] = ctx.u64(uci.EIP)
        regs["rflags"] = self._rflags
        for n in (0, 2, 3, 4):
            regs[f"cr{n}"] = ctx.u64(uci.CR + 8 * n)
        regs["efer"] = ctx.u64(uci.EFER) | (EFER_SVME if self._svme else 0)
        regs["dr6"] = ctx.u64(uci.DEBUG_REGISTERS + 6 * 8)
        regs["dr7"] = ctx.u64(uci.DEBUG_REGISTERS + 7 * 8)
        for name in (*SEGMENT_REGISTERS, *SYSTEM_SEGMENTS):
            c = ctx.segment(name)
            regs[name] = Segment(c.selector, c.base, c.limit, c.flags).as_dict()
        for name, slot in (("gdtr", 8), ("idtr", 9)):
            c = ctx.segment_slot(slot)
            regs[name] = {"base": c.base, "limit": c.limit}
        regs["cpl"] = ctx.u32(uci.HFLAGS) & uci.HF_CPL_MASK
        return regs
