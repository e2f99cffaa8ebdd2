"""The SMI/RSM world switch (semantics.md §C.2, §C.6), ringminus's own: Unicorn cannot
enter SMM (reference/unicorn.md §5).

Entry saves the CPU into the state-save map at SMBASE+0xFE00 — written after the switch to
the SMM view, so it lands in SMRAM — and loads the SMM entry state.  RSM reads the map (still
in the SMM view), leaves SMM, and restores in KVM's order with the profile's validity checks;
an invalid state ends in shutdown with the reason recorded.
"""
from __future__ import annotations

import struct
from collections import namedtuple
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, NamedTuple

from ..emulator.cpu import STATE_NAMES, ArchState, At
from ..arch.control import CR0_EM, CR0_PE, CR0_PG, CR0_TS, CR4_PAE, EFER_LMA, EFER_LME, RFLAGS_VM, RuleSet
from ..binlayout import STRUCT_CODES
from ..emulator.ucinternals import HF2_NMI_MASK, HF_CPL_MASK, HF_INHIBIT_IRQ
from ..arch.registers import GPRS_BY_NUMBER, SEGMENTS_BY_NUMBER
from ..arch.segments import (FLAG_DB, FLAG_L, descriptor_flags, flags_dpl, flags_from_32_expression,
                             segment_flags_32_expression)
from ..emulator.memory import MissingMemory, UnbackedMemory
from ..emulator.paging import pae_pdpte_problem
from ..emulator.plugins import HookContext
from ..emulator.ports import IoAccess
from ..arch.models import max_physical_bits
from . import layouts as L

if TYPE_CHECKING:
    from ..machine import Machine

SMM_DR7 = 0x400
SMM_SEGMENT_FLAGS = descriptor_flags(0x3, granularity=1)        # data R/W accessed, G, P, S
SMM_DATA_SEGMENT = (0, 0, 0xFFFF_FFFF, SMM_SEGMENT_FLAGS)          # selector, base, limit, flags
GPR_NAMES_32 = ("eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi")


class InvalidSavedState(Exception):
    """RSM found a state the profile refuses; the machine shuts down with this reason."""


class GuestModeHook(NamedTuple):
    """What the feature that runs guests (SVM) does at SMM's world switches (§C.7): the map
    fields an SMI taken in guest mode writes (FED8h, FEE0h…), leaving guest mode for SMM, and
    RSM's return to it (MissingMemory when the guest's structures are gone: RSM shuts down)."""
    entry_fields: Callable[["Machine"], dict[str, int]]
    suspend: Callable[["Machine"], None]
    resume: Callable[["Machine", int], None]          # (machine, the VMCB address FEE0h held)


@dataclass
class SmmState:
    """The KVM vcpu-events view of SMM (semantics.md §C.8) plus SMBASE and counters."""
    smbase: int = L.DEFAULT_SMBASE
    in_smm: bool = False
    pending: bool = False              # an SMI waiting (latched while in SMM)
    inside_nmi: bool = False           # HF_SMM_INSIDE_NMI: the SMI came inside an NMI handler
    io_instruction: IoAccess | None = None   # the I/O instruction that raised the pending SMI
    entries: int = 0

    def as_dict(self, smram_state: str, latched_init: bool) -> dict:
        """``latched_init``: the machine's held INIT (KVM reports it with SMM's state)."""
        return {"smm": self.in_smm, "pending": self.pending, "inside_nmi": self.inside_nmi,
                "latched_init": latched_init, "smbase": self.smbase, "entries": self.entries,
                "smram": smram_state}


# -- the maps as struct codecs -------------------------------------------------------------
# Each map field either copies a register of the CPU's ArchState (PLAN), holds a segment's
# attributes in the map's encoding (ATTRIBUTES), or is filled per SMI (everything else:
# SMBASE, the revision, the restart fields; zero unless given).

