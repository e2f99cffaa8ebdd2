"""VMRUN and #VMEXIT: the world switch between a guest hypervisor (L1) and its guest (L2).

VMRUN (APM §15.5, Vol. 3 "VMRUN"): save the host state to the VM_HSAVE_PA page, check the
VMCB (§B.5; a failure is a #VMEXIT with VMEXIT_INVALID), load the guest state, set GIF, apply
TLB_CONTROL and V_INTR, inject EVENTINJ, and run L2 under the VMCB's intercepts.
#VMEXIT (§B.6): write the guest state and the exit back into the VMCB, clear GIF, reload the
host state and resume L1 after its VMRUN.

Where the host state lives is the profile's ``host_save_in_memory``: in the HSAVE page, in
the VMCB save-area layout (offset 0x400), written by VMRUN and read back by #VMEXIT (APM,
QEMU; the APM leaves the format to the implementation), or kept by the CPU (KVM's vmcb01) and
written to the page only when an SMI arrives in guest mode.  VMRUN saves and #VMEXIT
reloads only what the APM lists (ES/CS/SS/DS, GDTR/IDTR, CR0/CR3/CR4, EFER, RFLAGS, RIP, RSP,
RAX); FS, GS, TR, LDTR and the syscall MSRs belong to VMLOAD/VMSAVE.

TLB: ringminus has one untagged TLB.  ASIDs keep their meaning for INVLPGA and the checks;
VMRUN flushes when TLB_CONTROL asks for any flush and whenever the translation regime changes
(CR0/CR3/CR4/EFER), which covers every case where a tagged TLB would differ; with nested
paging (npt.py) every VMRUN and #VMEXIT flushes, as KVM's nested transitions do.
"""
from __future__ import annotations

import operator
import struct
from typing import TYPE_CHECKING

import numpy as np

from ..binlayout import field_runs, field_span, fields_struct
from ..emulator import ucinternals as uci
from ..emulator.cpu import ArchState, At
from ..arch.control import CR0_PE, CR0_PG, CR4_PAE, DR6_BS, EFER_LME, RFLAGS_IF, RFLAGS_RF, RFLAGS_TF, RFLAGS_VM
from ..arch.exceptions import Vector
from ..emulator.delivery import Event, EventKind
from ..emulator.lbr import DEBUGCTL_DEFINED
from ..emulator.memory import MissingMemory, UnbackedMemory
from ..emulator.paging import pae_pdpte_problem
from ..emulator.plugins import HookContext, OnExit
from ..emulator.result import StopReason
from ..intercepts.checker import VmExit
from ..intercepts.guest import record_exit
from ..intercepts.plugin import enter_guest, leave_guest
from ..intercepts.controls import IOPM_BYTES, MSRPM_BYTES, InterceptControls
from ..intercepts.exitinfo import PauseFilter
from ..arch.exitcodes import ExitCode
from ..intercepts.vmcb import (EVENT_VALID, GUEST_INTERRUPT_MASK, INTERCEPT_WORDS, INTERRUPT_SHADOW,
                               LBR_VIRTUALIZATION_ENABLE, MAP_ADDRESS_MASK, NP_ENABLE, V_NMI_ENABLE, V_NMI_MASK,
                               SAVE_AREA_OFFSET, V_GIF_ENABLE, V_INTR_MASKING, V_TPR_MASK, VMCB_CONTROL, VMCB_SAVE, EventInfo,
                               EventType, TlbControl, VmrunCandidate, first_failure)
from ..arch.segments import canonical, flags_from_vmcb_attrib, vmcb_attrib_from_flags
from ..arch.models import (LBR_VIRTUALIZATION, MODELS, NESTED_PAGING, PAUSE_FILTER, PAUSE_FILTER_THRESHOLD, VGIF,
                           VNMI, max_physical_bits)
from ..arch.msrs import MSR_PAT
from . import npt

if TYPE_CHECKING:
    from ..machine import Machine

VMEXIT_INVALID = -1
VMRUN_SEGMENTS = ("es", "cs", "ss", "ds")           # VMRUN loads, #VMEXIT saves and reloads these
TABLES = ("gdtr", "idtr")
# Registers VMRUN loads from the VMCB and #VMEXIT writes back (with the segments, tables, CPL).
GUEST_REGISTERS = ("efer", "cr0", "cr2", "cr3", "cr4", "dr6", "dr7", "rflags", "rip", "rsp", "rax")
HOST_DR7 = 0x400                                    # #VMEXIT disables every breakpoint
# EVENTINJ TYPE -> how it is delivered
INJECTED_KIND = {EventType.INTR: EventKind.EXTERNAL, EventType.NMI: EventKind.NMI,
                 EventType.EXCEPTION: EventKind.EXCEPTION, EventType.SOFTWARE_INT: EventKind.SOFTWARE_INTERRUPT}


