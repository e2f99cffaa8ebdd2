"""The SMI/RSM world switch (semantics.md §C.2, §C.6), ringminus's own: Unicorn cannot
enter SMM (reference/unicorn.md §5).

Entry saves the CPU into the state-save map at SMBASE+0xFE00 — written after the switch to
the SMM view, so it lands in SMRAM — and loads the SMM entry state.  RSM reads the map (still
in the SMM view), leaves SMM, and restores in KVM's order with the profile's validity checks;
an invalid state ends in shutdown with the reason recorded.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..emulator.cpu import (CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME, EFER_NXE, EFER_SVME, GPRS,
                            RFLAGS_VM, ArchState)
from ..emulator.descriptors import FLAG_DB, FLAG_L, Segment
from ..emulator.memory import UnbackedMemory
from . import layouts as L

if TYPE_CHECKING:
    from ..emulator.machine import Machine

CR0_EM, CR0_TS, CR0_NW, CR0_CD = 1 << 2, 1 << 3, 1 << 29, 1 << 30
CR4_PCIDE = 1 << 17
EFER_SCE = 1 << 0
EFER_DEFINED = EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE | EFER_SVME | (1 << 14) | (1 << 15)
CR4_DEFINED = 0x003F_7FFF & ~(1 << 12)        # no LA57 on these CPU models
MAX_PHYSICAL_BITS = 52
SMM_DR7 = 0x400
SMM_SEGMENT_FLAGS = L.descriptor_flags(0x3, granularity=1)        # data R/W accessed, G, P, S
GPR_NAMES_32 = ("eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi")
SEGMENTS = ("es", "cs", "ss", "ds", "fs", "gs")


class InvalidSavedState(Exception):
    """RSM found a state the profile refuses; the machine shuts down with this reason."""


@dataclass
class SmmState:
    """The KVM vcpu-events view of SMM (semantics.md §C.8) plus SMBASE and counters."""
    smbase: int = L.DEFAULT_SMBASE
    in_smm: bool = False
    pending: bool = False              # an SMI waiting (latched while in SMM)
    inside_nmi: bool = False           # HF_SMM_INSIDE_NMI: the SMI came inside an NMI handler
    latched_init: bool = False         # an INIT that arrived in SMM, processed after RSM
    io_instruction: "IoInstruction | None" = None   # the I/O instruction that raised the pending SMI
    entries: int = 0

    def as_dict(self, smram_state: str) -> dict:
        return {"smm": self.in_smm, "pending": self.pending, "inside_nmi": self.inside_nmi,
                "latched_init": self.latched_init, "smbase": self.smbase, "entries": self.entries,
                "smram": smram_state}


_STRUCT = {"u1": "B", "<u2": "H", "<u4": "I", "<u8": "Q"}


class MapCodec:
    """Packs and unpacks a whole state-save map in one struct call: the fields of the
    layout dtype in offset order, reserved bytes as padding."""

    def __init__(self, layout):
        fields = []
        for name, (dtype, offset, *_) in layout.fields.items():
            if dtype.fields:
                fields += [(offset + sub_offset, f"{name}.{member}", _STRUCT[sub.str.replace("|", "")])
                           for member, (sub, sub_offset, *_) in dtype.fields.items()]
            else:
                fields.append((offset, name, _STRUCT[dtype.str.replace("|", "")]))
        fields.sort()
        fmt, at = "<", 0
        for offset, _, code in fields:
            fmt += f"{offset - at}x{code}" if offset > at else code
            at = offset + struct.calcsize("<" + code)
        self.struct = struct.Struct(fmt + f"{L.SAVE_AREA_SIZE - at}x")
        self.names = [name for _, name, _ in fields]
        self.spans = [(offset, offset + struct.calcsize("<" + code)) for offset, _, code in fields]
        self.masks = {name: (1 << (8 * struct.calcsize("<" + code))) - 1 for _, name, code in fields}
        self.zero = dict.fromkeys(self.names, 0)

    def unpack(self, data: bytes) -> dict[str, int]:
        return dict(zip(self.names, self.struct.unpack(data)))

    def pack(self, values: dict[str, int], over: bytes | None = None) -> bytes:
        """The map holding ``values`` (others zero); with ``over``, only the fields given are
        written over those bytes (reserved bytes and other fields keep their contents)."""
        full = self.unpack(over) if over is not None else dict(self.zero)
        full.update({name: value & self.masks[name] for name, value in values.items()})
        packed = self.struct.pack(*map(full.__getitem__, self.names))
        if over is None:
            return packed
        out = bytearray(over)
        for name, (start, stop) in zip(self.names, self.spans):
            if name in values:
                out[start:stop] = packed[start:stop]
        return bytes(out)


CODECS = {id(L.SMRAM_STATE_64): MapCodec(L.SMRAM_STATE_64), id(L.SMRAM_STATE_32): MapCodec(L.SMRAM_STATE_32)}
GPR_PAIRS_32 = tuple(zip(("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi"), GPR_NAMES_32))


def save_state(machine: "Machine", state: ArchState, layout, previous: bytes | None) -> bytes:
    """The state-save map for ``state``.  KVM fills a zeroed buffer; QEMU writes its fields
    over what SMRAM held, CR0/CR4/DR6/DR7/RFLAGS as 32-bit values (§F.11)."""
    profile = machine.profile
    area: dict[str, int] = {}
    wide = 0xFFFF_FFFF if profile.smm_narrow_control_fields else 0xFFFF_FFFF_FFFF_FFFF
    if layout is L.SMRAM_STATE_64:
        for name in (*SEGMENTS, "ldtr", "tr"):
            seg = state.segments[name]
            area[f"{name}.selector"], area[f"{name}.attributes"] = seg.selector, L.attributes_64(seg.flags)
            area[f"{name}.limit"], area[f"{name}.base"] = seg.limit, seg.base
        area["efer"], area["cr3"], area["rip"] = state.efer, state.cr3, state.rip
        area["cr0"], area["cr4"], area["dr6"], area["dr7"] = (v & wide for v in (state.cr0, state.cr4, state.dr6, state.dr7))
        area["rflags"] = state.rflags & wide
        area.update(state.gprs)
    else:
        shifted = profile.smm_shifted_attributes_32
        for name in (*SEGMENTS, "ldtr", "tr"):
            seg = state.segments[name]
            area[f"{name}_selector"] = seg.selector
            area[f"{name}_cache.flags"] = L.segment_flags_32(seg.flags, shifted)
            area[f"{name}_cache.limit"], area[f"{name}_cache.base"] = seg.limit, seg.base
        for wide_name, name in GPR_PAIRS_32:
            area[name] = state.gprs[wide_name]
        area["eip"], area["eflags"] = state.rip, state.rflags
        area["cr0"], area["cr3"], area["cr4"], area["dr6"], area["dr7"] = state.cr0, state.cr3, state.cr4, state.dr6, state.dr7
    (area["gdtr_base"], area["gdtr_limit"]), (area["idtr_base"], area["idtr_limit"]) = state.gdtr, state.idtr
    area["smbase"] = machine.smm.smbase
    area["revision"] = revision(machine, layout)
    if profile.smm_restart_fields:        # APM §10.3.4-10.3.5, beyond KVM and QEMU (§F.14)
        area["auto_halt_restart"] = 1 if machine.halted else 0
        area["io_instruction_restart"] = 0
        io = machine.smm.io_instruction
        if io is not None:                # the SMI was raised by this I/O instruction
            names = IO_RESTART_64 if layout is L.SMRAM_STATE_64 else IO_RESTART_32
            for name, value in zip(names, io.registers):
                area[name] = value
            if layout is L.SMRAM_STATE_64:
                area["io_restart_dword"] = io.port << IO_TRAP_PORT_SHIFT | IO_TRAP_VALID | (IO_TRAP_READ if io.read else 0)
    return CODECS[id(layout)].pack(area, previous if profile.smm_writes_over_memory else None)


IO_RESTART_64 = ("io_restart_rip", "io_restart_rcx", "io_restart_rsi", "io_restart_rdi")
# The I/O trap dword at FEC0h: port in 31:16, bit 1 valid, bit 0 read (IN).  These are the
# bits AMD firmware relies on (coreboot's APMC handlers find the CPU that wrote APM_CNT by
# them); the size/string/repeat bits of APM Figure 10-6 are not filled [unverified layout].
IO_TRAP_READ, IO_TRAP_VALID, IO_TRAP_PORT_SHIFT = 1 << 0, 1 << 1, 16


@dataclass(frozen=True)
class IoInstruction:
    """The I/O instruction that raised an SMI: its RIP and RCX/RSI/RDI before it ran."""
    registers: tuple[int, int, int, int]
    port: int
    read: bool
IO_RESTART_32 = ("io_restart_eip", "io_restart_ecx", "io_restart_esi", "io_restart_edi")


def revision(machine: "Machine", layout) -> int:
    """The SMM revision identifier written (and, for the APM checks, expected back)."""
    return L.revision_for(layout) | (L.REVISION_IO_RESTART if machine.profile.smm_restart_fields else 0)


def enter_smm(machine: "Machine") -> None:
    """Take an SMI now, at an instruction boundary (§C.2)."""
    cpu, smm, profile = machine.cpu, machine.smm, machine.profile
    layout = L.layout_for(machine.long_mode_capable)
    address = smm.smbase + L.SAVE_AREA
    state = cpu.capture()
    machine.smram.set_smm(True)
    smm.in_smm = True
    try:
        previous = machine.memory.read(address, L.SAVE_AREA_SIZE) if profile.smm_writes_over_memory else None
        machine.memory.write(address, save_state(machine, state, layout, previous))
    except UnbackedMemory:
        machine.request_stop_shutdown(f"SMI: no memory for the state-save map at {address:#x}")
        return
    if cpu.nmi_blocked:                 # an SMI inside an NMI handler keeps NMIs blocked after RSM
        smm.inside_nmi = True
    flat = Segment(0, 0, 0xFFFF_FFFF, SMM_SEGMENT_FLAGS)
    entry = ArchState(
        gprs=state.gprs, rip=L.ENTRY_OFFSET, rflags=0x2,
        segments={**state.segments, "cs": Segment((smm.smbase >> 4) & 0xFFFF, smm.smbase, 0xFFFF_FFFF, SMM_SEGMENT_FLAGS),
                  **{name: flat for name in ("ds", "es", "fs", "gs", "ss")}},
        gdtr=state.gdtr, idtr=(0, 0) if profile.smm_zero_idtr else state.idtr,
        cr0=state.cr0 & ~(CR0_PE | CR0_EM | CR0_TS | CR0_PG), cr3=state.cr3, cr4=0,
        efer=0 if machine.long_mode_capable or profile.smm_clears_efer_always else state.efer,
        dr6=state.dr6, dr7=SMM_DR7, cpl=0)
    cpu.load(entry, nmi_blocked=True)
    smm.io_instruction = None
    rip = state.rip
    machine.halted = False
    smm.entries += 1
    machine.events.append({"kind": "smi", "instructions": machine.instructions_if_exact, "rip": rip,
                           "smbase": smm.smbase})
    machine.linear.flush()


def _check(condition: bool, reason: str) -> None:
    if condition:
        raise InvalidSavedState(reason)


def _control_checks(profile, cr0: int, cr3: int, cr4: int, efer: int, dr6: int, dr7: int,
                    long_mode_capable: bool) -> None:
    """What KVM's CR/DR/EFER writes reject (every profile that checks), §C.6 / §F.12."""
    _check(cr0 >> 32, f"CR0 {cr0:#x}: bits 63:32 set")
    _check(cr0 & CR0_PG and not cr0 & CR0_PE, f"CR0 {cr0:#x}: PG without PE")
    _check(cr0 & CR0_NW and not cr0 & CR0_CD, f"CR0 {cr0:#x}: NW without CD")
    _check(cr4 & ~CR4_DEFINED, f"CR4 {cr4:#x}: reserved bits")
    _check(cr3 >> MAX_PHYSICAL_BITS, f"CR3 {cr3:#x}: bits above the physical address width")
    _check(dr6 >> 32 or dr7 >> 32, "DR6/DR7: bits 63:32 set")
    _check(efer & ~EFER_DEFINED, f"EFER {efer:#x}: reserved bits")
    _check(efer & EFER_LME and not long_mode_capable, "EFER.LME on a CPU without long mode")
    _check(efer & EFER_LME and cr0 & CR0_PG and not cr4 & CR4_PAE, "EFER.LME and CR0.PG without CR4.PAE")


