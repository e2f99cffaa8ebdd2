"""Port devices whose registers are bytes, reached as QEMU 7.2 reaches them: a region's
MemoryRegionOps has ``.impl.max_access_size = 1`` and leaves ``.valid`` at 0 (the 8259, its
ELCR, the 8254 and the PC speaker port all do).  QEMU's IN/OUT helpers
(target/i386/tcg/sysemu/misc_helper.c) call ``address_space_ld*/st*`` on the I/O space, which
hands the whole access to the one region holding its first port (softmmu/memory.c):

* ``memory_region_access_valid``: an access whose offset in the region is not a multiple of
  its size is invalid (``.valid.unaligned`` is false) — a read gives 0
  (``unassigned_mem_read``), a write is dropped;
* otherwise ``access_with_adjusted_size`` makes ``size`` one-byte calls at offsets
  ``offset .. offset + size - 1``, lowest first, little-endian — past the end of the region
  too: the handler decides what those offsets mean (the 8259 treats any offset but 0 as its
  data port, the 8254 masks with 3, the ELCR and port 0x61 ignore it).

So ``inw 0x20`` reads IRR (or ISR) then IMR, ``inw 0x21`` reads 0, and ``outw 0x61`` writes
port 0x61 twice (low byte, then high byte)."""
from __future__ import annotations

from typing import Callable, Iterable, NamedTuple


class ByteRegion(NamedTuple):
    base: int
    size: int
    read: Callable[[int], int]              # offset -> byte
    write: Callable[[int, int], None]       # offset, byte


class ByteRegions:
    """The regions of one port device; ``read``/``write`` are the port bus's calls."""

    def __init__(self, regions: Iterable[ByteRegion]):
        self._at = {port: region for region in regions for port in range(region.base, region.base + region.size)}

    @property
    def ports(self) -> tuple[int, ...]:
        return tuple(sorted(self._at))

    def read(self, port: int, size: int) -> int:
        region = self._at.get(port)
        if region is None or size <= 0:
            return (1 << (8 * max(size, 0))) - 1      # not ours: what an unclaimed port reads
        offset = port - region.base
        if offset % size:
            return 0
        value = 0
        for i in range(size):
            value |= (region.read(offset + i) & 0xFF) << (8 * i)
        return value

    def write(self, port: int, size: int, value: int) -> None:
        region = self._at.get(port)
        if region is None or size <= 0 or (port - region.base) % size:
            return
        offset = port - region.base
        for i in range(size):
            region.write(offset + i, (value >> (8 * i)) & 0xFF)


class ByteRegisterDevice:
    """A port device whose ports are ``ByteRegions`` (``self._io``, built by the subclass,
    claiming ``PORTS``): the bus calls go through QEMU's access-size rule above."""
    PORTS: tuple[int, ...] = ()
    precise = False
    _io: ByteRegions

    def register(self, ports):
        """Claim the ports on a PortBus (``machine.ports``); the device itself."""
        ports.register(self.PORTS, self)
        return self

    def read(self, port: int, size: int) -> int:
        return self._io.read(port, size)

    def write(self, port: int, size: int, value: int) -> None:
        self._io.write(port, size, value)