class VmcbMemoryError(MissingMemory):
    """A VMCB, the HSAVE page or a permission map is not backed by RAM."""


# -- the save-area codec ------------------------------------------------------------------------
# Each save-area field a world switch moves: (field, the ArchState index it comes from, the
# expression it is stored as, the statement that loads it back from value ``{v}``).  Compiled
# — as the SMM map codecs are — into straight-line functions over the fields' structs.

def _codec_rows() -> list[tuple[str, int, str, str]]:
    rows = []
    for name in VMRUN_SEGMENTS:
        selector, base, limit, flags = (getattr(At, f"{name}_{part}") for part in ("selector", "base", "limit", "flags"))
        rows += [(f"{name}.selector", selector, f"s[{selector}] & 0xFFFF", f"s[{selector}] = {{v}}"),
                 (f"{name}.attrib", flags, f"_attrib(s[{flags}])", f"s[{flags}] = _flags({{v}})"),
                 (f"{name}.limit", limit, f"s[{limit}] & 0xFFFFFFFF", f"s[{limit}] = {{v}}"),
                 (f"{name}.base", base, f"s[{base}]", f"s[{base}] = _canonical({{v}})")]
    for name in TABLES:
        base, limit = getattr(At, f"{name}_base"), getattr(At, f"{name}_limit")
        rows += [(f"{name}.limit", limit, f"s[{limit}] & 0xFFFF", f"s[{limit}] = {{v}} & 0xFFFF"),
                 (f"{name}.base", base, f"s[{base}]", f"s[{base}] = {{v}}")]
    rows.append(("cpl", At.hflags, f"s[{At.hflags}] & 3", f"s[{At.hflags}] = s[{At.hflags}] & ~3 | {{v}} & 3"))
    rows += [(name, getattr(At, name), f"s[{getattr(At, name)}]", f"s[{getattr(At, name)}] = {{v}}")
             for name in GUEST_REGISTERS]
    return rows


class SaveAreaCodec:
    """``values(s)``: the save-area field values of a state, in ``order``; ``restore_host(s,
    h)``: the host's registers (the save-area fields but CR2, DR6, DR7 and the CPL) copied
    from state ``h`` into state ``s``; ``store(s)``: the
    bytes they make (from the first field on, reserved bytes zero); ``store_into(b, at, s)``:
    the same fields packed into buffer ``b`` whose
    byte ``at`` is the first, every other byte left alone; ``load_guest(s, a)`` /
    ``load_host(s, a)``: a state from the unpacked fields ``a`` — all of them, or the host's
    (not CR2, DR6, DR7).  ``source`` shows them."""

    def __init__(self):
        rows = {path: (store, load) for path, _, store, load in _codec_rows()}
        self.struct, self.start, order = fields_struct(VMCB_SAVE, list(rows))
        host = {path for path in rows if path.split(".")[0] not in ("cr2", "dr6", "dr7")}
        namespace = {"_pack": self.struct.pack, "_attrib": vmcb_attrib_from_flags, "_flags": flags_from_vmcb_attrib,
                     "_canonical": canonical}
        lines = [f"def values(s):\n    return ({', '.join(rows[path][0] for path in order)},)",
                 f"def store(s):\n    return _pack({', '.join(rows[path][0] for path in order)})",
                 "def store_into(b, at, s):"]
        values = iter(order)
        for i, (offset, run, count) in enumerate(field_runs(VMCB_SAVE, list(rows))):
            namespace[f"_run{i}"] = run.pack_into
            lines.append(f"    _run{i}(b, at + {offset - self.start}, "
                         f"{', '.join(rows[next(values)][0] for _ in range(count))})")
        copied = [index for path, index, _, _ in _codec_rows() if path in host and path != "cpl"]
        lines.append("def restore_host(s, h):\n    " + "\n    ".join(f"s[{i}] = h[{i}]" for i in copied))
        for name, wanted in (("load_guest", set(rows)), ("load_host", host)):
            body = [rows[path][1].format(v=f"a[{k}]") for k, path in enumerate(order) if path in wanted]
            lines.append(f"def {name}(s, a):\n    " + "\n    ".join(body))
        self.source = "\n".join(lines) + "\n"
        exec(compile(self.source, "<VMCB save-area codec>", "exec"), namespace)
        self.values, self.store, self.store_into = namespace["values"], namespace["store"], namespace["store_into"]
        self.load_guest, self.load_host = namespace["load_guest"], namespace["load_host"]
        self.restore_host = namespace["restore_host"]
        self.order = order


SAVE_CODEC = SaveAreaCodec()


