"""What arming code sites costs: a dense image, a guest whose stack is in a big .bss, and the
Unicorn hook list behind both.

Three measurements, each next to bare Unicorn doing the same work in the same process
(DESIGN.md §3 rule 5):

* **dense image**: 64 KiB of HLT under the HLT intercept (every byte a flagged opcode): time
  to load it, to ``enter_guest`` and to take the first ``--exits`` HLT exits (skipped), with
  the Unicorn hooks installed and the ranges armed at the end.  Bare Unicorn: installing one
  single-address code hook per HLT, which is what arming by scanning memory did.
* **stack in a .bss**: an ELF whose 12 MiB .bss holds the stack; as L2 under the CPUID
  intercept (exits skipped) it pushes, calls and pops around a CPUID, ``--iterations``
  times: exits per second.  Bare Unicorn: the same loop with a one-address hook that skips
  the CPUID, alone and with a write hook over the .bss (what watching it for code did:
  every stack write calls Python).
* **hook list**: bare Unicorn, a loop whose one hooked instruction fires each iteration, with
  K idle one-address hooks elsewhere; and translating 20,000 small blocks with K idle hooks.
  Unicorn walks every code hook for each instruction it translates and each hook call: this
  is why sites.py keeps the number of hooks small (RANGE_BUDGET).

Each figure is the best of ``--repeat`` runs.  A manual benchmark: timing depends on the host
and is never asserted in tests (tests/emulator/test_load_costs.py checks the counts).

    python benchmarks/arming.py [--json FILE] [--exits N] [--iterations N] [--repeat R]
"""
import struct
import sys
from collections import Counter
from time import perf_counter

from unicorn import UC_HOOK_CODE, UC_HOOK_MEM_WRITE, Uc
from unicorn.x86_const import UC_X86_REG_RIP

# common before ringminus: it puts the repository root on sys.path.
from common import (UNICORN_VERSION, add_repeat, assemble, banner, bare_uc, make_parser,
                    require_positive, write_json)
from ringminus import Machine, StopReason
from ringminus.emulator.loader import parse_elf
from ringminus.intercepts import InterceptControls
from ringminus.arch.exitcodes import ExitCode

TEXT = 0x100000
BSS = 0x200000
BSS_SIZE = 12 << 20
STACK_TOP = BSS + BSS_SIZE
DENSE_SIZE = 0x10000
CPUID = b"\x0f\xa2"
HOOK_COUNTS = (0, 128, 1024, 8192)
IDLE_HOOKS_AT = 0x700000             # where the idle hooks of the hook-list measurement sit


def best(function, repeat: int):
    """(best seconds, the last run's other results) over ``repeat`` calls of ``function``,
    which returns (seconds, extra)."""
    runs = [function() for _ in range(repeat)]
    return min(seconds for seconds, _ in runs), runs[-1][1]


class HookCounter:
    """Counts the Unicorn hooks that machines install, by type, while it is active."""

    def __init__(self):
        self.added: Counter = Counter()
        self._class = type(Machine(memory_size=1 << 20).uc)
        self._original = self._class.hook_add

    def __enter__(self) -> Counter:
        original, added = self._original, self.added

        def counting(uc, htype, *args, **kwargs):
            added[htype] += 1
            return original(uc, htype, *args, **kwargs)

        self._class.hook_add = counting
        return added

    def __exit__(self, *_exc) -> None:
        self._class.hook_add = self._original


# -- dense image -------------------------------------------------------------------------------
def dense_ringminus(exits: int) -> tuple[float, dict]:
    with HookCounter() as hooks:
        t0 = perf_counter()
        m = Machine()
        m.write_memory(TEXT, b"\xf4" * DENSE_SIZE)
        m.boot("long", TEXT)
        t1 = perf_counter()
        controls = InterceptControls()
        controls.set(ExitCode.HLT)
        m.enter_guest(controls, on_exit="skip")
        t2 = perf_counter()
        r = m.run(max_instructions=exits)
        t3 = perf_counter()
    if r.stop.reason is not StopReason.LIMIT or r.stats["vmexits"] != exits:
        raise RuntimeError(f"dense image: {r.stop}, {r.stats['vmexits']} exits, not {exits}")
    return t3 - t0, {"load_s": t1 - t0, "enter_guest_s": t2 - t1, "run_s": t3 - t2,
                     "code_hooks": hooks[UC_HOOK_CODE], "write_hooks": hooks[UC_HOOK_MEM_WRITE],
                     "ranges": len(m.sites.ranges), "sites": len(m.sites.armed)}


