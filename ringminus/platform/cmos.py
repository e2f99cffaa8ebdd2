"""The MC146818 RTC and its 128 bytes of CMOS RAM on ports 0x70/0x71, as QEMU 7.2 models it
on the pc and q35 machines: hw/rtc/mc146818rtc.c, with the bytes hw/i386/pc.c pc_cmos_init
and hw/i386/x86.c x86_rtc_set_cpus_count fill (reference/platform.md §6).

Ports.  QEMU maps one 2-port region at 0x70 (its first port also a 1-port "rtc-index"
subregion with the same handlers); nothing decodes 0x72/0x73 (the second bank of real
chipsets), so ``PORTS`` is 0x70-0x71.  The handlers' ``.impl`` size is 1 byte and ``.valid``
is left at 0, so a wider IN/OUT reaches them as byteregs.py describes: at 0x71 (offset 1 of
its region) a 2- or 4-byte access is unaligned — reads 0, writes dropped; at 0x70 it becomes
byte accesses at offsets 0, 1 (, 2, 3), each even one the index port and each odd one the data
port, as QEMU's ``addr & 1`` decodes them.  ``out 0x70, ax`` selects index AL and writes AH;
``in eax, 0x70`` reads the selected byte twice (a read of C clears it in between).

Time.  The RTC's wall time is QEMU's ``base_rtc`` seconds + (clock − ``last_update``) +
``offset`` ns, the clock being ``clock.now_ns()`` (the machine's, virtual by default).  QEMU
starts from the host's UTC time; here the default start is fixed — DEFAULT_BASE_TIME,
2026-01-01T00:00:00 UTC at the moment the device is created — so runs and replays read the
same dates.  ``base_time`` picks another start, ``host_time=True`` the host's UTC time in whole
seconds (as QEMU's qemu_get_timedate).  Times before 1970 use floor division where QEMU's
unsigned arithmetic would wrap.

Timers.  QEMU's update timer sets UF (and AF at the alarm) in register C whether or not their
interrupts are enabled.  Here those events are applied lazily: every access first catches up
with each event due by then, at the event's own time, so a clock timer is armed only while an
interrupt can follow: B.PIE (the periodic timer), B.UIE or B.AIE (the update timer).  A halted
CPU takes its next timer without the clock advancing (the run loop fast-forwards), so the
device keeps the latest time it has acted on and never lets its own time run backwards.

Left out: the lost-tick "slew" policy and its reinjection (QEMU's default is discard), the
square-wave output, the HPET's legacy-replacement capture of IRQ 8, the S3 shutdown byte set on
suspend, and the floppy/IDE bytes (0x10, 0x12, 0x19-0x2D, 0x39 stay 0: no drives are modeled).
"""
from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Callable, Protocol

from .byteregs import ByteRegion, ByteRegions

PORTS = range(0x70, 0x72)
INDEX_PORT = 0x70

NS = 1_000_000_000
RTC_HZ = 32_768                         # the divider chain's input: periodic rates are in its ticks
UIP_HOLD_NS = 8 * NS // RTC_HZ          # 244140: UIP reads set this long before each update
DAY = 86_400
KIB, MIB = 1 << 10, 1 << 20
DEFAULT_BASE_TIME = 1_767_225_600       # 2026-01-01T00:00:00Z

# Register indices (include/hw/rtc/mc146818rtc_regs.h).
SECONDS, SECONDS_ALARM, MINUTES, MINUTES_ALARM, HOURS, HOURS_ALARM = range(6)
DAY_OF_WEEK, DAY_OF_MONTH, MONTH, YEAR = range(6, 10)
REG_A, REG_B, REG_C, REG_D = range(0x0A, 0x0E)
SHUTDOWN, EQUIPMENT = 0x0F, 0x14
CENTURY, PS2_CENTURY = 0x32, 0x37       # 0x37 is redirected to 0x32 (the index itself changes)
TIME_REGISTERS = frozenset({SECONDS, MINUTES, HOURS, DAY_OF_WEEK, DAY_OF_MONTH, MONTH, YEAR, CENTURY})
ALARM_REGISTERS = frozenset({SECONDS_ALARM, MINUTES_ALARM, HOURS_ALARM})

