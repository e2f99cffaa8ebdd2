"""World switches and plain guest code on ringminus against QEMU 7.2 TCG, as whole processes.

The same -bios images on both (vs_qemu.asm, built here with nasm): q35, SMIs through the
ICH9's APM port and a handler `inc [mem]; rsm` at SMBASE 0x30000 + 0x8000, from real,
32-bit protected and long mode; a 32-bit L1 that VMRUNs an L2 exiting at once on CPUID, bare
and inside a real hypervisor's CLGI; VMLOAD; VMRUN; VMSAVE; STGI; and `dec ecx; jnz` in
real and 32-bit mode.  Each rate is N iterations over the CPU time (user + system, from the
child's rusage) of a run with N minus that of a run with N = 0, median of ``--repeat``; the
ratio is ringminus's rate over QEMU's (target >= 0.25, the goal 1).  Also: the start-up wall
time of each engine on the N = 0 image (median of 5), and ringminus's peak RSS for a tiny
run, for --mem 1G, and for the SMI loop at N and 10 N (it must not grow with the switches).

QEMU is skipped when ``qemu-system-x86_64`` is not installed; nasm is required.  Timing is
never asserted in tests.

    python benchmarks/vs_qemu.py [--n N] [--repeat R] [--json FILE]
"""
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import UNICORN_VERSION, banner, make_parser, require_positive, write_json

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "vs_qemu.asm"
TARGET = 0.25
# name, WORK, MODE, what one iteration is
WORKLOADS = (("smi_real", "smi", 16, "SMI round trips"), ("smi_protected", "smi", 32, "SMI round trips"),
             ("smi_long", "smi", 64, "SMI round trips"), ("vmrun", "vmrun", 32, "VMRUN round trips"),
             ("vmrun_full_entry", "vmrun_full", 32, "VMRUN round trips"),
             ("loop_real", "loop", 16, "iterations"), ("loop_protected", "loop", 32, "iterations"))
QEMU = ["qemu-system-x86_64", "-nodefaults", "-machine", "q35,accel=tcg", "-cpu", "qemu64,+svm", "-m", "128",
        "-display", "none", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x4", "-bios"]
RINGMINUS = [sys.executable, "-m", "ringminus", "run", "--boot", "bios", "--machine", "q35", "--mem", "128M"]


def build(directory: Path, work: str, mode: int, n: int) -> Path:
    image = directory / f"{work}_{mode}_{n}.bin"
    if not image.exists():
        subprocess.run(["nasm", "-f", "bin", f"-DWORK={work}", f"-DMODE={mode}", f"-DN={n}", "-o", str(image),
                        str(SOURCE)], check=True)
    return image


def run_process(command: list[str]) -> tuple[float, float, int]:
    """(CPU seconds, wall seconds, peak RSS in KiB) of one whole process; it must exit 1
    (isa-debug-exit's, and ringminus's exit-port, status for 0)."""
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _pid, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 1:
        raise RuntimeError(f"{' '.join(command)}: exit status {child.returncode}: {child.stderr.read().decode()[-400:]}")
    return usage.ru_utime + usage.ru_stime, wall, usage.ru_maxrss


def rate(engine: list[str], directory: Path, work: str, mode: int, n: int, repeat: int) -> dict:
    full = [run_process(engine + [str(build(directory, work, mode, n))])[0] for _ in range(repeat)]
    empty = [run_process(engine + [str(build(directory, work, mode, 0))])[0] for _ in range(repeat)]
    seconds = statistics.median(full) - statistics.median(empty)
    return {"per_s": n / seconds if seconds > 0 else float("inf"), "seconds": seconds,
            "cpu_s_n": statistics.median(full), "cpu_s_0": statistics.median(empty)}


def startup(engine: list[str], image: Path) -> float:
    return statistics.median(run_process(engine + [str(image)])[1] for _ in range(5))


def main(argv=None) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--n", type=int, default=50_000, help="iterations of each world switch (default 50,000; "
                        "the loops run 1,000 times as many)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per image and engine (default 3)")
    args = parser.parse_args(argv)
    require_positive(parser, args, "n", "repeat")
    if shutil.which("nasm") is None:
        parser.error("nasm is needed to build the images (apt-get install nasm)")
    qemu = shutil.which(QEMU[0]) is not None
    banner(f"N = {args.n:,}", f"median of {args.repeat}", "CPU time of whole processes, N minus N = 0",
           "QEMU " + ("7.2 TCG" if qemu else "not installed"))
    results = {"unicorn": UNICORN_VERSION, "n": args.n, "target_ratio": TARGET, "workloads": {}}
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        print(f"{'workload':<18} {'QEMU TCG /s':>14} {'ringminus /s':>14} {'ratio':>7}  target {TARGET}")
        for name, work, mode, unit in WORKLOADS:
            n = args.n * 1000 if work == "loop" else args.n
            ours = rate(RINGMINUS, directory, work, mode, n, args.repeat)
            theirs = rate(QEMU, directory, work, mode, n, args.repeat) if qemu else None
            ratio = ours["per_s"] / theirs["per_s"] if theirs else None
            results["workloads"][name] = {"unit": unit, "n": n, "ringminus": ours, "qemu": theirs, "ratio": ratio,
                                          "met": None if ratio is None else ratio >= TARGET}
            print(f"{name:<18} {theirs['per_s'] if theirs else float('nan'):>14,.0f} {ours['per_s']:>14,.0f} "
                  f"{ratio if ratio is not None else float('nan'):>7.3f}  "
                  f"{'' if ratio is None else 'met' if ratio >= TARGET else 'NOT met'}")
        full, bare = results["workloads"]["vmrun_full_entry"], results["workloads"]["vmrun"]
        results["full_entry_of_bare"] = full["ringminus"]["per_s"] / bare["ringminus"]["per_s"]
        print(f"ringminus's full entry: {results['full_entry_of_bare']:.2f} of its bare VMRUN (target 0.8)")
        tiny = build(directory, "loop", 16, 0)
        results["startup_s"] = {"ringminus": startup(RINGMINUS, tiny), "qemu": startup(QEMU, tiny) if qemu else None}
        print(f"start-up (wall, median of 5, the N = 0 image): ringminus {results['startup_s']['ringminus']:.3f} s"
              + (f", QEMU {results['startup_s']['qemu']:.3f} s" if qemu else "") + " (target < 0.2 s)")
        smi = [run_process(RINGMINUS + [str(build(directory, "smi", 16, n))])[2] for n in (args.n, args.n * 10)]
        big = run_process(RINGMINUS + ["--mem", "1G", str(tiny)])[2]
        results["peak_rss_kib"] = {"tiny": run_process(RINGMINUS + [str(tiny)])[2], "mem_1g": big,
                                   f"smi_{args.n}": smi[0], f"smi_{args.n * 10}": smi[1]}
        print("ringminus peak RSS: " + ", ".join(f"{key} {value / 1024:.0f} MiB"
                                                 for key, value in results["peak_rss_kib"].items()))
    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
