"""Control registers, EFER, RFLAGS and the debug registers: their bits, the bits each may
hold, and the one table of control-state rules the architecture enforces.  MOV to CR,
VMRUN's consistency checks (APM §15.5.1) and RSM's checks (KVM's, semantics.md §C.6) all
read ``CONTROL_RULES``; each applies a ``RuleSet`` of them, in its own order."""
from __future__ import annotations

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
# VME PVI TSD DE PSE PAE MCE PGE PCE OSFXSR OSXMMEXCPT; UMIP, which ringminus models on every
# CPU model (semantics.md §F.2); PCIDE, which QEMU accepts without PCID (and semantics.md
# §E.3 #71 restores on qemu64).  A model adds the bits of the features it advertises
# (arch/models.py, CpuModel.cr4_defined).
CR4_ARCHITECTURAL = 0xFFF | 1 << 17
MAX_PHYSICAL_BITS = 52

CR0_PE = 1 << 0
CR0_EM, CR0_TS, CR0_NW, CR0_CD = 1 << 2, 1 << 3, 1 << 29, 1 << 30
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_TSD, CR4_DE, CR4_PSE, CR4_PAE = 1 << 2, 1 << 3, 1 << 4, 1 << 5
CR4_PGE, CR4_PCE, CR4_UMIP = 1 << 7, 1 << 8, 1 << 11
CR4_LA57, CR4_PCIDE, CR4_SMEP, CR4_SMAP, CR4_PKE = 1 << 12, 1 << 17, 1 << 20, 1 << 21, 1 << 22
CR4_VMXE, CR4_SMXE, CR4_FSGSBASE, CR4_OSXSAVE = 1 << 13, 1 << 14, 1 << 16, 1 << 18
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
DR6_BS = 1 << 14
DR7_GD = 1 << 13

U32 = (1 << 32) - 1
# The bits each register can hold: a value outside them is one no CPU holds (RFLAGS 63:22,
# CR0/DR6/DR7 63:32, CR3 above the physical address width, CR4 and EFER as KVM defines them).
DEFINED_BITS = {"rflags": (1 << 22) - 1, "cr0": U32, "cr3": (1 << MAX_PHYSICAL_BITS) - 1, "cr4": CR4_DEFINED,
                "efer": EFER_DEFINED, "dr6": U32, "dr7": U32}


# Each rule: (the reason VMRUN reports and RSM's shutdown gives, the condition that refuses
# the state) over cr0 cr3 cr4 efer dr6 dr7 long_mode_capable max_phys_bits cs_flags (CS's
# descriptor-cache flags: L is bit 21, D bit 22) cr4_defined (the CPU model's CR4 bits).
# MOV CR, VMRUN and RSM each apply a RuleSet of them, in their own order.
CONTROL_RULES: dict[str, tuple[str, str]] = {
    "cr0_high": ("CR0[63:32] not zero", "cr0 >> 32"),
    "pg_without_pe": ("CR0.PG set with CR0.PE clear", f"cr0 & {CR0_PG:#x} and not cr0 & {CR0_PE:#x}"),
    "nw_without_cd": ("CR0.NW set with CR0.CD clear", f"cr0 & {CR0_NW:#x} and not cr0 & {CR0_CD:#x}"),
    "cr3_high": ("CR3 MBZ bits set", "cr3 >> max_phys_bits"),
    "cr4_reserved": ("CR4 MBZ bits set", "cr4 & ~cr4_defined"),
    "dr6_high": ("DR6[63:32] not zero", "dr6 >> 32"),
    "dr7_high": ("DR7[63:32] not zero", "dr7 >> 32"),
    "efer_reserved": ("EFER MBZ bits set", f"efer & {~EFER_DEFINED & (1 << 64) - 1:#x}"),
    "lme_lma_without_long_mode": ("EFER.LME/LMA set without long mode",
                                  f"efer & {EFER_LME | EFER_LMA:#x} and not long_mode_capable"),
    "lme_without_long_mode": ("EFER.LME set without long mode", f"efer & {EFER_LME:#x} and not long_mode_capable"),
    "long_paging_without_pae": ("EFER.LME and CR0.PG set with CR4.PAE clear",
                                f"efer & {EFER_LME:#x} and cr0 & {CR0_PG:#x} and not cr4 & {CR4_PAE:#x}"),
    "long_paging_without_pe": ("EFER.LME and CR0.PG set with CR0.PE clear",
                               f"efer & {EFER_LME:#x} and cr0 & {CR0_PG:#x} and not cr0 & {CR0_PE:#x}"),
    "long_paging_cs_l_and_d": ("EFER.LME, CR0.PG, CR4.PAE, CS.L and CS.D all set",
                               f"efer & {EFER_LME:#x} and cr0 & {CR0_PG:#x} and cr4 & {CR4_PAE:#x} "
                               f"and cs_flags & {3 << 21:#x} == {3 << 21:#x}"),
}
_ARGUMENTS = ("cr0, cr3, cr4, efer, dr6=0, dr7=0, long_mode_capable=True, max_phys_bits=MAX_PHYSICAL_BITS, cs_flags=0,"
              " cr4_defined=CR4_DEFINED")


class RuleSet:
    """Some of CONTROL_RULES, in order, compiled into one function (world switches run it
    every time): ``first_refused(cr0, cr3, cr4, efer, …)`` gives the first rule's reason, or
    None.  ``source`` is the function's text."""

    def __init__(self, *names: str):
        self.names = names
        self.source = f"def first_refused({_ARGUMENTS}):\n" + "".join(
            f"    if {CONTROL_RULES[name][1]}:\n        return {CONTROL_RULES[name][0]!r}\n" for name in names)
        namespace = {"MAX_PHYSICAL_BITS": MAX_PHYSICAL_BITS, "CR4_DEFINED": CR4_DEFINED}
        exec(compile(self.source, f"<RuleSet {' '.join(names)}>", "exec"), namespace)
        self.first_refused = namespace["first_refused"]


_CR0_WRITE = RuleSet("cr0_high", "pg_without_pe", "nw_without_cd")
_CR4_WRITE = RuleSet("cr4_reserved")
_CR3_WRITE = RuleSet("cr3_high")


def cr_write_refused(reg: int, value: int, cr0: int, cr4: int, efer: int, cr4_defined: int = CR4_DEFINED) -> bool:
    """True where MOV to CR``reg`` of ``value`` raises #GP(0) with the other control registers
    as given (KVM's kvm_set_cr0/3/4/8 checks): reserved bits (CR4's: those the CPU model has
    not), PG without PE, NW without CD, paging turned on with EFER.LME but not CR4.PAE, PAE
    turned off in long mode."""
    long_mode = bool(efer & EFER_LMA)
    if reg == 0:
        turns_on_paging = value & CR0_PG and not cr0 & CR0_PG
        return bool(_CR0_WRITE.first_refused(value, 0, cr4, efer)
                    or turns_on_paging and efer & EFER_LME and not cr4 & CR4_PAE
                    or not value & CR0_PG and cr4 & CR4_PCIDE)
    if reg == 4:
        return (_CR4_WRITE.first_refused(cr0, 0, value, efer, cr4_defined=cr4_defined) is not None
                or long_mode and not value & CR4_PAE)
    if reg == 3:
        return long_mode and _CR3_WRITE.first_refused(cr0, value & ~(1 << 63), cr4, efer) is not None
    if reg == 8:
        return bool(value >> 4)
    return False
