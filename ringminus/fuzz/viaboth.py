"""Campaign ``viaboth``: the host-side L1 (ringminus in Python, ``Machine.enter_guest``) and the
generated in-guest L1 (harness/inguest.py: a hypervisor that VMRUNs the L2 through the core's
world switch) agree on random L2 code -- ``ringminus harness --via both`` on random vectors.

Each run makes one vector from its seed: a random mode, CPL and profile; random L2 code that
mixes random bytes with a weighted table of instructions that reach intercepts and exceptions
(CR/DR moves, MSRs, port I/O, CPUID, INT n/INT3/INTO/ICEBP/IRET, #DE/#UD/#GP/#PF/#BR
makers, HLT, PAUSE, INVLPG, VMMCALL/VMCALL, the SVM instructions, segment and table
loads); random registers; and random intercepts, exception intercepts, IOPM and MSRPM.  It
runs the vector through both L1s with the harness's own functions and raises
Finding("disagreement") when the outcomes differ in anything but the expected differences
below.

Expected differences (the two L1s are different hypervisors; the L2 can see that):

* VM_HSAVE_PA.  The in-guest L1 must point VM_HSAVE_PA at its host-save page before VMRUN;
  the host-side L1 has none (the MSR reads 0).  An L2 whose L1 does not intercept the MSR
  reads the L1's value (KVM: ``svm_get_msr`` returns ``svm->nested.hsave_msr``, L1's), so an
  RDMSR of it differs.  An L2 that writes it changes where the apm and qemu profiles'
  #VMEXIT reloads the host state from (APM §15.30.4: the page is the implementation's; an
  L1 that lets its guest move it has given it its host state), so the in-guest L1 resumes
  with whatever that page holds.  Recognised by running the host side again with the
  in-guest L1's VM_HSAVE_PA: an L2 that read it now agrees; one that wrote it leaves the MSR
  changed.
* The L1's memory.  Without nested paging the L2 reaches all of RAM; the in-guest L1 lives in
  the top MiB (its code, VMCB, HSAVE page, permission maps, tables).  An L2 that writes
  there corrupts its L1, one that reads there sees it; the host-side L1 has nothing there.
  Recognised when the host-side run leaves that region non-zero, or a register the vector
  sets points into it.
* Unicorn's self-modifying code.  A store into the translation block being executed (a PUSH
  over code already run, say) makes QEMU restart the block, and RFLAGS' arithmetic flags can
  come out of stale operands (a Unicorn bug on both sides: in real mode with SP = 0x7C02,
  `add [bx+si], al` twice then `push -0x5f`, over the first ADD, ends with RFLAGS 0x57, not
  0x46).  Whether it shows depends on what the CPU ran before -- an L1 has -- so the two sides
  can disagree: on RFLAGS, or on whatever a flag decides next (an INTO taken or not).
  Recognised when the host-side L2, run again with a trace, stored into a page it executed.
* The time-stamp counter.  RDTSC and RDTSCP read the virtual clock (one tick per instruction
  retired), and on the in-guest side the L1's own instructions come first: the L2 reads a
  larger count there (and whatever it computes from it differs).  Recognised when the
  host-side L2 read the counter: RDTSC, RDTSCP or RDMSR 10h.
* The instruction budget.  Both sides run with the same budget, but the in-guest side also
  counts L1's own instructions (and the entry stub's), so a run that ends at the limit on one
  side may end otherwise on the other; a limit on both sides is the same outcome.

A vector the in-guest L1 cannot run as written (harness.runner.NotRunnable: its state VMRUN
refuses, or the entry stub cannot give it; the harness reports a SKIP) is no finding.
``python -m ringminus.fuzz.viaboth SEED`` prints a seed's vector as a vector file, for
``ringminus harness FILE --via both``.
"""
from __future__ import annotations

import io
import random
import struct

from . import Finding
from ..emulator.boot import (DEFAULT_LOAD, IDT_BASE, PAGE_TABLES, SEL_CODE32, SEL_CODE32_USER, SEL_CODE64,
                             SEL_CODE64_USER, TSS_BASE, BootState)
from ..arch.control import MSR_EFER
from ..harness import inguest, runner
from ..harness.vectors import BITS, Outcome, TestVector, parse_vector
from ..intercepts.controls import LAST_INTERCEPT_BIT, msrpm_bit
from ..arch.exitcodes import ExitCode
from ..intercepts.profiles import PROFILES
from ..intercepts.vmcb import MSR_VM_CR, MSR_VM_HSAVE_PA

