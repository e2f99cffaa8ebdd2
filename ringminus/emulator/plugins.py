"""What a feature attaches to the core (the machine knows no feature: SMM, SVM, the intercepts
and the hypercall conduit plug in here, through the ``add_…`` methods of ``Registry``).

A feature's ``install(machine)`` registers, each optional:

* **executors** for decode-table rows Unicorn cannot run (RSM, the SVM instructions, VMMCALL
  and VMCALL), run by the run loop after the guest-mode gate, and optionally a **hook
  executor** that may run the row inside Unicorn's hook (a world switch with no slice end);
* **event sources** taken at instruction boundaries (priority, readiness, the intercept
  that turns one into a #VMEXIT) and **holds** that keep every event pending (GIF = 0);
* the **guest-mode gate** (``Gate``): while a guest runs as L2, what L1 intercepts;
* **MSRs** the machine keeps itself, and the **CPUID** table;
* **snapshot parts**, **result sections**, **statistics**, and what INIT **resets**;
* **memory-miss handlers** (an access to a hidden view maps it: SMRAM).

The dispatch is dictionary lookups and tuples built once, as cheap as the if-chains it
replaces.  ``SERVICES`` lists what a feature may use of the core.
"""
from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Protocol

from ..decode.table import fixed_encoding

if TYPE_CHECKING:
    from ..decode.decoder import Instruction
    from .cpu import ArchState, Cpu
    from ..arch.exceptions import SecondStageFault
    from .delivery import Event
    from .machine import Core
    from .result import Section, Stop


class Source(NamedTuple):
    """An event taken at an instruction boundary, in ``priority`` order (lowest first)."""
    priority: int
    name: str
    pending: Callable[["Core"], bool]        # raised and not yet taken (the run loop must look)
    ready: Callable[["Core"], bool]          # pending and not masked now
    exit_code: int | None                   # L1's intercept for it (None: none can take it)
    take: Callable[["Core"], None]
    consume: Callable[["Core"], None]       # no longer pending: a caller-L1 with on_exit skip handled it
    exit_info1: Callable[["Core"], int] = lambda machine: 0
    # An instruction can unmask it (STI, POPF, IRET): while it is pending, those run alone so
    # the run loop looks again right after them.
    window: bool = False
    # Taken inside a hook that just finished an instruction (no slice end): with the hook's
    # registers, when it still holds them current.
    take_in_hook: Callable[["Core", "HookContext | None"], None] | None = None


class HookContext:
    """Inside a Unicorn hook that runs an instruction itself (a world switch with no slice
    end): the registers there, captured once from Unicorn's context copy, which stays the
    CPU's current copy — so whoever loads new registers needs no second copy
    (``Cpu.load(context_is_current=True)``).  World switches (SMI entry, RSM, VMRUN,
    #VMEXIT) take one, or None from the run loop: then they capture afresh.  The hook goes
    on with ``Core.continue_in_hook``.  Given ``cpu``, RFLAGS is read on first use of
    ``state`` only (a call into QEMU's lazy flags: RSM, which replaces it, never asks)."""
    __slots__ = ("_state", "_cpu")

    def __init__(self, state: "ArchState", cpu: "Cpu | None" = None):
        self._state, self._cpu = state, cpu

    @property
    def state(self) -> "ArchState":
        if self._cpu is not None:
            self._cpu.fill_rflags(self._state)
            self._cpu = None
        return self._state

    @property
    def state_without_rflags(self) -> "ArchState":
        """The registers, RFLAGS as captured (0 when ``cpu`` was given): for RSM."""
        return self._state


class Part(NamedTuple):
    """A piece of state a snapshot holds, restored in ``order`` (snapshot.py documents each).
    ``shape``: what a machine must match to restore it (SMRAM's ranges, say)."""
    order: int
    name: str
    take: Callable[["Core"], object]
    put: Callable[["Core", object], None]
    shape: Callable[["Core"], object] | None = None


