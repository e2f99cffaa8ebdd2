"""The MC146818 RTC / CMOS device (ringminus/platform/cmos.py): driven directly on a clock the
test moves by hand, and through real guests on a Machine.  No test depends on host timing."""
from __future__ import annotations

import pickle
import random
from datetime import datetime, timezone

import pytest

from ringminus import StopReason
from ringminus.platform.cmos import (DEFAULT_BASE_TIME, NS, PORTS, UIP_HOLD_NS, Cmos, board_bytes)

from ..helpers import boot_guest

MIB = 1 << 20
A, B, C, D = 0x0A, 0x0B, 0x0C, 0x0D


class FakeTimer:
    def __init__(self, at, callback):
        self.at, self.callback, self.cancelled, self.fired = at, callback, False, False

    def cancel(self):
        self.cancelled = True


class FakeClock:
    """now_ns() and add_timer() with time moved by the test; due timers fire in order."""

    def __init__(self, now=0):
        self.now, self.timers = now, []

    def now_ns(self):
        return self.now

    def add_timer(self, after_ns, callback):
        assert after_ns >= 0
        timer = FakeTimer(self.now + after_ns, callback)
        self.timers.append(timer)
        return timer

    def armed(self):
        self.timers = [t for t in self.timers if not t.cancelled and not t.fired]
        return self.timers

    def advance(self, ns):
        end = self.now + ns
        while due := [t for t in self.armed() if t.at <= end]:
            timer = min(due, key=lambda t: t.at)
            self.now, timer.fired = max(self.now, timer.at), True
            timer.callback()
        self.now = end


class Line:
    def __init__(self):
        self.level, self.edges = False, 0

    def raise_(self):
        self.edges += not self.level
        self.level = True

    def lower(self):
        self.level = False


def make(ram=128 * MIB, clock=None, **options):
    clock = clock or FakeClock()
    return Cmos(clock, ram, ram, 0, irq=Line(), **options), clock


def get(cmos, index):
    cmos.write(0x70, 1, index)
    return cmos.read(0x71, 1)


def put(cmos, index, value):
    cmos.write(0x70, 1, index)
    cmos.write(0x71, 1, value)


def word(cmos, index):
    return get(cmos, index) | get(cmos, index + 1) << 8


def clock_registers(cmos):
    return [get(cmos, i) for i in (0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32)]


# -- the bytes QEMU's board code fills -------------------------------------------------------------
def test_128_mib_fills_the_bytes_qemu_shows():
    cmos, _ = make()
    assert word(cmos, 0x15) == 640
    assert word(cmos, 0x17) == word(cmos, 0x30) == 0xFFFF
    assert word(cmos, 0x34) == 0x0700
    assert [get(cmos, i) for i in (0x5B, 0x5C, 0x5D, 0x5F)] == [0, 0, 0, 0]
    assert [get(cmos, i) for i in (0x10, 0x12, 0x14, 0x38, 0x39, 0x3D)] == [0, 0, 0x06, 0x30, 0, 0x12]
    assert [get(cmos, i) for i in (A, B, C, D)] == [0x26, 0x02, 0x00, 0x80]


def test_memory_above_4g_cpus_and_boot_order():
    cmos = Cmos(FakeClock(), 4 << 30, 3 << 30, 1 << 30, cpus=4, boot_order="nd", fd_bootchk=False)
    assert word(cmos, 0x34) == 0xBF00 and word(cmos, 0x17) == 0xFFFF
    assert [get(cmos, i) for i in (0x5B, 0x5C, 0x5D)] == [0x00, 0x40, 0x00]
    assert get(cmos, 0x5F) == 3
    assert get(cmos, 0x3D) == 0x34 and get(cmos, 0x38) == 0x01
    small = board_bytes(8 * MIB, 0, cpus=300, boot_order="")
    assert small[0x17] | small[0x18] << 8 == 7 * 1024 and small[0x34] == small[0x35] == 0
    assert small[0x5F] == 0 and small[0x3D] == 0              # more than 255 CPUs: 0