def dense_bare_arming() -> tuple[float, dict]:
    uc = bare_uc(b"\xf4" * DENSE_SIZE, TEXT, 4 << 20)
    t0 = perf_counter()
    for address in range(TEXT, TEXT + DENSE_SIZE):
        uc.hook_add(UC_HOOK_CODE, lambda *_: None, begin=address, end=address)
        uc.ctl_remove_cache(address, address + 1)
    return perf_counter() - t0, {"hooks": DENSE_SIZE}


# -- stack in a .bss ---------------------------------------------------------------------------
def stack_loop(iterations: int) -> bytes:
    return assemble(f"""
        mov rsp, {STACK_TOP:#x}
        mov ebp, {iterations}
    again:
        push rbp
        call leaf
        pop rbp
        cpuid
        dec ebp
        jnz again
        hlt
    leaf:
        push rax
        push rbx
        pop rbx
        pop rax
        ret
    """, TEXT)


def elf_with_bss(text: bytes) -> bytes:
    """An x86-64 ELF: ``text`` at TEXT, then a BSS_SIZE .bss at BSS (no file bytes)."""
    header = struct.pack("<16sHHIQQQIHHHHHH", b"\x7fELF\x02\x01\x01", 2, 62, 1, TEXT, 64, 0, 0, 64, 56, 2, 0, 0, 0)
    segments = struct.pack("<IIQQQQQQ", 1, 5, 0x1000, TEXT, TEXT, len(text), len(text), 0x1000) + \
        struct.pack("<IIQQQQQQ", 1, 6, 0x1000, BSS, BSS, 0, BSS_SIZE, 0x1000)
    return (header + segments).ljust(0x1000, b"\0") + text


def bss_ringminus(iterations: int) -> tuple[float, dict]:
    with HookCounter() as hooks:
        m = Machine()
        m.load_image(parse_elf(elf_with_bss(stack_loop(iterations))))
        m.boot("long", TEXT)
        controls = InterceptControls()
        controls.set(ExitCode.CPUID)
        m.enter_guest(controls, on_exit="skip")
        t0 = perf_counter()
        r = m.run()
        elapsed = perf_counter() - t0
    if r.stop.reason is not StopReason.HLT or r.stats["vmexits"] != iterations:
        raise RuntimeError(f"stack in .bss: {r.stop}, {r.stats['vmexits']} exits, not {iterations}")
    return elapsed, {"code_hooks": hooks[UC_HOOK_CODE], "write_hooks": hooks[UC_HOOK_MEM_WRITE],
                     "blocks_searched": m.sites.translations}


def bss_bare(iterations: int, watch: bool) -> tuple[float, dict]:
    code = stack_loop(iterations)
    cpuid_at = TEXT + code.index(CPUID)
    uc = bare_uc(code, TEXT, 16 << 20, rsp=STACK_TOP)

    def skip(u: Uc, address: int, _size, _data) -> None:
        u.reg_write(UC_X86_REG_RIP, address + len(CPUID))

    uc.hook_add(UC_HOOK_CODE, skip, begin=cpuid_at, end=cpuid_at)
    writes = [0]
    if watch:
        def on_write(_u, _access, _address, _size, _value, _data) -> None:
            writes[0] += 1

        uc.hook_add(UC_HOOK_MEM_WRITE, on_write, begin=BSS, end=BSS + BSS_SIZE - 1)
    t0 = perf_counter()
    uc.emu_start(TEXT, 0)
    return perf_counter() - t0, {"write_callbacks": writes[0]}


# -- hook list ---------------------------------------------------------------------------------
def fire_cost(idle: int, fires: int) -> tuple[float, dict]:
    code = assemble(f"mov ecx, {fires}; again: nop; dec ecx; jnz again; hlt", TEXT)
    uc = bare_uc(code, TEXT, 16 << 20)
    for i in range(idle):
        uc.hook_add(UC_HOOK_CODE, lambda *_: None, begin=IDLE_HOOKS_AT + 2 * i, end=IDLE_HOOKS_AT + 2 * i)
    uc.hook_add(UC_HOOK_CODE, lambda *_: None, begin=TEXT + 5, end=TEXT + 5)      # the NOP
    t0 = perf_counter()
    uc.emu_start(TEXT, 0)
    return perf_counter() - t0, {}


