"""SeaBIOS to "No bootable device.": QEMU 7.2 TCG and ringminus, as whole processes, same run.

Each engine boots Debian's SeaBIOS (``--bios``, default bios-256k.bin) on the board with
128 MiB, the debug console on 0x402, and is timed from process start until its debug log
holds "No bootable device." (QEMU never stops by itself: its log file is polled every
millisecond and the process killed then; ringminus stops there with --until-console).
ringminus runs on its virtual clock (deterministic: every instruction counted).  Best of
``--repeat`` per engine, alternated.

This is a manual benchmark: timing depends on the host and is never asserted in tests.

    python benchmarks/seabios.py [--machine pc|q35] [--bios FILE] [--repeat R] [--json FILE]
"""
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import add_repeat, banner, make_parser, require_positive, table_header, write_json

END = b"No bootable device."
TIMEOUT = 120.0


def qemu_seconds(machine: str, bios: Path) -> float:
    with tempfile.TemporaryDirectory() as scratch:
        log = Path(scratch) / "debug.log"
        started = time.perf_counter()
        process = subprocess.Popen(
            ["qemu-system-x86_64", "-machine", machine, "-accel", "tcg", "-m", "128M", "-smp", "1", "-bios", str(bios),
             "-nodefaults", "-nographic", "-no-reboot", "-monitor", "none", "-serial", "null",
             "-chardev", f"file,id=dbg,path={log}", "-device", "isa-debugcon,iobase=0x402,chardev=dbg"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while time.perf_counter() - started < TIMEOUT:
                if log.exists() and END in log.read_bytes():
                    return time.perf_counter() - started
                time.sleep(0.001)
            raise RuntimeError(f"QEMU: no {END.decode()!r} in {TIMEOUT:.0f} s")
        finally:
            process.kill()
            process.wait()


def ringminus_seconds(machine: str, bios: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "ringminus", "run", "--machine", machine, "--mem", "128M",
                           "--boot", "bios", str(bios), "--debugcon-port", "0x402",
                           "--until-console", END.decode()], capture_output=True, timeout=TIMEOUT)
    elapsed = time.perf_counter() - started
    if END not in done.stdout:
        raise RuntimeError(f"ringminus: no {END.decode()!r}: {done.stderr.decode()[-300:]}")
    return elapsed


def main(argv=None) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--machine", choices=("pc", "q35"), default="q35", help="the board (default q35)")
    parser.add_argument("--bios", type=Path, default=Path("/usr/share/seabios/bios-256k.bin"),
                        help="the SeaBIOS image (default Debian's bios-256k.bin)")
    add_repeat(parser, "engine")
    args = parser.parse_args(argv)
    require_positive(parser, args, "repeat")
    if not args.bios.is_file():
        parser.error(f"--bios {args.bios}: no such file (apt-get install seabios)")
    engines = {"ringminus": lambda: ringminus_seconds(args.machine, args.bios)}
    if shutil.which("qemu-system-x86_64"):
        engines = {"QEMU 7.2 TCG": lambda: qemu_seconds(args.machine, args.bios), **engines}
    else:
        print("qemu-system-x86_64 is not installed: ringminus only")
    banner(f"{args.bios.name} on {args.machine}", f"best of {args.repeat} per engine, whole processes")
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(args.repeat):
        for name, measure in engines.items():
            times[name].append(measure())
    best = {name: min(values) for name, values in times.items()}
    reference = best.get("QEMU 7.2 TCG")
    table_header(f"{'engine':<14} {'seconds':>8} {'x QEMU':>7}")
    for name, seconds in best.items():
        ratio = f"{seconds / reference:>7.1f}" if reference else f"{'-':>7}"
        print(f"{name:<14} {seconds:>8.2f} {ratio}")
    write_json(args.json, {"machine": args.machine, "bios": str(args.bios), "seconds": best, "all": times})
    return 0


if __name__ == "__main__":
    sys.exit(main())
