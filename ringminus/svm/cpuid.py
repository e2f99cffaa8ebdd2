"""CPUID as the guest sees it: QEMU's ``qemu64`` / ``qemu32`` models (target/i386/cpu.c,
``builtin_x86_defs``), with the SVM leaf describing what ringminus implements.

Unicorn's own CPUID is a Haswell (GenuineIntel, no SVM); ringminus answers every CPUID from
this table instead (a UC_HOOK_INSN hook, no cost until CPUID runs).  Feature bits are QEMU's
for the model, minus what Unicorn cannot provide (the local APIC: there is none).  Leaves not
listed up to the model's maximum read as zeros, as do leaves above it.

SVM (APM Vol. 3 CPUID Fn8000_0001_ECX[SVM], Fn8000_000A): revision 1, 16 ASIDs (QEMU's
value), NRIPS always, decode assists when the profile has them (§F.9), nested paging, LBR
virtualization and VGIF on max (elsewhere VMRUN with NP_ENABLE fails, §B.5), SKINIT when the profile executes it (§F.5).
"""
from __future__ import annotations

import struct

from ..arch.models import BRAND, MODELS, SKINIT, SVM, CpuModel
from ..intercepts.profiles import Profile

# Fn8000_000A EDX
SVML, NRIPS, TSC_RATE, VMCB_CLEAN, FLUSH_BY_ASID, DECODE_ASSISTS = (1 << b for b in range(2, 8))
SVM_REVISION = 1
SVM_ASIDS = 16
LEAF_SVM = 0x8000_000A


# QEMU's AMD cache descriptions (cpu.c: L1 64 KiB 2-way, L2 512 KiB 16-way, L3 none).
AMD_CACHES = {0x8000_0005: (0x01FF01FF, 0x01FF01FF, 0x40020140, 0x40020140),
              0x8000_0006: (0, 0x42004200, 0x02008140, 0x00808140)}


def _vendor_registers(vendor: bytes) -> tuple[int, int, int]:
    """EBX, EDX, ECX spell the vendor in that order."""
    ebx, edx, ecx = struct.unpack("<3I", vendor)
    return ebx, ecx, edx


def svm_features(profile: Profile, model: CpuModel) -> int:
    return NRIPS | (DECODE_ASSISTS if profile.decode_assists else 0) | model.svm_edx


def cpuid_table(model: CpuModel, profile: Profile) -> dict[int, tuple[int, int, int, int]]:
    """leaf -> (EAX, EBX, ECX, EDX), or {subleaf: (…)} for leaf 0xB."""
    ebx, ecx, edx = _vendor_registers(model.vendor)
    table = {0: (model.level, ebx, ecx, edx),
             1: (model.signature, 8 << 8, model.ecx, model.edx),      # CLFLUSH size 8 qwords
             0x8000_0000: (model.xlevel, ebx, ecx, edx)}
    amd = model.vendor == b"AuthenticAMD"
    ext_ecx = model.ext_ecx | (SKINIT if model.ext_ecx & SVM and profile.skinit else 0)
    table[0x8000_0001] = (model.signature if amd else 0, 0, ext_ecx, model.extended_edx)
    brand = struct.unpack("<12I", BRAND.ljust(48, b"\0"))
    for i in range(3):
        table[0x8000_0002 + i] = brand[4 * i:4 * i + 4]
    if model.level >= 7:
        table[7] = {0: (0, model.leaf7_ebx, 0, 0), None: (0, 0, 0, 0)}
    if model.level >= 0xB:                  # topology: one thread of one core, APIC ID 0
        table[0xB] = {0: (0, 1, 0x100, 0), 1: (0, 1, 0x201, 0), None: (0, 0, 0, 0)}
    if amd and model.xlevel >= 0x8000_0006:
        table.update(AMD_CACHES)
    if model.address_bits:
        table[0x8000_0008] = (model.address_bits, 0, 0, 0)
    if model.ext_ecx & SVM:
        table[LEAF_SVM] = (SVM_REVISION, SVM_ASIDS, 0, svm_features(profile, model))
    return {leaf: values for leaf, values in table.items()
            if leaf <= model.level or 0x8000_0000 <= leaf <= model.xlevel}


def advertises_svm(model_name: str) -> bool:
    return bool(MODELS[model_name].ext_ecx & SVM)


