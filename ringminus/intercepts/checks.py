"""The named permission checks of the decode-flag table (KVM's ``check_perm`` callbacks, with
the profile's choices where the references disagree).  Each raises GuestFault or returns."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from ..arch.control import CR4_DE, CR4_PCE, CR4_TSD, CR4_UMIP, DR6_BD, DR7_GD, EFER_SVME, cr_write_refused
from ..emulator.ports import io_permitted
from ..emulator.segmentation import linear_address
from ..arch.exceptions import GuestFault, Vector, gp, ud

if TYPE_CHECKING:
    from ..decode.decoder import Instruction
    from .guest import Guest

VALID_CRS = frozenset({0, 2, 3, 4, 8})
MAX_PMC = 5


def cr_access(insn: "Instruction", guest: "Guest") -> None:
    """MOV CR: #UD for a CR that does not exist; with the profile's F.1 choice, the value
    checks of a CR write too (reserved bits, PG without PE, NW without CD)."""
    if insn.reg not in VALID_CRS:
        raise ud()
    if insn.row.name != "mov_to_cr" or not guest.profile.cr_value_checks_before_intercept:
        return
    value = guest.register(insn.rm, 8 if insn.bits == 64 else 4)
    if cr_write_refused(insn.reg, value, guest.cpu["cr0"], guest.cpu["cr4"], guest.cpu["efer"],
                        guest.machine.cr4_defined):
        raise gp()


def _dr_common(insn: "Instruction", guest: "Guest") -> None:
    if insn.reg > 7 or (insn.reg in (4, 5) and guest.cpu["cr4"] & CR4_DE):
        raise ud()
    if guest.cpu["dr7"] & DR7_GD:
        guest.cpu["dr6"] = (guest.cpu["dr6"] & ~0xF) | DR6_BD
        raise GuestFault(Vector.DB)


def dr_read(insn: "Instruction", guest: "Guest") -> None:
    _dr_common(insn, guest)


def dr_write(insn: "Instruction", guest: "Guest") -> None:
    _dr_common(insn, guest)
    if insn.reg in (4, 5, 6, 7) and insn.bits == 64 and guest.register(insn.rm, 8) >> 32:
        raise gp()


def umip(insn: "Instruction", guest: "Guest") -> None:
    """F.2: UMIP's #GP before the intercept (APM, QEMU); KVM raises it in execute."""
    if guest.profile.umip_before_intercept and guest.cpu["cr4"] & CR4_UMIP and guest.cpu.cpl > 0:
        raise gp()


def rdtsc(insn: "Instruction", guest: "Guest") -> None:
    if guest.cpu["cr4"] & CR4_TSD and guest.cpu.cpl > 0:
        raise gp()


def rdpmc(insn: "Instruction", guest: "Guest") -> None:
    if (not guest.cpu["cr4"] & CR4_PCE and guest.cpu.cpl > 0) or guest.cpu["ecx"] > MAX_PMC:
        raise gp()


def rdpru(insn: "Instruction", guest: "Guest") -> None:
    rdtsc(insn, guest)


def svme(insn: "Instruction", guest: "Guest") -> None:
    if not guest.cpu["efer"] & EFER_SVME:
        raise ud()


def svme_or_skinit(insn: "Instruction", guest: "Guest") -> None:
    """F.5: STGI/SKINIT also run with SVME=0 when CPUID advertises SKINIT (APM)."""
    if not guest.profile.stgi_skinit_without_svme:
        svme(insn, guest)


def svme_rax(insn: "Instruction", guest: "Guest") -> None:
    """VMRUN/VMLOAD/VMSAVE: rAX must be a valid physical address; F.5 orders its #GP
    against the SVME #UD."""
    rax = guest.cpu["rax"] if insn.address_size == 8 else guest.cpu["rax"] & 0xFFFF_FFFF
    if guest.profile.svm_rax_gp_before_svme_ud:
        if rax >> 48:
            raise gp()
        svme(insn, guest)
    else:
        svme(insn, guest)
        if rax >> 48:
            raise gp()


def vmmcall(insn: "Instruction", guest: "Guest") -> None:
    """F.5: the intercept is taken in any mode — on KVM too, whose hardware intercepts an
    L2's VMMCALL before its emulator's Prot rule could apply (kvm-unit-tests' mode_switch
    VMMCALLs from real mode); QEMU needs EFER.SVME first."""
    if guest.profile.vmmcall_needs_svme:
        svme(insn, guest)


def monitor(insn: "Instruction", guest: "Guest") -> None:
    """MONITOR/MWAIT privilege (F.4: #GP in KVM and the APM profile, #UD in QEMU at CPL>0)
    and, for the APM profile, MONITOR's DS:rAX operand checks before its intercept."""
    if guest.cpu.cpl > 0:
        raise ud() if guest.profile.monitor_mwait_ud_at_cpl3 else gp()
    if insn.row.name == "monitor" and guest.profile.monitor_checks_operand:
        segment = insn.prefixes.segment or "ds"
        address = linear_address(guest.cpu, segment, guest.cpu["rax"], 1, False, insn.address_size)
        guest.linear.translate(address, user=guest.cpu.cpl == 3)


def io(insn: "Instruction", guest: "Guest") -> None:
    """IN/OUT/INS/OUTS: only the VM86/IOPL/TSS-bitmap #GP precedes the intercept (§A.5)."""
    port = insn.immediate if insn.immediate is not None else guest.cpu["dx"]
    if not io_permitted(guest.cpu.capture(), guest.linear, port, insn.operand_size if insn.operand_size < 8 else 4):
        raise gp()


CHECKS: dict[str, Callable[["Instruction", "Guest"], None]] = {
    "cr_access": cr_access, "dr_read": dr_read, "dr_write": dr_write, "umip": umip,
    "rdtsc": rdtsc, "rdpmc": rdpmc, "rdpru": rdpru, "svme": svme,
    "svme_or_skinit": svme_or_skinit, "svme_rax": svme_rax, "vmmcall": vmmcall,
    "monitor": monitor, "io": io,
}
