"""Unicorn 2.1.4 internals that its API does not expose — the one home for them.

Unicorn keeps the guest CPU in QEMU's ``CPUX86State``; ``uc_context`` is a 40-byte header
followed by a raw copy of it (reference/unicorn.md §6).  ringminus reads and patches that copy
for what no register API reaches: hidden segment state, CPL (QEMU's ``hflags``), the error
code and the "exception in flight" marker of a fault, and Unicorn's own retired-instruction
counter.  Every offset here was measured on unicorn 2.1.4 and is checked by :func:`verify`
against values a scratch engine can predict, so another release fails at start-up with a
clear message instead of corrupting a guest.
"""
from __future__ import annotations

import ctypes
import functools
import struct
from dataclasses import dataclass

import unicorn
from unicorn import UC_ARCH_X86, UC_CTL_IO_WRITE, UC_CTL_TLB_FLUSH, UC_HOOK_INTR, UC_MODE_64, Uc, UcError
from unicorn import x86_const as X

CONTEXT_SIZE = 5608          # bytes(UcContext) on 2.1.4, header included

# Offsets inside the context (header included).
EIP = 168
EFLAGS = 176
HFLAGS = 216
HFLAGS2 = 220
HF2_GIF = 1 << 0
HF2_NMI_MASK = 1 << 2        # NMIs blocked; QEMU's IRET clears it, so the guest's IRET ends the block
SEGS = 224                   # segs[]: ES, CS, SS, DS, FS, GS; then LDTR, TR, GDTR, IDTR
SEGMENT_STRIDE = 24          # u32 selector, pad, u64 base, u32 limit, u32 flags
SEGMENT_SLOT = {"es": 0, "cs": 1, "ss": 2, "ds": 3, "fs": 4, "gs": 5, "ldtr": 6, "tr": 7}
CR = 464                     # cr[0..4], u64 each
EFER = 632
GPRS = 40                    # regs[16], u64 each, in RAX RCX RDX RBX RSP RBP RSI RDI R8-R15 order
DEBUG_REGISTERS = 5440       # dr[8], u64 each
ERROR_CODE = 5424            # i32: error code of the fault being reported
EXCEPTION_IS_INT = 5428      # i32: 1 for INT n / INT3 / INTO (software)
EXCEPTION_NEXT_EIP = 5432    # u64
OLD_EXCEPTION = 5536         # i32: QEMU's "exception in flight" (-1 = none)

# Offset inside ``struct uc_struct`` of the pair (emu_counter, emu_count).
MASK64 = 0xFFFF_FFFF_FFFF_FFFF
# MSRs QEMU keeps as plain fields of the CPU state (its helper_wrmsr stores them, nothing
# else): where the context holds each, and its width.  SYSENTER_CS keeps 16 bits.
CONTEXT_MSRS = {0x174: (4840, 4, 0xFFFF), 0x175: (4848, 8, MASK64), 0x176: (4856, 8, MASK64),
                0xC000_0081: (4864, 8, MASK64), 0xC000_0082: (4880, 8, MASK64), 0xC000_0083: (4888, 8, MASK64),
                0xC000_0084: (4896, 8, MASK64), 0xC000_0102: (4904, 8, MASK64)}
EMU_COUNTER = 1368
# uc->invalid_addr: the whole address of the access that ended a slice with an error (a TLB
# fill hook is told only its page).
INVALID_ADDRESS = 1416
# ``uc->cpu`` (the X86CPU), and where its CPUX86State starts; the context's data is a copy of
# that state from its start, after a CONTEXT_HEADER-byte header.
UC_CPU = 440
CPU_ENV = 35408
CONTEXT_HEADER = 40
# env->features[] (u64 each, past the saved context): what QEMU's decoder and helpers test
# before they execute an instruction or accept a CR4/EFER bit.  Words by QEMU's FeatureWord.
ENV_FEATURES = 5632
FEATURE_WORD = {"1_edx": 0, "1_ecx": 1, "7_0_ebx": 2, "7_0_ecx": 3, "8000_0001_edx": 6, "8000_0001_ecx": 7}
# QEMU's breakpoint objects for DR0-DR3 (cpu_breakpoint[4], after dr[8]); BP_CPU marks them.
BREAKPOINT_POINTERS = DEBUG_REGISTERS + 8 * 8
BP_CPU = 0x20
DR7_FIXED_1 = 0x400

