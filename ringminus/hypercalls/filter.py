"""The hypercall filter: which ranges of hypercall numbers ringminus handles itself, which it
denies, and which it forwards to the user — KVM arm64's SMCCC filter (semantics.md §D.1)
carried over to VMMCALL/VMCALL (§D.3 point 5).

Ranges are inclusive [base, base + count − 1] over 64-bit hypercall numbers (outside 64-bit
mode the number is truncated to 32 bits before the lookup, so the part of a range above
0xFFFF_FFFF is reachable from 64-bit mode only).  They never wrap, never overlap, cannot be
changed or removed once added, and cannot be added once the machine has run; a number no
range covers is ``handle``.  Unlike arm64 nothing is reserved: the KVM_HC_* numbers ringminus
implements may be denied or forwarded like any other.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from enum import IntEnum
from typing import Callable

NUMBER_SPACE = 1 << 64          # hypercall numbers are RAX: 64 bits in 64-bit mode


class HypercallAction(IntEnum):
    """What happens to a call (the values of arm64's KVM_SMCCC_FILTER_* actions)."""
    HANDLE = 0      # ringminus's built-in KVM_HC_* behaviour; unknown numbers get −KVM_ENOSYS
    DENY = 1        # RAX = −KVM_ENOSYS, RIP past the instruction
    FORWARD = 2     # the user handler answers, or the run stops with reason ``hypercall``

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, value: "HypercallAction | int | str") -> "HypercallAction":
        """The action itself, its number, or its name (``handle``, ``deny``, ``forward``)."""
        if isinstance(value, str):
            try:
                return cls[value.strip().upper()]
            except KeyError:
                pass
        elif isinstance(value, int) and not isinstance(value, bool):
            try:
                return cls(value)
            except ValueError:
                pass
        raise InvalidHypercallRangeError(f"unknown hypercall action {value!r} (handle, deny or forward)")


class HypercallFilterError(ValueError):
    """A filter change the rules forbid (arm64's EINVAL, EEXIST and EBUSY cases, §D.1)."""
    errno_name = ""


class InvalidHypercallRangeError(HypercallFilterError):
    """EINVAL: count < 1, a range that wraps past 2**64 − 1, a base that is not a 64-bit
    number, or an unknown action."""
    errno_name = "EINVAL"


class OverlappingHypercallRangeError(HypercallFilterError):
    """EEXIST: the range overlaps one already in the filter (ranges cannot be changed)."""
    errno_name = "EEXIST"


class HypercallFilterBusyError(HypercallFilterError):
    """EBUSY: the machine has already run; the filter is fixed from then on."""
    errno_name = "EBUSY"


@dataclass(frozen=True)
class HypercallRange:
    base: int
    count: int
    action: HypercallAction

    @property
    def end(self) -> int:
        """The last number in the range (inclusive)."""
        return self.base + self.count - 1

    def __contains__(self, nr: int) -> bool:
        return self.base <= nr <= self.end

    def __str__(self) -> str:
        return f"{self.base:#x}-{self.end:#x}={self.action.label}"


def _is_number(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class HypercallFilter:
    """The range table, plus the user handler that ``forward`` calls go to.

    ``handler(call)`` receives a ``Hypercall`` record and returns the value for RAX, or None
    to decline (RAX = −KVM_ENOSYS).  Without a handler a forwarded call ends the run with
    reason ``hypercall``; ``Machine.resume(ret=…)`` completes it.
    """

    def __init__(self, has_run: Callable[[], bool] = lambda: False):
        self._has_run = has_run
        self._ranges: list[HypercallRange] = []     # sorted by base, disjoint
        self._bases: list[int] = []
        self.handler: Callable | None = None

    @property
    def ranges(self) -> tuple[HypercallRange, ...]:
        return tuple(self._ranges)

    def add(self, base: int, count: int, action: "HypercallAction | int | str") -> HypercallRange:
        """Add [base, base + count − 1] with ``action``.  Checked in arm64's order (§D.1):
        the range (EINVAL), the action (EINVAL), the machine has run (EBUSY), overlap (EEXIST)."""
        if not _is_number(base) or not 0 <= base < NUMBER_SPACE:
            raise InvalidHypercallRangeError(f"hypercall range base {base!r} is not a number in 0-0xffffffffffffffff")
        if not _is_number(count) or count < 1:
            raise InvalidHypercallRangeError(f"hypercall range at {base:#x} has count {count!r}; it must be at least 1")
        if base + count > NUMBER_SPACE:
            raise InvalidHypercallRangeError(f"hypercall range {base:#x} + {count:#x} wraps past 0xffffffffffffffff")
        entry = HypercallRange(base, count, HypercallAction.parse(action))
        if self._has_run():
            raise HypercallFilterBusyError(f"hypercall range {entry} cannot be added: the machine has already run")
        at = bisect.bisect_left(self._bases, base)
        for neighbour in self._ranges[max(at - 1, 0):at + 1]:
            if neighbour.base <= entry.end and entry.base <= neighbour.end:
                raise OverlappingHypercallRangeError(f"hypercall range {entry} overlaps {neighbour}")
        self._ranges.insert(at, entry)
        self._bases.insert(at, base)
        return entry

    def action(self, nr: int) -> HypercallAction:
        """The action for hypercall number ``nr`` (``handle`` where no range covers it)."""
        at = bisect.bisect_right(self._bases, nr) - 1
        if at >= 0 and nr in self._ranges[at]:
            return self._ranges[at].action
        return HypercallAction.HANDLE

    def __len__(self) -> int:
        return len(self._ranges)
