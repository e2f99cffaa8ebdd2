"""VMCB layout against APM Appendix B (Tables B-1, B-2) byte by byte, the 12-bit segment
attribute encoding (semantics.md §C.5), and the VMRUN consistency checks (§B.5) one at a time
on the N64 baseline of §E."""
import struct

import pytest

from ringminus.arch.segments import Segment
from ringminus.arch import segments as S
from ringminus.arch.models import MODELS
from ringminus.intercepts import vmcb as V
from ringminus.arch.exitcodes import ExitCode


def raw(record, offset: int, fmt: str) -> int:
    """A little-endian value at a VMCB offset, read from the record's bytes."""
    return struct.unpack_from("<" + fmt, record.tobytes(), offset)[0]


# --- layout --------------------------------------------------------------------------------


def test_sizes():
    assert V.VMCB.itemsize == 4096
    assert V.VMCB_CONTROL.itemsize == 0x400
    assert V.VMCB_SAVE.itemsize == 744          # Linux EXPECTED_VMCB_SAVE_AREA_SIZE
    assert V.VMCB_SEGMENT.itemsize == 16
    assert V.VMCB.fields["save"][1] == 0x400
    assert len(V.new_vmcb().tobytes()) == 4096


@pytest.mark.parametrize("path, value, offset, fmt", [
    ("control.pause_filter_threshold", 0x1234, 0x03C, "H"),
    ("control.pause_filter_count", 0xBEEF, 0x03E, "H"),
    ("control.iopm_base_pa", 0x1_2345_6000, 0x040, "Q"),
    ("control.msrpm_base_pa", 0x7_0000_0000, 0x048, "Q"),
    ("control.tsc_offset", 0xFFFF_FFFF_FFFF_0000, 0x050, "Q"),
    ("control.guest_asid", 7, 0x058, "I"),
    ("control.tlb_control", V.TlbControl.FLUSH_GUEST, 0x05C, "B"),
    ("control.int_ctl", V.V_IRQ | V.V_INTR_MASKING | 0x0F, 0x060, "I"),
    ("control.v_intr_vector", 0x41, 0x064, "B"),
    ("control.interrupt_state", V.INTERRUPT_SHADOW, 0x068, "I"),
    ("control.exitcode", ExitCode.NPF, 0x070, "q"),
    ("control.exitinfo1", 0xDEAD_BEEF_0000_0001, 0x078, "Q"),
    ("control.exitinfo2", 0xFFFF_8000_0000_1000, 0x080, "Q"),
    ("control.exitintinfo", 0x8000_0B0E, 0x088, "Q"),
    ("control.nested_control", V.NP_ENABLE, 0x090, "Q"),
    ("control.ghcb_pa", 0xABC000, 0x0A0, "Q"),
    ("control.eventinj", 0x0000_0004_8000_0B0D, 0x0A8, "Q"),
    ("control.n_cr3", 0x5000, 0x0B0, "Q"),
    ("control.virt_ext", V.LBR_VIRTUALIZATION_ENABLE, 0x0B8, "Q"),
    ("control.vmcb_clean", 0xFFFF_FFFF, 0x0C0, "I"),
    ("control.nrip", 0x40_1003, 0x0C8, "Q"),
    ("control.guest_instruction_count", 3, 0x0D0, "B"),
    ("control.avic_backing_page", 0x8000, 0x0E0, "Q"),
    ("control.vmsa_pa", 0x9000, 0x108, "Q"),
    ("save.cs.selector", 0x08, 0x410, "H"),
    ("save.cs.attrib", 0x0A9B, 0x412, "H"),
    ("save.cs.limit", 0xFFFF_FFFF, 0x414, "I"),
    ("save.cs.base", 0x1234_5678_9ABC, 0x418, "Q"),
    ("save.gdtr.limit", 0x27, 0x464, "I"),
    ("save.gdtr.base", 0x2000, 0x468, "Q"),
    ("save.idtr.base", 0x3000, 0x488, "Q"),
    ("save.tr.selector", 0x28, 0x490, "H"),
    ("save.cpl", 3, 0x4CB, "B"),
    ("save.efer", 0x1D01, 0x4D0, "Q"),
    ("save.cr4", 0x6A0, 0x548, "Q"),
    ("save.cr3", 0x10_0000, 0x550, "Q"),
    ("save.cr0", 0x8005_0033, 0x558, "Q"),
    ("save.dr7", 0x400, 0x560, "Q"),
    ("save.dr6", 0xFFFF_0FF0, 0x568, "Q"),
    ("save.rflags", 0x202, 0x570, "Q"),
    ("save.rip", 0xFFFF_FFFF_8000_0000, 0x578, "Q"),
    ("save.rsp", 0x7FF0, 0x5D8, "Q"),
    ("save.rax", 0xA5A5, 0x5F8, "Q"),
    ("save.star", 0x0023_0010_0000_0000, 0x600, "Q"),
    ("save.lstar", 0xFFFF_8000_0000_2000, 0x608, "Q"),
    ("save.cstar", 0x4000, 0x610, "Q"),
    ("save.sfmask", 0x4700, 0x618, "Q"),
    ("save.kernel_gs_base", 0x5000, 0x620, "Q"),
    ("save.sysenter_cs", 0x10, 0x628, "Q"),
    ("save.sysenter_esp", 0x6000, 0x630, "Q"),
    ("save.sysenter_eip", 0x7000, 0x638, "Q"),
    ("save.cr2", 0xDEAD_0000, 0x640, "Q"),
    ("save.g_pat", 0x0007_0406_0007_0406, 0x668, "Q"),
    ("save.dbgctl", 1, 0x670, "Q"),
    ("save.br_from", 0x11, 0x678, "Q"),
    ("save.br_to", 0x22, 0x680, "Q"),
    ("save.last_excp_from", 0x33, 0x688, "Q"),
    ("save.last_excp_to", 0x44, 0x690, "Q"),
])
def test_field_lands_at_apm_offset(path, value, offset, fmt):
    record = V.new_vmcb()
    *parents, leaf = path.split(".")
    target = record
    for part in parents:
        target = target[part]
    target[leaf] = value
    assert V.offset_of(path) == offset
    assert raw(record, offset, fmt) == value
    # nothing else was written
    data = bytearray(record.tobytes())
    data[offset:offset + struct.calcsize(fmt)] = bytes(struct.calcsize(fmt))
    assert not any(data)