SEGMENT_RECORDS = (*SEGMENTS_BY_NUMBER, "ldtr", "tr")
PLAN = {
    id(L.SMRAM_STATE_64): {
        **{f"{seg}.{part}": f"{seg}.{part}" for seg in SEGMENT_RECORDS for part in ("selector", "limit", "base")},
        **{f"{table}_{part}": f"{table}.{part}" for table in ("gdtr", "idtr") for part in ("limit", "base")},
        **{name: name for name in ("efer", "cr0", "cr3", "cr4", "dr6", "dr7", "rflags", "rip", *GPRS_BY_NUMBER)},
    },
    id(L.SMRAM_STATE_32): {
        **{f"{seg}_selector": f"{seg}.selector" for seg in SEGMENT_RECORDS},
        **{f"{seg}_cache.{part}": f"{seg}.{part}" for seg in SEGMENT_RECORDS for part in ("limit", "base")},
        **{f"{table}_{part}": f"{table}.{part}" for table in ("gdtr", "idtr") for part in ("limit", "base")},
        **dict(zip(GPR_NAMES_32, GPRS_BY_NUMBER)),
        "eip": "rip", "eflags": "rflags", **{name: name for name in ("cr0", "cr3", "cr4", "dr6", "dr7")},
    },
}
ATTRIBUTES = {
    id(L.SMRAM_STATE_64): {f"{seg}.attributes": f"{seg}.flags" for seg in SEGMENT_RECORDS},
    id(L.SMRAM_STATE_32): {f"{seg}_cache.flags": f"{seg}.flags" for seg in SEGMENT_RECORDS},
}
# F.11: QEMU stores these as 32-bit values into the 64-bit map's 8-byte slots.
NARROW_IN_QEMU_64 = ("cr0", "cr4", "dr6", "dr7", "rflags")
SIXTEEN_BIT_REGISTERS = [STATE_NAMES.index(f"{seg}.selector") for seg in SEGMENT_RECORDS] + \
                        [STATE_NAMES.index(f"{table}.limit") for table in ("gdtr", "idtr")]