# QEMU hflags bits (target/i386/cpu.h) that ringminus maintains when it patches segments.
HF_CPL_MASK = 0x3
HF_CS32 = 1 << 4
HF_SS32 = 1 << 5
HF_ADDSEG = 1 << 6
HF_PE = 1 << 7
HF_LMA = 1 << 14
HF_CS64 = 1 << 15
HF_INHIBIT_IRQ = 1 << 3      # the interrupt shadow (MOV SS / STI)
HF_CR0_MP_EM_TS = 0x7 << 9   # CR0.MP, EM, TS mirrored in hflags bits 9-11

# Descriptor-cache flag bits (descriptor high dword layout).
DESC_B = 1 << 22
DESC_L = 1 << 21

CR0_PE = 1 << 0
EFER_LMA = 1 << 10
RFLAGS_VM = 1 << 17


# -- the architectural state as one flat tuple ------------------------------------------------
# World switches (SMM entry and RSM) move every register at once.  The context holds them in
# three runs; one table names each run's fields, so reading is one struct call over the whole
# context and writing is one call per run (the bytes between runs are QEMU state ringminus
# must not touch).  Segment slots: es cs ss ds fs gs, then ldtr tr gdtr idtr.
SLOT_NAMES = ("es", "cs", "ss", "ds", "fs", "gs", "ldtr", "tr", "gdtr", "idtr")
# The first run also carries QEMU's lazy-flags fields (eflags, cc_*, df), which makes it one
# contiguous run; a world switch writes RFLAGS into them as a register write would
# (``eflags_fields``).
_STATE_RUNS_SPEC = (
    (GPRS, "16QQ" "QQQQIi" "II" + "I4xQII" * 10 + "5Q",
     ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", *(f"r{n}" for n in range(8, 16)), "rip",
      "qemu.eflags", "qemu.cc_dst", "qemu.cc_src", "qemu.cc_src2", "qemu.cc_op", "qemu.df",
      "hflags", "hflags2", *(f"{slot}.{part}" for slot in SLOT_NAMES for part in ("selector", "base", "limit", "flags")),
      "cr0", "cr1", "cr2", "cr3", "cr4")),
    (EFER, "Q", ("efer",)),
    (DEBUG_REGISTERS, "8Q", tuple(f"dr{n}" for n in range(8))),
)
STATE_FIELDS: tuple[str, ...] = tuple(name for _, _, names in _STATE_RUNS_SPEC for name in names)


def _state_struct() -> struct.Struct:
    fmt, at = "<", 0
    for offset, run, _ in _STATE_RUNS_SPEC:
        fmt += f"{offset - at}x{run}"
        at = offset + struct.calcsize("<" + run)
    return struct.Struct(fmt)


STATE = _state_struct()                       # unpack_from(context) -> values in STATE_FIELDS order
# CR0, CR3, CR4, EFER and DR7 in one read: what a world switch compares its new values with
# to decide what QEMU must redo (flush its TLB).
SWITCH_CONTROLS = struct.Struct(f"<{CR}xQ16xQQ{EFER - CR - 40}xQ{DEBUG_REGISTERS + 7 * 8 - EFER - 8}xQ")
STATE_RUNS: tuple[tuple[struct.Struct, int, slice], ...] = tuple(
    (struct.Struct("<" + run), offset, slice(STATE_FIELDS.index(names[0]), STATE_FIELDS.index(names[0]) + len(names)))
    for offset, run, names in _STATE_RUNS_SPEC)


CC_OP = EFLAGS + 4 * 8        # i32: QEMU's lazy-flags operation, after eflags, cc_dst, cc_src, cc_src2
CC_SRC = EFLAGS + 2 * 8       # u64
CC_OP_EFLAGS = 1              # QEMU's lazy-flags state "CC_SRC holds the flags themselves"
ARITHMETIC_FLAGS = 0x8D5      # OF SF ZF AF PF CF


def eflags_fields(rflags: int) -> tuple[int, int, int, int]:
    """(eflags, cc_src, cc_op, df) as QEMU's ``cpu_load_eflags`` stores RFLAGS (what a
    register write does): a world switch patches them into the first state run directly."""
    return rflags | 0x2, rflags & ARITHMETIC_FLAGS, CC_OP_EFLAGS, -1 if rflags & (1 << 10) else 1