def test_intercept_bit_is_exit_code():
    record = V.new_vmcb()
    V.set_intercept_vector(record["control"], 1 << ExitCode.VMRUN | 1 << ExitCode.CR0_READ
                           | 1 << ExitCode.EXCP14 | 1 << ExitCode.IDLE_HLT)
    assert raw(record, 0x010, "I") == 1                 # word 4 bit 0 = VMRUN (0x080)
    assert raw(record, 0x000, "I") == 1                 # word 0 bit 0 = CR0 read (0x000)
    assert raw(record, 0x008, "I") == 1 << 14           # word 2 = exception bitmap
    assert raw(record, 0x014, "I") == 1 << 6            # word 5 bit 6 = IDLE_HLT (0x0A6)
    assert V.intercept_vector(record["control"]) >> ExitCode.VMRUN & 1


def test_guest_instruction_bytes():
    record = V.new_vmcb()
    record["control"]["guest_instruction_count"] = 2
    record["control"]["guest_instruction_bytes"][:2] = [0x0F, 0xA2]      # CPUID
    assert record.tobytes()[0x0D0:0x0D3] == bytes([2, 0x0F, 0xA2])


def test_exitcode_invalid_reads_back_as_minus_one():
    record = V.new_vmcb()
    record["control"]["exitcode"] = ExitCode.INVALID
    assert record.tobytes()[0x070:0x078] == b"\xff" * 8
    assert int(record["control"]["exitcode"]) == ExitCode.INVALID == -1