class MapCodec:
    """One map under one profile: packed from an ArchState and unpacked in one struct call
    each (fields in offset order, reserved bytes as padding), and restored into an ArchState.

    The plan (PLAN, ATTRIBUTES) is compiled, as namedtuple compiles its class, into two
    straight-line functions — one expression per map field or register — because they run
    at every SMI and RSM; ``source`` shows them."""

    def __init__(self, layout, profile):
        fields = []
        for name, (dtype, offset, *_) in layout.fields.items():
            members = dtype.fields.items() if dtype.fields else [(None, (dtype, 0))]
            fields += [(offset + sub_offset, f"{name}.{member}" if member else name, STRUCT_CODES[sub.str[1:]])
                       for member, (sub, sub_offset, *_) in members]
        fields.sort()
        fmt, at = "<", 0
        for offset, _, code in fields:
            fmt += f"{offset - at}x{code}" if offset > at else code
            at = offset + struct.calcsize("<" + code)
        self.layout = layout
        self.struct = struct.Struct(fmt + f"{L.SAVE_AREA_SIZE - at}x")
        self.names = [name for _, name, _ in fields]
        self.spans = [(offset, offset + struct.calcsize("<" + code)) for offset, _, code in fields]
        self.Area = namedtuple("Area", [name.replace(".", "_") for name in self.names])
        plan, attributes = PLAN[id(layout)], ATTRIBUTES[id(layout)]
        self.extras = [name for name in self.names if name not in plan and name not in attributes]
        shifted = profile.smm_shifted_attributes_32 or layout is L.SMRAM_STATE_64
        narrow = " & 0xFFFFFFFF" if layout is L.SMRAM_STATE_32 else ""    # 64-bit registers into u4 fields
        # pack(s, **extras): each map field from register s[i], or an extra (0 unless given)
        # (segment attributes through arch.segments, the one home of their encodings)
        encode = segment_flags_32_expression("s[{}]", shifted)
        # Extras are masked to their field's width: a 32-bit map's I/O-restart fields take
        # the low halves of 64-bit registers.
        width_masks = [hex((1 << 8 * (stop - start)) - 1) for start, stop in self.spans]
        fields_out = [f"s[{STATE_NAMES.index(plan[name])}]{narrow}" if name in plan else
                      encode.format(STATE_NAMES.index(attributes[name])) if name in attributes else
                      f"{name.replace('.', '_')} & {mask}" for name, mask in zip(self.names, width_masks)]
        # restore(s, a): each register from map field a[k], or kept from s
        decode = flags_from_32_expression("a[{}]", shifted)
        sources = {STATE_NAMES.index(register): f"a[{at}]" for at, name in enumerate(self.names)
                   for register in [plan.get(name)] if register}
        sources.update({STATE_NAMES.index(register): decode.format(at) for at, name in enumerate(self.names)
                        for register in [attributes.get(name)] if register})
        for index in SIXTEEN_BIT_REGISTERS:         # the map's u32 slots hold 16-bit registers
            if index in sources and sources[index].startswith("a["):
                sources[index] += " & 0xFFFF"
        if profile.smm_narrow_control_fields and layout is L.SMRAM_STATE_64:
            for name in NARROW_IN_QEMU_64:          # F.11: QEMU's RSM reads them as 32 bits too
                sources[STATE_NAMES.index(name)] += " & 0xFFFFFFFF"
        registers_in = [sources.get(index, f"s[{index}]") for index in range(len(STATE_NAMES))]
        extras = ", ".join(f"{name.replace('.', '_')}=0" for name in self.extras)
        # Both first take plain copies (s[:] of an ArchState is a list, a[:] of an Area a tuple):
        # CPython specialises subscripts of exact lists and tuples only, and these functions
        # are nothing but subscripts.
        self.source = (f"def pack(s, *, {extras}):\n    s = s[:]\n    return _pack({', '.join(fields_out)})\n"
                       f"def restore(s, a):\n    s, a = s[:], a[:]\n    return _ArchState(({', '.join(registers_in)},))\n")
        namespace = {"_pack": self.struct.pack, "_ArchState": ArchState}
        exec(compile(self.source, f"<MapCodec {layout is L.SMRAM_STATE_64 and 64 or 32}-bit {profile.name}>", "exec"),
             namespace)
        self._pack, self.restore = namespace["pack"], namespace["restore"]
        written = self._written_fields(profile)
        self.written = self._written_mask(profile, written) if written is not None else None
        # RSM returns to guest mode only where SMI entry writes FED8h: bytes a QEMU-style
        # entry leaves alone are not state (QEMU's RSM never reads FED8h/FEE0h).
        self.returns_to_guest_mode = "svm_guest" in self.names and (written is None or "svm_guest" in written)

    def _written_fields(self, profile) -> set[str] | None:
        """F.11: the fields a QEMU-style entry writes over SMRAM (None: the whole map)."""
        if not profile.smm_writes_over_memory:
            return None
        written = set(PLAN[id(self.layout)]) | set(ATTRIBUTES[id(self.layout)]) | {"smbase", "revision"}
        if profile.smm_restart_fields:
            written |= set(self.extras)
        return written

    def _written_mask(self, profile, written: set[str]) -> int:
        """The bytes of ``written`` fields, as a mask over the map."""
        mask = 0
        for name, (start, stop) in zip(self.names, self.spans):
            if name in written:
                if profile.smm_narrow_control_fields and name in NARROW_IN_QEMU_64 and self.layout is L.SMRAM_STATE_64:
                    stop = start + 4
                mask |= ((1 << (8 * (stop - start))) - 1) << (8 * start)
        return mask

    def pack(self, state: ArchState, extras: dict[str, int], previous: bytes | None = None) -> bytes:
        """The map holding ``state`` and ``extras`` (by field name); with ``previous`` (a
        QEMU-style entry) only the bytes this profile writes replace those bytes."""
        packed = self._pack(state, **extras)
        if previous is None or self.written is None:
            return packed
        merged = int.from_bytes(packed, "little") & self.written | int.from_bytes(previous, "little") & ~self.written
        return merged.to_bytes(L.SAVE_AREA_SIZE, "little")

    def unpack(self, data: bytes):
        """The map's fields by name (``area.cr0``, ``area.cs_base``)."""
        return self.Area._make(self.struct.unpack(data))

    # restore(state, area) -> ArchState: ``state`` with the map's register fields in place of
    # its own (compiled in __init__).


