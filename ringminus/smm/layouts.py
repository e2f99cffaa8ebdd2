"""The SMRAM state-save maps KVM and QEMU write on SMI entry and read back on RSM.

Two layouts cover the 512 bytes SMBASE+0xFE00 .. SMBASE+0xFFFF (semantics.md §C.1):

* ``SMRAM_STATE_64`` -- KVM ``struct kvm_smram_state_64`` / APM Table 10-1, revision
  0x0002_0064, used when the guest CPUID has long mode (§C.3);
* ``SMRAM_STATE_32`` -- KVM ``struct kvm_smram_state_32`` (Intel P6 style) / QEMU i386,
  revision 0x0002_0000, used otherwise (§C.4).  Not the APM's legacy Table 10-2 (§F.15).

Both are little-endian numpy structured dtypes with explicit offsets; dtype offset 0 is
SMBASE+0xFE00 (``SAVE_AREA``).  Reserved bytes have no field and stay as they were (zero in a
``new_save_area``).  ``OFFSETS_64``/``OFFSETS_32`` restate every field's offset from SMBASE,
as the tables in semantics.md print them, and ``verify_layout`` checks the dtypes against them
at import time -- the counterpart of KVM's ``CHECK_SMRAM64_OFFSET``/``CHECK_SMRAM32_OFFSET``.

Segment attributes: both emulators keep a descriptor-style "flags" word (§C.5); the 64-bit map
stores it shifted into 16 bits, the 32-bit map stores it unshifted in KVM and shifted in QEMU
(§F.6).  The helpers at the end convert between the flags word and what each map holds.
"""
from __future__ import annotations

import numpy as np

from ..binlayout import U1, U2, U4, U8, structured, verify

# --- constants (semantics.md §C.1, §F.14) ---------------------------------------------------

SAVE_AREA = 0xFE00                  # offset of the state-save map from SMBASE
SAVE_AREA_SIZE = 0x200              # SMBASE+0xFE00 .. SMBASE+0xFFFF
ENTRY_OFFSET = 0x8000               # SMI handler entry point = SMBASE + 0x8000
DEFAULT_SMBASE = 0x30000            # SMBASE after hardware reset

REVISION_64 = 0x00020064            # KVM and QEMU x86_64 (64-bit map)
REVISION_32 = 0x00020000            # KVM without LM, QEMU i386 (32-bit map)
REVISION_IO_RESTART = 1 << 16       # capability bit; KVM/QEMU leave it clear (§F.14)
REVISION_SMBASE_RELOCATION = 1 << 17  # capability bit; QEMU reloads SMBASE only if set (§F.13)

# --- record types ----------------------------------------------------------------------------

# 64-bit map segment record, 16 bytes (KVM struct kvm_smm_seg_state_64).  GDTR and IDTR use
# only the limit (+4) and base (+8) of such a record, so they get plain fields below.
SEGMENT_64 = np.dtype({"names": ["selector", "attributes", "limit", "base"],
                       "formats": ["<u2", "<u2", "<u4", "<u8"],
                       "offsets": [0, 2, 4, 8], "itemsize": 16})

# 32-bit map segment descriptor cache, 12 bytes (KVM struct kvm_smm_seg_state_32); selectors
# are stored separately at FFA8..FFC4.
SEGMENT_CACHE_32 = np.dtype({"names": ["flags", "limit", "base"],
                             "formats": ["<u4", "<u4", "<u4"],
                             "offsets": [0, 4, 8], "itemsize": 12})


def _map(rows: list[tuple[str, object, int]]) -> np.dtype:
    """A 512-byte structured dtype from (name, format, offset within the map) rows."""
    return structured(rows, SAVE_AREA_SIZE)


# --- the 64-bit map (semantics.md §C.3) ------------------------------------------------------
# Offsets here are within the map (0x000 = SMBASE+0xFE00); OFFSETS_64 restates them from SMBASE.

