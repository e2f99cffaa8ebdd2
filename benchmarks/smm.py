"""SMM round trips: SMI -> handler -> RSM, per second, with a minimal handler.

The guest raises every SMI itself, by writing to the APM control port (``out 0xb2, al``
on a ``Machine(apm_smi=True)``: each write raises an SMI, taken right after the OUT); the
handler increments a counter in memory and executes RSM, which returns right after the OUT.
Four configurations, each on a fresh Machine:

* interrupted code in real mode or in long mode (64-bit, identity-mapped), times
* handler in plain RAM (QEMU's default layout: SMBASE 0x30000 is ordinary RAM, no SMRAM
  range there; target >= 20,000/s), or handler in A-segment SMRAM (SMBASE 0xA0000, SMRAM
  enabled and closed: the first SMI swaps SMRAM in, then every RSM hides it from non-SMM
  code and every SMI shows it again, which drops and retranslates the handler's code each
  time; target >= 8,000/s).

Each run checks that the guest halted, that SMM was entered exactly N times and that the
handler's counter reads N.  Each figure is the best of ``--repeat`` runs.  There is no
bare-Unicorn baseline: Unicorn alone cannot do SMM, so no ratio would mean anything.

This is a manual benchmark: timing depends on the host and is never asserted in tests.

    python benchmarks/smm.py [--json FILE] [--smis N] [--repeat R]
"""
import argparse
import json
import sys
from pathlib import Path
from time import perf_counter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import unicorn  # noqa: E402
from keystone import KS_ARCH_X86, KS_MODE_16, KS_MODE_64, Ks  # noqa: E402

from ringminus import Machine, StopReason  # noqa: E402

COUNTER = 0x9000                      # the handler's counter, in ordinary RAM below SMRAM
HANDLER_OFFSET = 0x8000               # SMM entry = SMBASE + 0x8000
RSM = b"\x0f\xaa"                     # keystone does not know RSM
DEFAULT_SMIS = 20_000
DEFAULT_SMBASE = 0x30000              # reset SMBASE: ordinary RAM in QEMU's default layout
ASEG_SMBASE = 0xA0000

# (mode, boot state, entry, keystone mode, guest loop template)
MODES = [
    ("real", "real", 0x7C00, KS_MODE_16, "mov ecx, {n}; l: out 0xb2, al; dec ecx; jnz l; hlt"),
    ("long", "long", 0x100000, KS_MODE_64, "mov rcx, {n}; l: out 0xb2, al; dec rcx; jnz l; hlt"),
]
# (placement, description, target round trips per second)
PLACEMENTS = [
    ("ram", "plain RAM, SMBASE 0x30000", 20_000),
    ("aseg", "A-segment SMRAM (closed), SMBASE 0xA0000", 8_000),
]


def assemble(mode: int, source: str, address: int) -> bytes:
    encoding, _ = Ks(KS_ARCH_X86, mode).asm(source, address)
    return bytes(encoding)


HANDLER = assemble(KS_MODE_16, f"inc dword ptr [{COUNTER:#x}]", 0) + RSM


def machine_for(placement: str, boot_state: str, entry: int, code: bytes) -> Machine:
    m = Machine(apm_smi=True)
    m.write_memory(entry, code)
    if placement == "ram":
        m.write_memory(DEFAULT_SMBASE + HANDLER_OFFSET, HANDLER)
    else:
        m.set_smbase(ASEG_SMBASE)
        m.smram.set_state("closed")
        m.load_smram(ASEG_SMBASE + HANDLER_OFFSET, HANDLER)
    m.boot(boot_state, entry)
    return m


def run_once(placement: str, boot_state: str, entry: int, code: bytes, smis: int) -> float:
    """Run the loop on a fresh Machine until HLT, check it; return elapsed seconds."""
    m = machine_for(placement, boot_state, entry, code)
    t0 = perf_counter()
    r = m.run()
    elapsed = perf_counter() - t0
    where = f"{boot_state} mode, handler in {placement}"
    if r.stop.reason is not StopReason.HLT:
        raise RuntimeError(f"{where}: stopped with {r.stop.reason.value!r} ({r.stop}), not 'hlt'")
    if r.smm.get("entries") != smis:
        raise RuntimeError(f"{where}: {r.smm.get('entries')} SMM entries, not {smis}")
    counter = int.from_bytes(m.read_view(COUNTER, 4), "little")
    if counter != smis:
        raise RuntimeError(f"{where}: handler counter reads {counter}, not {smis}")
    return elapsed


def measure(mode_name: str, boot_state: str, entry: int, ks_mode: int, template: str,
            placement: str, target: int, smis: int, repeat: int) -> dict:
    code = assemble(ks_mode, template.format(n=smis), entry)
    best = min(run_once(placement, boot_state, entry, code, smis) for _ in range(repeat))
    rate = smis / best
    return {"mode": mode_name, "handler": placement, "smis": smis, "seconds": best,
            "round_trips_per_s": rate, "us_per_round_trip": best / smis * 1e6,
            "target_per_s": target, "met": rate >= target}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--smis", type=int, default=DEFAULT_SMIS,
                        help=f"SMI round trips per run (default {DEFAULT_SMIS:,})")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per configuration (default 3)")
    args = parser.parse_args(argv)
    if args.smis < 1 or args.repeat < 1:
        parser.error("--smis and --repeat must be at least 1")
    if args.smis >= 2 ** 32:
        parser.error("--smis must fit in 32 bits (the real-mode loop counter and the handler's counter)")

    print(f"unicorn {unicorn.__version__}, {args.smis:,} SMIs per run, best of {args.repeat}")
    header = (f"{'interrupted':<12} {'handler':<42} {'round trips/s':>14} {'us each':>9} "
              f"{'target/s':>9} {'':>7}")
    print(header)
    print("-" * len(header))
    results = []
    for placement, description, target in PLACEMENTS:
        for mode_name, boot_state, entry, ks_mode, template in MODES:
            row = measure(mode_name, boot_state, entry, ks_mode, template, placement, target,
                          args.smis, args.repeat)
            results.append(row)
            print(f"{mode_name + ' mode':<12} {description:<42} {row['round_trips_per_s']:>14,.0f} "
                  f"{row['us_per_round_trip']:>9.1f} {target:>9,} {'met' if row['met'] else 'NOT met':>7}",
                  flush=True)

    if args.json:
        Path(args.json).write_text(json.dumps(
            {"configurations": results, "handler": HANDLER.hex(), "unicorn": unicorn.__version__},
            indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
