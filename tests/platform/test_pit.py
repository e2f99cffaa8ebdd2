"""The 8254 PIT and port 0x61 (ringminus/platform/pit.py) against QEMU 7.2's i8254.c,
i8254_common.c and pcspk.c: counts and OUT from the virtual clock in every mode, access
modes, latches, read-back, gates, channel 0's IRQ edges with one timer per period, QEMU's
access-size rule, snapshots — and real-mode guests: IRQ0 through the 8259 and the IVT, and
channel 2 gated through port 0x61 and read back by latch.  Times are virtual: one instruction
is one nanosecond, so every expected value below is computed, not measured."""
import heapq
import itertools
import random

import pytest

from ringminus import Machine, StopReason
from ringminus.emulator.clock import Timer
from ringminus.emulator.plugins import Part
from ringminus.platform.pic import Pic8259Pair
from ringminus.platform.pit import Pit8254

from ..helpers import asm

FREQ = 1_193_182
NS = 1_000_000_000


def ticks(ns):
    return ns * FREQ // NS


class FakeClock:
    """now_ns() and add_timer() as the core's clock, with time moved by hand; timers fire in
    order at their time, as at the instruction boundary they are due."""

    def __init__(self):
        self.now = 0
        self.armed = 0
        self._heap = []
        self._order = itertools.count()

    def now_ns(self):
        return self.now

    def add_timer(self, after_ns, callback):
        assert after_ns >= 0
        timer = Timer(callback)
        heapq.heappush(self._heap, (self.now + after_ns, next(self._order), timer))
        self.armed += 1
        return timer

    def pending(self):
        return sorted(at for at, _, timer in self._heap if not timer.cancelled)

    def run_until(self, until):
        while self._heap and self._heap[0][0] <= until:
            at, _, timer = heapq.heappop(self._heap)
            self.now = at
            if not timer.cancelled:
                timer.callback()
        self.now = until


def outb(pit, port, value):
    pit.write(port, 1, value)


def inb(pit, port):
    return pit.read(port, 1)


def load(pit, channel, mode, count, access=3, bcd=0):
    """A control word for ``channel``, then its count in that access mode."""
    outb(pit, 0x43, channel << 6 | access << 4 | mode << 1 | bcd)
    if access in (1, 3):
        outb(pit, 0x40 + channel, count & 0xFF)
    if access in (2, 3):
        outb(pit, 0x40 + channel, count >> 8 & 0xFF)


def latched(pit, channel):
    outb(pit, 0x43, channel << 6)
    return inb(pit, 0x40 + channel) | inb(pit, 0x40 + channel) << 8


def status(pit, channel):
    outb(pit, 0x43, 0xE0 | 2 << channel)             # read-back: status only
    return inb(pit, 0x40 + channel)


@pytest.fixture
def clock():
    return FakeClock()


# -- counts and OUT from the clock -------------------------------------------------------------

# (mode, count at 100 us, count at 1 ms) for a count of 1000: d = 119 and 1193 PIT clocks.
COUNTS = [(0, 881, (1000 - 1193) & 0xFFFF), (1, 881, (1000 - 1193) & 0xFFFF), (2, 881, 1000 - 193),
          (3, 1000 - 238, 1000 - 386), (4, 881, (1000 - 1193) & 0xFFFF), (5, 881, (1000 - 1193) & 0xFFFF)]


@pytest.mark.parametrize("mode,early,late", COUNTS)
def test_counts_are_computed_from_the_elapsed_time(clock, mode, early, late):
    pit = Pit8254(clock)
    clock.now = 5000
    load(pit, 1, mode, 1000)
    clock.now = 5000 + 100_000
    assert ticks(100_000) == 119 and latched(pit, 1) == early
    clock.now = 5000 + 1_000_000
    assert latched(pit, 1) == late


# OUT as QEMU's pit_get_out gives it, for a count of 10, at PIT clock d.
OUTS = {0: {0: 0, 9: 0, 10: 1, 25: 1}, 1: {0: 1, 9: 1, 10: 0}, 2: {0: 0, 5: 0, 10: 1, 11: 0, 20: 1},
        3: {0: 1, 4: 1, 5: 0, 9: 0, 10: 1}, 4: {0: 0, 10: 1, 11: 0}, 5: {9: 0, 10: 1, 11: 0},
        6: {10: 1, 11: 1}, 7: {5: 0, 10: 1}}       # modes 6, 7: OUT as mode 0 (QEMU's default)


