"""Boot states: the CPU and system tables a guest starts with.

Where the machine puts its system tables in guest RAM (protected and long mode):

=================  ===========  ===============================================
GDT                0x1000       null, code32/data ring 0 (0x08/0x10), code32/data ring 3
                                (0x18/0x20), code64 ring 0/3 (0x28/0x30), TSS (0x38)
TSS                0x1100       ESP0/RSP0 = RING0_STACK_TOP, all-zero I/O bitmap (every port
                                allowed at any CPL)
IDT                0x4000       256 interrupt gates, all not present (8 bytes each in
                                protected mode, 16 in long mode); a guest finds it with SIDT
trampoline         0x3800       ``ltr; iret`` — how the machine enters the guest's CPL
page tables        0x10000      long mode: PML4, PDPT, then one PD per GiB of RAM, 2 MiB
                                pages, identity map of all RAM, user + writable
guest stack        0x80000      initial RSP for protected and long mode (any CPL)
ring-0 stack       0x9F000      TSS stack for events that change privilege
=================  ===========  ===============================================

Images for these modes must stay out of SYSTEM_AREA (0x1000-0x9FFFF).
"""
from __future__ import annotations

import struct
from enum import Enum

from ..arch.control import CR4_PAE, EFER_LMA, EFER_LME
from ..arch.models import MODELS
from ..arch.registers import GPRS
from ..arch.segments import (FLAG_P, FLAG_S, SYS_INT_GATE, SYS_LDT, SYS_TSS32_AVAILABLE, SYS_TSS32_BUSY,
                          Segment, pack_descriptor, pack_gate, pack_system_descriptor64, unpack_descriptor)


class BootState(Enum):
    REAL = "real"
    PROTECTED = "protected"
    LONG = "long"
    BIOS = "bios"


DEFAULT_LOAD = {BootState.REAL: 0x7C00, BootState.PROTECTED: 0x100000, BootState.LONG: 0x100000}

GDT_BASE = 0x1000
TSS_BASE = 0x1100
TRAMPOLINE = 0x3800
IDT_BASE = 0x4000
PAGE_TABLES = 0x10000
MAX_IDENTITY_GIB = 64
GUEST_STACK_TOP = 0x80000
RING0_STACK_TOP = 0x9F000
REAL_MODE_STACK_TOP = 0x7C00
SYSTEM_AREA = range(0x1000, 0xA0000)     # protected/long mode: tables, trampoline, stacks

SEL_CODE32, SEL_DATA, SEL_CODE32_USER, SEL_DATA_USER = 0x08, 0x10, 0x18, 0x20
SEL_CODE64, SEL_CODE64_USER, SEL_TSS = 0x28, 0x30, 0x38

TSS_LIMIT = 0x68 + 0x2000          # 104-byte TSS + 8 KiB I/O bitmap (+ the 0xFF terminator)
RESET_CR0 = 0x6000_0010            # CD | NW | ET
RESET_DR6, RESET_DR7 = 0xFFFF_0FF0, 0x400
PROTECTED_CR0 = 0x11               # PE | ET
LONG_CR0 = 0x8000_0011             # PG | PE | ET

# QEMU's CPU models: the CPUID.1 signature EDX holds at reset.
# qemu64: family 15, model 107, stepping 1; qemu32: family 6, model 6, stepping 3.

RESET_CODE = FLAG_P | FLAG_S | (0xB << 8)        # 0x9B: code, readable, accessed
RESET_DATA = FLAG_P | FLAG_S | (0x3 << 8)        # 0x93: data, writable, accessed
RESET_DATA_SEGMENT = Segment(0, 0, 0xFFFF, RESET_DATA)
RESET_SYSTEM_SEGMENTS = {"ldtr": Segment(0, 0, 0xFFFF, FLAG_P | (SYS_LDT << 8)),
                         "tr": Segment(0, 0, 0xFFFF, FLAG_P | (SYS_TSS32_BUSY << 8))}
RESET_TABLE_LIMIT = 0xFFFF                       # GDTR and IDTR: base 0


