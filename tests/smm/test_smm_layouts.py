"""SMRAM state-save maps: offsets against semantics.md §C.3/§C.4, byte-level round trips, and
the segment attribute encodings of §C.5/§F.6 (vector E.67)."""
import struct

import numpy as np
import pytest

from ringminus.arch import segments as S
from ringminus.smm import layouts as L
from ringminus.smm.layouts import SMRAM_STATE_32, SMRAM_STATE_64


def raw(data: bytes, smbase_offset: int, fmt: str) -> int:
    """Read a little-endian value at an offset from SMBASE out of the 512 saved bytes."""
    return struct.unpack_from("<" + fmt, data, smbase_offset - L.SAVE_AREA)[0]


def test_constants():
    assert L.SAVE_AREA == 0xFE00
    assert L.ENTRY_OFFSET == 0x8000
    assert L.DEFAULT_SMBASE == 0x30000
    assert L.REVISION_64 == 0x00020064 and L.REVISION_32 == 0x00020000
    assert L.REVISION_IO_RESTART == 0x10000 and L.REVISION_SMBASE_RELOCATION == 0x20000
    # KVM/QEMU advertise relocation but not I/O restart (§F.14)
    for revision in (L.REVISION_64, L.REVISION_32):
        assert revision & L.REVISION_SMBASE_RELOCATION
        assert not revision & L.REVISION_IO_RESTART


@pytest.mark.parametrize("layout", [SMRAM_STATE_64, SMRAM_STATE_32])
def test_itemsize_is_512(layout):
    assert layout.itemsize == 512
    assert len(L.to_bytes(L.new_save_area(layout))) == 512


def test_record_types():
    assert L.SEGMENT_64.itemsize == 16
    assert [L.SEGMENT_64.fields[n][1] for n in ("selector", "attributes", "limit", "base")] == [0, 2, 4, 8]
    assert L.SEGMENT_CACHE_32.itemsize == 12
    assert [L.SEGMENT_CACHE_32.fields[n][1] for n in ("flags", "limit", "base")] == [0, 4, 8]


@pytest.mark.parametrize("field, offset, size", [
    ("es", 0xFE00, 16), ("cs", 0xFE10, 16), ("gs", 0xFE50, 16),
    ("gdtr_limit", 0xFE64, 4), ("gdtr_base", 0xFE68, 8), ("ldtr", 0xFE70, 16),
    ("idtr_limit", 0xFE84, 4), ("idtr_base", 0xFE88, 8), ("tr", 0xFE90, 16),
    ("io_instruction_restart", 0xFEC8, 1), ("auto_halt_restart", 0xFEC9, 1),
    ("interrupt_shadow", 0xFECB, 1),
    ("efer", 0xFED0, 8), ("svm_guest", 0xFED8, 8), ("svm_guest_vmcb", 0xFEE0, 8),
    ("revision", 0xFEFC, 4), ("smbase", 0xFF00, 4), ("ssp", 0xFF18, 8),
    ("cr4", 0xFF48, 8), ("cr3", 0xFF50, 8), ("cr0", 0xFF58, 8),
    ("rflags", 0xFF70, 8), ("rip", 0xFF78, 8),
    ("r15", 0xFF80, 8), ("r8", 0xFFB8, 8), ("rdi", 0xFFC0, 8), ("rax", 0xFFF8, 8),
])
def test_offsets_64(field, offset, size):
    assert L.offset_of(SMRAM_STATE_64, field) == offset
    assert SMRAM_STATE_64.fields[field][0].itemsize == size


