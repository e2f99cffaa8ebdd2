"""Campaign ``replay``: a snapshot replays bit for bit, and a run split into several ``run()``
calls is the run made in one (issue 11, "Replay bit for bit").

Each seed builds a machine from ``random.Random(seed)``: a CPU model, a profile, a boot state
(real, protected or long mode at CPL 0 or 3), guest code that mixes random bytes with
instructions that reach ringminus's own paths (the ``viaboth`` campaign's table plus SMI
ports, the debug console, RDTSC, interrupt shadows), exception handlers so runs go on
after a fault, an SMI handler (in RAM, in a private SMRAM range or in the A-segment, that
edits its state-save map, raises further SMIs, IRETs, halts), a hypercall filter, SMIs,
NMIs, INTRs and INITs at random instruction counts (``Machine.at_instruction``), and
sometimes a host-side L1 (``enter_guest``), the generated in-guest L1 of the harness, or an
in-guest L1 that runs the code as its L2 under damaged nested page tables (npt.py).

Three comparisons, each a ``Finding("replay")`` when it fails:

* **split** — a fresh machine driven with its budget in one ``run()`` call per stop, and a
  fresh machine driven with the same budget cut into random pieces, end identically (the
  ``slices`` and ``code_sites`` counters aside: more calls are more slices, and code sites
  are armed in the blocks Unicorn translates, which begin where runs begin).  A replay
  leaves ``code_sites`` aside too: a restore translates afresh.
* **replay** — a machine runs a random prefix (split at random, so the snapshot may fall in
  the middle of anything), takes a snapshot, runs a continuation; ``restore`` and the same
  continuation again must give the same results, call by call, and the same final state:
  stop, registers, events, console, instruction count, every stat, SMM and SVM state, the
  virtual TSC, hidden CPU state (NMI blocking, interrupt shadow), RAM and SMRAM.
* **restore elsewhere** — the snapshot restored into a second machine built the same way
  (that never ran the prefix) replays the continuation identically too.

A continuation is a plan made from the seed: run pieces; after a ``vmexit`` stop skip the
instruction as an emulating L1 would; after a ``hypercall`` stop resume with a value;
between runs sometimes raise an event through the API or schedule one more.

Inconclusive, not findings: a run that ends with ``timeout`` (wall time is not replayable);
a cut run whose count of delivered events and exits reached the budget with nothing
retired (``max_instructions`` bounds both, per call); a difference in a guest that writes
into code it runs (Unicorn counts an instruction QEMU restarts after such a store twice,
and whether QEMU catches the store depends on state no snapshot holds).
"""
from __future__ import annotations

import hashlib
import random
import re
import struct
from dataclasses import dataclass, field

from unicorn import UC_HOOK_BLOCK, UC_HOOK_MEM_WRITE

from .. import Machine, StopReason
from ..emulator.cpu import STATE_NAMES
from ..emulator.boot import DEFAULT_LOAD, IDT_BASE, SEL_CODE32, SEL_CODE64, BootState
from ..arch.segments import SYS_INT_GATE, pack_gate
from ..harness import inguest, runner
from ..harness.vectors import BITS
from ..intercepts import InterceptControls
from ..intercepts.controls import LAST_INTERCEPT_BIT
from ..intercepts.profiles import PROFILES
from ..arch.models import LM, MODELS
from . import Finding, npt, viaboth

MAX_ANSWERS = 300
BUDGETS = (150, 500, 1500)
TIMEOUT = 10.0                       # per run() call; a timeout makes the seed inconclusive
MODES = (("real", 0), ("protected", 0), ("protected", 3), ("long", 0), ("long", 3))
MEMORY_SIZES = (2 << 20, 4 << 20)
HANDLER = 0x1F0000                  # protected/long mode: the exception handlers' code
REAL_HANDLER = 0x600                 # real mode: every IVT vector points here
SMBASES = (0x30000, 0x98000, 0xA0000)
SAVE_AREA = 0xFE00                   # the state-save map: SMBASE + 0xFE00 .. + 0xFFFF
DEBUGCON = 0xE9
APM_CONTROL = 0xB2
# Stop reasons after which a continuation can go on: the driver answers them.
ANSWERED = {StopReason.LIMIT, StopReason.VMEXIT, StopReason.HYPERCALL, StopReason.BREAKPOINT}
RAISERS = {
    "smi": Machine.raise_smi,
    "nmi": Machine.raise_nmi,
    "init": Machine.raise_init,
}


