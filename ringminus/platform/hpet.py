"""The HPET at 0xFED00000 as QEMU 7.2 builds it on pc and q35 (hw/timer/hpet.c,
include/hw/timer/hpet.h; reference/platform.md §7.6, §9): capabilities 0x8086A201 (vendor
8086, legacy-replacement capable, 64-bit counter, 3 timers) with a 10 ns period
(0x00989680 fs) in the high dword; the configuration register (ENABLE, LEGACY_RT); the
interrupt status register (write 1 to clear); the main counter, 100 MHz from the clock and
frozen while disabled; and timers 0-2: configuration (level/edge, enable, periodic, 32-bit
mode, SETVAL, route), comparator with the hidden period register, and the FSB route.

The rules are QEMU's (``hpet_ram_read``/``hpet_ram_write``, ``hpet_set_timer``, ``hpet_timer``,
``update_irq``, ``hpet_reset``, ``hpet_handle_legacy_irq``): a comparator write in periodic
mode sets the period (and the comparator only with SETVAL); a comparator in the past fires one
tick later; a 32-bit one-shot timer also fires when the counter wraps; LEGACY_RT routes timer 0
to IRQ 0 and timer 1 to IRQ 8 and cuts the PIT and RTC off those lines; an edge-triggered timer
pulses its line, a level-triggered one sets its ISR bit and holds the line until the guest
clears it.  Kept quirks: QEMU's timer range check (``timer_id > num_timers``) exposes a fourth,
never-reset timer at 0x160-0x17F; enabling a timer whose comparator is still all ones fires it
one tick later.  Two changes: a delay beyond 2^63 ns, which QEMU's int64 arithmetic turns
into "at once", is one tick (QEMU's storm, without stopping time); and a periodic comparator
moves on once the counter reaches it, not only once it has passed it (``_catch_up``).

Access sizes: QEMU 7.2 accepts only aligned 4-byte accesses (``.valid`` 4..4): anything else
reads 0 and drops writes.  Unicorn splits a guest's 8-byte access into two 4-byte ones before
the device sees it, so a 64-bit counter read gives both halves here, as QEMU 9.2+ does, where
QEMU 7.2 returns 0.  The page beyond the 1 KiB region reads 0.

Left out: a timer armed while its interrupt cannot be raised (TN_ENABLE or ENABLE clear).
QEMU keeps such a timer running and moves a periodic comparator at each period; here it is
armed only when it could interrupt (a halted CPU would otherwise wait from one silent expiry
to the next forever), so a disabled periodic timer's comparator does not advance.
FSB (MSI) delivery calls ``msi(address, data)`` if given (QEMU's default has no FSB capability,
but the enable bit is writable)."""
from __future__ import annotations

from typing import Callable

HPET_BASE = 0xFED0_0000
HPET_LEN = 0x400
CLK_PERIOD_NS = 10
FS_PER_NS = 1_000_000
NUM_TIMERS = 3
RTC_ISA_IRQ = 8
PC_INTCAP, Q35_INTCAP = 0x4, 0xFF0104     # IOAPIC pins each board's timers may route to

ID, PERIOD, CFG, CFG_HIGH, STATUS, COUNTER, COUNTER_HIGH = 0x000, 0x004, 0x010, 0x014, 0x020, 0x0F0, 0x0F4
TN_CFG, TN_CFG_HIGH, TN_CMP, TN_CMP_HIGH, TN_ROUTE, TN_ROUTE_HIGH = 0x00, 0x04, 0x08, 0x0C, 0x10, 0x14
CFG_ENABLE, CFG_LEGACY, CFG_WRITE_MASK = 0x1, 0x2, 0x3
TN_TYPE_LEVEL, TN_ENABLE, TN_PERIODIC, TN_PERIODIC_CAP, TN_SIZE_CAP = 0x002, 0x004, 0x008, 0x010, 0x020
TN_SETVAL, TN_32BIT, TN_INT_ROUTE_MASK, TN_FSB_ENABLE, TN_FSB_CAP = 0x040, 0x100, 0x3E00, 0x4000, 0x8000
TN_INT_ROUTE_SHIFT, TN_CFG_WRITE_MASK = 9, 0x7F4E
CAPABILITY = 0x8086_A001 | (NUM_TIMERS - 1) << 8 | (CLK_PERIOD_NS * FS_PER_NS) << 32
M32, M64 = 0xFFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFF
HIGH = M64 ^ M32
MAX_CATCH_UP = 4096                     # periods stepped one by one after the closed form

