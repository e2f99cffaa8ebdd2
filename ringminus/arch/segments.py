"""Segment descriptors, gate descriptors and segment-register state, and every encoding of
a segment's attributes, converted only here (semantics.md §C.5, §F.6):

* the 8-byte descriptor in a GDT/LDT,
* QEMU's descriptor-cache ``flags`` (the descriptor's high dword: type<<8, S<<12, DPL<<13,
  P<<15, AVL<<20, L<<21, D/B<<22, G<<23; limit 19:16 excluded),
* the 16-bit SMRAM/KVM ``attributes`` (type 0-3, S 4, DPL 5-6, P 7, AVL 12, L 13, D/B 14,
  G 15) of the 64-bit state-save map, RunResult and ``--json``,
* the 32-bit state-save map's cache word (the flags word itself in KVM, shifted like the
  attributes in QEMU i386),
* the VMCB's 12-bit ``attrib`` (type 3:0, S 4, DPL 6:5, P 7, AVL 8, L 9, D/B 10, G 11).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

FLAG_S = 1 << 12
FLAG_P = 1 << 15
FLAG_L = 1 << 21
FLAG_DB = 1 << 22
FLAG_G = 1 << 23

TYPE_ACCESSED = 0x1
TYPE_CODE = 0x8
TYPE_CONFORMING = 0x4      # for code segments
TYPE_EXPAND_DOWN = 0x4     # for data segments
TYPE_WRITABLE = 0x2        # data
TYPE_READABLE = 0x2        # code

# System descriptor and gate types (S = 0).
SYS_LDT = 0x2
SYS_TASK_GATE = 0x5
SYS_INT_GATE16 = 0x6
SYS_TRAP_GATE16 = 0x7
SYS_TSS32_AVAILABLE = 0x9
SYS_TSS32_BUSY = 0xB
SYS_INT_GATE = 0xE          # 32-bit, or 64-bit in long mode
SYS_TRAP_GATE = 0xF


@dataclass(frozen=True)
class Segment:
    """A segment register with its hidden part, as the CPU caches it."""
    selector: int
    base: int
    limit: int          # in bytes (granularity already applied)
    flags: int          # descriptor high-dword layout (QEMU's SegmentCache.flags)

    @property
    def attributes(self) -> int:
        """The 16-bit SMRAM/KVM attribute encoding."""
        return attributes_from_flags(self.flags)

    @property
    def type(self) -> int:
        return (self.flags >> 8) & 0xF

    @property
    def dpl(self) -> int:
        return flags_dpl(self.flags)

    @property
    def present(self) -> bool:
        return bool(self.flags & FLAG_P)

    @property
    def is_code(self) -> bool:
        return bool(self.flags & FLAG_S) and bool(self.type & TYPE_CODE)

    @property
    def long(self) -> bool:
        return bool(self.flags & FLAG_L)

    @property
    def big(self) -> bool:
        return bool(self.flags & FLAG_DB)

    def as_dict(self) -> dict:
        return {"selector": self.selector, "base": self.base, "limit": self.limit,
                "attributes": self.attributes}

    @staticmethod
    def real_mode(selector: int, code: bool = False) -> "Segment":
        """A segment as real mode loads it: base = selector * 16, 64 KiB, present, accessed."""
        kind = TYPE_CODE | TYPE_READABLE if code else TYPE_WRITABLE
        return Segment(selector & 0xFFFF, (selector & 0xFFFF) << 4, 0xFFFF,
                       FLAG_P | FLAG_S | ((kind | TYPE_ACCESSED) << 8))


FLAGS_MASK = 0x00F0FF00             # the attribute bits of a flags word
ATTRIBUTES_MASK = 0xF0FF            # the same bits shifted down by 8
VMCB_ATTRIB_MASK = 0x0FFF


def descriptor_flags(type_: int, s: int = 1, dpl: int = 0, present: int = 1, avl: int = 0,
                     long_mode: int = 0, default_big: int = 0, granularity: int = 0) -> int:
    """Build a flags word from descriptor attribute fields."""
    return ((type_ & 0xF) << 8 | (s & 1) << 12 | (dpl & 3) << 13 | (present & 1) << 15
            | (avl & 1) << 20 | (long_mode & 1) << 21 | (default_big & 1) << 22
            | (granularity & 1) << 23)


def flags_dpl(flags: int) -> int:
    """The DPL a flags word holds."""
    return (flags >> 13) & 3


def attributes_from_flags(flags: int) -> int:
    """The 16-bit attributes word (64-bit map, RunResult; KVM and QEMU agree)."""
    return (flags >> 8) & ATTRIBUTES_MASK


def flags_from_attributes(attributes: int) -> int:
    """The flags word back from a 16-bit attributes word."""
    return (attributes & ATTRIBUTES_MASK) << 8


def segment_flags_32(flags: int, shifted: bool) -> int:
    """The 32-bit-map cache "flags" word: unshifted in KVM (shifted=False, 0x00C09B00 for flat
    32-bit code), shifted like the 64-bit map in QEMU i386 (shifted=True, 0x0000C09B)."""
    return (flags >> 8) & ATTRIBUTES_MASK if shifted else flags & FLAGS_MASK


def flags_from_32(word: int, shifted: bool) -> int:
    """The flags word back from a 32-bit-map cache word written as ``segment_flags_32`` does."""
    return (word & ATTRIBUTES_MASK) << 8 if shifted else word & FLAGS_MASK


# The two conversions above as expressions over a variable, for generated code (the SMRAM map
# codecs inline them: a call per segment would cost microseconds per world switch).
def segment_flags_32_expression(flags: str, shifted: bool) -> str:
    return f"({flags} >> 8) & {ATTRIBUTES_MASK:#x}" if shifted else f"{flags} & {FLAGS_MASK:#x}"


def flags_from_32_expression(word: str, shifted: bool) -> str:
    return f"({word} & {ATTRIBUTES_MASK:#x}) << 8" if shifted else f"{word} & {FLAGS_MASK:#x}"


VIRTUAL_ADDRESS_BITS = 48               # no CPU model has LA57
_TOP = 1 << VIRTUAL_ADDRESS_BITS - 1


def canonical(address: int) -> int:
    """``address`` sign-extended from bit 47, as VMRUN and VMLOAD load a segment base (QEMU's
    svm_canonicalization; kvm-unit-tests' test_canonicalization on hardware)."""
    return ((address & (2 * _TOP - 1)) ^ _TOP) - _TOP & 0xFFFF_FFFF_FFFF_FFFF


def vmcb_attrib_from_flags(flags: int) -> int:
    """The VMCB 12-bit attrib of a descriptor-cache flags word (limit 19:16 dropped)."""
    return (flags >> 8) & 0x0FF | (flags >> 12) & 0xF00


def flags_from_vmcb_attrib(attrib: int) -> int:
    """The descriptor-cache flags word of a VMCB attrib."""
    return (attrib & 0x0FF) << 8 | (attrib & 0xF00) << 12


def pack_descriptor(base: int, limit: int, attributes: int) -> bytes:
    """An 8-byte GDT/LDT descriptor.  ``limit`` is in bytes; G is chosen from it unless set."""
    if limit > 0xFFFFF:
        attributes |= 0x8000
    raw_limit = limit >> 12 if attributes & 0x8000 else limit
    return struct.pack("<HHBBBB", raw_limit & 0xFFFF, base & 0xFFFF, (base >> 16) & 0xFF,
                       attributes & 0xFF, ((raw_limit >> 16) & 0xF) | ((attributes >> 8) & 0xF0),
                       (base >> 24) & 0xFF)


def pack_system_descriptor64(base: int, limit: int, attributes: int) -> bytes:
    """A 16-byte long-mode system descriptor (TSS, LDT)."""
    return pack_descriptor(base, limit, attributes) + struct.pack("<II", base >> 32, 0)


def unpack_descriptor(raw: bytes, selector: int, base_high: int = 0) -> Segment:
    """Decode an 8-byte descriptor into the cached form (limit scaled by G)."""
    low, high = struct.unpack("<II", raw[:8])
    base = (low >> 16) | ((high & 0xFF) << 16) | (high & 0xFF000000) | (base_high << 32)
    limit = (low & 0xFFFF) | (high & 0xF0000)
    if high & FLAG_G:
        limit = (limit << 12) | 0xFFF
    return Segment(selector, base, limit, high & FLAGS_MASK)


@dataclass(frozen=True)
class Gate:
    """An IDT gate (protected or long mode)."""
    type: int
    dpl: int
    present: bool
    selector: int
    offset: int
    ist: int = 0


def unpack_gate(raw: bytes, long_mode: bool) -> Gate:
    offset_low, selector, ist, access, offset_mid = struct.unpack_from("<HHBBH", raw)
    offset = offset_low | (offset_mid << 16)
    if long_mode:
        offset |= struct.unpack_from("<I", raw, 8)[0] << 32
    return Gate(access & 0xF, (access >> 5) & 3, bool(access & 0x80), selector, offset,
                ist & 7 if long_mode else 0)


def pack_gate(offset: int, selector: int, gate_type: int, dpl: int = 0, present: bool = True,
              ist: int = 0, long_mode: bool = False) -> bytes:
    access = gate_type | (dpl << 5) | (0x80 if present else 0)
    raw = struct.pack("<HHBBH", offset & 0xFFFF, selector, ist, access, (offset >> 16) & 0xFFFF)
    return raw + struct.pack("<II", (offset >> 32) & 0xFFFFFFFF, 0) if long_mode else raw
