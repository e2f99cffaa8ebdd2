"""Decoding of the port-I/O instructions IN and OUT with an immediate or DX port."""
from __future__ import annotations

from dataclasses import dataclass

from .prefixes import parse_prefixes

# opcode -> (direction, port from immediate?, byte-sized?)
PORT_IO_OPCODES = {
    0xE4: ("in", True, True), 0xE5: ("in", True, False),
    0xE6: ("out", True, True), 0xE7: ("out", True, False),
    0xEC: ("in", False, True), 0xED: ("in", False, False),
    0xEE: ("out", False, True), 0xEF: ("out", False, False),
}
OUT_OPCODES = frozenset(bytes([op]) for op, (direction, _, _) in PORT_IO_OPCODES.items() if direction == "out")


@dataclass(frozen=True)
class PortIo:
    direction: str          # "in" or "out"
    port: int | None        # None: the port is in DX
    size: int               # 1, 2 or 4 bytes
    length: int             # instruction length


def decode_port_io(code: bytes, bits: int) -> PortIo | None:
    prefixes = parse_prefixes(code, bits)
    if prefixes.length >= len(code):
        return None
    opcode = code[prefixes.length]
    form = PORT_IO_OPCODES.get(opcode)
    if form is None:
        return None
    direction, immediate, byte_sized = form
    size = 1 if byte_sized else min(prefixes.operand_size(bits), 4)
    if immediate:
        if prefixes.length + 1 >= len(code):
            return None
        return PortIo(direction, code[prefixes.length + 1], size, prefixes.length + 2)
    return PortIo(direction, None, size, prefixes.length + 1)