def test_view_writes_through_to_the_buffer():
    page = bytearray(b"\xcc" * 4096)
    record = V.vmcb_view(page)
    record["save"]["rip"] = 0x1234_5678
    record["control"]["exitcode"] = ExitCode.VMMCALL
    assert struct.unpack_from("<Q", page, 0x578)[0] == 0x1234_5678
    assert struct.unpack_from("<q", page, 0x070)[0] == 0x081
    assert page[0x580] == 0xCC                          # reserved bytes keep their contents
    struct.pack_into("<Q", page, 0x4D0, 0x1D01)
    assert int(record["save"]["efer"]) == 0x1D01
    with pytest.raises(ValueError):
        V.vmcb_view(bytearray(4095))


def test_verify_layout_catches_a_wrong_offset():
    bad = [(name, offset + (4 if name == "cr3" else 0)) for name, offset in V.SAVE_OFFSETS]
    with pytest.raises(AssertionError, match="cr3"):
        V.verify_layout(V.VMCB_SAVE, bad, V.SAVE_AREA_SIZE)
    with pytest.raises(AssertionError, match="rip"):
        V.verify_layout(V.VMCB_SAVE, [row for row in V.SAVE_OFFSETS if row[0] != "rip"],
                        V.SAVE_AREA_SIZE)


def test_constants():
    assert V.MSR_VM_HSAVE_PA == 0xC001_0117 and V.MSR_VM_CR == 0xC001_0114
    assert [int(t) for t in V.TlbControl] == [0, 1, 3, 7]
    assert (V.V_IRQ, V.V_GIF, V.V_NMI, V.V_NMI_MASK) == (0x100, 0x200, 0x800, 0x1000)
    assert V.V_INTR_PRIO_MASK == 0xF_0000 and V.V_IGN_TPR == 0x10_0000
    assert (V.V_INTR_MASKING, V.V_GIF_ENABLE, V.V_NMI_ENABLE, V.AVIC_ENABLE) == (
        0x100_0000, 0x200_0000, 0x400_0000, 0x8000_0000)
    assert (V.INTERRUPT_SHADOW, V.GUEST_INTERRUPT_MASK, V.NP_ENABLE) == (1, 2, 1)


def test_event_encoding():
    # #PF with error code 4 (APM Fig. 15-1 format)
    assert V.encode_event(14, V.EventType.EXCEPTION, 4) == 0x0000_0004_8000_0B0E
    assert V.encode_event(0x20, V.EventType.INTR) == 0x8000_0020
    assert V.encode_event(2, V.EventType.NMI) == 0x8000_0202
    assert V.encode_event(0x80, V.EventType.SOFTWARE_INT) == 0x8000_0480
    event = V.EventInfo.decode(0x0000_0004_8000_0B0E)
    assert event == V.EventInfo(True, V.EventType.EXCEPTION, 14, 4)
    assert V.EventInfo.decode(0x8000_0020).error_code is None


# --- segment attributes ------------------------------------------------------------------------


@pytest.mark.parametrize("flags, attrib", [
    (0x00C0_9B00, 0x0C9B),      # flat 32-bit code: G, D, P, S, type 0xB
    (0x00A0_9B00, 0x0A9B),      # 64-bit code: G, L
    (0x00C0_9300, 0x0C93),      # flat data
    (0x0000_8B00, 0x008B),      # busy 32/64-bit TSS
    (0x0000_8200, 0x0082),      # LDT
    (0x00D0_F300, 0x0DF3),      # DPL3 data with AVL
    (0x0000_0000, 0x0000),      # null
])
def test_attrib_round_trip(flags, attrib):
    assert S.vmcb_attrib_from_flags(flags) == attrib
    assert S.flags_from_vmcb_attrib(attrib) == flags


def test_attrib_bit_positions():
    # Linux SVM_SELECTOR_*_SHIFT: S 4, DPL 5, P 7, AVL 8, L 9, DB 10, G 11
    from ringminus.arch.segments import FLAG_DB, FLAG_G, FLAG_L, FLAG_P, FLAG_S
    flags = (FLAG_S, FLAG_P, 1 << 20, FLAG_L, FLAG_DB, FLAG_G)
    assert [S.vmcb_attrib_from_flags(f) for f in flags] == [1 << n for n in (4, 7, 8, 9, 10, 11)]
    assert S.vmcb_attrib_from_flags(3 << 13) == 3 << 5
    assert S.vmcb_attrib_from_flags(0x00CF_9B00) == 0x0C9B      # limit 19:16 is not an attribute