# Cached: a pure function of registers that take few distinct values, called at every world
# switch.
@functools.lru_cache(maxsize=1024)
def derive_hflags(hflags: int, cr0: int, efer: int, rflags: int, cpl: int, cs_flags: int, ss_flags: int,
                  data_bases: int) -> int:
    """The hflags QEMU keeps in step with CR0, EFER and the segment caches (``cpu_x86_update_cr0``,
    ``cpu_x86_load_seg_cache``), for caches and control registers ringminus wrote directly.
    ``data_bases`` is the OR of the DS, ES and SS bases."""
    hflags &= ~(HF_CPL_MASK | HF_CS32 | HF_SS32 | HF_CS64 | HF_ADDSEG | HF_PE | HF_LMA | HF_CR0_MP_EM_TS)
    hflags |= (cpl & 3) | ((cr0 >> 1) & 7) << 9
    if cr0 & CR0_PE:
        hflags |= HF_PE
    if efer & EFER_LMA:
        hflags |= HF_LMA
    if hflags & HF_LMA and cs_flags & DESC_L:
        hflags |= HF_CS32 | HF_SS32 | HF_CS64
    else:
        if cs_flags & DESC_B:
            hflags |= HF_CS32
        if ss_flags & DESC_B:
            hflags |= HF_SS32
        protected32 = cr0 & CR0_PE and not rflags & RFLAGS_VM and hflags & HF_CS32
        if not protected32 or data_bases:
            hflags |= HF_ADDSEG
    return hflags


def code_bits(hflags: int) -> int:
    """Default operand size of the code running under these hflags: 16, 32 or 64 (CS64, CS32;
    neither in real and virtual-8086 mode)."""
    return 64 if hflags & HF_CS64 else 32 if hflags & HF_CS32 else 16


class UnicornLayoutError(RuntimeError):
    """The installed Unicorn does not have the CPU-state layout ringminus was built for."""


@dataclass(frozen=True)
class SegmentCache:
    """One raw QEMU SegmentCache: selector, base, limit (bytes, already scaled), flags."""
    selector: int
    base: int
    limit: int
    flags: int


# Accessors run several times per world switch: formats compiled once, not per call.
_U32, _I32, _U64 = struct.Struct("<I"), struct.Struct("<i"), struct.Struct("<Q")


class Context:
    """A reusable ``uc_context`` whose bytes ringminus reads and patches in place.

    ``snapshot()`` copies the live CPU into it (about 1 µs); ``commit()`` copies it back.
    Reads and writes in between touch only the copy.
    """

    def __init__(self, uc: Uc):
        self._uc = uc
        self._ctx = uc.context_save()
        # snapshot/commit call the C library directly: they run several times per intercept
        # or world switch, and the binding's wrappers cost more than the copy itself.
        self._save, self._restore = uc_library().uc_context_save, uc_library().uc_context_restore
        self._handle, self._pointer = uc._uch, self._ctx.context
        address = ctypes.cast(self._ctx.context, ctypes.c_void_p).value
        self.raw = (ctypes.c_uint8 * CONTEXT_SIZE).from_address(address)
        self.view = memoryview(self.raw).cast("B")

    def snapshot(self) -> "Context":
        self._save(self._handle, self._pointer)
        return self

    def commit(self) -> None:
        self._restore(self._handle, self._pointer)

    def u32(self, offset: int) -> int:
        return _U32.unpack_from(self.view, offset)[0]

    def i32(self, offset: int) -> int:
        return _I32.unpack_from(self.view, offset)[0]

    def u64(self, offset: int) -> int:
        return _U64.unpack_from(self.view, offset)[0]

    def put_u32(self, offset: int, value: int) -> None:
        _U32.pack_into(self.view, offset, value & 0xFFFFFFFF)

    def put_i32(self, offset: int, value: int) -> None:
        _I32.pack_into(self.view, offset, value)

    def put_u64(self, offset: int, value: int) -> None:
        _U64.pack_into(self.view, offset, value & 0xFFFFFFFFFFFFFFFF)

    def segment(self, name: str) -> SegmentCache:
        return self.segment_slot(SEGMENT_SLOT[name])

    def segment_slot(self, slot: int) -> SegmentCache:
        """Slot 0-5 ES..GS, 6 LDTR, 7 TR, 8 GDTR, 9 IDTR (base and limit only)."""
        offset = SEGS + SEGMENT_STRIDE * slot
        selector, base, limit, flags = struct.unpack_from("<I4xQII", self.view, offset)
        return SegmentCache(selector & 0xFFFF, base, limit, flags)

    def put_segment(self, name: str, cache: SegmentCache) -> None:
        self.put_segment_slot(SEGMENT_SLOT[name], cache)

    def put_segment_slot(self, slot: int, cache: SegmentCache) -> None:
        offset = SEGS + SEGMENT_STRIDE * slot
        struct.pack_into("<I4xQII", self.view, offset, cache.selector & 0xFFFF,
                         cache.base & 0xFFFFFFFFFFFFFFFF, cache.limit & 0xFFFFFFFF,
                         cache.flags & 0xFFFFFFFF)

    def recompute_segment_hflags(self, cpl: int) -> None:
        """Re-derive hflags after ringminus wrote segment caches, CR0 or EFER directly."""
        cs, ss = self.segment("cs"), self.segment("ss")
        self.put_u32(HFLAGS, derive_hflags(self.u32(HFLAGS), self.u64(CR), self.u64(EFER), self.u64(EFLAGS), cpl,
                                           cs.flags, ss.flags, self.segment("ds").base | self.segment("es").base | ss.base))


