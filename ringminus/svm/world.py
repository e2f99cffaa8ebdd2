"""VMRUN and #VMEXIT: the world switch between a guest hypervisor (L1) and its guest (L2).

VMRUN (APM §15.5, Vol. 3 "VMRUN"): save the host state to the VM_HSAVE_PA page, check the
VMCB (§B.5; a failure is a #VMEXIT with VMEXIT_INVALID), load the guest state, set GIF, apply
TLB_CONTROL and V_INTR, inject EVENTINJ, and run L2 under the VMCB's intercepts.
#VMEXIT (§B.6): write the guest state and the exit back into the VMCB, clear GIF, reload the
host state from the HSAVE page and resume L1 after its VMRUN.

The host state lives in the HSAVE page in the VMCB save-area layout (offset 0x400), as QEMU
keeps it; the APM leaves the format to the implementation and KVM keeps it off-page.  VMRUN
saves and #VMEXIT reloads only what the APM lists (ES/CS/SS/DS, GDTR/IDTR, CR0/CR3/CR4, EFER,
RFLAGS, RIP, RSP, RAX); FS, GS, TR, LDTR and the syscall MSRs belong to VMLOAD/VMSAVE.

TLB: ringminus has one untagged TLB.  ASIDs keep their meaning for INVLPGA and the checks;
VMRUN flushes when TLB_CONTROL asks for any flush and whenever the translation regime changes
(CR0/CR3/CR4/EFER), which covers every case where a tagged TLB would differ.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..emulator import ucinternals as uci
from ..emulator.cpu import CR0_PE, RFLAGS_IF, RFLAGS_VM, ArchState, At
from ..emulator.delivery import Event, EventKind
from ..intercepts.checker import VmExit
from ..intercepts.controls import IOPM_BYTES, MSRPM_BYTES, InterceptControls
from ..intercepts.exitcodes import ExitCode
from ..intercepts.vmcb import (GUEST_INTERRUPT_MASK, INTERRUPT_SHADOW, MAP_ADDRESS_MASK, SAVE_AREA_OFFSET,
                               SAVE_AREA_SIZE, V_INTR_MASKING, V_TPR_MASK, VMCB_CONTROL, VMCB_SAVE,
                               EventInfo, EventType, TlbControl, consistency_failure,
                               flags_from_vmcb_attrib, intercept_vector, vmcb_attrib_from_flags)
from .cpuid import max_physical_bits

if TYPE_CHECKING:
    from ..emulator.machine import Machine

VMEXIT_INVALID = -1
SEGMENTS = ("es", "cs", "ss", "ds")                 # VMRUN loads, #VMEXIT saves and reloads these
TABLES = ("gdtr", "idtr")
# Registers VMRUN loads from the VMCB and #VMEXIT writes back (with the segments, tables, CPL).
GUEST_REGISTERS = ("efer", "cr0", "cr2", "cr3", "cr4", "dr6", "dr7", "rflags", "rip", "rsp", "rax")
# Registers VMRUN saves in the HSAVE page and #VMEXIT reloads (CR2, DR6 and DR7 are not).
HOST_REGISTERS = ("efer", "cr0", "cr3", "cr4", "rflags", "rip", "rsp", "rax")
HOST_DR7 = 0x400                                    # #VMEXIT disables every breakpoint
CONTROL_SIZE = SAVE_AREA_OFFSET
# EVENTINJ TYPE -> how it is delivered
INJECTED_KIND = {EventType.INTR: EventKind.EXTERNAL, EventType.NMI: EventKind.NMI,
                 EventType.EXCEPTION: EventKind.EXCEPTION, EventType.SOFTWARE_INT: EventKind.SOFTWARE_INTERRUPT}


class VmcbMemoryError(Exception):
    """A VMCB, the HSAVE page or a permission map is not backed by RAM."""


# -- moving state between an ArchState and a VMCB save area -------------------------------------

def store_state(save, state: ArchState, registers: tuple[str, ...]) -> None:
    """Write ``registers``, the four VMRUN segments, GDTR/IDTR and the CPL into ``save``."""
    for name in SEGMENTS:
        at = getattr(At, f"{name}_selector")
        record = save[name]
        record["selector"], record["base"], record["limit"] = state[at] & 0xFFFF, state[at + 1], state[at + 2]
        record["attrib"] = vmcb_attrib_from_flags(state[at + 3])
    for name in TABLES:
        save[name]["base"], save[name]["limit"] = state[getattr(At, f"{name}_base")], state[getattr(At, f"{name}_limit")]
    for name in registers:
        save[name] = state[getattr(At, name)]
    save["cpl"] = state.cpl


def load_state(state: ArchState, save, registers: tuple[str, ...]) -> None:
    """The inverse of ``store_state``, into ``state`` (hidden segment parts included)."""
    for name in SEGMENTS:
        at = getattr(At, f"{name}_selector")
        record = save[name]
        state[at:at + 4] = (int(record["selector"]), int(record["base"]), int(record["limit"]),
                            flags_from_vmcb_attrib(int(record["attrib"])))
    for name in TABLES:
        state[getattr(At, f"{name}_base")] = int(save[name]["base"])
        state[getattr(At, f"{name}_limit")] = int(save[name]["limit"]) & 0xFFFF
    for name in registers:
        state[getattr(At, name)] = int(save[name])


# -- guest memory -------------------------------------------------------------------------------

def _read(machine: "Machine", address: int, size: int) -> bytearray:
    try:
        return bytearray(machine.memory.read(address, size))
    except Exception as missing:                    # UnbackedMemory
        raise VmcbMemoryError(f"no RAM at {address:#x} for {size} bytes") from missing


def _control(machine: "Machine", vmcb_pa: int) -> tuple[bytearray, np.void]:
    raw = _read(machine, vmcb_pa, CONTROL_SIZE)
    return raw, np.frombuffer(raw, dtype=VMCB_CONTROL)[0]


def _save(machine: "Machine", page: int) -> tuple[bytearray, np.void]:
    raw = _read(machine, page + SAVE_AREA_OFFSET, SAVE_AREA_SIZE)
    return raw, np.frombuffer(raw, dtype=VMCB_SAVE)[0]


def _permission_map(machine: "Machine", base: int, size: int) -> np.ndarray:
    return np.frombuffer(_read(machine, base & MAP_ADDRESS_MASK, size), dtype=np.uint8).copy()


def intercept_controls(machine: "Machine", control) -> InterceptControls:
    """The VMCB's intercepts; a permission map is read only when its intercept is set."""
    controls = InterceptControls(intercept_vector(control))
    if ExitCode.IOIO in controls:
        controls.iopm = _permission_map(machine, int(control["iopm_base_pa"]), IOPM_BYTES)
    if ExitCode.MSR in controls:
        controls.msrpm = _permission_map(machine, int(control["msrpm_base_pa"]), MSRPM_BYTES)
    return controls


