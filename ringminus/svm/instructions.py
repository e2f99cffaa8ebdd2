"""The SVM instructions outside guest mode (or not intercepted by L1): VMRUN, VMLOAD, VMSAVE,
STGI, CLGI, INVLPGA and SKINIT (APM Vol. 3, each instruction's page).  Their #UD/#GP checks
before execution are the decode-flag table's (decode/table.py, run by the staged checker
with no intercepts, so the profile's F.5 order applies); what each does is here.

rAX holds a physical address (32 bits of it outside 64-bit mode).  VMRUN, VMLOAD and VMSAVE
raise #GP(0), after the intercept check, for a VMCB address that is not page-aligned or lies
beyond MAXPHYADDR ("all SVM instructions expect page aligned RAX": KVM's gp_interception
re-injects the hardware's #GP; its nested VMRUN checks ``page_address_valid``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from ..arch.models import MODELS
from ..emulator.boot import (RESET_CR0, RESET_DATA_SEGMENT, RESET_DR6, RESET_DR7,
                             RESET_SYSTEM_SEGMENTS, RESET_TABLE_LIMIT)
from ..emulator.cpu import At
from ..arch.control import CR0_PE
from ..arch.registers import GPRS
from ..arch.segments import FLAG_DB, FLAG_G, FLAG_P, FLAG_S, Segment
from ..arch.exceptions import GuestFault, Vector, gp
from ..intercepts.vmcb import V_GIF, VM_CR_R_INIT
from ..arch.models import max_physical_bits
from . import vmload
from .world import virtual_gif, vmrun

if TYPE_CHECKING:
    from ..decode.decoder import Instruction
    from ..machine import Machine

PAGE_MASK = ~0xFFF
# SKINIT (APM Vol. 3 "SKINIT"): the secure loader block is 64 KiB at EAX[31:16].
SLB_SIZE = 0x1_0000
VM_CR_DPD, VM_CR_DIS_A20M = 1 << 0, 1 << 2
SKINIT_CODE = Segment(0x08, 0, 0xFFFF_FFFF, FLAG_P | FLAG_S | FLAG_DB | FLAG_G | (0xB << 8))
SKINIT_STACK = Segment(0x10, 0, 0xFFFF_FFFF, FLAG_P | FLAG_S | FLAG_DB | FLAG_G | (0x3 << 8))
SKINIT_SEGMENTS = {"es": RESET_DATA_SEGMENT, "ds": RESET_DATA_SEGMENT, "fs": RESET_DATA_SEGMENT,
                   "gs": RESET_DATA_SEGMENT, "cs": SKINIT_CODE, "ss": SKINIT_STACK, **RESET_SYSTEM_SEGMENTS}


def vmcb_address(machine: "Machine", insn: "Instruction", rax: int | None = None) -> int:
    """rAX (read now, unless the caller holds it) as a VMCB address (GuestFault: #GP(0))."""
    address = machine.cpu["rax"] if rax is None else rax
    if insn.address_size != 8:
        address &= 0xFFFF_FFFF
    if address >> max_physical_bits(machine.cpu_model) or address & ~PAGE_MASK:
        raise gp()
    return address


def _vmrun(machine: "Machine", insn: "Instruction") -> None:
    vmrun(machine, vmcb_address(machine, insn), insn.next_rip)


def _vmload(machine: "Machine", insn: "Instruction") -> None:
    """FS, GS, TR, LDTR and the syscall MSRs from the VMCB (vmload.py): one read, one
    CPU-state round trip."""
    codec = vmload.CODEC
    values = codec.vmcb.unpack(machine.memory.read(vmcb_address(machine, insn) + codec.vmcb_at, codec.vmcb.size))
    context = machine.cpu.edit_context()
    codec.load(context.view, values)
    context.commit()
    machine.cpu.rip = insn.next_rip


def _vmsave(machine: "Machine", insn: "Instruction") -> None:
    """The same state into the VMCB, every byte between the fields left as it was."""
    codec = vmload.CODEC
    at = vmcb_address(machine, insn) + codec.vmcb_at
    values = codec.save(machine.cpu.context.snapshot().view)
    area = bytearray(machine.memory.read(at, codec.vmcb.size))
    first = 0
    for offset, run, count in codec.runs:
        run.pack_into(area, offset, *values[first:first + count])
        first += count
    machine.memory.write(at, bytes(area))
    machine.cpu.rip = insn.next_rip


def _set_gif(value: bool) -> Callable[["Machine", "Instruction"], None]:
    def execute(machine: "Machine", insn: "Instruction") -> None:
        svm = machine.svm
        if virtual_gif(machine):
            svm.int_ctl = svm.int_ctl | V_GIF if value else svm.int_ctl & ~V_GIF
        else:
            svm.gif = value
        machine.cpu.rip = insn.next_rip
    return execute


def _invlpga(machine: "Machine", insn: "Instruction") -> None:
    """Invalidate the TLB entry of (rAX, ASID ECX): ringminus's one TLB drops everything."""
    machine.forget_tlb()
    machine.cpu.rip = insn.next_rip


def _skinit(machine: "Machine", insn: "Instruction") -> None:
    """SKINIT (apm profile): reinitialise as for INIT, enter flat 32-bit protected mode and
    jump to the secure loader at EAX[31:16] + its entry word, with GIF = 0.  The DEV
    protection of the SLB and the TPM hash have no counterpart here (no DMA, no TPM).
    KVM and QEMU raise #UD instead (§F.5)."""
    if not machine.profile.skinit:
        raise GuestFault(Vector.UD)
    slb = machine.cpu["eax"] & 0xFFFF_0000
    entry = int.from_bytes(machine.memory.read(slb, 2), "little")
    state = machine.cpu.capture()
    for name in GPRS:
        state[getattr(At, name)] = 0
    state[At.rax], state[At.rdx] = slb, MODELS[machine.cpu_model].signature
    state[At.rsp], state[At.rip] = slb + SLB_SIZE, slb + entry
    for name, segment in SKINIT_SEGMENTS.items():
        at = getattr(At, f"{name}_selector")
        state[at:at + 4] = (segment.selector, segment.base, segment.limit, segment.flags)
    state[At.cr0] = RESET_CR0 | CR0_PE
    state[At.cr2] = state[At.cr3] = state[At.cr4] = state[At.efer] = 0
    state[At.rflags], state[At.dr6], state[At.dr7] = 0x2, RESET_DR6, RESET_DR7
    state[At.gdtr_base] = state[At.idtr_base] = 0
    state[At.gdtr_limit] = state[At.idtr_limit] = RESET_TABLE_LIMIT
    state.cpl = 0
    machine.cpu.load(state)
    machine.svm.vm_cr |= VM_CR_DPD | VM_CR_R_INIT | VM_CR_DIS_A20M
    machine.svm.gif = False


EXECUTE: dict[str, Callable[["Machine", "Instruction"], None]] = {
    "vmrun": _vmrun, "vmload": _vmload, "vmsave": _vmsave, "stgi": _set_gif(True),
    "clgi": _set_gif(False), "invlpga": _invlpga, "skinit": _skinit,
}


def execute(machine: "Machine", insn: "Instruction") -> None:
    """Execute a checked SVM instruction (GuestFault when it faults)."""
    EXECUTE[insn.row.name](machine, insn)

