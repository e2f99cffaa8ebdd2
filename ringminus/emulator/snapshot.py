"""Machine snapshots: everything a run depends on — the CPU (Unicorn's whole saved state),
RAM, SMRAM and its control, SMM and event state, the virtual TSC, instruction count,
pending instruction-indexed events and a forwarded hypercall awaiting completion — so that
restoring reproduces the run bit for bit."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .machine import Machine


@dataclass(frozen=True)
class Snapshot:
    context: object                 # unicorn UcContext: every register Unicorn keeps
    svme: bool
    ram: np.ndarray
    smram: tuple[np.ndarray, ...]
    smram_register: int
    smm: object                     # smm.world.SmmState
    nmi_pending: bool
    halted: bool
    instructions: int
    instructions_exact: bool
    tsc: tuple[int, int]                    # the virtual TSC and the running guest's TSC_OFFSET
    scheduled: tuple
    console: bytes
    events: tuple
    pending_hypercall: object = None        # hypercalls.conduit.PendingHypercall
    svm: object = None                      # svm.SvmState
    interrupts: frozenset = frozenset()
    guest: object = None                    # intercepts.Guest of an L2 run by the guest's VMRUN


def take(machine: "Machine") -> Snapshot:
    return Snapshot(machine.uc.context_save(), machine.cpu.svme, machine.memory.ram.copy(),
                    tuple(r.data.copy() for r in machine.smram.ranges), machine.smram.register,
                    copy.copy(machine.smm), machine.nmi_pending, machine.halted, machine.instructions,
                    machine._instructions_exact, (machine.tsc.value, machine.tsc.offset), tuple(machine._scheduled),
                    bytes(machine.console.output), tuple(machine.events), machine._pending_hypercall,
                    copy.copy(machine.svm), frozenset(machine.interrupts),
                    machine.guest if machine.svm.guest_mode else None)


def restore(machine: "Machine", snap: Snapshot) -> None:
    if len(snap.smram) != len(machine.smram.ranges) or len(snap.ram) != len(machine.memory.ram):
        raise ValueError("snapshot is from a machine with other memory or SMRAM ranges")
    machine.memory.ram[:] = snap.ram
    for smram, data in zip(machine.smram.ranges, snap.smram):
        smram.data[:] = data
    machine.smram.register = snap.smram_register
    machine.smm = copy.copy(snap.smm)
    machine.smram.set_smm(machine.smm.in_smm)
    machine.uc.context_restore(snap.context)
    machine.cpu.svme = snap.svme
    machine.cpu.paging_epoch += 1
    machine.nmi_pending, machine.halted = snap.nmi_pending, snap.halted
    machine.instructions, machine._instructions_exact = snap.instructions, snap.instructions_exact
    machine.tsc.value, machine.tsc.offset = snap.tsc
    machine._scheduled = list(snap.scheduled)
    machine.console.output = bytearray(snap.console)
    machine.svm = copy.copy(snap.svm)
    machine.interrupts = set(snap.interrupts)
    if snap.guest is not None or machine.guest is not None and machine.guest.on_exit == "l1":
        machine.guest = snap.guest          # a host-side guest belongs to the caller, not the snapshot
    machine.events = list(snap.events)
    machine._pending_hypercall = snap.pending_hypercall
    # Memory changed behind Unicorn's back: drop every translation, and find the code sites
    # in the bytes as they are now.
    machine.uc.ctl_flush_tb()
    machine.sites.rescan()
    machine.forget_translations()
