"""The PCI bus: functions with 256 bytes of configuration space (per-byte writable masks,
BARs), reached through configuration mechanism #1 — CONFIG_ADDRESS at 0xCF8 (enable bit 31,
bus 23:16, device 15:11, function 10:8, register 7:2) and CONFIG_DATA at 0xCFC-0xCFF — as on
QEMU's pc and q35 machines.  An absent function reads all ones.
"""
from __future__ import annotations

import struct
from typing import Callable

from .ports import PortBus

CONFIG_ADDRESS, CONFIG_DATA = 0xCF8, 0xCFC
COMMAND, BAR0 = 0x04, 0x10
COMMAND_IO, COMMAND_MEMORY = 1 << 0, 1 << 1
BAR_IO = 1 << 0


class PciFunction:
    """One function's configuration space.  Writes go through ``writable`` (a mask per byte);
    a subclass (or ``on_write``) reacts to what was written, ``add_bar`` declares a BAR whose
    ``map(address or None)`` is called when the guest places it (or disables decoding)."""

    def __init__(self, vendor: int, device: int, class_code: int, revision: int = 0,
                 writable: dict[int, int] | None = None, on_write: Callable[[int], None] | None = None):
        self.config = bytearray(256)
        self.writable = bytearray(256)
        struct.pack_into("<HH", self.config, 0, vendor, device)
        struct.pack_into("<I", self.config, 8, class_code << 8 | revision)
        self.writable[COMMAND] = COMMAND_IO | COMMAND_MEMORY | 1 << 2        # I/O, memory, bus master
        for offset, mask in (writable or {}).items():
            self.writable[offset] = mask
        self.on_write = on_write
        self._bars: dict[int, tuple[int, bool, Callable[[int | None], None]]] = {}
        self._mapped: dict[int, int | None] = {}

    def add_bar(self, index: int, size: int, io: bool = False,
                map: Callable[[int | None], None] = lambda address: None) -> None:
        """BAR ``index`` (0-5) decodes ``size`` bytes (a power of two) of I/O or memory space."""
        if not 0 <= index <= 5 or size & (size - 1) or size < (4 if io else 16):
            raise ValueError(f"BAR{index}: size {size:#x} is not a power of two of at least {4 if io else 16}")
        offset = BAR0 + 4 * index
        struct.pack_into("<I", self.config, offset, BAR_IO if io else 0)
        struct.pack_into("<I", self.writable, offset, ~(size - 1) & 0xFFFF_FFFF & ~(0x3 if io else 0xF))
        self._bars[index] = (size, io, map)
        self._mapped[index] = None

    def read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.config[offset:offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        for i in range(size):
            mask = self.writable[offset + i]
            if mask:
                byte = (value >> (8 * i)) & 0xFF
                self.config[offset + i] = (self.config[offset + i] & ~mask) | (byte & mask)
                if self.on_write:
                    self.on_write(offset + i)
        if self._bars and (offset < COMMAND + 2 and offset + size > COMMAND or BAR0 <= offset < BAR0 + 24):
            self._place_bars()

    def bar_address(self, index: int) -> int | None:
        """Where BAR ``index`` decodes now (None: not placed, or decoding disabled)."""
        return self._mapped.get(index)

    def sync_bars(self) -> None:
        """Tell each BAR's ``map`` where it decodes now (after the configuration space was
        put back wholesale: a snapshot's restore)."""
        self._mapped = dict.fromkeys(self._mapped)
        self._place_bars()

    def _place_bars(self) -> None:
        command = self.config[COMMAND]
        for index, (size, io, map_) in self._bars.items():
            raw = self.read(BAR0 + 4 * index, 4)
            address = raw & ~0x3 if io else raw & ~0xF
            enabled = command & (COMMAND_IO if io else COMMAND_MEMORY)
            placed = address if enabled and address and address + size <= 1 << 32 else None
            if placed != self._mapped[index]:
                self._mapped[index] = placed
                map_(placed)


class PciBus:
    """Configuration mechanism #1 over ``ports``, and the functions at (bus, device, function)."""

    def __init__(self, ports: PortBus):
        self.address = 0                    # CONFIG_ADDRESS as last written
        self.functions: dict[tuple[int, int, int], PciFunction] = {}
        ports.register(range(CONFIG_ADDRESS, CONFIG_ADDRESS + 4), read=self._read_address, write=self._write_address)
        ports.register(range(CONFIG_DATA, CONFIG_DATA + 4), read=self._read_data, write=self._write_data)

    def add(self, bus: int, device: int, function: int, pci_function: PciFunction) -> PciFunction:
        if not (0 <= bus <= 0xFF and 0 <= device <= 0x1F and 0 <= function <= 7):
            raise ValueError(f"no PCI address {bus:02x}:{device:02x}.{function}")
        if (bus, device, function) in self.functions:
            raise ValueError(f"PCI address {bus:02x}:{device:02x}.{function} is taken")
        self.functions[(bus, device, function)] = pci_function
        return pci_function

    def state(self) -> tuple:
        return self.address, {where: bytes(function.config) for where, function in self.functions.items()}

    def restore(self, state: tuple) -> None:
        self.address, configs = state
        for where, config in configs.items():
            self.functions[where].config[:] = config
            self.functions[where].sync_bars()

    def _read_address(self, port: int, size: int) -> int:
        return (self.address >> (8 * (port - CONFIG_ADDRESS))) & ((1 << (8 * size)) - 1)

    def _write_address(self, port: int, size: int, value: int) -> None:
        if port == CONFIG_ADDRESS and size == 4:
            self.address = value & 0x80FF_FFFC

    def read_config(self, bus: int, device: int, function: int, offset: int, size: int) -> int:
        """A configuration read (all ones where no function answers): mechanism #1 and a
        platform's memory-mapped window (MMCONFIG) both come here."""
        target = self.functions.get((bus, device, function))
        if target is None or offset + size > 0x100:
            return (1 << (8 * size)) - 1
        return target.read(offset, size)

    def write_config(self, bus: int, device: int, function: int, offset: int, size: int, value: int) -> None:
        target = self.functions.get((bus, device, function))
        if target is not None and offset + size <= 0x100:
            target.write(offset, size, value)

    def _latched(self) -> tuple[int, int, int, int] | None:
        """(bus, device, function, register) CONFIG_ADDRESS names, if enabled."""
        if not self.address & 0x8000_0000:
            return None
        return (self.address >> 16) & 0xFF, (self.address >> 11) & 0x1F, (self.address >> 8) & 7, self.address & 0xFC

    def _read_data(self, port: int, size: int) -> int:
        latched = self._latched()
        if latched is None:
            return (1 << (8 * size)) - 1
        bus, device, function, register = latched
        return self.read_config(bus, device, function, register + (port - CONFIG_DATA), size)

    def _write_data(self, port: int, size: int, value: int) -> None:
        latched = self._latched()
        if latched is not None:
            bus, device, function, register = latched
            self.write_config(bus, device, function, register + (port - CONFIG_DATA), size, value)