def test_segment_record_round_trip():
    record = V.new_vmcb()
    segment = Segment(0x10, 0x1_0000, 0xFFFF_FFFF, 0x00A0_9B00)
    V.write_segment(record["save"]["cs"], segment)
    assert raw(record, 0x410, "H") == 0x10 and raw(record, 0x412, "H") == 0x0A9B
    assert raw(record, 0x414, "I") == 0xFFFF_FFFF and raw(record, 0x418, "Q") == 0x1_0000
    assert V.read_segment(record["save"]["cs"]) == segment


# --- VMRUN consistency checks ------------------------------------------------------------------

CS_64 = 0x0A9B                  # P S DPL0 code/read/accessed, L, G
CS_32 = 0x0C9B                  # ... D instead of L


def n64_vmcb():
    """The N64 baseline of semantics.md §E: long mode, CPL0, ASID 1, VMRUN intercepted."""
    record = V.new_vmcb()
    save, control = record["save"], record["control"]
    save["efer"] = 0x0D01 | 1 << 12                     # SCE LME LMA NXE + SVME
    save["cr0"] = 0x8005_0033
    save["cr4"] = 0x0000_06A0
    save["cr3"] = 0x0010_0000
    save["dr6"] = 0xFFFF_0FF0
    save["dr7"] = 0x0000_0400
    save["rflags"] = 0x2
    V.write_segment(save["cs"], Segment(0x08, 0, 0xFFFF_FFFF, S.flags_from_vmcb_attrib(CS_64)))
    for name in ("ss", "ds", "es", "fs", "gs"):
        V.write_segment(save[name], Segment(0x10, 0, 0xFFFF_FFFF, S.flags_from_vmcb_attrib(0x0C93)))
    V.set_intercept_vector(control, 1 << ExitCode.VMRUN)
    control["guest_asid"] = 1
    return record


def failure(record, **options):
    options.setdefault("long_mode_capable", True)
    return V.consistency_failure(record["save"], record["control"], **options)


def test_baseline_passes():
    record = n64_vmcb()
    assert failure(record) is None
    assert raw(record, 0x4D0, "Q") == 0x1D01 and raw(record, 0x010, "I") == 1
    assert raw(record, 0x058, "I") == 1


def _set(area, field, value):
    return lambda r: r[area].__setitem__(field, value)


def _or(area, field, bits):
    return lambda r: r[area].__setitem__(field, int(r[area][field]) | bits)


def _clear(area, field, bits):
    return lambda r: r[area].__setitem__(field, int(r[area][field]) & ~bits)


