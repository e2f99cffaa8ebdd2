"""The virtual clock: the time devices see, and timers that fire at instruction boundaries;
and the time-stamp counter the guest reads.

Deterministic by default: time is the count of instructions retired at a nominal rate of
NOMINAL_HZ (one instruction, one nanosecond), so a run and its replay from a snapshot see the
same times and their timers fire at the same instructions.  The time-stamp counter follows it.  Time moves inside a slice only
when instructions are counted (Unicorn counts only then): a machine whose devices read the
clock (the pc and q35 boards) counts every run.  ``host_time=True`` reads the host's
monotonic clock instead for ``now_ns`` (timers still fire by instruction count, converted at
the nominal rate: they are the run's events).  Timers are the machine's timed events
(``Core.at_time``), so runs with one armed count instructions exactly; while the CPU is
halted the clock moves on to the next timer (QEMU's clock runs while a CPU idles).
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

from unicorn import x86_const as X

from ..arch.msrs import MSR_TSC_AUX

if TYPE_CHECKING:
    from .cpu import Cpu
    from .machine import Core

NOMINAL_HZ = 1_000_000_000


class Timer:
    def __init__(self, callback: Callable[[], None]):
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def _fire(self, _machine) -> None:
        if not self.cancelled:
            self.callback()


class VirtualClock:
    def __init__(self, machine: "Core", host_time: bool = False):
        self._machine = machine
        self.host_time = host_time
        self._host_start = time.monotonic_ns()

    def now_ns(self) -> int:
        if self.host_time:
            return time.monotonic_ns() - self._host_start
        return self._machine.time_ns() * 1_000_000_000 // NOMINAL_HZ

    def add_timer(self, after_ns: int, callback: Callable[[], None]) -> Timer:
        """``callback()`` at the first instruction boundary ``after_ns`` (virtual) from now."""
        if after_ns < 0:
            raise ValueError(f"a timer cannot fire in the past ({after_ns} ns)")
        timer = Timer(callback)
        ticks = -(-after_ns * NOMINAL_HZ // 1_000_000_000)            # rounded up
        self._machine.at_time(self._machine.time_ns() + ticks, timer._fire)
        return timer


def _signed64(value: int) -> int:
    value &= 0xFFFF_FFFF_FFFF_FFFF
    return value - (1 << 64) if value >> 63 else value


class VirtualTsc:
    """RDTSC/RDTSCP read the time-stamp counter: the clock (``now_ns``) at HZ, 1 GHz — one tick
    per nanosecond, so at the nominal rate one tick per instruction retired, plus the time
    spent halted; with a host clock, the host's monotonic nanoseconds.  Where a slice's
    instructions are not counted the virtual clock stands still inside it, so each read is at
    least one tick past the last: a guest that waits for the counter to move sees it move, and
    a run and its replay from a snapshot read the same values.  A guest run by the guest's
    own hypervisor reads it plus the VMCB's TSC_OFFSET (APM Table B-1, offset 0x050).

    ``adjust`` is IA32_TSC_ADJUST (MSR 3Bh, SDM 17.17.3): added to every read.  A WRMSR to
    the TSC (MSR 10h) sets the counter without the VMCB's offset — L1's, as KVM does for a
    write L1 does not intercept — and moves ``adjust`` by as much; a write to TSC_ADJUST
    moves the counter by as much."""
    HZ = 1_000_000_000

    def __init__(self, cpu: "Cpu", clock: VirtualClock):
        self.cpu = cpu
        self.clock = clock
        self.value = -1                           # the last value read, without the offset (none yet)
        self.offset = 0
        self.adjust = 0                           # WRMSR to the TSC: added to every read

    def read(self) -> int:
        self.value = max(self.clock.now_ns() * self.HZ // 1_000_000_000, self.value + 1)
        return (self.value + self.adjust + self.offset) & 0xFFFF_FFFF_FFFF_FFFF

    def write(self, value: int) -> None:
        self.adjust += value - (self.read() - self.offset)
        self.adjust = _signed64(self.adjust)

    def write_adjust(self, value: int) -> None:
        self.adjust = _signed64(value)

    def rdtsc(self) -> int:
        seen = self.read()
        self.cpu.fast.write(X.UC_X86_REG_RAX, seen & 0xFFFF_FFFF)
        self.cpu.fast.write(X.UC_X86_REG_RDX, seen >> 32)
        return 1                                  # the native instruction is skipped

    def rdtscp(self) -> int:
        self.cpu.fast.write(X.UC_X86_REG_RCX, self.cpu.fast.read_msr(MSR_TSC_AUX) & 0xFFFF_FFFF)
        return self.rdtsc()