BUDGET = 1000                       # instructions (and events) per side: random code ends early or loops
TIMEOUT = 5.0
MODES = ("real", "protected", "long")
CODE_ITEMS = (1, 12)                # items of L2 code per vector
NOT_PRESENT = (0x200000, 0x201000, 0x300000, 0x7FF000)
# How often a vector intercepts the EFER write that the in-guest L1's entry stub needs (such a
# vector is a SKIP through that L1): rarely, or most vectors would be.
STUB_BLOCKERS = 0.05

# Values the random registers and operands draw from.
MSRS = (0x10, 0x1B, 0x174, 0x175, 0x176, 0x277, MSR_EFER, 0xC0000081, 0xC0000082, 0xC0000084,
        0xC0000100, 0xC0000101, 0xC0000102, MSR_VM_CR, MSR_VM_HSAVE_PA, 0xC0010015, 0xC0011000,
        0x40000000, 0xDEADBEEF, 0x8B, 0x1D9, 0x3A)
PORTS = (0x0, 0x20, 0x21, 0x40, 0x60, 0x61, 0x64, 0x70, 0x71, 0x80, 0x92, 0xB2, 0xCF8, 0xCFC,
         0x3F8, 0x402, 0x5000, 0xFFFF, 0xFFFE, 0xFFFD)
ADDRESSES = (0x0, 0x2000, 0x3000, 0x5000, 0x8000, 0x7C00, 0x80000, 0x100800, 0x200000, 0x200FFE,
             0x201000, 0x300000, 0x7FF000, 0x7FFFFC, 0x2000000, 0x70000000, 0xFFFFFFFF,
             0xFFFF_FFFF_FFFF_F000, 0x8000_0000_0000_0000, 0x0000_7FFF_FFFF_FFF8)
SELECTORS = (0, 3, 0x08, 0x10, 0x13, 0x18, 0x1B, 0x20, 0x23, 0x28, 0x2B, 0x30, 0x33, 0x38, 0x3B, 0x40,
             0x48, 0xFFF8, 0xFFFF, 0x1234)
VALUES = (0, 1, 2, 3, 0x11, 0x20, 0x80, 0xFF, 0x100, 0x400, 0x500, 0x1000, 0xFFFF, 0x10000, 0x8000_0011,
          0x8000_0000, 0xFFFF_FFFF, 0xC000_0011, 0x6000_0010, 0x1_0000_0000, 0xFFFF_FFFF_FFFF_FFFF,
          0x8000_0000_0000_0000, 0x0000_0100_0000_0000)
REGISTERS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13",
             "r14", "r15")
# Registers a vector may set besides the GPRs, mostly values a CPU in the vector's mode can
# hold (long mode with CR0.PG and CR4.PAE, no EFER.LME under 32-bit paging), now and then any
# mode's (MIXED_STATES): both L1s load them as a state, so they must agree on those too, or
# the in-guest one says why it cannot run them (VMRUN refuses some, §B.5).
MIXED_STATES = 0.1
EMPTY_TABLE = 0x3000000                   # a page of zeros: paging through it maps nothing
FLAGS = ("rflags", (0x2, 0x202, 0x40002, 0x3002, 0x46, 0x10002, 0x40202))
DEBUG = (("dr7", (0x400, 0x401, 0x403, 0x10403, 0xF0403, 0x2403)), ("dr6", (0xFFFF0FF0, 0xFFFF4FF0)))
STATE_REGISTERS = {
    "real": (FLAGS, *DEBUG, ("cr0", (0x10, 0x60000010, 0x18, 0x12, 0x40010)), ("cr4", (0x0, 0x4, 0x8, 0x800)),
             ("efer", (0x0, 0x1, 0x800, 0x1000, 0x1801))),
    "protected": (FLAGS, *DEBUG, ("cr0", (0x11, 0x13, 0x19, 0x10011, 0x40011, 0x60000011, 0x1B, 0x80000011)),
                  ("cr3", (EMPTY_TABLE, runner.PAGING32_DIRECTORY, PAGE_TABLES)),
                  ("cr4", (0x0, 0x1, 0x4, 0x8, 0x10, 0x800, 0x200)), ("efer", (0x0, 0x1, 0x800, 0x1000, 0x1801))),
    "long": (FLAGS, *DEBUG, ("cr0", (0x80000011, 0x80010011, 0x80040011, 0xE0000011, 0x80000019, 0x80000013)),
             ("cr4", (0x20, 0x220, 0x620, 0x820, 0x120, 0x30, 0x28, 0x21, 0x24)),
             ("cr3", (EMPTY_TABLE, PAGE_TABLES + 0x1000)),
             ("efer", (0x500, 0x501, 0xD00, 0xD01, 0x1500, 0x1D01))),
}
# Intercepts a vector draws from: every exit code with an intercept bit but the exception
# intercepts, which a vector draws apart.
INTERCEPTS = tuple(range(0x00, 0x40)) + tuple(range(0x60, LAST_INTERCEPT_BIT + 1))

