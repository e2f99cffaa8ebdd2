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
from ..arch.segments import FLAG_DB, FLAG_G, FLAG_P, FLAG_S, Segment, canonical, flags_from_vmcb_attrib
from ..arch.exceptions import GuestFault, Vector, gp
from ..binlayout import field_runs, fields_struct
from ..intercepts.vmcb import SAVE_AREA_OFFSET, V_GIF, VM_CR_R_INIT, VMCB_SAVE
from ..arch.segments import vmcb_attrib_from_flags
from ..arch.models import max_physical_bits
from .world import virtual_gif, vmrun

if TYPE_CHECKING:
    from ..decode.decoder import Instruction
    from ..machine import Machine

PAGE_MASK = ~0xFFF
# What VMLOAD loads and VMSAVE saves: segments with their hidden state, then MSRs.
VMLOAD_SEGMENTS = ("fs", "gs", "tr", "ldtr")
VMLOAD_MSRS = (("kernel_gs_base", 0xC000_0102), ("star", 0xC000_0081), ("lstar", 0xC000_0082),
               ("cstar", 0xC000_0083), ("sfmask", 0xC000_0084), ("sysenter_cs", 0x174),
               ("sysenter_esp", 0x175), ("sysenter_eip", 0x176))
CANONICAL_MSRS = frozenset({0xC000_0102})          # KernelGSbase: an address, loaded canonical
_SEGMENT_PARTS = ("selector", "attrib", "limit", "base")
# The VMCB fields VMLOAD reads and VMSAVE writes: one struct from the first to the last (the
# save area's bytes between them untouched: VMSAVE packs field runs into a copy of the span).
_VMLOAD_PATHS = [f"{name}.{part}" for name in VMLOAD_SEGMENTS for part in _SEGMENT_PARTS] + \
    [field for field, _ in VMLOAD_MSRS]
VMLOAD_FIELDS, _VMLOAD_START, _VMLOAD_ORDER = fields_struct(VMCB_SAVE, _VMLOAD_PATHS)
_VMLOAD_AT = SAVE_AREA_OFFSET + _VMLOAD_START
_VMSAVE_RUNS = field_runs(VMCB_SAVE, _VMLOAD_PATHS)
_SEGMENT_VALUES = [tuple(_VMLOAD_ORDER.index(f"{name}.{part}") for part in _SEGMENT_PARTS) for name in VMLOAD_SEGMENTS]
_MSR_VALUES = [(msr, _VMLOAD_ORDER.index(field)) for field, msr in VMLOAD_MSRS]
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
    """FS, GS, TR and LDTR with their hidden state, and the SYSCALL/SYSENTER MSRs and
    KernelGSbase, from the VMCB (bases canonical): one read, one CPU-state round trip."""
    page = vmcb_address(machine, insn)
    values = VMLOAD_FIELDS.unpack(machine.memory.read(page + _VMLOAD_AT, VMLOAD_FIELDS.size))
    segments = {name: Segment(values[selector], canonical(values[base]), values[limit], flags_from_vmcb_attrib(values[attrib]))
                for name, (selector, attrib, limit, base) in zip(VMLOAD_SEGMENTS, _SEGMENT_VALUES)}
    machine.cpu.load_segments(segments, msrs={msr: canonical(values[at]) if msr in CANONICAL_MSRS else values[at]
                                              for msr, at in _MSR_VALUES})
    machine.cpu.rip = insn.next_rip


def _vmsave(machine: "Machine", insn: "Instruction") -> None:
    """The same state into the VMCB, every byte between the fields left as it was."""
    page = vmcb_address(machine, insn)
    segments, msrs = machine.cpu.segments_and_msrs(VMLOAD_SEGMENTS, tuple(msr for _, msr in VMLOAD_MSRS))
    values = [0] * len(_VMLOAD_ORDER)
    for segment, (selector, attrib, limit, base) in zip(segments, _SEGMENT_VALUES):
        values[selector], values[attrib] = segment.selector, vmcb_attrib_from_flags(segment.flags)
        values[limit], values[base] = segment.limit, segment.base
    for value, (_msr, at) in zip(msrs, _MSR_VALUES):
        values[at] = value
    area = bytearray(machine.memory.read(page + _VMLOAD_AT, VMLOAD_FIELDS.size))
    first = 0
    for offset, run, count in _VMSAVE_RUNS:
        run.pack_into(area, offset - _VMLOAD_START, *values[first:first + count])
        first += count
    machine.memory.write(page + _VMLOAD_AT, bytes(area))
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