TIMER_FIELDS = ("config", "cmp", "fsb", "period", "wrap_flag")


def _reached(current: int, comparator: int, mask: int) -> bool:
    """The counter is at or after the comparator in ``mask``-bit wrapping arithmetic
    (hpet_time_after(64), or equal: see ``Hpet._catch_up``)."""
    return (current - comparator) & mask <= (mask >> 1) + 1


def _signed64(value: int) -> int:
    value &= M64
    return value - (1 << 64) if value >> 63 else value


class HpetTimer:
    """One comparator: QEMU's HPETTimer, and the clock timer armed for it."""

    def __init__(self, tn: int):
        self.tn = tn
        self.config = self.cmp = self.fsb = self.period = self.wrap_flag = 0
        self.clock_timer = None
        self.due: int | None = None         # when clock_timer fires (device time, ns)

    @property
    def periodic(self) -> bool:
        return bool(self.config & TN_PERIODIC)

    @property
    def wide(self) -> bool:
        return not self.config & TN_32BIT


class Hpet:
    """The HPET block: an MMIO device (``register(machine)``).  ``clock``: ``now_ns()`` and
    ``add_timer``; ``irq(route, level)`` drives the interrupt routes (QEMU wires route n to
    GSI n: the 8259's IRQ n below 16 and the IOAPIC's pin n, GSI 0 being pin 2);
    ``pit_enabled(level)`` is low while LEGACY_RT takes IRQ 0 from the PIT; ``pit_input`` and
    ``rtc_input`` are the PIT's and RTC's lines, passed through outside legacy mode;
    ``intcap`` the routes timers advertise (PC_INTCAP or Q35_INTCAP)."""

    def __init__(self, clock, irq: Callable[[int, bool], None] | None = None, intcap: int = Q35_INTCAP,
                 pit_enabled: Callable[[bool], None] | None = None,
                 msi: Callable[[int, int], None] | None = None):
        self.clock, self.irq, self.intcap = clock, irq, intcap
        self.pit_enabled, self.msi = pit_enabled, msi
        self.timers = [HpetTimer(tn) for tn in range(NUM_TIMERS + 1)]    # + QEMU's reachable extra
        self.config = self.isr = self.hpet_counter = self.hpet_offset = self.rtc_irq_level = 0
        self._floor = 0
        self.reset()

    def register(self, machine, base: int = HPET_BASE):
        """Map the page on ``machine`` (add_mmio); the region."""
        return machine.add_mmio(base, 0x1000, self, "hpet")

    # -- state helpers --------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return bool(self.config & CFG_ENABLE)

    @property
    def legacy(self) -> bool:
        return bool(self.config & CFG_LEGACY)

    def _now(self) -> int:
        """The clock, never behind a timer already handled (one may be taken before the clock
        shows its due time: a host-time clock, a halt fast-forwarded without moving it)."""
        self._floor = max(self.clock.now_ns(), self._floor)
        return self._floor

    def ticks(self) -> int:
        """hpet_get_ticks: the running counter (10 ns per tick)."""
        return ((self._now() + self.hpet_offset) & M64) // CLK_PERIOD_NS

    def counter(self) -> int:
        return self.ticks() if self.enabled else self.hpet_counter

    # -- MMIO --------------------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if size != 4 or offset & 3 or offset >= HPET_LEN:
            return 0
        return self._read(offset) & M32

    def write(self, offset: int, size: int, value: int) -> None:
        if size != 4 or offset & 3 or offset >= HPET_LEN:
            return
        value &= M32
        if offset >= 0x100:
            timer = self._timer_at(offset)
            if timer is not None:
                handler = TIMER_WRITERS.get((offset - 0x100) % 0x20)
                if handler is not None:
                    handler(self, timer, value)
            return
        handler = WRITERS.get(offset)
        if handler is not None:
            handler(self, value)

    def _read(self, offset: int) -> int:
        """hpet_ram_read (the whole 64-bit register at a low offset, as QEMU returns it)."""
        if offset >= 0x100:
            timer = self._timer_at(offset)
            reader = TIMER_READERS.get((offset - 0x100) % 0x20)
            return reader(timer) if timer is not None and reader is not None else 0
        reader = READERS.get(offset)
        return reader(self) if reader is not None else 0

    def _timer_at(self, offset: int) -> HpetTimer | None:
        index = (offset - 0x100) // 0x20
        return self.timers[index] if index <= NUM_TIMERS else None     # QEMU: "> num_timers"

    # -- global registers ------------------------------------------------------------------------------
    def _write_config(self, value: int) -> None:
        old = self.config
        self.config = (old & ~CFG_WRITE_MASK) | (value & CFG_WRITE_MASK)
        if value & CFG_ENABLE and not old & CFG_ENABLE:
            self.hpet_offset = (self.hpet_counter * CLK_PERIOD_NS - self._now()) & M64
            for timer in self.timers[:NUM_TIMERS]:
                if timer.cmp != M64:
                    self._set_timer(timer)
        elif old & CFG_ENABLE and not value & CFG_ENABLE:
            self.hpet_counter = self.ticks()
            for timer in self.timers[:NUM_TIMERS]:
                self._del_timer(timer)
        if value & CFG_LEGACY and not old & CFG_LEGACY:         # the PIT and RTC lose their lines
            self._pit_enabled(False)
            self._irq(0, False)
            self._irq(RTC_ISA_IRQ, False)
        elif old & CFG_LEGACY and not value & CFG_LEGACY:
            self._irq(0, False)
            self._pit_enabled(True)
            self._irq(RTC_ISA_IRQ, bool(self.rtc_irq_level))

    def _write_status(self, value: int) -> None:
        """Write 1 to clear a (level-triggered) timer's ISR bit, lowering its line."""
        cleared = value & self.isr
        for timer in self.timers[:NUM_TIMERS]:
            if cleared >> timer.tn & 1:
                self._update_irq(timer, False)

    def _write_counter(self, value: int, shift: int) -> None:
        # While enabled the write is kept but the running count ignores it until re-enabled.
        self.hpet_counter = self.hpet_counter & ~(M32 << shift) | value << shift

    # -- timer registers -------------------------------------------------------------------------------
    def _write_timer_config(self, timer: HpetTimer, value: int) -> None:
        old = timer.config
        if value & TN_FSB_ENABLE and not old & TN_FSB_ENABLE:
            self._update_irq(timer, False)
        timer.config = (old & ~TN_CFG_WRITE_MASK) | (value & TN_CFG_WRITE_MASK)
        if value & TN_32BIT:
            timer.cmp &= M32
            timer.period &= M32
        if value & TN_ENABLE and not old & TN_ENABLE and self.enabled:
            self._set_timer(timer)
        elif old & TN_ENABLE and not value & TN_ENABLE:
            self._del_timer(timer)

    def _write_comparator(self, timer: HpetTimer, value: int, shift: int) -> None:
        """The low or high half: the comparator (one-shot, or with SETVAL) and, in periodic
        mode, the period (clamped to half the counter's range)."""
        comparator = not timer.periodic or timer.config & TN_SETVAL
        if comparator:
            timer.cmp = timer.cmp & ~(M32 << shift) | value << shift
        if timer.periodic and (shift == 0 or not comparator):
            value &= (M64 if timer.wide else M32) >> 1
            timer.period = timer.period & ~(M32 << shift) | value << shift
        timer.config &= ~TN_SETVAL
        if self.enabled:
            self._set_timer(timer)

    def _write_route(self, timer: HpetTimer, value: int, shift: int) -> None:
        timer.fsb = timer.fsb & ~(M32 << shift) | value << shift

    # -- the comparators' clock timers (hpet_set_timer, hpet_timer, hpet_del_timer) ----------------------
    def _diff(self, timer: HpetTimer, current: int) -> int:
        """hpet_calculate_diff: ticks to the comparator, at least 1."""
        mask = M64 if timer.wide else M32
        diff = (timer.cmp - current) & mask
        return diff if 0 < diff <= mask >> 1 else 1

    def _set_timer(self, timer: HpetTimer) -> None:
        current = self.ticks()
        timer.wrap_flag = 0
        diff = self._diff(timer, current)
        if not timer.wide and not timer.periodic:       # a 32-bit one-shot also fires at the wrap
            wrap_diff = M32 - (current & M32)
            if wrap_diff < diff & M32:
                diff, timer.wrap_flag = wrap_diff, 1
        self._arm(timer, diff)

    def _arm(self, timer: HpetTimer, diff: int) -> None:
        self._cancel(timer)
        if not (timer.config & TN_ENABLE and self.enabled):
            return                          # nothing could be raised (see the module's "Left out")
        # QEMU adds the delay as an int64: past 2^63 ns it lands in the past and fires at
        # once; from the timer's own callback that would fire again and again at the same
        # instant, so here such a delay is one tick (a storm, but time moves).
        delay = _signed64(diff * CLK_PERIOD_NS)
        self._arm_at(timer, self._now() + (delay if delay > 0 else CLK_PERIOD_NS))

    def _arm_at(self, timer: HpetTimer, due: int) -> None:
        clock_timer = self.clock.add_timer(max(due - self.clock.now_ns(), 0),
                                           lambda: self._expired(timer, clock_timer))
        timer.clock_timer, timer.due = clock_timer, due

    def _cancel(self, timer: HpetTimer) -> None:
        if timer.clock_timer is not None:
            timer.clock_timer.cancel()
        timer.clock_timer = timer.due = None

    def _del_timer(self, timer: HpetTimer) -> None:
        self._cancel(timer)
        self._update_irq(timer, False)

    def _expired(self, timer: HpetTimer, clock_timer) -> None:
        """hpet_timer: a periodic comparator moves past the counter and the timer re-arms; a
        32-bit one-shot that stopped at the wrap re-arms for its comparator."""
        if clock_timer is not timer.clock_timer:
            return                          # replaced, or from before a restore
        self._floor = max(self._floor, timer.due)
        timer.clock_timer = timer.due = None
        current = self.ticks()
        if timer.periodic and timer.period:
            self._catch_up(timer, current)
            self._arm(timer, self._diff(timer, current))
        elif not timer.wide and not timer.periodic and timer.wrap_flag:
            timer.wrap_flag = 0
            self._arm(timer, self._diff(timer, current))
        self._update_irq(timer, True)

    @staticmethod
    def _catch_up(timer: HpetTimer, current: int) -> None:
        """QEMU's ``while (after(cur, cmp)) cmp += period``, in closed form (a long halt
        would otherwise step a short period millions of times).  QEMU's test is strict: its
        timers fire late enough that the counter has passed the comparator.  Here they fire
        on time, with the counter equal to the comparator, where QEMU's test would leave the
        comparator and fire again one tick later: so the comparator moves once reached."""
        mask = M64 if timer.wide else M32
        step = timer.period & mask
        if not step:
            return                          # QEMU would loop forever; the comparator stays
        if _reached(current, timer.cmp, mask):
            timer.cmp = (timer.cmp + ((current - timer.cmp) & mask) // step * step + step) & mask
        for _ in range(MAX_CATCH_UP):       # a step past half the range overshoots: step on
            if not _reached(current, timer.cmp, mask):
                break
            timer.cmp = (timer.cmp + step) & mask

    # -- interrupts (update_irq, hpet_handle_legacy_irq) -----------------------------------------------
    def _route(self, timer: HpetTimer) -> int:
        if timer.tn <= 1 and self.legacy:
            return 0 if timer.tn == 0 else RTC_ISA_IRQ
        return (timer.config & TN_INT_ROUTE_MASK) >> TN_INT_ROUTE_SHIFT

    def _update_irq(self, timer: HpetTimer, raised: bool) -> None:
        route, mask = self._route(timer), 1 << timer.tn
        fsb = timer.config & TN_FSB_ENABLE
        if not raised or not timer.config & TN_ENABLE or not self.enabled:
            self.isr &= ~mask
            if not fsb:
                self._irq(route, False)
        elif fsb:
            if self.msi is not None:
                self.msi(timer.fsb >> 32, timer.fsb & M32)
        elif timer.config & TN_TYPE_LEVEL:
            self.isr |= mask
            self._irq(route, True)
        else:
            self.isr &= ~mask
            self._irq(route, True)          # qemu_irq_pulse
            self._irq(route, False)

    def _irq(self, route: int, level: bool) -> None:
        if self.irq is not None:
            self.irq(route, level)

    def _pit_enabled(self, level: bool) -> None:
        if self.pit_enabled is not None:
            self.pit_enabled(level)

    def pit_input(self, level: bool) -> None:
        """The PIT's IRQ 0 line: through to route 0 unless in legacy mode."""
        if not self.legacy:
            self._irq(0, level)

    def rtc_input(self, level: bool) -> None:
        """The RTC's IRQ 8 line: remembered, and through to route 8 unless in legacy mode."""
        self.rtc_irq_level = int(bool(level))
        if not self.legacy:
            self._irq(RTC_ISA_IRQ, level)

    # -- reset and snapshots ----------------------------------------------------------------------------
    def reset(self) -> None:
        """hpet_reset: the three timers (not QEMU's extra one), the counter and the configuration."""
        for timer in self.timers[:NUM_TIMERS]:
            self._del_timer(timer)
            timer.cmp = M64
            timer.config = TN_PERIODIC_CAP | TN_SIZE_CAP | self.intcap << 32
            timer.period = timer.wrap_flag = 0
        self._pit_enabled(True)
        self.hpet_counter = self.hpet_offset = self.config = 0
        self.rtc_irq_level = 0

    def state(self) -> dict:
        return {"config": self.config, "isr": self.isr, "hpet_counter": self.hpet_counter,
                "hpet_offset": self.hpet_offset, "rtc_irq_level": self.rtc_irq_level, "floor": self._floor,
                "timers": tuple((*(getattr(t, name) for name in TIMER_FIELDS), t.due) for t in self.timers)}

    def restore(self, state: dict) -> None:
        """Back to ``state``, each timer re-armed for its expiry.  Restore the machine (its
        clock and scheduled events) first."""
        self.config, self.isr, self.hpet_counter = state["config"], state["isr"], state["hpet_counter"]
        self.hpet_offset, self.rtc_irq_level, self._floor = state["hpet_offset"], state["rtc_irq_level"], state["floor"]
        for timer, saved in zip(self.timers, state["timers"]):
            self._cancel(timer)
            *values, due = saved
            for name, value in zip(TIMER_FIELDS, values):
                setattr(timer, name, value)
            if due is not None:
                self._arm_at(timer, due)


# Register offset -> reader(self) / writer(self, value) for the global registers.
READERS: dict[int, Callable[[Hpet], int]] = {
    ID: lambda s: CAPABILITY,
    PERIOD: lambda s: CAPABILITY >> 32,
    CFG: lambda s: s.config,
    STATUS: lambda s: s.isr,
    COUNTER: lambda s: s.counter(),
    COUNTER_HIGH: lambda s: s.counter() >> 32,
}
WRITERS: dict[int, Callable[[Hpet, int], None]] = {
    CFG: Hpet._write_config,
    STATUS: Hpet._write_status,
    COUNTER: lambda s, v: s._write_counter(v, 0),
    COUNTER_HIGH: lambda s, v: s._write_counter(v, 32),
}

# Offset within a timer's 0x20 bytes -> reader(timer) / writer(self, timer, value).
TIMER_READERS: dict[int, Callable[[HpetTimer], int]] = {
    TN_CFG: lambda t: t.config,
    TN_CFG_HIGH: lambda t: t.config >> 32,          # the routes it may use
    TN_CMP: lambda t: t.cmp,
    TN_CMP_HIGH: lambda t: t.cmp >> 32,
    TN_ROUTE: lambda t: t.fsb,
    TN_ROUTE_HIGH: lambda t: t.fsb >> 32,
}
TIMER_WRITERS: dict[int, Callable[[Hpet, HpetTimer, int], None]] = {
    TN_CFG: Hpet._write_timer_config,
    TN_CMP: lambda s, t, v: s._write_comparator(t, v, 0),
    TN_CMP_HIGH: lambda s, t, v: s._write_comparator(t, v, 32),
    TN_ROUTE: lambda s, t, v: s._write_route(t, v, 0),
    TN_ROUTE_HIGH: lambda s, t, v: s._write_route(t, v, 32),
}