def reset_state(machine, cs_selector: int, cs_base: int, ip: int) -> None:
    """The register state QEMU's x86_cpu_reset leaves, with CS:IP as given."""
    cpu = machine.cpu
    for name in GPRS:
        cpu[name] = 0
    cpu.set_mode_state(RESET_CR0, 0, 0)
    cpu["cr3"] = 0
    cpu["cr2"] = 0
    segments = {name: RESET_DATA_SEGMENT for name in ("ds", "es", "fs", "gs", "ss")}
    segments["cs"] = Segment(cs_selector, cs_base, 0xFFFF, RESET_CODE)
    cpu.load_segments({**segments, **RESET_SYSTEM_SEGMENTS}, cpl=0)
    cpu.set_table_register("gdtr", 0, RESET_TABLE_LIMIT)
    cpu.set_table_register("idtr", 0, RESET_TABLE_LIMIT)
    cpu["rflags"] = 0x2
    cpu["dr6"], cpu["dr7"] = RESET_DR6, RESET_DR7
    cpu["edx"] = MODELS[machine.cpu_model].signature
    cpu.rip = ip


def boot_real(machine, entry: int) -> None:
    """CS:IP = 0:entry (entry above 0xFFFF: CS = entry >> 4, IP = entry & 0xF), SP = 0x7C00."""
    selector, ip = (0, entry) if entry <= 0xFFFF else (entry >> 4, entry & 0xF)
    if selector > 0xFFFF:
        raise ValueError(f"real-mode entry {entry:#x} is above 1 MiB")
    reset_state(machine, selector, selector << 4, ip)
    machine.cpu["rsp"] = REAL_MODE_STACK_TOP


def boot_bios(machine) -> None:
    """QEMU's reset state for ``-bios``: CS 0xF000 based at 0xFFFF0000, IP 0xFFF0."""
    reset_state(machine, 0xF000, 0xFFFF_0000, 0xFFF0)


def _gdt() -> bytes:
    flat = 0xFFFFFFFF
    entries = [
        b"\0" * 8,
        pack_descriptor(0, flat, 0xC09B),      # 0x08 code32, ring 0
        pack_descriptor(0, flat, 0xC093),      # 0x10 data, ring 0
        pack_descriptor(0, flat, 0xC0FB),      # 0x18 code32, ring 3
        pack_descriptor(0, flat, 0xC0F3),      # 0x20 data, ring 3
        pack_descriptor(0, flat, 0xA09B),      # 0x28 code64, ring 0
        pack_descriptor(0, flat, 0xA0FB),      # 0x30 code64, ring 3
        pack_system_descriptor64(TSS_BASE, TSS_LIMIT, 0x80 | SYS_TSS32_AVAILABLE),  # 0x38 TSS
    ]
    return b"".join(entries)


def _tss(long_mode: bool) -> bytes:
    tss = bytearray(TSS_LIMIT + 1)
    if long_mode:
        struct.pack_into("<Q", tss, 4, RING0_STACK_TOP)            # RSP0
    else:
        struct.pack_into("<IH", tss, 4, RING0_STACK_TOP, SEL_DATA)  # ESP0, SS0
    struct.pack_into("<H", tss, 0x66, 0x68)                        # I/O bitmap right after
    tss[-1] = 0xFF                                                 # bitmap terminator
    return bytes(tss)


