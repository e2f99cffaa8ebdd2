"""The HPET (ringminus/platform/hpet.py) against QEMU 7.2's hpet.c: capabilities and reset
values, access sizes, the main counter (100 MHz, only while enabled), one-shot, periodic and
32-bit timers, comparators in the past, edge and level interrupts and the status register,
routes and legacy replacement, QEMU's reachable fourth timer, snapshots — and a 32-bit guest
reading the counter, 64 bits at a time."""
import random

import pytest

from ringminus import Machine, StopReason
from ringminus.platform.hpet import HPET_BASE, PC_INTCAP, Q35_INTCAP, Hpet

from ..helpers import asm
from .fakes import FakeClock

CAP, PERIOD, CFG, STATUS, COUNTER = 0x000, 0x004, 0x010, 0x020, 0x0F0
ENABLE, LEGACY = 1, 2
T_LEVEL, T_ENABLE, T_PERIODIC, T_SETVAL, T_32BIT = 0x2, 0x4, 0x8, 0x40, 0x100


def timer_cfg(n):
    return 0x100 + 0x20 * n


def timer_cmp(n):
    return 0x108 + 0x20 * n


class Lines:
    """The routes' levels and every change, as irq(route, level) reports them."""

    def __init__(self):
        self.level, self.log = {}, []

    def __call__(self, route, level):
        self.level[route] = level
        self.log.append((route, level))

    def pulses(self, route):
        return sum(1 for i, change in enumerate(self.log[:-1])
                   if change == (route, True) and self.log[i + 1] == (route, False))


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def lines():
    return Lines()


@pytest.fixture
def hpet(clock, lines):
    return Hpet(clock, lines)


def rd(hpet, offset):
    return hpet.read(offset, 4)


def rd64(hpet, offset):
    return rd(hpet, offset) | rd(hpet, offset + 4) << 32


def wr(hpet, offset, value):
    hpet.write(offset, 4, value)


def wr64(hpet, offset, value):
    wr(hpet, offset, value & 0xFFFF_FFFF)
    wr(hpet, offset + 4, value >> 32)


def route_bits(route):
    return route << 9


def program(hpet, n, config, comparator):
    """A timer's configuration and 64-bit comparator as a 32-bit guest sets them: SETVAL
    before each half (a comparator write clears it)."""
    for half in (0, 4):
        wr(hpet, timer_cfg(n), config | T_SETVAL)
        wr(hpet, timer_cmp(n) + half, comparator >> (8 * half) & 0xFFFF_FFFF)


# -- registers ---------------------------------------------------------------------------------------
def test_capabilities_and_reset_values(hpet):
    assert rd(hpet, CAP) == 0x8086_A201 and rd(hpet, PERIOD) == 0x0098_9680
    assert rd64(hpet, CFG) == 0 and rd(hpet, STATUS) == 0 and rd64(hpet, COUNTER) == 0
    for n in range(3):
        assert rd(hpet, timer_cfg(n)) == 0x30 and rd(hpet, timer_cfg(n) + 4) == Q35_INTCAP
        assert rd64(hpet, timer_cmp(n)) == 0xFFFF_FFFF_FFFF_FFFF
        assert rd64(hpet, timer_cfg(n) + 0x10) == 0


def test_the_pc_board_advertises_only_ioapic_pin_2(clock):
    assert rd(Hpet(clock, intcap=PC_INTCAP), timer_cfg(0) + 4) == 0x4


@pytest.mark.parametrize("size", [1, 2, 8])
def test_only_four_byte_accesses_count(hpet, size):
    assert hpet.read(CAP, size) == 0
    hpet.write(CFG, size, ENABLE)
    assert rd(hpet, CFG) == 0


def test_misaligned_and_out_of_region_accesses(hpet):
    assert rd(hpet, CAP + 2) == 0 and rd(hpet, 0x400) == 0 and rd(hpet, 0xFFC) == 0
    wr(hpet, CFG + 1, ENABLE)
    wr(hpet, 0x410, ENABLE)
    assert rd(hpet, CFG) == 0


