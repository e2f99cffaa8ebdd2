"""In-guest SVM as a feature of the machine: the SVM instructions (executors; VMRUN in the
hook when nothing can fault), GIF (a hold on every event), the virtual interrupt (an event
source after INTR) and V_INTR_MASKING (how INTR is masked as L2), the MSRs it keeps, the
CPUID table, what INIT resets, and SVM's parts of snapshots and results."""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from ..arch.control import EFER_SVME, RFLAGS_IF, RFLAGS_VM
from ..arch.exceptions import GuestFault, Vector
from ..arch.exitcodes import ExitCode
from ..arch.models import MODELS, VNMI
from ..emulator.delivery import Event, EventKind
from ..emulator.memory import MissingMemory
from ..emulator.plugins import Msr, OnExit, Part, Source
from ..emulator.cpu import At
from ..emulator.result import Section, StopReason
from ..intercepts.plugin import l1_checks, leave_guest
from ..intercepts.vmcb import V_GIF, V_IGN_TPR, V_INTR_PRIO_MASK, V_INTR_PRIO_SHIFT, V_IRQ, V_NMI
from . import msrs, npt, world
from .cpuid import cpuid_table
from .instructions import EXECUTE, vmcb_address
from .state import SvmState

if TYPE_CHECKING:
    from ..decode.decoder import Instruction
    from ..emulator.plugins import HookContext
    from ..machine import Machine


EXECUTES = tuple(EXECUTE)                # the decode-table rows this feature executes


def install(machine: "Machine") -> None:
    machine.svm = SvmState()
    machine.svm_caches = world.Caches(machine.cpu_model)
    machine.add_stat_keys("vmruns")
    for row in EXECUTES:
        in_hook = IN_HOOK.get(row)
        machine.add_executor(row, lambda insn: _execute(machine, insn), in_hook=(
            lambda insn, hook, in_hook=in_hook: in_hook(machine, insn, hook)) if in_hook else None,
            leads_on=row in LEADING)
    machine.add_event_hold(lambda: not machine.svm.gif)
    machine.add_event_source(Source(50, "virtual interrupt", lambda m: bool(m.svm.int_ctl & V_IRQ),
                                    lambda m: bool(m.svm.int_ctl & V_IRQ) and _virtual_interrupt_ready(m),
                                    ExitCode.VINTR, _take_virtual_interrupt, _consume_virtual_interrupt,
                                    window=True))
    if machine.svm_caches.features & VNMI:         # (sources are asked at every boundary and hook)
        machine.add_event_source(Source(45, "virtual nmi", _virtual_nmi_pending, _virtual_nmi_ready, None,
                                        _take_virtual_nmi, _consume_virtual_nmi, window=True))
    machine.set_intr_unmasked(lambda: _intr_unmasked(machine))
    machine.add_msr(Msr(lambda msr: msrs.emulates(machine, msr), lambda msr: msrs.read(machine, msr),
                        lambda msr, value: msrs.write(machine, msr, value)))
    tables: dict[str, dict] = {}        # profile name -> CPUID table

    def cpuid() -> dict:
        table = tables.get(machine.profile.name)
        if table is None:
            table = tables[machine.profile.name] = cpuid_table(MODELS[machine.cpu_model], machine.profile)
        return table

    machine.set_cpuid(cpuid)
    machine.add_reset_hook(lambda: reset(machine))
    machine.add_snapshot_part(Part(40, "svm", _take_svm, _put_svm))
    machine.add_result_section(lambda stop: Section(
        "svm", {**machine.svm.as_dict(), "pending_interrupts": sorted(machine.interrupts)}))


def reset(machine: "Machine") -> None:
    """As INIT leaves SVM (KVM's kvm_vcpu_reset): out of guest mode, GIF = 1; the SVM MSRs
    keep their values."""
    if machine.svm.guest_mode:
        leave_guest(machine)
    machine.svm = SvmState(hsave_pa=machine.svm.hsave_pa, vm_cr=machine.svm.vm_cr)
    machine.set_second_stage(None)
    machine.tsc.offset = 0


