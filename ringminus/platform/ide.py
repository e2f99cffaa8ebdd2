"""PIIX3's IDE function (00:01.1) with no drives, as QEMU 7.2 answers (hw/ide/core.c,
ioport.c, pci.c, piix.c): the two legacy channels (0x1F0-0x1F7 + 0x3F6, IRQ 14;
0x170-0x177 + 0x376, IRQ 15), registered at realize whatever the PCI command register says,
and the bus-master DMA block behind BAR4 (16 bytes: per channel command, status, PRD
address at +0/+2/+4, channel 1 at +8).

With neither drive present every command-block register reads 0, except a byte read of the
data port (0xFF); 16/32-bit data reads return 0 (no DRQ); alternate status reads 0; reading
status lowers the channel's interrupt.  A 16-bit access to a byte register is two byte
accesses (the byte past the block reads 0xFF); a 32-bit access anywhere but the data port
reads all ones and writes nothing.  Register writes go nowhere visible, except: the device
bit of 0x1x6 selects the drive; a command written with drive 0 selected completes (aborted,
or diagnostic) and raises the interrupt unless nIEN is set (commands to the absent drive 1
are ignored); an SRST edge in device control runs the reset's diagnostic, which raises the
interrupt too unless nIEN (QEMU runs it from a bottom half; here at once).  Raising it sets
the channel's bus-master status INT bit (bmdma_irq).

Bus master (idle channels): command keeps value & 0x09, and a 0->1 edge of Start sets status
bit 0 (active), 1->0 clears it; status writes keep bits 5-6, clear bits 1-2 written with 1;
reads of +1/+3 give 0xFF, 16/32-bit accesses to +0..+3 read all ones and write nothing; the
PRD address (+4..+7) is a dword with bits 0-1 zero, any size.  An access not aligned to its
size is rejected by QEMU's memory core here (reads 0, writes dropped).
"""
from __future__ import annotations

from typing import Callable

CHANNELS = ((0x1F0, 0x3F6), (0x170, 0x376))
BMDMA_SIZE = 16
CTRL_NIEN, CTRL_SRST = 1 << 1, 1 << 2
DEV_SEL = 1 << 4
BM_START, BM_ACTIVE, BM_INT = 1 << 0, 1 << 0, 1 << 2


def _ones(size: int) -> int:
    return (1 << (8 * size)) - 1


class _Channel:
    def __init__(self, irq: Callable[[bool], None] | None):
        self.irq = irq
        self.unit = 0                       # bus->unit: the selected drive
        self.ctrl = 0                       # bus->cmd: device control as last written
        self.level = False
        self.bm_cmd = self.bm_status = self.bm_addr = 0

    def set_irq(self, level: bool) -> None:
        if level:
            self.bm_status |= BM_INT
        self.level = level
        if self.irq is not None:
            self.irq(level)

    def raise_if_enabled(self) -> None:
        """ide_bus_set_irq."""
        if not self.ctrl & CTRL_NIEN:
            self.set_irq(True)

    # command block, offset 0-7
    def read_block(self, offset: int, size: int) -> int:
        if offset == 0 and size in (2, 4):
            return 0                        # ide_data_readw/l: no DRQ
        if size == 1:
            return self._read_byte(offset)
        if size == 2:
            low = self._read_byte(offset)
            return low | (self._read_byte(offset + 1) << 8 if offset + 1 < 8 else 0xFF00)
        return _ones(size)

    def _read_byte(self, offset: int) -> int:
        if offset == 0:
            return 0xFF
        if offset == 7:
            self.set_irq(False)
        return 0

    def write_block(self, offset: int, size: int, value: int) -> None:
        if offset == 0 and size in (2, 4):
            return                          # ide_data_writew/l: no DRQ
        if size == 1:
            self._write_byte(offset, value & 0xFF)
        elif size == 2:
            self._write_byte(offset, value & 0xFF)
            if offset + 1 < 8:
                self._write_byte(offset + 1, (value >> 8) & 0xFF)

    def _write_byte(self, offset: int, value: int) -> None:
        if offset == 6:
            self.unit = 1 if value & DEV_SEL else 0
        elif offset == 7:
            self.set_irq(False)
            if self.unit == 0:              # the absent drive 1 ignores commands
                self.raise_if_enabled()

    # control block: alternate status / device control
    def read_control(self, size: int) -> int:
        if size == 1:
            return 0
        if size == 2:
            return 0xFF00
        return _ones(size)

    def write_control(self, size: int, value: int) -> None:
        if size not in (1, 2):
            return
        value &= 0xFF
        if not self.ctrl & CTRL_SRST and value & CTRL_SRST:
            self.ctrl = value
            self.raise_if_enabled()         # ide_perform_srst -> cmd_exec_dev_diagnostic
            self.ctrl &= ~CTRL_SRST         # the bottom half clears SRST in bus->cmd
            return
        self.ctrl = value

    # bus master block, offset 0-7 of the channel's 8 bytes
    def read_bm(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4) or offset & (size - 1):
            return 0
        if offset < 4:
            if size != 1:
                return _ones(size)
            return self.bm_cmd if offset == 0 else self.bm_status if offset == 2 else 0xFF
        return (self.bm_addr >> (8 * (offset - 4))) & _ones(size)

    def write_bm(self, offset: int, size: int, value: int) -> None:
        if size not in (1, 2, 4) or offset & (size - 1):
            return
        if offset < 4:
            if size != 1:
                return
            value &= 0xFF
            if offset == 0:
                if (value ^ self.bm_cmd) & BM_START:
                    if value & BM_START:
                        self.bm_status |= BM_ACTIVE
                    else:
                        self.bm_status &= ~BM_ACTIVE
                self.bm_cmd = value & 0x09
            elif offset == 2:
                self.bm_status = (value & 0x60) | (self.bm_status & BM_ACTIVE) | (self.bm_status & ~value & 0x06)
            return
        shift, mask = 8 * (offset - 4), _ones(size)
        self.bm_addr &= ~(mask << shift) & 0xFFFF_FFFF
        self.bm_addr |= ((value & mask) << shift) & ~3 & 0xFFFF_FFFF

    def state(self) -> tuple:
        return self.unit, self.ctrl, self.level, self.bm_cmd, self.bm_status, self.bm_addr

    def restore(self, state: tuple) -> None:
        self.unit, self.ctrl, self.level, self.bm_cmd, self.bm_status, self.bm_addr = state