class _Msr(ctypes.Structure):
    _fields_ = [("rid", ctypes.c_uint32), ("value", ctypes.c_uint64)]


class FastAccess:
    """Register and memory access through Unicorn's C API directly: about 1 µs a call where
    the Python binding takes 3-5 µs (it matters inside hooks that run per intercept)."""

    def __init__(self, uc: Uc):
        self._lib = uc_library()
        self._handle = uc._uch
        self._value = ctypes.c_uint64()
        self._value_pointer = ctypes.byref(self._value)
        self._msr = _Msr()
        self._reg_read, self._reg_write = self._lib.uc_reg_read, self._lib.uc_reg_write
        self._mem_read = self._lib.uc_mem_read
        self._set_buffer(4096)

    def _set_buffer(self, size: int) -> None:
        self._buffer = ctypes.create_string_buffer(size)
        self._buffer_view = memoryview(self._buffer).cast("B")   # slices copy only what was read

    def read(self, register: int) -> int:
        self._value.value = 0
        self._reg_read(self._handle, register, self._value_pointer)
        return self._value.value

    def write(self, register: int, value: int) -> None:
        self._value.value = value & 0xFFFF_FFFF_FFFF_FFFF
        self._reg_write(self._handle, register, self._value_pointer)

    def flush_tlb(self) -> None:
        """Drop QEMU's softmmu TLB (after ringminus changed paging state in the context)."""
        self._lib.uc_ctl(self._handle, _CTL_TLB_FLUSH)

    def read_msr(self, msr: int) -> int:
        self._msr.rid, self._msr.value = msr, 0
        self._lib.uc_reg_read(self._handle, X.UC_X86_REG_MSR, ctypes.byref(self._msr))
        return self._msr.value

    def write_msr(self, msr: int, value: int) -> None:
        self._msr.rid, self._msr.value = msr, value & 0xFFFF_FFFF_FFFF_FFFF
        self._lib.uc_reg_write(self._handle, X.UC_X86_REG_MSR, ctypes.byref(self._msr))

    def read_memory(self, address: int, size: int) -> bytes | None:
        """Physical bytes, or None when something is not mapped."""
        if size > len(self._buffer):
            self._set_buffer(size)
        if self._mem_read(self._handle, address, self._buffer, size) != 0:
            return None
        return self._buffer_view[:size].tobytes()

    def write_memory(self, address: int, data: bytes) -> bool:
        """Write physical bytes (Unicorn drops translations of code they overwrite); False
        when something is not mapped."""
        return self._lib.uc_mem_write(self._handle, address, data, len(data)) == 0


_CTL_TLB_FLUSH = UC_CTL_IO_WRITE << 30 | UC_CTL_TLB_FLUSH     # uc_ctl code, no arguments

_INSN_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_uint32, ctypes.c_void_p, ctypes.c_void_p)


