"""Binary layouts declared, then verified: numpy structured dtypes with explicit offsets,
checked at import against a (field, offset) table as a manual prints it — the Python
counterpart of KVM's ``CHECK_SMRAM64_OFFSET`` list (DESIGN.md §4).  Used for the SMRAM
state-save maps (smm/layouts.py) and the VMCB (intercepts/vmcb.py)."""
from __future__ import annotations

import numpy as np


def structured(rows: list[tuple[str, object, int]], size: int) -> np.dtype:
    """A little-endian structured dtype of ``size`` bytes from (name, format, offset) rows;
    bytes no row covers are reserved."""
    names, formats, offsets = zip(*rows)
    return np.dtype({"names": list(names), "formats": list(formats), "offsets": list(offsets),
                     "itemsize": size})


def verify(layout: np.dtype, offsets: list[tuple[str, int]], size: int, origin: int = 0,
           label: str = "") -> None:
    """Check ``layout`` against its offset table, whose offsets count from ``origin`` (the
    manual's numbering; ``label`` names that origin in messages): ``size`` bytes, the same
    fields in both, every offset equal, every field inside, no two fields overlapping.
    Raises AssertionError naming the first field at fault."""
    if layout.itemsize != size:
        raise AssertionError(f"itemsize {layout.itemsize:#x}, expected {size:#x}")
    listed = [name for name, _ in offsets]
    for name in listed:
        if listed.count(name) > 1:
            raise AssertionError(f"{name}: listed twice in the offset table")
    for name in layout.names:
        if name not in listed:
            raise AssertionError(f"{name}: field missing from the offset table")
    for name, expected in offsets:
        if name not in layout.fields:
            raise AssertionError(f"{name}: no such field in the dtype")
        actual = origin + layout.fields[name][1]
        if actual != expected:
            raise AssertionError(f"{name}: at {label}{actual:#06x}, expected {label}{expected:#06x}")
    spans = sorted((off, off + fmt.itemsize, name) for name, (fmt, off, *_) in layout.fields.items())
    for start, end, name in spans:
        if start < 0 or end > size:
            raise AssertionError(f"{name}: extends outside the {size:#x}-byte layout")
    for (_, end, name), (start, _, following) in zip(spans, spans[1:]):
        if start < end:
            raise AssertionError(f"{name}: overlaps {following}")