class ControlFields:
    """Control-area fields read together, by name, through one struct, and written run by
    run (the bytes between them untouched).  The intercept vector's six words read as one
    integer (bit n = exit code n)."""

    def __init__(self, names: list[str]):
        self.struct, self.start, self.order = fields_struct(VMCB_CONTROL, names)
        self.names = [path for path in self.order if path != "intercepts"]
        self._pick = operator.itemgetter(*[k for k, path in enumerate(self.order) if path != "intercepts"])
        self._vector = (field_span(VMCB_CONTROL, "intercepts")[0] - self.start) if "intercepts" in names else None
        self._runs = []                             # (offset from start, pack_into, first value, end)
        first = 0
        for offset, run, count in field_runs(VMCB_CONTROL, names):
            self._runs.append((offset - self.start, run.pack_into, first, first + count))
            first += count

    def read(self, machine: "Machine", vmcb_pa: int) -> dict[str, int]:
        return self.parse(_read(machine, vmcb_pa + self.start, self.struct.size))

    def parse(self, raw: bytes, at: int = 0) -> dict[str, int]:
        """The fields from ``raw``, whose byte ``at`` is the struct's first."""
        fields = dict(zip(self.names, self._pick(self.struct.unpack_from(raw, at))))
        if self._vector is not None:
            vector = at + self._vector
            fields["intercepts"] = int.from_bytes(raw[vector:vector + 4 * INTERCEPT_WORDS], "little")
        return fields

    def pack_into(self, buffer: bytearray, at: int, values: tuple) -> None:
        """``values`` (in ``order``) into ``buffer``, whose byte ``at`` is the struct's first;
        the bytes between the fields are left alone."""
        for offset, pack_into, first, end in self._runs:
            pack_into(buffer, at + offset, *values[first:end])


VMRUN_CONTROLS = ControlFields(["intercepts", "iopm_base_pa", "msrpm_base_pa", "tsc_offset", "guest_asid",
                                "tlb_control", "int_ctl", "v_intr_vector", "interrupt_state", "nested_control",
                                "eventinj", "n_cr3", "virt_ext", "pause_filter_count", "pause_filter_threshold"])
EXIT_FIELDS = ("int_ctl", "interrupt_state", "exitcode", "exitinfo1", "exitinfo2", "exitintinfo", "eventinj",
               "nrip", "guest_instruction_count", "guest_instruction_bytes")
EXIT_CONTROLS = ControlFields(list(EXIT_FIELDS))
if EXIT_CONTROLS.order != EXIT_FIELDS:
    raise AssertionError("EXIT_FIELDS must list the fields in offset order")
_EVENTINJ_AT = field_span(VMCB_CONTROL, "eventinj")[0] - EXIT_CONTROLS.start     # in the span #VMEXIT writes


# -- guest memory -------------------------------------------------------------------------------

def _read(machine: "Machine", address: int, size: int) -> bytes:
    try:
        return machine.memory.read(address, size)
    except UnbackedMemory as missing:
        raise VmcbMemoryError(f"no RAM at {address:#x} for {size} bytes") from missing


_SAVE_AT = SAVE_AREA_OFFSET + SAVE_CODEC.start                 # the save fields' span in the VMCB
_G_PAT_AT = SAVE_AREA_OFFSET + field_span(VMCB_SAVE, "g_pat")[0]
_LBR_AT = SAVE_AREA_OFFSET + field_span(VMCB_SAVE, "dbgctl")[0]      # DBGCTL, BR_FROM, BR_TO, LASTEXCP_FROM/TO
_VMCB_SPAN = _SAVE_AT + SAVE_CODEC.struct.size                 # VMRUN reads [0, _VMCB_SPAN)


def _read_save(machine: "Machine", page: int) -> tuple:
    codec = SAVE_CODEC
    return codec.struct.unpack(_read(machine, page + SAVE_AREA_OFFSET + codec.start, codec.struct.size))


def _write_host(machine: "Machine", page: int, host) -> None:
    """Store the host state in the HSAVE page, whose format is the implementation's (APM
    §15.30.4): only the switched fields mean anything there, the bytes between are zeroed."""
    machine.memory.write(page + SAVE_AREA_OFFSET + SAVE_CODEC.start, SAVE_CODEC.store(host))


def _permission_map(machine: "Machine", base: int, size: int) -> np.ndarray:
    """L1's IOPM or MSRPM as the CPU consults it: when it checks an intercept, not once at
    VMRUN (KVM reads L1's map then too), so L1's or L2's stores into it count at once
    (kvm-unit-tests' ioio test edits the map from L2).  A view of guest RAM; a copy where the
    map is not plain RAM (a device, a window over it), all-ones where nothing is there: every
    access intercepted, as KVM exits when it cannot read L1's map.  Never an error: a map
    beyond MAXPHYADDR is VMRUN's consistency check to refuse."""
    live = machine.memory.ram_view(base, size)
    if live is not None:
        return live
    return np.frombuffer(machine.read_view(base, size), dtype=np.uint8).copy()


_MAP_INTERCEPTS = 1 << ExitCode.IOIO | 1 << ExitCode.MSR