# Registers (by number) in encodings.
AX, CX, DX, BX, SP, BP, SI, DI = range(8)


# -- encodings ----------------------------------------------------------------------------------

def _mov_imm(reg: int, value: int, bits: int) -> bytes:
    """MOV reg, imm: 32 bits (zero-extended in long mode), 64 when it does not fit."""
    value &= 0xFFFF_FFFF_FFFF_FFFF
    if bits == 64 and value > 0xFFFF_FFFF:
        return bytes([0x48, 0xB8 + reg]) + struct.pack("<Q", value)
    prefix = b"\x66" if bits == 16 else b""
    return prefix + bytes([0xB8 + reg]) + struct.pack("<I", value & 0xFFFF_FFFF)


def _mem_rax(bits: int) -> tuple[bytes, int]:
    """(prefix, ModRM r/m) for a [eAX]/[rAX] operand (32-bit addressing in real mode)."""
    return (b"\x67", 0) if bits == 16 else (b"", 0)


def _modrm(mod: int, reg: int, rm: int) -> int:
    return mod << 6 | (reg & 7) << 3 | rm & 7


def _pick(rng: random.Random, values) -> int:
    return rng.choice(values) if rng.random() < 0.85 else rng.getrandbits(rng.choice((8, 16, 32, 64)))


def _cr_move(rng, bits):
    cr = rng.choice((0, 0, 0, 2, 3, 4, 4, 8, 1, 5, 9, 15))
    prefix = b"\x44" if cr >= 8 and bits == 64 else (b"\xf0" if cr == 8 else b"")   # LOCK MOV CR0 = CR8
    cr &= 7
    write = rng.random() < 0.5
    load = _mov_imm(rng.randrange(8) if rng.random() < 0.3 else AX, _pick(rng, VALUES), bits) if write else b""
    return load + prefix + bytes([0x0F, 0x22 if write else 0x20, _modrm(3, cr, rng.choice((AX, CX, DX, BX)))])


def _dr_move(rng, bits):
    dr = rng.choice((0, 1, 2, 3, 4, 5, 6, 7))
    write = rng.random() < 0.5
    load = _mov_imm(AX, _pick(rng, VALUES), bits) if write else b""
    return load + bytes([0x0F, 0x23 if write else 0x21, _modrm(3, dr, AX)])


def _msr(rng, bits):
    code = _mov_imm(CX, _pick(rng, MSRS), bits)
    if rng.random() < 0.5:
        return code + b"\x0f\x32"
    value = _mov_imm(AX, _pick(rng, VALUES), bits) + _mov_imm(DX, rng.choice((0, 0, 1, 0xFFFF_FFFF)), bits)
    return code + value + b"\x0f\x30"


def _io(rng, bits):
    port = _pick(rng, PORTS) & 0xFFFF
    rep = b"\xf3" if rng.random() < 0.4 else b""
    size = rng.choice((b"", b"\x66"))
    kind = rng.randrange(4)
    if kind == 0:
        return size + bytes([rng.choice((0xE4, 0xE5, 0xE6, 0xE7)), port & 0xFF])
    setup = _mov_imm(DX, port, bits)
    if kind == 1:
        return setup + size + bytes([rng.choice((0xEC, 0xED, 0xEE, 0xEF))])
    setup += _mov_imm(CX, rng.choice((0, 1, 2, 3, 0x10000)), bits)
    setup += _mov_imm(rng.choice((SI, DI)), _pick(rng, ADDRESSES), bits)
    return setup + rep + size + bytes([rng.choice((0x6C, 0x6D, 0x6E, 0x6F))])


def _cpuid(rng, bits):
    return _mov_imm(AX, rng.choice((0, 1, 7, 0xD, 0x80000000, 0x80000001, 0x8000000A, 0x40000000)), bits) + b"\x0f\xa2"