def test_read_only_and_reserved_registers(hpet):
    wr(hpet, CAP, 0)
    wr(hpet, PERIOD, 0)
    wr(hpet, CFG, 0xFFFF_FFFF)
    wr(hpet, CFG + 4, 0xFFFF_FFFF)
    assert rd(hpet, CAP) == 0x8086_A201 and rd64(hpet, CFG) == 3
    wr(hpet, timer_cfg(0), 0xFFFF_FFFF)
    wr(hpet, timer_cfg(0) + 4, 0)
    assert rd(hpet, timer_cfg(0)) == 0x7F4E | 0x30 and rd(hpet, timer_cfg(0) + 4) == Q35_INTCAP


def test_no_guest_access_raises(hpet, clock):
    rng = random.Random(5)
    for _ in range(20000):
        offset, size = rng.randrange(0x1000), rng.choice((1, 2, 4, 8))
        if rng.random() < 0.3:
            offset = rng.choice((CFG, STATUS, COUNTER, COUNTER + 4)) if rng.random() < 0.5 else \
                0x100 + rng.randrange(4) * 0x20 + rng.choice((0, 4, 8, 12, 16, 20))
            size = 4
        if rng.random() < 0.5:
            hpet.read(offset, size)
        else:
            hpet.write(offset, size, rng.getrandbits(rng.choice((3, 16, 32, 64))))
        if rng.random() < 0.01:
            clock.advance(rng.randrange(100_000))
            hpet.pit_input(rng.random() < 0.5)
            hpet.rtc_input(rng.random() < 0.5)


# -- the main counter --------------------------------------------------------------------------------
def test_the_counter_runs_at_100_mhz_only_while_enabled(hpet, clock):
    clock.advance(1000)
    assert rd64(hpet, COUNTER) == 0
    wr(hpet, CFG, ENABLE)
    clock.advance(255)
    assert rd64(hpet, COUNTER) == 25
    wr(hpet, CFG, 0)
    clock.advance(10_000)
    assert rd64(hpet, COUNTER) == 25
    wr(hpet, CFG, ENABLE)
    clock.advance(100)
    assert rd64(hpet, COUNTER) == 35


def test_the_counter_is_written_while_disabled(hpet, clock):
    wr64(hpet, COUNTER, 0x1_0000_0000 - 3)
    wr(hpet, CFG, ENABLE)
    clock.advance(50)
    assert rd64(hpet, COUNTER) == 0x1_0000_0002
    wr(hpet, COUNTER, 0)                    # while enabled: kept, not used until re-enabled
    assert rd64(hpet, COUNTER) == 0x1_0000_0002


# -- timers --------------------------------------------------------------------------------------------
def test_a_one_shot_edge_timer_pulses_its_route(hpet, clock, lines):
    wr(hpet, timer_cfg(2), T_ENABLE | route_bits(17))
    wr64(hpet, timer_cmp(2), 100)
    wr(hpet, CFG, ENABLE)
    assert clock.armed() == [1000]
    clock.advance(999)
    assert lines.pulses(17) == 0
    clock.advance(1)
    assert lines.pulses(17) == 1 and rd(hpet, STATUS) == 0 and clock.armed() == []


def test_a_level_timer_holds_its_line_until_status_is_cleared(hpet, clock, lines):
    wr(hpet, timer_cfg(1), T_ENABLE | T_LEVEL | route_bits(11))
    wr64(hpet, timer_cmp(1), 10)
    wr(hpet, CFG, ENABLE)
    clock.advance(100)
    assert lines.level[11] and rd(hpet, STATUS) == 0b10
    wr(hpet, STATUS, 0b01)                  # another timer's bit: nothing
    assert lines.level[11]
    wr(hpet, STATUS, 0b10)
    assert not lines.level[11] and rd(hpet, STATUS) == 0


def test_periodic_with_setval(hpet, clock, lines):
    program(hpet, 0, T_ENABLE | T_PERIODIC | route_bits(2), 50)     # low half: comparator and period
    assert rd(hpet, timer_cfg(0)) & T_SETVAL == 0
    assert rd64(hpet, timer_cmp(0)) == 50
    wr(hpet, CFG, ENABLE)
    clock.advance(500)
    assert lines.pulses(2) == 1 and rd64(hpet, timer_cmp(0)) == 100
    clock.advance(2000)
    assert lines.pulses(2) == 5 and rd64(hpet, timer_cmp(0)) == 300