def _execute(machine: "Machine", insn: "Instruction") -> None:
    """An SVM instruction L1 does not intercept (or outside guest mode)."""
    rip = insn.address
    if insn.row.name == "vmrun" and machine.gate is not None:
        # Only a caller-made guest can lack the VMRUN intercept (VMRUN requires it).
        machine.request_stop(StopReason.UNSUPPORTED, detail="VMRUN in a guest whose Python L1 does "
                             "not intercept it (a third level of nesting)")
        return
    fault = l1_checks(machine).check(insn)
    if fault is not None:
        machine.deliver(Event(fault.vector, EventKind.EXCEPTION, rip, fault.error_code))
        return
    try:
        EXECUTE[insn.row.name](machine, insn)
    except GuestFault as fault:
        machine.deliver(Event(fault.vector, EventKind.EXCEPTION, rip, fault.error_code))
        return
    except MissingMemory as missing:
        machine.request_stop(StopReason.MEMORY, detail=f"{insn.row.name}: {missing}")
        return
    machine.retire(1)
    if insn.row.name == "vmrun":
        machine.stats["vmruns"] += 1


def _none_of_the_checks_can_fire(machine: "Machine", insn: "Instruction", state) -> bool:
    """An SVM instruction of L1 whose #UD/#GP checks cannot fire, whatever their order (the
    profile's): no LOCK, protected mode, not VM86, CPL 0, EFER.SVME — and no L1 of its own
    to ask.  rAX is checked where it is used (vmcb_address)."""
    return machine.gate is None and not insn.prefixes.lock and not state.cpl and state.protected \
        and not state[At.rflags] & RFLAGS_VM and bool(state[At.efer] & EFER_SVME)


def _vmrun_in_hook(machine: "Machine", insn: "Instruction", hook: "HookContext") -> bool:
    """VMRUN from L1 inside a hook (its code site, once a VMCB asked for VMRUN's intercept,
    else the #UD hook), when nothing faults: the world switch without ending the slice — a
    guest hypervisor's loop.  False: the run loop must look at it."""
    state = hook.state
    if not _none_of_the_checks_can_fire(machine, insn, state):
        return False
    try:
        vmcb = vmcb_address(machine, insn, state[At.rax])
        rip = world.vmrun(machine, vmcb, insn.next_rip, hook)
    except (GuestFault, MissingMemory):
        return False                       # the run loop executes it again and reports it
    machine.retire(1)
    machine.stats["vmruns"] += 1
    machine.cpu.rip = rip                    # through the API: a code hook's block ends here
    machine.continue_in_hook()
    return True


def _entry_path_in_hook(machine: "Machine", insn: "Instruction", hook: "HookContext") -> bool:
    """CLGI, STGI, VMLOAD or VMSAVE from L1 inside the #UD hook, when its checks pass: a
    hypervisor's entry (CLGI; VMLOAD; VMRUN; VMSAVE; STGI) without ending the slice five
    times.  False: the run loop must look at it (a fault, or a guest's own L1 to ask)."""
    if not _none_of_the_checks_can_fire(machine, insn, hook.state):
        return False
    try:
        EXECUTE[insn.row.name](machine, insn)  # RIP through the API: the hook's block ends here
    except (GuestFault, MissingMemory):
        return False                       # the run loop executes it again and reports it
    machine.retire(1)
    machine.continue_in_hook()
    return True


# A hypervisor's entry is CLGI; VMLOAD; VMRUN and its exit path VMSAVE; STGI (the core chains them).
LEADING = frozenset({"clgi", "vmload", "vmsave"})
IN_HOOK = {"vmrun": _vmrun_in_hook, "clgi": _entry_path_in_hook, "stgi": _entry_path_in_hook,
           "vmload": _entry_path_in_hook, "vmsave": _entry_path_in_hook}