# -- guest code ---------------------------------------------------------------------------------

def _smi_port(rng, bits):
    """OUT to the APM control port: an SMI with ``apm_smi`` (and an I/O-instruction SMI)."""
    return bytes([0xB0, rng.randrange(256), 0xE6, APM_CONTROL])          # mov al, n; out 0xb2, al


def _console(rng, bits):
    return bytes([0xB0, rng.randrange(0x20, 0x7F), 0xE6, DEBUGCON])        # mov al, c; out 0xe9, al


def _tsc(rng, bits):
    return rng.choice((b"\x0f\x31", b"\x0f\x01\xf9"))                      # rdtsc, rdtscp


def _shadow(rng, bits):
    """Instructions that open an interrupt window or hold one shut for an instruction."""
    return rng.choice((b"\xfb\x90", b"\xfb\xf4", b"\xfa", b"\x8c\xd0\x8e\xd0\x90", b"\x9c\x9d",
                       b"\xfb\xfa", b"\xcf", b"\xeb\xfe"))                  # ... jmp $ (a tight loop)


OWN_ITEMS = ((3, _smi_port), (3, _console), (2, _tsc), (4, _shadow))
ITEMS = tuple(viaboth.ITEMS) + OWN_ITEMS
_MAKERS = [maker for _, maker in ITEMS]
_WEIGHTS = [weight for weight, _ in ITEMS]


def random_code(rng: random.Random, bits: int, items: int) -> bytes:
    return b"".join(rng.choices(_MAKERS, _WEIGHTS)[0](rng, bits) for _ in range(items))


# Exception handlers: each a way for a run to go on (or not) after a fault.
REAL_HANDLERS = (b"\x83\xc4\x04\xcf", b"\xcf", b"\xf4", b"\x83\xc4\x02\xcf", b"\xfb\xcf")
FLAT_HANDLERS = {32: (b"\xcf", b"\x83\xc4\x04\xcf", b"\xf4\xcf", b"\xe6\xe9\xcf"),
                 64: (b"\x48\xcf", b"\x48\x83\xc4\x08\x48\xcf", b"\xf4\x48\xcf", b"\xe6\xe9\x48\xcf")}


def _smm_handler(rng: random.Random, smbase: int) -> bytes:
    """Code at SMBASE + 0x8000 (16-bit, CS base SMBASE): random work, edits of the saved
    state, then RSM (mostly)."""
    parts = []
    for _ in range(rng.randrange(4)):
        kind = rng.randrange(6)
        if kind == 0:                      # a dword of the save map := a random value
            offset = SAVE_AREA + rng.randrange(0, 0x200, 4)
            value = rng.choice((0, 1, 0x11, 0x8000_0011, 0x20, 0x7C00, 0xFFFF_FFFF, rng.getrandbits(32)))
            parts.append(b"\x66\xbb" + struct.pack("<I", smbase + offset)           # mov ebx, address
                         + b"\x67\x66\xc7\x03" + struct.pack("<I", value))          # mov dword [ebx], value
        elif kind == 1:
            parts.append(_smi_port(rng, 16))
        elif kind == 2:
            parts.append(_console(rng, 16))
        elif kind == 3:
            parts.append(random_code(rng, 16, rng.randint(1, 3)))
        elif kind == 4:
            # pushf; push cs; call (the iret); jmp over it; iret — an IRET to the next
            # instruction, which unblocks NMIs inside SMM
            parts.append(b"\x9c\x0e\xe8\x02\x00\xeb\x01\xcf")
        else:
            parts.append(rng.choice((b"\xf4", b"\x90", b"\x0f\x31")))
    if rng.random() < 0.9:
        parts.append(b"\x0f\xaa")                                               # rsm
    return b"".join(parts)


