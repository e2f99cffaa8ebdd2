"""CPUID as the guest sees it: QEMU's ``qemu64`` / ``qemu32`` models (target/i386/cpu.c,
``builtin_x86_defs``), with the SVM leaf describing what ringminus implements.

Unicorn's own CPUID is a Haswell (GenuineIntel, no SVM); ringminus answers every CPUID from
this table instead (a UC_HOOK_INSN hook, no cost until CPUID runs).  Feature bits are QEMU's
for the model, minus what Unicorn cannot provide (the local APIC: there is none).  Leaves not
listed up to the model's maximum read as zeros, as do leaves above it.

SVM (APM Vol. 3 CPUID Fn8000_0001_ECX[SVM], Fn8000_000A): revision 1, 16 ASIDs (QEMU's
value), NRIPS always, decode assists when the profile has them (§F.9), SKINIT when the profile
executes it (§F.5).  Nested paging is not advertised: VMRUN with NP_ENABLE fails (§B.5).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from ..intercepts.profiles import Profile

# Fn0000_0001 EDX: QEMU's PPRO_FEATURES without APIC (bit 9), then qemu64's additions.
FPU, DE, PSE, TSC, MSR, PAE, MCE, CX8, SEP, MTRR, PGE, MCA, CMOV, PAT, PSE36, CLFLUSH, MMX, FXSR, SSE, SSE2 = (
    1 << b for b in (0, 2, 3, 4, 5, 6, 7, 8, 11, 12, 13, 14, 15, 16, 17, 19, 23, 24, 25, 26))
PPRO = FPU | DE | PSE | TSC | MSR | MCE | CX8 | PGE | CMOV | PAT | FXSR | MMX | SSE | SSE2 | PAE | SEP
SSE3, CX16 = 1 << 0, 1 << 13                                   # Fn0000_0001 ECX
SYSCALL, NX, LM = 1 << 11, 1 << 20, 1 << 29                    # Fn8000_0001 EDX
LAHF_LM, SVM, SKINIT = 1 << 0, 1 << 2, 1 << 12                 # Fn8000_0001 ECX
AMD_ALIASES = 0x0183F3FF      # Fn0000_0001 EDX bits AMD repeats in Fn8000_0001 EDX (QEMU)
# Fn8000_000A EDX
NP, LBRV, SVML, NRIPS, TSC_RATE, VMCB_CLEAN, FLUSH_BY_ASID, DECODE_ASSISTS = (1 << b for b in range(8))
SVM_REVISION = 1
SVM_ASIDS = 16
LEAF_SVM = 0x8000_000A
BRAND = b"QEMU Virtual CPU version 2.5+"


@dataclass(frozen=True)
class CpuModel:
    name: str
    vendor: bytes
    level: int                  # highest basic leaf
    xlevel: int                 # highest extended leaf
    signature: int              # Fn0000_0001 EAX (family/model/stepping)
    edx: int
    ecx: int
    ext_edx: int
    ext_ecx: int
    address_bits: int           # Fn8000_0008 EAX: virtual << 8 | physical (0: no such leaf)


MODELS = {m.name: m for m in (
    CpuModel("qemu64", b"AuthenticAMD", 0xD, 0x8000_000A, 0x0006_0FB1,
             PPRO | MTRR | CLFLUSH | MCA | PSE36, SSE3 | CX16, LM | SYSCALL | NX, LAHF_LM | SVM, 0x3028),
    CpuModel("qemu32", b"GenuineIntel", 0x4, 0x8000_0004, 0x0000_0663, PPRO, SSE3, 0, 0, 0),
)}


def _vendor_registers(vendor: bytes) -> tuple[int, int, int]:
    """EBX, EDX, ECX spell the vendor in that order."""
    ebx, edx, ecx = struct.unpack("<3I", vendor)
    return ebx, ecx, edx


def svm_features(profile: Profile) -> int:
    return NRIPS | (DECODE_ASSISTS if profile.decode_assists else 0)


def cpuid_table(model: CpuModel, profile: Profile) -> dict[int, tuple[int, int, int, int]]:
    """leaf -> (EAX, EBX, ECX, EDX).  No leaf here has subleaves."""
    ebx, ecx, edx = _vendor_registers(model.vendor)
    table = {0: (model.level, ebx, ecx, edx),
             1: (model.signature, 8 << 8, model.ecx, model.edx),      # CLFLUSH size 8 qwords
             0x8000_0000: (model.xlevel, ebx, ecx, edx)}
    amd = model.vendor == b"AuthenticAMD"
    ext_ecx = model.ext_ecx | (SKINIT if model.ext_ecx & SVM and profile.skinit else 0)
    table[0x8000_0001] = (model.signature if amd else 0, 0, ext_ecx,
                          model.ext_edx | (model.edx & AMD_ALIASES if amd else 0))
    brand = struct.unpack("<12I", BRAND.ljust(48, b"\0"))
    for i in range(3):
        table[0x8000_0002 + i] = brand[4 * i:4 * i + 4]
    if model.address_bits:
        table[0x8000_0008] = (model.address_bits, 0, 0, 0)
    if model.ext_ecx & SVM:
        table[LEAF_SVM] = (SVM_REVISION, SVM_ASIDS, 0, svm_features(profile))
    return {leaf: values for leaf, values in table.items()
            if leaf <= model.level or 0x8000_0000 <= leaf <= model.xlevel}


def advertises_svm(model_name: str) -> bool:
    return bool(MODELS[model_name].ext_ecx & SVM)


def max_physical_bits(model_name: str) -> int:
    """MAXPHYADDR: Fn8000_0008 EAX[7:0], or 36 without that leaf (PAE)."""
    return MODELS[model_name].address_bits & 0xFF or 36
