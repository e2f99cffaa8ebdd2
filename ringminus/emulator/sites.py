"""Single-address code hooks armed where a flagged instruction can start.

Unicorn runs everything natively; ringminus sees an instruction *before* it executes only
through a UC_HOOK_CODE hook at its address, which costs nothing until that address runs
(reference/unicorn.md §1).  Sites are found by scanning code ringminus places in memory for the
flagged opcode bytes; each occurrence is armed, and so is every start that reaches it over
prefix bytes.  A site that turns out not to start a flagged instruction only costs a callback
when execution starts an instruction there.

Sites are found in physical memory and armed at the linear addresses that map it
(``remap`` after the address space changes).  A write hook on every scanned RAM range costs
nothing until the guest writes there; a write that may create a flagged instruction is
rescanned inside the hook, with the bytes as they will be.  The new hooks need no cache
flush: the write itself makes Unicorn retranslate any block over those bytes.  (The hook
must never stop the emulator: a stop from a memory hook leaves RIP at the instruction, whose
write has already happened, so it would run twice.)
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from unicorn import UC_HOOK_CODE, UC_HOOK_MEM_WRITE, Uc

from ..decode.prefixes import LEGACY_PREFIXES, MAX_INSTRUCTION_LENGTH, is_prefix

PAGE = 0x1000
_REX = frozenset(range(0x40, 0x50))


def _identity(physical_page: int) -> list[int]:
    return [physical_page]


class CodeSites:
    def __init__(self, uc: Uc, callback: Callable, opcodes: frozenset[bytes],
                 read: Callable[[int, int], bytes | None]):
        self._uc = uc
        self._callback = callback
        self._read = read
        self._set_opcodes(opcodes)
        self._regions: list[tuple[int, int]] = []
        self._linear_pages: Callable[[int], list[int]] = _identity
        self.physical: set[int] = set()             # candidate starts, physical addresses
        self.armed: dict[int, int] = {}             # linear address -> hook
        self.rescans = 0

    def _set_opcodes(self, opcodes: frozenset[bytes]) -> None:
        self.opcodes = frozenset(opcodes)
        self._patterns = sorted(opcodes)
        self._interesting = frozenset(b for pattern in opcodes for b in pattern) | LEGACY_PREFIXES | _REX

    def _occurrences(self, code: np.ndarray) -> list[int]:
        """Offsets where any opcode pattern starts."""
        hits = np.zeros(len(code), dtype=bool)
        for pattern in self._patterns:
            if len(pattern) > len(code):
                continue
            match = code[:len(code) - len(pattern) + 1] == pattern[0]
            for i, byte in enumerate(pattern[1:], 1):
                match &= code[i:len(code) - len(pattern) + 1 + i] == byte
            hits[:len(match)] |= match
        return np.flatnonzero(hits).tolist()

    def set_opcodes(self, opcodes: frozenset[bytes]) -> None:
        """Flag another set of opcode bytes and rescan every region scanned so far."""
        self._set_opcodes(opcodes)
        self.rescan()

    def rescan(self) -> None:
        """Scan every region scanned so far again, as its bytes are now."""
        for address, size in self._regions:
            data = self._read(address, size)
            if data is not None:
                self._scan(address, np.frombuffer(data, dtype=np.uint8))

    def scan(self, address: int, data: bytes | np.ndarray, watch: bool = True) -> int:
        """Arm every possible start of a flagged instruction in ``data`` placed at physical
        ``address``; with ``watch``, rescan when the guest writes there.  Returns how many
        new linear sites were armed."""
        code = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray)) else data
        self._regions.append((address, len(code)))
        if watch and len(code):
            first, last = address & ~(PAGE - 1), (address + len(code) - 1) | (PAGE - 1)
            self._uc.hook_add(UC_HOOK_MEM_WRITE, self._on_write, begin=first, end=last)
        return self._scan(address, code)

    def _scan(self, address: int, code: np.ndarray, flush: bool = True) -> int:
        before = len(self.armed)
        for offset in self._occurrences(code):
            self._add(address + offset, flush)
            start = offset
            # Walk back over bytes that could be prefixes of this instruction (REX included:
            # in 16/32-bit code the site then simply decodes as something else).
            while start > 0 and offset - start < MAX_INSTRUCTION_LENGTH - 1 and is_prefix(int(code[start - 1]), 64):
                start -= 1
                self._add(address + start, flush)
        return len(self.armed) - before

    def _add(self, physical: int, flush: bool = True) -> None:
        self.physical.add(physical)
        for page in self._linear_pages(physical & ~(PAGE - 1)):
            self.arm(page | (physical & (PAGE - 1)), flush)

    def remap(self, linear_pages: Callable[[int], list[int]] | None) -> None:
        """The address space changed: arm every site at the linear addresses that now map it
        (``linear_pages(physical_page)``; None = identity, paging off)."""
        self._linear_pages = linear_pages or _identity
        for physical in list(self.physical):
            self._add(physical)

    # Unicorn calls this before a guest write to a scanned page lands.
    def _on_write(self, uc: Uc, access: int, address: int, size: int, value: int, _data) -> None:
        written = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        if not self._interesting.intersection(written):
            return
        start = max(address - MAX_INSTRUCTION_LENGTH, 0)
        window = self._read(start, address + size + MAX_INSTRUCTION_LENGTH - start)
        if window is None:
            return
        window = bytearray(window)
        window[address - start:address - start + size] = written
        self.rescans += 1
        self._scan(start, np.frombuffer(bytes(window), dtype=np.uint8), flush=False)

    def arm(self, address: int, flush: bool = True) -> None:
        if address not in self.armed:
            self.armed[address] = self._uc.hook_add(UC_HOOK_CODE, self._callback, begin=address, end=address)
            if flush:       # a block translated before the hook existed would run without it
                self._uc.ctl_remove_cache(address, address + 1)