def _software_interrupt(rng, bits):
    return rng.choice((bytes([0xCD, rng.choice((0, 1, 3, 4, 6, 8, 13, 14, 0x20, 0x80, 0xFF))]),
                       b"\xcc", b"\xce", b"\xf1", b"\xcd\x03", b"\xcd\x04"))


def _iret(rng, bits):
    frame = b"".join(bytes([0x68]) + struct.pack("<I", _pick(rng, SELECTORS + VALUES) & 0xFFFF_FFFF)
                     for _ in range(rng.randrange(6)))
    if bits == 16:
        frame = b""
    return frame + (b"\x48\xcf" if bits == 64 and rng.random() < 0.7 else b"\xcf")


def _divide_error(rng, bits):
    return _mov_imm(CX, rng.choice((0, 0, 1)), bits) + _mov_imm(DX, rng.choice((0, 0x7FFF_FFFF)), bits) + b"\xf7\xf1"


def _undefined(rng, bits):
    return rng.choice((b"\x0f\x0b", b"\x0f\xff", b"\xf0\x90", b"\x0f\xb9\xc0", b"\xc4\xc4", b"\x8e\xc8",
                       b"\x0f\x37", b"\x0f\x01\xee"))


def _memory_access(rng, bits):
    prefix, rm = _mem_rax(bits)
    op = rng.choice((0x8B, 0x89, 0xFF, 0x8A, 0x88, 0x86))        # load, store, inc/push [m], xchg
    reg = rng.choice((0, 1, 6)) if op == 0xFF else rng.randrange(8)
    segment = rng.choice((b"", b"", b"\x26", b"\x2e", b"\x36", b"\x64", b"\x65"))
    return _mov_imm(AX, _pick(rng, ADDRESSES), bits) + segment + prefix + bytes([op, _modrm(0, reg, rm)])


def _stack(rng, bits):
    load = _mov_imm(SP, _pick(rng, ADDRESSES), bits) if rng.random() < 0.5 else b""
    return load + rng.choice((b"\x50", b"\x58", b"\x9c", b"\x9d", b"\xc3", b"\xe8\x00\x00\x00\x00", b"\x6a\x00"))


def _flags(rng, bits):
    return rng.choice((b"\x9c", b"\x9d", b"\xfa", b"\xfb", b"\xfb\xf4", b"\x9c\x58", b"\x50\x9d", b"\xf3\x90"))


def _halt(rng, bits):
    return rng.choice((b"\xf4", b"\xfa\xf4", b"\xfb\xf4"))


def _invlpg(rng, bits):
    prefix, rm = _mem_rax(bits)
    return _mov_imm(AX, _pick(rng, ADDRESSES), bits) + prefix + bytes([0x0F, 0x01, _modrm(0, 7, rm)])


def _svm(rng, bits):
    load = _mov_imm(AX, rng.choice((0, 0x1000, 0x1001, 0x70000000, 0x2000, 0x8000_0000_0000)), bits)
    return load * (rng.random() < 0.7) + bytes([0x0F, 0x01, rng.choice((0xD8, 0xD9, 0xDA, 0xDB, 0xDC, 0xDD,
                                                                        0xDE, 0xDF, 0xC1, 0xD9, 0xD9))])


def _other_intercepts(rng, bits):
    return rng.choice((b"\x0f\x31", b"\x0f\x33", b"\x0f\x01\xf9", b"\x0f\x08", b"\x0f\x09", b"\xf3\x0f\x09",
                       b"\x0f\x01\xc8", b"\x0f\x01\xc9", b"\x0f\x01\xd1", b"\x0f\x01\xfd", b"\x0f\x06",
                       b"\x0f\xaa", b"\x0f\x01\xf0", b"\x0f\x01\xe0", b"\x0f\x01\xfe", b"\x0f\x01\xff",
                       b"\xf3\x0f\x01\xfa", b"\x66\x0f\x38\x82\x00"))


def _table_register(rng, bits):
    prefix, rm = _mem_rax(bits)
    op = rng.choice(((0x01, 0), (0x01, 1), (0x01, 2), (0x01, 3), (0x01, 4), (0x01, 6),
                     (0x00, 0), (0x00, 1), (0x00, 2), (0x00, 3)))
    if rng.random() < 0.4:                                       # register forms
        return _mov_imm(AX, _pick(rng, SELECTORS), bits) + bytes([0x0F, op[0], _modrm(3, op[1], AX)])
    return _mov_imm(AX, _pick(rng, ADDRESSES), bits) + prefix + bytes([0x0F, op[0], _modrm(0, op[1], rm)])