# -- the scenario -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scenario:
    """Everything ``build`` needs to make the same machine again."""
    seed: int
    cpu_model: str
    profile: str
    mode: str
    cpl: int
    memory_size: int
    apm_smi: bool
    exact: bool
    code: bytes
    handler: bytes
    smram: str                                   # "ram", "range" or "aseg"
    smram_state: str | None
    smbase: int
    smm_handler: bytes
    events: tuple[tuple[int, str, int], ...]     # (instruction index, kind, vector)
    guest: tuple | None                          # (intercept codes, exception vectors, ports, on_exit)
    hypercalls: tuple[tuple[int, int, str], ...]
    hypercall_handler: bool
    breakpoints: tuple[int, ...]
    registers: tuple[tuple[str, int], ...]
    inguest: bool = False                        # the harness's generated in-guest L1 instead
    npt: npt.Setup | None = None                 # an in-guest L1 running ``code`` under nested paging


def _event_kind(rng: random.Random) -> tuple[str, int]:
    kind = rng.choices(("smi", "nmi", "intr", "init"), (5, 5, 5, 1))[0]
    return kind, rng.choice((0x20, 0x21, 0x30, 0x80, 0xFF, 2, 8, 14)) if kind == "intr" else 0


def scenario(seed: int, rng: random.Random) -> Scenario:
    inguest_l1 = rng.random() < 0.05                # 64 MiB machines: costly to copy and compare
    nested = None if inguest_l1 or rng.random() >= 0.1 else npt.random_setup(rng)
    mode, cpl = ("long", 0) if nested else rng.choice(MODES)
    long_mode_models = sorted(name for name in MODELS if MODELS[name].ext_edx & LM)
    cpu_model = "max" if nested else rng.choice(long_mode_models if mode == "long" or inguest_l1 else sorted(MODELS))
    bits = BITS[mode]
    events = tuple((rng.randrange(BUDGETS[-1] * 2), *_event_kind(rng)) for _ in range(rng.choice((0, 1, 2, 4, 8))))
    guest = None
    if not inguest_l1 and not nested and rng.random() < 0.3:
        density = rng.choice((0.02, 0.1, 0.4))
        codes = tuple(c for c in range(LAST_INTERCEPT_BIT + 1) if rng.random() < density)
        exceptions = tuple(v for v in range(32) if rng.random() < density)
        ports = tuple(rng.choice((0x70, 0x80, DEBUGCON, APM_CONTROL, 0xCF8)) for _ in range(rng.randrange(3)))
        guest = (codes, exceptions, ports, rng.choice(("stop", "skip")))
    smram = rng.choice(("ram", "range", "aseg"))
    smbase = {"ram": 0x30000, "range": 0x30000, "aseg": rng.choice(SMBASES[1:])}[smram]
    hypercalls = tuple((base, rng.randint(1, 16), rng.choice(("handle", "deny", "forward")))
                       for base in sorted(rng.sample(range(0, 64, 16), rng.randrange(3))))
    entry = DEFAULT_LOAD[BootState(mode)]
    code = random_code(rng, bits, rng.randint(1, 24))
    return Scenario(
        seed=seed, cpu_model=cpu_model, profile=rng.choice(sorted(PROFILES)), mode=mode, cpl=cpl,
        memory_size=rng.choice(MEMORY_SIZES), apm_smi=rng.random() < 0.5, exact=rng.random() < 0.2,
        code=code,
        handler=rng.choice(REAL_HANDLERS if mode == "real" else FLAT_HANDLERS[64 if mode == "long" else 32]),
        smram=smram, smram_state=rng.choice((None, "open", "closed", "locked")) if smram != "ram" else None,
        smbase=smbase, smm_handler=_smm_handler(rng, smbase) if rng.random() < 0.85 else b"",
        events=events, guest=guest, hypercalls=hypercalls, hypercall_handler=rng.random() < 0.3,
        breakpoints=tuple(entry + rng.randrange(len(code)) for _ in range(rng.choice((0, 0, 1, 2)))),
        registers=tuple((name, rng.choice((0, 1, 0x7C00, 0x100000, 0xFFFF_FFFF, rng.getrandbits(32))))
                        for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp")
                        if rng.random() < 0.2),
        inguest=inguest_l1, npt=nested)


def _schedule(machine: Machine, index: int, kind: str, vector: int) -> None:
    if kind == "intr":
        machine.at_instruction(index, lambda m, vector=vector: m.raise_intr(vector))
    else:
        machine.at_instruction(index, RAISERS[kind])


