"""The I/O APIC at 0xFEC00000 as QEMU 7.2 models it (hw/intc/ioapic.c, ioapic_common.c,
include/hw/i386/ioapic_internal.h; reference/platform.md §7.5): IOREGSEL at +0x00, IOWIN at
+0x10 and the EOI register at +0x40 (version 0x20 has one), decoded modulo 0x100 across the
page; ID, version 0x00170020 (version 0x20, 24 pins — the brief's 0x00170011 is the 0x11
variant QEMU keeps only for old machine types), and 24 redirection entries, masked at reset.

Every rule is QEMU's: ``set_irq`` (ioapic_set_irq: GSI 0 is pin 2, a masked edge is lost, a
level stays in IRR), ``_service`` (ioapic_service: remote IRR for level-triggered entries,
coalescing while it is set), the redirection write (read-only remote IRR and delivery status,
remote IRR cleared when an entry becomes edge-triggered, the pins serviced again) and
``eoi_broadcast`` (ioapic_eoi_broadcast, with its interrupt-storm guard: after 10,000
back-to-back re-assertions the next one waits 10 ms of the clock).  Delivery goes through the
local APIC as QEMU's MSI write does (``LocalApic.deliver_irq``: fixed, lowest priority, SMI,
NMI, INIT; ExtINT acknowledges the 8259 when the entry is serviced and delivers its vector).

Access sizes.  QEMU's ops give no limits, so an access is split into 4-byte ones (an 8-byte
access at IOWIN reads IOWIN, then offset 0x14, which reads 0) and a misaligned one is invalid
(read 0, write dropped); IOREGSEL takes any size, IOWIN and EOI only 4 bytes.

Left out: interrupt remapping and the KVM split-irqchip paths, the per-pin statistics."""
from __future__ import annotations

from typing import Callable, Protocol

IOAPIC_BASE = 0xFEC0_0000
IOREGSEL, IOWIN, EOI = 0x00, 0x10, 0x40
REG_ID, REG_VER, REG_ARB, REG_REDTBL = 0x00, 0x01, 0x02, 0x10
VERSION = 0x20
PINS = 24
ID_SHIFT, ID_MASK = 24, 0xF

MASKED, TRIGGER_LEVEL, REMOTE_IRR, DELIVERY_STATUS = 1 << 16, 1 << 15, 1 << 14, 1 << 12
READ_ONLY = REMOTE_IRR | DELIVERY_STATUS
DM_EXTINT = 7
SUCCESSIVE_IRQ_MAX_COUNT = 10_000
STORM_DELAY_NS = 10_000_000                     # NANOSECONDS_PER_SECOND / 100

FIELDS = ("id", "ioregsel", "irr", "ioredtbl", "irq_eoi")


class ApicBus(Protocol):
    """Where the IOAPIC's messages go (``LocalApic``)."""
    eoi_broadcast: Callable[[int], None] | None

    def deliver_irq(self, dest: int, dest_mode: int, delivery_mode: int, vector: int, trigger: int) -> None: ...


