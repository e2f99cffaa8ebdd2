"""q35's MMCONFIG (PCI Express enhanced configuration) window, placed by the MCH's PCIEXBAR
(reference/platform.md §3.2; QEMU 7.2 hw/pci-host/q35.c mch_update_pciexbar): enable bit 0,
length bits 2:1 (256, 128 or 64 MiB; 3 is reserved and ignored), base bits 35:26.  Inside,
bus << 20 | device << 15 | function << 12 | register reaches a function's configuration
space; the MCH's and ICH9's functions have 256 bytes, so registers 0x100 and up read all ones."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..machine import Machine

LENGTHS = {0: 256 << 20, 1: 128 << 20, 2: 64 << 20}      # by PCIEXBAR bits 2:1


class MmConfig:
    def __init__(self, machine: "Machine"):
        self.machine = machine
        self.region = None
        self.placed: tuple[int, int] | None = None          # (base, size) decoded now

    def place(self, pciexbar: int) -> None:
        """Follow a PCIEXBAR value: map, move or remove the window."""
        length = LENGTHS.get((pciexbar >> 1) & 3)
        if not pciexbar & 1 or length is None:
            wanted = None if pciexbar & 1 == 0 else self.placed      # reserved length: no change
        else:
            wanted = (pciexbar & (0xF_FC00_0000 & ~(length - 1)), length)
        if wanted == self.placed:
            return
        if self.region is not None:
            self.machine.remove_mmio(self.region)
            self.region = None
        self.placed = wanted
        if wanted is not None:
            base, size = wanted
            try:
                self.region = self.machine.add_mmio(base, size, self, "pcie-mmcfg")
            except ValueError:                  # over RAM or another window: QEMU's RAM wins there
                self.placed = None

    @staticmethod
    def _decode(offset: int) -> tuple[int, int, int, int]:
        return offset >> 20, (offset >> 15) & 0x1F, (offset >> 12) & 7, offset & 0xFFF

    def read(self, offset: int, size: int) -> int:
        return self.machine.pci.read_config(*self._decode(offset), size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.machine.pci.write_config(*self._decode(offset), size, value)
