"""SMRAM as a private address space (semantics.md §C.1).

Each SMRAM range has a buffer of its own.  In SMM the CPU sees that buffer at the range's
addresses; outside SMM it sees the normal view there (the RAM behind it, or nothing) — unless
the chipset has SMRAM open.  Switching views maps or unmaps the buffer over the range
(DESIGN.md §3): no bytes are copied, and Unicorn drops the translated code of exactly that
range, so code from one view never runs in the other (reference/unicorn.md §4).

A swap (unmap, then map) costs 24-39 µs, so the second half waits until the CPU touches the
range: when the view changes (SMI, RSM, a write to the SMRAM register), a range whose mapping
now shows the wrong view is only unmapped — *hidden* — and its right view is mapped at the
first access, by the CPU (an unmapped-memory fault, which the machine answers with
``reveal``: a data access then goes on, a fetch runs again) or by ringminus itself
(PhysicalMemory reveals first).  Entering SMM maps at once the range holding SMBASE's entry point and save area,
which the CPU is about to touch.  A handler in plain RAM thus pays nothing for an A-segment
it never touches, and one in SMRAM pays half a swap per SMI and per RSM.  (Protections would
be cheaper still, but Unicorn does not check them on an access that crosses into the page.)

The control register is the host bridge's SMRAM register (i440FX config 0x72, Q35 0x9D):
D_OPEN lets non-SMM code see SMRAM, D_CLS hides it again, D_LCK freezes D_OPEN at 0 (and
itself and G_SMRAME) until reset, G_SMRAME enables the A-segment range at all.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..emulator.memory import PAGE, Overlay, PhysicalMemory, page_aligned_array

D_OPEN, D_CLS, D_LCK, G_SMRAME = 0x40, 0x20, 0x10, 0x08
C_BASE_SEG = 0x02                     # "compatible SMRAM at A0000", hard-wired
RESET_VALUE = C_BASE_SEG              # as QEMU: SMRAM disabled until firmware sets G_SMRAME
ASEG_BASE, ASEG_SIZE = 0xA0000, 0x20000
FOUR_GIB = 1 << 32


@dataclass
class SmramRange:
    base: int
    size: int
    data: np.ndarray
    gated: bool                       # the A-segment: SMRAM only while G_SMRAME is set
    overlay: Overlay | None = None    # the buffer is what Unicorn maps there
    hidden: bool = False              # nothing is mapped there until the CPU touches it

    @property
    def end(self) -> int:
        return self.base + self.size


class Smram:
    def __init__(self, memory: PhysicalMemory):
        self.memory = memory
        self.register = RESET_VALUE
        self.in_smm = False
        self.ranges = [SmramRange(ASEG_BASE, ASEG_SIZE, page_aligned_array(ASEG_SIZE), gated=True)]
        self.swaps = 0                    # views mapped in after a change, for stats and tests
        memory.reveal = self.reveal

    # -- ranges ------------------------------------------------------------------------------
    def add_range(self, base: int, size: int) -> SmramRange:
        """A further private range (``--smram BASE:SIZE``), e.g. a TSEG-style one."""
        if base % PAGE or size % PAGE or size <= 0:
            raise ValueError(f"SMRAM range {base:#x}:{size:#x} must be whole 4 KiB pages")
        if base + size > FOUR_GIB:
            raise ValueError(f"SMRAM range {base:#x}:{size:#x} must lie below 4 GiB")
        for other in self.ranges:
            if base < other.end and other.base < base + size:
                raise ValueError(f"SMRAM range {base:#x}:{size:#x} overlaps {other.base:#x}:{other.size:#x}")
        smram = SmramRange(base, size, page_aligned_array(size), gated=False)
        self.ranges.append(smram)
        self.update()
        return smram

    def range_at(self, address: int, size: int = 1) -> SmramRange | None:
        return next((r for r in self.ranges if r.base <= address and address + size <= r.end), None)

    def load(self, address: int, data: bytes) -> None:
        """Place bytes straight into SMRAM (``--smram-load``), whatever the current view."""
        smram = self.range_at(address, max(len(data), 1))
        if smram is None:
            raise ValueError(f"{len(data)} bytes at {address:#x} do not lie inside one SMRAM range")
        offset = address - smram.base
        smram.data[offset:offset + len(data)] = np.frombuffer(data, dtype=np.uint8)
        if smram.overlay is not None:
            self.memory.forget_code(address, len(data))

    # -- the control register ----------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return bool(self.register & G_SMRAME)

    @property
    def open(self) -> bool:
        return bool(self.register & D_OPEN) and not self.register & D_CLS

    @property
    def locked(self) -> bool:
        return bool(self.register & D_LCK)

    @property
    def state(self) -> str:
        return "locked" if self.locked else "open" if self.open else "closed"

    def write_register(self, value: int) -> None:
        """A write to the SMRAM register.  Once D_LCK is set, D_OPEN reads 0 and D_OPEN,
        D_LCK and G_SMRAME no longer change (until reset)."""
        value = (value & (D_OPEN | D_CLS | D_LCK | G_SMRAME)) | C_BASE_SEG
        if self.locked:
            value = (value & D_CLS) | (self.register & (D_LCK | G_SMRAME)) | C_BASE_SEG
        if value & D_LCK:
            value &= ~D_OPEN
        self.register = value
        self.update()

    def set_state(self, state: str) -> None:
        """API/CLI control: "open", "closed" or "locked" (enables SMRAM as firmware would)."""
        bits = {"open": G_SMRAME | D_OPEN, "closed": G_SMRAME, "locked": G_SMRAME | D_LCK}
        if state not in bits:
            raise ValueError(f"SMRAM state must be open, closed or locked, not {state!r}")
        if self.locked and state != "locked":
            raise ValueError("SMRAM is locked until reset")
        self.write_register(bits[state])

    # -- views -------------------------------------------------------------------------------
    def visible(self, smram: SmramRange) -> bool:
        if smram.gated and not self.enabled:
            return False
        return self.in_smm or self.open

    def set_smm(self, in_smm: bool, touching: tuple[int, int] | None = None) -> None:
        """Enter or leave the SMM view; ``touching``: an address range the CPU is about to
        access (SMBASE's entry point and save area on SMI entry), mapped at once."""
        self.in_smm = in_smm
        self.update(touching)

    def update(self, touching: tuple[int, int] | None = None) -> None:
        """Unmap each range whose mapping shows the wrong view; map the right one only where
        ``touching`` needs it (the rest waits for ``reveal``)."""
        for smram in self.ranges:
            if not self._shows(smram, self.visible(smram)):
                self._hide(smram)
                if touching is not None and touching[0] < smram.end and smram.base < touching[1]:
                    self._show(smram)

    def reveal(self, address: int, size: int = 1) -> None:
        """Map the right view of every hidden range that [address, address + size) touches
        (the CPU or ringminus is about to access it)."""
        for smram in self.ranges:
            if smram.hidden and address < smram.end and smram.base < address + size:
                self._show(smram)

    def hidden_at(self, address: int) -> bool:
        return any(smram.hidden and smram.base <= address < smram.end for smram in self.ranges)

    def _ram_behind(self, smram: SmramRange) -> bool:
        """The normal view of the range is RAM rather than nothing."""
        return self.memory.ram_offset(smram.base, smram.end - smram.base) is not None

    def _shows(self, smram: SmramRange, wanted: bool) -> bool:
        if smram.hidden:                 # nothing mapped: right only for an empty normal view
            return not wanted and not self._ram_behind(smram)
        return (smram.overlay is not None) == wanted

    def _hide(self, smram: SmramRange) -> None:
        if smram.hidden:
            return
        if smram.overlay is not None:
            self.memory.remove_overlay(smram.overlay, restore_ram=False)
            smram.overlay = None
        else:
            self.memory.unmap_ram(smram.base, smram.size)
        self._set_hidden(smram, True)

    def _show(self, smram: SmramRange) -> None:
        """Map the view the CPU must see now over a hidden range."""
        if self.visible(smram):
            smram.overlay = self.memory.add_overlay(f"smram@{smram.base:#x}", smram.base, smram.data, over_ram=False)
        else:
            self.memory.map_ram(smram.base, smram.size)
        self.swaps += 1
        self._set_hidden(smram, False)

    def _set_hidden(self, smram: SmramRange, hidden: bool) -> None:
        smram.hidden = hidden
        self.memory.hidden = [(r.base, r.end) for r in self.ranges if r.hidden]