A_UIP, A_DIVIDER, A_DIVIDER_RESET, A_RATE = 0x80, 0x70, 0x60, 0x0F
B_SET, B_PIE, B_AIE, B_UIE, B_SQWE, B_DM, B_24H = 0x80, 0x40, 0x20, 0x10, 0x08, 0x04, 0x02
C_IRQF, C_PF, C_AF, C_UF = 0x80, 0x40, 0x20, 0x10
C_SOURCES = C_PF | C_AF | C_UF          # each lines up with its enable bit in B
DIVIDER_RUNNING = 0x20                  # A bits 6:4 at or below 010: the 32.768 kHz divider runs

RESET_REGISTERS = {REG_A: 0x26, REG_B: 0x02, REG_C: 0x00, REG_D: 0x80}      # rtc_realizefn
BOOT_DEVICES = {"a": 1, "b": 1, "c": 2, "d": 3, "n": 4}                     # boot_device2nibble
MAX_BOOT_DEVICES = 3
FPU, PS2_MOUSE = 0x02, 0x04

# pc_cmos_init's memory fields, little-endian: (first index, bytes, value of (below_4g, above_4g)).
MEMORY_FIELDS = (
    (0x15, 2, lambda below, above: min(below // KIB, 640)),                         # base memory, KiB
    (0x17, 2, lambda below, above: min(max(below - MIB, 0) // KIB, 0xFFFF)),        # extended, KiB
    (0x30, 2, lambda below, above: min(max(below - MIB, 0) // KIB, 0xFFFF)),        # the same again
    (0x34, 2, lambda below, above: min(max(below - 16 * MIB, 0) // (64 * KIB), 0xFFFF)),  # 16 MiB-4 GiB
    (0x5B, 3, lambda below, above: above // (64 * KIB)),                            # above 4 GiB
)


class Clock(Protocol):
    def now_ns(self) -> int: ...

    def add_timer(self, after_ns: int, callback: Callable[[], None]): ...


class Line(Protocol):
    def raise_(self) -> None: ...

    def lower(self) -> None: ...


def board_bytes(below_4g: int, above_4g: int, cpus: int = 1, boot_order: str = "cad",
                fd_bootchk: bool = True) -> dict[int, int]:
    """The CMOS bytes QEMU's board code fills (pc_cmos_init, set_boot_dev,
    x86_rtc_set_cpus_count), index -> byte, for a machine without floppy or IDE drives."""
    filled = {}
    for index, width, value in MEMORY_FIELDS:
        number = value(below_4g, above_4g)
        filled.update({index + i: (number >> (8 * i)) & 0xFF for i in range(width)})
    first, second, third = (*boot_nibbles(boot_order), 0, 0, 0)[:3]
    filled[0x3D] = second << 4 | first
    filled[0x38] = third << 4 | (0 if fd_bootchk else 1)
    filled[EQUIPMENT] = FPU | PS2_MOUSE
    # Above 255 CPUs the BIOS must use fw_cfg's count; QEMU writes 0 "to fail predictably".
    filled[0x5F] = cpus - 1 if cpus <= 0xFF else 0
    return filled


def boot_nibbles(boot_order: str) -> list[int]:
    if len(boot_order) > MAX_BOOT_DEVICES:
        raise ValueError(f"too many boot devices for PC: {boot_order!r}")
    if any(device not in BOOT_DEVICES for device in boot_order):
        raise ValueError(f"invalid boot device for PC in {boot_order!r} (a, b, c, d or n)")
    return [BOOT_DEVICES[device] for device in boot_order]


# -- calendar arithmetic that cannot raise, whatever a guest writes ------------------------------
def _cdiv(a: int, b: int) -> int:
    """C's integer division (truncates toward zero)."""
    quotient = abs(a) // abs(b)
    return quotient if (a < 0) == (b < 0) else -quotient


def _cmod(a: int, b: int) -> int:
    return a - b * _cdiv(a, b)


def mktimegm(year: int, month: int, day: int, hour: int, minute: int, second: int) -> int:
    """Seconds since 1970 of a UTC date, with QEMU's formula (util/cutils.c mktimegm), which
    accepts any field values — a guest may write nonsense into the date registers."""
    if month < 3:
        month, year = month + 12, year - 1
    days = (day + _cdiv(153 * month - 457, 5) + 365 * year + _cdiv(year, 4) - _cdiv(year, 100)
            + _cdiv(year, 400) - 719469)
    return DAY * days + 3600 * hour + 60 * minute + second


def gmtime(seconds: int) -> tuple[int, int, int, int, int, int, int]:
    """(year, month, day, hour, minute, second, weekday with Sunday 0) of any second count;
    datetime would refuse years outside 1-9999."""
    days, rest = divmod(seconds, DAY)
    hour, rest = divmod(rest, 3600)
    minute, second = divmod(rest, 60)
    era, day_of_era = divmod(days + 719468, 146097)        # 400-year eras from 0000-03-01
    year_of_era = (day_of_era - day_of_era // 1460 + day_of_era // 36524 - day_of_era // 146096) // 365
    day_of_year = day_of_era - (365 * year_of_era + year_of_era // 4 - year_of_era // 100)
    month_from_march = (5 * day_of_year + 2) // 153
    day = day_of_year - (153 * month_from_march + 2) // 5 + 1
    month = month_from_march + 3 if month_from_march < 10 else month_from_march - 9
    year = year_of_era + 400 * era + (month <= 2)
    return year, month, day, hour, minute, second, (days + 4) % 7        # 1970-01-01 was a Thursday


def _epoch_seconds(moment: int | datetime) -> int:
    if isinstance(moment, datetime):
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        return int(moment.timestamp())
    return int(moment)


class Cmos:
    """The RTC and CMOS RAM: a port device for ``PORTS``.  ``data`` is the 128-byte RAM (the
    time registers in it are refreshed when read), ``index`` the register port 0x71 reaches;
    ``irq`` (anything with ``raise_()``/``lower()``) is ISA IRQ 8, high while C.IRQF is set."""
    precise = False

    def __init__(self, clock: Clock, ram_size: int, below_4g: int, above_4g: int = 0, cpus: int = 1,
                 irq: Line | None = None, boot_order: str = "cad", *,
                 base_time: int | datetime = DEFAULT_BASE_TIME, host_time: bool = False,
                 fd_bootchk: bool = True):
        if below_4g < 0 or above_4g < 0 or below_4g + above_4g != ram_size:
            raise ValueError(f"RAM below ({below_4g:#x}) and above ({above_4g:#x}) 4 GiB must add up "
                             f"to ram_size ({ram_size:#x})")
        if cpus < 1:
            raise ValueError(f"a machine has at least one CPU, not {cpus}")
        filled = board_bytes(below_4g, above_4g, cpus, boot_order, fd_bootchk)
        self.clock, self.irq = clock, irq
        self.data = bytearray(128)
        self.index = 0
        now = self._floor = clock.now_ns()
        self._timer, self._timer_due, self._timer_token = None, None, 0
        self._io = ByteRegions((ByteRegion(INDEX_PORT, len(PORTS), self._read_offset, self._write_offset),))
        # rtc_realizefn: the status registers, the date (rtc_set_date_from_host), the update timer.
        for index, value in RESET_REGISTERS.items():
            self.data[index] = value
        self.base = int(time.time()) if host_time else _epoch_seconds(base_time)
        self.last_update, self.offset = now, 0
        self._store_time(gmtime(self.base))
        self.period, self.next_periodic = 0, 0            # 32 kHz ticks per interrupt (0: off); due at
        self.next_update: int | None = None                # when the update timer fires (None: idle)
        self.next_alarm: int | None = None                 # when the alarm matches (None: never)
        self._check_update_timer(now)
        for index, value in filled.items():               # pc_cmos_init, x86_rtc_set_cpus_count
            self.data[index] = value

    # -- the port device ----------------------------------------------------------------------
    # Each access first catches up with the events due, which sets ``_floor`` to the time of
    # the access: the register handlers below act at that time.
    def read(self, port: int, size: int) -> int:
        self._catch_up()
        value = self._io.read(port, size)
        self._arm()
        return value

    def write(self, port: int, size: int, value: int) -> None:
        self._catch_up()
        self._io.write(port, size, value)
        self._arm()

    def _read_offset(self, offset: int) -> int:
        if not offset & 1:                 # the index port is write-only
            return 0xFF
        index = self._selected()
        return READERS.get(index, Cmos._read_plain)(self, index, self._floor)

    def _write_offset(self, offset: int, byte: int) -> None:
        if not offset & 1:
            self.index = byte & 0x7F       # bit 7 gates NMIs on hardware; QEMU 7.2 drops it
        else:
            index = self._selected()
            WRITERS.get(index, Cmos._write_plain)(self, index, byte, self._floor)

    def _selected(self) -> int:
        if self.index == PS2_CENTURY:      # QEMU redirects the index itself, not just the access
            self.index = CENTURY
        return self.index

    # -- registers ------------------------------------------------------------------------------
    def _read_plain(self, index: int, now: int) -> int:
        return self.data[index]

    def _read_time(self, index: int, now: int) -> int:
        if self._running():                # with SET or the divider stopped, the latched value
            self._update_time(now)
        return self.data[index]

    def _read_a(self, index: int, now: int) -> int:
        return self.data[REG_A] | (A_UIP if self._update_in_progress(now) else 0)

    def _read_c(self, index: int, now: int) -> int:
        flags = self.data[REG_C]
        self.data[REG_C] = 0
        self._lower()
        if flags & (C_UF | C_AF):          # the update timer idles while UF/AF are set
            self._check_update_timer(now)
        return flags

    def _write_plain(self, index: int, byte: int, now: int) -> None:
        self.data[index] = byte

    def _write_ignored(self, index: int, byte: int, now: int) -> None:
        pass                               # C and D are read-only

    def _write_alarm(self, index: int, byte: int, now: int) -> None:
        self.data[index] = byte
        self._check_update_timer(now)

    def _write_time(self, index: int, byte: int, now: int) -> None:
        self.data[index] = byte
        if self._running():               # QEMU sets the clock at once; with SET, when SET clears
            self._set_time(now)
            self._check_update_timer(now)

    def _write_a(self, index: int, byte: int, now: int) -> None:
        data = self.data
        rate_changed = (data[REG_A] ^ byte) & A_RATE
        old_period = self._periodic_ticks()
        if byte & A_DIVIDER_RESET == A_DIVIDER_RESET:
            if self._running():
                self._update_time(now)
            data[REG_A] &= ~A_UIP
        elif data[REG_A] & A_DIVIDER_RESET == A_DIVIDER_RESET and byte & A_DIVIDER <= DIVIDER_RUNNING:
            if not data[REG_B] & B_SET:    # the first update comes half a second after the reset ends
                self.offset = NS // 2
                self._set_time(now)
            data[REG_A] &= ~A_UIP
        data[REG_A] = (byte & ~A_UIP) | (data[REG_A] & A_UIP)        # UIP is read-only
        if rate_changed:
            self._periodic_update(now, old_period, True)
        self._check_update_timer(now)

    def _write_b(self, index: int, byte: int, now: int) -> None:
        data = self.data
        pie_changed = (data[REG_B] ^ byte) & B_PIE
        old_period = self._periodic_ticks()
        if byte & B_SET:
            if self._running():            # latch the time the clock stops at
                self._update_time(now)
            data[REG_A] &= ~A_UIP
            byte &= ~B_UIE                 # QEMU drops UIE while SET is on
        elif data[REG_B] & B_SET and data[REG_A] & A_DIVIDER <= DIVIDER_RUNNING:
            self.offset = self._guest_ns(now) % NS        # keep the sub-second phase
            self._set_time(now)
        if byte & data[REG_C] & C_SOURCES:  # a flag already set whose interrupt is enabled now
            data[REG_C] |= C_IRQF
            self._raise()
        else:
            data[REG_C] &= ~C_IRQF
            self._lower()
        data[REG_B] = byte
        if pie_changed:
            self._periodic_update(now, old_period, True)
        self._check_update_timer(now)

    # -- the date and time ------------------------------------------------------------------------
    def _guest_ns(self, now: int) -> int:
        return self.base * NS + now - self.last_update + self.offset

    def _running(self) -> bool:
        data = self.data
        return not data[REG_B] & B_SET and data[REG_A] & A_DIVIDER <= DIVIDER_RUNNING

    def _update_time(self, now: int) -> None:
        """rtc_update_time: the time registers from the clock (unless SET freezes them)."""
        if not self.data[REG_B] & B_SET:
            self._store_time(gmtime(self._guest_ns(now) // NS))

    def _set_time(self, now: int) -> None:
        """rtc_set_time: the clock from the time registers."""
        self.base = mktimegm(*self._stored_time())
        self.last_update = now

    def _to_bcd(self, value: int) -> int:
        if self.data[REG_B] & B_DM:
            return value & 0xFF
        return ((_cdiv(value, 10) << 4) | _cmod(value, 10)) & 0xFF

    def _from_bcd(self, byte: int) -> int:
        if byte & 0xC0 == 0xC0:            # "don't care" (alarms); -1 also in time registers, as QEMU
            return -1
        if self.data[REG_B] & B_DM:
            return byte
        return (byte >> 4) * 10 + (byte & 0x0F)

    def _store_time(self, moment: tuple[int, int, int, int, int, int, int]) -> None:
        """rtc_set_cmos, in the format B selects (BCD or binary, 12 or 24 hours)."""
        year, month, day, hour, minute, second, weekday = moment
        data, bcd = self.data, self._to_bcd
        data[SECONDS], data[MINUTES] = bcd(second), bcd(minute)
        if data[REG_B] & B_24H:
            data[HOURS] = bcd(hour)
        else:                              # 12-hour: 12, 1 … 11, PM in bit 7
            data[HOURS] = bcd(hour % 12 or 12) | (0x80 if hour >= 12 else 0)
        data[DAY_OF_WEEK], data[DAY_OF_MONTH], data[MONTH] = bcd(weekday + 1), bcd(day), bcd(month)
        data[YEAR], data[CENTURY] = bcd(_cmod(year, 100)), bcd(_cdiv(year, 100))

    def _stored_time(self) -> tuple[int, int, int, int, int, int]:
        """rtc_get_time: (year, month, day, hour, minute, second) from the registers."""
        data, value = self.data, self._from_bcd
        hour = value(data[HOURS] & 0x7F)
        if not data[REG_B] & B_24H:
            hour = _cmod(hour, 12) + (12 if data[HOURS] & 0x80 else 0)
        year = value(data[YEAR]) + 100 * value(data[CENTURY])
        return year, value(data[MONTH]), value(data[DAY_OF_MONTH]), hour, value(data[MINUTES]), value(data[SECONDS])

    # -- the update cycle and the alarm ---------------------------------------------------------------
    def _update_in_progress(self, now: int) -> bool:
        if not self._running():
            return False
        if self.next_update is not None and now >= self.next_update - UIP_HOLD_NS:
            self.data[REG_A] |= A_UIP      # latched until the update fires (QEMU's timer_pending case)
            return True
        return self._guest_ns(now) % NS >= NS - UIP_HOLD_NS

    def _check_update_timer(self, now: int) -> None:
        """check_update_timer: when the next update (or alarm) event is due."""
        data = self.data
        if data[REG_A] & A_DIVIDER_RESET == A_DIVIDER_RESET:      # the divider in reset: no updates
            self.next_update = None
            return
        next_update = now + NS - self._guest_ns(now) % NS
        seconds = self._seconds_to_alarm(now)
        self.next_alarm = None if seconds is None else next_update + (seconds - 1) * NS
        if not data[REG_A] & A_UIP and data[REG_C] & C_UF:
            if data[REG_B] & B_SET or data[REG_C] & C_AF:        # nothing more can change
                self.next_update = None
                return
            next_update = self.next_alarm  # UF is already set: only the alarm is left to come
        self.next_update = next_update

    def _convert_hour(self, hour: int) -> int:
        """QEMU's convert_hour (a uint8_t in, the PM bit taken from the *hours* register)."""
        hour &= 0xFF
        if not self.data[REG_B] & B_24H:
            hour = hour % 12 + (12 if self.data[HOURS] & 0x80 else 0)
        return hour

    def _seconds_to_alarm(self, now: int) -> int | None:
        """get_next_alarm: seconds from the current second to the next alarm match, counting
        don't-care fields as QEMU does; None where QEMU's unsigned result would never come."""
        self._update_time(now)
        data, value = self.data, self._from_bcd
        alarm_sec, alarm_min, alarm_hour = value(data[SECONDS_ALARM]), value(data[MINUTES_ALARM]), value(data[HOURS_ALARM])
        if alarm_hour != -1:
            alarm_hour = self._convert_hour(alarm_hour)
        sec, minute, hour = value(data[SECONDS]), value(data[MINUTES]), self._convert_hour(value(data[HOURS]))
        if alarm_hour == -1:
            alarm_hour = hour
            if alarm_min == -1:
                alarm_min = minute
                if alarm_sec == -1:
                    alarm_sec = sec + 1
                elif sec > alarm_sec:
                    alarm_min += 1
            elif minute == alarm_min:
                if alarm_sec == -1:
                    alarm_sec = sec + 1
                elif sec > alarm_sec:
                    alarm_hour += 1
                if alarm_sec == 60:        # into the next hour: minutes are not don't-care
                    alarm_sec, alarm_hour = 0, alarm_hour + 1
            elif minute > alarm_min:
                alarm_hour += 1
        elif hour == alarm_hour:
            if alarm_min == -1:
                alarm_min = minute
                if alarm_sec == -1:
                    alarm_sec = sec + 1
                elif sec > alarm_sec:
                    alarm_min += 1
                if alarm_sec == 60:
                    alarm_sec, alarm_min = 0, alarm_min + 1
                alarm_min = _cmod(alarm_min, 60)      # into the next day: the hour is not don't-care
            elif minute == alarm_min:
                if alarm_sec == -1:
                    alarm_sec = sec + 1
                alarm_sec = _cmod(alarm_sec, 60)
        alarm_min = 0 if alarm_min == -1 else alarm_min
        alarm_sec = 0 if alarm_sec == -1 else alarm_sec
        if alarm_sec == 60:
            alarm_sec, alarm_min = 0, alarm_min + 1
        if alarm_min == 60:
            alarm_min, alarm_hour = 0, alarm_hour + 1
        alarm_hour = _cmod(alarm_hour, 24)
        seconds = ((alarm_hour - hour) * 60 + alarm_min - minute) * 60 + alarm_sec - sec
        if seconds <= 0:
            seconds += DAY
        return seconds if seconds > 0 else None

    def _update_event(self, at: int) -> None:
        """rtc_update_timer, at the time it was due: UF always, AF at the alarm; IRQ if enabled."""
        data = self.data
        self._update_time(at)
        data[REG_A] &= ~A_UIP
        flags = C_UF | (C_AF if self.next_alarm is not None and at >= self.next_alarm else 0)
        new = flags & ~data[REG_C]
        data[REG_C] |= flags
        if new & data[REG_B]:
            data[REG_C] |= C_IRQF
            self._raise()
        self._check_update_timer(at)

    # -- the periodic interrupt ----------------------------------------------------------------------
    def _periodic_ticks(self) -> int:
        """rtc_periodic_clock_ticks: 32 kHz ticks per periodic interrupt, 0 while off."""
        rate = self.data[REG_A] & A_RATE
        if not self.data[REG_B] & B_PIE or not rate:
            return 0
        return 1 << ((rate + 7 if rate <= 2 else rate) - 1)        # rates 1 and 2 alias 8 and 9

    def _periodic_update(self, now: int, old_period: int, changed: bool) -> None:
        """periodic_timer_update with the discard policy: the next interrupt one period on,
        counted from the last one when only the rate changed."""
        self.period = period = self._periodic_ticks()
        if not period:
            return
        tick = now * RTC_HZ // NS
        lost = 0
        if old_period and changed:
            last = self.next_periodic * RTC_HZ // NS - old_period
            lost = min(max(tick - last, 0), period)
        self.next_periodic = (tick + period - lost) * NS // RTC_HZ + 1

    def _periodic_events(self, now: int) -> None:
        """Every periodic interrupt due by ``now`` at once: each sets the same flags and raises
        the same level, so the last one due stands for them all."""
        first = self.next_periodic * RTC_HZ // NS
        last = max((now * RTC_HZ + NS - 1) // NS - 1, first)     # the last tick whose interrupt is due
        due = first + (last - first) // self.period * self.period
        self._periodic_update(due * NS // RTC_HZ + 1, self.period, False)
        self.data[REG_C] |= C_PF
        if self.data[REG_B] & B_PIE:
            self.data[REG_C] |= C_IRQF
            self._raise()

    # -- catching up and the clock timer -----------------------------------------------------------
    def _now(self) -> int:
        self._floor = max(self.clock.now_ns(), self._floor)
        return self._floor

    def _catch_up(self) -> int:
        now = self._now()
        # At most two update events can be due: the update, then the alarm; after it UF and AF
        # are both set and the update timer idles.
        for _ in range(2):
            if self.next_update is None or self.next_update > now:
                break
            self._update_event(self.next_update)
        if self.period and self.next_periodic <= now:
            self._periodic_events(now)
        return now

    def _due(self) -> int | None:
        """When the clock timer must fire: only events that can raise IRQ 8 need one."""
        due = [self.next_periodic] if self.period else []
        if self.next_update is not None and self.data[REG_B] & (B_UIE | B_AIE):
            due.append(self.next_update)
        return min(due, default=None)

    def _arm(self) -> None:
        due = self._due()
        if due == self._timer_due:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_due = None, due
        if due is not None:
            self._timer_token += 1
            token = self._timer_token
            self._timer = self.clock.add_timer(max(due - self.clock.now_ns(), 0),
                                               lambda: self._on_timer(token, due))

    def _on_timer(self, token: int, due: int) -> None:
        # A timer restored with a machine snapshot may fire after this one was replaced: it only
        # catches up (harmless); the live one also moves the device's time to when it was due.
        if token == self._timer_token and self._timer is not None:
            self._timer, self._timer_due = None, None
            self._floor = max(self._floor, due)
        self._catch_up()
        self._arm()

    def _raise(self) -> None:
        if self.irq is not None:
            self.irq.raise_()

    def _lower(self) -> None:
        if self.irq is not None:
            self.irq.lower()

    # -- the machine's side ----------------------------------------------------------------------
    def rtc_ns(self) -> int:
        """The RTC's time now: nanoseconds since 1970 (whether or not it is running)."""
        return self._guest_ns(max(self.clock.now_ns(), self._floor))

    def reset(self) -> None:
        """A system reset (rtc_reset_enter/hold): the RAM and the date survive; interrupts and
        their flags are turned off, the shutdown byte cleared unless it holds S3 resume."""
        now = self._catch_up()
        data = self.data
        if data[SHUTDOWN] != 0xFE:
            data[SHUTDOWN] = 0
        data[REG_B] &= ~(B_PIE | B_AIE | B_SQWE)
        data[REG_C] &= ~(C_UF | C_IRQF | C_PF | C_AF)
        self._check_update_timer(now)      # the periodic timer runs out by itself, as in QEMU
        self._lower()
        self._arm()

    def state(self) -> dict:
        """Everything that changes, as plain values (picklable)."""
        return {"data": bytes(self.data), "index": self.index, "base": self.base,
                "last_update": self.last_update, "offset": self.offset, "period": self.period,
                "next_periodic": self.next_periodic, "next_update": self.next_update,
                "next_alarm": self.next_alarm, "floor": self._floor}

    def restore(self, state: dict) -> None:
        """Back to ``state``.  Restore the machine (its clock and scheduled events) first: the
        clock timer is armed again from the machine's time."""
        self.data[:] = state["data"]
        self.index, self.base, self.last_update = state["index"], state["base"], state["last_update"]
        self.offset, self.period, self.next_periodic = state["offset"], state["period"], state["next_periodic"]
        self.next_update, self.next_alarm, self._floor = state["next_update"], state["next_alarm"], state["floor"]
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_due = None, None
        if self.data[REG_C] & C_IRQF:      # the line is high exactly while IRQF is set
            self._raise()
        else:
            self._lower()
        self._arm()


# What port 0x71 does at each index; other indices are plain RAM.
READERS = {**dict.fromkeys(TIME_REGISTERS, Cmos._read_time), REG_A: Cmos._read_a, REG_C: Cmos._read_c}
WRITERS = {**dict.fromkeys(TIME_REGISTERS, Cmos._write_time), **dict.fromkeys(ALARM_REGISTERS, Cmos._write_alarm),
           REG_A: Cmos._write_a, REG_B: Cmos._write_b, REG_C: Cmos._write_ignored, REG_D: Cmos._write_ignored}
