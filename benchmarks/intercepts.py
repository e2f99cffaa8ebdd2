"""Intercept cost: what running as L2 costs when nothing exits, and how fast exits are.

1. A guest loop with no flagged instruction, every intercept set, against bare Unicorn on the
   same loop in the same process (target ratio >= 0.9).
2. A loop whose every iteration executes CPUID with the CPUID intercept set:
   a. ``on_exit="skip"``: the check finishes inside the code hook, Unicorn never stops
      (target >= 100,000 exits/s);
   b. stop and resume through the API: each exit ends ``run()``, the caller skips the
      instruction and runs again (target >= 40,000 exits/s).

Each figure is the best of ``--repeat`` runs: exit rates on a shared machine vary by 2x.

Timing is never asserted in tests.

    python benchmarks/intercepts.py [--json FILE] [--exits N] [--iterations N]
"""
import sys
from time import perf_counter

from unicorn.x86_const import UC_X86_REG_RCX

# common before ringminus: it puts the repository root on sys.path.
from common import add_repeat, assemble, bare_uc, booted_machine, fastest, make_parser, write_json
from ringminus import Machine, StopReason
from ringminus.intercepts import ExitCode, InterceptControls

BASE = 0x100000
ALU_LOOP = "mov rcx, {n}; l: add rax, rbx; xor rdx, rax; sub rsi, rdx; dec rcx; jnz l; hlt"
CPUID_LOOP = "mov rcx, {n}; l: mov eax, 0; cpuid; mov rcx, r8; dec rcx; mov r8, rcx; jnz l; hlt"


def machine_for(code: bytes, controls: InterceptControls, on_exit: str) -> Machine:
    machine = booted_machine(code, BASE)
    machine.enter_guest(controls, on_exit=on_exit)
    return machine


def quiet_loop(iterations: int, repeat: int) -> dict:
    code = assemble(ALU_LOOP.format(n=iterations), BASE)
    instructions = 5 * iterations + 2
    bare_best = guest_best = float("inf")
    for _ in range(repeat):
        uc = bare_uc(code, BASE, 2 << 20, rsp=0x80000)
        t = perf_counter()
        uc.emu_start(BASE, 0xFFFF_FFFF_FFFF_FFFF)
        bare_best = min(bare_best, perf_counter() - t)
        assert uc.reg_read(UC_X86_REG_RCX) == 0
        controls = InterceptControls()
        controls.set_all()
        controls.clear(ExitCode.HLT, ExitCode.IDLE_HLT)
        machine = machine_for(code, controls, "stop")
        t = perf_counter()
        result = machine.run()
        guest_best = min(guest_best, perf_counter() - t)
        assert result.stop.reason is StopReason.HLT and result.regs["rcx"] == 0
    bare, guest = instructions / bare_best, instructions / guest_best
    return {"instructions": instructions, "bare_insn_per_s": bare, "guest_insn_per_s": guest,
            "ratio": guest / bare}


def cpuid_exits(exits: int, on_exit: str) -> dict:
    controls = InterceptControls()
    controls.set(ExitCode.CPUID)
    machine = machine_for(assemble(CPUID_LOOP.format(n=exits), BASE), controls, on_exit)
    machine["r8"] = exits
    t = perf_counter()
    if on_exit == "skip":
        result = machine.run()
        taken = len(result.events)
    else:
        taken = 0
        while (result := machine.run()).stop.reason is StopReason.VMEXIT:
            taken += 1
            machine.skip_instruction()
    elapsed = perf_counter() - t
    assert result.stop.reason is StopReason.HLT and taken == exits, (result.stop, taken)
    return {"exits": taken, "exits_per_s": taken / elapsed, "us_per_exit": elapsed / taken * 1e6}


def main(argv=None) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--exits", type=int, default=50_000)
    parser.add_argument("--iterations", type=int, default=30_000_000)
    add_repeat(parser)
    args = parser.parse_args(argv)
    quiet = quiet_loop(args.iterations, args.repeat)
    print(f"no flagged instruction, every intercept set: bare {quiet['bare_insn_per_s'] / 1e6:.0f} M/s, "
          f"L2 {quiet['guest_insn_per_s'] / 1e6:.0f} M/s, ratio {quiet['ratio']:.3f} (target >= 0.9)")
    skip = fastest(lambda: cpuid_exits(args.exits, "skip"), args.repeat, key=lambda r: -r["exits_per_s"])
    print(f"CPUID exits, on_exit=skip: {skip['exits_per_s']:,.0f}/s ({skip['us_per_exit']:.1f} us each; target >= 100,000/s)")
    stop = fastest(lambda: cpuid_exits(args.exits, "stop"), args.repeat, key=lambda r: -r["exits_per_s"])
    print(f"CPUID exits, stop and resume: {stop['exits_per_s']:,.0f}/s ({stop['us_per_exit']:.1f} us each; target >= 40,000/s)")
    write_json(args.json, {"quiet_loop": quiet, "skip": skip, "stop_resume": stop})
    return 0


if __name__ == "__main__":
    sys.exit(main())
