"""Guest throughput: bare Unicorn versus ringminus's Machine, in the same process.

Measures guest instructions per second for two tight guest loops, each run on a fresh
bare ``unicorn.Uc`` and on a fresh ``ringminus.Machine`` (alternating, after one untimed
warm-up of each), and reports the best figure of each engine plus the ratio
ringminus / bare (target >= 0.9).  Instruction counts are analytic, from the loop shape,
because an unlimited ``Machine.run()`` does not count instructions.

``--machine pc|q35`` runs ringminus's side on QEMU's board (its devices, timers and all),
which counts every instruction for its clock (``--clock`` picks the clock devices read).

This is a manual benchmark: timing depends on the host and is never asserted in tests.

    python benchmarks/throughput.py [--json FILE] [--iterations N] [--repeat R]
                                    [--machine none|pc|q35] [--clock virtual|host]
"""
import sys
from time import perf_counter

from unicorn.x86_const import UC_X86_REG_ECX, UC_X86_REG_EIP, UC_X86_REG_RCX, UC_X86_REG_RIP, UC_X86_REG_RSP

from common import (UNICORN_VERSION, add_repeat, assemble, banner, bare_uc, booted_machine, make_parser,
                    require_positive, table_header, write_json)

CODE_BASE = 0x100000
MEMORY_SIZE = 2 * 1024 * 1024
STACK_TOP = 0x1F0000
DEFAULT_ITERATIONS = 50_000_000
TARGET_RATIO = 0.9

# Each loop: (name, bits, assembly template, instructions per iteration, fixed instructions).
# The fixed part is the leading `mov ecx/rcx, N` plus the final `hlt`.
ALU_BODY = ["add rax, rbx", "xor rdx, rax", "sub rsi, rdx", "add rbx, 3",
            "or rsi, rbx", "and rdx, rsi", "dec rcx", "jnz l"]
LOOPS = [
    ("32-bit dec/jnz", 32, "mov ecx, {n}; l: dec ecx; jnz l; hlt", 2, 2),
    ("64-bit ALU", 64, "mov rcx, {n}; l: " + "; ".join(ALU_BODY) + "; hlt", len(ALU_BODY), 2),
]


def run_bare(bits: int, code: bytes) -> float:
    """Run on a fresh bare Uc until HLT; return elapsed seconds."""
    uc = bare_uc(code, CODE_BASE, MEMORY_SIZE, bits)
    if bits == 32:
        uc.reg_write(UC_X86_REG_EIP, CODE_BASE)
    else:
        uc.reg_write(UC_X86_REG_RIP, CODE_BASE)
        uc.reg_write(UC_X86_REG_RSP, STACK_TOP)
    t0 = perf_counter()
    uc.emu_start(CODE_BASE, until=0xFFFFFFFFFFFFFFFF)
    elapsed = perf_counter() - t0
    counter = uc.reg_read(UC_X86_REG_ECX if bits == 32 else UC_X86_REG_RCX)
    if counter != 0:
        raise RuntimeError(f"bare unicorn: loop counter ended at {counter}, not 0")
    return elapsed


def run_ringminus(bits: int, code: bytes, **machine_args) -> float:
    """Run on a fresh Machine until HLT; return elapsed seconds."""
    m = booted_machine(code, CODE_BASE, "protected" if bits == 32 else "long", **machine_args)
    t0 = perf_counter()
    r = m.run()
    elapsed = perf_counter() - t0
    if r.stop.reason.value != "hlt":
        raise RuntimeError(f"ringminus: stopped with {r.stop.reason.value!r}, not 'hlt'")
    if r.regs["rcx"] != 0:
        raise RuntimeError(f"ringminus: loop counter ended at {r.regs['rcx']}, not 0")
    return elapsed


def measure(name: str, bits: int, template: str, per_iteration: int, fixed: int,
            iterations: int, repeat: int, **machine_args) -> dict:
    code = assemble(template.format(n=iterations), CODE_BASE, bits)
    instructions = per_iteration * iterations + fixed
    run_bare(bits, code)                  # untimed warm-up of each engine
    run_ringminus(bits, code, **machine_args)
    bare_times, ringminus_times = [], []
    for _ in range(repeat):               # alternate so host drift hits both engines
        bare_times.append(run_bare(bits, code))
        ringminus_times.append(run_ringminus(bits, code, **machine_args))
    bare = instructions / min(bare_times)
    ringminus = instructions / min(ringminus_times)
    return {"name": name, "instructions": instructions, "bare_insn_per_s": bare,
            "ringminus_insn_per_s": ringminus, "ratio": ringminus / bare}


def main(argv=None) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS,
                        help=f"loop iterations (default {DEFAULT_ITERATIONS:,})")
    parser.add_argument("--machine", choices=("none", "pc", "q35"), default="none",
                        help="the machine ringminus's side runs on (default none)")
    parser.add_argument("--clock", choices=("virtual", "host"), default="virtual",
                        help="ringminus's clock (default virtual)")
    add_repeat(parser, "engine")
    args = parser.parse_args(argv)
    require_positive(parser, args, "iterations", "repeat")
    if args.iterations >= 2 ** 32:
        parser.error("--iterations must fit in 32 bits (the 32-bit loop counter)")

    banner(f"{args.iterations:,} iterations", f"best of {args.repeat} per engine",
           f"machine {args.machine}, clock {args.clock}")
    table_header(f"{'loop':<16} {'instructions':>14} {'bare M/s':>10} {'ringminus M/s':>14} {'ratio':>7}")
    results = []
    for name, bits, template, per_iteration, fixed in LOOPS:
        row = measure(name, bits, template, per_iteration, fixed, args.iterations, args.repeat,
                      machine=args.machine, clock=args.clock)
        results.append(row)
        print(f"{name:<16} {row['instructions']:>14,} {row['bare_insn_per_s'] / 1e6:>10.1f} "
              f"{row['ringminus_insn_per_s'] / 1e6:>14.1f} {row['ratio']:>7.3f}", flush=True)
    print()
    for row in results:
        verdict = "met" if row["ratio"] >= TARGET_RATIO else "NOT met"
        print(f"{row['name']}: target ratio >= {TARGET_RATIO}: {verdict}")

    write_json(args.json, {"loops": results, "machine": args.machine, "clock": args.clock,
                           "unicorn": UNICORN_VERSION})
    return 0


if __name__ == "__main__":
    sys.exit(main())
