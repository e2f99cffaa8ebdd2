"""Where KVM, the APM and QEMU disagree (intercepts, SMM, VMCALL): one named choice per
divergence (semantics.md §F), one row per profile.  The checker, the SMM world switch and the
hypercall conduit read these fields and nothing else about the profile."""
from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Profile:
    name: str
    #: F.1 — MOV CR value checks (reserved bits, PG without PE, NW without CD) before the
    #: POST_EXCEPT intercept (APM, KVM <= 5.11) or only in execute, after it (KVM today, QEMU).
    cr_value_checks_before_intercept: bool
    #: F.2 — UMIP #GP for SGDT/SIDT/SLDT/STR/SMSW at CPL>0 before the intercept (APM, QEMU) or in
    #: execute, after it (KVM).
    umip_before_intercept: bool
    #: F.4 — MONITOR checks its DS:rAX operand (segment, canonical, paging) before its
    #: POST_MEMACCESS intercept (APM) or decodes no operand (KVM); QEMU raises #UD at CPL>0.
    monitor_checks_operand: bool
    monitor_mwait_ud_at_cpl3: bool
    #: F.5 — QEMU raises #UD for VMMCALL with EFER.SVME=0 before the intercept check.
    vmmcall_needs_svme: bool
    #: F.5 — STGI/SKINIT are allowed with EFER.SVME=0 when CPUID advertises SKINIT (APM).
    stgi_skinit_without_svme: bool
    #: F.5 — VMRUN/VMLOAD/VMSAVE: #GP for a bad rAX before the SVME #UD (KVM) or after it.
    svm_rax_gp_before_svme_ud: bool
    #: F.7 — IOIO EXITINFO1 carries SEG (APM only) and the address-size bits (APM, KVM).
    ioio_segment: bool
    ioio_address_size: bool
    #: F.8 — the SMI intercept's EXITINFO1 bit 0 for an external SMI (APM) or 0 (KVM).
    smi_exitinfo: bool
    #: F.9 — decode assists fill EXITINFO1 for MOV CR/DR, INTn and INVLPG (hardware, APM) or
    #: not (KVM's emulated exits, QEMU).
    decode_assists: bool
    #: F.16 — selective CR0: the ordinary CR0-write intercept has priority and LMSW always
    #: exits (APM, KVM since Oct 2025).  False models older KVM.
    selective_cr0_fixed: bool
    #: F.18 — a REP INS/OUTS with rCX = 0 still takes the IOIO intercept (KVM, QEMU) or
    #: completes without one.
    rep_zero_count_intercepts: bool
    # -- SMM (semantics.md §C, §F.6, §F.10-F.14) -------------------------------------------
    #: F.10 — SMI entry zeroes IDTR (KVM) or leaves it (QEMU; the APM does not list it).
    smm_zero_idtr: bool = False
    #: F.11 — QEMU writes its fields over what SMRAM held (KVM fills a zeroed buffer) and
    #: CR0/CR4/DR6/DR7/RFLAGS as 32-bit values; it also zeroes EFER even without long mode.
    smm_writes_over_memory: bool = False
    smm_narrow_control_fields: bool = False
    smm_clears_efer_always: bool = False
    #: F.6 — the 32-bit map stores segment flags shifted (QEMU) or as descriptor bits (KVM).
    smm_shifted_attributes_32: bool = False
    #: F.12 — RSM checks what KVM's CR/DR/EFER writes reject; the APM adds CS.L+CS.D, the
    #: revision identifier and fix-ups (RFLAGS.VM); QEMU checks nothing.
    rsm_checks: bool = True
    rsm_apm_checks: bool = False
    #: EFER.LMA after RSM: recomputed from LME, PG (and PAE) (KVM, APM) or as saved (QEMU).
    rsm_recomputes_lma: bool = True
    #: F.13 — SMBASE reloaded on RSM always (KVM, APM) or only with revision bit 17 (QEMU).
    smm_smbase_needs_revision_bit: bool = False
    #: F.14 — I/O-instruction restart (FEC8h and the I/O restart fields, revision bit 16) and
    #: auto-HALT restart (FEC9h) as the APM defines them; KVM and QEMU write 0 and ignore them.
    smm_restart_fields: bool = False
    # -- hypercalls (semantics.md §D.2, §F.20) -----------------------------------------------
    #: §D.2 — VMCALL (Intel's encoding, #UD on AMD) outside guest mode: KVM emulates it
    #: (opcode entry ``EmulateOnUD | Priv``): #GP(0) at CPL > 0 (from the Priv flag; inferred,
    #: §D.2), else the FIX_HYPERCALL_INSN quirk rewrites the 3 bytes at CS:RIP to VMMCALL and
    #: the guest re-executes them.  Without it (APM, QEMU's TCG) VMCALL raises #UD.
    vmcall_fix_hypercall: bool = False
    # -- in-guest SVM (APM chapter 15) -------------------------------------------------------
    #: F.5 — SKINIT executes (secure init into the SLB, CPUID advertises it: APM) or raises
    #: #UD after its intercept check (KVM's skinit_interception, QEMU's helper_skinit).
    skinit: bool = False
    #: §B.5 — a VMRUN that fails its consistency checks is a #VMEXIT, which clears GIF (APM,
    #: QEMU's cpu_vmexit), or only writes VMEXIT_INVALID and leaves GIF alone (KVM's
    #: nested_svm_vmrun).
    vmrun_invalid_clears_gif: bool = True
    #: F.19 — an SMI in guest mode also saves the host's CR0/CR3/CR4/EFER in the state-save
    #: map at FF28h-FF40h (APM); KVM keeps them in the host-save area only.
    smm_svm_host_fields: bool = False
    #: VMRUN saves the host state in the VM_HSAVE_PA page and #VMEXIT reloads it from there
    #: (APM, QEMU's helper_vmrun/do_vmexit), or the CPU keeps it (KVM's vmcb01) and writes the
    #: page only when an SMI arrives in guest mode (§C.2 step 2), reading it back at RSM.
    host_save_in_memory: bool = True
    #: #VMEXIT clears EVENTINJ's low dword (V, type, vector) and keeps its error code (QEMU's
    #: do_vmexit), or clears both (KVM's nested_svm_vmexit; the APM's EVENTINJ.V is cleared).
    vmexit_keeps_eventinj_error: bool = False
    #: VMRUN of a legacy-PAE guest loads its PDPTEs and fails on reserved bits (KVM's
    #: nested_svm_load_cr3; the APM's shadow-paging hypervisor) or loads nothing (QEMU).
    vmrun_loads_pdptes: bool = True
    #: #NPF (nested paging, svm/npt.py): a reserved bit in a nested entry sets P with RSV
    #: (APM, KVM) or RSV alone (QEMU 7.2's do_fault_rsvd); ID for a final fetch with the host's
    #: NX or SMEP (KVM) or NX alone (QEMU's nested_pg_mode drops SMEP); bit 8 of a nested
    #: PML4E reserved (AMD, KVM) or ignored (QEMU).  kvm-unit-tests' svm_npt_rsvd_bits_test.
    npf_reserved_sets_present: bool = True
    npf_id_with_smep: bool = True
    nested_pml4e_bit8_reserved: bool = True
    # -- the CPU -------------------------------------------------------------------------------
    #: RDMSR/WRMSR of an MSR the CPU does not have (arch/msrs.py) raises #GP(0) (APM, KVM) or
    #: reads 0 and drops the write (QEMU's TCG: helper_rdmsr's "XXX: exception?").
    missing_msr_faults: bool = True
    #: IA32_APIC_BASE: a cleared global enable can be set again (KVM's kvm_lapic_set_base; the
    #: SDM) or stays cleared until reset (QEMU's TCG apic_set_base).
    apic_enable_sticks_off: bool = False


