"""The MSRs the CPU has.  Unicorn's QEMU implements ``NATIVE_MSRS`` in ``helper_rdmsr``/
``helper_wrmsr`` (target/i386/misc_helper.c) and answers any other with 0, dropping writes;
ringminus keeps some more (EFER, the SVM MSRs, the TSC, DEBUGCTL and the last-branch MSRs,
the local APIC's base).
KVM on AMD also has ``ZERO_MSRS`` (x86.c kvm_get_msr_common, svm.c svm_get_msr): on these
CPU models they read 0 and ignore writes, which is Unicorn's answer too.  Any other MSR
does not exist: RDMSR/WRMSR of it raises #GP(0) on hardware and under KVM."""
from __future__ import annotations

MSR_TSC = 0x10
MSR_TSC_AUX = 0xC000_0103
MSR_TSC_ADJUST = 0x3B
MSR_PAT = 0x277
MTRR_VARIABLE = range(0x200, 0x210)                      # PHYSBASE0..PHYSMASK7
MTRR_FIXED = (0x250, 0x258, 0x259, *range(0x268, 0x270))
MACHINE_CHECK_BANKS = range(0x400, 0x400 + 4 * 10)       # QEMU's MCE_BANKS_DEF banks of 4

NATIVE_MSRS = frozenset({
    0x1B,                                                # APIC_BASE
    0x34,                                                # SMI_COUNT
    0x8B,                                                # UCODE_REV
    0xFE,                                                # MTRRcap
    0x174, 0x175, 0x176,                                 # SYSENTER_CS/ESP/EIP
    0x179, 0x17A, 0x17B,                                 # MCG_CAP/STATUS/CTL
    0x198,                                               # PERF_STATUS
    0x1A0,                                               # MISC_ENABLE
    *MTRR_VARIABLE, *MTRR_FIXED, MSR_PAT, 0x2FF,         # MTRRs, PAT, MTRRdefType
    *MACHINE_CHECK_BANKS,
    0xD90,                                               # BNDCFGS
    0xC000_0080, 0xC000_0081, 0xC000_0082, 0xC000_0083, 0xC000_0084,   # EFER STAR LSTAR CSTAR FMASK
    0xC000_0100, 0xC000_0101, 0xC000_0102, 0xC000_0103,  # FS/GS/KERNEL_GS base, TSC_AUX
    0xC001_0117,                                         # VM_HSAVE_PA
})

ZERO_MSRS = frozenset({
    0x17, 0x2A, 0x11E, 0x199, 0x1FC,                     # PLATFORM_ID EBL_CR_POWERON BBL_CR_CTL3 PERF_CTL POWER_CTL
    0xC1, 0xC2, 0x186, 0x187,                            # P6 PERFCTR0/1, EVNTSEL0/1 (no vPMU)
    *range(0xC001_0000, 0xC001_0008),                    # K7 EVNTSEL0-3, PERFCTR0-3
    *range(0xC001_0200, 0xC001_020C),                    # F15h PERF_CTL/CTR 0-5
    0xC001_0010, 0xC001_0015, 0xC001_001B, 0xC001_001F,  # SYSCFG HWCR CLK_CTL NB_CFG
    0xC001_0055, 0xC001_0058,                            # INT_PENDING_MSG, MMIO_CONF_BASE
    0xC001_0112, 0xC001_0113, 0xC001_0115,               # TSEG_ADDR TSEG_MASK VM_IGNNE
    0xC001_1022, 0xC001_1023, 0xC001_1029, 0xC001_102A, 0xC001_102C,   # DC_CFG TW_CFG DECFG BU_CFG2 EX_CFG
})
EXISTING_MSRS = NATIVE_MSRS | ZERO_MSRS
