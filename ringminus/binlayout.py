"""Binary layouts declared, then verified: numpy structured dtypes with explicit offsets,
checked at import against a (field, offset) table as a manual prints it — the Python
counterpart of KVM's ``CHECK_SMRAM64_OFFSET`` list (DESIGN.md §4).  Used for the SMRAM
state-save maps (smm/layouts.py) and the VMCB (intercepts/vmcb.py)."""
from __future__ import annotations

import struct

import numpy as np

U1, U2, U4, U8 = "u1", "<u2", "<u4", "<u8"                                # little-endian field formats
STRUCT_CODES = {"u1": "B", "u2": "H", "u4": "I", "u8": "Q", "i8": "q"}     # numpy kind+size -> struct


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


def field_span(layout: np.dtype, path: str) -> tuple[int, np.dtype]:
    """(offset, dtype) of a scalar field named "save.cs.base" (records nest) in ``layout``."""
    offset, dtype = 0, layout
    for part in path.split("."):
        if dtype.fields is None or part not in dtype.fields:
            raise KeyError(path)
        dtype, at = dtype.fields[part][:2]
        offset += at
    return offset, dtype


def _spans(layout: np.dtype, paths: list[str]) -> list[tuple[int, int, str, int, str]]:
    """(offset, size, struct code, value count, path) of each field, in offset order.  A byte
    array is one ``bytes`` value; other arrays give one value per element."""
    out = []
    for offset, dtype, path in sorted((*field_span(layout, path), path) for path in paths):
        element, shape = dtype.subdtype if dtype.subdtype else (dtype, ())
        count = int(np.prod(shape))
        if shape and element.itemsize == 1:
            out.append((offset, dtype.itemsize, f"{count}s", 1, path))
        else:
            out.append((offset, dtype.itemsize, f"{count}{STRUCT_CODES[element.str[1:]]}", count, path))
    return out


def field_runs(layout: np.dtype, paths: list[str]) -> list[tuple[int, struct.Struct, int]]:
    """The fields of ``paths`` grouped into runs of adjacent fields: (offset, struct, how
    many values), in offset order.  Packing each run into a buffer writes exactly the
    fields' bytes and leaves every byte between them alone."""
    runs: list[list] = []
    for offset, size, code, count, _ in _spans(layout, paths):
        if runs and runs[-1][0] + runs[-1][1] == offset:
            runs[-1][1] += size
            runs[-1][2] += code
            runs[-1][3] += count
        else:
            runs.append([offset, size, f"<{code}", count])
    return [(offset, struct.Struct(fmt), count) for offset, _, fmt, count in runs]


def fields_struct(layout: np.dtype, paths: list[str]) -> tuple[struct.Struct, int, tuple[str, ...]]:
    """One little-endian struct over the bytes from the first to the last of ``paths`` (scalar
    fields), every other byte padding: (the struct, where it starts in ``layout``, the paths in
    the order its values come; a byte array is one ``bytes`` value, an array of wider elements
    one value per element, its path repeated).
    A world switch moves many scattered fields in one call."""
    spans = _spans(layout, paths)
    fmt, at, order = "<", spans[0][0], []
    for offset, size, code, count, path in spans:
        if offset < at:
            raise AssertionError(f"{layout}: fields overlap at {offset:#x}")
        fmt += f"{offset - at}x{code}"
        order += [path] * count
        at = offset + size
    return struct.Struct(fmt), spans[0][0], tuple(order)