SMRAM_STATE_64 = _map([
    ("es", SEGMENT_64, 0x000),
    ("cs", SEGMENT_64, 0x010),
    ("ss", SEGMENT_64, 0x020),
    ("ds", SEGMENT_64, 0x030),
    ("fs", SEGMENT_64, 0x040),
    ("gs", SEGMENT_64, 0x050),
    ("gdtr_limit", U4, 0x064),                  # KVM writes the GDTR limit as u32
    ("gdtr_base", U8, 0x068),
    ("ldtr", SEGMENT_64, 0x070),
    ("idtr_limit", U4, 0x084),
    ("idtr_base", U8, 0x088),
    ("tr", SEGMENT_64, 0x090),
    # I/O instruction restart: not implemented by KVM/QEMU (§F.14)
    ("io_restart_rip", U8, 0x0A0),
    ("io_restart_rcx", U8, 0x0A8),
    ("io_restart_rsi", U8, 0x0B0),
    ("io_restart_rdi", U8, 0x0B8),
    ("io_restart_dword", U4, 0x0C0),            # APM Fig. 10-6
    ("io_instruction_restart", U1, 0x0C8),
    ("auto_halt_restart", U1, 0x0C9),
    ("nmi_mask", U1, 0x0CA),                    # KVM amd_nmi_mask, unused
    ("interrupt_shadow", U1, 0x0CB),            # KVM-private
    ("efer", U8, 0x0D0),
    ("svm_guest", U8, 0x0D8),                   # KVM: 1 if the SMI arrived in L2 (§C.2 step 2)
    ("svm_guest_vmcb", U8, 0x0E0),              # KVM: vmcb12 GPA
    ("svm_guest_virtual_interrupt", U8, 0x0E8),  # not implemented by KVM
    ("revision", U4, 0x0FC),
    ("smbase", U4, 0x100),                      # relocation slot
    ("ssp", U8, 0x118),                         # newer KVM with shadow stacks
    # SVM host state for an SMI taken in guest context (APM); KVM keeps it elsewhere (§F.19)
    ("svm_guest_pat", U8, 0x120),
    ("svm_host_efer", U8, 0x128),
    ("svm_host_cr4", U8, 0x130),
    ("svm_host_cr3", U8, 0x138),
    ("svm_host_cr0", U8, 0x140),
    # QEMU writes cr4, cr0, dr7, dr6 and rflags as 32-bit values into these slots (§F.11)
    ("cr4", U8, 0x148),
    ("cr3", U8, 0x150),
    ("cr0", U8, 0x158),
    ("dr7", U8, 0x160),
    ("dr6", U8, 0x168),
    ("rflags", U8, 0x170),
    ("rip", U8, 0x178),
    # general registers in reverse order, R15 first
    ("r15", U8, 0x180), ("r14", U8, 0x188), ("r13", U8, 0x190), ("r12", U8, 0x198),
    ("r11", U8, 0x1A0), ("r10", U8, 0x1A8), ("r9", U8, 0x1B0), ("r8", U8, 0x1B8),
    ("rdi", U8, 0x1C0), ("rsi", U8, 0x1C8), ("rbp", U8, 0x1D0), ("rsp", U8, 0x1D8),
    ("rbx", U8, 0x1E0), ("rdx", U8, 0x1E8), ("rcx", U8, 0x1F0), ("rax", U8, 0x1F8),
])

# --- the 32-bit map (semantics.md §C.4) ------------------------------------------------------

