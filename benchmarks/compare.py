"""World-switch round trips of this tree against another commit, side by side in one run.

    python benchmarks/compare.py [REV] [--rounds N] [--smis N] [--exits N] [--instructions] [--json FILE]

REV (default HEAD~1) is checked out into a temporary git worktree.  Each round runs, for each
tree in turn and in a fresh process (each imports its own ringminus), the four SMI round-trip
configurations of smm.py and the VMRUN/#VMEXIT round trips of nested.py — this tree's
scripts, driving either tree through the public API.  Each figure is the best over the rounds
in process CPU time (a shared host varies run to run; alternating the trees spreads that
evenly); the ratio is REV's cost over this tree's (above 1: this tree is faster).

``--instructions`` counts instead of timing: each configuration runs under valgrind's
callgrind with a small and a large number of round trips, and the difference of the two
totals, divided by the difference in round trips, is the host instructions one round trip
costs — the same on every run, whatever else the host is doing (minutes: valgrind is slow).
Timing is never asserted.
"""
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FEW = 1                                 # round trips of the baseline run in --instructions


def configurations(smis: int, exits: int) -> dict:
    """In the child: name -> (round trips, run), each run a fresh machine for RINGMINUS_TREE's code."""
    sys.path.insert(0, str(HERE))
    import nested                                   # noqa: E402 (after RINGMINUS_TREE is in place)
    import smm                                      # noqa: E402
    runs = {}
    for mode, boot, entry, bits, template in smm.MODES:
        code = smm.assemble(template.format(n=smis), entry, bits)
        for placement, _description, _target in smm.PLACEMENTS:
            def run(mode=mode, placement=placement, boot=boot, entry=entry, code=code):
                machine = smm.machine_for(placement, boot, entry, code)
                start = time.process_time()
                result = machine.run()
                elapsed = time.process_time() - start
                if result.smm.get("entries") != smis:
                    raise RuntimeError(f"SMI {mode}/{placement}: {result.smm.get('entries')} entries, not {smis}")
                return elapsed
            runs[f"SMI, {mode} mode, handler in {placement}"] = (smis, run)

    def vmruns():
        start = time.process_time()
        nested.ringminus_run(exits)
        return time.process_time() - start
    runs["VMRUN/#VMEXIT (in-guest L1, CPUID exits)"] = (exits, vmruns)
    return runs


def worker(smis: int, exits: int, only: str | None) -> dict:
    """Round trips and round trips per second of each configuration (or of ``only``)."""
    rates = {}
    for name, (trips, run) in configurations(smis, exits).items():
        if only is None or name == only:
            rates[name] = (trips, trips / run())
    return rates


def child(tree: Path, smis: int, exits: int, only: str | None = None, valgrind: bool = False) -> tuple[dict, str]:
    """The worker's figures for ``tree`` (and valgrind's report, ``valgrind``)."""
    command = [sys.executable, __file__, "--worker", str(smis), str(exits), *([only] if only else [])]
    if valgrind:
        command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *command]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "RINGMINUS_TREE": str(tree)})
    if done.returncode:
        raise RuntimeError(f"{tree}: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
    return json.loads(done.stdout), done.stderr


def instructions(tree: Path, name: str, smis: int, exits: int) -> float:
    """Host instructions per round trip of configuration ``name`` (see the module docstring)."""
    counts = []
    for scaled in (smis, exits), (FEW, FEW):
        figures, report = child(tree, *scaled, name, valgrind=True)
        counts.append((figures[name][0], int(re.search(r"Collected : (\d+)", report).group(1))))
    (many, more), (few, less) = counts
    return (more - less) / (many - few)


def main(argv=None) -> int:
    sys.path.insert(0, str(HERE))
    from common import add_repeat, banner, make_parser, require_positive, write_json   # noqa: E402
    parser = make_parser(__doc__)
    parser.add_argument("rev", nargs="?", default="HEAD~1", help="the commit to compare with (default HEAD~1)")
    parser.add_argument("--smis", type=int, default=4000, help="SMI round trips per run (default 4,000)")
    parser.add_argument("--exits", type=int, default=5000, help="VMRUN round trips per run (default 5,000)")
    parser.add_argument("--instructions", action="store_true",
                        help="count host instructions per round trip under valgrind instead of timing")
    add_repeat(parser, "tree and configuration")
    args = parser.parse_args(argv)
    require_positive(parser, args, "smis", "exits", "repeat")
    if args.instructions and min(args.smis, args.exits) <= FEW:
        parser.error(f"--instructions needs more than {FEW} SMIs and exits")
    with tempfile.TemporaryDirectory() as scratch:
        other = Path(scratch) / "tree"
        added = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(other), args.rev],
                               capture_output=True, text=True)
        if added.returncode:
            parser.error(f"cannot check out {args.rev!r}: {added.stderr.strip().splitlines()[-1]}")
        try:
            trees = (("this", ROOT), (args.rev, other))
            if args.instructions:
                names = list(child(ROOT, FEW, FEW)[0])
                figures = {label: {name: instructions(tree, name, args.smis, args.exits) for name in names}
                           for label, tree in trees}
            else:
                figures = {"this": {}, args.rev: {}}
                for _ in range(args.repeat):
                    for label, tree in trees:
                        for name, (_trips, rate) in child(tree, args.smis, args.exits)[0].items():
                            figures[label][name] = max(rate, figures[label].get(name, 0.0))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(other)], capture_output=True)
    if args.instructions:
        banner(f"host instructions per round trip (valgrind), {args.smis:,} SMIs and {args.exits:,} VMRUNs per run")
        header, cost = "instructions/round trip", lambda label, name: figures[label][name]
    else:
        banner(f"best of {args.repeat} per tree, process CPU time, {args.smis:,} SMIs and {args.exits:,} VMRUNs per run")
        header, cost = "µs/round trip", lambda label, name: 1e6 / figures[label][name]
    print(f"{header:<48} {args.rev:>12} {'this tree':>12} {'ratio':>7}")
    for name in figures["this"]:
        print(f"{name:<48} {cost(args.rev, name):>12,.1f} {cost('this', name):>12,.1f} "
              f"{cost(args.rev, name) / cost('this', name):>7.3f}")
    write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        print(json.dumps(worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else None)))
    else:
        sys.exit(main())