def translate_cost(idle: int, blocks: int) -> tuple[float, dict]:
    block = bytes.fromhex("ffc0" "ffc3" "eb00")        # inc eax; inc ebx; jmp to the next block
    uc = bare_uc(block * blocks + b"\xf4", TEXT, 16 << 20)
    for i in range(idle):
        uc.hook_add(UC_HOOK_CODE, lambda *_: None, begin=IDLE_HOOKS_AT + 2 * i, end=IDLE_HOOKS_AT + 2 * i)
    t0 = perf_counter()
    uc.emu_start(TEXT, 0)
    return perf_counter() - t0, {}


def main(argv=None) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--exits", type=int, default=2000, help="HLT exits on the dense image (default 2,000)")
    parser.add_argument("--iterations", type=int, default=20_000,
                        help="iterations (CPUID exits) of the .bss stack loop (default 20,000)")
    add_repeat(parser)
    args = parser.parse_args(argv)
    require_positive(parser, args, "exits", "iterations", "repeat")
    if args.exits > DENSE_SIZE:
        parser.error(f"--exits must be at most {DENSE_SIZE} (one per HLT byte)")
    results: dict = {"unicorn": UNICORN_VERSION}
    banner(f"best of {args.repeat}")

    seconds, dense = best(lambda: dense_ringminus(args.exits), args.repeat)
    bare_arming, _ = best(dense_bare_arming, 1)
    results["dense"] = {**dense, "total_s": seconds, "bare_one_hook_per_byte_s": bare_arming}
    print(f"\ndense image: 64 KiB of HLT, HLT intercepted, {args.exits:,} exits skipped")
    print(f"  ringminus: load {dense['load_s'] * 1e3:.1f} ms, enter_guest {dense['enter_guest_s'] * 1e3:.1f} ms, "
          f"{args.exits:,} exits {dense['run_s'] * 1e3:.0f} ms ({args.exits / dense['run_s']:,.0f} exits/s)")
    print(f"  ringminus: {dense['code_hooks']} code hooks installed, {dense['write_hooks']} write hooks, "
          f"{dense['ranges']} ranges armed at the end")
    print(f"  bare Unicorn, one single-address hook per HLT byte ({DENSE_SIZE:,}): {bare_arming:.2f} s to install")

    seconds, bss = best(lambda: bss_ringminus(args.iterations), args.repeat)
    bare, _ = best(lambda: bss_bare(args.iterations, watch=False), args.repeat)
    watched, extra = best(lambda: bss_bare(args.iterations, watch=True), args.repeat)
    rate, bare_rate, watched_rate = (args.iterations / s for s in (seconds, bare, watched))
    results["bss_stack"] = {**bss, "exits_per_s": rate, "bare_exits_per_s": bare_rate,
                            "bare_watched_exits_per_s": watched_rate, "ratio": rate / bare_rate,
                            "watched_write_callbacks": extra["write_callbacks"]}
    print("\nstack in a 12 MiB .bss: L2 loop, a CPUID exit (skipped) and 4 stack writes per iteration")
    print(f"  ringminus:                               {rate:>10,.0f} exits/s  ({bss['code_hooks']} code hooks, "
          f"{bss['write_hooks']} write hooks, {bss['blocks_searched']} blocks searched)")
    print(f"  bare Unicorn, one hook skipping CPUID:   {bare_rate:>10,.0f} exits/s")
    print(f"  bare Unicorn, and a write hook on .bss:  {watched_rate:>10,.0f} exits/s  "
          f"({extra['write_callbacks']:,} write callbacks)")
    print(f"  ratio ringminus / bare: {rate / bare_rate:.2f}")

    fires = 100_000
    blocks = 20_000
    rows = []
    print("\nbare Unicorn hook list: K idle one-address code hooks")
    print(f"  {'K':>6} {'us per hook call':>17} {'us per block translated':>24}")
    for idle in HOOK_COUNTS:
        fire_s, _ = best(lambda: fire_cost(idle, fires), args.repeat)
        translate_s, _ = best(lambda: translate_cost(idle, blocks), args.repeat)
        rows.append({"idle_hooks": idle, "us_per_hook_call": fire_s / fires * 1e6,
                     "us_per_block_translated": translate_s / blocks * 1e6})
        print(f"  {idle:>6} {fire_s / fires * 1e6:>17.2f} {translate_s / blocks * 1e6:>24.2f}", flush=True)
    results["hook_list"] = rows

    write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
