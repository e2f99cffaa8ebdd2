"""The VMCB: the 4 KiB page VMRUN reads the guest from and #VMEXIT writes it back to.

Layout: AMD APM Vol. 2 Appendix B -- Table B-1 (control area, VMCB offset 0x000) and Table B-2
(state-save area, VMCB offset 0x400) -- cross-checked against Linux ``struct
vmcb_control_area`` / ``struct vmcb_save_area`` (arch/x86/include/asm/svm.h, whose own
BUILD_BUG_ONs pin the control area at 1024 bytes and the save area at 744).  Both areas are
little-endian numpy structured dtypes with explicit offsets; ``VMCB`` puts them on one page.
``CONTROL_OFFSETS`` and ``SAVE_OFFSETS`` restate every field's offset as the APM tables print
them (control from the VMCB, save from the start of the save area) and ``verify_layout``
checks the dtypes against them at import.  Reserved bytes have no field.

Segment attributes: the VMCB keeps 12 bits, descriptor bits 47:40 in attrib[7:0] and 55:52 in
attrib[11:8] (semantics.md §C.5); ``vmcb_attrib_from_flags`` / ``flags_from_vmcb_attrib``
convert to and from the descriptor-cache ``flags`` word of descriptors.py.

``consistency_failure`` is VMRUN's list of illegal guest states (APM §15.5.1, semantics.md
§B.5) as a table of (reason, condition) rows walked in the APM's order.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Callable

import numpy as np

from ..binlayout import U1, U2, U4, U8, field_span, structured, verify as verify_layout
from ..arch.control import CONTROL_RULES, CR4_DEFINED, EFER_SVME, RuleSet
from ..arch.segments import Segment, flags_from_vmcb_attrib, vmcb_attrib_from_flags
from ..arch.exitcodes import ExitCode

# --- sizes and MSRs ---------------------------------------------------------------------------

VMCB_SIZE = 0x1000
CONTROL_AREA_SIZE = 0x400           # = offset of the save area
SAVE_AREA_OFFSET = 0x400
SAVE_AREA_SIZE = 0x2E8              # Linux struct vmcb_save_area (through SPEC_CTRL at 0x2E0)
INTERCEPT_WORDS = 6                 # 0x000-0x017, bit n of the vector = exit code n (§A.9)

MSR_VM_CR = 0xC001_0114
MSR_VM_HSAVE_PA = 0xC001_0117
VM_CR_R_INIT = 1 << 1               # INIT becomes #SX (§B.3) [unverified]
VM_CR_LOCK = 1 << 3
VM_CR_SVMDIS = 1 << 4

# --- control-area field values ----------------------------------------------------------------


class TlbControl(IntEnum):
    """TLB_CONTROL (byte 0x05C): what VMRUN flushes before running the guest."""
    DO_NOTHING = 0
    FLUSH_ALL = 1                   # every ASID
    FLUSH_GUEST = 3                 # this guest's ASID
    FLUSH_GUEST_NON_GLOBAL = 7      # this guest's non-global entries


# int_ctl, VMCB 0x060 (APM Table B-1; Linux V_*_MASK)
V_TPR_MASK = 0xFF                   # bits 7:0; the TPR value uses bits 3:0, 7:4 SBZ
V_IRQ = 1 << 8
V_GIF = 1 << 9
V_NMI = 1 << 11                     # virtual NMI pending
V_NMI_MASK = 1 << 12                # virtual NMI blocked
V_INTR_PRIO_SHIFT = 16
V_INTR_PRIO_MASK = 0xF << V_INTR_PRIO_SHIFT
V_IGN_TPR = 1 << 20
V_INTR_MASKING = 1 << 24
V_GIF_ENABLE = 1 << 25
V_NMI_ENABLE = 1 << 26              # vNMI: V_NMI and V_NMI_MASK are the guest's NMI state
X2AVIC_ENABLE = 1 << 30
AVIC_ENABLE = 1 << 31

# interrupt state, VMCB 0x068
INTERRUPT_SHADOW = 1 << 0
GUEST_INTERRUPT_MASK = 1 << 1       # the guest's RFLAGS.IF (written on #VMEXIT)

# nested control, VMCB 0x090
NP_ENABLE = 1 << 0
SEV_ENABLE = 1 << 1
SEV_ES_ENABLE = 1 << 2

# virtualization extensions, VMCB 0x0B8
LBR_VIRTUALIZATION_ENABLE = 1 << 0
VIRTUAL_VMLOAD_VMSAVE_ENABLE = 1 << 1

GUEST_INSTRUCTION_COUNT_MASK = 0xF  # byte 0x0D0, bits 3:0 (bytes valid at 0x0D1..)
MAP_ADDRESS_MASK = ~0xFFF           # IOPM/MSRPM_BASE_PA: bits 11:0 are ignored

# EVENTINJ (0x0A8) and EXITINTINFO (0x088) share this format (APM Fig. 15-1, §15.20)
EVENT_VECTOR_MASK = 0xFF
EVENT_TYPE_SHIFT = 8
EVENT_TYPE_MASK = 0x7 << EVENT_TYPE_SHIFT
EVENT_ERROR_VALID = 1 << 11         # EV
EVENT_VALID = 1 << 31               # V
EVENT_ERROR_SHIFT = 32              # error code in bits 63:32


class EventType(IntEnum):
    """TYPE of an EVENTINJ/EXITINTINFO value; 1, 5, 6 and 7 are reserved."""
    INTR = 0
    NMI = 2
    EXCEPTION = 3
    SOFTWARE_INT = 4


# Vectors that are exceptions (APM Table 8-1): not 2 (NMI), not the reserved 9, 15, 20, 22-27, 31.
# [unverified] that VMRUN rejects an injected exception with a reserved vector below 31: the APM
# says "a vector that does not correspond to an exception"; QEMU rejects only 2 and >= 31.
EXCEPTION_VECTORS = frozenset({0, 1, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14, 16, 17, 18, 19, 21,
                               28, 29, 30})


def encode_event(vector: int, kind: EventType, error_code: int | None = None) -> int:
    """A valid EVENTINJ/EXITINTINFO value; EV is set exactly when an error code is given."""
    value = EVENT_VALID | (int(kind) << EVENT_TYPE_SHIFT) | (vector & EVENT_VECTOR_MASK)
    if error_code is not None:
        value |= EVENT_ERROR_VALID | (error_code & 0xFFFF_FFFF) << EVENT_ERROR_SHIFT
    return value


@dataclass(frozen=True)
class EventInfo:
    """An EVENTINJ/EXITINTINFO value taken apart."""
    valid: bool
    kind: int                       # an EventType, or a reserved number
    vector: int
    error_code: int | None          # None when EV is clear

    @staticmethod
    def decode(value: int) -> "EventInfo":
        value = int(value)
        error = value >> EVENT_ERROR_SHIFT & 0xFFFF_FFFF if value & EVENT_ERROR_VALID else None
        return EventInfo(bool(value & EVENT_VALID),
                         (value & EVENT_TYPE_MASK) >> EVENT_TYPE_SHIFT,
                         value & EVENT_VECTOR_MASK, error)


# --- record types -----------------------------------------------------------------------------

# Segment record, 16 bytes (Linux struct vmcb_seg); GDTR and IDTR use only limit and base.
VMCB_SEGMENT = np.dtype({"names": ["selector", "attrib", "limit", "base"],
                         "formats": [U2, U2, U4, U8], "offsets": [0, 2, 4, 8], "itemsize": 16})


# --- control area (APM Table B-1) -------------------------------------------------------------

VMCB_CONTROL = structured([
    ("intercepts", (U4, (INTERCEPT_WORDS,)), 0x000),  # CR, DR, exceptions, words 3-5 (§A.9)
    ("pause_filter_threshold", U2, 0x03C),
    ("pause_filter_count", U2, 0x03E),
    ("iopm_base_pa", U8, 0x040),
    ("msrpm_base_pa", U8, 0x048),
    ("tsc_offset", U8, 0x050),
    ("guest_asid", U4, 0x058),
    ("tlb_control", U1, 0x05C),                 # TlbControl
    ("int_ctl", U4, 0x060),                     # V_TPR .. AVIC_ENABLE
    ("v_intr_vector", U1, 0x064),               # bits 39:32 of the 0x060 quadword
    ("interrupt_state", U4, 0x068),             # INTERRUPT_SHADOW, GUEST_INTERRUPT_MASK
    ("exitcode", "<i8", 0x070),                 # signed: VMEXIT_INVALID reads back as -1
    ("exitinfo1", U8, 0x078),
    ("exitinfo2", U8, 0x080),
    ("exitintinfo", U8, 0x088),
    ("nested_control", U8, 0x090),              # NP_ENABLE, SEV_ENABLE, SEV_ES_ENABLE
    ("avic_apic_bar", U8, 0x098),
    ("ghcb_pa", U8, 0x0A0),
    ("eventinj", U8, 0x0A8),
    ("n_cr3", U8, 0x0B0),
    ("virt_ext", U8, 0x0B8),                    # LBR virtualization, virtual VMLOAD/VMSAVE
    ("vmcb_clean", U4, 0x0C0),
    ("nrip", U8, 0x0C8),
    ("guest_instruction_count", U1, 0x0D0),     # bits 3:0
    ("guest_instruction_bytes", (U1, (15,)), 0x0D1),
    ("avic_backing_page", U8, 0x0E0),
    ("avic_logical_table", U8, 0x0F0),
    ("avic_physical_table", U8, 0x0F8),
    ("vmsa_pa", U8, 0x108),                     # SEV-ES
    ("bus_lock_counter", U2, 0x120),
    ("allowed_sev_features", U8, 0x138),        # SEV-SNP
    ("guest_sev_features", U8, 0x140),          # SEV-SNP
    ("host_reserved", (U1, (32,)), 0x3E0),      # reserved for host software
], CONTROL_AREA_SIZE)

# --- state-save area (APM Table B-2), offsets from the start of the save area ------------------

VMCB_SAVE = structured([
    ("es", VMCB_SEGMENT, 0x000),
    ("cs", VMCB_SEGMENT, 0x010),
    ("ss", VMCB_SEGMENT, 0x020),
    ("ds", VMCB_SEGMENT, 0x030),
    ("fs", VMCB_SEGMENT, 0x040),
    ("gs", VMCB_SEGMENT, 0x050),
    ("gdtr", VMCB_SEGMENT, 0x060),
    ("ldtr", VMCB_SEGMENT, 0x070),
    ("idtr", VMCB_SEGMENT, 0x080),
    ("tr", VMCB_SEGMENT, 0x090),
    ("vmpl", U1, 0x0CA),                        # SEV-SNP
    ("cpl", U1, 0x0CB),
    ("efer", U8, 0x0D0),
    ("cr4", U8, 0x148),
    ("cr3", U8, 0x150),
    ("cr0", U8, 0x158),
    ("dr7", U8, 0x160),
    ("dr6", U8, 0x168),
    ("rflags", U8, 0x170),
    ("rip", U8, 0x178),
    ("rsp", U8, 0x1D8),
    ("s_cet", U8, 0x1E0),
    ("ssp", U8, 0x1E8),
    ("isst_addr", U8, 0x1F0),
    ("rax", U8, 0x1F8),
    ("star", U8, 0x200),
    ("lstar", U8, 0x208),
    ("cstar", U8, 0x210),
    ("sfmask", U8, 0x218),
    ("kernel_gs_base", U8, 0x220),
    ("sysenter_cs", U8, 0x228),
    ("sysenter_esp", U8, 0x230),
    ("sysenter_eip", U8, 0x238),
    ("cr2", U8, 0x240),
    ("g_pat", U8, 0x268),
    ("dbgctl", U8, 0x270),
    ("br_from", U8, 0x278),
    ("br_to", U8, 0x280),
    ("last_excp_from", U8, 0x288),
    ("last_excp_to", U8, 0x290),
    ("spec_ctrl", U8, 0x2E0),
], SAVE_AREA_SIZE)

VMCB = structured([("control", VMCB_CONTROL, 0x000), ("save", VMCB_SAVE, SAVE_AREA_OFFSET)], VMCB_SIZE)

# --- offset tables, as the APM prints them ----------------------------------------------------

CONTROL_OFFSETS: list[tuple[str, int]] = [
    ("intercepts", 0x000),
    ("pause_filter_threshold", 0x03C), ("pause_filter_count", 0x03E),
    ("iopm_base_pa", 0x040), ("msrpm_base_pa", 0x048), ("tsc_offset", 0x050),
    ("guest_asid", 0x058), ("tlb_control", 0x05C),
    ("int_ctl", 0x060), ("v_intr_vector", 0x064), ("interrupt_state", 0x068),
    ("exitcode", 0x070), ("exitinfo1", 0x078), ("exitinfo2", 0x080), ("exitintinfo", 0x088),
    ("nested_control", 0x090), ("avic_apic_bar", 0x098), ("ghcb_pa", 0x0A0),
    ("eventinj", 0x0A8), ("n_cr3", 0x0B0), ("virt_ext", 0x0B8), ("vmcb_clean", 0x0C0),
    ("nrip", 0x0C8), ("guest_instruction_count", 0x0D0), ("guest_instruction_bytes", 0x0D1),
    ("avic_backing_page", 0x0E0), ("avic_logical_table", 0x0F0), ("avic_physical_table", 0x0F8),
    ("vmsa_pa", 0x108), ("bus_lock_counter", 0x120),
    ("allowed_sev_features", 0x138), ("guest_sev_features", 0x140),
    ("host_reserved", 0x3E0),
]

SAVE_OFFSETS: list[tuple[str, int]] = [
    ("es", 0x000), ("cs", 0x010), ("ss", 0x020), ("ds", 0x030), ("fs", 0x040), ("gs", 0x050),
    ("gdtr", 0x060), ("ldtr", 0x070), ("idtr", 0x080), ("tr", 0x090),
    ("vmpl", 0x0CA), ("cpl", 0x0CB), ("efer", 0x0D0),
    ("cr4", 0x148), ("cr3", 0x150), ("cr0", 0x158), ("dr7", 0x160), ("dr6", 0x168),
    ("rflags", 0x170), ("rip", 0x178),
    ("rsp", 0x1D8), ("s_cet", 0x1E0), ("ssp", 0x1E8), ("isst_addr", 0x1F0), ("rax", 0x1F8),
    ("star", 0x200), ("lstar", 0x208), ("cstar", 0x210), ("sfmask", 0x218),
    ("kernel_gs_base", 0x220), ("sysenter_cs", 0x228), ("sysenter_esp", 0x230),
    ("sysenter_eip", 0x238), ("cr2", 0x240),
    ("g_pat", 0x268), ("dbgctl", 0x270), ("br_from", 0x278), ("br_to", 0x280),
    ("last_excp_from", 0x288), ("last_excp_to", 0x290), ("spec_ctrl", 0x2E0),
]

VMCB_OFFSETS: list[tuple[str, int]] = [("control", 0x000), ("save", SAVE_AREA_OFFSET)]


verify_layout(VMCB_CONTROL, CONTROL_OFFSETS, CONTROL_AREA_SIZE)
verify_layout(VMCB_SAVE, SAVE_OFFSETS, SAVE_AREA_SIZE)
verify_layout(VMCB, VMCB_OFFSETS, VMCB_SIZE)


# --- records ----------------------------------------------------------------------------------

def new_vmcb() -> np.void:
    """A zeroed VMCB record; ``rec["control"]`` and ``rec["save"]`` are views into it."""
    return np.zeros(1, dtype=VMCB)[0]


def vmcb_view(buffer) -> np.void:
    """A VMCB record over a writable 4 KiB buffer (bytearray, memoryview, uint8 array):
    field writes land in the buffer, reserved bytes are untouched."""
    array = np.frombuffer(buffer, dtype=np.uint8)
    if array.size != VMCB_SIZE:
        raise ValueError(f"a VMCB is {VMCB_SIZE} bytes, got {array.size}")
    return array.view(VMCB)[0]


def offset_of(path: str, layout: np.dtype = VMCB) -> int:
    """Offset of a field, or of a record member written "save.cs.base", within ``layout``."""
    return field_span(layout, path)[0]


def intercept_vector(control) -> int:
    """The intercept vector as one integer: bit n set = exit code n intercepted (§A.9)."""
    return sum(int(word) << (32 * i) for i, word in enumerate(control["intercepts"]))


def set_intercept_vector(control, vector: int) -> None:
    control["intercepts"] = [(vector >> (32 * i)) & 0xFFFF_FFFF for i in range(INTERCEPT_WORDS)]


def read_segment(record) -> Segment:
    """The segment a VMCB segment record holds (its limit is already byte-granular)."""
    return Segment(int(record["selector"]), int(record["base"]), int(record["limit"]),
                   flags_from_vmcb_attrib(int(record["attrib"])))


def write_segment(record, segment: Segment) -> None:
    record["selector"] = segment.selector & 0xFFFF
    record["attrib"] = vmcb_attrib_from_flags(segment.flags)
    record["limit"] = segment.limit & 0xFFFF_FFFF
    record["base"] = segment.base & 0xFFFF_FFFF_FFFF_FFFF


# --- VMRUN consistency checks (APM §15.5.1, semantics.md §B.5) --------------------------------

_EVENT_TYPES = frozenset(EventType)


@dataclass(frozen=True)
class VmrunCandidate:
    """What the consistency checks read from a VMCB, plus the CPU's capabilities."""
    efer: int
    cr0: int
    cr3: int
    cr4: int
    dr6: int
    dr7: int
    cs_attrib: int
    intercepts: int
    asid: int
    eventinj: int
    nested_control: int
    iopm_base_pa: int
    msrpm_base_pa: int
    long_mode_capable: bool
    max_phys_bits: int
    nested_paging_supported: bool
    cr4_defined: int = CR4_DEFINED

    @staticmethod
    def from_vmcb(save, control, *, long_mode_capable: bool, max_phys_bits: int = 52,
                  nested_paging_supported: bool = False, cr4_defined: int = CR4_DEFINED) -> "VmrunCandidate":
        return VmrunCandidate(
            efer=int(save["efer"]), cr0=int(save["cr0"]), cr3=int(save["cr3"]),
            cr4=int(save["cr4"]), dr6=int(save["dr6"]), dr7=int(save["dr7"]),
            cs_attrib=int(save["cs"]["attrib"]), intercepts=intercept_vector(control),
            asid=int(control["guest_asid"]), eventinj=int(control["eventinj"]),
            nested_control=int(control["nested_control"]),
            iopm_base_pa=int(control["iopm_base_pa"]), msrpm_base_pa=int(control["msrpm_base_pa"]),
            long_mode_capable=long_mode_capable, max_phys_bits=max_phys_bits,
            nested_paging_supported=nested_paging_supported, cr4_defined=cr4_defined)

    def control_refused(self, rules: RuleSet) -> str | None:
        return rules.first_refused(self.cr0, self.cr3, self.cr4, self.efer, self.dr6, self.dr7, self.long_mode_capable,
                                   self.max_phys_bits, flags_from_vmcb_attrib(self.cs_attrib), self.cr4_defined)