def intercept_controls(machine: "Machine", control: dict[str, int]) -> InterceptControls:
    """The VMCB's intercepts, with L1's permission maps (``_permission_map``) where their
    intercept is set."""
    vector = control["intercepts"]
    if not vector & _MAP_INTERCEPTS:                # the same vector, the same controls (read-only)
        cache = machine.svm_caches.controls
        if vector not in cache:
            cache[vector] = InterceptControls(vector)
        return cache[vector]
    controls = InterceptControls(vector)
    if ExitCode.IOIO in controls:
        controls.iopm_address = control["iopm_base_pa"] & MAP_ADDRESS_MASK
    if ExitCode.MSR in controls:
        controls.msrpm_address = control["msrpm_base_pa"] & MAP_ADDRESS_MASK
    bind_maps(machine, controls)
    return controls


def bind_maps(machine: "Machine", controls: InterceptControls) -> None:
    """Show L1's maps in ``controls`` from ``machine``'s memory (the one restored into, too)."""
    if controls.iopm_address is not None:
        controls.iopm = _permission_map(machine, controls.iopm_address, IOPM_BYTES)
    if controls.msrpm_address is not None:
        controls.msrpm = _permission_map(machine, controls.msrpm_address, MSRPM_BYTES)


_CHECKED_FIELDS = operator.itemgetter(*[SAVE_CODEC.order.index(name)
                                         for name in ("efer", "cr0", "cr3", "cr4", "dr6", "dr7", "cs.attrib")])
_PAGING_FIELDS = operator.itemgetter(*[SAVE_CODEC.order.index(name) for name in ("cr0", "cr3", "cr4", "efer")])
_CHECKED_CONTROLS = operator.itemgetter("intercepts", "guest_asid", "eventinj", "nested_control", "iopm_base_pa",
                                        "msrpm_base_pa")


def _consistency(machine: "Machine", save: tuple, control: dict[str, int]) -> str | None:
    """VMRUN's consistency checks (§B.5), remembered per input: a guest hypervisor's loop
    VMRUNs the same VMCB state over and over."""
    key = (_CHECKED_FIELDS(save), _CHECKED_CONTROLS(control))
    cache = machine.svm_caches.consistency
    if key not in cache:
        if len(cache) > 4096:
            cache.clear()
        cache[key] = first_failure(_candidate(machine, save, control))
    return cache[key]


def virtual_gif(machine: "Machine") -> bool:
    """VGIF is on (APM §15.33): in guest mode on a model with VGIF whose VMCB sets
    V_GIF_ENABLE, STGI and CLGI set and clear int_ctl's V_GIF instead of GIF, and V_GIF = 0
    holds virtual interrupts (QEMU's virtual_gif_enabled, KVM's nested vGIF)."""
    svm = machine.svm
    return bool(svm.guest_mode and svm.int_ctl & V_GIF_ENABLE and machine.svm_caches.features & VGIF)


def _pdptes_refused(machine: "Machine", save: tuple, control: dict[str, int]) -> str | None:
    """A legacy-PAE L2 without nested paging: KVM loads its four PDPTEs from guest CR3 as
    it enters the guest (nested_svm_load_cr3 -> load_pdptrs), and a present one with
    reserved bits, or none in memory, fails the VMRUN with VMEXIT_INVALID (kvm-unit-tests'
    svm_pae_test) — by a whole #VMEXIT, which clears GIF (out_exit_err).  QEMU's
    helper_vmrun loads nothing: its guest faults when it walks."""
    if not machine.profile.vmrun_loads_pdptes or control["nested_control"] & NP_ENABLE:
        return None         # with nested paging the walk reads them, through the nested tables
    cr0, cr3, cr4, efer = _PAGING_FIELDS(save)
    if not (cr0 & CR0_PG and cr4 & CR4_PAE) or efer & EFER_LME:
        return None
    return pae_pdpte_problem(machine.memory, cr3, max_physical_bits(machine.cpu_model))


class Caches:
    """What a machine's world switches remember (per machine: its CPU model is fixed)."""

    def __init__(self, cpu_model: str):
        self.features = MODELS[cpu_model].svm_edx              # Fn8000_000A EDX: what VMRUN honours
        self.controls: dict[int, InterceptControls] = {}       # intercept vector -> controls
        self.consistency: dict[tuple, str | None] = {}         # checked fields -> VMRUN's verdict
        self.nested_tlbs: dict[tuple, npt.NestedTlb] = {}      # (nested tables, profile) -> their TLB


