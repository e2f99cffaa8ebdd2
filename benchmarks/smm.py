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
import sys
from time import perf_counter

# common before ringminus: it puts the repository root on sys.path.
from common import (UNICORN_VERSION, add_repeat, assemble, banner, fastest, make_parser, require_positive,
                    table_header, write_json)
from ringminus import Machine, StopReason

COUNTER = 0x9000                      # the handler's counter, in ordinary RAM below SMRAM
HANDLER_OFFSET = 0x8000               # SMM entry = SMBASE + 0x8000
RSM = b"\x0f\xaa"                     # keystone does not know RSM
DEFAULT_SMIS = 20_000
DEFAULT_SMBASE = 0x30000              # reset SMBASE: ordinary RAM in QEMU's default layout
ASEG_SMBASE = 0xA0000

# (mode, boot state, entry, code bits, guest loop template)
MODES = [
    ("real", "real", 0x7C00, 16, "mov ecx, {n}; l: out 0xb2, al; dec ecx; jnz l; hlt"),
    ("long", "long", 0x100000, 64, "mov rcx, {n}; l: out 0xb2, al; dec rcx; jnz l; hlt"),
]
# (placement, description, target round trips per second)
PLACEMENTS = [
    ("ram", "plain RAM, SMBASE 0x30000", 20_000),
    ("aseg", "A-segment SMRAM (closed), SMBASE 0xA0000", 8_000),
]


HANDLER = assemble(f"inc dword ptr [{COUNTER:#x}]", 0, 16) + RSM


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


def measure(mode_name: str, boot_state: str, entry: int, bits: int, template: str,
            placement: str, target: int, smis: int, repeat: int) -> dict:
    code = assemble(template.format(n=smis), entry, bits)
    best = fastest(lambda: run_once(placement, boot_state, entry, code, smis), repeat)
    rate = smis / best
    return {"mode": mode_name, "handler": placement, "smis": smis, "seconds": best,
            "round_trips_per_s": rate, "us_per_round_trip": best / smis * 1e6,
            "target_per_s": target, "met": rate >= target}


def main(argv=None) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--smis", type=int, default=DEFAULT_SMIS,
                        help=f"SMI round trips per run (default {DEFAULT_SMIS:,})")
    add_repeat(parser)
    args = parser.parse_args(argv)
    require_positive(parser, args, "smis", "repeat")
    if args.smis >= 2 ** 32:
        parser.error("--smis must fit in 32 bits (the real-mode loop counter and the handler's counter)")

    banner(f"{args.smis:,} SMIs per run", f"best of {args.repeat}")
    table_header(f"{'interrupted':<12} {'handler':<42} {'round trips/s':>14} {'us each':>9} "
                 f"{'target/s':>9} {'':>7}")
    results = []
    for placement, description, target in PLACEMENTS:
        for mode_name, boot_state, entry, bits, template in MODES:
            row = measure(mode_name, boot_state, entry, bits, template, placement, target,
                          args.smis, args.repeat)
            results.append(row)
            print(f"{mode_name + ' mode':<12} {description:<42} {row['round_trips_per_s']:>14,.0f} "
                  f"{row['us_per_round_trip']:>9.1f} {target:>9,} {'met' if row['met'] else 'NOT met':>7}",
                  flush=True)

    write_json(args.json, {"configurations": results, "handler": HANDLER.hex(), "unicorn": UNICORN_VERSION})
    return 0


if __name__ == "__main__":
    sys.exit(main())
