"""World-switch round trips of this tree against another commit, side by side in one run.

    python benchmarks/compare.py [REV] [--rounds N] [--smis N] [--exits N] [--json FILE]

REV (default HEAD~1) is checked out into a temporary git worktree.  Each round runs, for each
tree in turn and in a fresh process (each imports its own ringminus), the four SMI round-trip
configurations of smm.py and the VMRUN/#VMEXIT round trips of nested.py — this tree's
scripts, driving either tree through the public API.  Each figure is the best over the rounds
in process CPU time (a shared host varies run to run; alternating the trees spreads that
evenly); the ratio is this tree's over REV's.  Timing is never asserted.
"""
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def worker(smis: int, exits: int) -> dict:
    """In the child: round trips per second of each configuration, for RINGMINUS_TREE's code."""
    sys.path.insert(0, str(HERE))
    import nested                                   # noqa: E402 (after RINGMINUS_TREE is in place)
    import smm                                      # noqa: E402
    rates = {}
    for mode, boot, entry, bits, template in smm.MODES:
        code = smm.assemble(template.format(n=smis), entry, bits)
        for placement, _description, _target in smm.PLACEMENTS:
            machine = smm.machine_for(placement, boot, entry, code)
            start = time.process_time()
            result = machine.run()
            elapsed = time.process_time() - start
            if result.smm.get("entries") != smis:
                raise RuntimeError(f"SMI {mode}/{placement}: {result.smm.get('entries')} entries, not {smis}")
            rates[f"SMI, {mode} mode, handler in {placement}"] = smis / elapsed
    start = time.process_time()
    nested.ringminus_run(exits)
    rates["VMRUN/#VMEXIT (in-guest L1, CPUID exits)"] = exits / (time.process_time() - start)
    return rates


def measure(tree: Path, smis: int, exits: int) -> dict:
    child = subprocess.run([sys.executable, __file__, "--worker", str(smis), str(exits)], capture_output=True,
                           text=True, env={**os.environ, "RINGMINUS_TREE": str(tree)}, check=True)
    return json.loads(child.stdout)


def main(argv=None) -> int:
    sys.path.insert(0, str(HERE))
    from common import add_repeat, banner, make_parser, require_positive, write_json   # noqa: E402
    parser = make_parser(__doc__)
    parser.add_argument("rev", nargs="?", default="HEAD~1", help="the commit to compare with (default HEAD~1)")
    parser.add_argument("--smis", type=int, default=4000, help="SMI round trips per run (default 4,000)")
    parser.add_argument("--exits", type=int, default=5000, help="VMRUN round trips per run (default 5,000)")
    add_repeat(parser, "tree and configuration")
    args = parser.parse_args(argv)
    require_positive(parser, args, "smis", "exits", "repeat")
    with tempfile.TemporaryDirectory() as scratch:
        other = Path(scratch) / "tree"
        added = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(other), args.rev],
                               capture_output=True, text=True)
        if added.returncode:
            parser.error(f"cannot check out {args.rev!r}: {added.stderr.strip().splitlines()[-1]}")
        try:
            best: dict[str, dict[str, float]] = {"this": {}, args.rev: {}}
            for _ in range(args.repeat):
                for label, tree in (("this", ROOT), (args.rev, other)):
                    for name, rate in measure(tree, args.smis, args.exits).items():
                        best[label][name] = max(rate, best[label].get(name, 0.0))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(other)], capture_output=True)
    banner(f"best of {args.repeat} per tree, process CPU time, {args.smis:,} SMIs and {args.exits:,} VMRUNs per run")
    print(f"{'round trips/s':<48} {args.rev:>12} {'this tree':>12} {'ratio':>7}")
    for name, rate in best["this"].items():
        print(f"{name:<48} {best[args.rev][name]:>12,.0f} {rate:>12,.0f} {rate / best[args.rev][name]:>7.3f}")
    write_json(args.json, best)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        print(json.dumps(worker(int(sys.argv[2]), int(sys.argv[3]))))
    else:
        sys.exit(main())
