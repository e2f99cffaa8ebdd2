"""kvm-unit-tests' svm.flat on QEMU 7.2 TCG and on ringminus, as whole processes, same run.

Both boot the kernel as kvm-unit-tests' runner does (q35, 4 GiB, ``-cpu max``, one vCPU,
multiboot through SeaBIOS, isa-debug-exit at 0xF4, the serial port on stdout) with the same
``--append`` selection, and the script prints each engine's SUMMARY line, its PASS/FAIL/SKIP
counts, its exit status and its wall time, then the checks whose verdicts differ.  The
default selection leaves out the tests no emulator finishes in minutes (the latency tests'
10⁶ round trips), ``reg_corruption`` (which waits for timer exits QEMU's TCG never gives)
and ``svm_exception_test`` (its #AC case needs alignment checking, which neither performs).

This is a manual benchmark: its figures depend on the host and are never asserted in tests
(tests/svm/test_kvm_unit_tests.py runs a bounded subset by name).

    python benchmarks/kvm_unit_tests.py [--kernel FILE] [--append ARGS] [--json FILE]
"""
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from common import banner, make_parser, table_header, write_json

KERNEL = Path(__file__).resolve().parents[1] / "tests" / "kut" / "svm.flat"
SELECTION = ("-pause_filter_test -svm_unsupported_instruction_intercept_test -reg_corruption -latency_run_exit "
             "-latency_run_exit_clean -latency_svm_insn -svm_exception_test")
TIMEOUT = 3600.0
VERDICT = re.compile(r"^(PASS|FAIL|SKIP): (.*?)\r?$", re.M)


def qemu_command(kernel: Path, selection: str) -> list[str]:
    return ["qemu-system-x86_64", "-nodefaults", "-machine", "q35,accel=tcg", "-cpu", "max,+svm", "-m", "4g",
            "-smp", "1", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x4", "-display", "none",
            "-serial", "stdio", "-kernel", str(kernel), "-append", selection]


def ringminus_command(kernel: Path, selection: str) -> list[str]:
    return [sys.executable, "-m", "ringminus", "run", "--machine", "q35", "--mem", "4G", "--cpu", "max",
            "--kernel", str(kernel), "--append", selection, "--timeout", str(TIMEOUT)]


def run(command: list[str]) -> dict:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, timeout=TIMEOUT + 60)
    elapsed = time.perf_counter() - started
    out = done.stdout.decode("latin-1")
    summary = re.search(r"^SUMMARY: .*?\r?$", out, re.M)
    verdicts = VERDICT.findall(out)
    return {"seconds": elapsed, "status": done.returncode, "summary": summary.group(0).strip() if summary else None,
            "counts": dict(Counter(kind for kind, _ in verdicts)), "verdicts": verdicts}


def differing(a: list, b: list) -> list[tuple[str, str, str]]:
    """(check, verdict here, verdict there) for each check the two report differently (the
    n-th report of a name on one side against the n-th on the other)."""
    def keyed(verdicts):
        seen: Counter = Counter()
        out = {}
        for kind, name in verdicts:
            seen[name] += 1
            out[(name, seen[name])] = kind
        return out
    left, right = keyed(a), keyed(b)
    return [(name, left.get((name, n), "-"), right.get((name, n), "-"))
            for name, n in sorted(left.keys() | right.keys()) if left.get((name, n)) != right.get((name, n))]


def main(argv=None) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--kernel", type=Path, default=KERNEL, help="the test kernel (default tests/kut/svm.flat)")
    parser.add_argument("--append", default=SELECTION, help="kvm-unit-tests' selection (default: see above)")
    args = parser.parse_args(argv)
    if not args.kernel.is_file():
        parser.error(f"--kernel {args.kernel}: no such file")
    engines = {"ringminus": ringminus_command(args.kernel, args.append)}
    if shutil.which("qemu-system-x86_64"):
        engines = {"QEMU 7.2 TCG": qemu_command(args.kernel, args.append), **engines}
    else:
        print("qemu-system-x86_64 is not installed: ringminus only")
    banner(f"{args.kernel.name} -append {args.append!r}", "whole processes")
    results = {name: run(command) for name, command in engines.items()}
    table_header(f"{'engine':<14} {'seconds':>8} {'status':>6} {'PASS':>5} {'FAIL':>5} {'SKIP':>5}  SUMMARY")
    for name, r in results.items():
        counts = r["counts"]
        print(f"{name:<14} {r['seconds']:>8.1f} {r['status']:>6} {counts.get('PASS', 0):>5} "
              f"{counts.get('FAIL', 0):>5} {counts.get('SKIP', 0):>5}  {r['summary']}")
    if len(results) == 2:
        qemu, ours = results.values()
        changed = differing(qemu["verdicts"], ours["verdicts"])
        print(f"\n{len(changed)} checks reported differently (QEMU -> ringminus):")
        for name, there, here in changed:
            print(f"  {there:>4} -> {here:<4} {name}")
    write_json(args.json, {name: {k: v for k, v in r.items() if k != "verdicts"} for name, r in results.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
