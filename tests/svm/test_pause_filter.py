"""The pause filter (APM §15.14.4, CPUID Fn8000_000A EDX bits 10 and 12; kvm-unit-tests'
pause_filter_test): with the PAUSE intercept set, VMRUN loads a counter from
PAUSE_FILTER_COUNT (VMCB 0x03E) and only the PAUSE that exhausts it exits; with
PAUSE_FILTER_THRESHOLD (0x03C) a PAUSE more than that many cycles after the previous one
starts the count afresh.  Cycles are the virtual clock's (one per instruction), so the
threshold cases run with instructions counted."""
from __future__ import annotations

import pytest

from ringminus import StopReason

from ..l1 import HLT, GuestHypervisor

PAUSE = 0x077
MARK = 0x5A


def spin(pauses: int, wait: int = 0) -> str:
    """``pauses`` PAUSEs in a tight loop, ``wait`` iterations of an empty loop, as many
    PAUSEs again (kvm-unit-tests' pause_filter_test_guest_main), then RBX = MARK and HLT."""
    second = f"mov ecx, {pauses}\nb: pause\ndec ecx\njnz b" if wait else ""
    waiting = f"mov ecx, {wait}\nw: dec ecx\njnz w" if wait else ""
    return f"mov ecx, {pauses}\na: pause\ndec ecx\njnz a\n{waiting}\n{second}\nmov rbx, {MARK}\nhlt"


def run(pauses: int, count: int, wait: int = 0, threshold: int = 0, model: str = "max"):
    hv = GuestHypervisor(l2=spin(pauses, wait), intercepts=(HLT, PAUSE), max_exits=1, cpu_model=model,
                         exact_instructions=True)
    hv.control["pause_filter_count"], hv.control["pause_filter_threshold"] = count, threshold
    assert hv.run().stop.reason is StopReason.HLT
    return hv.exits()[0]


@pytest.mark.parametrize("pauses, count, wait, threshold, exits", [
    (10, 9, 0, 0, True),            # the count runs out
    (20, 21, 0, 0, False),          # it does not
    (9, 9, 0, 0, True),             # the PAUSE that brings it to zero exits
    (20, 21, 1000, 10, False),      # the wait exceeds the threshold: the count starts again
    (20, 21, 10, 1000, True),       # it does not
    (3, 0, 0, 0, True),             # count 0: no filtering
], ids=["count-exhausted", "count-left", "exactly-count", "threshold-resets", "threshold-holds", "no-filter"])
def test_pause_exits_only_when_the_filter_count_runs_out(pauses, count, wait, threshold, exits):
    exit_ = run(pauses, count, wait, threshold)
    assert (exit_.exitcode, exit_.rbx != MARK) == ((PAUSE, True) if exits else (HLT, False))


def test_a_model_without_the_pause_filter_exits_at_the_first_pause():
    exit_ = run(20, 21, model="qemu64")
    assert exit_.exitcode == PAUSE and exit_.rcx == 20