def leave_smm(machine: "Machine") -> None:
    """RSM inside SMM (§C.6): restore the saved state, or shut down."""
    cpu, smm, profile = machine.cpu, machine.smm, machine.profile
    layout = L.layout_for(machine.long_mode_capable)
    area = CODECS[id(layout)].unpack(machine.memory.read(smm.smbase + L.SAVE_AREA, L.SAVE_AREA_SIZE))
    if not smm.inside_nmi:
        cpu.nmi_blocked = False
    smm.in_smm = smm.inside_nmi = False
    machine.smram.set_smm(False)
    try:
        restored = _restore_64(machine, area) if layout == L.SMRAM_STATE_64 else _restore_32(machine, area)
    except InvalidSavedState as why:
        machine.request_stop_shutdown(f"RSM: {why}")
        return
    if profile.smm_restart_fields:
        io_fields = IO_RESTART_64 if layout is L.SMRAM_STATE_64 else IO_RESTART_32
        if area["io_instruction_restart"]:    # run the I/O instruction that raised the SMI again
            rip, rcx, rsi, rdi = (area[name] for name in io_fields)
            cpu.rip, cpu["rcx"], cpu["rsi"], cpu["rdi"] = rip, rcx, rsi, rdi
            restored = rip
        elif area["auto_halt_restart"] & 1:
            machine.halted = True            # back to the HLT the SMI interrupted
    machine.events.append({"kind": "rsm", "instructions": machine.instructions_if_exact, "rip": restored,
                           "smbase": smm.smbase})
    machine.linear.flush()