class OnExit(Enum):
    """Who plays L1 for a guest running as L2."""
    STOP = "stop"        # the caller: the run stops at the exit
    SKIP = "skip"        # the caller, emulating the instruction: the run goes on after it
    L1 = "l1"            # the guest's own hypervisor: a #VMEXIT into it


class Gate(Protocol):
    """The guest-mode gate: while a guest runs as L2, what its L1 intercepts, and how L1
    takes an exit (intercepts.guest.Guest implements it)."""
    on_exit: OnExit

    def intercepts(self, exit_code: int) -> bool: ...

    def check(self, insn: "Instruction") -> Any: ...        # None, an exit, or a GuestFault

    def take_exit(self, exit_: Any, hook: HookContext | None = None) -> bool: ...   # True: the run stops

    def record_exit(self, exit_: Any) -> None: ...           # an exit the caller-L1 handled already

    def event_exit(self, event: "Event", during: "Event | None") -> Any: ...     # an exception intercept

    def event_source_exit(self, exit_code: int, info1: int, rip: int) -> Any: ...   # INTR, NMI, SMI…

    def shutdown_exit(self, rip: int) -> Any: ...

    def second_stage_exit(self, fault: "SecondStageFault", during: "Event | None", rip: int) -> Any: ...   # #NPF


Executor = Callable[["Instruction"], None]
HookExecutor = Callable[["Instruction", HookContext], bool]


class Msr(NamedTuple):
    """An MSR the machine keeps (Unicorn's would be wrong): ``handles(msr)`` is asked at each
    RDMSR/WRMSR site; ``read``/``write``, called at CPL 0 only (the core raises #GP(0) above
    it), raise GuestFault as the instruction would."""
    handles: Callable[[int], bool]
    read: Callable[[int], int]
    write: Callable[[int, int], None]