def _candidate(machine: "Machine", save: tuple, control: dict[str, int]) -> VmrunCandidate:
    fields = dict(zip(SAVE_CODEC.order, save))
    return VmrunCandidate(
        efer=fields["efer"], cr0=fields["cr0"], cr3=fields["cr3"], cr4=fields["cr4"], dr6=fields["dr6"],
        dr7=fields["dr7"], cs_attrib=fields["cs.attrib"], intercepts=control["intercepts"],
        asid=control["guest_asid"], eventinj=control["eventinj"], nested_control=control["nested_control"],
        iopm_base_pa=control["iopm_base_pa"], msrpm_base_pa=control["msrpm_base_pa"],
        long_mode_capable=machine.long_mode_capable, max_phys_bits=max_physical_bits(machine.cpu_model),
        nested_paging_supported=bool(machine.svm_caches.features & NESTED_PAGING),
        cr4_defined=machine.cr4_defined)


# -- VMRUN ----------------------------------------------------------------------------------------

def vmrun(machine: "Machine", vmcb_pa: int, next_rip: int, hook: HookContext | None = None) -> int:
    """VMRUN with rAX = ``vmcb_pa`` (already checked: page-aligned, inside the physical
    address width) from L1 at CPL 0; L1 resumes at ``next_rip`` after the #VMEXIT.  From
    the run loop, or inside a ``hook`` (emulator/plugins.HookContext).  Returns the RIP the
    CPU goes on at."""
    cpu, svm = machine.cpu, machine.svm
    current = hook is not None
    host = hook.state if hook is not None else cpu.capture()
    host[At.rip] = next_rip
    svm.host = tuple(host)
    if machine.profile.host_save_in_memory:
        _write_host(machine, svm.hsave_pa, host)
    raw = _read(machine, vmcb_pa, _VMCB_SPAN)               # control and save fields at once
    control = VMRUN_CONTROLS.parse(raw, VMRUN_CONTROLS.start)
    save = SAVE_CODEC.struct.unpack_from(raw, _SAVE_AT)
    failure = _consistency(machine, save, control)
    if failure is not None:
        _refuse(machine, vmcb_pa, host, failure, machine.profile.vmrun_invalid_clears_gif)
        return machine.cpu.rip
    features = machine.svm_caches.features
    failure = _pdptes_refused(machine, save, control) or (_vnmi_refused(control) if features & VNMI else None)
    if failure is not None:
        _refuse(machine, vmcb_pa, host, failure, clears_gif=True)
        return machine.cpu.rip
    controls = intercept_controls(machine, control)
    guest = host                                    # the host's registers are in svm.host now
    SAVE_CODEC.load_guest(guest, save)
    int_ctl = control["int_ctl"]
    shadow = uci.HF_INHIBIT_IRQ if control["interrupt_state"] & INTERRUPT_SHADOW else 0
    guest[At.hflags] = guest[At.hflags] & ~uci.HF_INHIBIT_IRQ | shadow
    svm.host_if = bool(svm.host[At.rflags] & RFLAGS_IF)
    svm.v_intr_masking = bool(int_ctl & V_INTR_MASKING)
    if svm.v_intr_masking:                          # CR8 is the guest's V_TPR while it runs
        svm.host_cr8 = cpu["cr8"]
    cpu.load(guest, context_is_current=current)
    if svm.v_intr_masking:
        cpu["cr8"] = int_ctl & V_TPR_MASK & 0xF
    if control["tlb_control"] != TlbControl.DO_NOTHING:
        machine.forget_tlb()
    svm.vmcb_pa, svm.asid, svm.gif = vmcb_pa, control["guest_asid"], True
    svm.int_ctl, svm.v_intr_vector = int_ctl, control["v_intr_vector"]
    machine.tsc.offset = control["tsc_offset"]
    _run_guest(machine, vmcb_pa, control, controls)
    if int_ctl & V_NMI_ENABLE and features & VNMI:      # vNMI: V_NMI_MASK is the guest's NMI blocking
        svm.host_nmi_blocked, cpu.nmi_blocked = cpu.nmi_blocked, bool(int_ctl & V_NMI_MASK)
    if control["eventinj"] & EVENT_VALID:
        _inject(machine, control["eventinj"], guest[At.rip])
        return machine.cpu.rip
    return guest[At.rip]


def _run_guest(machine: "Machine", vmcb_pa: int, control: dict[str, int], controls: InterceptControls) -> None:
    """The guest runs as L2 under ``controls`` with the VMCB's nested paging, LBR
    virtualization and pause filter, as far as the model has them (NP_ENABLE without it
    failed VMRUN's checks): at VMRUN, and at an RSM back into guest mode."""
    features = machine.svm_caches.features
    if control["nested_control"] & NP_ENABLE:
        _enter_nested_paging(machine, vmcb_pa, control["n_cr3"])
    if control["virt_ext"] & LBR_VIRTUALIZATION_ENABLE and features & LBR_VIRTUALIZATION:
        _enter_lbr_virtualization(machine, vmcb_pa)
    run_as_l2(machine, controls)
    if control["pause_filter_count"] and features & PAUSE_FILTER:
        _set_pause_filter(machine, control, features)


