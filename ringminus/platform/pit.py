"""The 8254 programmable interval timer at ports 0x40-0x43 and port 0x61 (channel 2's gate,
the speaker data bit, OUT2 and the refresh toggle), as QEMU 7.2 builds them
(hw/timer/i8254.c, i8254_common.c, hw/audio/pcspk.c; reference/platform.md §7.2, §7.3, §9).

Nothing ticks: a channel keeps the virtual time its count was loaded at, and its count and OUT
are computed from the nanoseconds elapsed since, at 1,193,182 Hz, exactly as QEMU's
pit_get_count and pit_get_out do — QEMU's quirks included: the gate only restarts modes 1, 2,
3 and 5 on a rising edge and never stops counting, the BCD flag is kept and reported but counts
are binary, modes 6 and 7 count as mode 2 but give OUT as mode 0, a control word changes the
mode without reloading, port 0x43 reads 0.  Port 0x61's bit 4 toggles on every read
(pcspk_io_read's dummy refresh clock, not a function of time).

Channel 0's OUT drives ``irq0(level)``.  QEMU re-evaluates it at every transition
(pit_irq_timer_update at pit_get_next_transition_time, whose rounding adds an update 1 ns
before most transitions that repeats the level).  The same updates, with the same levels,
are made here, in order; but a timer is armed only for the next one that takes the level
from 0 to 1.  The others — lowering it, or repeating it — are made late: just before that
one, or at the next write to the PIT.  On an edge-triggered input such as ISA IRQ0 they have
no effect of their own, so the 8259 sees QEMU's edges at QEMU's times, with one timer per
period (modes 2 and 3) and none once a one-shot has fired.  One corner differs: after the
8259's ICW1 forgets that IRQ0 is high, QEMU's repeated raise in mode 3 latches IRQ0 again at
the half period; here that happens at the next rising edge (or PIT write).

The time of an access is ``clock.now_ns()``: the instructions retired before the IN or OUT.
The core's clock moves inside a slice only while it counts instructions (a limit, a pending
timer, or ``exact_instructions``, which the boards set); in a slice run uncounted, an access
sees the time the slice began."""
from __future__ import annotations

from typing import Callable

from ..emulator.clock import Timer
from .byteregs import ByteRegion, ByteRegions, ByteRegisterDevice

PIT_FREQ = 1_193_182
NS_PER_SECOND = 1_000_000_000
PIT_PORT, SPEAKER_PORT = 0x40, 0x61
CONTROL = 3                             # offset of the mode/command register
RW_LSB, RW_MSB, RW_WORD0, RW_WORD1 = 1, 2, 3, 4
MAX_COUNT = 0x10000                     # a count of 0
MAX_CATCH_UP = 4096                     # updates made at once before the rest are skipped
MAX_LOOKAHEAD = 8                       # updates looked through for the next one that raises IRQ0

# QEMU's vmstate_pit_channel fields (next_transition_time is the PIT's, for channel 0).
FIELDS = ("count", "latched_count", "count_latched", "status_latched", "status", "read_state",
          "write_state", "write_latch", "rw_mode", "mode", "bcd", "gate", "count_load_time")

# pit_get_count and pit_get_out by mode, from d ticks since the load and the count; QEMU's
# ``default`` cases are the fallbacks (modes 6 and 7).
COUNT = {0: lambda d, n: (n - d) & 0xFFFF, 1: lambda d, n: (n - d) & 0xFFFF,
         4: lambda d, n: (n - d) & 0xFFFF, 5: lambda d, n: (n - d) & 0xFFFF,
         3: lambda d, n: n - (2 * d) % n}
COUNT_DEFAULT = lambda d, n: n - d % n                                  # noqa: E731
OUT = {1: lambda d, n: d < n, 2: lambda d, n: d % n == 0 and d != 0,
       3: lambda d, n: d % n < (n + 1) >> 1, 4: lambda d, n: d == n, 5: lambda d, n: d == n}
OUT_DEFAULT = lambda d, n: d >= n                                       # noqa: E731


def _mode_2_next(d: int, n: int) -> int:
    base = d - d % n
    return base + n if d == base and d != 0 else base + n + 1


def _mode_3_next(d: int, n: int) -> int:
    base, half = d - d % n, (n + 1) >> 1
    return base + half if d - base < half else base + n


def _strobe_next(d: int, n: int) -> int | None:
    return n if d < n else n + 1 if d == n else None


# pit_get_next_transition_time in ticks (None: no further transition).
NEXT = {2: _mode_2_next, 3: _mode_3_next, 4: _strobe_next, 5: _strobe_next}
NEXT_DEFAULT = lambda d, n: n if d < n else None                        # noqa: E731


def ticks(elapsed_ns: int) -> int:
    """PIT clocks in ``elapsed_ns`` (muldiv64: rounded down)."""
    return max(elapsed_ns, 0) * PIT_FREQ // NS_PER_SECOND