class IoApic:
    """The IOAPIC: an MMIO device (``register(machine)``) with GSI inputs ``set_irq(gsi,
    level)`` / ``sink(gsi)``, delivering to ``apic`` and listening to its EOIs.  ``pic``
    (``acknowledge()``) serves ExtINT entries; ``clock`` the interrupt-storm delay (without
    one, a storm is serviced at once)."""

    def __init__(self, apic: ApicBus, pic=None, clock=None):
        self.apic, self.pic, self.clock = apic, pic, clock
        apic.eoi_broadcast = self.eoi_broadcast
        self._delayed = None
        self.reset()

    def register(self, machine, base: int = IOAPIC_BASE):
        """Map the page on ``machine`` (add_mmio); the region."""
        return machine.add_mmio(base, 0x1000, self, "ioapic")

    def reset(self) -> None:
        """ioapic_reset_common (the storm counters are QEMU's and survive it)."""
        self.id = self.ioregsel = self.irr = 0
        self.ioredtbl = [MASKED] * PINS
        self.irq_eoi = [0] * PINS
        self._cancel_delayed()

    # -- MMIO (ioapic_mem_read, ioapic_mem_write) ------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if size > 4:                            # split as QEMU's memory core splits it
            return self.read(offset, 4) | self.read(offset + 4, size - 4) << 32
        if size <= 0 or offset % size:
            return 0
        offset &= 0xFF
        if offset == IOREGSEL:
            return self.ioregsel
        if offset == IOWIN and size == 4:
            return self._read_register(self.ioregsel)
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if size > 4:
            self.write(offset, 4, value & 0xFFFF_FFFF)
            self.write(offset + 4, size - 4, value >> 32)
            return
        if size <= 0 or offset % size:
            return
        value &= (1 << (8 * size)) - 1
        offset &= 0xFF
        if offset == IOREGSEL:
            self.ioregsel = value & 0xFF
        elif offset == IOWIN and size == 4:
            self._write_register(self.ioregsel, value)
        elif offset == EOI and size == 4:        # version 0x20 has the EOI register
            self.eoi_broadcast(value)

    def _read_register(self, select: int) -> int:
        if select in (REG_ID, REG_ARB):
            return self.id << ID_SHIFT
        if select == REG_VER:
            return VERSION | (PINS - 1) << 16
        pin = (select - REG_REDTBL) >> 1
        if 0 <= pin < PINS:
            return (self.ioredtbl[pin] >> (32 * (select & 1))) & 0xFFFF_FFFF
        return 0

    def _write_register(self, select: int, value: int) -> None:
        if select == REG_ID:
            self.id = (value >> ID_SHIFT) & ID_MASK
            return
        pin = (select - REG_REDTBL) >> 1
        if select in (REG_VER, REG_ARB) or not 0 <= pin < PINS:
            return
        entry = self.ioredtbl[pin]
        shift = 32 * (select & 1)
        entry = entry & ~(0xFFFF_FFFF << shift) | value << shift
        entry = entry & ~READ_ONLY | self.ioredtbl[pin] & READ_ONLY
        if not entry & TRIGGER_LEVEL:           # ioapic_fix_edge_remote_irr (Linux's EOI trick)
            entry &= ~REMOTE_IRR
        self.ioredtbl[pin] = entry
        self.irq_eoi[pin] = 0
        self._service()

    # -- the pins ----------------------------------------------------------------------------------
    def set_irq(self, gsi: int, level: bool) -> None:
        """GSI ``gsi``'s level (ioapic_set_irq; QEMU wires ISA IRQ 0 to pin 2)."""
        pin = 2 if gsi == 0 else gsi
        if not 0 <= pin < PINS:
            return
        mask, entry = 1 << pin, self.ioredtbl[pin]
        if entry & TRIGGER_LEVEL:
            if level:
                self.irr |= mask
                if not entry & REMOTE_IRR:
                    self._service()
            else:
                self.irr &= ~mask
        elif level and not entry & MASKED:     # the 82093AA ignores edges on a masked pin
            self.irr |= mask
            self._service()

    def sink(self, gsi: int) -> Callable[[bool], None]:
        """``sink(level)`` for GSI ``gsi``: ``line.connect(ioapic.sink(n))``."""
        return lambda level: self.set_irq(gsi, level)

    def _service(self) -> None:
        """ioapic_service: each requested, unmasked pin sends its message."""
        for pin in range(PINS):
            mask = 1 << pin
            if not self.irr & mask:
                continue
            entry = self.ioredtbl[pin]
            if entry & MASKED:
                continue
            if entry & TRIGGER_LEVEL:
                if entry & REMOTE_IRR:          # the CPU is still serving the last one
                    continue
                self.ioredtbl[pin] = entry | REMOTE_IRR
            else:
                self.irr &= ~mask
            self._send(entry)

    def _send(self, entry: int) -> None:
        """The entry as an interrupt message (ioapic_entry_parse + the MSI write)."""
        mode, vector = (entry >> 8) & 7, entry & 0xFF
        if mode == DM_EXTINT:                   # the 8259 is acknowledged here, at service time
            vector = self.pic.acknowledge() if self.pic is not None else 0
        self.apic.deliver_irq(entry >> 56, (entry >> 11) & 1, mode, vector, (entry >> 15) & 1)

    def eoi_broadcast(self, vector: int) -> None:
        """ioapic_eoi_broadcast: level-triggered entries with ``vector`` leave remote IRR;
        one still requested is serviced again (after a storm of them, 10 ms later)."""
        for pin in range(PINS):
            entry = self.ioredtbl[pin]
            if (entry & 0xFF) != vector or not entry & TRIGGER_LEVEL or not entry & REMOTE_IRR:
                continue
            self.ioredtbl[pin] = entry & ~REMOTE_IRR
            if entry & MASKED or not self.irr >> pin & 1:
                self.irq_eoi[pin] = 0
                continue
            self.irq_eoi[pin] += 1
            if self.irq_eoi[pin] >= SUCCESSIVE_IRQ_MAX_COUNT and self.clock is not None:
                self.irq_eoi[pin] = 0
                self._delay_service()
            else:
                self._service()

    # -- the storm delay (delayed_ioapic_service_timer) ---------------------------------------------
    def _delay_service(self) -> None:
        if self._delayed is None:               # timer_mod_anticipate: the earlier one stays
            timer = self.clock.add_timer(STORM_DELAY_NS, lambda: self._delayed_service(timer))
            self._delayed = timer

    def _delayed_service(self, timer) -> None:
        if timer is self._delayed:
            self._delayed = None
            self._service()

    def _cancel_delayed(self) -> None:
        if self._delayed is not None:
            self._delayed.cancel()
            self._delayed = None

    # -- snapshots ---------------------------------------------------------------------------------
    def state(self) -> dict:
        state = {name: getattr(self, name) for name in FIELDS}
        state["ioredtbl"], state["irq_eoi"] = tuple(self.ioredtbl), tuple(self.irq_eoi)
        state["delayed"] = self._delayed is not None
        return state

    def restore(self, state: dict) -> None:
        """Back to ``state``; a pending storm delay restarts its 10 ms (QEMU does not
        migrate that timer at all)."""
        self.id, self.ioregsel, self.irr = state["id"], state["ioregsel"], state["irr"]
        self.ioredtbl, self.irq_eoi = list(state["ioredtbl"]), list(state["irq_eoi"])
        self._cancel_delayed()
        if state["delayed"] and self.clock is not None:
            self._delay_service()