def codec_for(machine: "Machine", layout_is_64: bool) -> MapCodec:
    """The map codec for the machine's profile (compiled once per machine and profile)."""
    key = (layout_is_64, machine.profile.name)
    codec = machine.smm_codecs.get(key)
    if codec is None:
        codec = machine.smm_codecs[key] = MapCodec(L.layout_for(layout_is_64), machine.profile)
    return codec


IO_RESTART_64 = ("io_restart_rip", "io_restart_rcx", "io_restart_rsi", "io_restart_rdi")
# The I/O trap dword at FEC0h: port in 31:16, SZ32/SZ16/SZ8 6:4, REP 3, STR 2, valid 1, read 0.
IO_TRAP_READ, IO_TRAP_VALID, IO_TRAP_PORT_SHIFT = 1 << 0, 1 << 1, 16


IO_RESTART_32 = ("io_restart_eip", "io_restart_ecx", "io_restart_esi", "io_restart_edi")
IO_TRAP_STRING, IO_TRAP_REPEAT = 1 << 2, 1 << 3
IO_TRAP_SIZE = {1: 1 << 4, 2: 1 << 5, 4: 1 << 6}        # SZ8, SZ16, SZ32


def trap_dword(io: IoAccess) -> int:
    """FEC0h for the I/O instruction that raised the SMI.  Port, valid and read are what
    coreboot's AMD SMI handlers rely on; the size/string/repeat bits follow AMD's BKDG
    description of SMMFEC0 ("SMM IO Trap Offset"), since the APM's Figure 10-6 is not in the
    reference [unverified layout]."""
    return (io.port << IO_TRAP_PORT_SHIFT | IO_TRAP_VALID | (IO_TRAP_READ if io.read else 0)
            | IO_TRAP_SIZE.get(io.size, 0) | (IO_TRAP_STRING if io.string else 0)
            | (IO_TRAP_REPEAT if io.repeat else 0))


def revision(machine: "Machine", layout) -> int:
    """The SMM revision identifier written (and, for the APM checks, expected back)."""
    return L.revision_for(layout) | (L.REVISION_IO_RESTART if machine.profile.smm_restart_fields else 0)


def _extras(machine: "Machine", codec: MapCodec) -> dict[str, int]:
    """The fields an SMI fills besides the registers: SMBASE, the revision identifier and, in
    the apm profile, the restart fields (APM §10.3.4-10.3.5, beyond KVM and QEMU: §F.14)."""
    extras = {"smbase": machine.smm.smbase, "revision": revision(machine, codec.layout)}
    if machine.profile.smm_restart_fields:
        extras["auto_halt_restart"] = 1 if machine.halted else 0
        io = machine.smm.io_instruction
        if io is not None:                # the SMI was raised by this I/O instruction
            is_64 = codec.layout is L.SMRAM_STATE_64
            extras.update(zip(IO_RESTART_64 if is_64 else IO_RESTART_32, io.registers))
            if is_64:
                extras["io_restart_dword"] = trap_dword(io)
    if codec.layout is L.SMRAM_STATE_64:
        for hook in machine.smm_guest_mode_hooks:
            extras.update(hook.entry_fields(machine))
    return extras