class PitChannel:
    """One counter: QEMU's PITChannelState."""

    def __init__(self):
        for name in FIELDS:
            setattr(self, name, 0)

    def reset(self, gate: int, now: int) -> None:
        """pit_reset_common: mode 3, count 0x10000; the latches and access modes stay."""
        self.mode, self.gate, self.count_load_time, self.count = 3, gate, now, MAX_COUNT

    def get_count(self, now: int) -> int:
        return COUNT.get(self.mode, COUNT_DEFAULT)(ticks(now - self.count_load_time), self.count)

    def get_out(self, now: int) -> int:
        return int(OUT.get(self.mode, OUT_DEFAULT)(ticks(now - self.count_load_time), self.count))

    def next_transition(self, now: int) -> int | None:
        """The time of the next change of OUT as QEMU computes it: rounded down to the
        nanosecond, so an update there may find OUT unchanged and ask again 1 ns later."""
        d = ticks(now - self.count_load_time)
        next_tick = NEXT.get(self.mode, NEXT_DEFAULT)(d, self.count)
        if next_tick is None:
            return None
        return max(self.count_load_time + next_tick * NS_PER_SECOND // PIT_FREQ, now + 1)

    def latch(self, now: int) -> None:
        if not self.count_latched:                  # a second latch keeps the first
            self.latched_count = self.get_count(now) & 0xFFFF
            self.count_latched = self.rw_mode

    def latch_status(self, now: int) -> None:
        if not self.status_latched:
            self.status = self.get_out(now) << 7 | self.rw_mode << 4 | self.mode << 1 | self.bcd
            self.status_latched = 1

    def read(self, now: int) -> int:
        """A read of the channel's port: latched status, latched count, or the live count."""
        if self.status_latched:
            self.status_latched = 0
            return self.status
        if self.count_latched:
            if self.count_latched == RW_MSB:
                self.count_latched = 0
                return self.latched_count >> 8
            if self.count_latched == RW_WORD0:
                self.count_latched = RW_MSB
            else:
                self.count_latched = 0
            return self.latched_count & 0xFF
        count = self.get_count(now)
        if self.read_state in (RW_MSB, RW_WORD1):
            if self.read_state == RW_WORD1:
                self.read_state = RW_WORD0
            return (count >> 8) & 0xFF
        if self.read_state == RW_WORD0:
            self.read_state = RW_WORD1
        return count & 0xFF

    def program(self, value: int) -> None:
        """A control word for this channel with a non-zero access mode."""
        access = (value >> 4) & 3
        self.rw_mode = self.read_state = self.write_state = access
        self.mode = (value >> 1) & 7
        self.bcd = value & 1

    def take_byte(self, value: int) -> int | None:
        """A write of the channel's port: the count to load, or None (a low byte kept)."""
        if self.write_state == RW_MSB:
            return value << 8
        if self.write_state == RW_WORD0:
            self.write_latch, self.write_state = value, RW_WORD1
            return None
        if self.write_state == RW_WORD1:
            self.write_state = RW_WORD0
            return self.write_latch | value << 8
        return value                                # RW_LSB, or never programmed


class Pit8254(ByteRegisterDevice):
    """The three channels, the PC speaker port and channel 0's IRQ: a port device for
    0x40-0x43 and 0x61 (``register(machine.ports)``).  ``clock``: ``now_ns()`` and
    ``add_timer(after_ns, callback)`` (``machine.clock``).  ``irq0(level)``: channel 0's
    OUT (``pic.sink(0)``), None for none — then no timer is ever armed.

    QEMU arms channel 0 at reset (mode 3, count 0x10000: IRQ0 at 18.2 Hz from power-on).
    Here that waits for the guest's first load of a channel-0 count unless
    ``irq0_at_reset``: a timer always pending keeps a halted CPU from ever ending a run
    (the core fast-forwards a halted CPU to its next timer without advancing the clock)."""
    PORTS = (0x40, 0x41, 0x42, 0x43, SPEAKER_PORT)
    precise = False         # the clock is exact inside an access; arming a timer ends the slice

    def __init__(self, clock, irq0: Callable[[bool], None] | None = None, irq0_at_reset: bool = False):
        self.clock, self.irq0, self.irq0_at_reset = clock, irq0, irq0_at_reset
        self.channels = (PitChannel(), PitChannel(), PitChannel())
        self.next_transition_time: int | None = None     # channel 0's next update
        self.irq_level = 0                                # the level irq0 was last given
        self.speaker_data_on = 0
        self.refresh_clock = 0
        self._timer: Timer | None = None
        self._timer_at: int | None = None
        self._io = ByteRegions((ByteRegion(PIT_PORT, 4, self._read_pit, self._write_pit),
                                ByteRegion(SPEAKER_PORT, 1, self._read_speaker, self._write_speaker)))
        self.reset()

    def _read_pit(self, offset: int) -> int:
        offset &= 3
        if offset == CONTROL:
            return 0                                # write-only
        return self.channels[offset].read(self.clock.now_ns())

    def _write_pit(self, offset: int, value: int) -> None:
        now = self.clock.now_ns()
        self._advance(now)                          # channel 0's due updates, with the old settings
        offset &= 3
        if offset != CONTROL:
            count = self.channels[offset].take_byte(value)
            if count is not None:
                self._load(offset, count, now)
        elif value >> 6 == 3:
            self._read_back(value, now)
        elif (value >> 4) & 3:
            self.channels[value >> 6].program(value)     # QEMU: no update here ("XXX")
        else:
            self.channels[value >> 6].latch(now)
        self._arm()

    def _read_back(self, value: int, now: int) -> None:
        """Read-back: bits 1-3 select channels; bit 5 clear latches the count, bit 4 clear
        the status (OUT, access mode, mode, BCD; no null-count bit, as QEMU)."""
        for index, channel in enumerate(self.channels):
            if value & (2 << index):
                if not value & 0x20:
                    channel.latch(now)
                if not value & 0x10:
                    channel.latch_status(now)

    def _load(self, index: int, count: int, now: int) -> None:
        channel = self.channels[index]
        channel.count_load_time, channel.count = now, count or MAX_COUNT
        if index == 0:
            self._update(now)

    # -- port 0x61 (pcspk_io_read, pcspk_io_write) -----------------------------------------------
    def _read_speaker(self, offset: int) -> int:
        channel = self.channels[2]
        self.refresh_clock ^= 0x10
        return channel.gate | self.speaker_data_on << 1 | self.refresh_clock | channel.get_out(self.clock.now_ns()) << 5

    def _write_speaker(self, offset: int, value: int) -> None:
        self.speaker_data_on = (value >> 1) & 1
        self.set_gate(2, value & 1)

    def set_gate(self, index: int, level: int) -> None:
        """A channel's GATE input (pit_set_channel_gate): a rising edge restarts modes 1, 2, 3
        and 5; counting never stops (QEMU's "XXX")."""
        channel, now = self.channels[index], self.clock.now_ns()
        if index == 0:
            self._advance(now)
        if channel.mode in (1, 2, 3, 5) and channel.gate < level:
            channel.count_load_time = now
            if index == 0:
                self._update(now)
        channel.gate = level
        if index == 0:
            self._arm()

    def out(self, index: int) -> int:
        """A channel's OUT now."""
        return self.channels[index].get_out(self.clock.now_ns())

    # -- channel 0's IRQ ---------------------------------------------------------------------------
    def _update(self, now: int) -> None:
        """pit_irq_timer_update: OUT0 to irq0 and the time of the next update."""
        if self.irq0 is None:
            return
        channel = self.channels[0]
        self.next_transition_time = channel.next_transition(now)
        self.irq_level = channel.get_out(now)
        self.irq0(bool(self.irq_level))

    def _advance(self, until: int) -> None:
        """Make the updates due by ``until``, in order (QEMU made each at its time)."""
        for _ in range(MAX_CATCH_UP):
            due = self.next_transition_time
            if due is None or due > until:
                return
            self._update(due)
        self._update(until)                         # far behind (a host-time clock): skip to now

    def _next_raise(self) -> int | None:
        """The time of the next update that takes OUT0 from 0 to 1, looking through those
        that lower or repeat it (each computed as QEMU's would be, from the one before)."""
        channel, at, level = self.channels[0], self.next_transition_time, self.irq_level
        for _ in range(MAX_LOOKAHEAD):
            if at is None:
                return None
            out = channel.get_out(at)
            if out and not level:
                return at
            level, at = out, channel.next_transition(at)
        return at

    def _arm(self) -> None:
        at = self._next_raise() if self.irq0 is not None else None
        if at == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = None, at
        if at is not None:
            timer = self.clock.add_timer(max(at - self.clock.now_ns(), 0), lambda: self._fired(timer))
            self._timer = timer

    def _fired(self, timer: Timer) -> None:
        """At the armed time (a halted CPU may be woken before it: the time is the armed one).
        A timer from before a restore is not the armed one and does nothing."""
        if timer is not self._timer:
            return
        at = self._timer_at
        self._timer = self._timer_at = None
        self._advance(max(at, self.clock.now_ns()))     # later than armed: after a restore
        self._arm()

    # -- reset and snapshots ----------------------------------------------------------------------
    def reset(self) -> None:
        """QEMU's reset (pit_reset_common); port 0x61's bits and the latches stay, as there."""
        now = self.clock.now_ns()
        for index, channel in enumerate(self.channels):
            channel.reset(int(index != 2), now)
        first = self.channels[0].next_transition(now) if self.irq0_at_reset else None
        self.next_transition_time = first if self.irq0 is not None else None
        self._arm()

    def state(self) -> tuple:
        return (tuple(tuple(getattr(channel, name) for name in FIELDS) for channel in self.channels),
                self.next_transition_time, self.irq_level, self.speaker_data_on, self.refresh_clock)

    def restore(self, state: tuple) -> None:
        """Put ``state`` back and arm channel 0's timer again.  In a machine snapshot, restore
        after the core's instruction count (the timer is armed from the clock's now)."""
        channels, self.next_transition_time, self.irq_level, self.speaker_data_on, self.refresh_clock = state
        for channel, values in zip(self.channels, channels):
            for name, value in zip(FIELDS, values):
                setattr(channel, name, value)
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._timer_at = None
        self._arm()