def _segment_load(rng, bits):
    selector = _pick(rng, SELECTORS) & 0xFFFF
    load = b"\x66\xb8" + struct.pack("<H", selector) if bits != 16 else b"\xb8" + struct.pack("<H", selector)
    kind = rng.randrange(4)
    if kind == 0:
        return load + bytes([0x8E, _modrm(3, rng.choice((0, 2, 3, 4, 5)), AX)])     # mov sreg, ax
    if kind == 1 and bits != 64:
        return load + b"\x50" + rng.choice((b"\x1f", b"\x07", b"\x17", b"\x0f\xa1", b"\x0f\xa9"))   # pop sreg
    if kind == 2 and bits != 64:                                 # far jmp ptr16:32 / ptr16:16
        offset = _pick(rng, ADDRESSES) & (0xFFFF if bits == 16 else 0xFFFF_FFFF)
        return b"\xea" + struct.pack("<H" if bits == 16 else "<I", offset) + struct.pack("<H", selector)
    prefix, rm = _mem_rax(bits)                                  # lss/lfs/lgs [eax]
    far_load = bytes([0x0F, rng.choice((0xB2, 0xB4, 0xB5)), _modrm(0, CX, rm)])
    return _mov_imm(AX, _pick(rng, ADDRESSES), bits) + prefix + far_load


def _bound(rng, bits):
    if bits == 64:
        return b"\x62"
    prefix, rm = _mem_rax(bits)
    bounds = _mov_imm(AX, _pick(rng, ADDRESSES), bits) + _mov_imm(CX, _pick(rng, VALUES), bits)
    return bounds + prefix + bytes([0x62, _modrm(0, CX, rm)])


def _random_bytes(rng, bits):
    return rng.randbytes(rng.randrange(1, 8))


def _register_value(rng, bits):
    register = rng.randrange(8) if rng.random() < 0.5 else rng.choice((AX, CX, DX))
    return _mov_imm(register, _pick(rng, VALUES + ADDRESSES), bits)


# (weight, maker(rng, bits) -> bytes)
ITEMS = ((6, _cr_move), (3, _dr_move), (6, _msr), (6, _io), (3, _cpuid), (5, _software_interrupt),
         (3, _iret), (2, _divide_error), (3, _undefined), (5, _memory_access), (3, _stack), (3, _flags),
         (2, _halt), (2, _invlpg), (5, _svm), (4, _other_intercepts), (4, _table_register),
         (4, _segment_load), (1, _bound), (8, _random_bytes), (4, _register_value))
_MAKERS = [maker for _, maker in ITEMS]
_WEIGHTS = [weight for weight, _ in ITEMS]


# -- the L2's system tables ------------------------------------------------------------------------
# The boot states' IDTs have no gates, so an L2 exception ends in #GP/#NP/#DF chains; random
# gates (at the boot IDT, or the real-mode IVT) and a random ring-0 stack in the TSS make
# deliveries that fault in other ways -- #VMEXITs with EXITINTINFO, error codes from selectors.
HANDLER = 0x6000                           # where gates point: identity-mapped in every mode
HANDLERS = (b"\xf4", b"\xcf", b"\x48\xcf", b"\x83\xc4\x04\xcf", b"\xeb\xfe", b"\x0f\x0b", b"\xcc", b"\x66\xcf")
GATE_VECTORS = (0, 1, 3, 4, 5, 6, 8, 10, 11, 12, 13, 14, 17, 0x20, 0x80, 0xFF)
GATE_TYPES = (0xE, 0xE, 0xF, 0x5, 0xC, 0x6, 0x7, 0x0)     # int/trap gates, task gate, call gate, 16-bit, none
CODE_SELECTORS = {"protected": (SEL_CODE32, SEL_CODE32_USER | 3), "long": (SEL_CODE64, SEL_CODE64_USER | 3)}


