"""What VMLOAD loads and VMSAVE saves (APM Vol. 3 "VMLOAD", "VMSAVE"): FS, GS, TR and LDTR
with their hidden state, KernelGSbase, STAR, LSTAR, CSTAR, SFMASK and the SYSENTER MSRs —
moved between the VMCB's save area and the CPU's state in one struct each way, as the
world-switch codecs are (world.SaveAreaCodec): a hypervisor's entry path runs them on every
round trip.  Bases load canonical (KernelGSbase too); SYSENTER_CS keeps 16 bits, as QEMU's
WRMSR does.  The segment caches touched do not enter QEMU's hflags (only CS, SS, DS and ES
do), so none are derived again."""
from __future__ import annotations

import struct

from ..arch.segments import canonical, flags_from_vmcb_attrib, vmcb_attrib_from_flags
from ..binlayout import field_runs, fields_struct
from ..emulator import ucinternals as uci
from ..intercepts.vmcb import SAVE_AREA_OFFSET, VMCB_SAVE

SEGMENTS = ("fs", "gs", "tr", "ldtr")
MSRS = (("kernel_gs_base", 0xC000_0102), ("star", 0xC000_0081), ("lstar", 0xC000_0082),
        ("cstar", 0xC000_0083), ("sfmask", 0xC000_0084), ("sysenter_cs", 0x174),
        ("sysenter_esp", 0x175), ("sysenter_eip", 0x176))
CANONICAL_MSRS = frozenset({0xC000_0102})          # KernelGSbase: an address, loaded canonical
# A segment cache in the context: selector, base, limit, flags (ucinternals.Context.segment_slot).
_SLOT_FIELDS = (("selector", 0, "I"), ("base", 8, "Q"), ("limit", 16, "I"), ("flags", 20, "I"))
_VMCB_PART = {"selector": "selector", "base": "base", "limit": "limit", "flags": "attrib"}
_LOAD = {"selector": "{} & 0xFFFF", "base": "_canonical({})", "limit": "{}", "flags": "_flags({})"}


class VmloadCodec:
    """``load(view, values)``: the VMCB fields (``values``, in ``order``) into a context's
    bytes; ``save(view)``: those fields from a context's bytes.  ``vmcb`` is the struct over
    the save area from the first field to the last (at ``vmcb_at`` in the VMCB), ``runs``
    its fields' runs, for VMSAVE to leave the bytes between them alone.  ``source`` shows the
    two functions."""

    def __init__(self):
        paths = [f"{name}.{part}" for name in SEGMENTS for part in ("selector", "attrib", "limit", "base")] + \
            [field for field, _ in MSRS]
        self.vmcb, start, self.order = fields_struct(VMCB_SAVE, paths)
        self.vmcb_at = SAVE_AREA_OFFSET + start
        self.runs = [(offset - start, run, count) for offset, run, count in field_runs(VMCB_SAVE, paths)]
        at = {path: self.order.index(path) for path in paths}
        context = []                    # (offset in the context, struct code, load expression, VMCB path)
        for name in SEGMENTS:
            slot = uci.SEGS + uci.SEGMENT_STRIDE * uci.SEGMENT_SLOT[name]
            for part, offset, code in _SLOT_FIELDS:
                path = f"{name}.{_VMCB_PART[part]}"
                context.append((slot + offset, code, _LOAD[part].format(f"v[{at[path]}]"), path))
        for field, msr in MSRS:
            offset, width, mask = uci.CONTEXT_MSRS[msr]
            load = f"_canonical(v[{at[field]}])" if msr in CANONICAL_MSRS else \
                f"v[{at[field]}]" if mask == uci.MASK64 else f"v[{at[field]}] & {mask:#x}"
            context.append((offset, "I" if width == 4 else "Q", load, field))
        context.sort()
        # Runs of fields the context holds side by side (4 bytes of alignment padding at most
        # between two: packing writes the pad bytes, so a run never spans other fields).
        runs: list[list] = []
        for offset, code, load, path in context:
            if runs and offset - runs[-1][1] <= 4:
                runs[-1][2] += f"{offset - runs[-1][1]}x{code}"
            else:
                runs.append([offset, offset, f"<{code}", []])
            runs[-1][1] = offset + struct.calcsize(code)
            runs[-1][3].append((load, path))
        namespace = {"_canonical": canonical, "_flags": flags_from_vmcb_attrib, "_attrib": vmcb_attrib_from_flags}
        loads, unpacks, where = [], [], {}
        for k, (start, _end, fmt, fields) in enumerate(runs):
            namespace[f"_pack{k}"], namespace[f"_unpack{k}"] = struct.Struct(fmt).pack_into, struct.Struct(fmt).unpack_from
            loads.append(f"    _pack{k}(view, {start}, {', '.join(load for load, _ in fields)})")
            unpacks.append(f"_unpack{k}(view, {start})")
            where.update((path, len(where)) for _, path in fields)
        saves = [f"_attrib(c[{where[path]}])" if path.endswith(".attrib") else f"c[{where[path]}]" for path in self.order]
        self.source = ("def load(view, v):\n" + "\n".join(loads) + "\n"
                       f"def save(view):\n    c = {' + '.join(unpacks)}\n    return ({', '.join(saves)},)\n")
        exec(compile(self.source, "<VMLOAD/VMSAVE codec>", "exec"), namespace)
        self.load, self.save = namespace["load"], namespace["save"]


CODEC = VmloadCodec()
