"""``ringminus run IMAGE …`` — run a raw guest image and report how it stopped."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import signal
import sys
import threading
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, NamedTuple

from .emulator import BootState, ImageError, RunResult, parse_elf, parse_flat
from .machine import Machine
from .emulator.boot import DEFAULT_LOAD, SYSTEM_AREA, overlaps_system_area
from .emulator.cpu import REGISTER_NAMES
from .arch.models import MODELS
from .arch.registers import CONTROL, GPRS, LEGACY_GPRS, SEGMENT_REGISTERS
from .emulator.loader import is_elf
from .emulator.result import EXIT_STATUS, USAGE_ERROR_STATUS, StopReason
from .emulator.ucinternals import UnicornLayoutError
from .hypercalls import HypercallAction, HypercallFilterError, HypercallHandlerError
from .intercepts.controls import LAST_INTERCEPT_BIT, InterceptControls, msrpm_bit
from .arch.exitcodes import parse_exit
from .intercepts.profiles import DEFAULT_PROFILE, PROFILES
from .harness import VIAS
from .platform import MACHINES
from .platform import multiboot
from .platform.tables import recorded_sizes
from .sigint import calling_on_sigint

SIZE_SUFFIX = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
ADDRESS_LIMIT = 1 << 64
# ``--set``: how many bits each register name holds (narrow names are part of a wider one).
# A value that does not fit is an error, never truncated.
REGISTER_BITS = {
    **dict.fromkeys((*GPRS, "rip", "rflags", *CONTROL, "cr8", "dr0", "dr1", "dr2", "dr3", "dr6", "dr7",
                     "fs_base", "gs_base", "efer"), 64),
    **dict.fromkeys(("eip", "eflags", "eax", "ebx", "ecx", "edx", "esi", "edi", "ebp", "esp",
                     *(f"r{n}d" for n in range(8, 16))), 32),
    **dict.fromkeys(("ip", "ax", "bx", "cx", "dx", "si", "di", "bp", "sp", *SEGMENT_REGISTERS,
                     *(f"r{n}w" for n in range(8, 16))), 16),
    **dict.fromkeys(("al", "bl", "cl", "dl", "ah", "bh", "ch", "dh", *(f"r{n}b" for n in range(8, 16))), 8),
}
assert REGISTER_BITS.keys() == REGISTER_NAMES, "a register --set accepts has no width here"


class UsageError(Exception):
    """A bad path, number, option or image: one line on stderr, exit status 2."""


def parse_number(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (use decimal or 0x hex)") from None
    # Nothing a user gives ringminus is wider than 64 bits; a number too wide to print in
    # decimal (Python's 4300-digit limit) would break the message that says it is too large.
    if abs(value).bit_length() > 128:
        raise argparse.ArgumentTypeError(f"{text[:40]!r}… is far too large a number")
    return value


def parse_bounded(text: str, low: int, high: int, what: str) -> int:
    """A number in low..high; out of range says so in words."""
    value = parse_number(text)
    if value < low:
        problem = "is negative" if value < 0 else f"is below {low:#x}"
        raise argparse.ArgumentTypeError(f"{text!r} {problem}; {what} is {low:#x}..{high:#x}")
    if value > high:
        raise argparse.ArgumentTypeError(f"{text!r} is too large; {what} is {low:#x}..{high:#x}")
    return value


def parse_address(text: str) -> int:
    return parse_bounded(text, 0, ADDRESS_LIMIT - 1, "an address")


def parse_count(text: str) -> int:
    """A number of instructions: 0 or more (Unicorn counts in 64 bits)."""
    return parse_bounded(text, 0, (1 << 63) - 1, "a count")


def parse_timeout(text: str) -> float:
    """Seconds of wall time: finite, positive, and no longer than a thread can wait."""
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive, finite number of seconds, not {text!r}")
    if seconds > threading.TIMEOUT_MAX:
        raise argparse.ArgumentTypeError(f"{text!r} is too long; at most {threading.TIMEOUT_MAX:.0f} seconds")
    return seconds


def parse_irq(text: str) -> tuple[int, int]:
    """``N:VECTOR``: raise INTR VECTOR after N retired instructions."""
    index, sep, vector = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected N:VECTOR, got {text!r}")
    return parse_count(index), parse_bounded(vector, 0, 0xFF, "a vector")


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


def host_memory() -> int:
    """Bytes of physical memory the host has (0 when it does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return 0


def parse_memory_size(text: str) -> int:
    """Guest RAM: a size the host can back.  RAM is allocated untouched, so the rule is the
    host's physical memory, not what is free at the moment (prepare() still turns a failed
    allocation into a usage error)."""
    value = parse_size(text)
    limit = host_memory()
    if limit and value > limit:
        raise argparse.ArgumentTypeError(f"{text!r} is more than this host's {limit >> 20} MiB of memory")
    return value


def parse_blob(text: str) -> tuple[str, int]:
    path, at, address = text.rpartition("@")
    if not at or not path:
        raise argparse.ArgumentTypeError(f"--blob takes FILE@ADDR, not {text!r}")
    return path, parse_address(address)


def parse_range(text: str) -> tuple[int, int]:
    base, colon, size = text.partition(":")
    if not colon:
        raise argparse.ArgumentTypeError(f"expected BASE:SIZE, not {text!r}")
    return parse_address(base), parse_size(size)


def parse_dump(text: str) -> tuple[int, int]:
    address, colon, length = text.partition(":")
    if not colon:
        raise argparse.ArgumentTypeError(f"--dump takes ADDR:LEN, not {text!r}")
    count = parse_number(length)
    if not 0 < count <= 1 << 20:
        raise argparse.ArgumentTypeError(f"--dump length must be 1..1M, not {length!r}")
    start = parse_address(address)
    if start + count > ADDRESS_LIMIT:
        raise argparse.ArgumentTypeError(f"--dump {text!r} runs past the end of the address space")
    return start, count


def parse_assignment(text: str) -> tuple[str, int]:
    name, eq, value = text.partition("=")
    name = name.strip().lower()
    if not eq or name not in REGISTER_NAMES:
        raise argparse.ArgumentTypeError(f"--set takes REG=VALUE with a known register, not {text!r}")
    bits, number = REGISTER_BITS[name], parse_number(value)
    if not 0 <= number < 1 << bits:
        problem = "is negative" if number < 0 else f"is not {bits} bits wide"
        raise argparse.ArgumentTypeError(f"{text}: {value.strip()} {problem}; {name} holds 0..{(1 << bits) - 1:#x}")
    return name, number


def parse_exit_names(text: str) -> list[int]:
    """``cr0_write,cpuid,excp14`` (APM or Linux names, or numbers), or ``all``."""
    if text.strip().lower() == "all":
        return ["all"]
    try:
        codes = [parse_exit(name) for name in text.split(",") if name.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    for code in codes:
        if not 0 <= code <= LAST_INTERCEPT_BIT:
            raise argparse.ArgumentTypeError(f"exit {code.name.lower()} ({int(code):#x}) has no intercept bit "
                                             f"(bit number = exit code, 0x0-{LAST_INTERCEPT_BIT:#x})")
    if not codes:
        raise argparse.ArgumentTypeError(f"no exit names in {text!r}")
    return codes


def parse_vectors(text: str) -> list[int]:
    vectors = [parse_number(v) for v in text.split(",") if v.strip()]
    if not vectors or any(not 0 <= v <= 31 for v in vectors):
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
        number = parse_bounded(msr, 0, 0xFFFF_FFFF, "an MSR number")
        if msrpm_bit(number, False) is None:
            raise argparse.ArgumentTypeError(f"MSR {number:#x} is outside the MSRPM ranges (0-0x1fff, "
                                             "0xc0000000-0xc0001fff, 0xc0010000-0xc0011fff): always intercepted")
        out.append((number, "r" in access, "w" in access))
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
    """The message on one printable line (a path or name may hold a newline or a NUL)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in " ".join(str(error).split()))


class Parser(argparse.ArgumentParser):
    def error(self, message: str):          # one line, status 2, no usage dump
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="ringminus", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    run = commands.add_parser("run", help="run a raw guest image (flat binary, ELF, or -bios ROM)")
    run.add_argument("image", nargs="?",
                     help=f"flat binary or ELF32/ELF64 file; with --boot bios the ROM (with --kernel: default {SEABIOS})")
    run.add_argument("--boot", choices=[s.value for s in BootState],
                     help="initial CPU state (default real; bios with --kernel)")
    run.add_argument("--kernel", metavar="FILE",
                     help="a multiboot v1 kernel booted as QEMU's -kernel does: SeaBIOS runs QEMU's "
                          f"multiboot_dma.bin option ROM ({MULTIBOOT_ROM}), which enters it")
    run.add_argument("--append", default="", metavar="ARGS", help="the kernel's command line (with --kernel)")
    run.add_argument("--initrd", metavar="FILE[,FILE...]",
                     help="multiboot modules, comma-separated; text after a space in one is its string")
    run.add_argument("--load", type=parse_address, metavar="ADDR",
                     help="load address of a flat image (default 0x7c00 real, 0x100000 protected/long)")
    run.add_argument("--mem", type=parse_memory_size, default="64M", metavar="SIZE", help="guest RAM (default 64M)")
    run.add_argument("--cpl", type=int, choices=(0, 3), default=0, help="privilege level to enter the guest at")
    run.add_argument("--blob", type=parse_blob, action="append", default=[], metavar="FILE@ADDR",
                     help="place another file in guest RAM (repeatable)")
    run.add_argument("--set", type=parse_assignment, action="append", default=[], metavar="REG=VALUE",
                     help="set a register before the run (repeatable)")
    run.add_argument("--debugcon-port", type=parse_port, default=0xE9, metavar="PORT",
                     help="port of the debug console (default 0xe9)")
    run.add_argument("--max-insns", type=parse_count, metavar="N", help="stop after N instructions (reason limit)")
    run.add_argument("--timeout", type=parse_timeout, metavar="SECONDS", help="stop after SECONDS of wall time")
    run.add_argument("--until-console", metavar="TEXT",
                     help="stop (reason output) once TEXT appears on the debug console or a board's serial port")
    run.add_argument("--clock", choices=("virtual", "host"), default="virtual",
                     help="time for devices and RDTSC: virtual (1 ns per instruction retired, "
                          "deterministic; the default) or host (the host's monotonic clock)")
    run.add_argument("--log-interrupts", action="store_true",
                     help="list each interrupt a device raises in events (default: count them, stats.device_interrupts)")
    run.add_argument("--cpu", choices=sorted(MODELS), default="qemu64",
                     help="CPU model: qemu64 (long mode, 64-bit SMM map), qemu32 (32-bit map) or max "
                          "(qemu64 with every feature ringminus models)")
    run.add_argument("--machine", choices=MACHINES,
                     help="none: the bare machine (default, with q35's SMRAM register and SMI enables); "
                          "pc or q35: QEMU's board (default for --boot bios: q35)")
    run.add_argument("--chipset", choices=("q35", "pc"), help="the same as --machine (kept for scripts)")
    run.add_argument("--option-rom", metavar="FILE",
                     help=f"the option ROM a pc/q35 machine hands SeaBIOS as QEMU does (default {KVMVAPIC})")
    run.add_argument("--smram", type=parse_range, action="append", default=[], metavar="BASE:SIZE",
                     help="a further private SMRAM range (the A-segment is always one)")
    run.add_argument("--smram-state", choices=("open", "closed", "locked"),
                     help="set the SMRAM control as firmware would (default: as at reset)")
    run.add_argument("--smram-load", type=parse_blob, action="append", default=[], metavar="FILE@ADDR",
                     help="place a file straight into SMRAM (the address must lie in an SMRAM range)")
    run.add_argument("--smbase", type=parse_address, metavar="ADDR", help="initial SMBASE (default 0x30000)")
    run.add_argument("--smi-at", type=parse_count, action="append", default=[], metavar="N",
                     help="raise an SMI after exactly N retired instructions (repeatable)")
    run.add_argument("--nmi-at", type=parse_count, action="append", default=[], metavar="N",
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
    # Listed for --help only: the entry point (entry.py) hands ``fuzz …`` to the fuzz runner.
    commands.add_parser("fuzz", add_help=False,
                        help="run the self-fuzzing campaigns: fuzz CAMPAIGN|all [--seed S] [--runs N] "
                             "[--seconds T] [--replay S] (see ringminus fuzz --help)")
    return parser


def read_file(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except (OSError, ValueError) as e:          # ValueError: a NUL in the path
        raise UsageError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None


@contextmanager
def blaming(option: str):
    """A ValueError (or ImageError) from the machine while it takes ``option`` is a usage
    error that names the option; so is running the host out of memory (a huge ELF .bss)."""
    try:
        yield
    except (ImageError, ValueError) as e:
        raise UsageError(f"{option}: {one_line(e)}") from None
    except MemoryError:
        raise UsageError(f"{option}: the host ran out of memory") from None


# The highest entry point each boot state can start at (boot.py's frames and CS:IP).
ENTRY_LIMIT = {BootState.REAL: 0xF_FFFF, BootState.PROTECTED: 0xFFFF_FFFF, BootState.LONG: (1 << 64) - 1}


def load_plan(args: argparse.Namespace, state: BootState, data: bytes):
    """The image as it will be placed (None for a -bios ROM), checked before any machine exists."""
    if not data:
        raise UsageError(f"{args.image}: the image is empty")
    if state is BootState.BIOS:
        if args.load is not None or is_elf(data):
            raise UsageError("--boot bios takes a raw ROM image and no --load")
        return None
    if is_elf(data):
        if args.load is not None:
            raise UsageError(f"--load applies to flat images; {args.image} is an ELF file, "
                             "loaded where its program headers say")
        with blaming(args.image):
            image = parse_elf(data)
    else:
        image = parse_flat(data, DEFAULT_LOAD[state] if args.load is None else args.load)
    if state is not BootState.REAL:
        clash = [s for s in image.segments if overlaps_system_area(s.address, s.address + s.memory_size)]
        if clash:
            raise UsageError(f"image at {clash[0].address:#x} overlaps the machine's system tables "
                             f"({SYSTEM_AREA.start:#x}-{SYSTEM_AREA.stop - 1:#x})")
    return image


KVMVAPIC = "/usr/share/qemu/kvmvapic.bin"      # Debian's qemu-system-data
MULTIBOOT_ROM = "/usr/share/qemu/multiboot_dma.bin"
SEABIOS = "/usr/share/seabios/bios-256k.bin"   # Debian's seabios: QEMU's default -bios


def resolve_boot(args: argparse.Namespace) -> None:
    """Settle --boot (given, or bios with --kernel, which needs it, else real) and the image
    (with --kernel the BIOS: Debian's SeaBIOS unless named), once, before anything reads them."""
    if args.kernel is None:
        if args.append or args.initrd:
            raise UsageError("--append and --initrd need --kernel")
        if args.image is None:
            raise UsageError("an image to run is required")
        args.boot = args.boot or BootState.REAL.value
        return
    if args.boot not in (None, BootState.BIOS.value):
        raise UsageError(f"--kernel boots through the BIOS: it cannot be combined with --boot {args.boot}")
    args.boot = BootState.BIOS.value
    if args.image is None:
        args.image = SEABIOS


def multiboot_plan(args: argparse.Namespace):
    """--kernel's multiboot buffers and QEMU's option ROM, read and checked before any machine."""
    if args.kernel is None:
        return None
    modules = []
    for element in (args.initrd.split(",") if args.initrd else []):
        modules.append((element, read_file(element.split(" ", 1)[0])))
    with blaming(f"--kernel {args.kernel}"):
        loaded = multiboot.load(read_file(args.kernel), args.kernel, args.append, modules)
    if not os.path.exists(MULTIBOOT_ROM):
        raise UsageError(f"--kernel needs QEMU's option ROM {MULTIBOOT_ROM} (Debian's qemu-system-data)")
    return loaded, read_file(MULTIBOOT_ROM)


def add_option_rom(machine: Machine, path: str | None) -> None:
    """QEMU gives SeaBIOS its kvmvapic.bin option ROM (fw_cfg genroms/): so does a board."""
    if machine.board is None:
        if path is not None:
            raise UsageError("--option-rom needs --machine pc or q35")
        return
    if path is None and not os.path.exists(KVMVAPIC):
        print(f"ringminus: no {KVMVAPIC} (Debian's qemu-system-data): the machine has no option ROM, "
              "unlike QEMU's", file=sys.stderr)
        return
    machine.board.add_option_rom("kvmvapic.bin", read_file(path or KVMVAPIC))


def note_unrecorded_tables(machine: Machine) -> None:
    """A board serves QEMU's own ACPI and SMBIOS tables for the RAM sizes they were recorded
    for (platform/tables.py); for another size the firmware builds its own."""
    board = machine.board
    if board is not None and board.acpi is None:
        sizes = ", ".join(f"{size}M" for size in recorded_sizes(board.kind))
        print(f"ringminus: no ACPI/SMBIOS tables recorded from QEMU for {machine.memory.ram_size >> 20} MiB on "
              f"{board.kind} (recorded: {sizes}): the firmware builds its own, unlike on QEMU", file=sys.stderr)


def machine_kind(args: argparse.Namespace) -> str:
    """--machine, or --chipset (its alias), or the default for the boot state."""
    if args.machine and args.chipset and args.machine != args.chipset:
        raise UsageError(f"--chipset {args.chipset} contradicts --machine {args.machine} (--chipset is its alias)")
    return args.machine or args.chipset or ("q35" if args.boot == BootState.BIOS.value else "none")


def new_machine(args: argparse.Namespace) -> Machine:
    try:
        return Machine(memory_size=args.mem, debugcon_port=args.debugcon_port, cpu_model=args.cpu,
                       profile=args.profile, apm_smi=args.apm_smi, machine=machine_kind(args),
                       clock=args.clock)
    except MemoryError:
        raise UsageError(f"--mem: this host cannot give the guest {args.mem >> 20} MiB of RAM now") from None
    except ValueError as e:             # the options' values are checked: a port two devices claim
        raise UsageError(f"--debugcon-port {args.debugcon_port:#x}, --machine {machine_kind(args)}, "
                         f"--mem {args.mem >> 20}M: {one_line(e)}") from None


def prepare(args: argparse.Namespace) -> Machine:
    resolve_boot(args)
    state = BootState(args.boot)
    kernel = multiboot_plan(args)
    intercepting = args.intercept or args.intercept_exception or args.iopm or args.msrpm
    if intercepting and not args.guest:
        raise UsageError("--intercept, --intercept-exception, --iopm and --msrpm need --guest")
    image = load_plan(args, state, data := read_file(args.image))
    blobs = [(f"--blob {path}@{address:#x}", address, read_file(path)) for path, address in args.blob]
    for option, address, blob in blobs:
        if state not in (BootState.REAL, BootState.BIOS) and overlaps_system_area(address, address + len(blob)):
            raise UsageError(f"{option} overlaps the machine's system tables "
                             f"({SYSTEM_AREA.start:#x}-{SYSTEM_AREA.stop - 1:#x}), which the boot writes")
    smram_loads = [(f"--smram-load {path}@{address:#x}", address, read_file(path)) for path, address in args.smram_load]
    machine = new_machine(args)
    add_option_rom(machine, args.option_rom)
    if kernel is not None:
        if machine.board is None:
            raise UsageError("--kernel needs --machine pc or q35")
        loaded, rom = kernel
        loaded.install(machine.board.fw_cfg, rom)
    if machine.board is not None and not args.json:              # the serial console, live
        machine.board.uart.on_output = lambda data: (sys.stdout.write(data.decode("latin-1")), sys.stdout.flush(),
                                                     machine.output_written())
    machine.stop_on_output(args.until_console.encode("latin-1") if args.until_console else None)
    machine.log_device_interrupts = args.log_interrupts
    if state is BootState.LONG and not machine.long_mode_capable:
        raise UsageError(f"--cpu {args.cpu} has no long mode")
    for base, size in args.smram:
        with blaming(f"--smram {base:#x}:{size:#x}"):
            machine.smram.add_range(base, size)
    if args.smram_state:
        with blaming(f"--smram-state {args.smram_state}"):
            machine.smram.set_state(args.smram_state)
    for option, address, blob in smram_loads:
        with blaming(option):
            machine.load_smram(address, blob)
    if args.smbase is not None:
        with blaming(f"--smbase {args.smbase:#x}"):
            machine.set_smbase(args.smbase)
    for index in args.smi_at:
        machine.at_instruction(index, Machine.raise_smi)
    for index in args.nmi_at:
        machine.at_instruction(index, Machine.raise_nmi)
    for index, vector in args.irq_at:
        machine.at_instruction(index, lambda m, vector=vector: m.raise_intr(vector))
    entry = 0
    with blaming(args.image):
        if image is None:
            machine.load_bios(data)
        else:
            entry = machine.load_image(image)
    if image is not None and entry > ENTRY_LIMIT[state]:
        raise UsageError(f"{args.image}: entry point {entry:#x} is out of reach of --boot {state.value}")
    for option, address, blob in blobs:
        with blaming(option):
            machine.write_memory(address, blob)
    with blaming(f"--boot {state.value} --cpl {args.cpl}"):
        machine.boot(state, entry, args.cpl)
    for name, value in args.set:
        with blaming(f"--set {name}={value:#x}"):
            machine[name] = value
    if args.guest:
        with blaming("--guest"):
            machine.enter_guest(intercept_controls(args), args.profile, args.on_exit)
    for rule in args.hypercall:
        try:
            machine.hypercalls.add(rule.base, rule.count, rule.action)
        except HypercallFilterError as e:
            raise UsageError(f"--hypercall {rule.text}: {e} ({e.errno_name})") from None
    if args.hypercall_handler:
        machine.hypercalls.handler = load_handler(*args.hypercall_handler)
    return machine


def intercept_controls(args: argparse.Namespace) -> InterceptControls:
    return InterceptControls.of([name for names in args.intercept for name in names],
                                [vector for vectors in args.intercept_exception for vector in vectors],
                                [span for ranges in args.iopm for span in ranges],
                                [permission for permissions in args.msrpm for permission in permissions])


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
    lines.append("  ".join(f"{n}={regs[n]:#018x}" for n in LEGACY_GPRS[:4]))
    lines.append("  ".join(f"{n}={regs[n]:#018x}" for n in LEGACY_GPRS[4:]))
    lines.append(f"rip={regs['rip']:#018x}  rflags={regs['rflags']:#x}  cpl={regs['cpl']}  "
                 f"cr0={regs['cr0']:#x}  cr3={regs['cr3']:#x}  cr4={regs['cr4']:#x}  efer={regs['efer']:#x}")
    lines.append("  ".join(f"{n}={regs[n]['selector']:04x}[{regs[n]['base']:#x} {regs[n]['attributes']:#06x}]"
                           for n in ("cs", "ss", "ds", "es")))
    return "\n".join(lines)


def cmd_run(args: argparse.Namespace) -> int:
    machine = prepare(args)
    try:
        with calling_on_sigint(machine.interrupt):       # Ctrl-C: stop reason "interrupted"
            result = machine.run(max_instructions=args.max_insns, timeout=args.timeout,
                                 trace=sys.stderr if args.trace else None)
    except HypercallHandlerError as e:
        raise UsageError(one_line(e)) from None
    if args.boot == BootState.BIOS.value:         # after the run: a usage error stays one line
        note_unrecorded_tables(machine)
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
    from .harness import VectorError, collect, run_vector     # (imported here: start-up time of the rest)
    interrupted = threading.Event()

    def interrupt() -> None:
        interrupted.set()
        Machine.interrupt_all()

    try:
        vectors = collect(args.paths)
        results = []
        with calling_on_sigint(interrupt):      # Ctrl-C: report the vectors finished so far
            for vector in vectors:
                result = run_vector(vector, args.profile, args.via)
                if interrupted.is_set():        # this vector's runs were cut short
                    break
                results.append(result)
                if not args.json:               # a line as each vector ends (a CI log shows progress)
                    print(result.line(), flush=True)
    except VectorError as e:
        raise UsageError(str(e)) from None
    passed = sum(r.status == "PASS" for r in results)
    failed = sum(r.status == "FAIL" for r in results)
    skipped = sum(r.status == "SKIP" for r in results)
    summary_line = f"{passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else "")
    if args.json:
        print(json.dumps({"via": args.via, "results": [r.as_dict() for r in results], "passed": passed,
                          "failed": failed, "skipped": skipped, "interrupted": interrupted.is_set()}))
    else:
        if interrupted.is_set():
            print(f"interrupted after {len(results)} of {len(vectors)} vectors")
        print(summary_line)
    if interrupted.is_set():
        return EXIT_STATUS[StopReason.INTERRUPTED]
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """``ringminus run …`` and ``ringminus harness …`` (``fuzz`` is the entry point's: entry.py)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return guarded(lambda: _run_command(build_parser().parse_args(argv)))


def _run_command(args: argparse.Namespace) -> int:
    return cmd_harness(args) if args.command == "harness" else cmd_run(args)


def guarded(command: Callable[[], int]) -> int:
    """Run a command: a user's error is one line on stderr and exit status 2."""
    try:
        return command()
    except (UsageError, UnicornLayoutError) as e:
        print(f"ringminus: {one_line(e)}", file=sys.stderr)
        return USAGE_ERROR_STATUS
    except BrokenPipeError:
        # The reader went away (``| head``): end quietly, with the status a shell gives a
        # process SIGPIPE ends, and keep the interpreter from failing to flush stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
