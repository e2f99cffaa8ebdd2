"""``ringminus run IMAGE …`` — run a raw guest image and report how it stopped."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Callable, NamedTuple

from .emulator import BootState, ImageError, Machine, RunResult, parse_elf, parse_flat
from .emulator.boot import CPU_SIGNATURE, DEFAULT_LOAD, SYSTEM_AREA, overlaps_system_area
from .emulator.cpu import REGISTER_NAMES
from .emulator.loader import is_elf
from .emulator.result import USAGE_ERROR_STATUS
from .emulator.ucinternals import UnicornLayoutError
from .harness import VIAS, VectorError, collect, run_vector
from .hypercalls import HypercallAction, HypercallFilterError, HypercallHandlerError
from .intercepts.controls import InterceptControls
from .intercepts.exitcodes import ExitCode, parse_exit
from .intercepts.profiles import DEFAULT_PROFILE, PROFILES

SIZE_SUFFIX = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


class UsageError(Exception):
    """A bad path, number, option or image: one line on stderr, exit status 2."""


def parse_number(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (use decimal or 0x hex)") from None


def parse_irq(text: str) -> tuple[int, int]:
    """``N:VECTOR``: raise INTR VECTOR after N retired instructions."""
    index, sep, vector = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected N:VECTOR, got {text!r}")
    index, vector = parse_number(index), parse_number(vector)
    if index < 0 or not 0 <= vector <= 0xFF:
        raise argparse.ArgumentTypeError(f"expected N >= 0 and a vector 0-255, got {text!r}")
    return index, vector


def parse_size(text: str) -> int:
    suffix = text[-1:].lower()
    scale = SIZE_SUFFIX.get(suffix, 1)
    try:
        value = int(text[:-1] if suffix in SIZE_SUFFIX else text, 0) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 64M, 0x4000000, 512K)") from None
    if value <= 0 or value % 0x1000:
        raise argparse.ArgumentTypeError(f"size {text!r} must be a positive multiple of 4 KiB")
    return value


def parse_blob(text: str) -> tuple[str, int]:
    path, at, address = text.rpartition("@")
    if not at or not path:
        raise argparse.ArgumentTypeError(f"--blob takes FILE@ADDR, not {text!r}")
    return path, parse_number(address)


def parse_range(text: str) -> tuple[int, int]:
    base, colon, size = text.partition(":")
    if not colon:
        raise argparse.ArgumentTypeError(f"expected BASE:SIZE, not {text!r}")
    return parse_number(base), parse_size(size)


def parse_dump(text: str) -> tuple[int, int]:
    address, colon, length = text.partition(":")
    if not colon:
        raise argparse.ArgumentTypeError(f"--dump takes ADDR:LEN, not {text!r}")
    count = parse_number(length)
    if not 0 < count <= 1 << 20:
        raise argparse.ArgumentTypeError(f"--dump length must be 1..1M, not {length!r}")
    return parse_number(address), count


def parse_assignment(text: str) -> tuple[str, int]:
    name, eq, value = text.partition("=")
    name = name.strip().lower()
    if not eq or name not in REGISTER_NAMES:
        raise argparse.ArgumentTypeError(f"--set takes REG=VALUE with a known register, not {text!r}")
    return name, parse_number(value)


def parse_exit_names(text: str) -> list[int]:
    """``cr0_write,cpuid,excp14`` (APM or Linux names, or numbers), or ``all``."""
    if text.strip().lower() == "all":
        return ["all"]
    try:
        return [parse_exit(name) for name in text.split(",") if name.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse_vectors(text: str) -> list[int]:
    vectors = [parse_number(v) for v in text.split(",") if v.strip()]
    if any(not 0 <= v <= 31 for v in vectors):
        raise argparse.ArgumentTypeError(f"exception vectors are 0-31, not {text!r}")
    return vectors


def parse_port_ranges(text: str) -> list[tuple[int, int]]:
    ranges = []
    for item in (i.strip() for i in text.split(",") if i.strip()):
        first, dash, last = item.partition("-")
        low, high = parse_port(first), parse_port(last) if dash else None
        high = low if high is None else high
        if high < low:
            raise argparse.ArgumentTypeError(f"port range {item!r} runs backwards")
        ranges.append((low, high))
    return ranges


def parse_msr_permissions(text: str) -> list[tuple[int, bool, bool]]:
    out = []
    for item in (i.strip() for i in text.split(",") if i.strip()):
        msr, colon, access = item.partition(":")
        access = access.strip().lower()
        if not colon or access not in ("r", "w", "rw"):
            raise argparse.ArgumentTypeError(f"--msrpm takes MSR:r|w|rw, not {item!r}")
        out.append((parse_number(msr), "r" in access, "w" in access))
    return out


def parse_port(text: str) -> int:
    port = parse_number(text)
    if not 0 <= port <= 0xFFFF:
        raise argparse.ArgumentTypeError(f"port {text!r} is outside 0-0xffff")
    return port


class HypercallRule(NamedTuple):
    text: str
    base: int
    count: int
    action: HypercallAction


def parse_hypercall_rule(text: str) -> HypercallRule:
    """``BASE[-END]=handle|deny|forward``; END is included."""
    numbers, eq, action = text.rpartition("=")
    if not eq or not numbers.strip():
        raise argparse.ArgumentTypeError(f"--hypercall takes BASE[-END]=handle|deny|forward, not {text!r}")
    try:
        parsed = HypercallAction.parse(action)
    except HypercallFilterError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    first, dash, last = numbers.partition("-")
    base = parse_number(first.strip())
    end = parse_number(last.strip()) if dash else base
    if end < base:
        raise argparse.ArgumentTypeError(f"hypercall range {numbers!r} runs backwards (END < BASE)")
    return HypercallRule(text, base, end - base + 1, parsed)


def parse_handler_spec(text: str) -> tuple[str, str]:
    module, colon, function = text.rpartition(":")
    if not colon or not module or not function.isidentifier():
        raise argparse.ArgumentTypeError(f"--hypercall-handler takes MODULE:FUNCTION, not {text!r}")
    return module, function


def load_handler(module_name: str, function: str) -> Callable:
    """The function FUNCTION of MODULE: a module importable from the current directory (or
    the Python path), or a path to a .py file."""
    spec = f"{module_name}:{function}"
    from_file = module_name.endswith(".py") or os.sep in module_name
    if from_file and not Path(module_name).is_file():
        raise UsageError(f"--hypercall-handler {spec}: no such file {module_name}")
    try:
        if from_file:
            loader = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except Exception as e:                      # whatever importing the user's module raised
        raise UsageError(f"--hypercall-handler {spec}: cannot import {module_name}: "
                         f"{type(e).__name__}: {one_line(e)}") from None
    handler = getattr(module, function, None)
    if handler is None:
        raise UsageError(f"--hypercall-handler {spec}: {module_name} has no {function}")
    if not callable(handler):
        raise UsageError(f"--hypercall-handler {spec}: {function} is not callable")
    return handler


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


class Parser(argparse.ArgumentParser):
    def error(self, message: str):          # one line, status 2, no usage dump
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ringminus", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    run = commands.add_parser("run", help="run a raw guest image (flat binary, ELF, or -bios ROM)")
    run.add_argument("image", help="flat binary or ELF32/ELF64 file")
    run.add_argument("--boot", choices=[s.value for s in BootState], default="real",
                     help="initial CPU state (default real)")
    run.add_argument("--load", type=parse_number, metavar="ADDR",
                     help="load address of a flat image (default 0x7c00 real, 0x100000 protected/long)")
    run.add_argument("--mem", type=parse_size, default="64M", metavar="SIZE", help="guest RAM (default 64M)")
    run.add_argument("--cpl", type=int, choices=(0, 3), default=0, help="privilege level to enter the guest at")
    run.add_argument("--blob", type=parse_blob, action="append", default=[], metavar="FILE@ADDR",
                     help="place another file in guest RAM (repeatable)")
    run.add_argument("--set", type=parse_assignment, action="append", default=[], metavar="REG=VALUE",
                     help="set a register before the run (repeatable)")
    run.add_argument("--debugcon-port", type=parse_port, default=0xE9, metavar="PORT",
                     help="port of the debug console (default 0xe9)")
    run.add_argument("--max-insns", type=parse_number, metavar="N", help="stop after N instructions (reason limit)")
    run.add_argument("--timeout", type=float, metavar="SECONDS", help="stop after SECONDS of wall time")
    run.add_argument("--cpu", choices=sorted(CPU_SIGNATURE), default="qemu64",
                     help="CPU model: qemu64 (long mode, 64-bit SMM map) or qemu32 (32-bit map)")
    run.add_argument("--chipset", choices=("q35", "pc"), default="q35",
                     help="host bridge, SMRAM register and SMI enables as QEMU's machine (default q35)")
    run.add_argument("--smram", type=parse_range, action="append", default=[], metavar="BASE:SIZE",
                     help="a further private SMRAM range (the A-segment is always one)")
    run.add_argument("--smram-state", choices=("open", "closed", "locked"),
                     help="set the SMRAM control as firmware would (default: as at reset)")
    run.add_argument("--smram-load", type=parse_blob, action="append", default=[], metavar="FILE@ADDR",
                     help="place a file straight into SMRAM (the address must lie in an SMRAM range)")
    run.add_argument("--smbase", type=parse_number, metavar="ADDR", help="initial SMBASE (default 0x30000)")
    run.add_argument("--smi-at", type=parse_number, action="append", default=[], metavar="N",
                     help="raise an SMI after exactly N retired instructions (repeatable)")
    run.add_argument("--nmi-at", type=parse_number, action="append", default=[], metavar="N",
                     help="raise an NMI after exactly N retired instructions (repeatable)")
    run.add_argument("--irq-at", type=parse_irq, action="append", default=[], metavar="N:VECTOR",
                     help="raise an external interrupt (INTR) with VECTOR after exactly N retired "
                          "instructions; held while RFLAGS.IF = 0 or GIF = 0 (repeatable)")
    run.add_argument("--apm-smi", action="store_true",
                     help="writes to APM_CNT (port 0xb2) always raise an SMI, whatever the chipset enables")
    run.add_argument("--dump", type=parse_dump, action="append", default=[], metavar="ADDR:LEN",
                     help="add memory contents (hex) to --json, read through the CPU's view at the end")
    run.add_argument("--guest", action="store_true",
                     help="run the image as an L2 guest; the intercept options say what L1 intercepts")
    run.add_argument("--intercept", type=parse_exit_names, action="append", default=[], metavar="NAME[,NAME…]",
                     help="intercepts by exit name (cr0_write, cpuid, ioio, msr, excp14 …) or 'all'")
    run.add_argument("--intercept-exception", type=parse_vectors, action="append", default=[],
                     metavar="VEC[,VEC…]", help="exception vectors to intercept")
    run.add_argument("--iopm", type=parse_port_ranges, action="append", default=[], metavar="PORT[-PORT][,…]",
                     help="ports whose IOPM bits are set (implies the ioio intercept)")
    run.add_argument("--msrpm", type=parse_msr_permissions, action="append", default=[], metavar="MSR:r|w|rw[,…]",
                     help="MSRPM bits to set (implies the msr intercept)")
    run.add_argument("--profile", choices=sorted(PROFILES), default=DEFAULT_PROFILE,
                     help="whose behaviour where KVM, the APM and QEMU disagree (default kvm)")
    run.add_argument("--on-exit", choices=("stop", "skip"), default="stop",
                     help="at an intercept: stop the run (default), or skip the instruction and go on")
    run.add_argument("--hypercall", type=parse_hypercall_rule, action="append", default=[],
                     metavar="BASE[-END]=handle|deny|forward",
                     help="what happens to VMMCALL/VMCALL numbers BASE..END outside guest mode (repeatable)")
    run.add_argument("--hypercall-handler", type=parse_handler_spec, metavar="MODULE:FUNCTION",
                     help="Python function that answers forwarded hypercalls (without one they stop the run)")
    run.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")
    harness = commands.add_parser("harness", help="run nested-intercept vector files")
    harness.add_argument("paths", nargs="+", metavar="FILE_OR_DIR", help="vector files, or directories of *.toml")
    harness.add_argument("--profile", choices=sorted(PROFILES),
                         help="run every vector under this profile instead of the file's")
    harness.add_argument("--json", action="store_true", help="print the results as one JSON object")
    harness.add_argument("--via", choices=VIAS, default="host",
                         help="who plays L1: ringminus from Python (host, the default), a generated "
                              "in-guest hypervisor that VMRUNs each vector (guest), or both, failing "
                              "every vector where the two disagree")
    run.add_argument("--trace", action="store_true", help="print every executed instruction to stderr")
    return parser


def read_file(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None


def prepare(args: argparse.Namespace) -> Machine:
    state = BootState(args.boot)
    intercepting = args.intercept or args.intercept_exception or args.iopm or args.msrpm
    if intercepting and not args.guest:
        raise UsageError("--intercept, --intercept-exception, --iopm and --msrpm need --guest")
    data = read_file(args.image)
    if args.max_insns is not None and args.max_insns < 0:
        raise UsageError("--max-insns must not be negative")
    if args.timeout is not None and args.timeout <= 0:
        raise UsageError("--timeout must be positive")
    try:
        machine = Machine(memory_size=args.mem, debugcon_port=args.debugcon_port, cpu_model=args.cpu,
                          chipset=args.chipset, profile=args.profile, apm_smi=args.apm_smi)
        if state is BootState.LONG and not machine.long_mode_capable:
            raise UsageError(f"--cpu {args.cpu} has no long mode")
        for base, size in args.smram:
            machine.smram.add_range(base, size)
        if args.smram_state:
            machine.smram.set_state(args.smram_state)
        for path, address in args.smram_load:
            machine.load_smram(address, read_file(path))
        if args.smbase is not None:
            machine.set_smbase(args.smbase)
        for index in args.smi_at:
            machine.at_instruction(index, Machine.raise_smi)
        for index in args.nmi_at:
            machine.at_instruction(index, Machine.raise_nmi)
        for index, vector in args.irq_at:
            machine.at_instruction(index, lambda m, vector=vector: m.raise_intr(vector))
        entry = 0
        if state is BootState.BIOS:
            if args.load is not None or is_elf(data):
                raise UsageError("--boot bios takes a raw ROM image and no --load")
            machine.load_bios(data)
        else:
            image = parse_elf(data) if is_elf(data) else parse_flat(data, DEFAULT_LOAD[state] if args.load is None else args.load)
            clash = [s for s in image.segments if overlaps_system_area(s.address, s.address + s.memory_size)]
            if state is not BootState.REAL and clash:
                raise UsageError(f"image at {clash[0].address:#x} overlaps the machine's system tables "
                                 f"({SYSTEM_AREA.start:#x}-{SYSTEM_AREA.stop - 1:#x})")
            entry = machine.load_image(image)
        for path, address in args.blob:
            machine.write_memory(address, read_file(path))
        machine.boot(state, entry, args.cpl)
        for name, value in args.set:
            machine[name] = value
        if args.guest:
            machine.enter_guest(intercept_controls(args), args.profile, args.on_exit)
        for rule in args.hypercall:
            try:
                machine.hypercalls.add(rule.base, rule.count, rule.action)
            except HypercallFilterError as e:
                raise UsageError(f"--hypercall {rule.text}: {e} ({e.errno_name})") from None
    except (ImageError, ValueError) as e:
        raise UsageError(str(e)) from None
    if args.hypercall_handler:
        machine.hypercalls.handler = load_handler(*args.hypercall_handler)
    return machine


def intercept_controls(args: argparse.Namespace) -> InterceptControls:
    controls = InterceptControls()
    for names in args.intercept:
        for name in names:
            if name == "all":
                controls.set_all()
            else:
                controls.set(name)
    for vectors in args.intercept_exception:
        controls.intercept_exception(*vectors)
    for ranges in args.iopm:
        controls.set(ExitCode.IOIO)
        for low, high in ranges:
            controls.set_ports(low, high)
    for permissions in args.msrpm:
        controls.set(ExitCode.MSR)
        for msr, read, write in permissions:
            controls.set_msr(msr, read, write)
    return controls


def summary(result: RunResult) -> str:
    stop = result.stop
    regs = result.regs
    lines = []
    if result.console:
        lines.append(result.console.rstrip("\n"))
        lines.append("")
    reason = stop.reason.value + (f" {stop.value:#x}" if stop.value is not None else "")
    detail = f" ({stop.detail})" if stop.detail else ""
    count = "" if result.instructions is None else f" after {result.instructions} instructions"
    lines.append(f"stop: {reason} at rip {stop.rip:#x}{count}{detail}")
    if result.vmexit:
        v = result.vmexit
        lines.append(f"vmexit: {v['name']} ({v['code']:#x}) info1={v['info1']:#x} info2={v['info2']:#x} "
                     f"next_rip={v['next_rip']:#x} stage={v['stage']} exit_int_info={v['exit_int_info']:#x}")
    if result.hypercall:
        h = result.hypercall
        lines.append(f"hypercall: nr={h['nr']:#x} args=[{', '.join(f'{a:#x}' for a in h['args'])}] "
                     f"conduit={h['conduit']} long_mode={h['long_mode']} cpl={h['cpl']}")
    if result.events:
        kinds = Counter(e["kind"] for e in result.events)
        lines.append("events: " + ", ".join(f"{count} {kind}" for kind, count in kinds.items()))
    names = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp")
    lines.append("  ".join(f"{n}={regs[n]:#018x}" for n in names[:4]))
    lines.append("  ".join(f"{n}={regs[n]:#018x}" for n in names[4:]))
    lines.append(f"rip={regs['rip']:#018x}  rflags={regs['rflags']:#x}  cpl={regs['cpl']}  "
                 f"cr0={regs['cr0']:#x}  cr3={regs['cr3']:#x}  cr4={regs['cr4']:#x}  efer={regs['efer']:#x}")
    lines.append("  ".join(f"{n}={regs[n]['selector']:04x}[{regs[n]['base']:#x} {regs[n]['attributes']:#06x}]"
                           for n in ("cs", "ss", "ds", "es")))
    return "\n".join(lines)


def cmd_run(args: argparse.Namespace) -> int:
    machine = prepare(args)
    try:
        result = machine.run(max_instructions=args.max_insns, timeout=args.timeout,
                             trace=sys.stderr if args.trace else None)
    except HypercallHandlerError as e:
        raise UsageError(one_line(e)) from None
    if args.json:
        document = result.as_dict()
        if args.dump:
            document["dump"] = [{"address": address, "hex": machine.read_view(address, length).hex()}
                                for address, length in args.dump]
        print(json.dumps(document))
    else:
        print(summary(result))
    return result.stop.exit_status


def cmd_harness(args: argparse.Namespace) -> int:
    try:
        vectors = collect(args.paths)
        results = [run_vector(v, args.profile, args.via) for v in vectors]
    except VectorError as e:
        raise UsageError(str(e)) from None
    passed = sum(r.status == "PASS" for r in results)
    failed = sum(r.status == "FAIL" for r in results)
    skipped = sum(r.status == "SKIP" for r in results)
    summary_line = f"{passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else "")
    if args.json:
        print(json.dumps({"via": args.via, "results": [r.as_dict() for r in results], "passed": passed,
                          "failed": failed, "skipped": skipped}))
    else:
        for r in results:
            print(r.line())
        print(summary_line)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return cmd_harness(args) if args.command == "harness" else cmd_run(args)
    except UsageError as e:
        print(f"ringminus: {e}", file=sys.stderr)
        return USAGE_ERROR_STATUS
    except UnicornLayoutError as e:
        print(f"ringminus: {e}", file=sys.stderr)
        return USAGE_ERROR_STATUS
    except BrokenPipeError:
        # The reader went away (``| head``): end quietly, with the status a shell gives a
        # process SIGPIPE ends, and keep the interpreter from failing to flush stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
