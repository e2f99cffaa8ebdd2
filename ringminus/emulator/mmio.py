"""Memory-mapped I/O: regions of the physical address space whose reads and writes call a
device, by offset and size (Unicorn's ``mmio_map``; nothing is cached, every access calls).

A device may stop the run or raise an event from inside an access (``Core.request_stop``,
``raise_intr``, an interrupt line…).  Unicorn answers a stop requested inside an MMIO callback
by restarting the accessing instruction, which would repeat the access (a self-IPI device
would send its IPI over and over).  So the bus lets the access happen once, ends the slice
with the instruction not yet retired, and the run loop completes that instruction alone with
the device out of the loop: the write that asked for the stop is not delivered again, and a
read the instruction made before it (a read-modify-write) gets the value it got the first
time.  The instruction then retires, and only then does the run stop or the event arrive.
(An instruction that writes two MMIO registers before the one that stops delivers the first
one twice; no common instruction does.)
"""
from __future__ import annotations

from typing import Callable, Protocol

from unicorn import Uc


class MmioDevice(Protocol):
    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


class MmioRegion:
    def __init__(self, base: int, size: int, device: MmioDevice, name: str):
        self.base, self.size, self.device, self.name = base, size, device, name


class MmioBus:
    """The MMIO regions of one machine.  ``wants_stop()`` is asked after each access: True when
    the access left something the run loop must act on before the next instruction."""

    def __init__(self, uc: Uc, wants_stop: Callable[[], bool], stop_after_access: Callable[[], None]):
        self.uc = uc
        self.regions: list[MmioRegion] = []
        self._wants_stop, self._stop_after_access = wants_stop, stop_after_access
        self._reads: dict[tuple[int, int], int] = {}           # this slice's reads: (address, size) -> value
        self._replaying: tuple[int, int, int] | None = None     # the write already delivered, while completing
        self.stopping_write: tuple[int, int, int] | None = None
        self.stats = {"mmio_reads": 0, "mmio_writes": 0}
        self.in_access = False                  # a device's read or write is running

    def add(self, base: int, size: int, device: MmioDevice, name: str = "") -> MmioRegion:
        if base & 0xFFF or size & 0xFFF or size <= 0:
            raise ValueError(f"an MMIO region must be whole pages: {base:#x}+{size:#x}")
        if not (callable(getattr(device, "read", None)) and callable(getattr(device, "write", None))):
            raise TypeError(f"{type(device).__name__} is not an MMIO device: it needs read(offset, size) "
                            "and write(offset, size, value)")
        for region in self.regions:
            if base < region.base + region.size and region.base < base + size:
                raise ValueError(f"MMIO region {base:#x}+{size:#x} overlaps {region.name or hex(region.base)}")
        region = MmioRegion(base, size, device, name or type(device).__name__)
        self.uc.mmio_map(base, size, self._read_callback(region), None, self._write_callback(region), None)
        self.regions.append(region)
        return region

    def remove(self, region: MmioRegion, unmap: Callable[[int, int], None]) -> None:
        """Stop decoding ``region``; ``unmap(base, size)`` takes it out of Unicorn."""
        self.regions.remove(region)
        unmap(region.base, region.size)

    def slice_starts(self) -> None:
        self._reads.clear()

    def _read_callback(self, region: MmioRegion):
        def on_read(uc, offset: int, size: int, _data) -> int:
            key = (region.base + offset, size)
            if self._replaying is not None and key in self._reads:
                return self._reads.pop(key)             # the value this instruction read before
            self.stats["mmio_reads"] += 1
            self.in_access = True
            try:
                value = region.device.read(offset, size) & ((1 << (8 * size)) - 1)
            finally:
                self.in_access = False
            self._reads[key] = value
            if self._replaying is None and self._wants_stop():
                self.stopping_write = None
                self._stop_after_access()
            return value
        return on_read

    def _write_callback(self, region: MmioRegion):
        def on_write(uc, offset: int, size: int, value: int, _data) -> None:
            access = (region.base + offset, size, value)
            if self._replaying == access:
                self._replaying = None                  # delivered already, before the stop
                return
            self.stats["mmio_writes"] += 1
            self.in_access = True
            try:
                region.device.write(offset, size, value)
            finally:
                self.in_access = False
            if self._replaying is None and self._wants_stop():
                self.stopping_write = access
                self._stop_after_access()
        return on_write

    def completing(self, active: bool) -> None:
        """While the run loop completes the instruction whose access stopped the slice."""
        if active:
            self._replaying = self.stopping_write or (0, 0, -1)     # (a read: nothing to swallow)
        else:
            self._replaying = self.stopping_write = None
            self._reads.clear()
