"""Run one vector as an L2 guest under a profile and compare what happened with its outcome.

Defaults (README "TestVector files"): code at 0x7C00 (real) or 0x100000 (protected, long), the
foundation's boot state for every register the vector does not set, a breakpoint right after
the code (reaching it = the code completed), and in protected mode 32-bit identity paging
(4 KiB pages, user + writable) when ``memory.not_present`` is non-empty.

Who plays L1 (``via``): ``host`` -- ringminus from Python (``Machine.enter_guest``);
``guest`` -- a generated in-guest hypervisor that VMRUNs the same L2 (inguest.py); ``both``
-- each, and a vector whose two outcomes differ fails.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, replace

from ..emulator import StopReason
from ..machine import Machine
from ..emulator.boot import DEFAULT_LOAD, BootState
from ..intercepts.controls import InterceptControls
from ..arch.exitcodes import ExitCode
from . import VIAS
from .vectors import Outcome, TestVector

PAGING32_DIRECTORY = 0x20000           # protected mode: PD, then one page table per 4 MiB
SPLIT_TABLES = 0x40000                 # long mode: 4 KiB tables that replace split 2 MiB pages
MAX_INSTRUCTIONS = 100_000
TIMEOUT = 10.0
EXCEPTION_EVENTS = ("exception", "software-exception", "icebp")   # ICEBP delivers #DB (type 3)
PTE_PRESENT, PTE_LARGE = 1, 0x80
MODE_REGISTERS = frozenset({"cr0", "cr4", "efer"})


@dataclass(frozen=True)
class Result:
    vector: TestVector
    profile: str
    status: str                  # "PASS", "FAIL", "SKIP"
    expected: Outcome | None
    got: Outcome | None
    via: str = "host"
    other: Outcome | None = None  # via both, when the two disagree: the guest's (got: the host's)
    note: str = ""                # why a SKIP

    def line(self) -> str:
        where = self.profile if self.via == "host" else f"{self.profile}, via {self.via}"
        head = f"{self.status} {self.vector.name} [{where}]"
        if self.status == "SKIP":
            return f"{head}: {self.note or 'no outcome for this profile'}"
        if self.other is not None:
            return (f"{head}: host and guest disagree: host {self.got.kind} {self.got.describe()}, "
                    f"guest {self.other.kind} {self.other.describe()}")
        if self.status == "FAIL":
            return f"{head}: expected {self.expected.kind} {self.expected.describe()}, got {self.got.kind} {self.got.describe()}"
        return head

    def as_dict(self) -> dict:
        out = {"name": self.vector.name, "file": self.vector.source, "profile": self.profile,
               "via": self.via, "status": self.status,
               "expected": _outcome_dict(self.expected), "got": _outcome_dict(self.got)}
        if self.other is not None:
            out["disagreement"] = {"host": _outcome_dict(self.got), "guest": _outcome_dict(self.other)}
        if self.note:
            out["note"] = self.note
        return out


def _outcome_dict(outcome: Outcome | None) -> dict | None:
    return None if outcome is None else {"kind": outcome.kind, **outcome.fields}


class NotRunnable(Exception):
    """A vector one L1 cannot run as written (the message says why); reported as a SKIP."""


# --- preparing the L2 -----------------------------------------------------------------------

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


def controls_for(vector: TestVector) -> InterceptControls:
    """What L1 intercepts for ``vector``: its intercepts, exception vectors, IOPM and MSRPM,
    and always VMRUN, which every L1 intercepts (VMRUN refuses a VMCB without it, APM §15.5.1)."""
    return InterceptControls.of((ExitCode.VMRUN, *vector.intercepts), vector.exceptions, vector.iopm, vector.msrpm)


@dataclass(frozen=True)
class Setup:
    """A vector's L2 on a fresh machine: its state, memory and breakpoint, but no L1 yet."""
    vector: TestVector
    machine: Machine
    address: int                 # where the code starts
    end: int                     # right after the code: reaching it means the code completed
    controls: InterceptControls


def setup(vector: TestVector, profile: str) -> Setup:
    state = BootState(vector.mode)
    address = DEFAULT_LOAD[state]
    code = vector.code                   # parsing assembled an ``asm`` vector for this address
    machine = Machine(profile=profile)
    machine.write_memory(address, code)
    machine.boot(state, address, vector.cpl)
    if vector.not_present:
        (_unmap_long if state is BootState.LONG else _identity_paging_32)(machine, vector.not_present)
    for where, data in vector.memory_bytes:
        machine.write_memory(where, data)
    for name, value in vector.regs.items():
        if name not in MODE_REGISTERS:
            machine[name] = value
    if MODE_REGISTERS & vector.regs.keys():
        # A state, set exactly as VMRUN loads one: register writes would be mode transitions,
        # after which QEMU keeps a 64-bit CS's operand size outside long mode, say.
        machine.cpu.set_mode_state(*(vector.regs.get(name, machine[name]) for name in ("cr0", "cr4", "efer")))
        machine.forget_tlb()             # which holds what setting up translated without paging
    end = address + len(code)
    machine.break_at(end)
    return Setup(vector, machine, address, end, controls_for(vector))


