"""Campaign ``savemap``: corrupted SMM state-save maps under every profile and both layouts.

One run boots a guest in real, protected or long mode (long only on qemu64), with random
register values (high halves included), and has it take an SMI — an ``out 0xb2`` with
``apm_smi``, an SMI at a random instruction count, or one that finds the CPU halted.  The SMI
handler at SMBASE+0x8000 is a bare RSM, in plain RAM, in the A-segment or in a TSEG-style
range; a breakpoint stops the run there, in SMM, and Python rewrites random fields of the map
(smm/layouts.py: the 64-bit map on qemu64, the 32-bit one on qemu32) with random and edge
values, or one of the combinations that reach deep paths (PAE paging with CR3 outside RAM, a
long-mode return, FED8h/FEE0h for an SMI "in guest mode", I/O and auto-HALT restart, SMBASE
relocation), sometimes with an NMI, SMI or INIT waiting; then RSM runs.  Expected: normal
continuation, a delivered event, or a ``shutdown`` stop with its reason — never an
exception (streams.check_run holds for every round).

A run whose map is left alone checks the round trip instead: after RSM the CPU must hold the
registers it had when the SMI arrived.
"""
from __future__ import annotations

import random

from . import Finding
from .streams import MB, RUN_TIMEOUT, check_run, interesting_value, mov_imm, random_stream
from ..emulator import StopReason
from ..machine import Machine
from ..emulator.boot import PAGE_TABLES
from ..arch.registers import GPRS
from ..arch.exitcodes import ExitCode
from ..intercepts.profiles import PROFILES
from ..intercepts.vmcb import new_vmcb, set_intercept_vector, write_segment
from ..smm import layouts as L

RSM = b"\x0f\xaa"
APM_OUT = b"\xe6\xb2"                       # out 0xb2, al
CODE_AT = {"real": 0x7C00, "protected": 0x100000, "long": 0x100000}
BITS = {"real": 16, "protected": 32, "long": 64}
BUDGET = 400


def map_fields(layout) -> list[tuple[str, int, int]]:
    """Every field of a map as (path, offset in the map, size): records by member."""
    fields = []
    for name, (dtype, offset, *_) in layout.fields.items():
        if dtype.fields is None:
            fields.append((name, offset, dtype.itemsize))
            continue
        for member, (sub, sub_offset, *_) in dtype.fields.items():
            fields.append((f"{name}.{member}", offset + sub_offset, sub.itemsize))
    return fields


FIELDS = {64: map_fields(L.SMRAM_STATE_64), 32: map_fields(L.SMRAM_STATE_32)}
FIELD_AT = {bits: {path: (offset, size) for path, offset, size in fields} for bits, fields in FIELDS.items()}

CR0_VALUES = (0x8000_0011, 0x8000_0001, 0x6000_0010, 0xE000_0011, 0x2000_0011, 0x1_0000_0011, 0x11, 0x10, 0,
              0x8000_0000, 0x6000_0011, 0x8005_003B)
CR4_VALUES = (0, 0x20, 0x10, 0x30, 0x200, 0x800, 0x1000, 0x2000, 0x40_0000, 0x8000_0000, 0xFFFF_FFFF)
EFER_VALUES = (0, 0x100, 0x400, 0x500, 0xD00, 0xD01, 0x1000, 0x1500, 0x8000, 0x10000, 0xFFFF_FFFF)
ATTRIBUTE_VALUES = (0xA09B, 0xE09B, 0xC09B, 0xC093, 0x0093, 0x009B, 0x00F3, 0x00FB, 0x4093, 0x0089, 0x0082,
                    0x008B, 0, 0xFFFF, 0x0F0FF, 0x20FB, 0x0003)


def _field_value(rng: random.Random, path: str, size: int, old: int, ram: int) -> int:
    name = path.split(".")[-1] if "." in path else path
    choices = {
        "cr0": CR0_VALUES, "cr4": CR4_VALUES, "efer": EFER_VALUES,
        "cr3": (0x8785_D000, PAGE_TABLES, ram - 0x1000, ram, 0x1000_0000, 1 << 52, 0xFFFF_F000, 0x9000),
        "attributes": ATTRIBUTE_VALUES, "flags": tuple(a << 8 for a in ATTRIBUTE_VALUES) + ATTRIBUTE_VALUES,
        "smbase": (0xFFFF_FFFF, 0xA0000, 0x98000, 0x30000, ram - 0x8000, ram, 0x1234, 0xFFFF_0000),
        "svm_guest": (1, 0xFF, 1 << 63),
        "svm_guest_vmcb": (ram + 0x1000, 0xFFFF_FFFF_FFFF_F000, 0x200000, 0x1000, ram - 0x1000, 0x123),
        "io_instruction_restart": (1, 0xFF), "auto_halt_restart": (1, 0xFF, 2),
        "rflags": (0x2_0002, 0x102, 0x3002, 0x4_0002, 0xFFFF_FFFF, 0), "eflags": (0x2_0002, 0x102, 0x3002, 0),
    }.get(name)
    if choices and rng.random() < 0.7:
        value = rng.choice(choices)
    else:
        value = rng.choice((0, (1 << 8 * size) - 1, rng.getrandbits(8 * size), 1 << rng.randrange(8 * size),
                            old ^ (1 << rng.randrange(8 * size)), old + rng.choice((1, -1, 0x1000)),
                            interesting_value(rng, 8 * size)))
    return value & ((1 << 8 * size) - 1)