def _raise(machine: Machine, kind: str, vector: int) -> None:
    if kind == "intr":
        machine.raise_intr(vector)
    else:
        RAISERS[kind](machine)


def _install_smm(machine: Machine, s: Scenario) -> None:
    if s.smram == "range":
        machine.smram.add_range(0x30000, 0x10000)
    if s.smram_state is not None:
        machine.smram.set_state(s.smram_state)
    if s.smbase != machine.smm.smbase:
        machine.set_smbase(s.smbase)
    if s.smm_handler:
        if s.smram == "ram":
            machine.write_memory(s.smbase + 0x8000, s.smm_handler)
        else:
            machine.load_smram(s.smbase + 0x8000, s.smm_handler)


def _install_handlers(machine: Machine, s: Scenario) -> None:
    if s.mode == "real":
        machine.write_memory(0, struct.pack("<HH", REAL_HANDLER, 0) * 256)
        machine.write_memory(REAL_HANDLER, s.handler)
        return
    long_mode = s.mode == "long"
    gate = pack_gate(HANDLER, SEL_CODE64 if long_mode else SEL_CODE32, SYS_INT_GATE, dpl=3, long_mode=long_mode)
    machine.write_memory(IDT_BASE, gate * 256)
    machine.write_memory(HANDLER, s.handler)


def _hypercall_answer(call) -> int | None:
    return None if call.nr & 1 else (call.nr * 3 + 1) & 0xFFFF_FFFF


def _build_inguest(s: Scenario) -> Machine | None:
    vector = viaboth.random_vector(s.seed)
    try:
        prepared = runner.setup(vector, vector.profile)
        inguest.generate_l1(prepared)
    except runner.NotRunnable:
        return None
    return prepared.machine


def build(s: Scenario) -> Machine | None:
    """The scenario's machine, ready to run (None: the harness cannot make its in-guest L1)."""
    if s.inguest:
        machine = _build_inguest(s)
        if machine is None:
            return None
    elif s.npt is not None:
        machine = npt.build(s.npt, s.code, s.profile, s.memory_size)
    else:
        machine = Machine(memory_size=s.memory_size, cpu_model=s.cpu_model, profile=s.profile,
                          apm_smi=s.apm_smi, exact_instructions=s.exact)
        entry = DEFAULT_LOAD[BootState(s.mode)]
        machine.write_memory(entry, s.code)
        machine.boot(s.mode, entry, s.cpl)
        _install_handlers(machine, s)
        for name, value in s.registers:
            machine[name] = value & (0xFFFF_FFFF_FFFF_FFFF if s.mode == "long" else 0xFFFF_FFFF)
        for address in s.breakpoints:
            machine.break_at(address)
        if s.guest is not None:
            codes, exceptions, ports, on_exit = s.guest
            controls = InterceptControls()
            controls.set(*codes)
            controls.intercept_exception(*exceptions)
            for port in ports:
                controls.set_ports(port)
            machine.enter_guest(controls, s.profile, on_exit)
    _install_smm(machine, s)
    for base, count, action in s.hypercalls:
        machine.hypercalls.add(base, count, action)
    if s.hypercall_handler:
        machine.hypercalls.handler = _hypercall_answer
    for index, kind, vector in s.events:
        _schedule(machine, index, kind, vector)
    return machine


# -- driving and observing ------------------------------------------------------------------------

class Inconclusive(Exception):
    """Wall time decided a stop: nothing to compare."""


@dataclass
class Plan:
    """A continuation: a budget cut into pieces, and what to do between the pieces."""
    pieces: list[int]
    between: list[tuple] = field(default_factory=list)     # per piece: ("raise"|"schedule"|None, ...)
    returns: list[int | None] = field(default_factory=list)  # values for forwarded hypercalls


def random_plan(rng: random.Random, budget: int, split: bool) -> Plan:
    pieces = _cut(rng, budget) if split else [budget]
    between = []
    for _ in pieces:
        roll = rng.random()
        if roll < 0.1:
            between.append(("raise", *_event_kind(rng)))
        elif roll < 0.2:
            between.append(("schedule", rng.randrange(1, 500), *_event_kind(rng)))
        else:
            between.append((None,))
    return Plan(pieces, between, [rng.choice((None, 0, 1, 0xFFFF_FFFF)) for _ in range(8)])