SMRAM_STATE_32 = _map([
    # 0x000..0x0F7 reserved
    ("smbase", U4, 0x0F8),                      # relocation slot
    ("revision", U4, 0x0FC),
    ("io_instruction_restart", U2, 0x100),
    ("auto_halt_restart", U2, 0x102),
    ("io_restart_edi", U4, 0x104),
    ("io_restart_ecx", U4, 0x108),
    ("io_restart_esi", U4, 0x10C),
    ("io_restart_eip", U4, 0x110),
    ("cr4", U4, 0x114),
    ("interrupt_shadow", U1, 0x11A),            # KVM-private
    ("ds_cache", SEGMENT_CACHE_32, 0x12C),
    ("fs_cache", SEGMENT_CACHE_32, 0x138),
    ("gs_cache", SEGMENT_CACHE_32, 0x144),
    ("idtr_limit", U4, 0x154),                  # IDTR record at FF50 uses limit and base only
    ("idtr_base", U4, 0x158),
    ("tr_cache", SEGMENT_CACHE_32, 0x15C),
    ("gdtr_limit", U4, 0x170),                  # GDTR record at FF6C uses limit and base only
    ("gdtr_base", U4, 0x174),
    ("ldtr_cache", SEGMENT_CACHE_32, 0x178),
    ("es_cache", SEGMENT_CACHE_32, 0x184),
    ("cs_cache", SEGMENT_CACHE_32, 0x190),
    ("ss_cache", SEGMENT_CACHE_32, 0x19C),
    ("es_selector", U4, 0x1A8),
    ("cs_selector", U4, 0x1AC),
    ("ss_selector", U4, 0x1B0),
    ("ds_selector", U4, 0x1B4),
    ("fs_selector", U4, 0x1B8),
    ("gs_selector", U4, 0x1BC),
    ("ldtr_selector", U4, 0x1C0),
    ("tr_selector", U4, 0x1C4),
    ("dr7", U4, 0x1C8),
    ("dr6", U4, 0x1CC),
    # general registers in the natural order EAX, ECX, EDX, EBX, ESP, EBP, ESI, EDI
    ("eax", U4, 0x1D0), ("ecx", U4, 0x1D4), ("edx", U4, 0x1D8), ("ebx", U4, 0x1DC),
    ("esp", U4, 0x1E0), ("ebp", U4, 0x1E4), ("esi", U4, 0x1E8), ("edi", U4, 0x1EC),
    ("eip", U4, 0x1F0),
    ("eflags", U4, 0x1F4),
    ("cr3", U4, 0x1F8),
    ("cr0", U4, 0x1FC),
])

# --- offset tables, from SMBASE, as semantics.md §C.3/§C.4 print them ------------------------

OFFSETS_64: list[tuple[str, int]] = [
    ("es", 0xFE00), ("cs", 0xFE10), ("ss", 0xFE20), ("ds", 0xFE30), ("fs", 0xFE40),
    ("gs", 0xFE50),
    ("gdtr_limit", 0xFE64), ("gdtr_base", 0xFE68),
    ("ldtr", 0xFE70),
    ("idtr_limit", 0xFE84), ("idtr_base", 0xFE88),
    ("tr", 0xFE90),
    ("io_restart_rip", 0xFEA0), ("io_restart_rcx", 0xFEA8), ("io_restart_rsi", 0xFEB0),
    ("io_restart_rdi", 0xFEB8), ("io_restart_dword", 0xFEC0),
    ("io_instruction_restart", 0xFEC8), ("auto_halt_restart", 0xFEC9),
    ("nmi_mask", 0xFECA), ("interrupt_shadow", 0xFECB),
    ("efer", 0xFED0),
    ("svm_guest", 0xFED8), ("svm_guest_vmcb", 0xFEE0), ("svm_guest_virtual_interrupt", 0xFEE8),
    ("revision", 0xFEFC), ("smbase", 0xFF00),
    ("ssp", 0xFF18),
    ("svm_guest_pat", 0xFF20), ("svm_host_efer", 0xFF28), ("svm_host_cr4", 0xFF30),
    ("svm_host_cr3", 0xFF38), ("svm_host_cr0", 0xFF40),
    ("cr4", 0xFF48), ("cr3", 0xFF50), ("cr0", 0xFF58), ("dr7", 0xFF60), ("dr6", 0xFF68),
    ("rflags", 0xFF70), ("rip", 0xFF78),
    ("r15", 0xFF80), ("r14", 0xFF88), ("r13", 0xFF90), ("r12", 0xFF98),
    ("r11", 0xFFA0), ("r10", 0xFFA8), ("r9", 0xFFB0), ("r8", 0xFFB8),
    ("rdi", 0xFFC0), ("rsi", 0xFFC8), ("rbp", 0xFFD0), ("rsp", 0xFFD8),
    ("rbx", 0xFFE0), ("rdx", 0xFFE8), ("rcx", 0xFFF0), ("rax", 0xFFF8),
]