def _set(area: bytearray, bits: int, path: str, value: int) -> None:
    offset, size = FIELD_AT[bits][path]
    area[offset:offset + size] = (value & ((1 << 8 * size) - 1)).to_bytes(size, "little")


def _get(area: bytes, bits: int, path: str) -> int:
    offset, size = FIELD_AT[bits][path]
    return int.from_bytes(area[offset:offset + size], "little")


def _scenario(rng: random.Random, area: bytearray, bits: int, ram: int) -> str:
    """One of the combinations that reach a deep path of RSM (issue 11 classes C and D)."""
    cr = {64: ("cr0", "cr3", "cr4"), 32: ("cr0", "cr3", "cr4")}[bits]
    kind = rng.choice(("pae-cr3", "long-return", "svm-guest", "io-restart", "auto-halt", "smbase", "revision"))
    if kind == "pae-cr3":
        _set(area, bits, cr[0], 0x8000_0011)
        _set(area, bits, cr[2], 0x20)
        _set(area, bits, cr[1], rng.choice((0x8785_D000, ram, ram - 0x20, 0xFFFF_FFE0, 0x9000)))
        if bits == 64:
            _set(area, bits, "efer", rng.choice((0, 0x800)))
    elif kind == "long-return" and bits == 64:
        _set(area, bits, "efer", rng.choice((0x500, 0x100, 0xD00, 0x1500)))
        _set(area, bits, "cr0", rng.choice((0x8000_0011, 0x8000_0001, 0x11)))
        _set(area, bits, "cr4", rng.choice((0x20, 0, 0x30)))
        _set(area, bits, "cr3", rng.choice((PAGE_TABLES, ram + 0x1000, 0x9000, 0)))
        _set(area, bits, "cs.attributes", rng.choice((0xA09B, 0xE09B, 0xC09B, 0x209B)))
        _set(area, bits, "rip", rng.choice((0x100000, 1 << 47, 0xFFFF_8000_0000_0000, 0x7C00)))
    elif kind == "svm-guest" and bits == 64:
        _set(area, bits, "svm_guest", 1)
        _set(area, bits, "svm_guest_vmcb", rng.choice((ram + 0x1000, 0x200000, 0x1000, ram - 0x1000, 1 << 51,
                                                       0xFFFF_FFFF_FFFF_F000)))
    elif kind == "io-restart":
        _set(area, bits, "io_instruction_restart", rng.choice((1, 0xFF)))
        names = ("io_restart_rip", "io_restart_rcx") if bits == 64 else ("io_restart_eip", "io_restart_ecx")
        for name in names:
            if rng.random() < 0.6:
                _set(area, bits, name, interesting_value(rng, 64))
    elif kind == "auto-halt":
        _set(area, bits, "auto_halt_restart", rng.choice((1, 0xFF, 3)))
    elif kind == "smbase":
        _set(area, bits, "smbase", rng.choice((0xFFFF_FFFF, 0xA0000, 0x98000, ram - 0x8000, 0x1234, ram)))
        _set(area, bits, "revision", _get(area, bits, "revision") | rng.choice((0, L.REVISION_SMBASE_RELOCATION)))
    else:
        _set(area, bits, "revision", rng.getrandbits(32))
    return kind