def _cut(rng: random.Random, budget: int) -> list[int]:
    """``budget`` as random pieces (small ones often: a piece may end inside anything)."""
    pieces = []
    while budget > 0:
        piece = min(budget, rng.choice((1, 2, 3, rng.randint(1, 40), rng.randint(1, budget))))
        pieces.append(piece)
        budget -= piece
    return pieces


def observe(result) -> dict:
    if result.stop.reason is StopReason.TIMEOUT:
        raise Inconclusive("timeout")
    return result.as_dict()


def final_state(machine: Machine) -> dict:
    """What a result does not show: hidden CPU state, the virtual TSC, memory."""
    cpu = machine.cpu
    return {
        # Architectural registers; QEMU's lazy-flags fields say the same RFLAGS many ways.
        "state": {name: value for name, value in zip(STATE_NAMES, cpu.capture()) if not name.startswith("qemu.")},
        "nmi_blocked": cpu.nmi_blocked, "interrupt_shadow": cpu.interrupt_shadow,
        "halted": machine.halted, "nmi_pending": machine.nmi_pending,
        "interrupts": sorted(machine.interrupts), "tsc": (machine.tsc.value, machine.tsc.offset, machine.tsc.adjust),
        "ram": hashlib.sha1(machine.memory.ram.data).hexdigest(),
        "smram": [hashlib.sha1(r.data.data).hexdigest() for r in machine.smram.ranges],
        "smram_register": machine.smram.register,
    }


def drive(machine: Machine, plan: Plan) -> tuple[list[dict], bool]:
    """Run the plan: one record per run() call that did not end at a piece's limit (and the
    last one), so that a budget in one piece and in many give the same records.  Also
    whether a run ended at its limit without retiring anything: its count of delivered
    events and exits reached the budget (a fault loop), and a budget cut in pieces is then
    not the same budget.  At most MAX_ANSWERS stops are answered."""
    records, returns = [], iter(plan.returns)
    resume_with: list = []
    answers = 0
    for piece, (action, *args) in zip(plan.pieces, plan.between):
        if action == "raise":
            _raise(machine, *args)
        elif action == "schedule":
            offset, kind, vector = args
            _schedule(machine, machine.instructions + offset, kind, vector)
        left = piece
        while left > 0:
            start = machine.instructions
            if resume_with:
                result = machine.resume(resume_with.pop(), max_instructions=left, timeout=TIMEOUT)
            else:
                result = machine.run(max_instructions=left, timeout=TIMEOUT)
            retired = machine.instructions - start
            left -= retired
            reason = result.stop.reason
            if reason is StopReason.LIMIT:
                if left > 0 and retired == 0:           # bounded by its events, not instructions
                    records.append(observe(result))
                    return records, True
                continue                                # (early, with progress: the same piece goes on)
            records.append(observe(result))
            answers += 1
            if reason not in ANSWERED or answers > MAX_ANSWERS:
                return records, False
            if reason is StopReason.VMEXIT:
                machine.skip_instruction()
            elif reason is StopReason.HYPERCALL:
                resume_with.append(next(returns, None))
    records.append(observe(machine.result()))
    return records, False


def _first_difference(a, b, path: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                return f"{path}.{key}: only on one side"
            found = _first_difference(a[key], b[key], f"{path}.{key}")
            if found:
                return found
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b)):
            found = _first_difference(x, y, f"{path}[{i}]")
            if found:
                return found
        if len(a) != len(b):
            return f"{path}: {len(a)} vs {len(b)} items"
        return None
    return None if a == b else f"{path}: {a!r} vs {b!r}"


# Work, not state: code sites are armed in the blocks Unicorn translates (blocks begin where
# runs begin, and a restore translates afresh); a cut run also takes more slices.
TRANSLATION_DEPENDENT_STATS = ("code_sites",)
CUT_DEPENDENT_STATS = ("slices",) + TRANSLATION_DEPENDENT_STATS


def _without_work(records: list[dict], work=CUT_DEPENDENT_STATS) -> list[dict]:
    return [{**r, "stats": {k: v for k, v in r["stats"].items() if k not in work}} for r in records]


