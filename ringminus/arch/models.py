"""The CPU models ringminus offers: QEMU's ``qemu64`` and ``qemu32`` (target/i386/cpu.c,
``builtin_x86_defs``) — vendor, leaves, signature and feature bits, minus what Unicorn cannot
provide (the local APIC: there is none).  Unicorn runs its own copy of the same model, so
an instruction the model lacks (RDTSCP, MONITOR, POPCNT on qemu64) is #UD in the
translated code itself, as under QEMU.  svm/cpuid.py turns a model into CPUID answers."""
from __future__ import annotations

from dataclasses import dataclass

from unicorn.x86_const import UC_CPU_X86_QEMU32, UC_CPU_X86_QEMU64

from .control import CR4_ARCHITECTURAL, CR4_OSXSAVE, CR4_SMXE, CR4_VMXE


# Fn0000_0001 EDX: QEMU's PPRO_FEATURES without APIC (bit 9), then qemu64's additions.
FPU, DE, PSE, TSC, MSR, PAE, MCE, CX8, SEP, MTRR, PGE, MCA, CMOV, PAT, PSE36, CLFLUSH, MMX, FXSR, SSE, SSE2 = (
    1 << b for b in (0, 2, 3, 4, 5, 6, 7, 8, 11, 12, 13, 14, 15, 16, 17, 19, 23, 24, 25, 26))
PPRO = FPU | DE | PSE | TSC | MSR | MCE | CX8 | PGE | CMOV | PAT | FXSR | MMX | SSE | SSE2 | PAE | SEP
SSE3, VMX, SMX, CX16, XSAVE = 1 << 0, 1 << 5, 1 << 6, 1 << 13, 1 << 26      # Fn0000_0001 ECX
SYSCALL, NX, LM = 1 << 11, 1 << 20, 1 << 29                    # Fn8000_0001 EDX
LAHF_LM, SVM, SKINIT = 1 << 0, 1 << 2, 1 << 12                 # Fn8000_0001 ECX
AMD_ALIASES = 0x0183F3FF      # Fn0000_0001 EDX bits AMD repeats in Fn8000_0001 EDX (QEMU)
BRAND = b"QEMU Virtual CPU version 2.5+"

# The CR4 bits a Fn0000_0001 ECX feature brings (KVM's __cr4_reserved_bits, QEMU's
# cr4_reserved_bits): without the feature, MOV to CR4, VMRUN and RSM refuse the bit.
CR4_BY_FEATURE = ((CR4_VMXE, VMX), (CR4_SMXE, SMX), (CR4_OSXSAVE, XSAVE))


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
    unicorn_model: int          # Unicorn's own model of the same name: its decoder #UDs alike

    @property
    def cr4_defined(self) -> int:
        return CR4_ARCHITECTURAL | sum(bit for bit, feature in CR4_BY_FEATURE if self.ecx & feature)


MODELS = {m.name: m for m in (
    CpuModel("qemu64", b"AuthenticAMD", 0xD, 0x8000_000A, 0x0006_0FB1,
             PPRO | MTRR | CLFLUSH | MCA | PSE36, SSE3 | CX16, LM | SYSCALL | NX, LAHF_LM | SVM, 0x3028,
             UC_CPU_X86_QEMU64),
    CpuModel("qemu32", b"GenuineIntel", 0x4, 0x8000_0004, 0x0000_0663, PPRO, SSE3, 0, 0, 0, UC_CPU_X86_QEMU32),
)}


def max_physical_bits(model_name: str) -> int:
    """MAXPHYADDR: Fn8000_0008 EAX[7:0], or 36 without that leaf (PAE)."""
    return MODELS[model_name].address_bits & 0xFF or 36