# -- VMRUN ----------------------------------------------------------------------------------------

def vmrun(machine: "Machine", vmcb_pa: int, next_rip: int, host: ArchState | None = None) -> None:
    """VMRUN with rAX = ``vmcb_pa`` (already checked: page-aligned, inside the physical
    address width) from L1 at CPL 0; L1 resumes at ``next_rip`` after the #VMEXIT.  ``host``:
    the registers at the VMRUN, if the caller has just captured them."""
    cpu, svm = machine.cpu, machine.svm
    if host is None:
        host = cpu.capture()
    host[At.rip] = next_rip
    hsave_raw, hsave = _save(machine, svm.hsave_pa)
    store_state(hsave, host, HOST_REGISTERS)
    machine.memory.write(svm.hsave_pa + SAVE_AREA_OFFSET, bytes(hsave_raw))
    control_raw, control = _control(machine, vmcb_pa)
    save_raw, save = _save(machine, vmcb_pa)
    svm.vmruns += 1
    failure = consistency_failure(save, control, long_mode_capable=machine.long_mode_capable,
                                  max_phys_bits=max_physical_bits(machine.cpu_model))
    if failure is not None:
        _refuse(machine, vmcb_pa, control_raw, control, host, failure)
        return
    controls = intercept_controls(machine, control)
    guest = ArchState(host)
    load_state(guest, save, GUEST_REGISTERS)
    int_ctl = int(control["int_ctl"])
    guest.cpl = int(save["cpl"]) & 3
    guest[At.hflags] = guest[At.hflags] & ~uci.HF_INHIBIT_IRQ | (
        uci.HF_INHIBIT_IRQ if int(control["interrupt_state"]) & INTERRUPT_SHADOW else 0)
    svm.host_if = bool(host[At.rflags] & RFLAGS_IF)
    svm.v_intr_masking = bool(int_ctl & V_INTR_MASKING)
    if svm.v_intr_masking:                          # CR8 is the guest's V_TPR while it runs
        svm.host_cr8 = cpu["cr8"]
    cpu.load(guest)
    if svm.v_intr_masking:
        cpu["cr8"] = int_ctl & V_TPR_MASK & 0xF
    if int(control["tlb_control"]) != TlbControl.DO_NOTHING:
        machine.forget_tlb()
    svm.vmcb_pa, svm.asid, svm.gif = vmcb_pa, int(control["guest_asid"]), True
    svm.int_ctl, svm.v_intr_vector = int_ctl, int(control["v_intr_vector"])
    machine.enter_guest(controls, on_exit="l1")
    _inject(machine, int(control["eventinj"]), guest[At.rip])