@pytest.mark.parametrize("bad", [dict(boot_order="cdan"), dict(boot_order="x"), dict(cpus=0),
                                 dict(below_4g=64 * MIB)])
def test_a_board_qemu_would_refuse_is_a_value_error(bad):
    arguments = {"ram_size": 128 * MIB, "below_4g": 128 * MIB, "above_4g": 0, **bad}
    with pytest.raises(ValueError):
        Cmos(FakeClock(), **arguments)


# -- the index port --------------------------------------------------------------------------------
def test_the_index_drops_bit_7_and_the_index_port_reads_ff():
    cmos, _ = make()
    assert list(PORTS) == [0x70, 0x71]
    cmos.write(0x70, 1, 0x8F)
    assert cmos.index == 0x0F and cmos.read(0x70, 1) == 0xFF
    cmos.write(0x71, 1, 0x5A)
    assert get(cmos, 0x0F) == 0x5A and get(cmos, 0x8F) == 0x5A
    put(cmos, 0xFF, 0x33)                                       # 0x7F, the last byte
    assert cmos.data[0x7F] == 0x33


def test_the_century_alias_moves_the_index_to_0x32():
    cmos, _ = make()
    assert get(cmos, 0x37) == 0x20 and cmos.index == 0x32


def test_wide_accesses_reach_the_byte_handlers_as_in_qemu():
    cmos, clock = make()
    cmos.write(0x70, 2, 0x5A40)                                 # index 0x40, then 0x5A to it
    assert cmos.data[0x40] == 0x5A and cmos.index == 0x40
    assert cmos.read(0x70, 2) == 0x5AFF                         # offset 0 the index, 1 the data
    assert cmos.read(0x70, 4) == 0x5AFF5AFF                     # offsets 2 and 3 decode as 0 and 1
    assert cmos.read(0x71, 2) == cmos.read(0x71, 4) == 0        # unaligned in the region: invalid
    cmos.write(0x71, 2, 0x1111)
    cmos.write(0x71, 4, 0x11111111)
    assert cmos.data[0x40] == 0x5A
    cmos.write(0x70, 4, 0x77411140)                             # [0x40] = 0x11, then [0x41] = 0x77
    assert cmos.data[0x40:0x42] == b"\x11\x77" and cmos.index == 0x41
    clock.now = NS
    cmos.write(0x70, 1, C)
    assert cmos.read(0x70, 4) == 0x00FF10FF                     # C is read twice: cleared between


# -- the clock ---------------------------------------------------------------------------------------
def test_bcd_time_at_a_known_clock_value():
    cmos, clock = make()
    assert clock_registers(cmos) == [0x00, 0x00, 0x00, 0x05, 0x01, 0x01, 0x26, 0x20]   # Thursday 2026-01-01
    clock.now = (86400 + 13 * 3600 + 45 * 60 + 30) * NS + NS // 2
    assert clock_registers(cmos) == [0x30, 0x45, 0x13, 0x06, 0x02, 0x01, 0x26, 0x20]
    assert cmos.rtc_ns() == DEFAULT_BASE_TIME * NS + clock.now


def test_binary_and_12_hour_formats():
    cmos, clock = make()
    clock.now = (86400 + 13 * 3600 + 45 * 60 + 30) * NS
    put(cmos, B, 0x06)                                          # binary, 24-hour
    assert clock_registers(cmos) == [30, 45, 13, 6, 2, 1, 26, 20]
    put(cmos, B, 0x00)                                          # BCD, 12-hour: 1 PM
    assert get(cmos, 0x04) == 0x81
    clock.now = 2 * 86400 * NS                                  # midnight: 12 AM
    assert get(cmos, 0x04) == 0x12
    clock.now += 12 * 3600 * NS                                 # noon: 12 PM
    assert get(cmos, 0x04) == 0x92


def test_a_base_time_and_the_host_time_option():
    cmos, _ = make(base_time=datetime(1999, 12, 31, 23, 59, 59, tzinfo=timezone.utc))
    assert clock_registers(cmos) == [0x59, 0x59, 0x23, 0x06, 0x31, 0x12, 0x99, 0x19]
    before = datetime.now(timezone.utc).year
    host, _ = make(host_time=True)
    year = 100 * int(f"{get(host, 0x32):x}") + int(f"{get(host, 0x09):x}")
    assert year in (before, before + 1)


