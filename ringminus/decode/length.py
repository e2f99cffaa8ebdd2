"""Capstone, the one general disassembler: the length of any instruction (for resuming after
one ringminus did not decode with the table: an intercepted exception's instruction,
skipped), the instruction starts in a block (code sites), and the text of a trace.
Imported on first use: a run that never asks pays nothing for it (start-up time)."""
from __future__ import annotations

from functools import cache


@cache
def disassembler(bits: int):
    """Capstone for ``bits``-bit code (one per mode, shared)."""
    import capstone
    modes = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}
    return capstone.Cs(capstone.CS_ARCH_X86, modes[bits])


def instruction_length(code: bytes, bits: int) -> int | None:
    """Length of the instruction at the start of ``code``, or None if it does not decode."""
    return next((i.size for i in disassembler(bits).disasm(code, 0, 1)), None)


def instruction_text(code: bytes, bits: int, address: int) -> str:
    """``mnemonic operands`` of the instruction at the start of ``code``."""
    return next((f"{i.mnemonic} {i.op_str}".strip() for i in disassembler(bits).disasm(code, address, 1)),
                "(undecodable)")
