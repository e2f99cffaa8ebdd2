"""Machine snapshots: everything the rest of a run depends on, so that ``restore`` followed by
the same calls reproduces it bit for bit — results, events, counters and all.

A snapshot is a tuple of *parts*, one per piece of state, each taken and put back by its own
pair of functions (PARTS).  What they hold, and why each is there:

* the CPU: Unicorn's whole saved state (registers, hidden segment state, NMI blocking, the
  interrupt shadow, the lazy-flags fields) and the guest-visible EFER.SVME;
* RAM, each SMRAM range's bytes, the SMRAM control register and which ranges are mapped
  (hidden or showing their view: a hidden range is revealed — and counted as a swap — at its
  first touch, so the mapping decides the ``smram_swaps`` counter and where slices end);
* SMM and SVM state; the guest run by the guest's own hypervisor (a copy: its MONITOR state
  changes as it runs), or, for a guest the caller entered, only its MONITOR state — the
  guest itself and its intercepts belong to the caller;
* pending events (NMI, INTR vectors, the halt), the instruction-indexed events still
  scheduled with their callbacks and the order number the next one gets, the event log, a
  forwarded hypercall awaiting ``resume``, the exit ``skip_instruction`` would skip, the
  breakpoint the machine stopped at (the next run passes it);
* the instruction count (and whether it is exact), the virtual TSC, the console;
* every counter ``result().stats`` reports — the machine's, the port bus's, the unclaimed
  ports, SMRAM swaps — restored, not added to: a replay counts from the snapshot's values,
  so it reports what the first run reported;
* the chipset's registers (PCI configuration, the PCI address latch, APM status, ICH9's
  SMI_EN and PMBASE, whose I/O ports it re-registers);
* the run loop's arming state: an instruction being stepped over (a code site run alone in
  a one-instruction slice), the opcodes flagged for code sites (the interrupt-window ones
  are added by the first ``raise_intr``, and the adding reads translated code, which may
  map a hidden SMRAM range), the sites found that translated code does not honour yet, and
  which address spaces the loop has armed (it re-arms when that set grows).  The sites
  armed themselves are a cache: both ``snapshot()`` and ``restore()`` make code sites arm
  again from nothing (``CodeSites.rescan``), so a replay arms where the first run did.

Taking and restoring both drop every translation cache — ringminus's decode cache and
linear-address cache, QEMU's TLB and its translated blocks — so the run after ``snapshot()``
and the run after ``restore()`` start from the same empty caches.  This matters beyond speed:
Unicorn counts an instruction that QEMU restarts after it wrote into its own translated block
(precise self-modifying code) twice, so the count depends on where blocks begin; and a TLB
entry may outlive a page-table write until the guest flushes it, as on hardware.  A CPU may
drop a cached translation at any time (a guest can count only on its own invalidations), so
taking a snapshot changes no architectural result.

Not held: the code sites armed (a cache, above), and what the caller configures — memory
size, CPU model, profile, breakpoints, port devices the caller registered, the hypercall
filter and handler, a guest entered with ``enter_guest``.  Nor can any snapshot hold the
state by which Unicorn decides whether a store into the block it is running is caught (a
fresh machine misses one that a machine which ran the same code before catches): code that
writes into itself may replay differently.
"""
from __future__ import annotations

import copy
import itertools
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, NamedTuple

from . import sites as sites_module

if TYPE_CHECKING:
    from .machine import Machine


class Part(NamedTuple):
    name: str
    take: Callable[["Machine"], object]
    put: Callable[["Machine", object], None]


# -- the parts ------------------------------------------------------------------------------------

def _take_cpu(machine: "Machine") -> tuple:
    return machine.uc.context_save(), machine.cpu.svme


def _put_cpu(machine: "Machine", state: tuple) -> None:
    context, svme = state
    machine.uc.context_restore(context)
    machine.cpu.svme = svme
    machine.cpu.paging_epoch += 1           # the Cpu's cached address space is stale now


