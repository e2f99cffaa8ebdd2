"""Nested paging under the ``replay`` campaign: an in-guest L1 (machine code below, no
assembler needed) VMRUNs an L2 of random code in a loop, under nested tables at N_CR3 that
map guest-physical = host-physical with random damage — entries not present, read-only,
supervisor, no-execute, with reserved bits, remapped — so that #NPF exits, guest faults
through both stages and exits taken while an event is delivered all happen.  The replay
campaign compares split, replayed and restored-elsewhere runs of it as of any scenario.

``check_exits`` is an oracle of its own for every #NPF the run logged: a walk of the nested
tables written here, apart from ringminus's, must find the fault EXITINFO1 names at
EXITINFO2 — an entry not present, a reserved bit, or a right the access lacks."""
from __future__ import annotations

import random
import struct
from dataclasses import dataclass

from .. import Machine
from ..intercepts.vmcb import VMCB_SIZE, vmcb_view
from . import Finding

L1_CODE, L2_CODE, L2_STACK = 0x100000, 0x200000, 0x280000
VMCB, HSAVE, COUNTER = 0x180000, 0x181000, 0x182000
NPT = 0x190000                               # PML4, PDPT, PD, then the 4 KiB tables of 0-4 MiB
PML4, PDPT, PD, PT = NPT, NPT + 0x1000, NPT + 0x2000, NPT + 0x3000
L1_TABLES = (0x10000, 0x11000, 0x12000)      # the long boot state's PML4, PDPT, PD
NPF = 0x400
PRESENT, WRITABLE, USER, PAGE_SIZE, NO_EXECUTE = 1, 2, 4, 0x80, 1 << 63
ACCESSED_DIRTY = 0x60
MAX_PHYS_BITS = 40                           # the max model's
VMRUNS = 40
# EXITINFO1
P, W, U, RSV, ID, FINAL, TABLE = 1, 2, 4, 8, 16, 1 << 32, 1 << 33


def _l1_code(host_nx: bool) -> bytes:
    """EFER.SVME (and NXE), VM_HSAVE_PA; then VMRUNs, each resuming L2 at NRIP or, where the
    exit has none (#NPF, an exception), one byte on; until the counter at COUNTER ends."""
    setup = (b"\xb9\x80\x00\x00\xc0\x0f\x32" + b"\x0d" + struct.pack("<I", 0x1000 | (0x800 if host_nx else 0))
             + b"\x0f\x30\xb9\x17\x01\x01\xc0\xb8" + struct.pack("<I", HSAVE) + b"\x31\xd2\x0f\x30")
    loop = (b"\x48\xc7\xc0" + struct.pack("<I", VMCB) + b"\x0f\x01\xd8"        # mov rax, VMCB; vmrun
            + b"\x48\x8b\x90\xc8\x00\x00\x00\x48\x85\xd2\x75\x0b"            # rdx = NRIP; jnz set
            + b"\x48\x8b\x90\x78\x05\x00\x00\x48\x83\xc2\x01"                  # rdx = save.rip + 1
            + b"\x48\x89\x90\x78\x05\x00\x00"                                    # set: save.rip = rdx
            + b"\x48\xff\x0c\x25" + struct.pack("<I", COUNTER))                 # dec qword [COUNTER]
    loop += b"\x75" + struct.pack("<b", -(len(loop) + 2))
    return setup + loop + b"\xf4\xeb\xfd"                                        # hlt; jmp hlt


def _vmcb(guest_nx: bool) -> bytes:
    buffer = bytearray(VMCB_SIZE)
    v = vmcb_view(buffer)
    control, save = v["control"], v["save"]
    words = control["intercepts"]
    words[1] = 0xFFFF_FFFF                                                         # every exception
    words[3] = 1 << (0x78 - 0x60) | 1 << (0x7F - 0x60) | 0xF                       # HLT, SHUTDOWN, INTR..INIT
    words[4] = 1 << 0 | 1 << 1                                                     # VMRUN, VMMCALL
    control["guest_asid"], control["nested_control"], control["n_cr3"] = 1, 1, NPT
    for name, selector, attrib in (("cs", 0x28, 0xA9B), ("ds", 0x10, 0xC93), ("es", 0x10, 0xC93),
                                   ("ss", 0x10, 0xC93)):
        save[name]["selector"], save[name]["attrib"], save[name]["limit"] = selector, attrib, 0xFFFF_FFFF
    save["gdtr"]["base"], save["gdtr"]["limit"] = 0x1000, 0x47
    save["idtr"]["base"], save["idtr"]["limit"] = 0x4000, 0xFFF
    save["efer"] = 0x1500 | (0x800 if guest_nx else 0)
    save["cr0"], save["cr3"], save["cr4"] = 0x8000_0011, L1_TABLES[0], 0x20
    save["dr6"], save["dr7"], save["rflags"] = 0xFFFF_0FF0, 0x400, 0x2
    save["rip"], save["rsp"], save["g_pat"] = L2_CODE, L2_STACK, 0x0007_0406_0007_0406
    return bytes(buffer)


def _tables() -> dict[int, int]:
    """The identity map, entry address -> value: 4 KiB pages below 4 MiB, 2 MiB above."""
    entries = {PML4: PDPT | 7, PDPT: PD | 7, PD: PT | 7, PD + 8: (PT + 0x1000) | 7}
    entries.update({PD + 8 * i: (i << 21) | PAGE_SIZE | 7 for i in range(2, 512)})
    entries.update({PT + 8 * i: (i << 12) | 7 for i in range(1024)})
    return entries


