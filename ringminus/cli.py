"""``ringminus run IMAGE …`` — run a raw guest image and report how it stopped."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .emulator import BootState, ImageError, Machine, RunResult, StopReason, parse_elf, parse_flat
from .emulator.boot import DEFAULT_LOAD, SYSTEM_AREA, overlaps_system_area
from .emulator.cpu import REGISTER_NAMES
from .emulator.loader import is_elf
from .emulator.result import USAGE_ERROR_STATUS
from .emulator.ucinternals import UnicornLayoutError

SIZE_SUFFIX = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


class UsageError(Exception):
    """A bad path, number, option or image: one line on stderr, exit status 2."""


def parse_number(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (use decimal or 0x hex)") from None


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


def parse_assignment(text: str) -> tuple[str, int]:
    name, eq, value = text.partition("=")
    name = name.strip().lower()
    if not eq or name not in REGISTER_NAMES:
        raise argparse.ArgumentTypeError(f"--set takes REG=VALUE with a known register, not {text!r}")
    return name, parse_number(value)


def parse_port(text: str) -> int:
    port = parse_number(text)
    if not 0 <= port <= 0xFFFF:
        raise argparse.ArgumentTypeError(f"port {text!r} is outside 0-0xffff")
    return port


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
    run.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")
    run.add_argument("--trace", action="store_true", help="print every executed instruction to stderr")
    return parser


def read_file(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None


def prepare(args: argparse.Namespace) -> Machine:
    state = BootState(args.boot)
    data = read_file(args.image)
    if args.max_insns is not None and args.max_insns < 0:
        raise UsageError("--max-insns must not be negative")
    if args.timeout is not None and args.timeout <= 0:
        raise UsageError("--timeout must be positive")
    machine = Machine(memory_size=args.mem, debugcon_port=args.debugcon_port)
    try:
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
    except (ImageError, ValueError) as e:
        raise UsageError(str(e)) from None
    return machine


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
    result = machine.run(max_instructions=args.max_insns, timeout=args.timeout,
                         trace=sys.stderr if args.trace else None)
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        print(summary(result))
    return result.stop.exit_status


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return cmd_run(args)
    except UsageError as e:
        print(f"ringminus: {e}", file=sys.stderr)
        return USAGE_ERROR_STATUS
    except UnicornLayoutError as e:
        print(f"ringminus: {e}", file=sys.stderr)
        return USAGE_ERROR_STATUS


if __name__ == "__main__":
    sys.exit(main())