# What the CPU reads of each map: the MSRPM's two pages; the IOPM's 65,536 port bits and one
# byte more (an access at port 0xFFFF reaches past bit 65,535), not its third page.
MSRPM_SPAN = 8 * 1024
IOPM_SPAN = 8 * 1024 + 1


def _map_beyond_physical(base: int, span: int, max_phys_bits: int) -> bool:
    # "If the MSR or IOIO intercept table extends to a physical address that is greater than
    # or equal to the maximum supported physical address" (APM §15.5.1), read literally, as
    # kvm-unit-tests' test_msrpm_iopm_bitmap_addrs expects: the end of what the CPU reads,
    # from the page-aligned base.
    end = (base & MAP_ADDRESS_MASK) + span
    return (end >> max_phys_bits) != 0


def _illegal_event_injection(eventinj: int) -> bool:
    """APM §15.20: a reserved TYPE, or TYPE=exception with a vector that is not an exception
    (vector 2 included).  Nothing is checked while V is clear."""
    event = EventInfo.decode(eventinj)
    if not event.valid:
        return False
    if event.kind not in _EVENT_TYPES:
        return True
    return event.kind == EventType.EXCEPTION and event.vector not in EXCEPTION_VECTORS


# The control-state rules VMRUN applies (arch.control), in the APM's order after EFER.SVME.
VMRUN_CONTROL_RULES = ("nw_without_cd", "cr0_high", "cr3_high", "cr4_reserved", "dr6_high", "dr7_high",
                       "efer_reserved", "lme_lma_without_long_mode", "long_paging_without_pae",
                       "long_paging_without_pe", "long_paging_cs_l_and_d")