def add_instruction_hook(uc: Uc, instruction: int, callback) -> object:
    """A UC_HOOK_INSN hook for an instruction the Python binding refuses (RDTSC, RDTSCP),
    registered with the C core (reference/unicorn.md §2).  ``callback()`` returns 1 to skip the
    native instruction.  Returns the ctypes callback, which must be kept alive."""
    from unicorn import UC_HOOK_INSN
    function = _INSN_CALLBACK(lambda handle, data: callback())
    handle = ctypes.c_size_t()
    status = uc_library().uc_hook_add(uc._uch, ctypes.byref(handle), UC_HOOK_INSN,
                                      ctypes.cast(function, ctypes.c_void_p), None,
                                      ctypes.c_uint64(1), ctypes.c_uint64(0), ctypes.c_int(instruction))
    if status != 0:
        raise UnicornLayoutError(f"unicorn refused an instruction hook (status {status})")
    return function


class FetchTranslator:
    """Linear to physical for an instruction fetch, as Unicorn's CPU makes it: through QEMU's
    softmmu TLB (``uc_vmem_translate``, Unicorn 2.1.4's C API, which its Python binding lacks),
    so it finds a translation the TLB still holds after the guest's tables changed.  On a TLB
    miss QEMU walks the tables, and a walk that fails leaves its #PF pending behind (the CPU's
    exception index, CR2, the error code): taken when the slice next leaves translated code."""

    def __init__(self, uc: Uc):
        self._translate = uc_library().uc_vmem_translate
        self._handle = uc._uch
        self._physical = ctypes.c_uint64()
        self._out = ctypes.byref(self._physical)

    def __call__(self, linear: int) -> int | None:
        status = self._translate(self._handle, ctypes.c_uint64(linear), ctypes.c_int(unicorn.UC_PROT_EXEC), self._out)
        return self._physical.value if status == 0 else None


class DebugBreakpoints:
    """QEMU arms a breakpoint object for each instruction breakpoint DR7 enables when the guest
    writes DR7 or DR0-DR3 (bpt_helper.c cpu_x86_update_dr7) and keeps pointers to them in the
    CPU state.  ringminus's own writes of that state — a world switch, a snapshot restored,
    a reset — change DR7 and those pointers behind QEMU's back: a breakpoint stays armed that
    DR7 no longer enables, and a restored pointer to one freed since is freed again (replay
    seed 3531040: glibc aborted on a double free).  ``rearm`` makes QEMU's breakpoints what
    the registers say now: it frees every guest breakpoint and lets QEMU arm those DR7 enables."""

    def __init__(self, uc: Uc):
        lib = uc_library()
        self._remove_all, self._update_dr7 = lib.cpu_breakpoint_remove_all_x86_64, lib.cpu_x86_update_dr7_x86_64
        self._remove_all.argtypes, self._remove_all.restype = (ctypes.c_void_p, ctypes.c_int), None
        self._update_dr7.argtypes, self._update_dr7.restype = (ctypes.c_void_p, ctypes.c_uint32), None
        self._cpu = ctypes.c_uint64.from_address(uc._uch.value + UC_CPU).value
        env = self._cpu + CPU_ENV
        self._dr7 = ctypes.c_uint64.from_address(env + DEBUG_REGISTERS + 7 * 8 - CONTEXT_HEADER)
        self._pointers = (ctypes.c_uint64 * 4).from_address(env + BREAKPOINT_POINTERS - CONTEXT_HEADER)
        self._env = env

    def rearm(self) -> None:
        self._remove_all(self._cpu, BP_CPU)
        self._pointers[:] = (0, 0, 0, 0)
        dr7, self._dr7.value = self._dr7.value, DR7_FIXED_1      # from "nothing armed" to DR7
        self._update_dr7(self._env, dr7 & 0xFFFF_FFFF)

    def armed(self) -> int:
        """How many DR0-DR3 breakpoint objects QEMU holds."""
        return sum(1 for pointer in self._pointers if pointer)


def set_features(uc: Uc, words: dict[str, int]) -> None:
    """Give Unicorn's CPU these CPUID feature words (FEATURE_WORD names), before it translates
    anything: its translated code then has exactly those instructions."""
    uc.reg_read(X.UC_X86_REG_RAX)           # Unicorn creates its CPU lazily, at the first use
    env = ctypes.c_uint64.from_address(uc._uch.value + UC_CPU).value + CPU_ENV
    features = (ctypes.c_uint64 * 8).from_address(env + ENV_FEATURES)
    for name, value in words.items():
        features[FEATURE_WORD[name]] = value