def _place_smm(rng: random.Random, machine: Machine, ram: int) -> int:
    """Where SMBASE is (plain RAM, the A-segment or a TSEG-style range) and its RSM handler."""
    where = rng.choice(("ram", "ram", "aseg", "tseg"))
    if where == "ram":
        smbase = rng.choice((L.DEFAULT_SMBASE, 0x40000, ram - 0x10000))
        machine.set_smbase(smbase)
        machine.write_memory(smbase + L.ENTRY_OFFSET, RSM)
        return smbase
    if where == "aseg":
        smbase = 0xA0000 - L.ENTRY_OFFSET           # handler at 0xA0000, map at 0xA7E00
    else:
        smbase = ram - 0x10000 if rng.random() < 0.5 else 0x8000_0000
        machine.smram.add_range(smbase, 0x10000)
    machine.smram.set_state(rng.choice(("open", "closed", "locked")))
    machine.set_smbase(smbase)
    machine.load_smram(smbase + L.ENTRY_OFFSET, RSM)
    return smbase


def _plain(rng: random.Random) -> tuple[Machine, int, int | None]:
    """A guest in real, protected or long mode that takes its SMI outside guest mode."""
    cpu_model = rng.choice(("qemu64", "qemu32"))
    state = rng.choice(("real", "protected", "long") if cpu_model == "qemu64" else ("real", "protected"))
    ram = rng.choice((2 * MB, 4 * MB, 16 * MB))
    trigger = rng.choice(("apm", "count", "halted"))
    machine = Machine(memory_size=ram, cpu_model=cpu_model, chipset=rng.choice(("q35", "pc")),
                      profile=rng.choice(sorted(PROFILES)), apm_smi=trigger == "apm" or rng.random() < 0.3)
    bits, code_at = BITS[state], CODE_AT[state]
    ctx = {"ram": ram, "code": code_at}
    before = random_stream(rng, bits, ctx, rng.randint(0, 3)) if rng.random() < 0.3 else b""
    after = random_stream(rng, bits, ctx, rng.randint(0, 4)) if rng.random() < 0.5 else b""
    trigger_code = {"apm": APM_OUT, "count": b"\x90" * 4, "halted": b"\xf4"}[trigger]
    code = before + trigger_code + after + b"\xe6\xf4"
    machine.write_memory(code_at, code)
    machine.boot(state, code_at, rng.choice((0, 3)) if state != "real" and rng.random() < 0.3 else 0)
    for name in rng.sample(GPRS, rng.randint(0, 6)):           # high halves too (issue 11 class B)
        if name != "rsp":
            machine[name] = interesting_value(rng, 64)
    due = {"count": rng.randrange(8), "halted": rng.randrange(1, 50)}.get(trigger)
    if due is not None:
        machine.at_instruction(due, lambda m: m.raise_smi())
    return machine, ram, due


# The guest's own hypervisor (in-guest SVM): L1 at L1_AT sets EFER.SVME and VM_HSAVE_PA and
# VMRUNs the VMCB at VMCB_AT; its L2 at L2_AT (long mode, identity map) takes the SMI, so the
# 64-bit map gets FED8h = 1 and FEE0h = the VMCB, and RSM returns to L2.  After L2's VMMCALL
# (intercepted) L1 writes to the exit port.
L1_AT, L2_AT, VMCB_AT, HSAVE_AT, L2_STACK = 0x100000, 0x180000, 0x1C0000, 0x1C1000, 0x7F000


def _l1_code() -> bytes:
    return (mov_imm(64, 1, 0xC000_0080) + b"\x0f\x32" + b"\x0d\x00\x10\x00\x00" + b"\x0f\x30"   # EFER.SVME
            + mov_imm(64, 1, 0xC001_0117) + mov_imm(64, 0, HSAVE_AT) + b"\x31\xd2" + b"\x0f\x30"
            + mov_imm(64, 0, VMCB_AT) + b"\x0f\x01\xd8"                                      # VMRUN
            + b"\xe6\xf4")


def _svm_guest(rng: random.Random) -> tuple[Machine, int, int | None]:
    ram = rng.choice((4 * MB, 16 * MB))
    machine = Machine(memory_size=ram, cpu_model="qemu64", chipset=rng.choice(("q35", "pc")),
                      profile=rng.choice(sorted(PROFILES)))
    l2 = (b"\x90" * rng.randint(4, 30) + random_stream(rng, 64, {"ram": ram, "code": L2_AT}, rng.randint(0, 3))
          if rng.random() < 0.3 else b"\x90" * rng.randint(4, 30)) + b"\x0f\x01\xd9"      # ... VMMCALL
    machine.write_memory(L2_AT, l2)
    machine.boot("long", L2_AT)                        # the L2's state, for its VMCB
    record = new_vmcb()
    save, control = record["save"], record["control"]
    for name in ("es", "cs", "ss", "ds", "fs", "gs", "ldtr", "tr"):
        write_segment(save[name], machine.cpu.segment(name))
    for name in ("gdtr", "idtr"):
        save[name]["base"], save[name]["limit"] = machine.cpu.table_register(name)
    for name in ("cr0", "cr3", "cr4", "dr6", "dr7", "rflags", "rax"):
        save[name] = machine[name]
    save["rip"], save["rsp"], save["efer"] = L2_AT, L2_STACK, machine["efer"] | 0x1000
    intercepts = {ExitCode.VMRUN, ExitCode.VMMCALL} | set(rng.sample((ExitCode.HLT, ExitCode.CPUID, ExitCode.RSM,
                                                                         ExitCode.INTR, ExitCode.NMI), rng.randint(0, 2)))
    if rng.random() < 0.1:
        intercepts.add(ExitCode.SMI)                   # then the SMI is a #VMEXIT, not SMM
    set_intercept_vector(control, sum(1 << code for code in intercepts))
    control["guest_asid"] = 1
    machine.write_memory(VMCB_AT, record.tobytes())
    machine.write_memory(L1_AT, _l1_code())
    machine.boot("long", L1_AT)
    due = rng.randrange(11, 40)
    machine.at_instruction(due, lambda m: m.raise_smi())
    return machine, ram, due