# (case id, change to the baseline, options, expected reason): every row of VMRUN_CHECKS fails
# alone at least once.
FAILURES = [
    ("svme_clear", _clear("save", "efer", 1 << 12), {}, "EFER.SVME is clear"),
    ("nw_without_cd", _or("save", "cr0", 1 << 29), {}, "CR0.NW set with CR0.CD clear"),
    ("cr0_high", _or("save", "cr0", 1 << 32), {}, "CR0[63:32] not zero"),
    ("cr0_top_bit", _or("save", "cr0", 1 << 63), {}, "CR0[63:32] not zero"),
    ("cr3_bit52", _or("save", "cr3", 1 << 52), {}, "CR3 MBZ bits set"),
    ("cr3_above_maxphys", _or("save", "cr3", 1 << 40), {"max_phys_bits": 40}, "CR3 MBZ bits set"),
    ("cr4_la57", _or("save", "cr4", 1 << 12), {}, "CR4 MBZ bits set"),
    ("cr4_bit15", _or("save", "cr4", 1 << 15), {}, "CR4 MBZ bits set"),
    # what the CPU model lacks (kvm-unit-tests' svm_guest_state_test: bits 13, 14 and 19 on qemu64)
    *[(f"cr4_{name}_on_{model}", _or("save", "cr4", bit), {"cr4_defined": MODELS[model].cr4_defined},
       "CR4 MBZ bits set") for model in MODELS for name, bit in (("vmxe", 1 << 13), ("smxe", 1 << 14),
                                                                ("bit19", 1 << 19), ("osxsave", 1 << 18))],
    ("dr6_high", _or("save", "dr6", 1 << 32), {}, "DR6[63:32] not zero"),
    ("dr7_high", _or("save", "dr7", 1 << 40), {}, "DR7[63:32] not zero"),
    ("efer_lmsle", _or("save", "efer", 1 << 13), {}, "EFER MBZ bits set"),
    ("efer_bit1", _or("save", "efer", 1 << 1), {}, "EFER MBZ bits set"),
    ("efer_high", _or("save", "efer", 1 << 32), {}, "EFER MBZ bits set"),
    ("no_long_mode", lambda r: None, {"long_mode_capable": False},
     "EFER.LME/LMA set without long mode"),
    ("lma_only_no_long_mode", lambda r: r["save"].__setitem__("efer", 1 << 12 | 1 << 10),
     {"long_mode_capable": False}, "EFER.LME/LMA set without long mode"),
    ("lme_pg_no_pae", _clear("save", "cr4", 1 << 5), {},
     "EFER.LME and CR0.PG set with CR4.PAE clear"),
    ("lme_pg_no_pe", _clear("save", "cr0", 1), {}, "EFER.LME and CR0.PG set with CR0.PE clear"),
    ("cs_l_and_d", lambda r: r["save"]["cs"].__setitem__("attrib", CS_64 | 1 << 10), {},
     "EFER.LME, CR0.PG, CR4.PAE, CS.L and CS.D all set"),
    ("vmrun_intercept_clear", lambda r: V.set_intercept_vector(r["control"], 0), {},
     "VMRUN intercept clear"),
    ("vmrun_clear_others_set",
     lambda r: V.set_intercept_vector(r["control"], (1 << (ExitCode.IDLE_HLT + 1)) - 1
                                      & ~(1 << ExitCode.VMRUN)), {}, "VMRUN intercept clear"),
    ("msrpm_beyond", _set("control", "msrpm_base_pa", (1 << 52) - 0x1000), {},
     "MSRPM extends beyond the physical address space"),
    # kvm-unit-tests' test_msrpm_iopm_bitmap_addrs: the map may not reach the limit itself
    *[(f"msrpm_at_limit_minus_{hex(back)}", _set("control", "msrpm_base_pa", (1 << 40) - back), {"max_phys_bits": 40},
       "MSRPM extends beyond the physical address space") for back in (0x2000, 0x1FFF, 0x1000)],
    *[(f"iopm_at_limit_minus_{hex(back)}", _set("control", "iopm_base_pa", (1 << 40) - back), {"max_phys_bits": 40},
       "IOPM extends beyond the physical address space") for back in (0x2000, 0x1000)],
    ("msrpm_above", _set("control", "msrpm_base_pa", 1 << 52), {},
     "MSRPM extends beyond the physical address space"),
    ("iopm_beyond", _set("control", "iopm_base_pa", (1 << 52) - 0x2000), {},
     "IOPM extends beyond the physical address space"),
    ("iopm_beyond_small_maxphys", _set("control", "iopm_base_pa", (1 << 36) - 0x1000),
     {"max_phys_bits": 36}, "IOPM extends beyond the physical address space"),
    *[(f"event_reserved_type{t}", _set("control", "eventinj", 1 << 31 | t << 8 | 0x20), {},
       "illegal event injection") for t in (1, 5, 6, 7)],
    *[(f"event_exception_vector{v}",
       _set("control", "eventinj", V.encode_event(v, V.EventType.EXCEPTION)), {},
       "illegal event injection") for v in (2, 15, 32, 255)],    # 15: reserved [unverified]
    ("asid_zero", _set("control", "guest_asid", 0), {}, "ASID is zero"),
    ("np_unsupported", _set("control", "nested_control", V.NP_ENABLE), {},
     "NP_ENABLE without nested paging"),
]