def _take_memory(machine: "Machine") -> tuple:
    return machine.memory.ram.copy(), tuple(r.data.copy() for r in machine.smram.ranges)


def _put_memory(machine: "Machine", state: tuple) -> None:
    ram, smram = state
    machine.memory.ram[:] = ram
    for smram_range, data in zip(machine.smram.ranges, smram):
        smram_range.data[:] = data


def _take_smm(machine: "Machine") -> object:
    return copy.copy(machine.smm)


def _put_smm(machine: "Machine", smm) -> None:
    machine.smm = copy.copy(smm)


def _take_views(machine: "Machine") -> tuple:
    smram = machine.smram
    return smram.register, tuple(r.hidden for r in smram.ranges), smram.swaps


def _put_views_part(machine: "Machine", state: tuple) -> None:
    register, hidden, swaps = state
    # Mapping and unmapping makes Unicorn look addresses up through the guest's page tables;
    # where they map nothing it leaves a #PF in flight and CR2 clobbered: keep the CPU as put.
    cpu = machine.uc.context_save()
    _put_views(machine.smram, register, machine.smm.in_smm, hidden)
    machine.uc.context_restore(cpu)
    machine.smram.swaps = swaps


def _put_views(smram, register: int, in_smm: bool, hidden: tuple[bool, ...]) -> None:
    """Map the SMRAM ranges as the snapshot had them.  A mapped range always shows its right
    view (smram.py), so the mapping is one flag per range: first hide every range (each
    range's view changes in one of two flips of visibility — every range visible, then none),
    then reveal those the snapshot had mapped."""
    for everything_visible in (True, False):
        smram.register = 0xFF if everything_visible else 0      # (G_SMRAME | D_OPEN) or nothing
        smram.in_smm = everything_visible
        smram.update()
    smram.register = register
    smram.set_smm(in_smm)
    for smram_range, was_hidden in zip(smram.ranges, hidden):
        if not was_hidden:
            smram.reveal(smram_range.base)


def _take_svm(machine: "Machine") -> tuple:
    guest = machine.guest
    own = copy.copy(guest) if machine.svm.guest_mode and guest is not None else None
    return copy.copy(machine.svm), own, guest.monitor_armed if guest is not None else False


def _put_svm(machine: "Machine", state: tuple) -> None:
    svm, own, monitor_armed = state
    machine.svm = copy.copy(svm)
    if own is not None or machine.guest is not None and machine.guest.on_exit == "l1":
        machine.guest = copy.copy(own)      # a guest the caller entered stays the caller's
    if machine.guest is not None:
        machine.guest.monitor_armed = monitor_armed


def _take_events(machine: "Machine") -> tuple:
    following = next(machine._sequence)     # the order number the next scheduled event gets
    machine._sequence = itertools.count(following)
    return (machine.nmi_pending, frozenset(machine.interrupts), machine.halted, tuple(machine._scheduled),
            following, tuple(machine.events), machine._pending_hypercall, machine.last_exit,
            machine._resuming_at_breakpoint)


def _put_events(machine: "Machine", state: tuple) -> None:
    (machine.nmi_pending, interrupts, machine.halted, scheduled, following, events,
     machine._pending_hypercall, machine.last_exit, machine._resuming_at_breakpoint) = state
    machine.interrupts = set(interrupts)
    machine._scheduled = list(scheduled)    # a heap stays a heap
    machine._sequence = itertools.count(following)
    machine.events = list(events)


def _take_count(machine: "Machine") -> tuple:
    return (machine.instructions, machine._instructions_exact, machine.tsc.value, machine.tsc.offset,
            bytes(machine.console.output))


def _put_count(machine: "Machine", state: tuple) -> None:
    machine.instructions, machine._instructions_exact, machine.tsc.value, machine.tsc.offset, console = state
    machine.console.output = bytearray(console)