def _compare(what: str, s: Scenario, first, second) -> None:
    difference = None if first == second else _first_difference(first, second)
    if difference is not None:
        where = re.sub(r"\[\d+\]", "[]", difference.split(":")[0])
        raise Finding("replay", f"{what}: {difference} [{describe(s)}]", key=f"{what}: {where}")


def describe(s: Scenario) -> str:
    guest = ("in-guest L1" if s.inguest else f"L1 with nested paging {s.npt}" if s.npt
             else f"L2 on_exit={s.guest[3]}" if s.guest else "no guest")
    return (f"{s.cpu_model} {s.profile} {s.mode} cpl{s.cpl} {guest} smram={s.smram}/{s.smram_state} "
            f"events={list(s.events)} code={s.code.hex()}")


def one_run(seed: int) -> None:
    rng = random.Random(seed)
    s = scenario(seed, rng)
    budget = rng.choice(BUDGETS)
    prefix = rng.choice((0, 0, rng.randrange(1, budget)))
    whole, split = random_plan(random.Random(seed + 1), budget, False), random_plan(rng, budget, True)
    split.between, split.returns = [(None,)] * len(split.pieces), whole.returns     # events: only the cut differs
    whole.between = [(None,)]
    prefix_plan = random_plan(rng, prefix, True) if prefix else None
    continuation = random_plan(rng, budget - prefix, rng.random() < 0.5)
    try:
        # split: one call per stop against many
        machine = build(s)
        if machine is None:
            return
        reference, bounded = drive(machine, whole)
        if s.npt is not None:
            npt.check_exits(machine, s.npt)
        other = build(s)
        pieces, bounded_too = drive(other, split)
        if not (bounded or bounded_too):
            first, second = (_without_work(reference) + [final_state(machine)],
                             _without_work(pieces) + [final_state(other)])
            if first != second and _first_difference(first, second) is not None \
                    and not _modifies_executed_code(s, ((whole,), (split,))):
                _compare("split", s, first, second)
        # replay: prefix, snapshot, continuation; restore, continuation again
        machine = build(s)
        if prefix_plan is not None:
            drive(machine, prefix_plan)
        snapshot = machine.snapshot()
        first = _replayed(machine, continuation)
        machine.restore(snapshot)
        plans = (prefix_plan, continuation)
        _compare_unless_self_modifying("replay", s, first, _replayed(machine, continuation), plans)
        # the same snapshot restored into a machine that never ran
        if rng.random() < 0.6:
            return
        elsewhere = build(s)
        elsewhere.restore(snapshot)
        _compare_unless_self_modifying("restore elsewhere", s, first, _replayed(elsewhere, continuation), plans)
    except Inconclusive:
        return


def _compare_unless_self_modifying(what: str, s: Scenario, first, second, plans) -> None:
    """A replay differs: a finding, unless the guest writes into code it runs.  Whether QEMU
    catches a store into the block it is running depends on state Unicorn keeps outside the
    snapshot's reach (snapshot.py)."""
    if first != second and _first_difference(first, second) is not None and not _modifies_executed_code(s, (plans,)):
        _compare(what, s, first, second)


def _modifies_executed_code(s: Scenario, runs) -> bool:
    """Does the guest write to a page it has executed from, in any of ``runs`` (each a
    sequence of plans driven one after the other on a fresh machine)?  Unicorn counts an
    instruction twice when QEMU restarts it because it wrote into its own translated block
    (precise self-modifying code), and whether and where that happens depends on where
    blocks begin and on state outside the snapshot (snapshot.py).  Watched
    only once a comparison failed."""
    for plans in runs:
        machine = build(s)
        executed, written = set(), []

        def on_block(uc, address, size, _data):
            executed.update((address >> 12, (address + max(size, 1) - 1) >> 12))

        def on_write(uc, access, address, size, value, _data):
            if address >> 12 in executed or (address + size - 1) >> 12 in executed:
                written.append(address)

        machine.uc.hook_add(UC_HOOK_BLOCK, on_block)
        machine.uc.hook_add(UC_HOOK_MEM_WRITE, on_write)
        for plan in plans:
            if plan is not None:
                drive(machine, plan)
        if written:
            return True
    return False


def _replayed(machine: Machine, plan: Plan) -> list:
    records, _ = drive(machine, plan)
    return _without_work(records, TRANSLATION_DEPENDENT_STATS) + [final_state(machine)]
