"""Segmented address translation with the architecture's checks: an offset in a segment
becomes a linear address, or #GP/#SS (null selector, type, limit, canonical form)."""
from __future__ import annotations

from .cpu import Cpu
from ..arch.segments import TYPE_CODE, TYPE_EXPAND_DOWN, TYPE_READABLE, TYPE_WRITABLE, Segment
from ..arch.exceptions import GuestFault, Vector


def canonical(address: int) -> bool:
    top = address >> 47
    return top == 0 or top == 0x1FFFF


def _fault(segment_name: str) -> GuestFault:
    return GuestFault(Vector.SS if segment_name == "ss" else Vector.GP, 0)


def linear_address(cpu: Cpu, segment_name: str, offset: int, size: int, write: bool,
                   address_size: int) -> int:
    """The linear address of ``size`` bytes at ``segment_name:offset`` for a data access."""
    offset &= (1 << (8 * address_size)) - 1
    segment: Segment = cpu.segment(segment_name)
    if cpu.long_mode_active and cpu.code_bits() == 64:
        base = segment.base if segment_name in ("fs", "gs") else 0
        linear = (base + offset) & 0xFFFF_FFFF_FFFF_FFFF
        if not (canonical(linear) and canonical(linear + size - 1)):
            raise _fault(segment_name)
        return linear
    if cpu.protected and not cpu.vm86:
        if not segment.present:                 # a null selector loads a not-present cache
            raise _fault(segment_name)
        kind = segment.type
        if (kind & TYPE_CODE and (write or not kind & TYPE_READABLE)) or \
                (not kind & TYPE_CODE and write and not kind & TYPE_WRITABLE):
            raise _fault(segment_name)
        last = offset + size - 1
        if not kind & TYPE_CODE and kind & TYPE_EXPAND_DOWN:
            upper = 0xFFFF_FFFF if segment.big else 0xFFFF
            outside = offset <= segment.limit or last > upper
        else:
            outside = last > segment.limit
        if outside:
            raise _fault(segment_name)
    elif offset + size - 1 > segment.limit:     # real mode: the cached limit still applies
        raise _fault(segment_name)
    return (segment.base + offset) & 0xFFFF_FFFF
