"""``ringminus fuzz CAMPAIGN|all [--seed S] [--runs N] [--seconds T] [--replay S] [--jobs J]``.

Runs seeds S, S+1, … of a campaign until N runs or T seconds (100 runs when neither is
given; with ``all``, each campaign gets that budget).  Every failure prints

    FAIL <campaign> seed=<s> <kind>: <message>
      replay: ringminus fuzz <campaign> --replay <s>

then, per campaign, one line per failure class (kind + exception type + raising frame, or a
finding's key) and the closing line ``<campaign>: N runs, F failures in T s`` with the
failures counted by kind.  Exit status 1 if anything failed, 2 for a usage error, 130 after
Ctrl-C (the summary is still printed).  ``--replay S`` runs one seed and prints the full
traceback.

A run is bounded twice: every machine run a campaign makes has ``max_instructions`` and a
``timeout``, and the runner gives each seed HANG_SECONDS of wall time.  In-process
(``--jobs 1``) an alarm raises inside the next Python frame of the run (Unicorn re-raises an
exception from a hook after ``emu_start``); with ``--jobs`` > 1 seeds run in worker processes
and a worker past the limit is killed and replaced, so even a hang inside native code ends.
"""
from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_for
from pathlib import Path
from types import ModuleType

from . import CAMPAIGNS, KINDS, CampaignMissing, Finding, load

DEFAULT_RUNS = 100
HANG_SECONDS = 60.0                  # wall time one seed may take before it counts as a hang
MESSAGE_LIMIT = 400
PACKAGE_ROOT = Path(__file__).resolve().parent.parent      # ringminus/
FUZZ_ROOT = Path(__file__).resolve().parent
INTERRUPTED_STATUS = 130


class UsageError(Exception):
    """A bad option: one line on stderr, exit status 2."""


class RunHang(BaseException):
    """Raised by the alarm when a seed overruns HANG_SECONDS.  A BaseException, so no
    ``except Exception`` in the emulator swallows it on its way out."""


@dataclass(frozen=True)
class Failure:
    seed: int
    kind: str
    message: str
    key: str                         # the failure's class, for triage
    traceback: str = ""


def _one_line(text: str) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= MESSAGE_LIMIT else line[:MESSAGE_LIMIT - 1] + "…"


def raising_frame(error: BaseException) -> str:
    """``path:line in function`` of the innermost frame in ringminus (outside fuzz/) that
    the exception passed through, else the innermost frame: where the class lives."""
    frames = traceback.extract_tb(error.__traceback__)
    chosen = None
    for frame in frames:
        path = Path(frame.filename).resolve()
        if path.is_relative_to(PACKAGE_ROOT) and not path.is_relative_to(FUZZ_ROOT):
            chosen = frame
    if chosen is None and frames:
        chosen = frames[-1]
    if chosen is None:
        return "?"
    path = Path(chosen.filename).resolve()
    shown = path.relative_to(PACKAGE_ROOT.parent) if path.is_relative_to(PACKAGE_ROOT.parent) else path.name
    return f"{shown}:{chosen.lineno} in {chosen.name}"


_NUMBER = re.compile(r"0x[0-9a-fA-F]+|\d+")


def classify(seed: int, error: BaseException) -> Failure:
    """A failure record for what escaped ``one_run(seed)``."""
    text = traceback.format_exc() if sys.exc_info()[1] is error else "".join(
        traceback.format_exception(type(error), error, error.__traceback__))
    if isinstance(error, Finding):
        key = error.key or _NUMBER.sub("N", _one_line(error.message))
        return Failure(seed, error.kind, _one_line(error.message), f"{error.kind} {key}", text)
    if isinstance(error, RunHang):
        return Failure(seed, "contract", _one_line(str(error)), "contract run did not finish", text)
    where = raising_frame(error)
    name = type(error).__name__
    return Failure(seed, "exception", _one_line(f"{name}: {error} (raised at {where})"),
                   f"exception {name} at {where}", text)


def _alarm(signum, frame):
    raise RunHang(f"the run did not finish within {HANG_SECONDS:g} s")


