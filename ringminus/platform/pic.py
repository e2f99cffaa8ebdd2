"""The PC's pair of 8259A interrupt controllers — the master at 0x20/0x21, the slave at
0xA0/0xA1 on the master's IRQ2 — and their edge/level control registers (ELCR) at
0x4D0/0x4D1, as QEMU 7.2 builds them (hw/intc/i8259.c, i8259_common.c;
reference/platform.md §7.1).  The state and every rule are QEMU's: ICW1-ICW4, OCW1-OCW3
(EOI, rotation, IRR/ISR select, poll, special mask), auto-EOI, special fully nested mode,
edge or level per ELCR (writable bits 0xF8 master, 0xDE slave), priority by ``pic_get_irq``
and the acknowledge cycle by ``pic_read_irq`` (spurious IRQ7/IRQ15 included).  What QEMU
leaves out is left out here too: ICW1's LTIM (logged as unsupported), buffered mode and the
ICW3 cascade identities (the wiring is fixed).

The CPU side: the pair is an interrupt controller (emulator/irq.py): ``intr_pending()`` is
the master's INT output, ``acknowledge() -> vector`` the CPU's INTA cycle, taken when the CPU
takes the interrupt; ``int_output(level)`` is called when INT changes (the board tells the
core it rose)."""
from __future__ import annotations

import functools
from typing import Callable

from .byteregs import ByteRegion, ByteRegions, ByteRegisterDevice

MASTER_PORT, SLAVE_PORT = 0x20, 0xA0
ELCR_PORTS = (0x4D0, 0x4D1)               # master, slave
ELCR_MASKS = (0xF8, 0xDE)                 # IRQ0-2 and IRQ8, IRQ13 are always edge-triggered
CASCADE_IRQ = 2
SPURIOUS_IRQ = 7
NO_IRQ = -1

# QEMU's vmstate_pic_common fields, in its order: a chip's whole state.
FIELDS = ("last_irr", "irr", "imr", "isr", "priority_add", "irq_base", "read_reg_select", "poll",
          "special_mask", "init_state", "auto_eoi", "rotate_on_auto_eoi", "special_fully_nested_mode",
          "init4", "single_mode", "elcr")
# What pic_reset_common (ICW1, and reset) zeroes; IRR keeps its level-triggered bits, ELCR stays.
INIT_RESET_FIELDS = tuple(name for name in FIELDS if name not in ("irr", "elcr"))


def get_priority(mask: int, priority_add: int) -> int:
    """The highest priority with a bit in ``mask`` (0 = highest), 8 if none (get_priority)."""
    if not mask:
        return 8
    priority = 0
    while not mask & (1 << ((priority + priority_add) & 7)):
        priority += 1
    return priority


