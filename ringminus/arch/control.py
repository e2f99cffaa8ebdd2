"""Control registers, EFER, RFLAGS and the debug registers: their bits, the bits each may
hold, and the one table of control-state rules the architecture enforces.  MOV to CR,
VMRUN's consistency checks (APM §15.5.1) and RSM's checks (KVM's, semantics.md §C.6) all
read ``CONTROL_RULES``; each names the rules it applies, in its own order."""
from __future__ import annotations

from typing import Callable, NamedTuple

MSR_EFER = 0xC000_0080
EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11
EFER_SVME = 1 << 12
# What KVM's EFER/CR4 writes accept (RSM's and VMRUN's checks): LMSLE and FFXSR included,
# no LA57 on these CPU models.
EFER_DEFINED = EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE | EFER_SVME | (1 << 14) | (1 << 15)
CR4_DEFINED = 0x003F_7FFF & ~(1 << 12)
MAX_PHYSICAL_BITS = 52

CR0_PE = 1 << 0
CR0_EM, CR0_TS, CR0_NW, CR0_CD = 1 << 2, 1 << 3, 1 << 29, 1 << 30
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_TSD, CR4_DE, CR4_PSE, CR4_PAE = 1 << 2, 1 << 3, 1 << 4, 1 << 5
CR4_PGE, CR4_PCE, CR4_UMIP = 1 << 7, 1 << 8, 1 << 11
CR4_LA57, CR4_PCIDE, CR4_SMEP, CR4_SMAP, CR4_PKE = 1 << 12, 1 << 17, 1 << 20, 1 << 21, 1 << 22
TRANSLATION_CR4_BITS = CR4_PSE | CR4_PAE | CR4_PGE | CR4_LA57 | CR4_PCIDE | CR4_SMEP | CR4_SMAP | CR4_PKE
# A CR4 write that changes one of these flushes QEMU's TLB itself (cpu_x86_update_cr4).
CR4_FLUSHES_TLB = CR4_PGE | CR4_PAE | CR4_PSE | CR4_SMEP | CR4_SMAP | CR4_LA57

RFLAGS_TF = 1 << 8
RFLAGS_IF = 1 << 9
RFLAGS_NT = 1 << 14
RFLAGS_RF = 1 << 16
RFLAGS_VM = 1 << 17
RFLAGS_AC = 1 << 18

DR6_BD = 1 << 13
DR7_GD = 1 << 13

U32 = (1 << 32) - 1
# The bits each register can hold: a value outside them is one no CPU holds (RFLAGS 63:22,
# CR0/DR6/DR7 63:32, CR3 above the physical address width, CR4 and EFER as KVM defines them).
DEFINED_BITS = {"rflags": (1 << 22) - 1, "cr0": U32, "cr3": (1 << MAX_PHYSICAL_BITS) - 1, "cr4": CR4_DEFINED,
                "efer": EFER_DEFINED, "dr6": U32, "dr7": U32}


class ControlState(NamedTuple):
    """What the control-state rules look at."""
    cr0: int
    cr3: int
    cr4: int
    efer: int
    dr6: int = 0
    dr7: int = 0
    long_mode_capable: bool = True
    max_phys_bits: int = MAX_PHYSICAL_BITS
    cs_flags: int = 0                   # CS's descriptor-cache flags (arch.segments)

    @property
    def long_mode_paging(self) -> bool:
        return bool(self.efer & EFER_LME and self.cr0 & CR0_PG)


class ControlRule(NamedTuple):
    reason: str                                  # as VMRUN reports it, and RSM's shutdown detail
    refused: Callable[[ControlState], bool]


_CS_L, _CS_D = 1 << 21, 1 << 22                  # arch.segments FLAG_L, FLAG_DB

CONTROL_RULES: dict[str, ControlRule] = {
    "cr0_high": ControlRule("CR0[63:32] not zero", lambda s: s.cr0 >> 32 != 0),
    "pg_without_pe": ControlRule("CR0.PG set with CR0.PE clear", lambda s: bool(s.cr0 & CR0_PG) and not s.cr0 & CR0_PE),
    "nw_without_cd": ControlRule("CR0.NW set with CR0.CD clear", lambda s: bool(s.cr0 & CR0_NW) and not s.cr0 & CR0_CD),
    "cr3_high": ControlRule("CR3 MBZ bits set", lambda s: s.cr3 >> s.max_phys_bits != 0),
    "cr4_reserved": ControlRule("CR4 MBZ bits set", lambda s: s.cr4 & ~CR4_DEFINED != 0),
    "dr6_high": ControlRule("DR6[63:32] not zero", lambda s: s.dr6 >> 32 != 0),
    "dr7_high": ControlRule("DR7[63:32] not zero", lambda s: s.dr7 >> 32 != 0),
    "efer_reserved": ControlRule("EFER MBZ bits set", lambda s: s.efer & ~EFER_DEFINED != 0),
    "lme_lma_without_long_mode": ControlRule("EFER.LME/LMA set without long mode",
                                             lambda s: bool(s.efer & (EFER_LME | EFER_LMA)) and not s.long_mode_capable),
    "lme_without_long_mode": ControlRule("EFER.LME set without long mode",
                                         lambda s: bool(s.efer & EFER_LME) and not s.long_mode_capable),
    "long_paging_without_pae": ControlRule("EFER.LME and CR0.PG set with CR4.PAE clear",
                                           lambda s: s.long_mode_paging and not s.cr4 & CR4_PAE),
    "long_paging_without_pe": ControlRule("EFER.LME and CR0.PG set with CR0.PE clear",
                                          lambda s: s.long_mode_paging and not s.cr0 & CR0_PE),
    "long_paging_cs_l_and_d": ControlRule("EFER.LME, CR0.PG, CR4.PAE, CS.L and CS.D all set",
                                          lambda s: s.long_mode_paging and bool(s.cr4 & CR4_PAE)
                                          and s.cs_flags & (_CS_L | _CS_D) == _CS_L | _CS_D),
}


def first_refused(state: ControlState, rules: tuple[str, ...]) -> str | None:
    """The reason of the first of ``rules`` (names in CONTROL_RULES) that ``state`` breaks."""
    for name in rules:
        rule = CONTROL_RULES[name]
        if rule.refused(state):
            return rule.reason
    return None


def cr_write_refused(reg: int, value: int, cr0: int, cr4: int, efer: int) -> bool:
    """True where MOV to CR``reg`` of ``value`` raises #GP(0) with the other control registers
    as given (KVM's kvm_set_cr0/3/4/8 checks): reserved bits, PG without PE, NW without CD,
    paging turned on with EFER.LME but not CR4.PAE, PAE turned off in long mode."""
    long_mode = bool(efer & EFER_LMA)
    if reg == 0:
        turns_on_paging = value & CR0_PG and not cr0 & CR0_PG
        state = ControlState(value, 0, cr4, efer)
        return bool(first_refused(state, ("cr0_high", "pg_without_pe", "nw_without_cd"))
                    or turns_on_paging and efer & EFER_LME and not cr4 & CR4_PAE
                    or not value & CR0_PG and cr4 & CR4_PCIDE)
    if reg == 4:
        return CONTROL_RULES["cr4_reserved"].refused(ControlState(cr0, 0, value, efer)) \
            or long_mode and not value & CR4_PAE
    if reg == 3:
        return long_mode and CONTROL_RULES["cr3_high"].refused(ControlState(cr0, value & ~(1 << 63), cr4, efer))
    if reg == 8:
        return bool(value >> 4)
    return False
