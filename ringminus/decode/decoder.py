"""Decode the bytes at RIP into an instruction of the decode-flag table.

Hand-written because the checker needs what capstone does not give directly: the raw ModRM
fields (with REX extensions), the memory operand as segment + base/index/scale/displacement
before evaluation, and the mandatory-prefix forms (F3 90 PAUSE, F3 0F 09 WBNOINVD).
``decode`` never raises: bytes that are no table row, or are cut short, give None.
"""
from __future__ import annotations

from dataclasses import dataclass

from .prefixes import MAX_INSTRUCTION_LENGTH, Prefixes, parse_prefixes
from .table import ROWS_BY_OPCODE, Flag, Row

_MODRM16 = ((3, 6), (3, 7), (5, 6), (5, 7), (6, None), (7, None), (5, None), (3, None))  # (base, index)


@dataclass(frozen=True)
class MemoryOperand:
    segment: str                 # effective segment: the override, or DS / SS by the base
    base: int | None             # register number (0-15), or None
    index: int | None
    scale: int
    displacement: int
    address_size: int            # bytes: 2, 4 or 8
    rip_relative: bool = False


@dataclass(frozen=True, eq=False)      # decoded once and cached: identity is equality
class Instruction:
    address: int
    raw: bytes
    bits: int
    prefixes: Prefixes
    row: Row
    modrm: int | None
    reg: int                     # ModRM.reg with REX.R (CR/DR number, or GPR)
    rm: int                      # ModRM.rm with REX.B (GPR when mod = 3)
    memory: MemoryOperand | None
    immediate: int | None
    operand_size: int            # bytes
    address_size: int            # bytes

    @property
    def length(self) -> int:
        return len(self.raw)

    @property
    def next_rip(self) -> int:
        return self.address + self.length

    @property
    def mod(self) -> int | None:
        return None if self.modrm is None else self.modrm >> 6


def _opcode(code: bytes, start: int) -> bytes:
    if code[start] != 0x0F:
        return code[start:start + 1]
    if len(code) > start + 1 and code[start + 1] in (0x38, 0x3A):
        return code[start:start + 3]
    return code[start:start + 2]


def _select(rows: tuple[Row, ...], modrm: int | None, prefixes: Prefixes) -> Row | None:
    """The row these bytes encode: mandatory-prefix forms first, then exact ModRM bytes,
    then /reg groups."""
    def rank(row: Row) -> tuple[bool, bool]:
        return row.prefix is None, not isinstance(row.modrm, int)

    for row in sorted(rows, key=rank):
        if row.prefix == 0xF3 and not prefixes.rep:
            continue
        if row.prefix == 0x66 and not prefixes.operand_size_override:
            continue
        if isinstance(row.modrm, int) and modrm != row.modrm:
            continue
        if isinstance(row.modrm, str) and row.modrm.startswith("/"):
            if (modrm >> 3) & 7 != int(row.modrm[1:]) or (row.flags & Flag.MEM_ONLY and modrm >> 6 == 3):
                continue
        return row
    return None


def _displacement(raw: bytes) -> int:
    return int.from_bytes(raw, "little", signed=True) if raw else 0


def _memory(code: bytes, at: int, modrm: int, bits: int, prefixes: Prefixes,
            address_size: int) -> tuple[MemoryOperand, int] | None:
    """The memory operand of ``modrm`` (with SIB and displacement starting at ``at``) and
    the bytes it takes after the ModRM byte; None if the bytes are cut short."""
    mod, rm = modrm >> 6, modrm & 7
    rex_b, rex_x = (prefixes.rex & 1) << 3, (prefixes.rex & 2) << 2
    used, scale, rip_relative = 0, 1, False
    if address_size == 2:
        base, index = _MODRM16[rm]
        if mod == 0 and rm == 6:
            base = None
        disp_size = 2 if (mod == 0 and rm == 6) else (0, 1, 2)[mod]
        stack = base == 5
    else:
        index = None
        if rm == 4:
            if len(code) <= at:
                return None
            sib = code[at]
            used = 1
            scale = 1 << (sib >> 6)
            index = ((sib >> 3) & 7) | rex_x
            index = None if index == 4 else index
            base = None if (sib & 7 == 5 and mod == 0) else (sib & 7) | rex_b
        elif mod == 0 and rm == 5:
            base, rip_relative = None, bits == 64
        else:
            base = rm | rex_b
        disp_size = (4 if base is None else 0, 1, 4)[mod]
        stack = base in (4, 5)
    if len(code) < at + used + disp_size:
        return None
    displacement = _displacement(code[at + used:at + used + disp_size])
    segment = prefixes.segment or ("ss" if stack else "ds")
    return MemoryOperand(segment, base, index, scale, displacement, address_size, rip_relative), used + disp_size


def decode(code: bytes, bits: int, address: int = 0) -> Instruction | None:
    """The table row instruction at the start of ``code`` in ``bits``-bit code, or None."""
    code = bytes(code[:MAX_INSTRUCTION_LENGTH])
    prefixes = parse_prefixes(code, bits)
    start = prefixes.length
    if start >= len(code):
        return None
    opcode = _opcode(code, start)
    rows = ROWS_BY_OPCODE.get(opcode)
    if not rows:
        return None
    at = start + len(opcode)
    needs_modrm = rows[0].has_modrm          # the rows of one opcode agree on having a ModRM
    if needs_modrm and at >= len(code):
        return None
    modrm = code[at] if needs_modrm else None
    row = _select(rows, modrm, prefixes)
    if row is None:
        return None
    if bits == 64:
        address_size = 4 if prefixes.address_size_override else 8
    else:
        address_size = (4 if bits == 16 else 2) if prefixes.address_size_override else bits // 8
    operand_size = row.operand_size or prefixes.operand_size(bits)
    memory, reg, rm = None, 0, 0
    length = at
    if row.has_modrm:
        length += 1
        reg = ((modrm >> 3) & 7) | ((prefixes.rex & 4) << 1)
        rm = (modrm & 7) | ((prefixes.rex & 1) << 3)
        register_form = modrm >> 6 == 3 or row.opcode in (b"\x0f\x20", b"\x0f\x21", b"\x0f\x22", b"\x0f\x23")
        if not register_form:
            decoded = _memory(code, length, modrm, bits, prefixes, address_size)
            if decoded is None:
                return None
            memory, used = decoded
            length += used
    immediate = None
    if row.immediate:
        if len(code) < length + row.immediate:
            return None
        immediate = int.from_bytes(code[length:length + row.immediate], "little")
        length += row.immediate
    return Instruction(address, code[:length], bits, prefixes, row, modrm, reg, rm, memory,
                       immediate, operand_size, address_size)