def test_set_freezes_the_registers_and_clearing_it_sets_the_clock():
    cmos, clock = make()
    put(cmos, B, 0x82)                                          # SET, 24-hour, BCD
    for index, value in ((0x00, 0x10), (0x02, 0x09), (0x04, 0x08), (0x07, 0x15), (0x08, 0x06), (0x09, 0x30)):
        put(cmos, index, value)
    clock.now += 5 * NS
    assert get(cmos, 0x00) == 0x10                              # frozen while SET
    put(cmos, B, 0x02)
    clock.now += 2 * NS
    assert [get(cmos, i) for i in (0x00, 0x02, 0x04, 0x07, 0x08, 0x09, 0x32)] == [0x12, 0x09, 0x08, 0x15, 0x06, 0x30, 0x20]
    assert get(cmos, 0x06) == 0x07                              # 2030-06-15 is a Saturday


def test_set_in_12_hour_mode():
    cmos, clock = make()
    put(cmos, B, 0x80)                                          # SET, 12-hour, BCD
    put(cmos, 0x04, 0x81)                                       # 1 PM
    put(cmos, B, 0x02)                                          # back to 24-hour: 13h
    assert get(cmos, 0x04) == 0x13


def test_a_time_write_without_set_takes_effect_at_once():
    cmos, clock = make()
    put(cmos, 0x02, 0x42)                                       # QEMU: rtc_set_time right away
    clock.now += 3 * NS
    assert get(cmos, 0x02) == 0x42 and get(cmos, 0x00) == 0x03


def test_a_divider_held_in_reset_stops_the_clock():
    cmos, clock = make()
    clock.now = 7 * NS
    put(cmos, A, 0x66)                                          # divider reset
    clock.now += 10 * NS
    assert get(cmos, 0x00) == 0x07 and get(cmos, A) == 0x66     # no UIP either
    put(cmos, A, 0x26)                                          # restarts half a second in
    clock.now += NS // 2 - 1
    assert get(cmos, 0x00) == 0x07
    clock.now += 1
    assert get(cmos, 0x00) == 0x08


def test_uip_reads_set_in_the_last_244_us_of_each_second():
    cmos, clock = make()
    clock.now = NS - UIP_HOLD_NS - 1
    assert get(cmos, A) == 0x26
    clock.now += 1
    assert get(cmos, A) == 0xA6
    clock.now = NS                                              # the update happened
    assert get(cmos, A) == 0x26 and get(cmos, 0x00) == 0x01


# -- flags and interrupts -------------------------------------------------------------------------------
def test_update_ended_flag_is_set_without_a_timer_and_reading_c_clears_it():
    cmos, clock = make()
    clock.advance(NS)
    assert not clock.armed()                                    # no interrupt enabled: nothing armed
    assert get(cmos, C) == 0x10 and get(cmos, C) == 0x00
    assert not cmos.irq.level


def test_update_interrupt_raises_irq_8_until_c_is_read():
    cmos, clock = make()
    put(cmos, B, 0x12)                                          # UIE
    assert [t.at for t in clock.armed()] == [NS]
    clock.advance(NS)
    assert cmos.irq.level and cmos.irq.edges == 1
    assert get(cmos, C) == 0x90 and not cmos.irq.level
    clock.advance(NS)
    assert cmos.irq.level and get(cmos, C) == 0x90 and get(cmos, 0x00) == 0x02


def test_enabling_an_interrupt_whose_flag_is_set_raises_it_at_once():
    cmos, clock = make()
    clock.now = NS + 5
    put(cmos, B, 0x12)
    assert cmos.irq.level and get(cmos, C) == 0x90