def _pte(page: int) -> int:
    return PT + 8 * (page >> 12)


DAMAGE = ("not present", "read-only", "supervisor", "no-execute", "reserved", "remap", "large")


@dataclass(frozen=True)
class Setup:
    host_nx: bool
    guest_nx: bool
    damage: tuple[tuple[int, str, int], ...]    # (entry address, kind, parameter)


def random_setup(rng: random.Random) -> Setup:
    """Host and guest NX, and a few damaged nested entries: the pages L2 runs on, its stack,
    its page tables and data, or a table higher up."""
    pages = (L2_CODE, L2_STACK - 0x1000, *L1_TABLES, rng.randrange(0, 4 << 20, 0x1000))
    damage = []
    for _ in range(rng.choice((0, 1, 1, 2, 3))):
        where = rng.choice((_pte(rng.choice(pages)), _pte(rng.choice(pages)), PML4, PDPT, PD, PD + 8))
        kind = rng.choice(DAMAGE)
        damage.append((where, kind, rng.choice((8, 51, 52, 62, 63, rng.randrange(MAX_PHYS_BITS, 52)))
                       if kind == "reserved" else rng.randrange(0, 4 << 20, 0x1000)))
    return Setup(rng.random() < 0.5, rng.random() < 0.5, tuple(damage))


def _damaged(value: int, kind: str, parameter: int) -> int:
    return {"not present": value & ~PRESENT, "read-only": value & ~WRITABLE, "supervisor": value & ~USER,
            "no-execute": value | NO_EXECUTE, "reserved": value | 1 << parameter,
            "remap": value & 0xFFF | parameter, "large": value | PAGE_SIZE}[kind]


def build(setup: Setup, code: bytes, profile: str, memory_size: int) -> Machine:
    machine = Machine(memory_size=max(memory_size, 4 << 20), cpu_model="max", profile=profile)
    machine.write_memory(L1_CODE, _l1_code(setup.host_nx))
    machine.write_memory(L2_CODE, code + b"\xf4")
    machine.write_memory(VMCB, _vmcb(setup.guest_nx))
    machine.write_memory(COUNTER, struct.pack("<Q", VMRUNS))
    entries = _tables()
    for where, kind, parameter in setup.damage:
        entries[where] = _damaged(entries[where], kind, parameter)
    for table in (PML4, PDPT, PD, PT, PT + 0x1000):
        machine.write_memory(table, struct.pack("<512Q", *(entries.get(table + 8 * i, 0) for i in range(512))))
    machine.boot("long", L1_CODE)
    return machine


# -- the oracle ---------------------------------------------------------------------------------

def _expected_tables(setup: Setup) -> dict[int, int]:
    entries = _tables()
    for where, kind, parameter in setup.damage:
        entries[where] = _damaged(entries[where], kind, parameter)
    return entries


def _explains(entries: dict[int, int], setup: Setup, pml4e_bit8: bool, info1: int, address: int) -> str | None:
    """None where the nested tables (as built: 4-level, the host's NX) refuse an access to
    ``address`` the way EXITINFO1 says; else what is wrong with that."""
    high = ((1 << 52) - (1 << MAX_PHYS_BITS)) | (0 if setup.host_nx else NO_EXECUTE)
    reserved_by_level = (high | PAGE_SIZE | (1 << 8 if pml4e_bit8 else 0), high | PAGE_SIZE, high, high)
    table, user, writable, executable = NPT, True, True, True
    for level, shift in enumerate((39, 30, 21, 12)):
        entry = entries.get(table + 8 * ((address >> shift) & 0x1FF), 0)
        if not entry & PRESENT:
            return None if not info1 & (P | RSV) else f"level {level} is not present"
        large = level == 2 and bool(entry & PAGE_SIZE)
        if entry & (high | 0x1FE000 if large else reserved_by_level[level]):
            return None if info1 & RSV else f"level {level} has reserved bits"
        user &= bool(entry & USER)
        writable &= bool(entry & WRITABLE)
        executable &= not (setup.host_nx and entry & NO_EXECUTE)
        if large:
            break
        table = entry & 0x000F_FFFF_FFFF_F000
    if info1 & RSV or not info1 & P:
        return "every level is present, none reserved"
    refused = not user or (info1 & W and not writable) or (info1 & ID and not executable)
    return None if refused else "every right is there"


def check_exits(machine: Machine, setup: Setup) -> None:
    """Every #NPF the run took: one of final/table with US set, and the tables refuse it
    (unless the guest wrote into the tables themselves: then they are not what the walk saw)."""
    entries = _expected_tables(setup)
    for table in (PML4, PDPT, PD, PT, PT + 0x1000):
        now = struct.unpack("<512Q", machine.read_memory(table, 0x1000))
        if any(value & ~ACCESSED_DIRTY != entries.get(table + 8 * i, 0) for i, value in enumerate(now)):
            return
    for event in machine.events:
        code = event.get("code") if isinstance(event, dict) else getattr(event, "code", None)
        if code != NPF:
            continue
        info1, address = (event["info1"], event["info2"]) if isinstance(event, dict) else (event.info1, event.info2)
        if bool(info1 & FINAL) == bool(info1 & TABLE) or not info1 & U:
            raise Finding("contract", f"#NPF EXITINFO1 {info1:#x}: not one of final/table, or no US")
        why = _explains(entries, setup, machine.profile.nested_pml4e_bit8_reserved, info1, address)
        if why is not None:
            raise Finding("disagreement", f"#NPF at {address:#x}, EXITINFO1 {info1:#x}: {why} [{setup}]",
                          key=f"npf: {why}")
