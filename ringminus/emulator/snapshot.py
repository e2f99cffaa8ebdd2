"""Machine snapshots: everything the rest of a run depends on, so that ``restore`` followed by
the same calls reproduces it bit for bit — results, events, counters and all.

A snapshot is a tuple of *parts*, one per piece of state, each taken and put back by its own
pair of functions: the core's (CORE_PARTS, below) and those features add (plugins.Part: SMM's
state, SMRAM's bytes and views and the chipset's registers; SVM's state and its guest; the
intercepts' last exit; a forwarded hypercall).  What they hold, and why each is there:

* the CPU: Unicorn's whole saved state (registers, hidden segment state, NMI blocking, the
  interrupt shadow, the lazy-flags fields) and the guest-visible EFER.SVME;
* RAM, each SMRAM range's bytes, the SMRAM control register and which ranges are mapped
  (hidden or showing their view: a hidden range is revealed — and counted as a swap — at its
  first touch, so the mapping decides the ``smram_swaps`` counter and where slices end);
* SMM and SVM state; the guest run by the guest's own hypervisor (a copy: its MONITOR state
  changes as it runs), or, for a guest the caller entered, only its MONITOR state — the
  guest itself and its intercepts belong to the caller;
* pending events (NMI, INIT, INTR vectors, the halt), the instruction-indexed events still
  scheduled with their callbacks and the order number the next one gets, the event log, a
  forwarded hypercall awaiting ``resume``, the exit ``skip_instruction`` would skip, the
  breakpoint the machine stopped at (the next run passes it);
* the instruction count (and whether it is exact), the virtual TSC, the console;
* DEBUGCTL and the last branch recorded (lbr.py: the recording resumes with the next
  branch after the snapshot's point);
* every counter ``result().stats`` reports — the machine's, the port bus's, the unclaimed
  ports, SMRAM swaps — restored, not added to: a replay counts from the snapshot's values,
  so it reports what the first run reported;
* the PCI bus: the address latch and every function's configuration space (BARs are placed
  again from it); the chipset's APM status and ICH9's SMI_EN, whose ports follow PMBASE;
* the run loop's arming state: an instruction being stepped over (a code site run alone in
  a one-instruction slice), the opcodes flagged for code sites (the interrupt-window ones
  are added by the first interrupt raised or pending, and the adding reads translated code,
  which may map a hidden SMRAM range), the sites found that translated code does not honour yet, and
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

import itertools
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .plugins import Part
from .result import EventLog

if TYPE_CHECKING:
    from .machine import Core as Machine


# -- the parts ------------------------------------------------------------------------------------

def _take_cpu(machine: "Machine") -> tuple:
    return machine.uc.context_save(), machine.cpu.svme


def _put_cpu(machine: "Machine", state: tuple) -> None:
    context, svme = state
    machine.uc.context_restore(context)
    machine.cpu.breakpoints.rearm()         # the context holds pointers to QEMU's breakpoint objects
    machine.cpu.svme = svme
    machine.cpu.paging_epoch += 1           # the Cpu's cached address space is stale now


def _take_memory(machine: "Machine"):
    return machine.memory.ram.copy()


def _put_memory(machine: "Machine", ram) -> None:
    machine.memory.ram[:] = ram


def _take_events(machine: "Machine") -> tuple:
    following = next(machine._sequence)     # the order number the next scheduled event gets
    machine._sequence = itertools.count(following)
    return (machine.nmi_pending, machine.init_pending, frozenset(machine.interrupts), machine.halted,
            tuple(machine._scheduled), tuple(machine._timers), machine.idle_ns, following, tuple(machine.events),
            machine.events.unlisted, machine._resuming_at_breakpoint)


def _put_events(machine: "Machine", state: tuple) -> None:
    (machine.nmi_pending, machine.init_pending, interrupts, machine.halted, scheduled, timers, machine.idle_ns,
     following, events, unlisted, machine._resuming_at_breakpoint) = state
    machine.interrupts = set(interrupts)
    machine._scheduled = list(scheduled)    # a heap stays a heap
    machine._timers = list(timers)
    machine._sequence = itertools.count(following)
    machine.events = EventLog(events, machine.events.limit, unlisted)


def _take_count(machine: "Machine") -> tuple:
    return (machine.instructions, machine._instructions_exact, machine.tsc.value, machine.tsc.offset,
            machine.tsc.adjust, bytes(machine.console.output))


def _put_count(machine: "Machine", state: tuple) -> None:
    machine.instructions, machine._instructions_exact, machine.tsc.value, machine.tsc.offset, machine.tsc.adjust, \
        console = state
    machine.console.output = bytearray(console)


def _take_stats(machine: "Machine") -> tuple:
    ports = machine.ports
    return Counter(machine.stats), Counter(ports.stats), Counter(ports.unclaimed)


def _put_stats(machine: "Machine", state: tuple) -> None:
    for live, saved in zip((machine.stats, machine.ports.stats, machine.ports.unclaimed), state):
        live.clear()
        live.update(saved)


def _take_arming(machine: "Machine") -> tuple:
    return (machine._stepping_over, machine.sites.state(), machine._address_space, dict(machine._armed_spaces),
            machine._armed_epoch == machine.cpu.paging_epoch)


def _put_arming(machine: "Machine", state: tuple) -> None:
    stepping_over, sites, address_space, armed_spaces, arming_current = state
    machine._stepping_over = stepping_over
    machine.sites.restore(sites)
    machine._address_space, machine._armed_spaces = address_space, dict(armed_spaces)
    machine._armed_epoch = machine.cpu.paging_epoch if arming_current else -1


# Restored in ``order``: the CPU before the parts that read its paging epoch; features slot
# theirs in between (SMM's state before the CPU, SMRAM's views last: any read of guest memory
# on the way would map a hidden range and count a swap).
CORE_PARTS = (
    Part(10, "memory", _take_memory, _put_memory),
    Part(30, "cpu", _take_cpu, _put_cpu),
    Part(50, "events", _take_events, _put_events),
    Part(60, "count", _take_count, _put_count),
    Part(65, "lbr", lambda machine: machine.lbr.state(), lambda machine, state: machine.lbr.restore(state)),
    Part(70, "stats", _take_stats, _put_stats),
    Part(75, "pci", lambda machine: machine.pci.state(), lambda machine, state: machine.pci.restore(state)),
    Part(90, "arming", _take_arming, _put_arming),
)


@dataclass(frozen=True)
class Snapshot:
    parts: tuple                    # (name, state) per part, in restore order
    shape: tuple                    # what a machine must have to take it: RAM size, SMRAM ranges…


def _shape(machine: "Machine") -> tuple:
    return (machine.memory.ram_size, *(part.shape(machine) for part in machine._parts if part.shape))


def take(machine: "Machine") -> Snapshot:
    # Both ends of a replay start from empty translation caches (the module docstring).
    machine._decoded.clear()
    machine.forget_tlb()
    machine.sites.rescan()
    return Snapshot(tuple((part.name, part.take(machine)) for part in machine._parts), _shape(machine))


def restore(machine: "Machine", snap: Snapshot) -> None:
    if snap.shape != _shape(machine) or [name for name, _ in snap.parts] != [part.name for part in machine._parts]:
        raise ValueError("snapshot is from a machine with other memory, SMRAM ranges or features")
    for part, (_, state) in zip(machine._parts, snap.parts):
        part.put(machine, state)
    machine._decoded.clear()
    machine.forget_tlb()
    machine.sites.rescan()              # memory changed behind Unicorn's back
    machine._stop = None