PROFILES = {p.name: p for p in (
    Profile("kvm", cr_value_checks_before_intercept=False, umip_before_intercept=False,
            monitor_checks_operand=False, monitor_mwait_ud_at_cpl3=False,
            vmmcall_needs_svme=False,
            stgi_skinit_without_svme=False, svm_rax_gp_before_svme_ud=True, ioio_segment=False,
            ioio_address_size=True, smi_exitinfo=False, decode_assists=False,
            selective_cr0_fixed=True, rep_zero_count_intercepts=True,
            smm_zero_idtr=True, vmcall_fix_hypercall=True, vmrun_invalid_clears_gif=False,
            host_save_in_memory=False),
    Profile("apm", cr_value_checks_before_intercept=True, umip_before_intercept=True,
            monitor_checks_operand=True, monitor_mwait_ud_at_cpl3=False,
            vmmcall_needs_svme=False,
            stgi_skinit_without_svme=True, svm_rax_gp_before_svme_ud=False, ioio_segment=True,
            ioio_address_size=True, smi_exitinfo=True, decode_assists=True,
            selective_cr0_fixed=True, rep_zero_count_intercepts=True,
            rsm_apm_checks=True, smm_restart_fields=True, skinit=True,
            smm_svm_host_fields=True),
    Profile("qemu", cr_value_checks_before_intercept=False, umip_before_intercept=True,
            monitor_checks_operand=False, monitor_mwait_ud_at_cpl3=True,
            vmmcall_needs_svme=True,
            stgi_skinit_without_svme=False, svm_rax_gp_before_svme_ud=False, ioio_segment=False,
            ioio_address_size=False, smi_exitinfo=False, decode_assists=False,
            selective_cr0_fixed=True, rep_zero_count_intercepts=True,
            smm_writes_over_memory=True, smm_narrow_control_fields=True, smm_clears_efer_always=True,
            smm_shifted_attributes_32=True, rsm_checks=False, rsm_recomputes_lma=False,
            smm_smbase_needs_revision_bit=True, vmexit_keeps_eventinj_error=True, missing_msr_faults=False,
            vmrun_loads_pdptes=False, apic_enable_sticks_off=True, npf_reserved_sets_present=False,
            npf_id_with_smep=False, nested_pml4e_bit8_reserved=False),
)}
DEFAULT_PROFILE = "kvm"
CHOICES = tuple(f.name for f in fields(Profile) if f.name != "name")


def profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r} (choose from {', '.join(PROFILES)})") from None