@pytest.mark.parametrize("change, options, reason", [row[1:] for row in FAILURES],
                         ids=[row[0] for row in FAILURES])
def test_each_check_fails_alone(change, options, reason):
    record = n64_vmcb()
    change(record)
    assert failure(record, **options) == reason


def test_every_check_is_exercised():
    assert {row[3] for row in FAILURES} == {reason for reason, _ in V.VMRUN_CHECKS}


@pytest.mark.parametrize("change, options", [
    (_or("save", "cr0", 3 << 29), {}),                                   # CD and NW both set
    (_or("save", "cr0", 1 << 30), {}),                                   # CD alone
    (_set("save", "cr3", (1 << 52) - 0x1000), {}),                       # top page of 52 bits
    (_set("save", "cr3", (1 << 40) - 0x1000), {"max_phys_bits": 40}),
    (_set("save", "dr6", 0xFFFF_FFFF), {}),
    (_set("save", "dr7", 0xFFFF_FFFF), {}),
    (lambda r: r["save"]["cs"].__setitem__("attrib", CS_32), {}),        # compatibility mode
    (_set("control", "msrpm_base_pa", (1 << 52) - 0x3000), {}),
    (_set("control", "iopm_base_pa", (1 << 40) - 0x2002), {"max_phys_bits": 40}),   # read from limit - 3 pages
    (_set("control", "iopm_base_pa", (1 << 52) - 0x3000), {}),
    (_set("control", "iopm_base_pa", (1 << 52) - 0x3000 + 0xFFF), {}),   # bits 11:0 ignored
    (_set("control", "eventinj", V.encode_event(14, V.EventType.EXCEPTION, 2)), {}),
    (_set("control", "eventinj", V.encode_event(8, V.EventType.EXCEPTION, 0)), {}),
    (_set("control", "eventinj", V.encode_event(30, V.EventType.EXCEPTION, 0)), {}),
    (_set("control", "eventinj", V.encode_event(0x20, V.EventType.INTR)), {}),
    (_set("control", "eventinj", V.encode_event(2, V.EventType.NMI)), {}),
    (_set("control", "eventinj", V.encode_event(0x80, V.EventType.SOFTWARE_INT)), {}),
    (_set("control", "eventinj", 7 << 8 | 2), {}),                       # V clear: not checked
    (_set("control", "nested_control", V.NP_ENABLE), {"nested_paging_supported": True}),
    (_set("control", "guest_asid", 0xFFFF), {}),
])
def test_legal_variations_pass(change, options):
    record = n64_vmcb()
    change(record)
    assert failure(record, **options) is None


def test_legacy_guest_without_long_mode():
    """An N32 guest (no LME/LMA) passes on a CPU without long mode; paged real mode
    (PG=1, PE=0) is legal when LME is clear (§B.5)."""
    record = n64_vmcb()
    save = record["save"]
    save["efer"] = 1 << 12
    save["cr4"] = 0
    save["cs"]["attrib"] = CS_32
    assert failure(record, long_mode_capable=False) is None
    save["cr0"] = 0x8000_0010
    assert failure(record, long_mode_capable=False) is None


def test_first_failure_in_apm_order():
    record = n64_vmcb()
    record["control"]["guest_asid"] = 0
    record["save"]["dr7"] = 1 << 32
    assert failure(record) == "DR7[63:32] not zero"
    record["save"]["efer"] = 0x0D01
    assert failure(record) == "EFER.SVME is clear"


def test_checks_read_a_view_over_guest_memory():
    page = bytearray(n64_vmcb().tobytes())
    record = V.vmcb_view(page)
    assert failure(record) is None
    struct.pack_into("<I", page, 0x010, 0)              # clear the VMRUN intercept word
    assert failure(record) == "VMRUN intercept clear"
    struct.pack_into("<I", page, 0x010, 1)
    struct.pack_into("<Q", page, 0x4D0, 0x0D01)         # EFER without SVME
    assert failure(record) == "EFER.SVME is clear"