def _gate(rng: random.Random, mode: str) -> bytes:
    offset = rng.choice((HANDLER, HANDLER, DEFAULT_LOAD[BootState.LONG], 0x70000000, rng.getrandbits(32)))
    selector = rng.choice(CODE_SELECTORS[mode] * 3 + SELECTORS + (0xB8C0,)) & 0xFFFF
    attributes = (rng.random() < 0.85) << 7 | rng.choice((0, 3)) << 5 | rng.choice(GATE_TYPES)
    if mode == "long":
        return struct.pack("<HHBBHII", offset & 0xFFFF, selector, rng.choice((0, 0, 0, 1, 7)), attributes,
                           offset >> 16 & 0xFFFF, offset >> 32, 0)
    return struct.pack("<HHBBH", offset & 0xFFFF, selector, 0, attributes, offset >> 16 & 0xFFFF)


def system_tables(rng: random.Random, mode: str) -> list[dict]:
    """``memory.bytes`` entries: a handler, some IDT gates (IVT entries in real mode), and
    sometimes another ring-0 stack in the TSS."""
    placed = [{"address": HANDLER, "hex": rng.choice(HANDLERS).hex()}]
    for vector in rng.sample(GATE_VECTORS, rng.randint(1, 6)):
        if mode == "real":
            gate = struct.pack("<HH", rng.choice((0, 0, 0x10)), rng.choice((HANDLER >> 4, HANDLER >> 4, 0xF000, 0)))
            placed.append({"address": vector * 4, "hex": gate.hex()})
        else:
            size = 16 if mode == "long" else 8
            placed.append({"address": IDT_BASE + vector * size, "hex": _gate(rng, mode).hex()})
    if mode != "real" and rng.random() < 0.2:
        stack = _pick(rng, ADDRESSES) & (0xFFFF_FFFF_FFFF_FFFF if mode == "long" else 0xFFFF_FFFF)
        ring0 = struct.pack("<Q", stack) if mode == "long" else \
            struct.pack("<IH", stack, _pick(rng, SELECTORS) & 0xFFFF)
        placed.append({"address": TSS_BASE + 4, "hex": ring0.hex()})
    return placed


# -- vectors ------------------------------------------------------------------------------------

def random_table(seed: int) -> dict:
    """A vector file's ``[[vector]]`` table, made from ``seed``."""
    rng = random.Random(seed)
    mode = rng.choice(MODES)
    bits = BITS[mode]
    cpl = 3 if mode != "real" and rng.random() < 0.35 else 0
    code = b"".join(rng.choices(_MAKERS, _WEIGHTS)[0](rng, bits) for _ in range(rng.randint(*CODE_ITEMS)))
    density = rng.choice((0.0, 0.05, 0.2, 0.5, 0.9))
    exception_density = rng.choice((0.0, 0.1, 0.5))
    regs = {name: _pick(rng, VALUES + ADDRESSES + MSRS + PORTS) & 0xFFFF_FFFF_FFFF_FFFF
            for name in REGISTERS if rng.random() < 0.3}
    states = STATE_REGISTERS[rng.choice(MODES) if rng.random() < MIXED_STATES else mode]
    for name, values in states:
        if rng.random() < 0.08:
            regs[name] = rng.choice(values)
    table = {
        "name": f"viaboth-{seed}", "mode": mode, "cpl": cpl, "profile": rng.choice(sorted(PROFILES)),
        "code": code.hex(),
        "intercepts": [ExitCode(c).name.lower() for c in INTERCEPTS if rng.random() < density
                       and (c != ExitCode.EFER_WRITE_TRAP or rng.random() < STUB_BLOCKERS)],
        "exceptions": [v for v in range(32) if rng.random() < exception_density],
        "iopm": [f"{port:#x}-{port + rng.choice((0, 0, 1, 3)):#x}" for port in PORTS
                 if port <= 0xFFFC and rng.random() < density],
        "msrpm": [{"msr": msr, "read": rng.random() < 0.6,
                   "write": rng.random() < (0.6 if msr != MSR_EFER else STUB_BLOCKERS)} for msr in MSRS
                  if msrpm_bit(msr, False) is not None and rng.random() < density],
        "regs": regs,
        "expect": {"completes": True},
    }
    memory = {"bytes": system_tables(rng, mode)} if rng.random() < 0.5 else {}
    if mode != "real":
        memory["not_present"] = [a for a in NOT_PRESENT if rng.random() < 0.3]
    if memory:
        table["memory"] = memory
    return table


def random_vector(seed: int) -> TestVector:
    """The seed's vector, parsed (and so checked) as a vector file's would be."""
    return parse_vector(random_table(seed), "viaboth", 0)