def one_run(seed: int) -> None:
    rng = random.Random(seed)
    machine, ram, due = _svm_guest(rng) if rng.random() < 0.25 else _plain(rng)      # due: the SMI scheduled
    bits_map = 64 if machine.long_mode_capable else 32
    smbase = _place_smm(rng, machine, ram)
    # Old bytes in the map's place: a QEMU-style entry (smm_writes_over_memory) leaves every
    # byte it does not write, so RSM must read back only what the entry wrote (§F.11).
    stale = machine.profile.smm_writes_over_memory and rng.random() < 0.4
    if stale:
        old_bytes = rng.randbytes(L.SAVE_AREA_SIZE)
        if machine.smram.range_at(smbase + L.SAVE_AREA, L.SAVE_AREA_SIZE) is not None:
            machine.load_smram(smbase + L.SAVE_AREA, old_bytes)
        else:
            machine.write_memory(smbase + L.SAVE_AREA, old_bytes)
    machine.break_at(smbase + L.ENTRY_OFFSET)                   # linear: CS base = SMBASE in SMM
    result = machine.run(max_instructions=BUDGET, timeout=RUN_TIMEOUT)
    check_run(machine, result)
    if result.stop.reason is not StopReason.BREAKPOINT:
        return                                                  # the stream never got to its SMI
    if not result.smm["smm"]:
        raise Finding("contract", f"breakpoint at the SMI handler {smbase + L.ENTRY_OFFSET:#x} outside SMM",
                      key="SMI handler outside SMM")
    if machine.read_view(smbase + L.ENTRY_OFFSET, len(RSM)) != RSM:
        return                                                  # the stream wrote over its handler (plain RAM)
    address = smbase + L.SAVE_AREA
    saved = machine.read_view(address, L.SAVE_AREA_SIZE)
    area = bytearray(saved)
    changed = []
    if rng.random() < 0.25:
        pass                                                    # the round trip
    elif rng.random() < 0.4:
        changed.append(_scenario(rng, area, bits_map, ram))
    else:
        for path, offset, size in rng.sample(FIELDS[bits_map], rng.randint(1, 6)):
            _set(area, bits_map, path, _field_value(rng, path, size, _get(area, bits_map, path), ram))
            changed.append(path)
    if bytes(area) != saved:
        machine.memory.write(address, bytes(area))
    events_raised = rng.sample(("nmi", "smi", "init"), rng.choice((0, 0, 0, 1, 2)))
    for event in events_raised:
        {"nmi": machine.raise_nmi, "smi": machine.raise_smi, "init": machine.raise_init}[event]()
    # The round trip is checked where nothing else is to come: no event raised, none latched
    # in SMM, and not the scheduled SMI still due (an OUT to 0xB2 with apm_smi came first:
    # seed 5504847 — its SMI is taken right after RSM, before the instruction returned to).
    quiet = not events_raised and not machine.smm.pending and (due is None or machine.instructions > due)
    expected = _expected_after_rsm(machine, saved, bits_map) if bytes(area) == saved and quiet else None
    if expected is not None:
        machine.break_at(expected["linear"])
    try:
        # Auto-HALT restart set in the map (apm): RSM goes back to halt wherever RIP points
        # (APM §10.3.4; a map that did not come from a HLT makes that the handler's choice).
        halt_anywhere = machine.profile.smm_restart_fields and bool(_get(area, bits_map, "auto_halt_restart") & 1)
        reserved_ok = bytes(area) != saved and not machine.profile.rsm_checks
        result = machine.run(max_instructions=BUDGET, timeout=RUN_TIMEOUT)
        check_run(machine, result, halt_anywhere=halt_anywhere, reserved_ok=reserved_ok)
        if expected is not None and result.stop.reason is StopReason.BREAKPOINT and not result.smm["smm"]:
            _compare_round_trip(result.regs, expected, machine)
        elif expected is not None and not _fetch_faulted(result.events, expected["rip"]):
            rsm = next((e for e in reversed(result.events) if e.get("kind") == "rsm"), None)
            if rsm is not None and rsm["rip"] == expected["rip"]:
                raise Finding("contract", f"RSM returned to {expected['linear']:#x}, where break_at() was set, and the "
                              f"run ended with {result.stop.reason.value} instead of breakpoint",
                              key="break_at set after its code ran once is passed by")
            raise Finding("contract", f"RSM of an unmodified map ({machine.profile.name}, {bits_map}-bit"
                          f"{', over stale bytes' if stale else ''}) did not return to {expected['linear']:#x}: "
                          f"{result.stop.reason.value} {result.stop.detail or ''}".strip(),
                          key="RSM reads map bytes the SMI entry did not write" if stale else "RSM round trip does not return")
        for _ in range(rng.randint(0, 2)):
            if result.stop.reason not in (StopReason.BREAKPOINT, StopReason.LIMIT, StopReason.HLT):
                break
            result = machine.run(max_instructions=BUDGET, timeout=RUN_TIMEOUT)
            check_run(machine, result, halt_anywhere=halt_anywhere, reserved_ok=reserved_ok)
    except Exception as error:                              # the replay's traceback says what changed
        error.add_note(f"savemap: map fields changed before RSM: {', '.join(changed) or 'none'}; "
                       f"events raised in SMM: {', '.join(events_raised) or 'none'}")
        raise