class Pic8259:
    """One 8259A: QEMU's PICCommonState and the functions acting on it.  ``int_pin(level)``
    is its INT output, called at every update as QEMU's qemu_irq_raise/lower are."""

    def __init__(self, master: bool, elcr_mask: int, int_pin: Callable[[bool], None]):
        self.master, self.elcr_mask, self.int_pin = master, elcr_mask, int_pin
        for name in FIELDS:
            setattr(self, name, 0)

    # -- priority and the INT pin ------------------------------------------------------------
    def get_irq(self) -> int:
        """The IRQ this chip wants to raise, or NO_IRQ (pic_get_irq)."""
        priority = get_priority(self.irr & ~self.imr, self.priority_add)
        if priority == 8:
            return NO_IRQ
        in_service = self.isr
        if self.special_mask:
            in_service &= ~self.imr             # masked in-service IRQs do not block
        if self.special_fully_nested_mode and self.master:
            in_service &= ~(1 << CASCADE_IRQ)   # the slave may interrupt its own IRQ's service
        if priority < get_priority(in_service, self.priority_add):
            return (priority + self.priority_add) & 7
        return NO_IRQ

    def update(self) -> None:
        self.int_pin(self.get_irq() != NO_IRQ)

    def set_irq(self, irq: int, level: bool) -> None:
        """An input pin's level: a level-triggered IRQ (ELCR) follows it, an edge-triggered
        one is latched in IRR on a rising edge (pic_set_irq)."""
        mask = 1 << irq
        if self.elcr & mask:
            self.irr = self.irr | mask if level else self.irr & ~mask
        elif level and not self.last_irr & mask:
            self.irr |= mask
        self.last_irr = self.last_irr | mask if level else self.last_irr & ~mask
        self.update()

    def intack(self, irq: int) -> None:
        """The acknowledge of ``irq`` (pic_intack): into ISR unless auto-EOI; a
        level-triggered request stays in IRR."""
        if self.auto_eoi:
            if self.rotate_on_auto_eoi:
                self.priority_add = (irq + 1) & 7
        else:
            self.isr |= 1 << irq
        if not self.elcr & (1 << irq):
            self.irr &= ~(1 << irq)
        self.update()

    def init_reset(self) -> None:
        for name in INIT_RESET_FIELDS:
            setattr(self, name, 0)
        self.irr &= self.elcr
        self.update()

    def reset(self) -> None:
        self.elcr = 0
        self.init_reset()

    # -- the two ports (pic_ioport_write, pic_ioport_read) -------------------------------------
    def write_port(self, offset: int, value: int) -> None:
        if offset:
            self._write_data(value)
        elif value & 0x10:
            self._icw1(value)
        elif value & 0x08:
            self._ocw3(value)
        else:
            OCW2[value >> 5](self, value)

    def read_port(self, offset: int) -> int:
        if self.poll:
            self.poll = 0
            irq = self.get_irq()
            if irq == NO_IRQ:
                return 0
            self.intack(irq)
            return 0x80 | irq
        if offset:
            return self.imr
        return self.isr if self.read_reg_select else self.irr

    def _icw1(self, value: int) -> None:
        self.init_reset()
        self.init_state = 1
        self.init4 = value & 1
        self.single_mode = value & 2            # bit 3 (LTIM) is not supported by QEMU either

    def _ocw3(self, value: int) -> None:
        # QEMU does not update the INT pin here: a special-mask change shows at the next update.
        if value & 0x04:
            self.poll = 1
        if value & 0x02:
            self.read_reg_select = value & 1
        if value & 0x40:
            self.special_mask = (value >> 5) & 1

    def _write_data(self, value: int) -> None:
        """OCW1 (IMR) outside initialisation; ICW2-ICW4 during it."""
        state = self.init_state
        if state == 0:
            self.imr = value
            self.update()
        elif state == 1:                        # ICW2
            self.irq_base = value & 0xF8
            self.init_state = (3 if self.init4 else 0) if self.single_mode else 2
        elif state == 2:                        # ICW3: the cascade wiring is fixed
            self.init_state = 3 if self.init4 else 0
        else:                                   # ICW4: bit 1 AEOI, bit 4 SFNM
            self.special_fully_nested_mode = (value >> 4) & 1
            self.auto_eoi = (value >> 1) & 1
            self.init_state = 0

    # -- OCW2 commands (value >> 5) -------------------------------------------------------------
    def _rotate_in_auto_eoi(self, value: int) -> None:
        self.rotate_on_auto_eoi = value >> 7            # command 4 sets it, command 0 clears it

    def _eoi(self, value: int) -> None:
        """Non-specific EOI (command 1); with rotation (command 5)."""
        priority = get_priority(self.isr, self.priority_add)
        if priority != 8:
            irq = (priority + self.priority_add) & 7
            self.isr &= ~(1 << irq)
            if value >> 5 == 5:
                self.priority_add = (irq + 1) & 7
            self.update()

    def _specific_eoi(self, value: int) -> None:
        self.isr &= ~(1 << (value & 7))
        self.update()

    def _set_priority(self, value: int) -> None:
        self.priority_add = (value + 1) & 7
        self.update()

    def _rotate_on_specific_eoi(self, value: int) -> None:
        irq = value & 7
        self.isr &= ~(1 << irq)
        self.priority_add = (irq + 1) & 7
        self.update()

    def _no_operation(self, value: int) -> None:
        pass

    # -- the ELCR (elcr_ioport_write/read: one byte, any offset) ------------------------------
    def write_elcr(self, offset: int, value: int) -> None:
        self.elcr = value & self.elcr_mask

    def read_elcr(self, offset: int) -> int:
        return self.elcr


OCW2 = (Pic8259._rotate_in_auto_eoi, Pic8259._eoi, Pic8259._no_operation, Pic8259._specific_eoi,
        Pic8259._rotate_in_auto_eoi, Pic8259._eoi, Pic8259._set_priority, Pic8259._rotate_on_specific_eoi)