def _enter_nested_paging(machine: "Machine", vmcb_pa: int, n_cr3: int) -> None:
    """NP_ENABLE: the guest's addresses go through L1's tables at N_CR3, in the format of
    L1's paging at this VMRUN, and its PAT is G_PAT (npt.py)."""
    svm, fast = machine.svm, machine.cpu.fast
    svm.nested = npt.NestedSetting(n_cr3, svm.host[At.cr4], svm.host[At.efer])
    svm.host_pat = fast.read_msr(MSR_PAT)
    fast.write_msr(MSR_PAT, int.from_bytes(_read(machine, vmcb_pa + _G_PAT_AT, 8), "little"))
    machine.set_second_stage(npt.stage_for(machine))


def _leave_nested_paging(machine: "Machine", vmcb_pa: int | None) -> None:
    """#VMEXIT (``vmcb_pa``: the guest's PAT goes to G_PAT) or an SMI (None) from a guest
    under nested paging: L1's own translation and PAT again."""
    svm, fast = machine.svm, machine.cpu.fast
    if vmcb_pa is not None:
        machine.memory.write(vmcb_pa + _G_PAT_AT, fast.read_msr(MSR_PAT).to_bytes(8, "little"))
    fast.write_msr(MSR_PAT, svm.host_pat)
    svm.nested = None
    machine.set_second_stage(None)


def virtual_nmi(machine: "Machine") -> bool:
    """vNMI is on (APM §15.21.10): in guest mode on a model with vNMI whose VMCB sets
    V_NMI_ENABLE, int_ctl's V_NMI is a pending NMI for the guest and V_NMI_MASK its NMI
    blocking (the CPU's own while the guest runs: delivery sets it, the guest's IRET clears it)."""
    svm = machine.svm
    return bool(svm.guest_mode and svm.int_ctl & V_NMI_ENABLE and machine.svm_caches.features & VNMI)


def _vnmi_refused(control: dict[str, int]) -> str | None:
    """KVM's nested_vmcb_check_controls, on a model with vNMI: V_NMI_ENABLE needs the NMI
    intercept (physical NMIs must reach L1; kvm-unit-tests' vnmi test expects VMEXIT_INVALID)."""
    if control["int_ctl"] & V_NMI_ENABLE and not control["intercepts"] >> ExitCode.NMI & 1:
        return "V_NMI_ENABLE without the NMI intercept"
    return None


def _set_pause_filter(machine: "Machine", control: dict[str, int], features: int) -> None:
    """A PAUSE_FILTER_COUNT on a model with the pause filter (and a THRESHOLD, with that
    too): the guest's PAUSE intercept waits for the count (intercepts/exitinfo.PauseFilter)."""
    threshold = control["pause_filter_threshold"] if features & PAUSE_FILTER_THRESHOLD else 0
    machine.gate.pause_filter = PauseFilter(control["pause_filter_count"], threshold)


def _enter_lbr_virtualization(machine: "Machine", vmcb_pa: int) -> None:
    """LBR virtualization (APM §15.23): the guest's DEBUGCTL and last-branch record come from
    the VMCB (DEBUGCTL's reserved bits dropped, as KVM's nested_vmcb02_prepare_save), L1's
    wait for the #VMEXIT (kvm-unit-tests' svm_lbrv_nested tests)."""
    debugctl, from_ip, to_ip = struct.unpack("<3Q", _read(machine, vmcb_pa + _LBR_AT, 24))
    machine.svm.host_lbr = machine.lbr.state()
    machine.lbr.restore((debugctl & DEBUGCTL_DEFINED, from_ip, to_ip))


def _leave_lbr_virtualization(machine: "Machine", vmcb_pa: int | None) -> None:
    """#VMEXIT stores the guest's record in the VMCB (``vmcb_pa``; None: an SMI, whose
    RSM loads it again) and gives L1 its own back."""
    svm = machine.svm
    if vmcb_pa is not None:
        machine.memory.write(vmcb_pa + _LBR_AT, struct.pack("<5Q", *machine.lbr.state(), 0, 0))
    machine.lbr.restore(svm.host_lbr)
    svm.host_lbr = None


def _refuse(machine: "Machine", vmcb_pa: int, host: ArchState, reason: str, clears_gif: bool) -> None:
    """A VMRUN that fails its consistency checks: EXITCODE = VMEXIT_INVALID, L1 goes on
    after its VMRUN (§B.5); the host state was never left."""
    _write_exit(machine, vmcb_pa, VmExit(VMEXIT_INVALID))
    machine.cpu.rip = host[At.rip]
    if clears_gif:
        machine.svm.gif = False
    record_exit(machine, VmExit(VMEXIT_INVALID, rip=host[At.rip]),
                        {"kind": "vmrun-invalid", "vmcb": vmcb_pa, "reason": reason})
    if host[At.rflags] & RFLAGS_TF:
        _single_step_trap(machine, host[At.rip])