def _new_smbase(profile, area: dict, old: int) -> int:
    """F.13: the APM and KVM always reload SMBASE; QEMU only with revision bit 17 set."""
    if profile.smm_smbase_needs_revision_bit and not area["revision"] & L.REVISION_SMBASE_RELOCATION:
        return old
    return area["smbase"]


def _restore_64(machine: "Machine", area: dict) -> int:
    profile = machine.profile
    cr0, cr3, cr4, efer = area["cr0"], area["cr3"], area["cr4"], area["efer"]
    dr6, dr7, rflags = area["dr6"], area["dr7"], area["rflags"] | 0x2
    segments = {name: Segment(area[f"{name}.selector"], area[f"{name}.base"], area[f"{name}.limit"],
                              L.flags_from_attributes_64(area[f"{name}.attributes"]))
                for name in (*SEGMENTS, "ldtr", "tr")}
    if profile.rsm_checks:
        _control_checks(profile, cr0, cr3, cr4, efer, dr6, dr7, True)
    if profile.rsm_apm_checks:
        _check(area["revision"] != revision(machine, L.SMRAM_STATE_64),
               f"revision identifier modified ({area['revision']:#x})")
        cs = segments["cs"]
        _check(efer & EFER_LME and cr0 & CR0_PG and cs.flags & FLAG_L and cs.flags & FLAG_DB,
               "long-mode return with CS.L and CS.D both set")
    if profile.rsm_recomputes_lma:
        efer = (efer & ~EFER_LMA) | (EFER_LMA if efer & EFER_LME and cr0 & CR0_PG and cr4 & CR4_PAE else 0)
    if profile.rsm_apm_checks and (not cr0 & CR0_PE or efer & EFER_LMA):
        rflags &= ~RFLAGS_VM
    machine.smm.smbase = _new_smbase(profile, area, machine.smm.smbase)
    machine.cpu.load(ArchState({name: area[name] for name in GPRS}, area["rip"], rflags, segments,
                               (area["gdtr_base"], area["gdtr_limit"] & 0xFFFF),
                               (area["idtr_base"], area["idtr_limit"] & 0xFFFF),
                               cr0, cr3, cr4, efer, dr6, dr7, segments["ss"].dpl if cr0 & CR0_PE else 0))
    return area["rip"]


