"""Single-address code hooks armed where a flagged instruction can start.

Unicorn runs everything natively; ringminus sees an instruction *before* it executes only
through a UC_HOOK_CODE hook at its address, which costs nothing until that address runs
(reference/unicorn.md §1).  Sites are found by scanning code ringminus places in memory for the
flagged opcode bytes; each occurrence is armed, and so is every start that reaches it over
prefix bytes.  A site that turns out not to start a flagged instruction only costs a callback
when execution starts an instruction there.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from unicorn import UC_HOOK_CODE, Uc

from ..decode.prefixes import MAX_INSTRUCTION_LENGTH, is_prefix


class CodeSites:
    def __init__(self, uc: Uc, callback: Callable, opcodes: frozenset[int],
                 read: Callable[[int, int], bytes]):
        self._uc = uc
        self._callback = callback
        self._read = read
        self._opcodes = np.array(sorted(opcodes), dtype=np.uint8)
        self._regions: list[tuple[int, int]] = []
        self.armed: dict[int, int] = {}

    def set_opcodes(self, opcodes: frozenset[int]) -> None:
        """Flag another set of opcode bytes and rescan every region scanned so far."""
        self._opcodes = np.array(sorted(opcodes), dtype=np.uint8)
        for address, size in self._regions:
            self._scan(address, np.frombuffer(self._read(address, size), dtype=np.uint8))

    def scan(self, address: int, data: bytes | np.ndarray) -> int:
        """Arm every possible start of a flagged instruction in ``data`` placed at
        ``address``; returns how many new sites were armed."""
        code = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray)) else data
        self._regions.append((address, len(code)))
        return self._scan(address, code)

    def _scan(self, address: int, code: np.ndarray) -> int:
        before = len(self.armed)
        for offset in np.flatnonzero(np.isin(code, self._opcodes)).tolist():
            self.arm(address + offset)
            start = offset
            # Walk back over bytes that could be prefixes of this instruction (REX included:
            # in 16/32-bit code the site then simply decodes as something else).
            while start > 0 and offset - start < MAX_INSTRUCTION_LENGTH - 1 and is_prefix(int(code[start - 1]), 64):
                start -= 1
                self.arm(address + start)
        return len(self.armed) - before

    def arm(self, address: int) -> None:
        if address not in self.armed:
            self.armed[address] = self._uc.hook_add(UC_HOOK_CODE, self._callback, begin=address, end=address)
            # A block translated before the hook existed would run without it.
            self._uc.ctl_remove_cache(address, address + 1)