def toml(table: dict) -> str:
    """The table as a vector file, to run with ``ringminus harness FILE --via both``."""
    def value(v) -> str:
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, int):
            return hex(v)
        if isinstance(v, str):
            return f'"{v}"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
    return "\n".join(["[[vector]]", *(f"{k} = {value(v)}" for k, v in table.items())])


# -- the two L1s ----------------------------------------------------------------------------------

def run_host(vector: TestVector, hsave_pa: int | None = None):
    """The host-side L1 (``hsave_pa``: VM_HSAVE_PA as the in-guest L1 sets it); the machine too."""
    machine, _ = runner.prepare(vector, vector.profile)
    if hsave_pa is not None:
        machine.svm.hsave_pa = hsave_pa
    return runner.observe(machine, machine.run(max_instructions=BUDGET, timeout=TIMEOUT)), machine


def run_guest(vector: TestVector) -> Outcome | None:
    """The in-guest L1's outcome; None when this L1 cannot run the vector (a SKIP)."""
    try:
        return inguest.run_in_guest(vector, vector.profile, BUDGET, TIMEOUT)
    except runner.NotRunnable:
        return None


def _limit(outcome: Outcome) -> bool:
    return outcome.kind == "stop" and outcome.fields.get("reason") == "limit"


def _touches_l1(vector: TestVector, machine) -> bool:
    layout = inguest.Layout(machine.memory.ram_size)
    if machine.read_memory(layout.base, inguest.L1_REGION).strip(b"\0"):
        return True
    return any(layout.base <= v < layout.base + inguest.L1_REGION for v in vector.regs.values())


def _traced(vector: TestVector):
    """The host-side L2 run again with a trace: (machine, trace lines)."""
    machine, _ = runner.prepare(vector, vector.profile)
    trace = io.StringIO()
    machine.run(max_instructions=BUDGET, timeout=TIMEOUT, trace=trace)
    return machine, [line for line in trace.getvalue().splitlines() if line]


def _read_the_tsc(machine) -> bool:
    """The host-side L2 (its run's ``machine``) read the time-stamp counter (RDTSC, RDTSCP,
    RDMSR 10h) or wrote it: the virtual TSC holds a last value read only then."""
    return machine.tsc.value >= 0


def _rewrote_code_it_ran(vector: TestVector) -> bool:
    """The host-side L2, run again with a trace, stored into a page it executed."""
    machine, lines = _traced(vector)
    pages = {int(line.split(maxsplit=1)[0], 16) & ~0xFFF for line in lines}
    fresh = runner.setup(vector, vector.profile).machine
    ram = machine.memory.ram_size
    return any(machine.read_memory(page, 0x1000) != fresh.read_memory(page, 0x1000) for page in pages if page < ram)


def expected_difference(vector: TestVector, host: Outcome, guest: Outcome, machine) -> str | None:
    """Why the two outcomes may differ (the module docstring's list), or None."""
    hsave = inguest.Layout(machine.memory.ram_size).hsave
    again, rerun = run_host(vector, hsave)
    if rerun.svm.hsave_pa != hsave and rerun.profile.host_save_in_memory:
        return "vm_hsave_pa written"                 # the in-guest L1 may have run anything since
    if _limit(host) or _limit(guest):
        return "budget"
    if _touches_l1(vector, machine):
        return "l1-memory"
    if _rewrote_code_it_ran(vector):
        return "self-modifying code (Unicorn's flags)"
    if _read_the_tsc(machine):
        return "the time-stamp counter (the in-guest L1's instructions take time)"
    if runner.differences(again, guest) is None:
        return "vm_hsave_pa read"
    return None


def one_run(seed: int) -> None:
    vector = random_vector(seed)
    guest = run_guest(vector)
    if guest is None:
        return
    host, machine = run_host(vector)
    differ = runner.differences(host, guest)
    if differ is None or expected_difference(vector, host, guest, machine):
        return
    ours, theirs = differ
    raise Finding("disagreement", f"host {ours.kind} {ours.describe()}, guest {theirs.kind} {theirs.describe()} "
                                  f"(the vector: python -m ringminus.fuzz.viaboth {seed})",
                  key=f"host {host.kind}, guest {guest.kind}: {', '.join(sorted(ours.fields))} differ")


if __name__ == "__main__":                  # the vector file of a seed: python -m ringminus.fuzz.viaboth SEED
    import sys
    print(toml(random_table(int(sys.argv[1]))))