def native_cpuid(uc: Uc, leaf: int) -> tuple[int, int, int, int]:
    """CPUID as Unicorn's own CPU answers it (no ringminus hook on ``uc``)."""
    uc.mem_write(0, b"\x0f\xa2")
    uc.reg_write(X.UC_X86_REG_RAX, leaf)
    uc.reg_write(X.UC_X86_REG_RCX, 0)
    uc.emu_start(0, 2)
    return tuple(uc.reg_read(r) for r in (X.UC_X86_REG_RAX, X.UC_X86_REG_RBX, X.UC_X86_REG_RCX, X.UC_X86_REG_RDX))


def uc_library():
    from unicorn.unicorn_py3 import unicorn as binding
    return binding.uclib


def invalid_address(uc: Uc) -> int:
    """The address of the access that last ended an ``emu_start`` with an error."""
    return ctypes.c_uint64.from_address(uc._uch.value + INVALID_ADDRESS).value


def emu_counter(uc: Uc) -> int:
    """Unicorn's count of instructions *started* in the last counted ``emu_start``."""
    return ctypes.c_uint64.from_address(uc._uch.value + EMU_COUNTER).value


@functools.cache
def verify() -> None:
    """Check every offset above on a scratch engine; raise UnicornLayoutError if one is off."""
    version = unicorn.__version__

    def fail(what: str) -> None:
        raise UnicornLayoutError(
            f"ringminus needs unicorn 2.1.4 (found {version}): {what} is not where 2.1.4 keeps it")

    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 0x10000)
    ctx = Context(uc)
    if len(bytes(uc.context_save())) != CONTEXT_SIZE:
        fail("the saved context size")
    uc.reg_write(X.UC_X86_REG_RIP, 0x1234_5678_9ABC)
    uc.reg_write(X.UC_X86_REG_CR3, 0x5000)
    uc.reg_write(X.UC_X86_REG_GDTR, (0, 0x1122_3344, 0x77, 0))
    uc.reg_write(X.UC_X86_REG_FS_BASE, 0xAB_CDEF_0000)
    uc.msr_write(0xC000_0080, uc.msr_read(0xC000_0080) | 1)
    ctx.snapshot()
    checks = [
        ("RIP", ctx.u64(EIP), 0x1234_5678_9ABC),
        ("CR3", ctx.u64(CR + 3 * 8), 0x5000),
        ("GDTR", struct.unpack_from("<QI", ctx.view, SEGS + SEGMENT_STRIDE * 8 + 8), (0x1122_3344, 0x77)),
        ("the FS segment cache", ctx.segment("fs").base, 0xAB_CDEF_0000),
        ("EFER", ctx.u64(EFER) & 1, 1),
        ("RAX", ctx.u64(GPRS), uc.reg_read(X.UC_X86_REG_RAX)),
        ("CPL in hflags", ctx.u32(HFLAGS) & (HF_LMA | HF_CS64 | HF_CPL_MASK), HF_LMA | HF_CS64),
        ("GIF in hflags2", ctx.u32(HFLAGS2) & (HF2_GIF | HF2_NMI_MASK), HF2_GIF),
    ]
    for what, got, want in checks:
        if got != want:
            fail(what)
    features = Uc(UC_ARCH_X86, UC_MODE_64)
    features.mem_map(0, 0x1000)
    set_features(features, {"1_ecx": 1 << 23, "7_0_ebx": 1 << 3, "8000_0001_ecx": 1 << 5})
    if native_cpuid(features, 1)[2] & (1 << 23 | 1 << 0) != 1 << 23 or native_cpuid(features, 7)[1] != 1 << 3 \
            or native_cpuid(features, 0x8000_0001)[2] != 1 << 5:
        fail("the CPUID feature words")

    # A #GP with a known error code, then INT 0x21, then a counted loop.
    code = bytes.fromhex(
        "66b83812"          # mov ax, 0x1238   (GDT index 0x247 does not exist -> #GP(0x1238))
        "8ed8"              # mov ds, ax
        "cd21"              # int 0x21
        "b905000000"        # mov ecx, 5
        "ffc9" "75fc"       # dec ecx; jnz
        "f4")               # hlt
    uc.mem_write(0x1000, code)
    uc.reg_write(X.UC_X86_REG_GDTR, (0, 0x8000, 0x17, 0))
    seen = []

    def on_intr(u: Uc, intno: int, _data) -> None:
        ctx.snapshot()
        seen.append((intno, ctx.i32(ERROR_CODE), ctx.i32(EXCEPTION_IS_INT), ctx.i32(OLD_EXCEPTION),
                     ctx.u64(EXCEPTION_NEXT_EIP)))
        ctx.put_i32(OLD_EXCEPTION, -1)
        ctx.commit()
        u.reg_write(X.UC_X86_REG_RIP, 0x1006 if intno == 13 else u.reg_read(X.UC_X86_REG_RIP))

    uc.hook_add(UC_HOOK_INTR, on_intr)
    uc.emu_start(0x1000, 0xFFFF_FFFF_FFFF_FFFF, count=100)
    if seen[:1] != [(13, 0x1238, 0, 13, seen[0][4])]:
        fail("the fault error code / in-flight exception marker")
    if len(seen) != 2 or seen[1][:3] != (0x21, 0, 1) or seen[1][4] != 0x1008:
        fail("the software-interrupt marker")
    # Started: mov, mov(faults), int, mov, 5*(dec, jnz), hlt = 15.
    if emu_counter(uc) != 15 or ctypes.c_uint64.from_address(uc._uch.value + EMU_COUNTER + 8).value != 100:
        fail("the instruction counter")
    uc.reg_write(X.UC_X86_REG_RFLAGS, 0x2 | 0x400 | 0x800 | 0x40 | 0x200)
    ctx.snapshot()
    if struct.unpack_from("<Q8xQ8xIi", ctx.view, EFLAGS) != eflags_fields(0x2 | 0x400 | 0x800 | 0x40 | 0x200):
        fail("the lazy-flags fields")
    uc.reg_write(X.UC_X86_REG_DR7, 0x4711)
    uc.reg_write(X.UC_X86_REG_R15, 0x0F0F)
    ctx.snapshot()
    if ctx.u64(DEBUG_REGISTERS + 7 * 8) != 0x4711 or ctx.u64(GPRS + 15 * 8) != 0x0F0F:
        fail("the debug or general registers")
    uc.reg_write(X.UC_X86_REG_R14, 0x0E0E_1234_5678_0E0E)
    env = ctypes.c_uint64.from_address(uc._uch.value + UC_CPU).value + CPU_ENV
    if ctypes.string_at(env + GPRS + 14 * 8 - CONTEXT_HEADER, 8) != struct.pack("<Q", 0x0E0E_1234_5678_0E0E):
        fail("the CPU state behind uc->cpu")
    uc.reg_write(X.UC_X86_REG_DR0, 0x1000)
    uc.reg_write(X.UC_X86_REG_DR7, 0x401)                    # L0: an instruction breakpoint at 0x1000
    breakpoints = DebugBreakpoints(uc)
    breakpoints.rearm()
    if breakpoints.armed() != 1 or ctx.snapshot().u64(BREAKPOINT_POINTERS) == 0:
        fail("the breakpoint pointers")
    uc.reg_write(X.UC_X86_REG_DR7, 0x400)
    breakpoints.rearm()
    if breakpoints.armed() != 0:
        fail("the breakpoint pointers")
    fast = FastAccess(uc)
    fast.write(X.UC_X86_REG_RBX, 0x1122_3344_5566_7788)
    if (fast.read(X.UC_X86_REG_RBX), uc.reg_read(X.UC_X86_REG_BX)) != (0x1122_3344_5566_7788, 0x7788) or \
            fast.read_msr(0xC000_0080) != uc.msr_read(0xC000_0080) or fast.read_memory(0x1000, 4) != code[:4]:
        fail("the C register and memory API")
    fast.write_msr(0xC000_0081, 0x0023_0010_0000_0000)             # STAR
    if uc.msr_read(0xC000_0081) != 0x0023_0010_0000_0000:
        fail("the C register and memory API")
    uc.mem_write(0x2000, b"\x48\xa1" + struct.pack("<Q", 0x7654_3218))      # mov rax, [unmapped]
    try:
        uc.emu_start(0x2000, 0, count=1)
    except UcError:
        pass
    if invalid_address(uc) != 0x7654_3218:
        fail("the invalid-access address")
    for n, msr in enumerate(CONTEXT_MSRS):
        uc.msr_write(msr, 0x0123_4567_89AB_CD00 + n)
    ctx.snapshot()
    for n, (msr, (offset, width, mask)) in enumerate(CONTEXT_MSRS.items()):
        if int.from_bytes(ctx.view[offset:offset + width], "little") != (0x0123_4567_89AB_CD00 + n) & mask:
            fail(f"MSR {msr:#x} in the CPU state")
