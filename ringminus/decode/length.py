"""Instruction length of any instruction (capstone), for resuming after one ringminus did not
decode with the table (an intercepted exception's instruction, skipped)."""
from __future__ import annotations

from functools import cache

from capstone import CS_ARCH_X86, CS_MODE_16, CS_MODE_32, CS_MODE_64, Cs

_MODES = {16: CS_MODE_16, 32: CS_MODE_32, 64: CS_MODE_64}


@cache
def _disassembler(bits: int) -> Cs:
    return Cs(CS_ARCH_X86, _MODES[bits])


def instruction_length(code: bytes, bits: int) -> int | None:
    """Length of the instruction at the start of ``code``, or None if it does not decode."""
    return next((i.size for i in _disassembler(bits).disasm(code, 0, 1)), None)