def _exit_values(exit_: VmExit, int_ctl: int, interrupt_state: int, eventinj: int) -> tuple:
    """EXIT_CONTROLS' values: the interrupt state, EXITCODE, EXITINFO1/2, EXITINTINFO,
    EVENTINJ, nRIP and the instruction bytes (their count in bits 3:0 of the byte before them)."""
    return (int_ctl, interrupt_state, int(exit_.code), exit_.info1, exit_.info2, exit_.exit_int_info, eventinj,
            exit_.next_rip, len(exit_.insn_bytes), exit_.insn_bytes)


def _eventinj_after_exit(machine: "Machine", eventinj: int) -> int:
    """#VMEXIT, and a VMRUN that fails, clear EVENTINJ (the injection is over: KVM's
    nested_svm_vmexit clears it and its error code; QEMU's do_vmexit the low dword only)."""
    return eventinj & ~0xFFFF_FFFF if machine.profile.vmexit_keeps_eventinj_error else 0


def _write_exit(machine: "Machine", vmcb_pa: int, exit_: VmExit) -> None:
    """A refused VMRUN's exit fields; the interrupt fields stay as they are."""
    at = vmcb_pa + EXIT_CONTROLS.start
    area = bytearray(_read(machine, at, EXIT_CONTROLS.struct.size))
    fields = EXIT_CONTROLS.parse(area)
    EXIT_CONTROLS.pack_into(area, 0, _exit_values(exit_, fields["int_ctl"], fields["interrupt_state"],
                                                  _eventinj_after_exit(machine, fields["eventinj"])))
    machine.memory.write(at, area)


def _write_back(machine: "Machine", vmcb_pa: int, exit_: VmExit, guest: ArchState) -> None:
    """#VMEXIT's writes into the VMCB — the exit, V_TPR and the interrupt shadow, then the
    guest state — packed into one copy of the span from the first field to the last."""
    svm = machine.svm
    if svm.host_nmi_blocked is not None:            # the guest's NMI blocking is V_NMI_MASK
        svm.int_ctl = svm.int_ctl & ~V_NMI_MASK | (V_NMI_MASK if machine.cpu.nmi_blocked else 0)
    int_ctl = svm.int_ctl                           # V_IRQ is clear if the guest took it
    if svm.v_intr_masking:
        int_ctl = int_ctl & ~V_TPR_MASK | machine.cpu["cr8"] & 0xF
    shadow = INTERRUPT_SHADOW if guest[At.hflags] & uci.HF_INHIBIT_IRQ else 0
    at = vmcb_pa + EXIT_CONTROLS.start
    area = bytearray(_read(machine, at, _VMCB_SPAN - EXIT_CONTROLS.start))
    eventinj = _eventinj_after_exit(machine, int.from_bytes(area[_EVENTINJ_AT:_EVENTINJ_AT + 8], "little"))
    EXIT_CONTROLS.pack_into(area, 0, _exit_values(
        exit_, int_ctl, shadow | (GUEST_INTERRUPT_MASK if guest[At.rflags] & RFLAGS_IF else 0), eventinj))
    SAVE_CODEC.store_into(area, _SAVE_AT - EXIT_CONTROLS.start, guest)
    machine.memory.write(at, area)


def _inject(machine: "Machine", eventinj: int, rip: int) -> None:
    """EVENTINJ (APM §15.20): delivered before the guest's first instruction, through the
    guest's IDT; the event itself is not intercepted, faults while delivering it are."""
    event = EventInfo.decode(eventinj)
    kind = INJECTED_KIND[EventType(event.kind)]
    error_code = event.error_code if kind is EventKind.EXCEPTION else None
    machine.deliver(Event(event.vector, kind, rip, error_code), injected=True)
    if kind is EventKind.NMI:
        machine.cpu.nmi_blocked = True


# -- #VMEXIT --------------------------------------------------------------------------------------

