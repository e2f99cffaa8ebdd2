"""Why a run stopped, and what it left behind."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property
from typing import Callable, NamedTuple


class StopReason(Enum):
    HLT = "hlt"                  # HLT with nothing left to deliver
    EXIT = "exit"                # a write to the exit device; value = the byte written
    LIMIT = "limit"              # --max-insns reached
    TIMEOUT = "timeout"          # --timeout reached
    SHUTDOWN = "shutdown"        # triple fault
    MEMORY = "memory"            # an access no memory backs (value = address)
    UNSUPPORTED = "unsupported"  # an architectural path ringminus does not implement
    STOPPED = "stopped"          # Machine.request_stop() from a user handler
    VMEXIT = "vmexit"            # L2 took an intercept L1 asked for; value = the exit code
    BREAKPOINT = "breakpoint"    # Machine.break_at() address reached
    HYPERCALL = "hypercall"      # a forwarded hypercall with no handler; value = its number
    INTERRUPTED = "interrupted"  # Machine.interrupt() (Ctrl-C at the CLI)
    ENDED = "ended"              # emulation ended for a reason ringminus did not decide (detail says
                                 # what was seen: an emu_stop() from outside, say)
    OUTPUT = "output"            # the text Machine.stop_on_output() waits for was written (--until-console)


# CLI exit status per stop reason.  ``exit`` maps to 2*value+1 as QEMU's isa-debug-exit does
# (always odd, never 2, the usage-error status); the others are even and distinct.
EXIT_STATUS = {
    StopReason.HLT: 0,
    StopReason.SHUTDOWN: 4,
    StopReason.MEMORY: 6,
    StopReason.UNSUPPORTED: 8,
    StopReason.LIMIT: 10,
    StopReason.TIMEOUT: 12,
    StopReason.STOPPED: 14,
    StopReason.VMEXIT: 16,
    StopReason.BREAKPOINT: 18,
    StopReason.HYPERCALL: 20,
    StopReason.ENDED: 22,
    StopReason.OUTPUT: 24,
    StopReason.INTERRUPTED: 130,     # as a shell reports a process SIGINT ended
}
USAGE_ERROR_STATUS = 2


@dataclass(frozen=True)
class Stop:
    reason: StopReason
    rip: int
    value: int | None = None
    detail: str | None = None

    @property
    def exit_status(self) -> int:
        if self.reason is StopReason.EXIT:
            return (2 * (self.value or 0) + 1) & 0xFF
        return EXIT_STATUS[self.reason]

    def as_dict(self) -> dict:
        out = {"reason": self.reason.value, "rip": self.rip}
        if self.value is not None:
            out["value"] = self.value
        if self.detail:
            out["detail"] = self.detail
        return out


class EventLog(list):
    """The event log: events delivered, exits, hypercalls, in order — bounded.  Past ``limit``
    records an event is only counted (``unlisted``), so a firmware that runs for hours keeps
    a log of bounded size; its ``stats`` still count every event."""
    LIMIT = 100_000

    def __init__(self, records=(), limit: int = LIMIT, unlisted: int = 0):
        super().__init__(records)
        self.limit = limit
        self.unlisted = unlisted

    def append(self, record) -> None:
        if len(self) < self.limit:
            super().append(record)
        else:
            self.unlisted += 1


class Section(NamedTuple):
    """A feature's part of a result: ``value`` as captured at the stop, and how it reads in
    ``as_dict`` and as the attribute of its name (None: as it is)."""
    name: str
    value: object
    as_dict: Callable[[object], object] | None = None
    raw_name: str | None = None             # the attribute that gives ``value`` itself


@dataclass(frozen=True)
class RunResult:
    """What a run left: the core's part, then each feature's ``Section`` (``result.smm``,
    ``result.svm``, ``result.vmexit``, ``result.hypercall``…).  ``regs``, ``stats``, ``events``
    and the sections are built on first use from what was captured at the stop (a
    stop-and-resume loop rarely reads them all)."""
    stop: Stop
    cpu: object                   # emulator.cpu.CpuSnapshot at the stop
    console_bytes: bytes
    instructions: int | None      # exact when counting (a limit or an instruction event is set)
    counters: dict = field(default_factory=dict)
    event_log: tuple = ()         # events delivered, exits skipped, hypercalls, in order
    sections: tuple[Section, ...] = ()
    _read: dict = field(default_factory=dict, repr=False, compare=False)

    @cached_property
    def regs(self) -> dict:
        """Registers at the stop, by lower-case name (segments as selector/base/limit/attributes)."""
        return self.cpu.registers()

    @cached_property
    def console(self) -> str:
        return self.console_bytes.decode("utf-8", errors="replace")

    @cached_property
    def stats(self) -> dict:
        return dict(self.counters)

    @cached_property
    def events(self) -> list:
        return [e if isinstance(e, dict) else {"kind": "vmexit", **e.as_dict()} for e in self.event_log]

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        read = self.__dict__.get("_read")
        if read is not None and name in read:
            return read[name]
        for section in self.__dict__.get("sections", ()):
            if name == section.raw_name:
                return section.value
            if name == section.name:
                value = section.value if section.as_dict is None or section.value is None \
                    else section.as_dict(section.value)
                read[name] = value
                return value
        raise AttributeError(f"a run result has no {name!r}")

    def as_dict(self) -> dict:
        return {"stop": self.stop.as_dict(), "regs": self.regs, "console": self.console,
                "instructions": self.instructions, "stats": self.stats, "events": self.events,
                **{section.name: getattr(self, section.name) for section in self.sections}}