def test_periodic_interrupt_at_1024_hz():
    cmos, clock = make()
    put(cmos, B, 0x42)                                          # PIE, rate 6 from A = 0x26
    period = NS // 1024
    (timer,) = clock.armed()
    assert timer.at == 32 * NS // 32768 + 1                     # 32 ticks of 32768 Hz, + 1 ns
    clock.advance(timer.at)
    assert cmos.irq.level and get(cmos, C) == 0xC0 and not cmos.irq.level
    clock.advance(10 * period)                                  # missed ones are discarded
    assert get(cmos, C) == 0xC0 and get(cmos, C) == 0x00
    edges = cmos.irq.edges
    put(cmos, B, 0x02)                                          # PIE off: no timer, no flags
    assert not clock.armed()
    clock.advance(NS // 2)
    assert get(cmos, C) == 0x00 and cmos.irq.edges == edges


def test_periodic_timer_fires_on_the_32khz_grid_with_or_without_catching_up():
    fired, lazy = make(), make()
    for cmos, clock in (fired, lazy):
        put(cmos, A, 0x23)                                      # rate 3: 8192 Hz, 4 ticks
        put(cmos, B, 0x42)
    fired[1].advance(12_345_678)                                # each timer fires in turn
    lazy[1].now += 12_345_678                                   # nothing fires: caught up on access
    lazy[0].read(0x70, 1)
    assert fired[0].next_periodic == lazy[0].next_periodic
    assert fired[0].next_periodic == (12_345_678 * 32768 // NS // 4 + 1) * 4 * NS // 32768 + 1
    assert get(fired[0], C) == get(lazy[0], C) == 0xC0


def test_alarm_interrupt():
    cmos, clock = make()
    put(cmos, 0x01, 0x05)                                       # 00:00:05
    put(cmos, B, 0x22)                                          # AIE
    clock.advance(4 * NS)
    assert not cmos.irq.level
    clock.advance(NS)
    assert cmos.irq.level and get(cmos, C) == 0xB0              # IRQF, AF and the UF before it


def test_dont_care_alarm_fires_every_second():
    cmos, clock = make()
    for index in (0x01, 0x03, 0x05):
        put(cmos, index, 0xC0)
    put(cmos, B, 0x22)
    clock.advance(NS)
    assert get(cmos, C) == 0xB0
    clock.advance(NS)
    assert get(cmos, C) == 0xB0


def test_reset_turns_interrupts_off_and_keeps_the_ram():
    cmos, clock = make()
    put(cmos, 0x0F, 0x0A)
    put(cmos, 0x40, 0x77)
    put(cmos, B, 0x72)
    clock.advance(NS)
    assert cmos.irq.level
    cmos.reset()
    assert not cmos.irq.level and get(cmos, B) == 0x12 and get(cmos, 0x0F) == 0 and get(cmos, 0x40) == 0x77


# -- robustness, snapshots, determinism ---------------------------------------------------------------
def test_no_guest_input_raises():
    rng = random.Random(7)
    cmos, clock = make()
    for _ in range(10_000):
        port, size = rng.choice((0x70, 0x71, 0x71, 0x72, 0x73)), rng.choice((1, 2, 4))
        if rng.random() < 0.5:
            cmos.write(port, size, rng.getrandbits(32))
        else:
            assert 0 <= cmos.read(port, size) < 1 << (8 * size)
        if rng.random() < 0.1:
            clock.advance(rng.randrange(0, NS // 4))
        assert cmos.irq.level == bool(cmos.data[C] & 0x80)
    for index in range(0x80):                                   # every register, any value, any mode
        for b in (0x00, 0x06, 0x80, 0x86, 0x7F):
            put(cmos, B, b)
            put(cmos, index, rng.getrandbits(8))
            get(cmos, index)
            clock.advance(rng.randrange(0, NS // 50))


def test_state_restores_the_same_future():
    cmos, clock = make()
    put(cmos, A, 0x24)
    put(cmos, B, 0x52)                                          # PIE and UIE
    put(cmos, 0x01, 0xC0)
    clock.advance(1_500_000_000)
    saved = pickle.loads(pickle.dumps(cmos.state()))
    at, scheduled = clock.now, [(t.at, t.callback) for t in clock.armed()]

    def future():
        reads = []
        for _ in range(50):
            clock.advance(77_777_777)
            reads += [get(cmos, C), get(cmos, A), *clock_registers(cmos), cmos.irq.level]
        return reads

    first = future()
    # As a machine snapshot does, bring back the timers scheduled then; the device re-arms its own.
    clock.now, clock.timers = at, [FakeTimer(due, callback) for due, callback in scheduled]
    cmos.restore(saved)
    assert future() == first


SOURCE_INDICES = (0x8F, 0x34, 0x35, 0x17, 0x18, 0x30, 0x31, 0x14, 0x3D, 0x38, 0x5F,
                  0x32, 0x09, 0x08, 0x07, 0x06, 0x04, 0x02, 0x00, 0x0A, 0x0B, 0x0C, 0x0D)


def reading_guest():
    reads = "".join(f"mov al, {index:#x}; out 0x70, al; in al, 0x71; mov [{0x600 + n:#x}], al; "
                    for n, index in enumerate(SOURCE_INDICES))
    wide = "mov al, 0x35; out 0x70, al; in ax, 0x70; mov [0x700], ax; in ax, 0x71; mov [0x702], ax; "
    return reads + wide + "in al, 0x70; mov [0x5ff], al; hlt"


def run_reading_guest():
    machine = boot_guest(reading_guest(), "real")
    ram = machine.memory.ram_size
    machine.ports.register(PORTS, Cmos(machine.clock, ram, ram))
    result = machine.run(max_instructions=10_000)
    assert result.stop.reason is StopReason.HLT
    return machine.read_memory(0x5FF, 1 + len(SOURCE_INDICES)) + machine.read_memory(0x700, 4), ram


def test_a_real_mode_guest_reads_the_cmos():
    data, ram = run_reading_guest()
    expected = board_bytes(ram, 0)
    assert data[0] == 0xFF                                      # the index port
    assert list(data[1:12]) == [0, *(expected[i] for i in SOURCE_INDICES[1:11])]
    assert list(data[12:24]) == [0x20, 0x26, 0x01, 0x01, 0x05, 0x00, 0x00, 0x00, 0x26, 0x02, 0x00, 0x80]
    assert list(data[24:]) == [0xFF, expected[0x35], 0x00, 0x00]    # in ax: 0x70 then 0x71; at 0x71: 0


def test_two_machines_read_the_same_values():
    assert run_reading_guest() == run_reading_guest()


def test_a_guest_takes_periodic_interrupts_on_irq_8():
    # Real mode: vector 0x70 counts interrupts and acknowledges them by reading C; the main
    # loop halts until three have come, then turns PIE off and halts with interrupts off.
    source = """
        mov word ptr [0x1c0], handler; mov word ptr [0x1c2], 0
        mov al, 0x0a; out 0x70, al; mov al, 0x26; out 0x71, al
        mov al, 0x0b; out 0x70, al; mov al, 0x42; out 0x71, al
        sti
    idle: hlt
        cmp word ptr [0x500], 3
        jb idle
        cli
        mov al, 0x0b; out 0x70, al; mov al, 0x02; out 0x71, al
        mov al, 0x0c; out 0x70, al; in al, 0x71; mov [0x502], al
        hlt
    handler:
        push ax
        mov al, 0x0c; out 0x70, al; in al, 0x71; mov [0x504], al
        inc word ptr [0x500]
        pop ax
        iret
    """
    machine = boot_guest(source, "real")
    line = machine.interrupt_line("rtc", vector=0x70)
    cmos = Cmos(machine.clock, machine.memory.ram_size, machine.memory.ram_size, irq=line)
    machine.ports.register(PORTS, cmos)
    result = machine.run(max_instructions=1_000_000)
    assert result.stop.reason is StopReason.HLT
    count, last_c, handler_c = machine.read_memory(0x500, 1)[0], machine.read_memory(0x502, 1)[0], machine.read_memory(0x504, 1)[0]
    assert count == 3 and handler_c == 0xC0 and last_c == 0x00
    assert cmos.rtc_ns() >= DEFAULT_BASE_TIME * NS + 3 * (NS // 1024)     # three periods went by