class Pic8259Pair(ByteRegisterDevice):
    """The master and slave 8259 and their ELCRs: a port device for 0x20-0x21, 0xA0-0xA1,
    0x4D0 and 0x4D1 (``register(machine.ports)``), and IRQ inputs 0-15 (``set_irq``,
    ``sink``).  ``int_output(level)`` is called when the master's INT output changes."""
    PORTS = (MASTER_PORT, MASTER_PORT + 1, SLAVE_PORT, SLAVE_PORT + 1, *ELCR_PORTS)
    precise = False         # nothing here depends on the time of an access

    def __init__(self, int_output: Callable[[bool], None] | None = None):
        self.int_output = int_output
        self.output = False
        self.master = Pic8259(True, ELCR_MASKS[0], self._master_output)
        # The slave's INT pin drives the master's IRQ2 at every update, as QEMU's qemu_irq does.
        self.slave = Pic8259(False, ELCR_MASKS[1], functools.partial(self.master.set_irq, CASCADE_IRQ))
        self._io = ByteRegions((
            ByteRegion(MASTER_PORT, 2, self.master.read_port, self.master.write_port),
            ByteRegion(SLAVE_PORT, 2, self.slave.read_port, self.slave.write_port),
            ByteRegion(ELCR_PORTS[0], 1, self.master.read_elcr, self.master.write_elcr),
            ByteRegion(ELCR_PORTS[1], 1, self.slave.read_elcr, self.slave.write_elcr)))

    # -- the device side -----------------------------------------------------------------------
    def set_irq(self, irq: int, level: bool) -> None:
        """The level of ISA IRQ ``irq`` (0-15; 8-15 are the slave's)."""
        if not 0 <= irq <= 15:
            raise ValueError(f"the 8259 pair has IRQs 0-15, not {irq!r}")
        chip = self.master if irq < 8 else self.slave
        chip.set_irq(irq & 7, bool(level))

    def sink(self, irq: int) -> Callable[[bool], None]:
        """``sink(level)`` for IRQ ``irq``: ``line.connect(pic.sink(n))``."""
        if not 0 <= irq <= 15:
            raise ValueError(f"the 8259 pair has IRQs 0-15, not {irq!r}")
        return functools.partial(self.set_irq, irq)

    # -- the CPU side (an emulator.irq.InterruptController) ----------------------------------------
    def intr_pending(self) -> bool:
        return self.output

    def acknowledge(self) -> int:
        """The CPU's interrupt-acknowledge cycle: the vector, with the IRQ moved from IRR to
        ISR (pic_read_irq).  Nothing pending on the master: its IRQ7 vector (spurious), no
        ISR bit; IRQ2 with nothing pending on the slave: the slave's IRQ7 vector."""
        master, slave = self.master, self.slave
        irq = master.get_irq()
        if irq == NO_IRQ:
            return (master.irq_base + SPURIOUS_IRQ) & 0xFF
        if irq == CASCADE_IRQ:
            slave_irq = slave.get_irq()
            if slave_irq != NO_IRQ:
                slave.intack(slave_irq)
            else:
                slave_irq = SPURIOUS_IRQ
            vector = slave.irq_base + slave_irq
        else:
            vector = master.irq_base + irq
        master.intack(irq)
        return vector & 0xFF

    def _master_output(self, level: bool) -> None:
        if level != self.output:
            self.output = level                 # first: int_output may acknowledge at once
            if self.int_output is not None:
                self.int_output(level)

    # -- reset and snapshots ----------------------------------------------------------------------
    def reset(self) -> None:
        """QEMU's device reset (pic_reset): ELCR cleared, then as after ICW1."""
        self.master.reset()
        self.slave.reset()

    def state(self) -> tuple:
        return (tuple(getattr(self.master, name) for name in FIELDS),
                tuple(getattr(self.slave, name) for name in FIELDS), self.output)

    def restore(self, state: tuple) -> None:
        """Put ``state`` back without calling ``int_output``: the CPU side's own snapshot holds
        what it had seen (the queued vectors, or the INTR level)."""
        master, slave, self.output = state
        for chip, values in ((self.master, master), (self.slave, slave)):
            for name, value in zip(FIELDS, values):
                setattr(chip, name, value)