@pytest.mark.parametrize("field, offset, size", [
    ("smbase", 0xFEF8, 4), ("revision", 0xFEFC, 4),
    ("io_instruction_restart", 0xFF00, 2), ("auto_halt_restart", 0xFF02, 2),
    ("io_restart_edi", 0xFF04, 4), ("io_restart_eip", 0xFF10, 4),
    ("cr4", 0xFF14, 4), ("interrupt_shadow", 0xFF1A, 1),
    ("ds_cache", 0xFF2C, 12), ("idtr_limit", 0xFF54, 4), ("idtr_base", 0xFF58, 4),
    ("tr_cache", 0xFF5C, 12), ("gdtr_limit", 0xFF70, 4), ("gdtr_base", 0xFF74, 4),
    ("ldtr_cache", 0xFF78, 12), ("cs_cache", 0xFF90, 12),
    ("es_selector", 0xFFA8, 4), ("cs_selector", 0xFFAC, 4), ("tr_selector", 0xFFC4, 4),
    ("dr7", 0xFFC8, 4), ("dr6", 0xFFCC, 4),
    ("eax", 0xFFD0, 4), ("edi", 0xFFEC, 4),
    ("eip", 0xFFF0, 4), ("eflags", 0xFFF4, 4), ("cr3", 0xFFF8, 4), ("cr0", 0xFFFC, 4),
])
def test_offsets_32(field, offset, size):
    assert L.offset_of(SMRAM_STATE_32, field) == offset
    assert SMRAM_STATE_32.fields[field][0].itemsize == size


def test_record_member_offsets():
    assert L.offset_of(SMRAM_STATE_64, "cs.attributes") == 0xFE12
    assert L.offset_of(SMRAM_STATE_64, "cs.base") == 0xFE18
    assert L.offset_of(SMRAM_STATE_32, "tr_cache.limit") == 0xFF60
    assert L.offset_of(SMRAM_STATE_32, "ldtr_cache.base") == 0xFF80
    assert L.offset_of(SMRAM_STATE_32, "cs_cache.limit") == 0xFF94   # E.67
    with pytest.raises(KeyError):
        L.offset_of(SMRAM_STATE_64, "cs.flags")


def test_32bit_descriptor_table_records_keep_their_frame():
    # IDTR record at FF50 and GDTR record at FF6C use only the limit/base of a 12-byte cache
    assert L.offset_of(SMRAM_STATE_32, "idtr_limit") == 0xFF50 + 4
    assert L.offset_of(SMRAM_STATE_32, "gdtr_limit") == 0xFF6C + 4


@pytest.mark.parametrize("layout, table", [(SMRAM_STATE_64, L.OFFSETS_64),
                                           (SMRAM_STATE_32, L.OFFSETS_32)])
def test_tables_cover_every_field(layout, table):
    assert sorted(name for name, _ in table) == sorted(layout.names)
    L.verify_layout(layout, table)


def test_64bit_gprs_in_reverse_order():
    names = ["r15", "r14", "r13", "r12", "r11", "r10", "r9", "r8",
             "rdi", "rsi", "rbp", "rsp", "rbx", "rdx", "rcx", "rax"]
    assert [L.offset_of(SMRAM_STATE_64, n) for n in names] == list(range(0xFF80, 0x10000, 8))


def test_32bit_gprs_in_natural_order():
    names = ["eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi"]
    assert [L.offset_of(SMRAM_STATE_32, n) for n in names] == list(range(0xFFD0, 0xFFF0, 4))


def test_verify_layout_names_the_bad_field():
    names = list(SMRAM_STATE_64.names)
    fields = SMRAM_STATE_64.fields
    offsets = [fields[n][1] for n in names]
    offsets[names.index("rip")] += 8      # rip moved onto r15
    bad = np.dtype({"names": names, "formats": [fields[n][0] for n in names],
                    "offsets": offsets, "itemsize": 512})
    with pytest.raises(AssertionError, match="rip"):
        L.verify_layout(bad, L.OFFSETS_64)


def test_verify_layout_rejects_overlap_size_and_missing_fields():
    overlapping = np.dtype({"names": ["a", "b"], "formats": ["<u8", "<u4"],
                            "offsets": [0, 4], "itemsize": 512})
    with pytest.raises(AssertionError, match="overlaps"):
        L.verify_layout(overlapping, [("a", 0xFE00), ("b", 0xFE04)])
    short = np.dtype({"names": ["a"], "formats": ["<u4"], "offsets": [0], "itemsize": 256})
    with pytest.raises(AssertionError, match="itemsize"):
        L.verify_layout(short, [("a", 0xFE00)])
    with pytest.raises(AssertionError, match="b"):
        L.verify_layout(overlapping, [("a", 0xFE00)])
    with pytest.raises(AssertionError, match="a"):
        L.verify_layout(overlapping, [("a", 0xFE00), ("a", 0xFE00), ("b", 0xFE04)])