class Registry:
    """The tables a machine dispatches through, and the ``add_…`` methods features fill them
    with (``Core`` is one; the core's own entries come first)."""

    def __init__(self, sources: tuple[Source, ...], parts: tuple[Part, ...], stat_keys: tuple[str, ...]):
        self._executors: dict[str, Executor] = {}
        self._hook_executors: dict[str, HookExecutor] = {}
        self._leading_rows: set[str] = set()                   # add_executor's leads_on
        self._hook_encodings: tuple[bytes, ...] | None = ()    # None: some hook row has no fixed bytes
        self._hook_encoding_length = 0                          # the longest of them
        self._sources = sources
        self._holds: tuple[Callable[[], bool], ...] = ()        # every event stays pending while one holds
        self._init_holds: tuple[Callable[[], bool], ...] = ()   # INIT stays pending while one holds
        self._msrs: tuple[Msr, ...] = ()
        self._miss_handlers: tuple[tuple[Callable[[int], bool], Callable[[int], None]], ...] = ()
        self._parts = parts
        self._sections: tuple[Callable[["Stop"], "Section"], ...] = ()
        self._reset_hooks: tuple[Callable[[], None], ...] = ()
        self._run_hooks: tuple[Callable[[], None], ...] = ()
        self._resume_handlers: tuple[Callable[[int | None], bool], ...] = ()
        self._stat_keys = stat_keys
        self._reported_stats: tuple[tuple[str, Callable[[], object]], ...] = ()
        self._cpuid: Callable[[], dict] = dict

    def add_executor(self, row: str, execute: Executor, in_hook: HookExecutor | None = None,
                     leads_on: bool = False) -> None:
        """``execute(insn)`` runs decode-table row ``row`` when Unicorn cannot (after the
        guest-mode gate); ``in_hook(insn, state)``, if given, may run it inside the hook (True:
        done, the slice goes on).  ``leads_on``: the instruction is mostly followed by another
        one a hook executes (CLGI by VMLOAD, by VMRUN): the hook looks at the next one."""
        self._executors[row] = execute
        if leads_on:
            self._leading_rows.add(row)
        if in_hook is not None:
            self._hook_executors[row] = in_hook
            encoding = fixed_encoding(row)
            self._hook_encodings = None if encoding is None or self._hook_encodings is None \
                else (*self._hook_encodings, encoding)
            self._hook_encoding_length = max(self._hook_encoding_length, len(encoding or b""))

    def add_event_source(self, source: Source) -> None:
        self._sources = tuple(sorted((*self._sources, source), key=lambda s: s.priority))

    def add_event_hold(self, holds: Callable[[], bool], init_only: bool = False) -> None:
        """While ``holds()``, every event (or only INIT) stays pending."""
        if init_only:
            self._init_holds += (holds,)
        else:
            self._holds += (holds,)

    def add_msr(self, msr: Msr) -> None:
        self._msrs += (msr,)

    def add_miss_handler(self, hidden_at: Callable[[int], bool], reveal: Callable[[int], None]) -> None:
        """An access Unicorn finds unmapped at an address ``hidden_at`` claims: ``reveal`` maps
        it and the instruction runs again (SMRAM's views)."""
        self._miss_handlers += ((hidden_at, reveal),)

    def add_snapshot_part(self, part: Part) -> None:
        self._parts = tuple(sorted((*self._parts, part), key=lambda p: p.order))

    def add_result_section(self, section: Callable[[Stop], Section]) -> None:
        self._sections += (section,)

    def add_reset_hook(self, reset: Callable[[], None]) -> None:
        """Called by INIT and ``boot`` before the CPU is reset."""
        self._reset_hooks += (reset,)

    def add_run_hook(self, starting: Callable[[], None]) -> None:
        """Called as each ``run()`` starts."""
        self._run_hooks += (starting,)

    def add_resume_handler(self, resume: Callable[[int | None], bool]) -> None:
        """``resume(ret)`` completes what the last stop left pending (True if it did)."""
        self._resume_handlers += (resume,)

    def add_stat_keys(self, *keys: str) -> None:
        """Counters a feature keeps in ``stats`` (reported as 0 until counted)."""
        self._stat_keys += keys

    def add_reported_stat(self, name: str, value: Callable[[], object]) -> None:
        """A statistic a feature keeps itself, read when a result is made."""
        self._reported_stats += ((name, value),)

    def set_cpuid(self, table: Callable[[], dict]) -> None:
        """``table()``: CPUID leaf -> (EAX, EBX, ECX, EDX), or -> {subleaf (ECX): (…), None:
        (…) for the others}, asked at each CPUID."""
        self._cpuid = table

    def add_cpuid_change(self, change: Callable[[dict], dict]) -> None:
        """What a later feature adds to the table (a platform: its local APIC, the hypervisor
        leaves): ``change(table)`` returns the table the guest sees."""
        table = self._cpuid
        self._cpuid = lambda: change(table())


# What a feature may use of the core (in the spirit of KVM's x86_emulate_ops).  Everything
# else on the machine is the core's own business.
SERVICES = (
    "cpu", "memory", "linear", "read_view", "uc", "tsc", "lbr",   # CPU state; physical and linear memory
    "cpu_model", "long_mode_capable", "cr4_defined", "profile",    # what the machine is
    "deliver", "raise_intr", "raise_nmi", "raise_init", "interrupts", "nmi_pending", "init_pending",   # events
    "intercepted",
    "retire", "instructions", "instructions_now", "instructions_if_exact", "exact_instructions", "halted",
    "request_stop", "request_stop_shutdown", "stop", "stop_at", "restamp_stop", "output_written",   # stopping
    "record_event", "events", "stats", "has_run",          # the log and the counters
    "reset_cpu", "forget_tlb", "set_second_stage", "forget_translations", "arm_opcodes",
    "instruction_length_at", "decode_at", "continue_in_hook", "gate", "io_access",
    "ports", "pci", "mmio", "remove_mmio", "interrupt_line", "interrupt_raised", "clock", "time_ns",   # buses, clock
)
