"""The local APIC of the one CPU, in xAPIC mode at 0xFEE00000, as QEMU 7.2 TCG models it
(hw/intc/apic.c, hw/intc/apic_common.c, the CPU side of target/i386/cpu.c
``cpu_get_pic_interrupt``; reference/platform.md §7.4, §9).  The registers, their reset values
and every rule are QEMU's: acceptance and priority (``apic_set_irq``, ``apic_irq_pending``,
``apic_get_interrupt``, ``apic_get_ppr``), EOI with the IOAPIC broadcast for level-triggered
vectors, the ICR's delivery modes, shorthands and destinations (``apic_deliver``,
``apic_bus_deliver``, ``apic_get_delivery_bitmask``), the LVTs (``apic_local_deliver``), the
timer (``apic_next_timer``, ``apic_get_current_count``), the 8259 behind LINT0
(``apic_accept_pic_intr``, ``apic_deliver_pic_intr``, ``apic_check_pic``) and the
IA32_APIC_BASE MSR (``apic_set_base``, ``cpu_set_apic_base``).

QEMU's quirks are kept, among them: the timer's count_shift is 0 (divide by 1) after reset
until the guest writes the divide register, although that register reads 0 (the code for
divide by 2); LVT, ICR and TPR writes store the value as written (no reserved bits); an
unmasked LINT0 in any delivery mode lets the 8259 through, and a masked one blocks it even when
the APIC is globally disabled; the global enable bit cannot be set again once cleared (until
reset: ``enable_sticks_off``, which KVM's in-kernel APIC does not share — a profile choice),
and clearing it only software-disables the APIC — its registers and interrupts go on;
shorthands address QEMU's APIC slot 0, so after the guest changes the APIC ID "self" reaches
nothing and "all excluding self" reaches this APIC; a write to offsets 0x000-0x00F is an MSI.

Access sizes.  QEMU's region takes 1-4 byte accesses (``.valid.max_access_size = 4``) and its
handlers ignore anything narrower than 4 bytes: reads give 0, writes are dropped; an 8-byte
or misaligned access is invalid (read 0, write dropped).  The same holds here.  Unicorn,
however, splits an 8-byte guest access into two 4-byte ones before the device sees it, so a
64-bit read returns two registers where QEMU returns 0.

The 8259.  Given ``pic``, the APIC takes over the pair's ``int_output`` and acknowledges it;
the pair must then not be one of the machine's interrupt controllers itself.  The pair reports
changes of its INT output where QEMU's pic_irq_request repeats a high level at every update,
so a LINT0 in NMI, SMI or fixed mode sees one event per rise.

Time.  The current count is computed from ``clock.now_ns()``, never ticked (1 GHz input, one
tick per ns before the divider).  A timer may be taken before the clock shows its due time (a
host-time clock, whose timers still fire by instruction count; a halt fast-forwarded without
moving the clock), so the device keeps the latest expiry it acted on and its own time never
runs behind it (``_now``).

Left out: x2APIC (QEMU 7.2 TCG does not offer it), TSC-deadline mode (likewise: bit 18 of the
timer LVT is stored and ignored), the kvmvapic TPR reporting, other CPUs (SIPI and INIT-level
de-assert are recorded only), the MSI window beyond the first 4 KiB (``mmio_size`` maps more),
an APIC base moved by the MSR (QEMU does not move it either), and the latch of QEMU's
CPU_INTERRUPT_HARD: INTR here is a level computed from the state, so an LVT other than LINT0
in ExtINT mode raises nothing."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol

if TYPE_CHECKING:
    from ..emulator.machine import Core

APIC_BASE = 0xFEE0_0000
MSR_APIC_BASE = 0x1B
MSR_BSP, MSR_EXTD, MSR_ENABLE = 1 << 8, 1 << 10, 1 << 11
APIC_BASE_RESET = APIC_BASE | MSR_BSP | MSR_ENABLE          # 0xFEE00900
MSR_BASE_MASK = 0xFFFF_F000                               # QEMU's apicbase is 32 bits

VERSION = 0x14
LVT_TIMER, LVT_THERMAL, LVT_PERF, LVT_LINT0, LVT_LINT1, LVT_ERROR = range(6)
LVT_COUNT = 6
LVT_MASKED, LVT_PERIODIC, LVT_LEVEL = 1 << 16, 1 << 17, 1 << 15
SV_ENABLE, SV_DIRECTED_IO = 1 << 8, 1 << 12
ESR_ILLEGAL_ADDRESS = 0x80
DM_FIXED, DM_LOWEST, DM_SMI, DM_NMI, DM_INIT, DM_SIPI, DM_EXTINT = 0, 1, 2, 4, 5, 6, 7
EDGE, LEVEL = 0, 1
SHORTHAND_NONE, SHORTHAND_SELF, SHORTHAND_ALL, SHORTHAND_OTHERS = range(4)
SLOT = 0            # this APIC's index in QEMU's local_apics[] (its initial APIC ID)
NO_TIMER = -1       # QEMU's timer_expiry when the timer is not armed

# QEMU's vmstate_apic_common fields, then the SIPI subsection's: the whole state.
FIELDS = ("apicbase", "id", "arb_id", "tpr", "spurious_vec", "log_dest", "dest_mode", "isr", "tmr",
          "irr", "lvt", "esr", "icr", "divide_conf", "count_shift", "initial_count",
          "initial_count_load_time", "next_time", "timer_expiry", "sipi_vector", "wait_for_sipi")


class PicOutput(Protocol):
    """The 8259 pair as the local APIC sees it (``Pic8259Pair``): its INT output level,
    the callback it calls when that level changes, and the acknowledge cycle."""
    output: bool
    int_output: Callable[[bool], None] | None

    def acknowledge(self) -> int: ...


def highest(bits: int) -> int:
    """The highest vector set in a 256-bit register, -1 if none (get_highest_priority_int)."""
    return bits.bit_length() - 1


def dword(bits: int, index: int) -> int:
    return (bits >> (32 * index)) & 0xFFFF_FFFF


class LocalApic:
    """The APIC of the machine's CPU: an MMIO device at APIC_BASE and the CPU's interrupt
    controller (``intr_pending``/``acknowledge``), with the 8259 pair ``pic`` behind LINT0.
    ``eoi_broadcast(vector)`` is called on an EOI of a level-triggered vector (the IOAPIC's).
    INIT (the machine's or an IPI) resets it as QEMU's ``apic_init_reset`` does.
    ``enable_sticks_off()``: whether a cleared global enable stays cleared (QEMU's TCG APIC)."""

    def __init__(self, machine: "Core", pic: PicOutput | None = None, mmio_size: int = 0x1000,
                 enable_sticks_off: Callable[[], bool] = lambda: True):
        self.machine, self.clock, self.pic = machine, machine.clock, pic
        self.enable_sticks_off = enable_sticks_off
        self.eoi_broadcast: Callable[[int], None] | None = None
        self._timer = None
        self._floor = 0             # the latest time the device acted on (see _now)
        self.arb_id = self.sipi_vector = 0      # neither reset clears them in QEMU
        self.reset()
        machine.add_interrupt_controller(self)
        machine.add_reset_hook(self.init_reset)
        self.region = machine.add_mmio(APIC_BASE, mmio_size, self, "lapic")
        if pic is not None:
            pic.int_output = self._pic_output_changed

    # -- reset --------------------------------------------------------------------------------
    def reset(self) -> None:
        """A system reset (apic_reset_common): the MSR and the APIC ID too."""
        self.apicbase, self.id = APIC_BASE_RESET, SLOT
        self.init_reset()

    def init_reset(self) -> None:
        """INIT (apic_init_reset): all but the MSR and the APIC ID; every LVT masked."""
        self.tpr, self.spurious_vec, self.log_dest, self.dest_mode = 0, 0xFF, 0, 0xF
        self.isr = self.tmr = self.irr = 0
        self.lvt = [LVT_MASKED] * LVT_COUNT
        self.esr, self.icr = 0, [0, 0]
        self.divide_conf = self.count_shift = self.initial_count = 0
        self.initial_count_load_time = self.next_time = 0
        self.wait_for_sipi = 0              # the BSP waits for no SIPI
        self._cancel_timer()
        self.timer_expiry = NO_TIMER

    # -- the MMIO page (apic_mem_read, apic_mem_write) ----------------------------------------
    def read(self, offset: int, size: int) -> int:
        if size != 4 or offset & 3:
            return 0
        index = (offset >> 4) & 0xFF
        reader = READERS.get(index)
        if reader is None:
            self.esr |= ESR_ILLEGAL_ADDRESS
            return 0
        return reader(self, index) & 0xFFFF_FFFF

    def write(self, offset: int, size: int, value: int) -> None:
        if size != 4 or offset & 3:
            return
        value &= 0xFFFF_FFFF
        index = (offset >> 4) & 0xFF
        if offset > 0xFFF or index == 0:        # the MSI window shares the page
            self.send_msi(offset, value)
            return
        writer = WRITERS.get(index)
        if writer is None:
            self.esr |= ESR_ILLEGAL_ADDRESS
        else:
            writer(self, index, value)

    def _read_ppr(self, index: int) -> int:
        return self.ppr()

    def _read_bits(self, index: int) -> int:
        return dword(getattr(self, BIT_REGISTERS[index >> 3]), index & 7)

    def _read_dfr(self, index: int) -> int:
        return self.dest_mode << 28 | 0x0FFF_FFFF

    def _read_current_count(self, index: int) -> int:
        return self.current_count()

    def _write_id(self, index: int, value: int) -> None:
        self.id = value >> 24

    def _write_tpr(self, index: int, value: int) -> None:
        self.tpr = value & 0xFF
        self._update()

    def _write_eoi(self, index: int, value: int) -> None:
        self.eoi()

    def _write_ldr(self, index: int, value: int) -> None:
        self.log_dest = value >> 24

    def _write_dfr(self, index: int, value: int) -> None:
        self.dest_mode = value >> 28

    def _write_spiv(self, index: int, value: int) -> None:
        self.spurious_vec = value & 0x1FF
        self._update()

    def _write_icr_low(self, index: int, value: int) -> None:
        self.icr[0] = value
        self._send_ipi()

    def _write_icr_high(self, index: int, value: int) -> None:
        self.icr[1] = value

    def _write_lvt(self, index: int, value: int) -> None:
        n = index - 0x32
        self.lvt[n] = value
        if n == LVT_TIMER:
            self._timer_update(self._now())
        elif n == LVT_LINT0 and self._check_pic():
            self._update()

    def _write_initial_count(self, index: int, value: int) -> None:
        self.initial_count = value
        self.initial_count_load_time = self._now()
        self._timer_update(self.initial_count_load_time)

    def _write_divide(self, index: int, value: int) -> None:
        # QEMU neither re-arms the timer nor moves the load time: the new divider applies to
        # the whole count from the load (the current count jumps).
        self.divide_conf = value & 0xB
        code = (self.divide_conf & 3) | ((self.divide_conf >> 1) & 4)
        self.count_shift = (code + 1) & 7

    def _ignore(self, index: int, value: int) -> None:
        pass

    # -- priority and acceptance ----------------------------------------------------------------
    def ppr(self) -> int:
        """The processor priority (apic_get_ppr): TPR, or the in-service class if higher."""
        in_service = max(highest(self.isr), 0) >> 4
        return self.tpr if self.tpr >> 4 >= in_service else in_service << 4

    def _irq_pending(self) -> int:
        """apic_irq_pending: 0 nothing (or software-disabled), -1 a vector the PPR holds
        back, else the vector.  (Vector 0 counts as nothing, as in QEMU.)"""
        if not self.spurious_vec & SV_ENABLE:
            return 0
        vector = highest(self.irr)
        if vector < 0:
            return 0
        ppr = self.ppr()
        if ppr and (vector & 0xF0) <= (ppr & 0xF0):
            return -1
        return vector

    def deliver(self, vector: int, level_triggered: bool = False) -> None:
        """A fixed interrupt accepted into IRR, its trigger mode into TMR (apic_set_irq)."""
        bit = 1 << (vector & 0xFF)
        self.irr |= bit
        self.tmr = self.tmr | bit if level_triggered else self.tmr & ~bit
        self._update()

    def eoi(self) -> None:
        """apic_eoi: the highest in-service vector ends; a level-triggered one is broadcast."""
        vector = highest(self.isr)
        if vector < 0:
            return
        self.isr &= ~(1 << vector)
        if not self.spurious_vec & SV_DIRECTED_IO and self.tmr >> vector & 1 and self.eoi_broadcast:
            self.eoi_broadcast(vector)
        self._update()

    def _update(self) -> None:
        """apic_update_irq: INTR here is computed when the core asks; a rise is announced."""
        if self.intr_pending():
            self.machine.interrupt_raised()

    # -- the CPU's side (InterruptController) -----------------------------------------------------
    def intr_pending(self) -> bool:
        """The CPU's INTR: a vector above the PPR, or the 8259's output through an unmasked
        ExtINT LINT0 (what raises QEMU's CPU_INTERRUPT_HARD)."""
        return self._irq_pending() > 0 or self._pic_through_lint0()

    def acknowledge(self) -> int | None:
        """INTA (cpu_get_pic_interrupt): the APIC's vector, else the 8259's if it is accepted."""
        vector = self._get_interrupt()
        if vector >= 0:
            return vector
        if not self._accept_pic_intr():
            return None
        return self.pic.acknowledge()

    def _get_interrupt(self) -> int:
        """apic_get_interrupt: -1 leaves the acknowledge to the 8259 (ExtINT ignores the
        priority); a vector the PPR holds back gives the spurious vector."""
        if not self.spurious_vec & SV_ENABLE:
            return -1
        vector = self._irq_pending()
        if vector == 0 or self._check_pic():
            return -1
        if vector < 0:
            return self.spurious_vec & 0xFF
        self.irr &= ~(1 << vector)
        self.isr |= 1 << vector
        self._update()
        return vector

    # -- the 8259 behind LINT0 ---------------------------------------------------------------------
    def _accept_pic_intr(self) -> bool:
        """apic_accept_pic_intr: globally disabled, or LINT0 unmasked (any delivery mode)."""
        if self.pic is None:
            return False
        return not self.apicbase & MSR_ENABLE or not self.lvt[LVT_LINT0] & LVT_MASKED

    def _pic_through_lint0(self) -> bool:
        lint0 = self.lvt[LVT_LINT0]
        return (self.pic is not None and self.pic.output and not lint0 & LVT_MASKED
                and (lint0 >> 8) & 7 == DM_EXTINT)

    def _check_pic(self) -> bool:
        """apic_check_pic: the 8259's INT, if accepted, is delivered through LINT0 again."""
        if not self._accept_pic_intr() or not self.pic.output:
            return False
        self._deliver_pic_intr(True)
        return True

    def _pic_output_changed(self, level: bool) -> None:
        """The 8259's INT output (pc.c pic_irq_request): through LINT0 while accepted."""
        if self._accept_pic_intr():
            self._deliver_pic_intr(level)

    def _deliver_pic_intr(self, level: bool) -> None:
        """apic_deliver_pic_intr: up, LINT0 delivers; down, a level-triggered fixed LINT0
        withdraws its request."""
        if level:
            self._local_deliver(LVT_LINT0)
            return
        lint0 = self.lvt[LVT_LINT0]
        if (lint0 >> 8) & 7 == DM_FIXED and lint0 & LVT_LEVEL:
            self.irr &= ~(1 << (lint0 & 0xFF))

    # -- local interrupts (LVT) -------------------------------------------------------------------
    def _local_deliver(self, n: int) -> None:
        """apic_local_deliver: an LVT entry's interrupt, unless masked."""
        lvt = self.lvt[n]
        if lvt & LVT_MASKED:
            return
        mode = (lvt >> 8) & 7
        if mode == DM_SMI:
            self._raise_smi()
        elif mode == DM_NMI:
            self.machine.raise_nmi()
        elif mode == DM_EXTINT:
            self.machine.interrupt_raised()
        elif mode == DM_FIXED:
            level = n in (LVT_LINT0, LVT_LINT1) and bool(lvt & LVT_LEVEL)
            self.deliver(lvt & 0xFF, level)

    def external_nmi(self) -> None:
        """The NMI input wired to LINT1 (apic_deliver_nmi)."""
        self._local_deliver(LVT_LINT1)

    def _raise_smi(self) -> None:
        raise_smi = getattr(self.machine, "raise_smi", None)     # SMM is a feature: Machine has it
        if raise_smi is not None:
            raise_smi()

    # -- interprocessor interrupts and MSIs -------------------------------------------------------
    def _send_ipi(self) -> None:
        """apic_deliver: the ICR just written, to its shorthand's or destination's APICs."""
        low = self.icr[0]
        mode, vector, trigger = (low >> 8) & 7, low & 0xFF, (low >> 15) & 1
        to_me = self._shorthand_reaches_me((low >> 18) & 3, (self.icr[1] >> 24) & 0xFF, (low >> 11) & 1)
        if mode == DM_INIT and not (low >> 14) & 1 and trigger:
            if to_me:                       # INIT level de-assert: arbitration IDs only
                self.arb_id = self.id
            return
        if mode == DM_SIPI:
            if to_me:                       # apic_startup; the BSP waits for no SIPI
                self.sipi_vector = vector
            return
        self._bus_deliver(to_me, mode, vector, trigger)

    def _shorthand_reaches_me(self, shorthand: int, dest: int, dest_mode: int) -> bool:
        # QEMU's bitmask is indexed by APIC slot, but "self" sets the bit of the current ID.
        if shorthand == SHORTHAND_NONE:
            return self.matches(dest, dest_mode)
        if shorthand == SHORTHAND_SELF:
            return self.id == SLOT
        if shorthand == SHORTHAND_ALL:
            return True
        return self.id != SLOT

    def matches(self, dest: int, dest_mode: int) -> bool:
        """apic_get_delivery_bitmask for this APIC: physical (0xFF broadcasts) or logical,
        flat (DFR model 0xF) or cluster (0x0)."""
        if not dest_mode:
            return dest == 0xFF or dest == self.id
        if self.dest_mode == 0xF:
            return bool(dest & self.log_dest)
        if self.dest_mode == 0:
            return (dest & 0xF0) == (self.log_dest & 0xF0) and bool(dest & self.log_dest & 0x0F)
        return False

    def deliver_irq(self, dest: int, dest_mode: int, delivery_mode: int, vector: int, trigger: int) -> None:
        """apic_deliver_irq: an interrupt message from the bus (the IOAPIC, an MSI)."""
        self._bus_deliver(self.matches(dest, dest_mode), delivery_mode, vector, trigger)

    def _bus_deliver(self, to_me: bool, mode: int, vector: int, trigger: int) -> None:
        """apic_bus_deliver: fixed, lowest priority and ExtINT set IRR; SMI, NMI and INIT go
        to the CPU; other modes deliver nothing."""
        if not to_me:
            return
        if mode in (DM_FIXED, DM_LOWEST, DM_EXTINT):
            self.deliver(vector, bool(trigger))
        elif mode == DM_SMI:
            self._raise_smi()
        elif mode == DM_NMI:
            self.machine.raise_nmi()
        elif mode == DM_INIT:
            self.machine.raise_init()

    def send_msi(self, address: int, data: int) -> None:
        """apic_send_msi: ``address`` is the offset in the 0xFEExxxxx window."""
        self.deliver_irq((address >> 12) & 0xFF, (address >> 2) & 1, (data >> 8) & 7, data & 0xFF,
                         (data >> 15) & 1)

    # -- the timer -------------------------------------------------------------------------------
    def _now(self) -> int:
        self._floor = max(self.clock.now_ns(), self._floor)
        return self._floor

    def current_count(self) -> int:
        """apic_get_current_count, from the time since the initial count was loaded."""
        ticks = (self._now() - self.initial_count_load_time) >> self.count_shift
        count = self.initial_count
        if self.lvt[LVT_TIMER] & LVT_PERIODIC:
            return count - ticks % (count + 1)
        return 0 if ticks >= count else count - ticks

    def _next_timer(self, now: int) -> bool:
        """apic_next_timer: the next expiry after ``now`` into next_time, if any."""
        self.timer_expiry = NO_TIMER
        lvt = self.lvt[LVT_TIMER]
        if lvt & LVT_MASKED:
            return False
        ticks = (now - self.initial_count_load_time) >> self.count_shift
        period = self.initial_count + 1
        if lvt & LVT_PERIODIC:
            if not self.initial_count:
                return False
            ticks = (ticks // period + 1) * period
        elif ticks >= self.initial_count:
            return False
        else:
            ticks = period
        self.next_time = self.timer_expiry = self.initial_count_load_time + (ticks << self.count_shift)
        return True

    def _timer_update(self, now: int) -> None:
        """apic_timer_update: arm the clock timer for next_time, or disarm it."""
        if self._next_timer(now):
            self._arm(self.next_time)
        else:
            self._cancel_timer()

    def _arm(self, due: int) -> None:
        self._cancel_timer()
        timer = self.clock.add_timer(max(due - self.clock.now_ns(), 0), lambda: self._expired(timer, due))
        self._timer = timer

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self, timer, due: int) -> None:
        """apic_timer.  A timer from before a restore is not the armed one: it does nothing.
        The device's time is at least the expiry from now on (see the module's "Time")."""
        if timer is not self._timer:
            return
        self._timer = None
        self._floor = max(self._floor, due)
        self._local_deliver(LVT_TIMER)
        self._timer_update(self.next_time)

    # -- the IA32_APIC_BASE MSR and CR8 -------------------------------------------------------------
    def read_msr(self) -> int:
        return self.apicbase

    def write_msr(self, value: int) -> None:
        """cpu_set_apic_base + apic_set_base: the base is stored (the page does not move);
        BSP is read-only; clearing ENABLE software-disables the APIC, and only KVM's APIC
        (kvm_lapic_set_base) lets it be set again before a reset; setting EXTD (x2APIC, not
        offered) resets the APIC ID."""
        if value & MSR_EXTD:
            self.id = SLOT
        enabled = value & MSR_ENABLE and (self.apicbase & MSR_ENABLE or not self.enable_sticks_off())
        self.apicbase = (value & MSR_BASE_MASK) | (self.apicbase & MSR_BSP) | (MSR_ENABLE if enabled else 0)
        if not value & MSR_ENABLE:
            self.spurious_vec &= ~SV_ENABLE

    @property
    def hardware_enabled(self) -> bool:
        """The MSR's global enable: QEMU clears CPUID.1:EDX.APIC[bit 9] when it is cleared."""
        return bool(self.apicbase & MSR_ENABLE)

    def read_cr8(self) -> int:
        return self.tpr >> 4

    def write_cr8(self, value: int) -> None:
        """MOV to CR8 (apic_set_tpr)."""
        self.tpr = (value & 0xF) << 4
        self._update()

    # -- snapshots -----------------------------------------------------------------------------------
    def state(self) -> dict:
        state = {name: getattr(self, name) for name in FIELDS}
        state["lvt"], state["icr"], state["floor"] = tuple(self.lvt), tuple(self.icr), self._floor
        return state

    def restore(self, state: dict) -> None:
        """Back to ``state``, the timer armed for its expiry (apic_post_load).  Restore the
        machine (its clock and scheduled events) first."""
        for name in FIELDS:
            setattr(self, name, state[name])
        self.lvt, self.icr, self._floor = list(state["lvt"]), list(state["icr"]), state["floor"]
        self._cancel_timer()
        if self.timer_expiry != NO_TIMER:
            self._arm(self.timer_expiry)
        self._update()


BIT_REGISTERS = {0x10 >> 3: "isr", 0x18 >> 3: "tmr", 0x20 >> 3: "irr"}

# Register index ((offset >> 4) & 0xFF) -> reader(self, index); a missing index sets ESR bit 7.
READERS: dict[int, Callable[[LocalApic, int], int]] = {
    0x02: lambda s, i: s.id << 24,
    0x03: lambda s, i: VERSION | (LVT_COUNT - 1) << 16,
    0x08: lambda s, i: s.tpr,
    0x09: lambda s, i: 0,                       # APR: QEMU does no arbitration
    0x0A: LocalApic._read_ppr,
    0x0B: lambda s, i: 0,                       # EOI is write-only
    0x0D: lambda s, i: s.log_dest << 24,
    0x0E: LocalApic._read_dfr,
    0x0F: lambda s, i: s.spurious_vec,
    **dict.fromkeys(range(0x10, 0x28), LocalApic._read_bits),      # ISR, TMR, IRR
    0x28: lambda s, i: s.esr,
    0x30: lambda s, i: s.icr[0],
    0x31: lambda s, i: s.icr[1],
    **{index: (lambda s, i: s.lvt[i - 0x32]) for index in range(0x32, 0x38)},
    0x38: lambda s, i: s.initial_count,
    0x39: LocalApic._read_current_count,
    0x3E: lambda s, i: s.divide_conf,
}

# Register index -> writer(self, index, value); read-only registers ignore writes without an
# error (QEMU's ESR write is ignored too); a missing index sets ESR bit 7.
WRITERS: dict[int, Callable[[LocalApic, int, int], None]] = {
    0x02: LocalApic._write_id,
    0x03: LocalApic._ignore,
    0x08: LocalApic._write_tpr,
    0x09: LocalApic._ignore,
    0x0A: LocalApic._ignore,
    0x0B: LocalApic._write_eoi,
    0x0D: LocalApic._write_ldr,
    0x0E: LocalApic._write_dfr,
    0x0F: LocalApic._write_spiv,
    **dict.fromkeys(range(0x10, 0x29), LocalApic._ignore),         # ISR, TMR, IRR, ESR
    0x30: LocalApic._write_icr_low,
    0x31: LocalApic._write_icr_high,
    **dict.fromkeys(range(0x32, 0x38), LocalApic._write_lvt),
    0x38: LocalApic._write_initial_count,
    0x39: LocalApic._ignore,
    0x3E: LocalApic._write_divide,
}