def test_round_trip_64():
    rec = L.new_save_area(SMRAM_STATE_64)
    rec["revision"] = L.REVISION_64
    rec["smbase"] = L.DEFAULT_SMBASE
    rec["rip"] = 0x40_1000
    rec["rax"] = 0x1111
    rec["r15"] = 0xFEDC_BA98_7654_3210
    rec["efer"] = 0xD01
    rec["cr0"], rec["cr3"], rec["cr4"] = 0x8005_0033, 0x10_0000, 0x6A0
    rec["svm_guest"], rec["svm_guest_vmcb"] = 1, 0x7_0000
    rec["gdtr_limit"], rec["gdtr_base"] = 0x27, 0x5000
    rec["idtr_limit"], rec["idtr_base"] = 0xFFF, 0x6000
    rec["cs"]["selector"] = 0x0008
    rec["cs"]["attributes"] = 0xA09B
    rec["cs"]["limit"] = 0xFFFF_FFFF
    rec["cs"]["base"] = 0x1234_5678_9ABC
    rec["interrupt_shadow"] = 1
    data = L.to_bytes(rec)
    assert len(data) == 512
    assert raw(data, 0xFEFC, "I") == 0x00020064
    assert raw(data, 0xFF00, "I") == 0x30000
    assert raw(data, 0xFF78, "Q") == 0x40_1000
    assert raw(data, 0xFFF8, "Q") == 0x1111
    assert raw(data, 0xFF80, "Q") == 0xFEDC_BA98_7654_3210
    assert raw(data, 0xFED0, "Q") == 0xD01
    assert raw(data, 0xFF58, "Q") == 0x8005_0033
    assert raw(data, 0xFF50, "Q") == 0x10_0000
    assert raw(data, 0xFF48, "Q") == 0x6A0
    assert raw(data, 0xFED8, "Q") == 1 and raw(data, 0xFEE0, "Q") == 0x7_0000
    assert raw(data, 0xFE64, "I") == 0x27 and raw(data, 0xFE68, "Q") == 0x5000
    assert raw(data, 0xFE84, "I") == 0xFFF and raw(data, 0xFE88, "Q") == 0x6000
    assert struct.unpack_from("<HHIQ", data, 0x10) == (0x0008, 0xA09B, 0xFFFF_FFFF, 0x1234_5678_9ABC)
    assert data[0xCB] == 1
    # nothing else written
    assert data[0x20:0x64] == bytes(0x44)

    back = L.from_bytes(data, SMRAM_STATE_64)
    assert int(back["rip"]) == 0x40_1000 and int(back["cs"]["attributes"]) == 0xA09B
    assert L.to_bytes(back) == data


def test_round_trip_32():
    rec = L.new_save_area(SMRAM_STATE_32)
    rec["smbase"] = 0x3_0000
    rec["revision"] = L.REVISION_32
    rec["eip"], rec["eflags"], rec["cr0"], rec["cr3"], rec["cr4"] = 0x1000, 0x202, 0x11, 0, 0
    rec["cs_selector"] = 0x0008
    rec["cs_cache"]["flags"] = 0x00C0_9B00
    rec["cs_cache"]["limit"] = 0xFFFF_FFFF
    rec["cs_cache"]["base"] = 0
    rec["gdtr_limit"], rec["gdtr_base"] = 0x17, 0x9000
    rec["tr_cache"]["base"] = 0xABCD_0000
    rec["eax"], rec["edi"] = 0x1111_1111, 0x7777_7777
    data = L.to_bytes(rec)
    # vector E.67's numbers
    assert raw(data, 0xFFF0, "I") == 0x1000
    assert raw(data, 0xFFF4, "I") == 0x202
    assert raw(data, 0xFFFC, "I") == 0x11
    assert raw(data, 0xFEFC, "I") == 0x0002_0000
    assert raw(data, 0xFEF8, "I") == 0x0003_0000
    assert raw(data, 0xFFAC, "I") == 0x0008
    assert raw(data, 0xFF90, "I") == 0x00C0_9B00
    assert raw(data, 0xFF94, "I") == 0xFFFF_FFFF
    assert raw(data, 0xFF98, "I") == 0
    assert raw(data, 0xFF70, "I") == 0x17 and raw(data, 0xFF74, "I") == 0x9000
    assert raw(data, 0xFF64, "I") == 0xABCD_0000
    assert raw(data, 0xFFD0, "I") == 0x1111_1111 and raw(data, 0xFFEC, "I") == 0x7777_7777
    assert L.to_bytes(L.from_bytes(bytearray(data), SMRAM_STATE_32)) == data