def test_a_periodic_comparator_write_without_setval_sets_only_the_period(hpet, clock, lines):
    wr(hpet, CFG, ENABLE)
    wr(hpet, timer_cfg(0), T_ENABLE | T_PERIODIC)
    wr(hpet, timer_cmp(0), 40)              # period 40; comparator stays all ones
    assert rd64(hpet, timer_cmp(0)) == 0xFFFF_FFFF_FFFF_FFFF
    clock.advance(10)                       # an all-ones comparator is "in the past": 1 tick
    assert lines.pulses(0) == 1 and rd64(hpet, timer_cmp(0)) == 39


def test_a_comparator_in_the_past_fires_one_tick_later(hpet, clock, lines):
    wr(hpet, CFG, ENABLE)
    clock.advance(1000)
    wr(hpet, timer_cfg(0), T_ENABLE | route_bits(3))
    wr64(hpet, timer_cmp(0), 5)
    assert clock.armed() == [1010]


def test_32_bit_mode_truncates_and_wraps(hpet, clock, lines):
    wr64(hpet, COUNTER, 0xFFFF_FFF0)
    wr64(hpet, timer_cmp(0), 0x1_0000_0020)
    wr(hpet, timer_cfg(0), T_32BIT | T_ENABLE | route_bits(4))
    assert rd64(hpet, timer_cmp(0)) == 0x20
    wr(hpet, CFG, ENABLE)
    assert clock.armed() == [150]           # first the wrap (15 ticks), then the comparator
    clock.advance(150)
    assert lines.pulses(4) == 1 and clock.armed() == [150 + 0x21 * 10]
    clock.advance(0x21 * 10)
    assert lines.pulses(4) == 2 and clock.armed() == []


def test_a_disabled_timer_raises_nothing_and_is_not_armed(hpet, clock, lines):
    wr(hpet, CFG, ENABLE)
    wr64(hpet, timer_cmp(0), 10)
    assert clock.armed() == []
    wr(hpet, timer_cfg(0), T_ENABLE)        # enabling it arms it
    assert clock.armed() == [100]
    wr(hpet, timer_cfg(0), 0)
    assert clock.armed() == []


def test_disabling_the_hpet_stops_the_timers_and_clears_status(hpet, clock, lines):
    wr(hpet, timer_cfg(0), T_ENABLE | T_LEVEL | route_bits(5))
    wr64(hpet, timer_cmp(0), 1)
    wr(hpet, CFG, ENABLE)
    clock.advance(10)
    assert rd(hpet, STATUS) == 1 and lines.level[5]
    wr(hpet, CFG, 0)
    assert rd(hpet, STATUS) == 0 and not lines.level[5] and clock.armed() == []


def test_legacy_replacement_routes(hpet, clock, lines):
    wr(hpet, timer_cfg(0), T_ENABLE | route_bits(20))
    wr(hpet, timer_cfg(1), T_ENABLE | route_bits(21))
    wr64(hpet, timer_cmp(0), 10)
    wr64(hpet, timer_cmp(1), 20)
    wr(hpet, CFG, ENABLE | LEGACY)
    clock.advance(200)
    assert lines.pulses(0) == 1 and lines.pulses(8) == 1 and not lines.pulses(20) and not lines.pulses(21)


def test_legacy_mode_takes_irq_0_and_8_from_the_pit_and_rtc(clock, lines):
    pit = []
    hpet = Hpet(clock, lines, pit_enabled=pit.append)
    hpet.pit_input(True)
    hpet.rtc_input(True)
    assert lines.level == {0: True, 8: True} and pit == [True]
    wr(hpet, CFG, LEGACY)
    assert lines.level == {0: False, 8: False} and pit == [True, False]
    lines.log.clear()
    hpet.pit_input(False)
    hpet.rtc_input(False)
    hpet.rtc_input(True)
    assert lines.log == []
    wr(hpet, CFG, 0)                        # the RTC's level comes back
    assert lines.level == {0: False, 8: True} and pit[-1] is True


def test_fsb_delivery(clock, lines):
    messages = []
    hpet = Hpet(clock, lines, msi=lambda address, data: messages.append((address, data)))
    wr(hpet, timer_cfg(0), T_ENABLE | 0x4000)
    wr64(hpet, timer_cfg(0) + 0x10, 0xFEE0_0000 << 32 | 0x41)
    wr64(hpet, timer_cmp(0), 3)
    wr(hpet, CFG, ENABLE)
    clock.advance(30)
    assert messages == [(0xFEE0_0000, 0x41)] and not lines.pulses(0)


