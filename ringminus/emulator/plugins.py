"""What a feature attaches to the core (the machine knows no feature: SMM, SVM, the intercepts
and the hypercall conduit plug in here, through ``Core.plug``).

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
replaces.  ``Services`` lists what a feature may use of the core.
"""
from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Protocol

if TYPE_CHECKING:
    from ..decode.decoder import Instruction
    from .cpu import ArchState
    from .delivery import Event
    from .machine import Core


class Source(NamedTuple):
    """An event taken at an instruction boundary, in ``priority`` order (lowest first)."""
    priority: int
    name: str
    pending: Callable[["Core"], bool]        # raised and not yet taken (the run loop must look)
    ready: Callable[["Core"], bool]          # pending and not masked now
    exit_code: int                          # L1's intercept for it
    take: Callable[["Core"], None]
    consume: Callable[["Core"], None]       # no longer pending: a caller-L1 with on_exit skip handled it
    exit_info1: Callable[["Core"], int] = lambda machine: 0
    # An instruction can unmask it (STI, POPF, IRET): while it is pending, those run alone so
    # the run loop looks again right after them.
    window: bool = False
    # Taken inside a hook that just finished an instruction (no slice end), if it can be:
    # returns False when the run loop must take it instead.
    take_in_hook: Callable[["Core", "ArchState | None"], bool] | None = None


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
    takes an exit (intercepts.gate implements it)."""
    on_exit: OnExit

    def intercepts(self, exit_code: int) -> bool: ...

    def check(self, insn: "Instruction") -> Any: ...        # None, a VmExit or a Fault

    def take_exit(self, exit_: Any, state: "ArchState | None" = None) -> bool: ...

    def event_exit(self, event: "Event", during: "Event | None") -> Any: ...

    def shutdown_exit(self, rip: int) -> Any: ...


Executor = Callable[["Instruction"], None]
HookExecutor = Callable[["Instruction", "ArchState"], bool]


class Msr(NamedTuple):
    """An MSR the machine keeps (Unicorn's would be wrong): ``handles(msr)`` is asked at each
    RDMSR/WRMSR site; ``read``/``write`` raise GuestFault as the instruction would."""
    handles: Callable[[int], bool]
    read: Callable[[int], int]
    write: Callable[[int, int], None]


# What a feature may use of the core (in the spirit of KVM's x86_emulate_ops).  Everything
# else on the machine is the core's own business.
SERVICES = (
    "cpu", "memory", "linear", "uc", "tsc",                # CPU state; physical and linear memory
    "cpu_model", "long_mode_capable", "profile",           # what the machine is
    "deliver", "raise_intr", "interrupts", "nmi_pending", "init_pending", "intercepted",   # events
    "retire", "instructions", "instructions_if_exact", "halted",
    "request_stop", "request_stop_shutdown", "stop", "stop_at", "restamp_stop",            # stopping
    "record_event", "events", "stats", "has_run",          # the log and the counters
    "reset_cpu", "forget_tlb", "forget_translations", "arm_opcodes",
    "instruction_length_at", "decode_at", "continue_in_hook", "gate", "io_access",
    "ports", "pci", "mmio", "clock",                       # the buses and the clock
)
