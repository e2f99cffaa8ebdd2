"""PAM: what the CPU sees at 0xC0000-0xFFFFF on pc and q35 (reference/platform.md §1.3,
§1.5; QEMU 7.2 hw/pci-host/pam.c).  Thirteen segments — 0xF0000-0xFFFFF, then twelve of
16 KiB from 0xC0000 — each show, as two bits of a host-bridge register say:

* 0: the PCI address space — "pc.rom" (128 KiB of read-only zeros at 0xC0000) and
  "isa-bios" (the BIOS image's last 128 KiB at 0xE0000), read-only;
* 1: the RAM beneath, read-only (QEMU drops the writes: it does not forward them to PCI);
* 2, 3: the RAM beneath, read and write (QEMU maps 2 as 3: "should distinguish").

SeaBIOS copies itself into RAM this way and runs from there.  A view is an overlay of the
machine's physical memory; the RAM under a read-only view is kept in the overlay's copy and
written back when the view goes."""
from __future__ import annotations

import numpy as np

from ..emulator.memory import ROM, Overlay, PhysicalMemory

PCI, RAM_READ_ONLY, RAM = "pci", "ram read-only", "ram"
VIEWS = (PCI, RAM_READ_ONLY, RAM, RAM)          # by the two bits (RE = 1, WE = 2)
PC_ROM, PC_ROM_SIZE = 0xC0000, 0x20000
ISA_BIOS, ISA_BIOS_SIZE = 0xE0000, 0x20000
SEGMENTS = ((0xF0000, 0x10000),) + tuple((0xC0000 + 0x4000 * i, 0x4000) for i in range(12))


def register_of(segment: int) -> tuple[int, int]:
    """(PAM register index 0-6, bit shift) of ``segment`` (QEMU: PAM0 + DIV_ROUND_UP(idx, 2),
    odd segments in the low nibble)."""
    return (segment + 1) // 2, 0 if segment % 2 else 4


class Pam:
    """The shadow-RAM switch over ``memory``, driven by the seven PAM bytes."""

    def __init__(self, memory: PhysicalMemory):
        self.memory = memory
        self.pci_space = np.zeros(PC_ROM_SIZE + ISA_BIOS_SIZE, dtype=np.uint8)   # pc.rom, then isa-bios
        self.registers = bytes(7)
        self.views = [RAM] * len(SEGMENTS)                  # what each segment shows now
        self._overlays: list[Overlay | None] = [None] * len(SEGMENTS)
        for segment in range(len(SEGMENTS)):
            self._show(segment, PCI)

    def set_isa_bios(self, image: bytes) -> None:
        """The BIOS image's last 128 KiB (less for a smaller image, at the window's end)."""
        showing = [segment for segment, view in enumerate(self.views) if view == PCI and SEGMENTS[segment][0] >= ISA_BIOS]
        for segment in showing:                     # unmapped first: their bytes go back into pci_space
            self._show(segment, RAM)
        tail = image[-ISA_BIOS_SIZE:]
        window = self.pci_space[PC_ROM_SIZE:]
        window[:] = 0
        window[ISA_BIOS_SIZE - len(tail):] = np.frombuffer(tail, np.uint8)
        for segment in showing:
            self._show(segment, PCI)

    def write_registers(self, registers: bytes) -> None:
        """The seven PAM bytes as the host bridge holds them now."""
        self.registers = bytes(registers)
        for segment in range(len(SEGMENTS)):
            index, shift = register_of(segment)
            self._show(segment, VIEWS[(registers[index] >> shift) & 3])

    def rebuild(self, registers: bytes) -> None:
        """After a restore put RAM and the registers back: every view made afresh from them
        (a read-only view's copy of RAM would be stale)."""
        for segment, overlay in enumerate(self._overlays):
            if overlay is not None:
                self.memory.remove_overlay(overlay)
                self._overlays[segment] = None
            self.views[segment] = RAM
        self.write_registers(registers)

    def _show(self, segment: int, view: str) -> None:
        if view == self.views[segment]:
            return
        base, size = SEGMENTS[segment]
        memory, overlay = self.memory, self._overlays[segment]
        if overlay is not None:
            memory.remove_overlay(overlay)
            if self.views[segment] == RAM_READ_ONLY:         # the RAM's bytes were the overlay's
                memory.ram[base:base + size] = overlay.data
            self._overlays[segment] = None
        if view == PCI:
            data = self.pci_space[base - PC_ROM:base - PC_ROM + size]
        elif view == RAM_READ_ONLY:
            data = memory.ram[base:base + size].copy()
        else:
            data = None
        if data is not None:
            self._overlays[segment] = memory.add_overlay(f"pam {base:#x} ({view})", base, data, ROM)
        self.views[segment] = view