def _control_rule(name: str) -> tuple[str, Callable[[VmrunCandidate], bool]]:
    rules = RuleSet(name)
    return CONTROL_RULES[name][0], lambda s: s.control_refused(rules) is not None


VMRUN_CHECKS: tuple[tuple[str, Callable[[VmrunCandidate], bool]], ...] = (
    ("EFER.SVME is clear", lambda s: not s.efer & EFER_SVME),
    *(_control_rule(name) for name in VMRUN_CONTROL_RULES),
    ("VMRUN intercept clear", lambda s: not (s.intercepts >> ExitCode.VMRUN) & 1),
    ("MSRPM extends beyond the physical address space",
     lambda s: _map_beyond_physical(s.msrpm_base_pa, MSRPM_SPAN, s.max_phys_bits)),
    ("IOPM extends beyond the physical address space",
     lambda s: _map_beyond_physical(s.iopm_base_pa, IOPM_SPAN, s.max_phys_bits)),
    ("illegal event injection", lambda s: _illegal_event_injection(s.eventinj)),
    ("ASID is zero", lambda s: s.asid == 0),
    # Not in the APM's list; KVM's nested_vmcb_check_controls rejects it.
    ("NP_ENABLE without nested paging",
     lambda s: bool(s.nested_control & NP_ENABLE) and not s.nested_paging_supported),
)
# The APM's list ends with CET checks (S_CET/SSP/ISST_ADDR); they are not modelled here.