def _refuse(machine: "Machine", vmcb_pa: int, control_raw: bytearray, control, host: ArchState,
            reason: str) -> None:
    """A VMRUN that fails its consistency checks: EXITCODE = VMEXIT_INVALID, L1 goes on
    after its VMRUN (§B.5); the host state was never left."""
    control["exitcode"] = VMEXIT_INVALID
    control["exitinfo1"] = control["exitinfo2"] = control["exitintinfo"] = 0
    machine.memory.write(vmcb_pa, bytes(control_raw))
    machine.cpu.rip = host[At.rip]
    if machine.profile.vmrun_invalid_clears_gif:
        machine.svm.gif = False
    exit_ = VmExit(VMEXIT_INVALID, rip=int(host[At.rip]))
    machine.record_exit(exit_, {"kind": "vmrun-invalid", "vmcb": vmcb_pa, "reason": reason})


def _inject(machine: "Machine", eventinj: int, rip: int) -> None:
    """EVENTINJ (APM §15.20): delivered before the guest's first instruction, through the
    guest's IDT; the event itself is not intercepted, faults while delivering it are."""
    event = EventInfo.decode(eventinj)
    if not event.valid:
        return
    kind = INJECTED_KIND[EventType(event.kind)]
    error_code = event.error_code if kind is EventKind.EXCEPTION else None
    machine.deliver(Event(event.vector, kind, rip, error_code), injected=True)
    if kind is EventKind.NMI:
        machine.cpu.nmi_blocked = True


# -- #VMEXIT --------------------------------------------------------------------------------------