def enter_smm(machine: "Machine", hook: HookContext | None = None) -> None:
    """Take an SMI now, at an instruction boundary (§C.2), from the run loop or inside a
    ``hook`` (emulator/plugins.HookContext)."""
    cpu, smm, profile = machine.cpu, machine.smm, machine.profile
    codec = codec_for(machine, machine.long_mode_capable)
    address = smm.smbase + L.SAVE_AREA
    state = hook.state if hook is not None else cpu.capture()
    machine.smram.set_smm(True, touching=(smm.smbase + L.ENTRY_OFFSET, smm.smbase + L.SAVE_AREA + L.SAVE_AREA_SIZE))
    smm.in_smm = True
    try:
        previous = machine.memory.read(address, L.SAVE_AREA_SIZE) if profile.smm_writes_over_memory else None
        machine.memory.write(address, codec.pack(state, _extras(machine, codec), previous))
    except UnbackedMemory:
        machine.request_stop_shutdown(f"SMI: no memory for the state-save map at {address:#x}")
        return
    for hook in machine.smm_guest_mode_hooks:
        hook.suspend(machine)
    smm.inside_nmi = state.nmi_blocked      # an SMI inside an NMI handler keeps NMIs blocked after RSM
    rip = state[At.rip]
    entry = state                           # §C.2 steps 5-11, on the captured registers
    entry[At.rip], entry[At.rflags] = L.ENTRY_OFFSET, 0x2
    code = ((smm.smbase >> 4) & 0xFFFF, smm.smbase, 0xFFFF_FFFF, SMM_SEGMENT_FLAGS)
    entry[At.es_selector:At.gs_flags + 1] = (*SMM_DATA_SEGMENT, *code, *SMM_DATA_SEGMENT * 4)   # es cs ss ds fs gs
    if profile.smm_zero_idtr:
        entry[At.idtr_base] = entry[At.idtr_limit] = 0
    entry[At.cr0] &= ~(CR0_PE | CR0_EM | CR0_TS | CR0_PG)
    entry[At.cr4] = 0
    if machine.long_mode_capable or profile.smm_clears_efer_always:
        entry[At.efer] = 0
    entry[At.dr7] = SMM_DR7
    entry[At.hflags] &= ~(HF_INHIBIT_IRQ | HF_CPL_MASK)   # CPL 0; step 6: the interrupt shadow ends
    entry[At.hflags2] |= HF2_NMI_MASK                    # NMIs blocked until RSM
    cpu.load(entry, context_is_current=True)
    smm.io_instruction = None
    machine.halted = False
    smm.entries += 1
    machine.events.append({"kind": "smi", "instructions": machine.instructions_if_exact, "rip": rip,
                           "smbase": smm.smbase})


# The control-state rules RSM applies (arch.control; KVM's CR/DR/EFER writes, every profile
# that checks: §C.6 / §F.12), in KVM's order.
RSM_CONTROL_RULES = RuleSet("cr0_high", "pg_without_pe", "nw_without_cd", "cr4_reserved", "cr3_high", "dr6_high",
                            "dr7_high", "efer_reserved", "lme_without_long_mode", "long_paging_without_pae")


def _control_checks(cr0: int, cr3: int, cr4: int, efer: int, dr6: int, dr7: int, long_mode_capable: bool,
                    cr4_defined: int) -> None:
    refused = RSM_CONTROL_RULES.first_refused(cr0, cr3, cr4, efer, dr6, dr7, long_mode_capable,
                                              cr4_defined=cr4_defined)
    if refused is not None:
        raise InvalidSavedState(f"{refused} (CR0 {cr0:#x}, CR3 {cr3:#x}, CR4 {cr4:#x}, EFER {efer:#x})")