def _page_tables(ram_end: int) -> tuple[bytes, int]:
    """Identity map of all RAM (up to ``ram_end``) with 2 MiB pages (user, writable);
    returns (bytes, CR3)."""
    gib = max(1, -(-ram_end // (1 << 30)))
    if gib > MAX_IDENTITY_GIB:
        raise ValueError(f"long-mode identity map covers at most {MAX_IDENTITY_GIB} GiB")
    pml4 = struct.pack("<Q", (PAGE_TABLES + 0x1000) | 0x7).ljust(0x1000, b"\0")
    pdpt = b"".join(struct.pack("<Q", (PAGE_TABLES + 0x2000 + i * 0x1000) | 0x7)
                    for i in range(gib)).ljust(0x1000, b"\0")
    pds = b"".join(struct.pack("<Q", (i << 21) | 0x87) for i in range(gib * 512))
    return pml4 + pdpt + pds, PAGE_TABLES


def _trampoline(long_mode: bool) -> bytes:
    """``mov ax, SEL_TSS; ltr ax; iret`` — the IRET frame is written by the machine."""
    ltr = bytes.fromhex("66b8") + struct.pack("<H", SEL_TSS) + bytes.fromhex("0f00d8")
    return ltr + (bytes.fromhex("48cf") if long_mode else b"\xcf")


def boot_flat(machine, entry: int, long_mode: bool, cpl: int) -> None:
    """Protected or long mode, flat segments, the tables above, entered at ``cpl``."""
    cpu, mem = machine.cpu, machine.memory
    if mem.ram_size < RING0_STACK_TOP + 0x1000:
        raise ValueError("protected and long mode need at least 1 MiB of guest RAM")
    reset_state(machine, 0, 0, 0)
    gdt = _gdt()
    mem.load(GDT_BASE, gdt)
    mem.load(TSS_BASE, _tss(long_mode))
    # Every gate a valid interrupt gate with P = 0: a fault raises #NP, not #GP for a bad type.
    ring0_code = SEL_CODE64 if long_mode else SEL_CODE32
    mem.load(IDT_BASE, pack_gate(0, ring0_code, SYS_INT_GATE, present=False, long_mode=long_mode) * 256)
    cpu.set_table_register("gdtr", GDT_BASE, len(gdt) - 1)
    cpu.set_table_register("idtr", IDT_BASE, 256 * (16 if long_mode else 8) - 1)
    if long_mode:
        tables, cr3 = _page_tables(mem.ram_end)
        mem.load(PAGE_TABLES, tables)
        cpu["cr3"] = cr3
        cpu.set_mode_state(LONG_CR0, CR4_PAE, EFER_LME | EFER_LMA)
        code = SEL_CODE64_USER if cpl == 3 else SEL_CODE64
    else:
        cpu.set_mode_state(PROTECTED_CR0, 0, 0)
        code = SEL_CODE32_USER if cpl == 3 else SEL_CODE32
    data = SEL_DATA_USER if cpl == 3 else SEL_DATA
    flat = {name: unpack_descriptor(gdt[SEL_DATA:SEL_DATA + 8], SEL_DATA) for name in ("ds", "es", "fs", "gs", "ss")}
    flat["cs"] = unpack_descriptor(gdt[ring0_code:ring0_code + 8], ring0_code)
    cpu.load_segments(flat, cpl=0)
    # Enter the guest the architectural way: LTR, then IRET to (CS|cpl):entry with SS|cpl:stack.
    code_selector, data_selector = code | cpl, data | cpl
    if long_mode:
        frame = struct.pack("<5Q", entry, code_selector, 0x2, GUEST_STACK_TOP, data_selector)
    elif cpl == 3:
        frame = struct.pack("<5I", entry, code_selector, 0x2, GUEST_STACK_TOP, data_selector)
    else:
        frame = struct.pack("<3I", entry, code_selector, 0x2)
    frame_address = (GUEST_STACK_TOP if cpl == 0 and not long_mode else RING0_STACK_TOP) - len(frame)
    mem.load(frame_address, frame)
    mem.load(TRAMPOLINE, _trampoline(long_mode))
    cpu["rsp"] = frame_address
    machine.uc.ctl_flush_tb()           # code translated by an earlier run must not run in the count
    machine.uc.emu_start(TRAMPOLINE, entry, count=3)
    cpu["rax"] = 0                                      # the trampoline's scratch register
    if cpu.rip != entry or cpu.cpl != cpl:
        raise RuntimeError(f"entering CPL {cpl} at {entry:#x} failed (rip {cpu.rip:#x}, cpl {cpu.cpl})")
    if cpl == 0 and not long_mode:
        # Same-privilege IRET leaves SS alone: give data segments and SS the flat data cache.
        cpu.load_segments({name: flat[name] for name in ("ds", "es", "fs", "gs", "ss")}, cpl=0)
    else:
        for name in ("ds", "es", "fs", "gs"):
            cpu.load_segments({name: unpack_descriptor(gdt[data:data + 8], data_selector)})
    mem.load(TRAMPOLINE, bytes(0x10))


def overlaps_system_area(start: int, end: int) -> bool:
    return start < SYSTEM_AREA.stop and end > SYSTEM_AREA.start


def boot(machine, state: BootState, entry: int, cpl: int = 0) -> None:
    if cpl not in (0, 3):
        raise ValueError("cpl must be 0 or 3")
    if cpl == 3 and state not in (BootState.PROTECTED, BootState.LONG):
        raise ValueError("--cpl 3 needs --boot protected or long")
    if state is BootState.REAL:
        boot_real(machine, entry)
    elif state is BootState.BIOS:
        boot_bios(machine)
    else:
        boot_flat(machine, entry, state is BootState.LONG, cpl)
