"""Guest physical memory: numpy-backed RAM plus overlays (ROM images, aliases), all mapped
into Unicorn with ``mem_map_ptr`` so guest and Python see the same bytes at once.

An overlay hides what lies beneath it; removing it maps the RAM beneath back.  Switching
what is visible is a remap (tens of µs, and Unicorn drops the translations of that range
only), never a copy (DESIGN.md §3, reference/unicorn.md §4).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from unicorn import UC_PROT_ALL, UC_PROT_EXEC, UC_PROT_READ, UC_PROT_WRITE, UC_TLB_CPU, UC_TLB_VIRTUAL, Uc

from ..arch.control import CR0_PG
from .ucinternals import CR, Context, FastAccess

PAGE = 0x1000
ROM = UC_PROT_READ | UC_PROT_EXEC
RW = UC_PROT_ALL


FOUR_GIB = 1 << 32


class MissingMemory(Exception):
    """Something ringminus itself reads or writes for the guest is not in memory (a feature's
    structures too: a VMCB, say).  A run that meets one stops with reason ``memory``."""


class UnbackedMemory(MissingMemory):
    """Python touched a physical address that no RAM, ROM or overlay backs."""

    def __init__(self, address: int):
        super().__init__(f"no memory at physical address {address:#x}")
        self.address = address


def page_aligned_array(size: int) -> np.ndarray:
    """A zeroed uint8 array whose first byte is 4 KiB aligned in host memory."""
    raw = np.zeros(size + PAGE, dtype=np.uint8)
    skip = (-raw.ctypes.data) % PAGE
    return raw[skip:skip + size]


@dataclass
class Overlay:
    name: str
    base: int
    data: np.ndarray
    perms: int

    @property
    def end(self) -> int:
        return self.base + len(self.data)


class PhysicalMemory:
    def __init__(self, uc: Uc, ram_size: int):
        if ram_size <= 0 or ram_size % PAGE:
            raise ValueError(f"memory size must be a positive multiple of 4 KiB, not {ram_size:#x}")
        self.uc = uc
        self.fast = FastAccess(uc)
        self._context = Context(uc)
        # Unicorn's TLB misses go to ringminus's fill hook (a second stage: Core.set_second_stage):
        # a lookup that is no access must not reach it (it would set accessed bits).
        self.tlb_filled_by_hook = False
        self.ram = page_aligned_array(ram_size)
        self.overlays: list[Overlay] = []
        # Ranges left unmapped until touched because their view changed (smram.py), and the
        # callback that maps the right view; every Python-side access reveals what it touches
        # first, as the CPU's does through a fault.
        self.hidden: list[tuple[int, int]] = []
        # Physical pages Unicorn has translated code from since it last dropped all of it
        # (sites.py keeps this): ringminus's own writes there drop that code (``write``).
        self.code_pages: set[int] = set()
        self.reveal: Callable[[int, int], None] | None = None
        # One byte per RAM page, 0 where the CPU does not see the RAM (an overlay, an SMRAM
        # view, a hidden range): where it does, Python reads the array itself, which is
        # Unicorn's memory (mem_map_ptr), instead of a ctypes call.
        self._ram_shows = bytearray(b"\1" * (ram_size // PAGE))
        # RAM shows at 0 up to ``below_4g``, the rest at 4 GiB (``place_above_4g``).
        self.below_4g = ram_size
        self._map(0, self.ram, RW)

    @property
    def ram_size(self) -> int:
        return len(self.ram)

    @property
    def ram_blocks(self) -> list[tuple[int, int, int]]:
        """(physical base, offset in ``ram``, size) of each range RAM shows in."""
        above = self.ram_size - self.below_4g
        return [(0, 0, self.below_4g)] + ([(FOUR_GIB, self.below_4g, above)] if above else [])

    @property
    def ram_end(self) -> int:
        """The physical address past the highest byte of RAM."""
        base, _offset, size = self.ram_blocks[-1]
        return base + size

    def place_above_4g(self, below_4g: int) -> None:
        """Show the RAM past ``below_4g`` at 4 GiB instead, leaving the hole below 4 GiB to
        devices: QEMU's pc and q35 with more RAM than fits under their PCI hole (pc.c
        pc_memory_init's "ram-above-4g", an alias of the same RAM block)."""
        if not 0 < below_4g < self.below_4g or below_4g % PAGE \
                or any(overlay.end > below_4g for overlay in self.overlays):
            raise ValueError(f"RAM cannot be split at {below_4g:#x}")
        self.physically(self.uc.mem_unmap, below_4g, self.ram_size - below_4g)
        self.below_4g = below_4g
        self._map(FOUR_GIB, self.ram[below_4g:], RW)

    def ram_offset(self, address: int, size: int = 1) -> int | None:
        """Where [address, address + size) lies in ``ram``, or None where it is not all RAM."""
        if 0 <= address and address + size <= self.below_4g:
            return address
        if FOUR_GIB <= address and address + size <= FOUR_GIB + self.ram_size - self.below_4g:
            return address - FOUR_GIB + self.below_4g
        return None

    def _map(self, base: int, data: np.ndarray, perms: int) -> None:
        if not len(data):
            return
        if perms & UC_PROT_WRITE:
            self.uc.mem_map_ptr(base, len(data), perms, data.ctypes.data)
        else:
            # ROM lives in memory Unicorn owns: over a host pointer, Unicorn performs a write
            # to a read-only page once the protection hook has returned; over its own memory
            # it drops the write, as QEMU's ROM does.
            self.uc.mem_map(base, len(data), perms)
            self.uc.mem_write(base, data.tobytes())

    def backed_ranges(self) -> list[tuple[int, int]]:
        """(start, end) of RAM and of every overlay: what an MMIO region may not cover."""
        return [*((base, base + size) for base, _offset, size in self.ram_blocks),
                *((o.base, o.base + len(o.data)) for o in self.overlays)]

    def add_overlay(self, name: str, base: int, data: np.ndarray, perms: int = RW, over_ram: bool = True) -> Overlay:
        """Show ``data`` at ``base`` instead of whatever RAM is there (``over_ram=False``: the
        caller has unmapped that RAM already)."""
        if base % PAGE or len(data) % PAGE or len(data) == 0:
            raise ValueError(f"overlay {name} must be whole 4 KiB pages")
        overlay = Overlay(name, base, data, perms)
        if over_ram:
            self.unmap_ram(base, len(data))
        self._map(base, data, perms)
        self.overlays.append(overlay)
        return overlay

    def remove_overlay(self, overlay: Overlay, restore_ram: bool = True) -> None:
        """Stop showing ``overlay``; the RAM beneath shows again unless ``restore_ram`` is
        False (the range then stays unmapped).  A read-only overlay lives in a copy Unicorn
        owns (``_map``), which Python's writes reach: its bytes go back into ``data`` first."""
        if not overlay.perms & UC_PROT_WRITE:
            overlay.data[:] = np.frombuffer(bytes(self.uc.mem_read(overlay.base, len(overlay.data))), np.uint8)
        self.physically(self.uc.mem_unmap, overlay.base, len(overlay.data))
        self.overlays.remove(overlay)
        if restore_ram:
            self.map_ram(overlay.base, len(overlay.data))

    def _ram_within(self, base: int, size: int):
        """(physical start, offset in ``ram``, size) of the RAM in [base, base + size)."""
        for block, offset, length in self.ram_blocks:
            start, end = max(base, block), min(base + size, block + length)
            if start < end:
                yield start, offset + start - block, end - start

    def unmap_ram(self, base: int, size: int) -> None:
        for start, offset, length in self._ram_within(base, size):
            self.physically(self.uc.mem_unmap, start, length)
            self._set_ram_shows(offset, offset + length, False)

    def map_ram(self, base: int, size: int) -> None:
        """Map the RAM in [base, base + size) (after ``unmap_ram``) as a region of its own."""
        for start, offset, length in self._ram_within(base, size):
            self._map(start, self.ram[offset:offset + length], RW)
            self._set_ram_shows(offset, offset + length, True)

    def _set_ram_shows(self, start: int, end: int, shows: bool) -> None:
        first, last = start // PAGE, -(-end // PAGE)
        self._ram_shows[first:last] = bytes([shows]) * (last - first)

    # -- Python-side physical access (what the CPU would see right now) --------------------
    def _reveal_hidden(self, address: int, size: int) -> None:
        for start, end in self.hidden:
            if address < end and start < address + size:
                self.reveal(address, size)
                return

    def read(self, address: int, size: int) -> bytes:
        data = self.read_fast(address, size)
        if data is None:
            raise UnbackedMemory(address)
        return data

    def read_fast(self, address: int, size: int) -> bytes | None:
        """``read`` for hot paths: None instead of an exception where nothing is mapped."""
        offset = self._visible_offset(address, size)
        if offset is not None:
            return self.ram[offset:offset + size].tobytes()
        if self.hidden:
            self._reveal_hidden(address, size)
        return self.fast.read_memory(address, size)

    def read_only(self, address: int) -> bool:
        """True where a ROM overlay shows: guest writes there are dropped, as on QEMU.
        (``write`` below writes regardless — Unicorn's uc_mem_write ignores protection.)"""
        for overlay in reversed(self.overlays):        # the last one added is on top
            if overlay.base <= address < overlay.end:
                return not overlay.perms & UC_PROT_WRITE
        return False

    def write(self, address: int, data: bytes) -> None:
        """Write as the CPU would (an event's stack frame, a world switch's save map): code
        translated from these bytes is dropped, as the CPU's own stores drop it, so what runs
        next is what is there now."""
        if self.hidden:
            self._reveal_hidden(address, len(data))
        if not self.fast.write_memory(address, bytes(data)):
            raise UnbackedMemory(address)
        if self.code_pages and not self.code_pages.isdisjoint(range(address >> 12, ((address + len(data) - 1) >> 12) + 1)):
            self.forget_code(address, len(data))

    def load(self, address: int, data: bytes) -> None:
        """Place bytes in guest RAM (loaders, --blob); the whole range must be RAM."""
        offset = self.ram_offset(address, len(data))
        if offset is None:
            raise ValueError(f"{len(data)} bytes at {address:#x} do not fit in guest RAM "
                             f"({self.describe_ram()})")
        self.ram[offset:offset + len(data)] = np.frombuffer(data, dtype=np.uint8)
        self.forget_code(address, len(data))

    def ram_view(self, address: int, size: int) -> np.ndarray | None:
        """The RAM at [address, address + size) itself (a numpy view: what the CPU sees, as it
        changes), or None where that is not all RAM the CPU sees now."""
        offset = self._visible_offset(address, size)
        return None if offset is None else self.ram[offset:offset + size]

    def _visible_offset(self, address: int, size: int) -> int | None:
        """``ram_offset`` where [address, address + size) is all RAM the CPU sees now (no
        overlay, view or hidden range over it), else None."""
        offset = self.ram_offset(address, size)
        if offset is None or size <= 0 or self._ram_shows.find(0, offset // PAGE, (offset + size - 1) // PAGE + 1) >= 0:
            return None
        return offset

    def describe_ram(self) -> str:
        return ", ".join(f"{size >> 20} MiB at {base:#x}" for base, _offset, size in self.ram_blocks)

    def forget_code(self, address: int, size: int) -> None:
        """Drop the translations of [address, address + size): bytes written behind Unicorn's
        back must not run stale code (unicorn.md §4)."""
        if self.physically(self.uc.ctl_remove_cache, address, address + max(size, 1)):
            self.fast.flush_tlb()         # the lookup's identity entry for ``address``

    def physically(self, call: Callable, address: int, *args) -> bool:
        """``call(address, *args)``, a Unicorn call given a physical address that it looks up
        as a linear one through the CPU's page tables (uc_invalidate_tb, behind unmapping and
        ctl_remove_cache): with the guest's paging on, that walk sets Accessed bits in its
        tables, can leave a #PF in flight and drops the wrong translations.  The call runs
        with paging off, where linear is physical, and the CPU's state comes back as it was.
        True when paging was on: the lookup then left an identity TLB entry for ``address``
        (an unmap flushes its range's pages, which drop it; other callers flush).  While a
        second stage fills the TLB, the lookup goes to Unicorn's own walker meanwhile."""
        ctx = self._context.snapshot()
        cr0 = ctx.u64(CR)
        if not cr0 & CR0_PG and not self.tlb_filled_by_hook:
            call(address, *args)
            return False
        ctx.put_u64(CR, cr0 & ~CR0_PG)
        ctx.commit()
        if self.tlb_filled_by_hook:
            self.uc.ctl_set_tlb_mode(UC_TLB_CPU)
        try:
            call(address, *args)
        finally:
            if self.tlb_filled_by_hook:
                self.uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
            ctx.put_u64(CR, cr0)
            ctx.commit()
        return True

    def read_u(self, address: int, size: int) -> int:
        return int.from_bytes(self.read(address, size), "little")

    def write_u(self, address: int, size: int, value: int) -> None:
        self.write(address, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