def leave_smm(machine: "Machine", hook: HookContext | None = None) -> None:
    """RSM inside SMM (§C.6): restore the saved state, or shut down.  NMIs are unblocked
    (unless the SMI came inside an NMI handler) and SMM is left before any check can fail.
    From the run loop, or inside a ``hook`` (emulator/plugins.HookContext)."""
    cpu, smm, profile = machine.cpu, machine.smm, machine.profile
    is_64 = machine.long_mode_capable
    codec = codec_for(machine, is_64)
    area = codec.unpack(machine.memory.read(smm.smbase + L.SAVE_AREA, L.SAVE_AREA_SIZE))
    unblock_nmi = not smm.inside_nmi
    smm.in_smm = smm.inside_nmi = False
    machine.smram.set_smm(False)
    state = codec.restore(hook.state_without_rflags if hook is not None else cpu.capture(rflags=False), area)
    try:
        _validate(machine, state, area, is_64)
    except InvalidSavedState as why:
        if unblock_nmi:
            cpu.nmi_blocked = False
        machine.request_stop_shutdown(f"RSM: {why}")
        return
    if unblock_nmi:
        state.nmi_blocked = False
    if profile.smm_smbase_needs_revision_bit and not area.revision & L.REVISION_SMBASE_RELOCATION:
        pass                                # F.13: QEMU keeps SMBASE without revision bit 17
    else:
        smm.smbase = area.smbase            # the APM and KVM always reload it
    state[At.hflags] &= ~HF_INHIBIT_IRQ
    state.cpl = flags_dpl(state[At.ss_flags]) if state[At.cr0] & CR0_PE else 0
    if profile.smm_restart_fields:
        if area.io_instruction_restart:     # run the I/O instruction that raised the SMI again
            names = IO_RESTART_64 if is_64 else IO_RESTART_32
            for register, name in zip(("rip", "rcx", "rsi", "rdi"), names):
                state[getattr(At, register)] = getattr(area, name)
        elif area.auto_halt_restart & 1:
            machine.halted = True           # back to the HLT the SMI interrupted
    cpu.load(state, context_is_current=True)
    if codec.returns_to_guest_mode and area.svm_guest & 1:     # the SMI came in guest mode: back to L2
        try:
            for hook in machine.smm_guest_mode_hooks:
                hook.resume(machine, area.svm_guest_vmcb)
        except MissingMemory as missing:     # KVM: the map fails, RSM fails
            machine.request_stop_shutdown(f"RSM: guest-mode state: {missing}")
            return
    machine.events.append({"kind": "rsm", "instructions": machine.instructions_if_exact, "rip": state[At.rip],
                           "smbase": smm.smbase})


def _validate(machine: "Machine", state: ArchState, area, is_64: bool) -> None:
    """The profile's RSM checks and fix-ups on the state read back (§C.6, §F.12)."""
    profile = machine.profile
    cr0, cr4, efer = state[At.cr0], state[At.cr4], state[At.efer]
    if profile.rsm_checks:
        _control_checks(cr0, state[At.cr3], cr4, efer if is_64 else 0, state[At.dr6], state[At.dr7], is_64,
                        machine.cr4_defined)
        lme = is_64 and efer & EFER_LME
        if cr0 & CR0_PG and cr4 & CR4_PAE and not lme:        # KVM loads the PDPTEs (its CR0 write)
            problem = pae_pdpte_problem(machine.memory, state[At.cr3], max_physical_bits(machine.cpu_model))
            if problem:
                raise InvalidSavedState(f"CR3 {state[At.cr3]:#x}: {problem}")
    if profile.rsm_apm_checks:
        if area.revision != revision(machine, codec_for(machine, is_64).layout):
            raise InvalidSavedState(f"revision identifier modified ({area.revision:#x})")
        cs_flags = state[At.cs_flags]
        if is_64 and efer & EFER_LME and cr0 & CR0_PG and cs_flags & FLAG_L and cs_flags & FLAG_DB:
            raise InvalidSavedState("long-mode return with CS.L and CS.D both set")
    state[At.rflags] |= 0x2
    if is_64 and profile.rsm_recomputes_lma:
        lma = EFER_LMA if efer & EFER_LME and cr0 & CR0_PG and cr4 & CR4_PAE else 0
        state[At.efer] = (efer & ~EFER_LMA) | lma
    if profile.rsm_apm_checks and (not cr0 & CR0_PE or state[At.efer] & EFER_LMA):
        state[At.rflags] &= ~RFLAGS_VM