def _restore_32(machine: "Machine", area: dict) -> int:
    cpu, profile = machine.cpu, machine.profile
    shifted = profile.smm_shifted_attributes_32
    cr0, cr3, cr4, dr6, dr7 = area["cr0"], area["cr3"], area["cr4"], area["dr6"], area["dr7"]
    if profile.rsm_checks:
        _control_checks(profile, cr0, cr3, cr4, 0, dr6, dr7, False)
    if profile.rsm_apm_checks:
        _check(area["revision"] != revision(machine, L.SMRAM_STATE_32),
               f"revision identifier modified ({area['revision']:#x})")
    segments = {name: Segment(area[f"{name}_selector"] & 0xFFFF, area[f"{name}_cache.base"],
                              area[f"{name}_cache.limit"], L.flags_from_32(area[f"{name}_cache.flags"], shifted))
                for name in (*SEGMENTS, "ldtr", "tr")}
    rflags = area["eflags"] | 0x2
    if profile.rsm_apm_checks and not cr0 & CR0_PE:
        rflags &= ~RFLAGS_VM
    gprs = dict(cpu.capture().gprs)
    gprs.update({wide: area[narrow] for wide, narrow in GPR_PAIRS_32})
    machine.smm.smbase = _new_smbase(profile, area, machine.smm.smbase)
    cpu.load(ArchState(gprs, area["eip"], rflags, segments, (area["gdtr_base"], area["gdtr_limit"] & 0xFFFF),
                       (area["idtr_base"], area["idtr_limit"] & 0xFFFF), cr0, cr3, cr4, cpu["efer"], dr6, dr7,
                       segments["ss"].dpl if cr0 & CR0_PE else 0))
    return area["eip"]
