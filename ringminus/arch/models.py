"""The CPU models ringminus offers: QEMU's ``qemu64`` and ``qemu32`` (target/i386/cpu.c,
``builtin_x86_defs``) — vendor, leaves, signature and feature bits, minus what Unicorn cannot
provide (the local APIC: there is none) — and ``max``, every feature ringminus stands
behind: what Unicorn's TCG executes of its EPYC-Rome model, less MONITOR/MWAIT, XSAVE (no
leaf 0Dh state), 1 GiB pages and AltMovCr8.  Unicorn's CPU is given the model's feature
words (``unicorn_words``), so an instruction the model lacks (RDTSCP, MONITOR, POPCNT on
qemu64) is #UD in the translated code itself, as under QEMU; what QEMU's helpers accept
(CR4 bits, 1 GiB pages) follows the same words.  svm/cpuid.py turns a model into CPUID."""
from __future__ import annotations

from dataclasses import dataclass

from unicorn.x86_const import UC_CPU_X86_EPYC_ROME, UC_CPU_X86_QEMU32, UC_CPU_X86_QEMU64

from .control import CR4_ARCHITECTURAL, CR4_FSGSBASE, CR4_OSXSAVE, CR4_SMAP, CR4_SMEP, CR4_SMXE, CR4_VMXE


# Fn0000_0001 EDX: QEMU's PPRO_FEATURES without APIC (bit 9), then qemu64's additions.
FPU, DE, PSE, TSC, MSR, PAE, MCE, CX8, SEP, MTRR, PGE, MCA, CMOV, PAT, PSE36, CLFLUSH, MMX, FXSR, SSE, SSE2 = (
    1 << b for b in (0, 2, 3, 4, 5, 6, 7, 8, 11, 12, 13, 14, 15, 16, 17, 19, 23, 24, 25, 26))
PPRO = FPU | DE | PSE | TSC | MSR | MCE | CX8 | PGE | CMOV | PAT | FXSR | MMX | SSE | SSE2 | PAE | SEP
SSE3, PCLMULQDQ, VMX, SMX, SSSE3, CX16, SSE41, SSE42, MOVBE, POPCNT, AES, XSAVE, RDRAND = (
    1 << b for b in (0, 1, 5, 6, 9, 13, 19, 20, 22, 23, 25, 26, 30))          # Fn0000_0001 ECX
FSGSBASE, TSC_ADJUST, BMI1, SMEP, BMI2, ADX, SMAP, CLFLUSHOPT, CLWB = (
    1 << b for b in (0, 1, 3, 7, 8, 19, 20, 23, 24))                          # Fn0000_0007 EBX
SYSCALL, NX, MMXEXT, RDTSCP, LM = 1 << 11, 1 << 20, 1 << 22, 1 << 27, 1 << 29   # Fn8000_0001 EDX
LAHF_LM, SVM, ABM, SSE4A, SKINIT = 1 << 0, 1 << 2, 1 << 5, 1 << 6, 1 << 12      # Fn8000_0001 ECX
NESTED_PAGING, LBR_VIRTUALIZATION, PAUSE_FILTER, PAUSE_FILTER_THRESHOLD, VGIF, VNMI = (
    1 << b for b in (0, 1, 10, 12, 16, 25))                                     # Fn8000_000A EDX
AMD_ALIASES = 0x0183F3FF      # Fn0000_0001 EDX bits AMD repeats in Fn8000_0001 EDX (QEMU)
BRAND = b"QEMU Virtual CPU version 2.5+"

# The CR4 bits a feature brings (KVM's __cr4_reserved_bits, QEMU's cr4_reserved_bits):
# without the feature, MOV to CR4, VMRUN and RSM refuse the bit.
CR4_BY_FEATURE = (("ecx", VMX, CR4_VMXE), ("ecx", SMX, CR4_SMXE), ("ecx", XSAVE, CR4_OSXSAVE),
                  ("leaf7_ebx", FSGSBASE, CR4_FSGSBASE), ("leaf7_ebx", SMEP, CR4_SMEP), ("leaf7_ebx", SMAP, CR4_SMAP))


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
    unicorn_model: int          # Unicorn's model to start from (then given unicorn_words)
    leaf7_ebx: int = 0          # Fn0000_0007 EBX (subleaf 0)
    svm_edx: int = 0            # Fn8000_000A EDX features beyond every SVM model's (svm/cpuid.py)

    @property
    def cr4_defined(self) -> int:
        return CR4_ARCHITECTURAL | sum(bit for word, feature, bit in CR4_BY_FEATURE if getattr(self, word) & feature)

    @property
    def extended_edx(self) -> int:
        """Fn8000_0001 EDX: AMD repeats Fn0000_0001 EDX bits there."""
        return self.ext_edx | (self.edx & AMD_ALIASES if self.vendor == b"AuthenticAMD" else 0)

    def unicorn_words(self) -> dict[str, int]:
        """The feature words Unicorn's CPU gets (emulator/ucinternals.FEATURE_WORD): the
        model's, without SKINIT — with it QEMU would run STGI natively while EFER.SVME is
        clear, and ringminus executes every SVM instruction itself."""
        return {"1_edx": self.edx, "1_ecx": self.ecx, "7_0_ebx": self.leaf7_ebx, "7_0_ecx": 0,
                "8000_0001_edx": self.extended_edx, "8000_0001_ecx": self.ext_ecx & ~SKINIT}


MODELS = {m.name: m for m in (
    CpuModel("qemu64", b"AuthenticAMD", 0xD, 0x8000_000A, 0x0006_0FB1,
             PPRO | MTRR | CLFLUSH | MCA | PSE36, SSE3 | CX16, LM | SYSCALL | NX, LAHF_LM | SVM, 0x3028,
             UC_CPU_X86_QEMU64),
    CpuModel("qemu32", b"GenuineIntel", 0x4, 0x8000_0004, 0x0000_0663, PPRO, SSE3, 0, 0, 0, UC_CPU_X86_QEMU32),
    # QEMU's TCG "max" is AuthenticAMD family 6 model 6 stepping 3 (target/i386/cpu.c max_x86_cpu_initfn).
    CpuModel("max", b"AuthenticAMD", 0xD, 0x8000_000A, 0x0000_0663, PPRO | MTRR | CLFLUSH | MCA | PSE36,
             SSE3 | PCLMULQDQ | SSSE3 | CX16 | SSE41 | SSE42 | MOVBE | POPCNT | AES | RDRAND,
             LM | SYSCALL | NX | MMXEXT | RDTSCP, LAHF_LM | SVM | ABM | SSE4A, 0x3028, UC_CPU_X86_EPYC_ROME,
             leaf7_ebx=FSGSBASE | TSC_ADJUST | BMI1 | SMEP | BMI2 | ADX | SMAP | CLFLUSHOPT | CLWB,
             svm_edx=NESTED_PAGING | LBR_VIRTUALIZATION | PAUSE_FILTER | PAUSE_FILTER_THRESHOLD | VGIF | VNMI),
)}


def max_physical_bits(model_name: str) -> int:
    """MAXPHYADDR: Fn8000_0008 EAX[7:0], or 36 without that leaf (PAE)."""
    return MODELS[model_name].address_bits & 0xFF or 36
