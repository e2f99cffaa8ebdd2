"""Run one vector as an L2 guest under a profile and compare what happened with its outcome.

Defaults (README "Vector files"): code at 0x7C00 (real) or 0x100000 (protected, long), the
foundation's boot state for every register the vector does not set, a breakpoint right after
the code (reaching it = the code completed), and in protected mode 32-bit identity paging
(4 KiB pages, user + writable) when ``memory.not_present`` is non-empty.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from ..emulator import Machine, StopReason
from ..emulator.boot import DEFAULT_LOAD, BootState
from ..intercepts.controls import InterceptControls
from ..intercepts.exitcodes import ExitCode
from .vectors import Outcome, Vector, VectorError

PAGING32_DIRECTORY = 0x20000           # protected mode: PD, then one page table per 4 MiB
SPLIT_TABLES = 0x40000                 # long mode: 4 KiB tables that replace split 2 MiB pages
MAX_INSTRUCTIONS = 100_000
TIMEOUT = 10.0
EXCEPTION_EVENTS = ("exception", "software-exception", "icebp")   # ICEBP delivers #DB (type 3)
PTE_PRESENT, PTE_LARGE = 1, 0x80


@dataclass(frozen=True)
class Result:
    vector: Vector
    profile: str
    status: str                  # "PASS", "FAIL", "SKIP"
    expected: Outcome | None
    got: Outcome | None

    def line(self) -> str:
        head = f"{self.status} {self.vector.name} [{self.profile}]"
        if self.status == "SKIP":
            return f"{head}: no outcome for this profile"
        if self.status == "FAIL":
            return f"{head}: expected {self.expected.kind} {self.expected.describe()}, got {self.got.kind} {self.got.describe()}"
        return head

    def as_dict(self) -> dict:
        return {"name": self.vector.name, "file": self.vector.source, "profile": self.profile,
                "status": self.status,
                "expected": None if self.expected is None else {"kind": self.expected.kind, **self.expected.fields},
                "got": None if self.got is None else {"kind": self.got.kind, **self.got.fields}}


def assemble(vector: Vector, bits: int, address: int) -> bytes:
    if vector.code is not None:
        return vector.code
    try:
        from keystone import KS_ARCH_X86, KS_MODE_16, KS_MODE_32, KS_MODE_64, Ks, KsError
    except ImportError:
        raise VectorError(f"{vector.source}: {vector.name}: 'asm' needs keystone-engine "
                          "(pip install 'ringminus[test]')") from None
    mode = {16: KS_MODE_16, 32: KS_MODE_32, 64: KS_MODE_64}[bits]
    try:
        encoding, _ = Ks(KS_ARCH_X86, mode).asm(vector.asm, address)
    except KsError as e:
        raise VectorError(f"{vector.source}: {vector.name}: cannot assemble: {e}") from None
    return bytes(encoding or b"")


def _identity_paging_32(machine: Machine, not_present) -> None:
    ram = machine.memory.ram_size
    tables = -(-ram // (4 << 20))
    directory = b"".join(struct.pack("<I", (PAGING32_DIRECTORY + 0x1000 * (i + 1)) | 0x7) for i in range(tables))
    machine.memory.load(PAGING32_DIRECTORY, directory.ljust(0x1000, b"\0"))
    entries = bytearray(b"".join(struct.pack("<I", (page << 12) | 0x7) for page in range(tables * 1024)))
    for address in not_present:
        page = address >> 12
        if page < tables * 1024:
            entries[page * 4] &= ~PTE_PRESENT & 0xFF
    machine.memory.load(PAGING32_DIRECTORY + 0x1000, bytes(entries))
    machine.cpu["cr3"] = PAGING32_DIRECTORY
    machine.cpu["cr0"] = machine.cpu["cr0"] | 0x8000_0000


def _unmap_long(machine: Machine, not_present) -> None:
    """Clear the 4 KiB pages of the long-mode identity map (splitting 2 MiB pages)."""
    mem = machine.memory
    spare = SPLIT_TABLES
    for address in not_present:
        table = machine.cpu["cr3"] & ~0xFFF
        for shift in (39, 30, 21):
            slot = table + ((address >> shift) & 0x1FF) * 8
            entry = mem.read_u(slot, 8)
            if not entry & PTE_PRESENT:
                break
            if shift == 21 and entry & PTE_LARGE:            # split the 2 MiB page
                base = entry & 0x000F_FFFF_FFE0_0000
                mem.load(spare, b"".join(struct.pack("<Q", (base + (i << 12)) | 0x7) for i in range(512)))
                mem.write_u(slot, 8, spare | 0x7)
                entry, spare = spare | 0x7, spare + 0x1000
            table = entry & 0x000F_FFFF_FFFF_F000
        else:
            slot = table + ((address >> 12) & 0x1FF) * 8
            mem.write_u(slot, 8, mem.read_u(slot, 8) & ~PTE_PRESENT)


def prepare(vector: Vector, profile: str) -> tuple[Machine, int]:
    state = BootState(vector.mode)
    bits = {"real": 16, "protected": 32, "long": 64}[vector.mode]
    address = DEFAULT_LOAD[state]
    code = assemble(vector, bits, address)
    machine = Machine()
    machine.write_memory(address, code)
    machine.boot(state, address, vector.cpl)
    if vector.not_present:
        (_unmap_long if state is BootState.LONG else _identity_paging_32)(machine, vector.not_present)
    for where, data in vector.memory_bytes:
        machine.write_memory(where, data)
    for name, value in vector.regs.items():
        machine[name] = value
    controls = InterceptControls()
    controls.set(*vector.intercepts)
    controls.intercept_exception(*vector.exceptions)
    if vector.iopm:
        controls.set(ExitCode.IOIO)
    for low, high in vector.iopm:
        controls.set_ports(low, high)
    if vector.msrpm:
        controls.set(ExitCode.MSR)
    for msr, read, write in vector.msrpm:
        controls.set_msr(msr, read, write)
    machine.enter_guest(controls, profile)
    end = address + len(code)
    machine.break_at(end)
    return machine, end


def observe(machine: Machine, result) -> Outcome:
    if result.stop.reason is StopReason.VMEXIT:
        v = result.vmexit
        return Outcome("vmexit", {"vmexit": v["code"], "info1": v["info1"], "info2": v["info2"],
                                  "next_rip": v["next_rip"], "stage": v["stage"], "rip": v["rip"]})
    first = next((e for e in result.events if e["kind"] in EXCEPTION_EVENTS), None)
    if first is not None:
        fields = {"exception": first["vector"]}
        fields.update({k: first[k] for k in ("error_code", "cr2") if k in first})
        return Outcome("exception", fields)
    if result.stop.reason is StopReason.BREAKPOINT:
        return Outcome("completes", {"completes": True, "regs": result.regs})
    return Outcome("stop", {"reason": result.stop.reason.value, "detail": result.stop.detail or ""})


def matches(expected: Outcome, got: Outcome) -> bool:
    if expected.kind != got.kind:
        return False
    e, g = expected.fields, got.fields
    if expected.kind == "vmexit":
        if e["vmexit"] != g["vmexit"]:
            return False
        if "next_rip" in e:
            want = e["next_rip"]
            want = g["rip"] + int(want[1:], 0) if isinstance(want, str) else want
            if g["next_rip"] != want:
                return False
        return all(e[k] == g[k] for k in ("info1", "info2", "stage") if k in e)
    if expected.kind == "exception":
        return all(e[k] == g.get(k) for k in ("exception", "error_code", "cr2") if k in e)
    return all(g["regs"].get(name) == value for name, value in e.get("regs", {}).items())


def run_vector(vector: Vector, profile: str | None = None) -> Result:
    profile = profile or vector.profile
    expected = vector.outcome_for(profile)
    if expected is None:
        return Result(vector, profile, "SKIP", None, None)
    machine, _ = prepare(vector, profile)
    got = observe(machine, machine.run(max_instructions=MAX_INSTRUCTIONS, timeout=TIMEOUT))
    if got.kind == "completes" and expected.kind == "completes":
        got = Outcome("completes", {"completes": True,
                                    "regs": {k: got.fields["regs"].get(k) for k in expected.fields.get("regs", {})}})
    return Result(vector, profile, "PASS" if matches(expected, got) else "FAIL", expected, got)