OFFSETS_32: list[tuple[str, int]] = [
    ("smbase", 0xFEF8), ("revision", 0xFEFC),
    ("io_instruction_restart", 0xFF00), ("auto_halt_restart", 0xFF02),
    ("io_restart_edi", 0xFF04), ("io_restart_ecx", 0xFF08), ("io_restart_esi", 0xFF0C),
    ("io_restart_eip", 0xFF10),
    ("cr4", 0xFF14),
    ("interrupt_shadow", 0xFF1A),
    ("ds_cache", 0xFF2C), ("fs_cache", 0xFF38), ("gs_cache", 0xFF44),
    ("idtr_limit", 0xFF54), ("idtr_base", 0xFF58),
    ("tr_cache", 0xFF5C),
    ("gdtr_limit", 0xFF70), ("gdtr_base", 0xFF74),
    ("ldtr_cache", 0xFF78), ("es_cache", 0xFF84), ("cs_cache", 0xFF90), ("ss_cache", 0xFF9C),
    ("es_selector", 0xFFA8), ("cs_selector", 0xFFAC), ("ss_selector", 0xFFB0),
    ("ds_selector", 0xFFB4), ("fs_selector", 0xFFB8), ("gs_selector", 0xFFBC),
    ("ldtr_selector", 0xFFC0), ("tr_selector", 0xFFC4),
    ("dr7", 0xFFC8), ("dr6", 0xFFCC),
    ("eax", 0xFFD0), ("ecx", 0xFFD4), ("edx", 0xFFD8), ("ebx", 0xFFDC),
    ("esp", 0xFFE0), ("ebp", 0xFFE4), ("esi", 0xFFE8), ("edi", 0xFFEC),
    ("eip", 0xFFF0), ("eflags", 0xFFF4), ("cr3", 0xFFF8), ("cr0", 0xFFFC),
]


def verify_layout(layout: np.dtype, offsets: list[tuple[str, int]]) -> None:
    """Check a map dtype against its offset table (offsets from SMBASE); AssertionError
    names the first field at fault (binlayout.verify)."""
    verify(layout, offsets, SAVE_AREA_SIZE, origin=SAVE_AREA, label="SMBASE+")


verify_layout(SMRAM_STATE_64, OFFSETS_64)
verify_layout(SMRAM_STATE_32, OFFSETS_32)


# --- records ---------------------------------------------------------------------------------

def layout_for(long_mode: bool) -> np.dtype:
    """The map KVM uses: 64-bit if the guest CPUID has LM, else 32-bit (§C.2 step 1)."""
    return SMRAM_STATE_64 if long_mode else SMRAM_STATE_32


def revision_for(layout: np.dtype) -> int:
    """The revision identifier KVM/QEMU store with this map (§F.14)."""
    return REVISION_64 if layout == SMRAM_STATE_64 else REVISION_32


def offset_of(layout: np.dtype, path: str) -> int:
    """Offset from SMBASE of a field, or of a record member written "cs.base"."""
    offset, dtype = SAVE_AREA, layout
    for part in path.split("."):
        if dtype.fields is None or part not in dtype.fields:
            raise KeyError(path)
        dtype, at = dtype.fields[part][:2]
        offset += at
    return offset


def new_save_area(layout: np.dtype) -> np.void:
    """A zeroed 512-byte record; fields are read and written by name (rec["cs"]["base"] = 0)."""
    return np.zeros(1, dtype=layout)[0]


def to_bytes(record: np.void) -> bytes:
    """The 512 bytes to write at SMBASE+0xFE00."""
    return record.tobytes()


def from_bytes(data: bytes | bytearray | memoryview, layout: np.dtype) -> np.void:
    """A writable copy of the 512 bytes read from SMBASE+0xFE00, as a record of ``layout``."""
    if len(data) != layout.itemsize:
        raise ValueError(f"save area is {layout.itemsize} bytes, got {len(data)}")
    # over a private bytearray, not .copy(): numpy's structured copy skips reserved (gap) bytes
    return np.frombuffer(bytearray(data), dtype=layout)[0]


__all__ = [
    "SAVE_AREA", "SAVE_AREA_SIZE", "ENTRY_OFFSET", "DEFAULT_SMBASE",
    "REVISION_64", "REVISION_32", "REVISION_IO_RESTART", "REVISION_SMBASE_RELOCATION",
    "SEGMENT_64", "SEGMENT_CACHE_32", "SMRAM_STATE_64", "SMRAM_STATE_32",
    "OFFSETS_64", "OFFSETS_32", "verify_layout",
    "layout_for", "revision_for", "offset_of", "new_save_area", "to_bytes", "from_bytes",
]