def run_seed(module: ModuleType, seed: int, alarm: bool = True) -> Failure | None:
    """One run of ``module`` in this process; None when it held the contract.  ``alarm``:
    bound it by HANG_SECONDS (only possible in the main thread)."""
    guard = alarm and hasattr(signal, "setitimer") and _in_main_thread()
    if guard:
        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, HANG_SECONDS)
    try:
        module.one_run(seed)
    except (Exception, RunHang) as error:
        return classify(seed, error)
    finally:
        if guard:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    return None


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


# -- reporting ----------------------------------------------------------------------------------

class Tally:
    """What one campaign did: runs, failures, their classes; prints as it goes."""

    def __init__(self, campaign: str, out):
        self.campaign, self.out = campaign, out
        self.runs = 0
        self.failures: list[Failure] = []
        self.started = time.monotonic()

    def add(self, failure: Failure | None, verbose: bool = False) -> None:
        self.runs += 1
        if failure is None:
            return
        self.failures.append(failure)
        print(f"FAIL {self.campaign} seed={failure.seed} {failure.kind}: {failure.message}", file=self.out)
        print(f"  replay: ringminus fuzz {self.campaign} --replay {failure.seed}", file=self.out)
        if verbose:
            print(failure.traceback.rstrip(), file=self.out)
        self.out.flush()

    def close(self, interrupted: bool = False) -> None:
        classes: dict[str, list[Failure]] = {}
        for failure in self.failures:
            classes.setdefault(failure.key, []).append(failure)
        for key, members in sorted(classes.items(), key=lambda item: -len(item[1])):
            seeds = sorted(f.seed for f in members)
            print(f"  class {key}: {len(members)} runs, seed={seeds[0]}", file=self.out)
        elapsed = time.monotonic() - self.started
        kinds = Counter(f.kind for f in self.failures)
        by_kind = ", ".join(f"{kind}: {kinds[kind]}" for kind in KINDS if kinds[kind])
        line = f"{self.campaign}: {self.runs} runs, {len(self.failures)} failures in {elapsed:.1f} s"
        if by_kind:
            line += f" ({by_kind})"
        if interrupted:
            line += " (interrupted)"
        print(line, file=self.out, flush=True)


# -- running a campaign ---------------------------------------------------------------------------

def _budget_left(tally: Tally, runs: int | None, deadline: float | None, handed_out: int) -> bool:
    if runs is not None and handed_out >= runs:
        return False
    return deadline is None or time.monotonic() < deadline


def run_campaign(name: str, module: ModuleType, seed: int, runs: int | None, seconds: float | None,
                 jobs: int, out) -> Tally:
    tally = Tally(name, out)
    deadline = None if seconds is None else tally.started + seconds
    try:
        if jobs > 1:
            _run_parallel(name, tally, seed, runs, deadline, jobs)
        else:
            handed_out = 0
            while _budget_left(tally, runs, deadline, handed_out):
                tally.add(run_seed(module, seed + handed_out))
                handed_out += 1
    except KeyboardInterrupt:
        tally.close(interrupted=True)
        raise
    tally.close()
    return tally