def _intr_unmasked(machine: "Machine") -> bool:
    """As L2 with V_INTR_MASKING, L1's RFLAGS.IF masks INTR, otherwise the running code's."""
    svm = machine.svm
    if svm.guest_mode and svm.v_intr_masking:
        return svm.host_if
    return bool(machine.cpu["rflags"] & RFLAGS_IF)


def _virtual_interrupt_ready(machine: "Machine") -> bool:
    """V_IRQ is taken (APM §15.21.4) when the guest's RFLAGS.IF is set, no shadow holds it,
    and its priority is above V_TPR unless V_IGN_TPR."""
    svm, cpu = machine.svm, machine.cpu
    if not svm.guest_mode or not cpu["rflags"] & RFLAGS_IF or cpu.interrupt_shadow:
        return False
    if world.virtual_gif(machine) and not svm.int_ctl & V_GIF:
        return False
    tpr = cpu["cr8"] if svm.v_intr_masking else svm.int_ctl & 0xF
    return bool(svm.int_ctl & V_IGN_TPR) or (svm.int_ctl & V_INTR_PRIO_MASK) >> V_INTR_PRIO_SHIFT > tpr


def _take_virtual_interrupt(machine: "Machine") -> None:
    machine.svm.int_ctl &= ~V_IRQ
    machine.deliver(Event(machine.svm.v_intr_vector, EventKind.EXTERNAL, machine.cpu.rip))


def _virtual_nmi_pending(machine: "Machine") -> bool:
    """V_NMI set under vNMI, and V_GIF not holding it (int_ctl first: the common answer)."""
    return bool(machine.svm.int_ctl & V_NMI) and world.virtual_nmi(machine) and \
        not (world.virtual_gif(machine) and not machine.svm.int_ctl & V_GIF)


def _virtual_nmi_ready(machine: "Machine") -> bool:
    return _virtual_nmi_pending(machine) and not machine.cpu.nmi_blocked


def _take_virtual_nmi(machine: "Machine") -> None:
    """V_NMI becomes the guest's NMI, through its IDT, and blocks the next (V_NMI_MASK);
    no intercept applies: it is L1's own doing."""
    machine.svm.int_ctl &= ~V_NMI
    machine.deliver(Event(Vector.NMI, EventKind.NMI, machine.cpu.rip))
    machine.cpu.nmi_blocked = True


def _consume_virtual_nmi(machine: "Machine") -> None:
    machine.svm.int_ctl &= ~V_NMI


def _consume_virtual_interrupt(machine: "Machine") -> None:
    machine.svm.int_ctl &= ~V_IRQ


def _take_svm(machine: "Machine") -> tuple:
    """SVM's state; the guest the guest's own hypervisor runs (its controls: it is built again
    for the machine restored, which need not be this one); MONITOR's arming."""
    guest = machine.gate
    own = guest.controls if machine.svm.guest_mode and guest is not None else None
    return (copy.copy(machine.svm), own, guest.monitor_armed if guest is not None else False,
            copy.copy(guest.pause_filter) if guest is not None else None)


def _put_svm(machine: "Machine", state: tuple) -> None:
    svm, own, monitor_armed, pause_filter = state
    machine.svm = copy.copy(svm)
    machine.set_second_stage(npt.stage_for(machine))
    if own is not None:
        own = copy.copy(own)
        world.bind_maps(machine, own)           # the maps as this machine's memory holds them
        world.run_as_l2(machine, own, arm=False)
    elif machine.gate is not None and machine.gate.on_exit is OnExit.L1:
        machine.gate = None                # (a guest the caller entered stays the caller's)
    if machine.gate is not None:
        machine.gate.monitor_armed = monitor_armed
        machine.gate.pause_filter = copy.copy(pause_filter)