def test_from_bytes_keeps_reserved_bytes_and_is_writable():
    data = bytes(range(256)) * 2
    rec = L.from_bytes(data, SMRAM_STATE_64)
    assert L.to_bytes(rec) == data
    rec["rip"] = 0
    assert L.to_bytes(rec)[0x178:0x180] == bytes(8)
    source = bytearray(data)
    L.from_bytes(source, SMRAM_STATE_64)["rax"] = 0       # a copy: the source is untouched
    assert source == data
    with pytest.raises(ValueError):
        L.from_bytes(bytes(511), SMRAM_STATE_64)


def test_layout_and_revision_selection():
    assert L.layout_for(long_mode=True) == SMRAM_STATE_64
    assert L.layout_for(long_mode=False) == SMRAM_STATE_32
    assert L.revision_for(SMRAM_STATE_64) == L.REVISION_64
    assert L.revision_for(SMRAM_STATE_32) == L.REVISION_32


# --- attribute encodings (§C.5, §F.6) --------------------------------------------------------

FLAT_CODE_32 = 0x00C0_9B00      # type B (code, exec/read, accessed), S, P, D/B, G
CODE_64 = 0x00A0_9B00           # type B, S, P, L, G


def test_descriptor_flags():
    assert S.descriptor_flags(0xB, default_big=1, granularity=1) == FLAT_CODE_32
    assert S.descriptor_flags(0xB, long_mode=1, granularity=1) == CODE_64
    # SMM entry segments: type 3, S=1, DPL 0, P=1, G=1 (§C.2 step 10)
    assert S.descriptor_flags(3, granularity=1) == 0x0080_9300


def test_attributes_64():
    assert S.attributes_from_flags(FLAT_CODE_32) == 0xC09B
    assert S.attributes_from_flags(CODE_64) == 0xA09B
    assert S.flags_from_attributes(0xC09B) == FLAT_CODE_32
    assert S.flags_from_attributes(0xA09B) == CODE_64
    # limit 19:16 (descriptor bits 19:16 -> flags bits 19:16) is not an attribute
    assert S.attributes_from_flags(FLAT_CODE_32 | 0x000F_0000) == 0xC09B


def test_segment_flags_32_kvm_vs_qemu():
    assert S.segment_flags_32(FLAT_CODE_32, shifted=False) == 0x00C0_9B00    # KVM
    assert S.segment_flags_32(FLAT_CODE_32, shifted=True) == 0x0000_C09B     # QEMU i386
    assert S.segment_flags_32(FLAT_CODE_32 | 0x000F_0000, shifted=False) == 0x00C0_9B00
    for shifted in (False, True):
        for flags in (FLAT_CODE_32, CODE_64, 0x0080_9300, 0x0000_8B00):
            assert S.flags_from_32(S.segment_flags_32(flags, shifted), shifted) == flags


def test_qemu_and_kvm_32bit_maps_differ_only_in_the_flags_word():
    kvm, qemu = L.new_save_area(SMRAM_STATE_32), L.new_save_area(SMRAM_STATE_32)
    for rec, shifted in ((kvm, False), (qemu, True)):
        rec["cs_selector"] = 8
        rec["cs_cache"]["flags"] = S.segment_flags_32(FLAT_CODE_32, shifted)
        rec["cs_cache"]["limit"] = 0xFFFF_FFFF
    k, q = L.to_bytes(kvm), L.to_bytes(qemu)
    assert raw(k, 0xFF90, "I") == 0x00C0_9B00 and raw(q, 0xFF90, "I") == 0x0000_C09B
    assert k[:0x190] == q[:0x190] and k[0x194:] == q[0x194:]