def consistency_failure(save, control, *, long_mode_capable: bool, max_phys_bits: int = 52,
                        nested_paging_supported: bool = False, cr4_defined: int = CR4_DEFINED) -> str | None:
    """The reason of the first VMRUN consistency check ``save``/``control`` fail (the caller
    exits with VMEXIT_INVALID), or None.  ``save``/``control`` are records (or views over
    guest memory) of VMCB_SAVE / VMCB_CONTROL."""
    return first_failure(VmrunCandidate.from_vmcb(save, control, long_mode_capable=long_mode_capable,
                                                   max_phys_bits=max_phys_bits,
                                                   nested_paging_supported=nested_paging_supported,
                                                   cr4_defined=cr4_defined))


def first_failure(candidate: VmrunCandidate) -> str | None:
    """The reason of the first check in VMRUN_CHECKS that ``candidate`` fails, or None."""
    for reason, fails in VMRUN_CHECKS:
        if fails(candidate):
            return reason
    return None


__all__ = [
    "VMCB_SIZE", "CONTROL_AREA_SIZE", "SAVE_AREA_OFFSET", "SAVE_AREA_SIZE", "INTERCEPT_WORDS",
    "MSR_VM_CR", "MSR_VM_HSAVE_PA", "VM_CR_R_INIT", "VM_CR_LOCK", "VM_CR_SVMDIS",
    "TlbControl", "V_TPR_MASK", "V_IRQ", "V_GIF", "V_NMI", "V_NMI_MASK", "V_INTR_PRIO_SHIFT",
    "V_INTR_PRIO_MASK", "V_IGN_TPR", "V_INTR_MASKING", "V_GIF_ENABLE", "V_NMI_ENABLE",
    "X2AVIC_ENABLE", "AVIC_ENABLE", "INTERRUPT_SHADOW", "GUEST_INTERRUPT_MASK",
    "NP_ENABLE", "SEV_ENABLE", "SEV_ES_ENABLE", "LBR_VIRTUALIZATION_ENABLE",
    "VIRTUAL_VMLOAD_VMSAVE_ENABLE", "GUEST_INSTRUCTION_COUNT_MASK", "MAP_ADDRESS_MASK",
    "EVENT_VECTOR_MASK", "EVENT_TYPE_SHIFT", "EVENT_TYPE_MASK", "EVENT_ERROR_VALID",
    "EVENT_VALID", "EVENT_ERROR_SHIFT", "EventType", "EXCEPTION_VECTORS", "encode_event",
    "EventInfo",
    "VMCB_SEGMENT", "VMCB_CONTROL", "VMCB_SAVE", "VMCB",
    "CONTROL_OFFSETS", "SAVE_OFFSETS", "VMCB_OFFSETS", "verify_layout",
    "new_vmcb", "vmcb_view", "offset_of", "intercept_vector", "set_intercept_vector",
    "read_segment", "write_segment",
    "VmrunCandidate", "VMRUN_CHECKS", "consistency_failure", "first_failure",
]