def _fetch_faulted(events: list, rip: int) -> bool:
    """RSM returned to ``rip`` and fetching there faulted: the guest broke its own paging before
    the SMI (running on from a stale TLB), and RSM's CR3 load flushed the TLB."""
    at = max((i for i, e in enumerate(events) if e.get("kind") == "rsm"), default=None)
    return at is not None and any(e.get("kind") == "exception" and e.get("rip") == rip for e in events[at + 1:])


ROUND_TRIP_64 = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", *(f"r{n}" for n in range(8, 16)),
                 "rip", "cr0", "cr3", "cr4", "efer")
NARROW_64 = ("cr0", "cr4")
ROUND_TRIP_32 = {"eax": "rax", "ebx": "rbx", "ecx": "rcx", "edx": "rdx", "esi": "rsi", "edi": "rdi",
                 "ebp": "rbp", "esp": "rsp", "eip": "rip", "cr0": "cr0", "cr3": "cr3", "cr4": "cr4"}


def _expected_after_rsm(machine: Machine, saved: bytes, bits: int) -> dict | None:
    """What an unmodified map must give back: the registers it holds (the 32-bit map holds
    only the low halves), and the linear address RSM returns to."""
    if bits == 64:
        expected = {name: _get(saved, 64, name) for name in ROUND_TRIP_64}
        if machine.profile.smm_narrow_control_fields:   # QEMU writes and reads these as 32 bits
            for name in NARROW_64:
                expected[name] &= 0xFFFF_FFFF
        cs_base = _get(saved, 64, "cs.base")
    else:
        expected = {register: _get(saved, 32, name) for name, register in ROUND_TRIP_32.items()}
        cs_base = _get(saved, 32, "cs_cache.base")
    if machine.profile.smm_restart_fields and (_get(saved, bits, "auto_halt_restart") & 1):
        return None                                  # RSM returns to the halt, not to run on
    expected["linear"] = (cs_base + expected["rip"]) & 0xFFFF_FFFF_FFFF_FFFF
    expected["bits"] = bits
    return expected


def _compare_round_trip(regs: dict, expected: dict, machine: Machine) -> None:
    mask = 0xFFFF_FFFF if expected["bits"] == 32 else 0xFFFF_FFFF_FFFF_FFFF
    for name, value in expected.items():
        if name in ("linear", "bits"):
            continue
        got = regs[name] & mask
        if name == "efer":                            # LMA is recomputed by some profiles
            got, value = got & ~0x400, value & ~0x400
        if got != value:
            raise Finding("contract", f"RSM of an unmodified {expected['bits']}-bit map under "
                          f"{machine.profile.name}: {name} = {got:#x}, the map held {value:#x}",
                          key=f"RSM round trip changes {name} ({machine.profile.name}, {expected['bits']}-bit)")