def _take_stats(machine: "Machine") -> tuple:
    ports = machine.ports
    return Counter(machine.stats), Counter(ports.stats), Counter(ports.unclaimed)


def _put_stats(machine: "Machine", state: tuple) -> None:
    for live, saved in zip((machine.stats, machine.ports.stats, machine.ports.unclaimed), state):
        live.clear()
        live.update(saved)


def _take_chipset(machine: "Machine") -> tuple:
    chipset = machine.chipset
    return (chipset.address, chipset.apm_status, chipset.smi_enable,
            {where: bytes(function.config) for where, function in chipset.functions.items()})


def _put_chipset(machine: "Machine", state: tuple) -> None:
    chipset = machine.chipset
    chipset.address, chipset.apm_status, chipset.smi_enable, configs = state
    for where, config in configs.items():
        chipset.functions[where].config[:] = config
    lpc = getattr(chipset, "lpc", None)
    if lpc is not None:                     # PMBASE decides where SMI_EN's ports are: re-derive
        lpc.on_write(next(iter(lpc.writable)))


def _take_arming(machine: "Machine") -> tuple:
    return (machine._stepping_over, machine.sites.opcodes, frozenset(machine.sites.physical),
            machine._address_space, dict(machine._armed_spaces), machine._armed_epoch == machine.cpu.paging_epoch)


def _put_arming(machine: "Machine", state: tuple) -> None:
    stepping_over, opcodes, physical, address_space, armed_spaces, arming_current = state
    machine._stepping_over = stepping_over
    sites = machine.sites
    if sites.opcodes != opcodes:
        # Flagging opcodes only ever adds (set_opcodes), and the adding reads the code
        # translated so far, which may map a hidden SMRAM range: the replay must flag them
        # when the first run did.  (A CodeSites method should own this.)
        sites.opcodes = opcodes
        sites._opcodes_pattern = sites_module._pattern(opcodes)
    # The run loop re-arms when ``physical`` grows past what it armed in this address space.
    sites.physical.clear()
    sites.physical.update(physical)
    machine._address_space, machine._armed_spaces = address_space, dict(armed_spaces)
    machine._armed_epoch = machine.cpu.paging_epoch if arming_current else -1


# Restored in this order: the CPU before the parts that read its paging epoch; the SMRAM views
# last, as any read of guest memory on the way would map a hidden range (and count a swap).
PARTS = (
    Part("memory", _take_memory, _put_memory),
    Part("smm", _take_smm, _put_smm),
    Part("cpu", _take_cpu, _put_cpu),
    Part("svm", _take_svm, _put_svm),
    Part("events", _take_events, _put_events),
    Part("count", _take_count, _put_count),
    Part("stats", _take_stats, _put_stats),
    Part("chipset", _take_chipset, _put_chipset),
    Part("arming", _take_arming, _put_arming),
    Part("views", _take_views, _put_views_part),
)


@dataclass(frozen=True)
class Snapshot:
    parts: tuple                    # one state per PARTS entry, in its order
    ram_size: int
    smram_ranges: tuple[tuple[int, int], ...]


def take(machine: "Machine") -> Snapshot:
    # Both ends of a replay start from empty translation caches (the module docstring).
    machine._decoded.clear()
    machine.forget_tlb()
    machine.sites.rescan()
    return Snapshot(tuple(part.take(machine) for part in PARTS), machine.memory.ram_size,
                    tuple((r.base, r.size) for r in machine.smram.ranges))


def restore(machine: "Machine", snap: Snapshot) -> None:
    if snap.ram_size != machine.memory.ram_size or \
            snap.smram_ranges != tuple((r.base, r.size) for r in machine.smram.ranges):
        raise ValueError("snapshot is from a machine with other memory or SMRAM ranges")
    for part, state in zip(PARTS, snap.parts):
        part.put(machine, state)
    machine._decoded.clear()
    machine.forget_tlb()
    machine.sites.rescan()              # memory changed behind Unicorn's back
    machine._stop = None
