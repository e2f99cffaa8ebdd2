"""x86 instruction prefixes: the legacy ones and REX."""
from __future__ import annotations

from dataclasses import dataclass

SEGMENT_OVERRIDES = {0x26: "es", 0x2E: "cs", 0x36: "ss", 0x3E: "ds", 0x64: "fs", 0x65: "gs"}
LEGACY_PREFIXES = frozenset({0x66, 0x67, 0xF0, 0xF2, 0xF3, *SEGMENT_OVERRIDES})
MAX_INSTRUCTION_LENGTH = 15


def is_prefix(byte: int, bits: int) -> bool:
    return byte in LEGACY_PREFIXES or (bits == 64 and 0x40 <= byte <= 0x4F)


@dataclass(frozen=True)
class Prefixes:
    length: int
    operand_size_override: bool = False
    address_size_override: bool = False
    lock: bool = False
    rep: bool = False
    repne: bool = False
    segment: str | None = None
    rex: int = 0            # the REX byte, 0 if none

    def operand_size(self, bits: int) -> int:
        """Operand size in bytes of an instruction whose size is not byte-fixed."""
        if bits == 64 and self.rex & 0x8:
            return 8
        if bits == 16:
            return 4 if self.operand_size_override else 2
        return 2 if self.operand_size_override else 4


def parse_prefixes(code: bytes, bits: int) -> Prefixes:
    """Prefixes at the start of ``code``.  A REX byte counts only directly before the opcode."""
    fields = dict(operand_size_override=False, address_size_override=False, lock=False,
                  rep=False, repne=False, segment=None)
    rex = 0
    i = 0
    while i < min(len(code), MAX_INSTRUCTION_LENGTH) and is_prefix(code[i], bits):
        byte = code[i]
        if bits == 64 and 0x40 <= byte <= 0x4F:
            rex = byte
        else:
            rex = 0          # a legacy prefix after REX cancels the REX
            if byte == 0x66:
                fields["operand_size_override"] = True
            elif byte == 0x67:
                fields["address_size_override"] = True
            elif byte == 0xF0:
                fields["lock"] = True
            elif byte == 0xF3:
                fields["rep"], fields["repne"] = True, False
            elif byte == 0xF2:
                fields["repne"], fields["rep"] = True, False
            else:
                fields["segment"] = SEGMENT_OVERRIDES[byte]
        i += 1
    return Prefixes(length=i, rex=rex, **fields)