def vmexit(machine: "Machine", exit_: VmExit, hook: HookContext | None = None) -> int:
    """Leave L2 for L1 with ``exit_`` (§B.6), from the run loop or inside a ``hook``
    (emulator/plugins.HookContext: L2's registers at the exit).  Returns the RIP L1 goes on
    at."""
    cpu, svm = machine.cpu, machine.svm
    vmcb_pa = svm.vmcb_pa
    current = hook is not None
    guest = hook.state if hook is not None else cpu.capture()
    guest[At.rip] = exit_.rip
    _write_back(machine, vmcb_pa, exit_, guest)
    host = guest                                    # the guest's registers are in the VMCB now
    if machine.profile.host_save_in_memory:
        SAVE_CODEC.load_host(host, _read_save(machine, svm.hsave_pa))
    else:
        SAVE_CODEC.restore_host(host, svm.host)
    host[At.cr0] |= CR0_PE
    stepped = host[At.rflags] & RFLAGS_TF           # L1 single-stepped its VMRUN
    host[At.rflags] &= ~(RFLAGS_VM | RFLAGS_RF)     # RF: the VMRUN completed
    host[At.dr7] = HOST_DR7
    host[At.hflags] &= ~uci.HF_INHIBIT_IRQ
    host.cpl = 0
    cpu.load(host, context_is_current=current)
    if svm.v_intr_masking:
        cpu["cr8"] = svm.host_cr8
    if svm.nested is not None:
        _leave_nested_paging(machine, vmcb_pa)
    if svm.host_lbr is not None:
        _leave_lbr_virtualization(machine, vmcb_pa)
    if svm.host_nmi_blocked is not None:
        cpu.nmi_blocked, svm.host_nmi_blocked = svm.host_nmi_blocked, None
    svm.vmcb_pa, svm.asid, svm.gif, svm.v_intr_masking = None, 0, False, False
    svm.int_ctl = svm.v_intr_vector = machine.tsc.offset = 0
    leave_guest(machine)
    record_exit(machine, exit_)
    if stepped:
        _single_step_trap(machine, host[At.rip])
        return cpu.rip
    return host[At.rip]


def _single_step_trap(machine: "Machine", rip: int) -> None:
    """L1 single-stepped its VMRUN: the #DB trap comes when VMRUN completes — after the
    #VMEXIT, or its failure — in L1 at ``rip`` (kvm-unit-tests' host_rflags)."""
    machine.cpu["dr6"] |= DR6_BS
    machine.deliver(Event(Vector.DB, EventKind.EXCEPTION, rip))


def run_as_l2(machine: "Machine", controls: InterceptControls, arm: bool = True) -> None:
    """The guest runs as L2 under ``controls``, its exits #VMEXITs into this machine's L1
    (``arm=False``: its sites are armed already — a snapshot being restored)."""
    enter_guest(machine, controls, on_exit=OnExit.L1, l1_exit=lambda exit_, hook: vmexit_to_l1(machine, exit_, hook),
                arm=arm)


def vmexit_to_l1(machine: "Machine", exit_: VmExit, hook: HookContext | None = None) -> None:
    """L1 (the guest's own hypervisor) takes ``exit_``: the #VMEXIT, RIP set through the API
    (inside a hook — an OUT's #GP intercepted, say — Unicorn must leave L2's block)."""
    try:
        machine.cpu.rip = vmexit(machine, exit_, hook)
    except VmcbMemoryError as missing:
        machine.request_stop(StopReason.MEMORY, detail=f"#VMEXIT: {missing}")


# -- an SMI taken in guest mode (semantics.md §C.7, §F.19) ----------------------------------------

def smm_fields(machine: "Machine") -> dict[str, int]:
    """The 64-bit state-save map's SVM fields for an SMI taken in guest mode: FED8h = 1 and
    FEE0h = the VMCB (KVM); the apm profile adds the host's CR0/CR3/CR4/EFER at FF28h-FF40h."""
    svm = machine.svm
    if not svm.guest_mode:
        return {}
    fields = {"svm_guest": 1, "svm_guest_vmcb": svm.vmcb_pa}
    if machine.profile.smm_svm_host_fields:
        fields.update({f"svm_host_{name}": svm.host[getattr(At, name)] for name in ("efer", "cr0", "cr3", "cr4")})
    return fields


def suspend_for_smm(machine: "Machine") -> None:
    """SMM runs outside guest mode; the VMCB address waits in the state-save map and the host
    state in the HSAVE page (KVM stashes it there only now, §C.2 step 2)."""
    if machine.svm.guest_mode:
        _write_host(machine, machine.svm.hsave_pa, machine.svm.host)
        if machine.svm.nested is not None:
            _leave_nested_paging(machine, None)
        if machine.svm.host_lbr is not None:
            _leave_lbr_virtualization(machine, None)
        machine.svm.vmcb_pa = None
        machine.tsc.offset = 0
        leave_guest(machine)


def resume_after_rsm(machine: "Machine", vmcb_pa: int) -> None:
    """RSM to a state saved in guest mode: L2 runs again under its VMCB's controls (the
    registers came from SMRAM; the host state from the HSAVE page)."""
    svm = machine.svm
    host = machine.cpu.capture()
    SAVE_CODEC.load_host(host, _read_save(machine, svm.hsave_pa))
    svm.host = tuple(host)
    control = VMRUN_CONTROLS.read(machine, vmcb_pa)
    svm.vmcb_pa, svm.asid = vmcb_pa, control["guest_asid"]
    svm.int_ctl, svm.v_intr_vector = control["int_ctl"], control["v_intr_vector"]
    svm.v_intr_masking = bool(svm.int_ctl & V_INTR_MASKING)
    machine.tsc.offset = control["tsc_offset"]
    _run_guest(machine, vmcb_pa, control, intercept_controls(machine, control))   # (its NMI blocking: SMRAM's)