@pytest.mark.parametrize("mode", sorted(OUTS))
def test_out_in_each_mode_is_qemus(clock, mode):
    pit = Pit8254(clock)
    load(pit, 1, mode, 10)
    for d, out in OUTS[mode].items():
        clock.now = -(-d * NS // FREQ)                # the first nanosecond of PIT clock d
        assert status(pit, 1) >> 7 == out, (mode, d)


def test_modes_6_and_7_count_as_mode_2(clock):
    pit = Pit8254(clock)
    load(pit, 1, 6, 10)
    clock.now = -(-13 * NS // FREQ)
    assert latched(pit, 1) == 10 - 3


def test_access_modes(clock):
    pit = Pit8254(clock)
    load(pit, 1, 0, 0x1234, access=1)                 # low byte only
    assert pit.channels[1].count == 0x34
    outb(pit, 0x43, 0x40)
    assert inb(pit, 0x41) == 0x34 and pit.channels[1].count_latched == 0     # one byte latched
    assert inb(pit, 0x41) == 0x34                     # then the live low byte
    load(pit, 1, 0, 0x1200, access=2)                 # high byte only
    assert pit.channels[1].count == 0x1200 and inb(pit, 0x41) == 0x12
    outb(pit, 0x43, 0x70)
    outb(pit, 0x41, 0x78)                             # lo/hi: nothing loads after the low byte
    assert pit.channels[1].count == 0x1200
    outb(pit, 0x41, 0x56)
    assert pit.channels[1].count == 0x5678
    assert inb(pit, 0x41) == 0x78 and inb(pit, 0x41) == 0x56     # live: low, then high
    load(pit, 1, 0, 0)                                # 0 is 65536
    assert pit.channels[1].count == 0x10000 and latched(pit, 1) == 0


def test_a_latch_holds_the_first_value_until_read(clock):
    pit = Pit8254(clock)
    load(pit, 2, 2, 1000)
    clock.now = 10_000
    outb(pit, 0x43, 0x80)
    clock.now = 50_000
    outb(pit, 0x43, 0x80)                             # latched already: ignored
    assert inb(pit, 0x42) | inb(pit, 0x42) << 8 == 1000 - ticks(10_000)
    assert inb(pit, 0x42) | inb(pit, 0x42) << 8 == 1000 - ticks(50_000)     # live again


def test_read_back_latches_status_then_count(clock):
    pit = Pit8254(clock)
    load(pit, 1, 0, 0x0999, bcd=1)                    # BCD is kept and reported; counting is binary
    load(pit, 2, 3, 100)
    clock.now = 20_000
    outb(pit, 0x43, 0xCC)                             # count and status of channels 1 and 2
    assert inb(pit, 0x41) == 0x31                     # OUT 0, lo/hi, mode 0, BCD
    assert inb(pit, 0x41) | inb(pit, 0x41) << 8 == 0x0999 - ticks(20_000)
    assert inb(pit, 0x42) == 0x80 | 0x36              # OUT 1, lo/hi, mode 3
    assert inb(pit, 0x42) | inb(pit, 0x42) << 8 == 100 - 2 * ticks(20_000)
    assert inb(pit, 0x43) == 0                        # the control port is write-only


# -- gates and port 0x61 ---------------------------------------------------------------------------

def test_port_61_after_reset_and_its_refresh_toggle(clock):
    pit = Pit8254(clock)
    assert inb(pit, 0x61) == 0x30                     # OUT2 high (mode 3), refresh toggled on
    assert inb(pit, 0x61) == 0x20                     # every read toggles bit 4
    outb(pit, 0x61, 0xFF)                             # only bits 0 and 1 are kept
    assert inb(pit, 0x61) & 0x0F == 0x03


def test_the_channel_2_gate_restarts_modes_1_2_3_5_on_a_rising_edge(clock):
    pit = Pit8254(clock)
    for mode, restarts in ((0, False), (1, True), (2, True), (3, True), (4, False), (5, True)):
        outb(pit, 0x61, 0)
        load(pit, 2, mode, 1000)
        clock.now += 100_000
        outb(pit, 0x61, 1)                            # rising edge
        clock.now += 10_000
        elapsed = 10_000 if restarts else 110_000
        assert pit.channels[2].count_load_time == clock.now - elapsed, mode
        outb(pit, 0x61, 1)                            # no edge: nothing restarts
        assert pit.channels[2].count_load_time == clock.now - elapsed


def test_out2_shows_in_bit_5_and_a_low_gate_does_not_stop_counting(clock):
    pit = Pit8254(clock)
    load(pit, 2, 0, 64)
    assert inb(pit, 0x61) & 0x21 == 0
    clock.now = -(-64 * NS // FREQ)                   # the count expires (gate low: QEMU counts on)
    assert inb(pit, 0x61) & 0x20


# -- channel 0's IRQ ------------------------------------------------------------------------------------

def qemu_updates(mode, count, load_time, until):
    """QEMU's pit_irq_timer_update sequence for channel 0, written out again from
    i8254_common.c: (time, level) at every update from the load until ``until``."""
    def d(t):
        return (t - load_time) * FREQ // NS

    def out(t):
        return {0: d(t) >= count, 2: d(t) % count == 0 and d(t) != 0,
                3: d(t) % count < (count + 1) >> 1}[mode]

    def next_time(t):
        base = d(t) // count * count
        if mode == 0:
            tick = count if d(t) < count else None
        elif mode == 2:
            tick = base + count if d(t) == base and d(t) != 0 else base + count + 1
        else:
            half = (count + 1) >> 1
            tick = base + half if d(t) - base < half else base + count
        if tick is None:
            return None
        return max(load_time + tick * NS // FREQ, t + 1)

    updates, t = [], load_time
    while t is not None and t <= until:
        updates.append((t, int(out(t))))
        t = next_time(t)
    return updates


@pytest.mark.parametrize("mode,count", [(2, 100), (3, 100), (3, 7), (2, 2), (0, 500)])
def test_irq0_gets_qemus_levels_with_one_timer_per_period(clock, mode, count):
    seen = []
    pit = Pit8254(clock, irq0=lambda level: seen.append((clock.now, int(level))))
    clock.now = 1234
    load(pit, 0, mode, count)
    periods = 20
    until = 1234 + periods * count * NS // FREQ
    clock.run_until(until)
    expected = qemu_updates(mode, count, 1234, until)
    delivered = [level for _, level in seen]
    assert delivered == [level for _, level in expected][:len(delivered)]
    assert len(delivered) >= len(expected) - 4        # only the lowers after the last raise wait
    rises = [t for (t, level), (_, before) in zip(seen[1:], seen) if level and not before]
    assert rises == [t for (t, level), (_, before) in zip(expected[1:], expected) if level and not before]
    assert clock.armed == len(rises) + (1 if clock.pending() else 0)
    if mode == 0:
        assert rises == [1234 + -(-count * NS // FREQ)] and not clock.pending()


def test_mode_2_raises_irq0_where_qemus_rounding_puts_it(clock):
    rises = []
    pit = Pit8254(clock, irq0=lambda level: level and rises.append(clock.now))
    load(pit, 0, 2, 100)
    clock.run_until(1_000_000)
    # QEMU aims at PIT clock k*100 + 1 and lands (rounded down to the ns) on clock k*100.
    assert rises == [(k * 100 + 1) * NS // FREQ for k in range(1, 12)]


def test_no_timer_without_irq0_or_before_channel_0_is_programmed(clock):
    load(Pit8254(clock), 0, 2, 100)                   # no irq0: channel 0 is never tracked
    pit = Pit8254(clock, irq0=lambda level: None)
    load(pit, 2, 2, 100)
    load(pit, 1, 2, 100)
    assert clock.armed == 0
    load(pit, 0, 2, 100)
    assert clock.armed == 1
    at_reset = FakeClock()
    Pit8254(at_reset, irq0=lambda level: None, irq0_at_reset=True)     # QEMU's reset: mode 3, 65536
    # QEMU's first update, at the half period, is the first to send OUT0's level (high): IRQ0.
    assert at_reset.pending() == [32768 * NS // FREQ]


def test_a_control_word_changes_the_mode_of_a_running_channel_as_qemu(clock):
    seen = []
    pit = Pit8254(clock, irq0=lambda level: seen.append(int(level)))
    load(pit, 0, 2, 100)
    clock.run_until(100_000)
    outb(pit, 0x43, 0x30)                             # mode 0, no new count: counting goes on
    clock.run_until(10_000_000)
    assert seen[-1] == 1 and not clock.pending()      # mode 0's OUT is high past the count


def test_state_and_restore_rearm_the_timer(clock):
    rises = []
    pit = Pit8254(clock, irq0=lambda level: level and rises.append(clock.now))
    load(pit, 0, 2, 100)
    clock.run_until(200_000)
    saved = pit.state()
    clock.run_until(400_000)
    first = list(rises)
    del rises[len(first) - 2:]                        # forget what came after the save
    clock.now = 200_000
    pit.restore(saved)                                # the old timer is cancelled; one is armed
    clock.run_until(400_000)
    assert rises == first and pit.state() != saved


# -- the port bus ------------------------------------------------------------------------------------

def test_two_and_four_byte_accesses_follow_qemus_rule(clock):
    pit = Pit8254(clock)
    load(pit, 1, 0, 0x1234, access=1)                 # low byte only: 0x34
    load(pit, 2, 0, 0x56, access=1)
    assert pit.read(0x41, 2) == 0                     # unaligned in the 0x40 region: reads 0
    assert pit.read(0x42, 2) == 0x0056                # channel 2, then offset 3 (reads 0)
    assert pit.read(0x40, 4) == 0x00563400
    pit.write(0x40, 2, 0x0A0B)                        # channel 0 gets 0x0B, channel 1 0x0A
    assert (pit.channels[0].count, pit.channels[1].count) == (0x0B, 0x0A)
    value = pit.read(0x61, 2)                         # port 0x61 read twice: bit 4 toggles
    assert (value ^ value >> 8) & 0xFF == 0x10
    pit.write(0x61, 2, 0x0003)                        # written twice: the high byte wins
    assert pit.channels[2].gate == 0 and pit.speaker_data_on == 0


def test_no_guest_access_raises(clock):
    rng = random.Random(8254)
    pit = Pit8254(clock, irq0=lambda level: None)
    for _ in range(5000):
        port = rng.choice(Pit8254.PORTS)
        size = rng.choice((1, 2, 4))
        if rng.random() < 0.5:
            pit.write(port, size, rng.getrandbits(32))
        else:
            assert 0 <= pit.read(port, size) < 1 << (8 * size)
        clock.run_until(clock.now + rng.choice((0, 1, 100, 5000, 100_000)))


# -- real-mode guests ---------------------------------------------------------------------------------

PIC_INIT = ["mov al, 0x11", "out 0x20, al", "out 0xA0, al", "mov al, 0x08", "out 0x21, al", "mov al, 0x70",
            "out 0xA1, al", "mov al, 4", "out 0x21, al", "mov al, 2", "out 0xA1, al", "mov al, 1", "out 0x21, al",
            "out 0xA1, al", "mov al, 0xFE", "out 0x21, al", "mov al, 0xFF", "out 0xA1, al"]
# Channel 0, lo/hi, mode 2, count 100; the OUT of the high byte loads the count.
PIT_INIT = ["mov al, 0x34", "out 0x43, al", "mov al, 100", "out 0x40, al", "mov al, 0", "out 0x40, al"]
IVT = ["mov word ptr [0x20], handler", "mov word ptr [0x22], 0"]
HANDLER = ["handler:", "inc word ptr [0x500]", "mov al, 0x20", "out 0x20, al", "iret"]


def timer_machine(main):
    machine = Machine(memory_size=2 << 20)
    pic = Pic8259Pair().register(machine.ports)
    machine.add_interrupt_controller(pic)               # INTA when the CPU takes it
    pic.int_output = lambda level: machine.interrupt_raised() if level else None
    pit = Pit8254(machine.clock, irq0=pic.sink(0)).register(machine.ports)
    machine.write_memory(0x7C00, asm("\n".join(IVT + PIC_INIT + PIT_INIT + main + HANDLER), 16, 0x7C00))
    machine.boot("real", 0x7C00)
    return machine, pic, pit


def counter(machine):
    return int.from_bytes(machine.read_memory(0x500, 2), "little")


def test_irq0_in_mode_2_reaches_a_guest_handler_at_qemus_times():
    machine, pic, pit = timer_machine(["sti", "spin: jmp spin"])
    load_time = len(IVT + PIC_INIT + PIT_INIT) - 1    # the OUT of the high byte: instructions before it
    rises = [load_time + (k * 100 + 1) * NS // FREQ for k in range(1, 8)]
    limit = 450_000
    machine.log_device_interrupts = True     # each listed, at its time
    result = machine.run(max_instructions=limit)
    assert result.stop.reason is StopReason.LIMIT
    assert pit.channels[0].count_load_time == load_time
    taken = [rise for rise in rises if rise + 1 < limit]                  # the handler's INC runs
    assert counter(machine) == len(taken) == 5
    assert [event["vector"] for event in result.events] == [8] * 5
    assert pic.master.isr == 0 and pic.master.irr == 0                   # every one EOIed
    assert pit.next_transition_time == load_time + 600 * NS // FREQ      # the fall before rise 6


def test_a_guest_halting_between_ticks_counts_them():
    """sti; hlt: each HLT waits for the next IRQ0 (the core delivers the PIT's timer to the
    halted CPU)."""
    machine, _, _ = timer_machine(["sti", "idle: hlt", "cmp word ptr [0x500], 5", "jb idle",
                                   "mov al, 0x42", "out 0xF4, al"])
    result = machine.run(max_instructions=100_000)
    assert result.stop.reason is StopReason.EXIT and result.stop.value == 0x42
    assert counter(machine) == 5


def test_a_snapshot_replays_the_same_interrupts():
    machine, pic, pit = timer_machine(["sti", "spin: jmp spin"])
    machine.add_snapshot_part(Part(86, "pic", lambda m: pic.state(), lambda m, state: pic.restore(state)))
    machine.add_snapshot_part(Part(87, "pit", lambda m: pit.state(), lambda m, state: pit.restore(state)))
    machine.run(max_instructions=200_000)
    snapshot = machine.snapshot()
    first = machine.run(max_instructions=300_000)
    count = counter(machine)
    machine.restore(snapshot)
    second = machine.run(max_instructions=300_000)
    assert counter(machine) == count == 5
    assert second.events == first.events and second.instructions == first.instructions


def test_channel_2_gated_by_port_61_counts_down_and_raises_out2():
    n = 60_000
    before = ["mov al, 0xB0", "out 0x43, al",         # channel 2, lo/hi, mode 0
              "mov al, 0x40", "out 0x42, al", "xor al, al", "out 0x42, al",     # count 64
              "mov al, 0x01", "out 0x61, al",         # gate on, speaker data off
              "mov al, 0x80", "out 0x43, al",         # latch channel 2
              "in al, 0x42", "mov byte ptr [0x500], al", "in al, 0x42", "mov byte ptr [0x501], al",
              "mov al, 0x01", "out 0x61, al",         # the gate stays high: nothing restarts
              "in al, 0x61", "mov byte ptr [0x502], al",
              f"mov cx, {n}"]
    after = ["mov al, 0x80", "out 0x43, al",
             "in al, 0x42", "mov byte ptr [0x503], al", "in al, 0x42", "mov byte ptr [0x504], al",
             "mov al, 0x01", "out 0x61, al",
             "in al, 0x61", "mov byte ptr [0x505], al",
             "mov al, 0xC8", "out 0x43, al",         # read-back of channel 2: status and count
             "in al, 0x42", "mov byte ptr [0x506], al",
             "in al, 0x42", "mov byte ptr [0x507], al", "in al, 0x42", "mov byte ptr [0x508], al",
             "mov al, 0x42", "out 0xF4, al"]
    machine = Machine(memory_size=2 << 20)
    pit = Pit8254(machine.clock).register(machine.ports)
    machine.write_memory(0x7C00, asm("\n".join(before + ["busy: loop busy"] + after), 16, 0x7C00))
    machine.boot("real", 0x7C00)
    result = machine.run(max_instructions=200_000)
    assert result.stop.reason is StopReason.EXIT
    assert result.instructions == len(before) + n + len(after)
    # An access by instruction i (0-based) happens at time i: the instructions retired before it.
    load_time = before.index("xor al, al") + 1                   # the OUT of the high byte
    first_latch = before.index("mov al, 0x80") + 1
    later = len(before) + n                                       # where ``after`` starts
    latch, read_back = later + 1, later + after.index("mov al, 0xC8") + 1
    got = machine.read_memory(0x500, 9)

    def count_at(t):
        return (64 - ticks(t - load_time)) & 0xFFFF

    assert pit.channels[2].count_load_time == load_time == 5
    assert got[0] | got[1] << 8 == count_at(first_latch) == 64
    assert got[2] == 0x11                             # gate 1, refresh toggled on, OUT2 low
    assert got[3] | got[4] << 8 == count_at(latch) == (64 - ticks(latch - 5)) & 0xFFFF == 0xFFF9
    assert got[5] == 0x21                             # gate 1, refresh off again, OUT2 high
    assert got[6] == 0xB0                             # read-back status: OUT 1, lo/hi, mode 0, binary
    assert got[7] | got[8] << 8 == count_at(read_back)