class LegacyIde:
    """Both channels; ``irqs`` = (irq14(level), irq15(level)).  As a port device it answers
    the legacy ports by absolute number; ``bm_read``/``bm_write`` take offsets into BAR4."""
    precise = False

    def __init__(self, irqs: tuple = (None, None)):
        self.channels = [_Channel(irqs[0]), _Channel(irqs[1])]

    def ports(self) -> list[int]:
        return [p for base, control in CHANNELS for p in (*range(base, base + 8), control)]

    def _find(self, port: int):
        for channel, (base, control) in zip(self.channels, CHANNELS):
            if base <= port < base + 8:
                return channel, port - base
            if port == control:
                return channel, None
        return None, None

    def read(self, port: int, size: int) -> int:
        channel, offset = self._find(port)
        if channel is None or size not in (1, 2, 4):
            return _ones(size)
        return channel.read_control(size) if offset is None else channel.read_block(offset, size)

    def write(self, port: int, size: int, value: int) -> None:
        channel, offset = self._find(port)
        if channel is None or size not in (1, 2, 4):
            return
        if offset is None:
            channel.write_control(size, value)
        else:
            channel.write_block(offset, size, value)

    def bm_read(self, offset: int, size: int) -> int:
        if not 0 <= offset < BMDMA_SIZE:
            return _ones(size)
        return self.channels[offset // 8].read_bm(offset % 8, size)

    def bm_write(self, offset: int, size: int, value: int) -> None:
        if 0 <= offset < BMDMA_SIZE:
            self.channels[offset // 8].write_bm(offset % 8, size, value)

    def state(self) -> tuple:
        return tuple(channel.state() for channel in self.channels)

    def restore(self, state: tuple) -> None:
        for channel, values in zip(self.channels, state):
            channel.restore(values)


def plug(machine, function, irqs: tuple = (None, None)) -> LegacyIde:
    """Attach a LegacyIde to PIIX3's 00:01.1 ``function`` (after boards.identify): claims the
    legacy ports now and re-declares BAR4 (I/O, 16 bytes) to map the bus-master block where
    the guest places it.  ``irqs``: (irq14(level), irq15(level))."""
    ide = LegacyIde(irqs)
    machine.ports.register(ide.ports(), ide)
    function.add_bar(4, BMDMA_SIZE, io=True, map=machine.ports.movable_block(BMDMA_SIZE, ide.bm_read, ide.bm_write))
    return ide