def prepare(vector: TestVector, profile: str) -> tuple[Machine, int]:
    """The vector's L2 entered with ringminus as L1 (host side)."""
    prepared = setup(vector, profile)
    prepared.machine.enter_guest(prepared.controls, profile)
    return prepared.machine, prepared.end


# --- observing ------------------------------------------------------------------------------

def vmexit_outcome(code: int, info1: int, info2: int, next_rip: int, stage: str | None, rip: int,
                   exit_int_info: int, insn_bytes: bytes) -> Outcome:
    """A #VMEXIT as the VMCB reports it (the stage aside, which only ringminus knows)."""
    return Outcome("vmexit", {"vmexit": code, "info1": info1, "info2": info2, "next_rip": next_rip,
                              "stage": stage, "rip": rip, "exit_int_info": exit_int_info,
                              "insn_bytes": insn_bytes.hex()})


def l2_outcome(result) -> Outcome:
    """What L2 did when no #VMEXIT ended the run: the first exception it took, or the code
    completing (the breakpoint after it), or how the run stopped."""
    first = next((e for e in result.events if e["kind"] in EXCEPTION_EVENTS), None)
    if first is not None:
        fields = {"exception": first["vector"]}
        fields.update({k: first[k] for k in ("error_code", "cr2") if k in first})
        return Outcome("exception", fields)
    if result.stop.reason is StopReason.BREAKPOINT:
        return Outcome("completes", {"completes": True, "regs": result.regs})
    return Outcome("stop", {"reason": result.stop.reason.value, "detail": result.stop.detail or ""})


def observe(machine: Machine, result) -> Outcome:
    if result.stop.reason is StopReason.VMEXIT:
        v = result.exit
        return vmexit_outcome(int(v.code), v.info1, v.info2, v.next_rip, v.stage.name if v.stage else None,
                              v.rip, v.exit_int_info, v.insn_bytes)
    return l2_outcome(result)


def run_host(vector: TestVector, profile: str) -> Outcome:
    machine, _ = prepare(vector, profile)
    return observe(machine, machine.run(max_instructions=MAX_INSTRUCTIONS, timeout=TIMEOUT))


def run_guest(vector: TestVector, profile: str) -> Outcome:
    from .inguest import run_in_guest       # inguest builds on this module
    return run_in_guest(vector, profile)


OBSERVERS = {"host": run_host, "guest": run_guest}


# --- comparing ------------------------------------------------------------------------------

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


def differences(a: Outcome, b: Outcome) -> tuple[Outcome, Outcome] | None:
    """None when ``a`` and ``b`` are the same outcome; else both, cut down to what differs
    (for ``completes``: the registers that differ)."""
    if a.kind != b.kind:
        return a, b
    keys = [k for k in a.fields.keys() | b.fields.keys() if a.fields.get(k) != b.fields.get(k)]
    if not keys:
        return None
    if keys == ["regs"]:
        ra, rb = a.fields["regs"], b.fields["regs"]
        names = [n for n in ra if ra[n] != rb.get(n)] + [n for n in rb if n not in ra]
        return (Outcome(a.kind, {"regs": {n: ra.get(n) for n in names}}),
                Outcome(b.kind, {"regs": {n: rb.get(n) for n in names}}))
    return (Outcome(a.kind, {k: a.fields.get(k) for k in sorted(keys)}),
            Outcome(b.kind, {k: b.fields.get(k) for k in sorted(keys)}))


def _shown(got: Outcome, expected: Outcome) -> Outcome:
    """A completed run reports only the registers the vector names."""
    if got.kind == "completes" and expected.kind == "completes":
        return Outcome("completes", {"completes": True,
                                     "regs": {k: got.fields["regs"].get(k) for k in expected.fields.get("regs", {})}})
    return got


def run_vector(vector: TestVector, profile: str | None = None, via: str = "host") -> Result:
    if via not in VIAS:
        raise ValueError(f"via must be one of {', '.join(VIAS)}, not {via!r}")
    profile = profile or vector.profile
    expected = vector.outcome_for(profile)
    result = Result(vector, profile, "SKIP", expected, None, via)
    if expected is None:
        return result
    try:
        outcomes = [OBSERVERS[v](vector, profile) for v in (("host", "guest") if via == "both" else (via,))]
    except NotRunnable as why:
        return replace(result, note=str(why))
    if len(outcomes) == 2 and (differ := differences(*outcomes)):
        return replace(result, status="FAIL", got=differ[0], other=differ[1])
    got = outcomes[0]
    return replace(result, status="PASS" if matches(expected, got) else "FAIL", got=_shown(got, expected))