def test_qemus_range_check_reaches_a_fourth_timer(hpet, clock, lines):
    wr(hpet, timer_cfg(3), T_ENABLE | route_bits(9))
    wr64(hpet, timer_cmp(3), 7)
    assert rd(hpet, timer_cfg(3)) == T_ENABLE | route_bits(9)       # no capabilities: never reset
    wr(hpet, CFG, ENABLE)                   # enabling arms only timers 0-2 ...
    assert clock.armed() == []
    wr64(hpet, timer_cmp(3), 7)             # ... but a comparator write with ENABLE set arms it
    clock.advance(70)
    assert lines.pulses(9) == 1
    assert rd(hpet, timer_cfg(4)) == 0


def test_a_periodic_comparator_written_without_setval_before_the_high_half(hpet, clock):
    """QEMU 7.2: the low half's write clears SETVAL, so the high half goes to the period and
    the comparator keeps the reset value's all-ones high half."""
    wr(hpet, timer_cfg(0), T_PERIODIC | T_SETVAL)
    wr64(hpet, timer_cmp(0), 50)
    assert rd64(hpet, timer_cmp(0)) == 0xFFFF_FFFF_0000_0032


def test_a_halted_cpu_woken_early_sees_the_counter_at_the_expiry(hpet, clock, lines):
    wr(hpet, CFG, ENABLE)
    program(hpet, 0, T_ENABLE | T_PERIODIC, 1000)
    clock.fire_next_halted()
    assert clock.now == 0 and lines.pulses(0) == 1
    assert rd64(hpet, COUNTER) == 1000 and clock.armed() == [20_000]


def test_a_long_halt_catches_a_short_period_up_at_once(hpet, clock, lines):
    wr(hpet, CFG, ENABLE)
    program(hpet, 0, T_ENABLE | T_PERIODIC, 1)
    clock.now = 10 ** 12                    # the clock jumped a thousand seconds
    clock.fire_next_halted()
    assert rd64(hpet, timer_cmp(0)) == 10 ** 11 + 1 and clock.armed() == [10 ** 12 + 10]


def test_reset_and_restore(hpet, clock, lines):
    program(hpet, 0, T_ENABLE | T_PERIODIC, 10)
    wr(hpet, CFG, ENABLE)
    clock.advance(150)
    saved = hpet.state()
    clock.advance(1000)
    hpet.reset()
    assert rd64(hpet, CFG) == 0 and rd(hpet, timer_cfg(0)) == 0x30 and clock.armed() == []
    clock.now = 150
    hpet.restore(saved)
    assert hpet.state() == saved and clock.armed() == [200]
    clock.advance(50)
    assert rd64(hpet, COUNTER) == 20 and rd64(hpet, timer_cmp(0)) == 30


# -- a guest -------------------------------------------------------------------------------------------
def test_guest_reads_the_counter_64_bits_at_a_time():
    """Enabled by the write at instruction 3 (counted from 0), read by the MOVQ at 3 + 103:
    the counter is 10 ns a tick, one instruction a nanosecond."""
    machine = Machine(exact_instructions=True)
    hpet = Hpet(machine.clock)
    hpet.register(machine)
    H = HPET_BASE
    code = (f"mov eax, cr4\nor eax, 0x600\nmov cr4, eax\nmov dword ptr [{H + CFG:#x}], 1\n" + "nop\n" * 102
            + f"movq xmm0, qword ptr [{H + COUNTER:#x}]\nmovd esi, xmm0\npsrlq xmm0, 32\nmovd edi, xmm0\n"
            f"mov ebx, dword ptr [{H + CAP:#x}]\nmov ecx, dword ptr [{H + PERIOD:#x}]\nhlt\n")
    machine.write_memory(0x100000, asm(code, 32, 0x100000))
    machine.boot("protected", 0x100000)
    result = machine.run(max_instructions=1000)
    assert result.stop.reason is StopReason.HLT
    assert (result.regs["rsi"], result.regs["rdi"]) == (10, 0)
    assert (result.regs["rbx"], result.regs["rcx"]) == (0x8086_A201, 0x0098_9680)
