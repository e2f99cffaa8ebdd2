"""The decode-flag table: one row per instruction form that SVM can intercept, plus the few
forms ringminus must recognise at a #UD without an intercept of their own (VMCALL).

Read a row against the APM (Table 15-7, §15.9-15.11) and KVM's opcode table in one glance:
its encoding, the emulator flags (KVM emulate.c names), the named permission check, and the
intercept with the stage at which it is checked (KVM svm.c ``x86_intercept_map``;
semantics.md §A.3).  The checker (intercepts/checker.py) walks these rows generically.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import IntEnum, IntFlag

from ..arch.exitcodes import ExitCode as E


class Stage(IntEnum):
    PRE_EXCEPT = 1
    POST_EXCEPT = 2
    POST_MEMACCESS = 3


class Flag(IntFlag):
    NONE = 0
    PRIV = 1 << 0        # #GP(0) at CPL > 0
    PRIV_UD = 1 << 1     # with PRIV: #UD instead of #GP
    PROT = 1 << 2        # #UD in real and virtual-8086 mode
    NO_ACCESS = 1 << 3   # memory operand decoded, never accessed (INVLPG)
    STRING = 1 << 4      # REP-able string instruction
    MOV = 1 << 5         # destination written only, never read first
    MEM_ONLY = 1 << 6    # the ModRM operand must be memory (#UD for a register)
    SRC_MEM = 1 << 7     # reads its r/m operand (before stage 3)
    DST_MEM = 1 << 8     # writes its r/m operand (at write-back, after execution)
    EXEC = 1 << 9        # Unicorn cannot run it (#UD there): a feature's executor does


PRE, POST, MEM = Stage.PRE_EXCEPT, Stage.POST_EXCEPT, Stage.POST_MEMACCESS


# Exit builders whose code depends on the instruction, and the other codes they can produce.
_CODE_SPAN = {"cr_read": 16, "cr_write": 16, "dr_read": 16, "dr_write": 16}
_EXTRA_CODES = {"cr_write": (E.CR0_SEL_WRITE,), "lmsw": (E.CR0_SEL_WRITE,), "hlt": (E.IDLE_HLT,),
                "mwait": (E.MWAIT_CONDITIONAL,), "monitor": (E.MWAIT_CONDITIONAL,)}


@dataclass(frozen=True)
class Intercept:
    """An intercept: its base exit code, the stage it is checked at, and how the exit is
    formed (``exit`` names a builder in intercepts/exitinfo.py)."""
    code: E
    stage: Stage
    exit: str = "fixed"

    @property
    def codes(self) -> frozenset[int]:
        """Every exit code this row can produce (its site is armed when any is set)."""
        span = range(self.code, self.code + _CODE_SPAN.get(self.exit, 1))
        return frozenset(span) | frozenset(_EXTRA_CODES.get(self.exit, ()))


@dataclass(frozen=True)
class Row:
    name: str
    opcode: bytes                    # after prefixes, e.g. b"\x0f\x01"
    modrm: str | int | None = None   # None: no ModRM; "r": any; "/n": reg field n; int: exact byte
    flags: Flag = Flag.NONE
    check: str | None = None         # a permission check in intercepts/checks.py
    intercept: Intercept | None = None
    prefix: int | None = None        # mandatory prefix (F3, 66), or None
    immediate: int = 0               # immediate bytes
    operand_size: int | None = None  # fixed size of the memory operand, bytes (None: operand size)

    @property
    def has_modrm(self) -> bool:
        return self.modrm is not None


def I(code: E, stage: Stage = POST, exit: str = "fixed") -> Intercept:  # noqa: E743 (table notation)
    return Intercept(code, stage, exit)


P, PU, PR, NA, ST, MV, MO, SM, DM, EX = (Flag.PRIV, Flag.PRIV_UD, Flag.PROT, Flag.NO_ACCESS, Flag.STRING,
                                         Flag.MOV, Flag.MEM_ONLY, Flag.SRC_MEM, Flag.DST_MEM, Flag.EXEC)
OF = bytes.fromhex

# name            opcode        ModRM   flags              check          intercept (code, stage, exit)
ROWS = (
    Row("mov_from_cr", OF("0f20"), "r", P, "cr_access", I(E.CR0_READ, POST, "cr_read")),
    Row("mov_to_cr",   OF("0f22"), "r", P, "cr_access", I(E.CR0_WRITE, POST, "cr_write")),
    Row("clts",        OF("0f06"), None, P, None, I(E.CR0_WRITE, POST, "clts")),
    Row("lmsw",        OF("0f01"), "/6", P | SM | MV, None, I(E.CR0_WRITE, POST, "lmsw"), operand_size=2),
    Row("smsw",        OF("0f01"), "/4", DM | MV, "umip", I(E.CR0_READ), operand_size=2),
    Row("mov_from_dr", OF("0f21"), "r", P, "dr_read", I(E.DR0_READ, POST, "dr_read")),
    Row("mov_to_dr",   OF("0f23"), "r", P, "dr_write", I(E.DR0_WRITE, POST, "dr_write")),
    Row("lidt",        OF("0f01"), "/3", P | MO | SM, None, I(E.IDTR_WRITE)),
    Row("sidt",        OF("0f01"), "/1", MO | DM | MV, "umip", I(E.IDTR_READ)),
    Row("lgdt",        OF("0f01"), "/2", P | MO | SM, None, I(E.GDTR_WRITE)),
    Row("sgdt",        OF("0f01"), "/0", MO | DM | MV, "umip", I(E.GDTR_READ)),
    Row("lldt",        OF("0f00"), "/2", PR | P | SM, None, I(E.LDTR_WRITE), operand_size=2),
    Row("sldt",        OF("0f00"), "/0", PR | DM | MV, "umip", I(E.LDTR_READ), operand_size=2),
    Row("ltr",         OF("0f00"), "/3", PR | P | SM, None, I(E.TR_WRITE), operand_size=2),
    Row("str",         OF("0f00"), "/1", PR | DM | MV, "umip", I(E.TR_READ), operand_size=2),
    Row("rdtsc",       OF("0f31"), None, Flag.NONE, "rdtsc", I(E.RDTSC)),
    Row("rdpmc",       OF("0f33"), None, Flag.NONE, "rdpmc", I(E.RDPMC)),
    Row("pushf",       OF("9c"),   None, Flag.NONE, None, I(E.PUSHF, PRE)),
    Row("popf",        OF("9d"),   None, Flag.NONE, None, I(E.POPF, PRE)),
    Row("cpuid",       OF("0fa2"), None, Flag.NONE, None, I(E.CPUID, PRE)),
    Row("rsm",         OF("0faa"), None, EX, None, I(E.RSM, PRE)),
    Row("iret",        OF("cf"),   None, Flag.NONE, None, I(E.IRET, PRE)),
    Row("int_n",       OF("cd"),   None, Flag.NONE, None, I(E.SWINT, PRE, "swint"), immediate=1),
    Row("invd",        OF("0f08"), None, P, None, I(E.INVD)),
    Row("pause",       OF("90"),   None, Flag.NONE, None, I(E.PAUSE, PRE, "pause"), prefix=0xF3),
    Row("hlt",         OF("f4"),   None, P, None, I(E.HLT, POST, "hlt")),
    Row("invlpg",      OF("0f01"), "/7", P | MO | NA, None, I(E.INVLPG, POST, "invlpg"), operand_size=1),
    Row("invlpga",     OF("0f01"), 0xDF, PR | P | EX, "svme", I(E.INVLPGA)),
    Row("vmrun",       OF("0f01"), 0xD8, PR | P | EX, "svme_rax", I(E.VMRUN)),
    Row("vmmcall",     OF("0f01"), 0xD9, EX, "vmmcall", I(E.VMMCALL)),
    Row("vmload",      OF("0f01"), 0xDA, PR | P | EX, "svme_rax", I(E.VMLOAD)),
    Row("vmsave",      OF("0f01"), 0xDB, PR | P | EX, "svme_rax", I(E.VMSAVE)),
    Row("stgi",        OF("0f01"), 0xDC, PR | P | EX, "svme_or_skinit", I(E.STGI)),
    Row("clgi",        OF("0f01"), 0xDD, PR | P | EX, "svme", I(E.CLGI)),
    Row("skinit",      OF("0f01"), 0xDE, PR | P | EX, "svme_or_skinit", I(E.SKINIT)),
    Row("rdtscp",      OF("0f01"), 0xF9, Flag.NONE, "rdtsc", I(E.RDTSCP)),
    Row("icebp",       OF("f1"),   None, Flag.NONE, None, I(E.ICEBP, PRE)),
    Row("wbinvd",      OF("0f09"), None, P, None, I(E.WBINVD)),
    Row("wbnoinvd",    OF("0f09"), None, P, None, I(E.WBINVD), prefix=0xF3),
    Row("monitor",     OF("0f01"), 0xC8, Flag.NONE, "monitor", I(E.MONITOR, MEM, "monitor")),
    Row("mwait",       OF("0f01"), 0xC9, Flag.NONE, "monitor", I(E.MWAIT, POST, "mwait")),
    Row("rdmsr",       OF("0f32"), None, P, None, I(E.MSR, POST, "msr")),
    Row("wrmsr",       OF("0f30"), None, P, None, I(E.MSR, POST, "msr")),
    Row("in_imm",      OF("e4"),   None, Flag.NONE, "io", I(E.IOIO, POST, "ioio"), immediate=1, operand_size=1),
    Row("in_imm_wide", OF("e5"),   None, Flag.NONE, "io", I(E.IOIO, POST, "ioio"), immediate=1),
    Row("in_dx",       OF("ec"),   None, Flag.NONE, "io", I(E.IOIO, POST, "ioio"), operand_size=1),
    Row("in_dx_wide",  OF("ed"),   None, Flag.NONE, "io", I(E.IOIO, POST, "ioio")),
    Row("ins",         OF("6c"),   None, ST, "io", I(E.IOIO, POST, "ioio"), operand_size=1),
    Row("ins_wide",    OF("6d"),   None, ST, "io", I(E.IOIO, POST, "ioio")),
    Row("out_imm",     OF("e6"),   None, Flag.NONE, "io", I(E.IOIO, POST, "ioio"), immediate=1, operand_size=1),
    Row("out_imm_wide", OF("e7"),  None, Flag.NONE, "io", I(E.IOIO, POST, "ioio"), immediate=1),
    Row("out_dx",      OF("ee"),   None, Flag.NONE, "io", I(E.IOIO, POST, "ioio"), operand_size=1),
    Row("out_dx_wide", OF("ef"),   None, Flag.NONE, "io", I(E.IOIO, POST, "ioio")),
    Row("outs",        OF("6e"),   None, ST, "io", I(E.IOIO, POST, "ioio"), operand_size=1),
    Row("outs_wide",   OF("6f"),   None, ST, "io", I(E.IOIO, POST, "ioio")),
    Row("xsetbv",      OF("0f01"), 0xD1, P, None, I(E.XSETBV, PRE)),
    # APM intercepts KVM's emulator does not model (semantics.md §A.3, trailing paragraph).
    Row("rdpru",       OF("0f01"), 0xFD, Flag.NONE, "rdpru", I(E.RDPRU)),
    Row("invlpgb",     OF("0f01"), 0xFE, P, None, I(E.INVLPGB)),
    Row("tlbsync",     OF("0f01"), 0xFF, P, None, I(E.TLBSYNC)),
    Row("invpcid",     OF("0f3882"), "r", P | MO | SM, None, I(E.INVPCID), prefix=0x66, operand_size=16),
    Row("mcommit",     OF("0f01"), 0xFA, Flag.NONE, None, I(E.MCOMMIT), prefix=0xF3),
    # Intel's hypercall instruction: no SVM intercept, #UD on AMD.  Outside guest mode the
    # profile decides whether KVM's emulation applies (hypercalls/conduit.py, semantics.md
    # §D.2); KVM's Priv flag belongs to that emulation, so it is not a flag here.
    Row("vmcall",      OF("0f01"), 0xC1, EX, None, None),
    # No intercept: STI can end an interrupt hold (RFLAGS.IF), so it is run alone while an
    # interrupt waits (POPF and IRET, which also can, have rows above).
    Row("sti",         OF("fb"),   None, Flag.NONE, None, None),
)

# INT3, INTO and BOUND are not rows: they raise #BP/#OF/#BR, whose exception intercepts save
# nRIP (§B.2); events and exceptions reach the checker through the machine's event path.
ROWS_BY_OPCODE: dict[bytes, tuple[Row, ...]] = {}
for _row in ROWS:
    ROWS_BY_OPCODE[_row.opcode] = ROWS_BY_OPCODE.get(_row.opcode, ()) + (_row,)


EXECUTED_ROWS = frozenset(row.name for row in ROWS if row.flags & Flag.EXEC)
ROWS_BY_NAME = {row.name: row for row in ROWS}


def fixed_encoding(name: str) -> bytes | None:
    """Every byte of row ``name`` written without prefixes, when nothing in it varies (no
    mandatory prefix, ModRM absent or exact, no immediate): RSM, VMRUN, VMMCALL…"""
    row = ROWS_BY_NAME[name]
    if row.prefix is not None or row.immediate or (row.modrm is not None and not isinstance(row.modrm, int)):
        return None
    return row.opcode + (bytes([row.modrm]) if row.modrm is not None else b"")


@functools.lru_cache(maxsize=256)
def site_opcodes(vector: int) -> frozenset[bytes]:
    """The opcode bytes (1-3) of every row that can produce an exit code intercepted in
    ``vector`` (bit n = exit code n): a code site is armed where they occur, and at every
    prefix start before them.  Cached: a guest hypervisor VMRUNs with the same few vectors."""
    return frozenset(row.opcode for row in ROWS
                     if row.intercept and any(vector >> code & 1 for code in row.intercept.codes))


# OUT with an immediate or DX port: armed always, so an OUT to a device that stops the run (the
# exit device, APM_CNT) is performed by ringminus and nothing after it runs.
PORT_OUT_ROWS = frozenset({"out_imm", "out_imm_wide", "out_dx", "out_dx_wide"})
OUT_OPCODES = frozenset(row.opcode for row in ROWS if row.name in PORT_OUT_ROWS)

# Always armed: MOV to CR (sites are linear: paging changes re-arm them), IRET (it ends
# NMI blocking, after which a pending NMI is taken at once), RDMSR/WRMSR (EFER.SVME and the
# SVM MSRs are ringminus's: Unicorn cannot hook them, reference/unicorn.md §3).
ALWAYS_ARMED_OPCODES = frozenset({b"\x0f\x22", b"\xcf", b"\x0f\x30", b"\x0f\x32"})
# Armed once an interrupt has been held: the instructions that can set RFLAGS.IF.
INTERRUPT_WINDOW_ROWS = frozenset({"sti", "popf", "iret"})
INTERRUPT_WINDOW_OPCODES = frozenset(row.opcode for row in ROWS if row.name in INTERRUPT_WINDOW_ROWS)