def vmexit(machine: "Machine", exit_: VmExit, guest: ArchState | None = None) -> None:
    """Leave L2 for L1 with ``exit_`` (§B.6).  ``guest``: the L2 registers at the exit, if the
    caller has just captured them."""
    cpu, svm = machine.cpu, machine.svm
    vmcb_pa = svm.vmcb_pa
    if guest is None:
        guest = cpu.capture()
    guest[At.rip] = exit_.rip
    control_raw, control = _control(machine, vmcb_pa)
    save_raw, save = _save(machine, vmcb_pa)
    store_state(save, guest, GUEST_REGISTERS)
    control["exitcode"] = int(exit_.code)
    control["exitinfo1"], control["exitinfo2"] = exit_.info1, exit_.info2
    control["exitintinfo"], control["nrip"] = exit_.exit_int_info, exit_.next_rip
    assist = exit_.vmcb_instruction_bytes
    control["guest_instruction_count"] = assist[0] if assist else 0
    control["guest_instruction_bytes"] = list(assist[1:16]) if assist else [0] * 15
    shadow = INTERRUPT_SHADOW if guest[At.hflags] & uci.HF_INHIBIT_IRQ else 0
    control["interrupt_state"] = shadow | (GUEST_INTERRUPT_MASK if guest[At.rflags] & RFLAGS_IF else 0)
    int_ctl = svm.int_ctl                           # V_IRQ is clear if the guest took it
    if svm.v_intr_masking:
        int_ctl = int_ctl & ~V_TPR_MASK | cpu["cr8"] & 0xF
    control["int_ctl"] = int_ctl
    machine.memory.write(vmcb_pa, bytes(control_raw))
    machine.memory.write(vmcb_pa + SAVE_AREA_OFFSET, bytes(save_raw))
    _, hsave = _save(machine, svm.hsave_pa)
    host = ArchState(guest)
    load_state(host, hsave, HOST_REGISTERS)
    host[At.cr0] |= CR0_PE
    host[At.rflags] &= ~RFLAGS_VM
    host[At.dr7] = HOST_DR7
    host[At.hflags] &= ~uci.HF_INHIBIT_IRQ
    host.cpl = 0
    cpu.load(host)
    if svm.v_intr_masking:
        cpu["cr8"] = svm.host_cr8
    svm.vmcb_pa, svm.asid, svm.gif, svm.v_intr_masking = None, 0, False, False
    svm.vmexits += 1
    svm.int_ctl = svm.v_intr_vector = 0
    machine.leave_guest()
    machine.record_exit(exit_)


# -- an SMI taken in guest mode (semantics.md §C.7, §F.19) ----------------------------------------

def smm_fields(machine: "Machine") -> dict[str, int]:
    """The 64-bit state-save map's SVM fields for an SMI taken in guest mode: FED8h = 1 and
    FEE0h = the VMCB (KVM); the apm profile adds the host's CR0/CR3/CR4/EFER at FF28h-FF40h
    from the host-save area, where KVM leaves them."""
    svm = machine.svm
    if not svm.guest_mode:
        return {}
    fields = {"svm_guest": 1, "svm_guest_vmcb": svm.vmcb_pa}
    if machine.profile.smm_svm_host_fields:
        _, hsave = _save(machine, svm.hsave_pa)
        fields.update({f"svm_host_{name}": int(hsave[name]) for name in ("efer", "cr0", "cr3", "cr4")})
    return fields


def suspend_for_smm(machine: "Machine") -> None:
    """SMM runs outside guest mode; the VMCB address waits in the state-save map."""
    if machine.svm.guest_mode:
        machine.svm.vmcb_pa = None
        machine.leave_guest()


def resume_after_rsm(machine: "Machine", vmcb_pa: int) -> None:
    """RSM to a state saved in guest mode: L2 runs again under its VMCB's controls (the
    registers came from SMRAM; the host state is still in the host-save area)."""
    svm = machine.svm
    _, control = _control(machine, vmcb_pa)
    svm.vmcb_pa, svm.asid = vmcb_pa, int(control["guest_asid"])
    svm.int_ctl, svm.v_intr_vector = int(control["int_ctl"]), int(control["v_intr_vector"])
    svm.v_intr_masking = bool(svm.int_ctl & V_INTR_MASKING)
    machine.enter_guest(intercept_controls(machine, control), on_exit="l1")