def _worker(campaign: str, connection) -> None:
    """A worker process: runs the seeds it is sent, answers each with its Failure or None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # the parent handles Ctrl-C and ends us
    module = load(campaign)
    while True:
        seed = connection.recv()
        if seed is None:
            return
        connection.send((seed, run_seed(module, seed, alarm=False)))


class _Worker:
    def __init__(self, context, campaign: str):
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_worker, args=(campaign, child), daemon=True)
        self.process.start()
        child.close()
        self.seed: int | None = None
        self.since = 0.0

    def send(self, seed: int) -> None:
        self.seed, self.since = seed, time.monotonic()
        self.connection.send(seed)

    def end(self, kill: bool = False) -> None:
        if kill:
            self.process.kill()
        else:
            try:
                self.connection.send(None)
            except (BrokenPipeError, OSError):
                pass
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.connection.close()


def _run_parallel(name: str, tally: Tally, seed: int, runs: int | None, deadline: float | None,
                  jobs: int) -> None:
    """Seeds in ``jobs`` worker processes; a worker that overruns HANG_SECONDS, or dies, is
    replaced and its seed reported."""
    context = multiprocessing.get_context("spawn")
    workers = [_Worker(context, name) for _ in range(jobs)]
    handed_out = 0
    try:
        for worker in workers:
            if _budget_left(tally, runs, deadline, handed_out):
                worker.send(seed + handed_out)
                handed_out += 1
        while any(w.seed is not None for w in workers):
            busy = [w for w in workers if w.seed is not None]
            ready = wait_for([w.connection for w in busy], timeout=1.0)
            now = time.monotonic()
            for worker in busy:
                failure, replace = None, False
                if worker.connection in ready:
                    try:
                        done, failure = worker.connection.recv()
                    except (EOFError, OSError):
                        failure = Failure(worker.seed, "exception", f"the worker process died (exit code "
                                          f"{worker.process.exitcode})", "exception worker died")
                        replace = True
                elif now - worker.since > HANG_SECONDS:
                    failure = Failure(worker.seed, "contract", f"the run did not finish within {HANG_SECONDS:g} s "
                                      "(worker killed)", "contract run did not finish")
                    replace = True
                else:
                    continue
                tally.add(failure)
                worker.seed = None
                if replace:
                    worker.end(kill=True)
                    workers[workers.index(worker)] = worker = _Worker(context, name)
                if _budget_left(tally, runs, deadline, handed_out):
                    worker.send(seed + handed_out)
                    handed_out += 1
    finally:
        for worker in workers:
            worker.end(kill=worker.seed is not None)


def replay(name: str, module: ModuleType, seed: int, out) -> Tally:
    tally = Tally(name, out)
    failure = run_seed(module, seed)
    tally.add(failure, verbose=True)
    if failure is None:
        print(f"{name} seed={seed}: ok", file=out)
    tally.close()
    return tally


# -- the command line -----------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    def error(self, message: str):          # one line, status 2, no usage dump
        raise UsageError(message)


def _positive_int(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text!r}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a seed: {text!r} (a number >= 0)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a seed is a number >= 0, not {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"seconds must be finite and above 0, not {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ringminus fuzz", description=__doc__.split("\n\n")[0],
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("campaign", metavar="CAMPAIGN", choices=(*CAMPAIGNS, "all"),
                        help=f"one of {', '.join(CAMPAIGNS)}, or all (each in turn, each with the budget)")
    parser.add_argument("--seed", type=_seed, default=1, help="first seed (default 1)")
    parser.add_argument("--runs", type=_positive_int, help=f"runs (default {DEFAULT_RUNS} without --seconds)")
    parser.add_argument("--seconds", type=_seconds, help="stop starting runs after this many seconds")
    parser.add_argument("--replay", type=_seed, metavar="SEED", help="run one seed and print its traceback")
    parser.add_argument("--jobs", type=_positive_int, default=1,
                        help="worker processes (default 1: in this process)")
    return parser


def main(argv: list[str] | None = None, out=None) -> int:
    out = out if out is not None else sys.stdout
    try:
        args = build_parser().parse_args(argv)
    except UsageError as error:
        print(f"ringminus fuzz: {_one_line(str(error))}", file=sys.stderr)
        return 2
    if args.replay is not None and (args.runs is not None or args.seconds is not None):
        print("ringminus fuzz: --replay runs one seed; it takes no --runs or --seconds", file=sys.stderr)
        return 2
    names = CAMPAIGNS if args.campaign == "all" else (args.campaign,)
    runs = DEFAULT_RUNS if args.runs is None and args.seconds is None else args.runs
    failed = False
    try:
        for name in names:
            try:
                module = load(name)
            except CampaignMissing as missing:
                if args.campaign != "all":
                    print(f"ringminus fuzz: {missing}", file=sys.stderr)
                    return 2
                print(f"{name}: skipped: {missing}", file=out, flush=True)
                continue
            if args.replay is not None:
                tally = replay(name, module, args.replay, out)
            else:
                tally = run_campaign(name, module, args.seed, runs, args.seconds, args.jobs, out)
            failed |= bool(tally.failures)
    except KeyboardInterrupt:
        return INTERRUPTED_STATUS
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    return 1 if failed else 0


__all__ = ["Failure", "HANG_SECONDS", "classify", "main", "run_campaign", "run_seed"]
