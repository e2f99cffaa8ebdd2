"""Campaign ``inputs``: what a user hands ringminus -- command lines, ELF files, vector files.

Each run builds one input from its seed, in a fresh temporary directory:

* a ``ringminus run`` command line: a tiny image made for a random boot state and a random
  set of options, each given a value that is right for it or one that is wrong whatever
  else the command line says (a negative address, NaN seconds, a register value wider than
  the register, a port two devices would claim, a file that is not there …);
* an ELF32/ELF64 file: a valid executable, often with header or program-header fields set to
  boundary values (0, all-ones, 2**63, past the end of the file …) or cut short;
* a vector file: a valid vector, often with a key dropped, added, given the wrong TOML type
  or a value out of range, or with the TOML text itself corrupted;
* a ``ringminus harness`` command line over such files, with good or bad options.

It calls ``ringminus.cli.main(argv)`` in this process, stdout and stderr captured, and
checks the user-error contract (DESIGN.md §5, issue 11):

* nothing escapes ``main`` but a return or ``SystemExit`` with an int (argparse's --help);
* a usage error (status 2) is exactly one line on stderr, ``ringminus: …``, and no output;
* an input built to be wrong is a usage error; one built to be right is not;
* no traceback (or "Exception ignored …") is ever printed, and ``--json`` prints JSON.
"""
from __future__ import annotations

import contextlib
import datetime
import io
import json
import random
import re
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from . import Finding
from .runner import raising_frame
from ..harness.vectors import REGISTERS as VECTOR_REGISTERS
from ..emulator.result import USAGE_ERROR_STATUS

# What a run expects of the status: "usage" (an input built to be wrong), "runs" (built to be
# right: anything but a usage error), "any" (a mutation that may or may not be valid).
USAGE, RUNS, ANY = "usage", "runs", "any"
MAX_INSNS = 2000                      # every run command line ends with this bound …
TIMEOUT = "5"                         # … and this one, so an accepted bad value never runs long
HLT, NOP = b"\xf4", b"\x90"
HUGE = "0x" + "f" * 5000              # a number Python will not print in decimal (4300-digit limit)
BIOS_SIZE = 0x10000

TRACE_LINE = re.compile(r"0x[0-9a-f]{16}  ")            # --trace: address, bytes, instruction

@dataclass
class Case:
    """One input: the argv for ``main``, what it expects, and what the run's files hold."""
    argv: list[str]
    expect: str
    why: str                          # what makes it wrong (or "valid"), for the finding's message
    json: bool = False
    files: dict = field(default_factory=dict)
    dir: str = ""                     # the temporary directory, shown as TMP


# -- command lines for ``run`` -------------------------------------------------------------------

def _code(rng: random.Random) -> bytes:
    """A few bytes that end quickly: port writes to the exit and debug ports, CPUID, HLT."""
    pieces = [NOP, b"\x0f\xa2", b"\xb0\x41\xe6\xe9", b"\xb0\x03\xe6\xf4", b"\xe6\xb2", b"\xeb\xfe", b"\x0f\x0b",
              b"\x0f\x01\xd9", b"\x0f\x01\xc1"]                  # VMMCALL, VMCALL: hypercalls
    return b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 4))) + HLT


@dataclass
class RunContext:
    rng: random.Random
    dir: Path
    boot: str
    image: Path
    blob: Path
    handler: Path


def _addr(value: int) -> str:
    return f"{value:#x}"


# Each option: (name, good values, bad values).  A maker takes the context and returns the
# option's argument (or None for a flag); a bad value is wrong whatever else is given.
def _good_load(c):
    return _addr(c.rng.choice((0x7C00, 0x8000, 0x10000)) if c.boot == "real" else c.rng.choice((0x100000, 0x200000)))


def _bad_load(c):
    return c.rng.choice(["=-1", "0xzz", "1e3", "", "0x" + "f" * 20, "=-0x10", HUGE, "9" * 5000] +
                        (["0x5000", "0x1000"] if c.boot in ("protected", "long") else []) +
                        (["0x7c00"] if c.boot == "bios" else []))


def _good_set(c):
    """Any register, any value that fits it (a selector may still name no descriptor)."""
    name, bits = c.rng.choice(sorted(_register_bits().items()))
    return f"{name}={c.rng.choice((0, 1, (1 << bits) - 1, c.rng.getrandbits(bits))):#x}"


def _bad_set(c):
    bits = _register_bits()
    name = c.rng.choice(sorted(bits))
    choices = ["xyz=1", "rax", "=5", f"{name}=banana", f"{name}=-1", f"{name}={1 << bits[name]:#x}",
               f"{name}={(1 << 64) + 5:#x}", "al=0x100", "ax=0x10000", "eax=0x100000000", "ds=0x12345", f"rax={HUGE}"]
    if c.boot in ("protected", "long"):
        choices.append("ds=0x1238")                     # beyond the machine's GDT
    return c.rng.choice(choices)


def _register_bits() -> dict:
    from ..cli import REGISTER_BITS
    return REGISTER_BITS


def _good_blob(c):
    return f"{c.blob}@{_addr(0x20000 if c.boot == 'real' else 0x300000)}"


def _bad_blob(c):
    choices = ["nofile", f"{c.dir / 'missing.bin'}@0x300000", f"{c.blob}@=-1", f"{c.blob}@", f"{c.blob}@0xzz",
               f"{c.blob}@0xfffffffffff", f"{c.blob}@{1 << 64:#x}", f"{c.dir}@0x300000"]
    if c.boot in ("protected", "long"):
        choices += [f"{c.blob}@0x5000", f"{c.blob}@0x9ffff", f"{c.blob}@0x1000"]
    return c.rng.choice(choices)


OPTIONS = [
    ("--load", _good_load, _bad_load),
    ("--mem", lambda c: c.rng.choice(("4M", "16M", "0x1000000", "8192K")),
     lambda c: c.rng.choice(("0", "100", "12Q", "=-4K", "999999G", "1T", "nan", "", "0x", "4097", "1.5M"))),
    ("--cpl", lambda c: "3" if c.boot in ("protected", "long") and c.rng.random() < 0.5 else "0",
     lambda c: c.rng.choice(("2", "x", "-1", "") + (("3",) if c.boot in ("real", "bios") else ()))),
    ("--blob", _good_blob, _bad_blob),
    ("--set", _good_set, _bad_set),
    ("--debugcon-port", lambda c: c.rng.choice(("0xe9", "0x402", "0x3f8")),
     lambda c: c.rng.choice(("0x10000", "=-1", "zz", "0xf4", "0xcf8", "0xcfc", "0xb2", "0xb3", ""))),
    ("--max-insns", lambda c: str(c.rng.randrange(MAX_INSNS)),
     lambda c: c.rng.choice(("=-5", "x", "1.5", "", "1e3", str(1 << 64), str(1 << 63)))),
    ("--timeout", lambda c: c.rng.choice(("5", "2.5", "1e2")),
     lambda c: c.rng.choice(("nan", "inf", "=-inf", "0", "=-1", "1e400", "1e300", "x", "", "0.0", "NaN"))),
    ("--cpu", lambda c: "qemu32" if c.boot != "long" and c.rng.random() < 0.5 else "qemu64",
     lambda c: c.rng.choice(("486", "", "QEMU64") + (("qemu32",) if c.boot == "long" else ()))),
    ("--chipset", lambda c: c.rng.choice(("q35", "pc")), lambda c: c.rng.choice(("i440", ""))),
    ("--smram", lambda c: c.rng.choice(("0x3000000:1M", "0x2000000:4K", "0xc0000000:64K")),
     lambda c: c.rng.choice(("=-4096:4K", "0x1001:4K", "0xa0000:4K", "0x100000000:4K", "0xfffff000:8K",
                             "x:y", "0x1000", "0x2000000:0", "0x2000000:100", ":4K"))),
    ("--smram-state", lambda c: c.rng.choice(("open", "closed", "locked")), lambda c: c.rng.choice(("ajar", ""))),
    ("--smram-load", lambda c: f"{c.blob}@{c.rng.choice((0xA0000, 0xB0000)):#x}",
     lambda c: c.rng.choice((f"{c.blob}@0x100000", f"{c.blob}@=-1", f"{c.blob}@0xc0000", "x@0xa0000", "nope"))),
    ("--smbase", lambda c: c.rng.choice(("0x30000", "0x98000")),
     lambda c: c.rng.choice(("=-5", "0x100000000", "x", ""))),
    ("--smi-at", lambda c: str(c.rng.randrange(200)), lambda c: c.rng.choice(("=-1", "x", str(1 << 64), ""))),
    ("--nmi-at", lambda c: str(c.rng.randrange(200)), lambda c: c.rng.choice(("=-1", "x", str(1 << 64), ""))),
    ("--irq-at", lambda c: f"{c.rng.randrange(200)}:{c.rng.randrange(256):#x}",
     lambda c: c.rng.choice(("5", "5:256", "=-1:3", "x:y", "5:-1", ":", f"{1 << 64}:3"))),
    ("--apm-smi", None, None),
    ("--dump", lambda c: c.rng.choice(("0x7c00:16", "0:1", "0xfffffff0:16", "0xa0000:256")),
     lambda c: c.rng.choice(("0x7c00:0", "0x7c00:2M", "=-1:4", "0xffffffffffffffff:16", "x", "0x7c00", ":4"))),
    ("--guest", None, None),
    ("--intercept", lambda c: c.rng.choice(("cpuid", "cr0_write,hlt", "all", "ioio", "excp14", "msr,vmrun")),
     lambda c: c.rng.choice(("nonsense", "invalid", "npf", "", ",", "0x400", "=-1"))),
    ("--intercept-exception", lambda c: c.rng.choice(("6", "13,14", "0")),
     lambda c: c.rng.choice(("32", "=-1", "x", "", ","))),
    ("--iopm", lambda c: c.rng.choice(("0x80", "0x80-0x90", "0xe9,0xf4"))
     , lambda c: c.rng.choice(("0x90-0x80", "0x10000", "x", "1-", "=-1"))),
    ("--msrpm", lambda c: c.rng.choice(("0x10:r", "0xc0000080:rw", "0xc0010114:w")),
     lambda c: c.rng.choice(("0x40000000:r", "0x10:x", "0x10", ":r", "=-1:r", f"{1 << 40:#x}:r"))),
    ("--profile", lambda c: c.rng.choice(("kvm", "apm", "qemu")), lambda c: c.rng.choice(("bochs", ""))),
    ("--on-exit", lambda c: c.rng.choice(("stop", "skip")), lambda c: c.rng.choice(("ignore", ""))),
    ("--hypercall", lambda c: c.rng.choice(("0x10=deny", "1-5=handle", "0=forward", "0-0x100=forward")),
     lambda c: c.rng.choice(("x=deny", "5=maybe", "5-1=deny", "=deny", "0x1" + "0" * 20 + "=deny", "5",
                             f"{HUGE}=deny", f"0-{HUGE}=forward"))),
    ("--hypercall-handler", lambda c: f"{c.handler}:handler",
     lambda c: c.rng.choice(("nosuchmodule_ringminus_fuzz:handler", f"{c.dir / 'nofile.py'}:f",
                             f"{c.dir / 'broken.py'}:f", f"{c.handler}:missing", f"{c.handler}:VALUE",
                             "x", f"{c.handler}:1bad", f"{c.dir / 'nul'}\0.py:f"))),
    ("--json", None, None),
    ("--trace", None, None),
]
GUEST_ONLY = ("--intercept", "--intercept-exception", "--iopm", "--msrpm")
# What --hypercall-handler's function returns: RAX, None (declines), or what a user gets wrong.
HANDLER_RESULTS = ("0", "None", "call.nr", "2 ** 70", "-1", "'x'", "1.5", "1 // 0", "[][0]", "True")


def _image(rng: random.Random, boot: str, directory: Path) -> Path:
    path = directory / "image.bin"
    if boot == "bios":
        path.write_bytes(HLT * BIOS_SIZE)
    else:
        path.write_bytes(_code(rng))
    return path


def run_case(rng: random.Random, directory: Path) -> Case:
    boot = rng.choice(("real", "protected", "long", "bios"))
    blob = directory / "blob.bin"
    blob.write_bytes(bytes(rng.getrandbits(8) for _ in range(rng.choice((1, 16, 100)))))
    handler = directory / "handler.py"
    handler.write_text("VALUE = 5\n\ndef handler(call):\n    return " + rng.choice(HANDLER_RESULTS) + "\n")
    (directory / "broken.py").write_text("def f(:\n")
    c = RunContext(rng, directory, boot, _image(rng, boot, directory), blob, handler)
    argv = ["run", str(c.image), "--boot", boot]
    bad = None
    count = rng.randint(0, 6)
    chosen = rng.sample(OPTIONS, count) if rng.random() < 0.7 else rng.choices(OPTIONS, k=count)   # or repeated
    valued = [i for i, option in enumerate(chosen) if option[1] is not None]
    bad_at = None
    if valued and rng.random() < 0.7:             # the wrong value comes last: a repeat cannot override it
        chosen.append(chosen.pop(rng.choice(valued)))
        bad_at = len(chosen) - 1
    for i, (name, good, wrong) in enumerate(chosen):
        if good is None:
            argv.append(name)
            continue
        value = (wrong if i == bad_at else good)(c)
        if i == bad_at:
            bad = f"{name} {value}"
        # ``--opt=-1`` keeps argparse from reading a negative number as an option
        argv += [f"{name}{value}"] if value.startswith("=") else [name, value]
    if bad is None and rng.random() < 0.15:
        bad, argv[1] = "image", rng.choice((str(directory / "missing.bin"), str(directory), _empty(directory),
                                            str(directory / "nul\0.bin"), str(directory / "new\nline.bin")))
    if any(a in GUEST_ONLY for a in argv) and "--guest" not in argv and rng.random() < 0.85:
        argv.append("--guest")
    argv += ["--max-insns", str(MAX_INSNS), "--timeout", TIMEOUT]
    return Case(argv, USAGE if bad else ANY, bad or "options", json="--json" in argv)


def _empty(directory: Path) -> str:
    path = directory / "empty.bin"
    path.write_bytes(b"")
    return str(path)


# -- ELF files -----------------------------------------------------------------------------------

ELF_LAYOUT = {   # bits: (header format, header size, program header format, its size, e_machine)
    32: ("<4sBBBB8xHHIIIIIHHHHHH", 52, "<IIIIIIII", 32, 3),
    64: ("<4sBBBB8xHHIQQQIHHHHHH", 64, "<IIQQQQQQ", 56, 62),
}
# Header fields a mutation may set, by offset and size (ELF64 / ELF32).
ELF_HEADER_FIELDS = {  # name: ((offset32, size32), (offset64, size64))
    "e_entry": ((24, 4), (24, 8)), "e_phoff": ((28, 4), (32, 8)), "e_phentsize": ((42, 2), (54, 2)),
    "e_phnum": ((44, 2), (56, 2)), "e_machine": ((18, 2), (18, 2)), "ei_class": ((4, 1), (4, 1)),
    "ei_data": ((5, 1), (5, 1)),
}
PH_FIELDS = {  # name: (offset32, offset64, size32, size64)
    "p_type": (0, 0, 4, 4), "p_offset": (4, 8, 4, 8), "p_vaddr": (8, 16, 4, 8), "p_paddr": (12, 24, 4, 8),
    "p_filesz": (16, 32, 4, 8), "p_memsz": (20, 40, 4, 8),
}


def _boundary(rng: random.Random, size: int, file_size: int) -> int:
    top = (1 << (8 * size)) - 1
    return rng.choice((0, 1, top, top >> 1, (top >> 1) + 1, file_size, file_size + 1, file_size - 1,
                       0x1000, 0x100000, 0xFFFF, rng.getrandbits(8 * size))) & top


def elf_file(rng: random.Random, bits: int, boot: str) -> tuple[bytes, list[str]]:
    """A valid ELF with 1-3 PT_LOAD segments, then some mutations (named in the list)."""
    header_format, header_size, ph_format, ph_size, machine = ELF_LAYOUT[bits]
    base = 0x7C00 if boot == "real" else 0x100000
    count = rng.randint(1, 3)
    segments, offset, address = [], header_size + count * ph_size, base
    for _ in range(count):
        data = _code(rng)
        memsz = len(data) + rng.choice((0, 16, 0x1000))
        segments.append((offset, address, data, memsz))
        offset, address = offset + len(data), address + ((memsz + 0xFFF) & ~0xFFF)
    header = struct.pack(header_format, b"\x7fELF", 1 if bits == 32 else 2, 1, 1, 0, 2, machine, 1,
                         base, header_size, 0, 0, header_size, ph_size, count, 0, 0, 0)
    ph = b"".join(struct.pack(ph_format, *((1, o, a, a, len(d), m, 5, 0x1000) if bits == 32 else
                                           (1, 5, o, a, a, len(d), m, 0x1000)))
                  for o, a, d, m in segments)
    image = bytearray(header + ph + b"".join(d for _, _, d, _ in segments))
    mutations = []
    for _ in range(rng.choice((0, 0, 1, 1, 2, 3))):
        kind = rng.random()
        if kind < 0.4:
            name = rng.choice(sorted(ELF_HEADER_FIELDS))
            at, size = ELF_HEADER_FIELDS[name][bits == 64]
            value = _boundary(rng, size, len(image))
            image[at:at + size] = value.to_bytes(size, "little")
            mutations.append(f"{name}={value:#x}")
        elif kind < 0.8:
            index = rng.randrange(count)
            name = rng.choice(sorted(PH_FIELDS))
            o32, o64, s32, s64 = PH_FIELDS[name]
            at, size = header_size + index * ph_size + (o64 if bits == 64 else o32), s64 if bits == 64 else s32
            value = _boundary(rng, size, len(image))
            image[at:at + size] = value.to_bytes(size, "little")
            mutations.append(f"ph{index}.{name}={value:#x}")
        elif kind < 0.9 and image:
            cut = rng.randrange(len(image))
            del image[cut:]
            mutations.append(f"cut at {cut}")
        elif image:
            at = rng.randrange(len(image))
            image[at] = rng.getrandbits(8)
            mutations.append(f"byte {at}={image[at]:#x}")
    return bytes(image), mutations


def elf_case(rng: random.Random, directory: Path) -> Case:
    bits = rng.choice((32, 64))
    boot = rng.choice(("real", "protected", "long", "protected", "long"))
    data, mutations = elf_file(rng, bits, boot)
    path = directory / "image.elf"
    path.write_bytes(data)
    argv = ["run", str(path), "--boot", boot, "--mem", rng.choice(("2M", "16M")),
            "--max-insns", str(MAX_INSNS), "--timeout", TIMEOUT]
    if rng.random() < 0.3:
        argv.append("--json")
    # A valid ELF of either class runs in protected and long mode; real mode needs the entry
    # below 1 MiB, which these have.
    return Case(argv, ANY if mutations else RUNS, f"ELF{bits} " + (", ".join(mutations) or "valid"),
                json="--json" in argv, files={"image.elf": data.hex()})


# -- vector files --------------------------------------------------------------------------------

def base_vector(rng: random.Random, name: str) -> dict:
    """A valid ``[[vector]]`` table."""
    mode = rng.choice(("real", "protected", "long"))
    table = {"name": name, "mode": mode}
    if mode != "real" and rng.random() < 0.3:
        table["cpl"] = 3
    if rng.random() < 0.5:
        table["profile"] = rng.choice(("kvm", "apm", "qemu"))
    if rng.random() < 0.2:
        table["asm"] = rng.choice(("cpuid", "nop; hlt", "mov eax, 1"))
    else:
        table["code"] = rng.choice(("0fa2", "f4", "90", "0f01d8", "e6e9", "0f0b", "cd03", "0f20c0"))
    optional = {
        "description": lambda: "a vector",
        "intercepts": lambda: rng.sample(["cpuid", "hlt", "ioio", "cr0_read", "vmrun", "excp6", 0x72], rng.randint(0, 3)),
        "exceptions": lambda: rng.sample([0, 6, 13, 14, 3], rng.randint(0, 2)),
        "iopm": lambda: [0xE9, "0x80-0x83"][:rng.randint(0, 2)],
        "msrpm": lambda: [{"msr": 0x10, "read": True, "write": rng.random() < 0.5}],
        "regs": lambda: {"rax": rng.getrandbits(32), "rcx": "0x10"} if rng.random() < 0.5 else
                        {name: hex(rng.choice((0, 1, 0xFFFF_FFFF, (1 << 64) - 1, rng.getrandbits(64))) & bits)
                         for name, bits in rng.sample(sorted(VECTOR_REGISTERS.items()), 3)},
        "memory": lambda: ({"bytes": [{"address": 0x2000, "hex": "0011"}]} if mode == "real" else
                           {"not_present": [0x200000], "bytes": [{"address": 0x2000, "hex": "0011"}]}),
    }
    for key, make in optional.items():
        if rng.random() < 0.35:
            table[key] = make()
    outcome = rng.choice(({"vmexit": "cpuid", "next_rip": "+2", "stage": "POST_EXCEPT"},
                          {"exception": 6, "error_code": 0}, {"completes": True, "regs": {"rax": 1}},
                          {"vmexit": 0x72, "info1": 0, "info2": "0x0"}))
    table["expect"] = {"kvm": outcome, "apm": dict(outcome)} if rng.random() < 0.3 else outcome
    return table


WRONG_TYPES = (1.5, datetime.datetime(2024, 1, 1), {}, {"x": 1}, [[]], float("inf"))
EMPTY_TABLE_OK = ("regs", "memory")              # {} is a valid value there
# (key, bad values): each makes any vector malformed.
BAD_VALUES = {
    "name": ("", 5, "a\nb", [], "tab\there"),
    "mode": ("smm", 5, "", ["real"]),
    "cpl": (1, 2, -1, True, "3x"),
    "profile": ("bochs", [], 5, ""),
    "code": ("zz", "", 5, "f"),
    "asm": ("bogus instruction", "", 5),
    "intercepts": (5, "cpuid", ["nope"], ["invalid"], ["npf"], [0x400], [-2], [True], [[]]),
    "exceptions": (5, [32], [-1], ["x"], [True], [1.5]),
    "iopm": (5, [70000], ["0x90-0x80"], ["x"], [-1], [True]),
    "msrpm": (5, [5], [{"msr": 0x40000000, "read": True}], [{"read": True}], [{"msr": 0x10, "read": 1}],
              [{"msr": 0x10, "colour": True}], [{"msr": -1}]),
    "regs": (5, {"rip": 1}, {"rax": -1}, {"rax": "0x10000000000000000"}, {"rax": 1.5}, {"rax": True},
             {"efer": 0x80000000}, {"cr0": 1 << 32}, {"cr4": 1 << 12}, {"rflags": 1 << 22}, {"cr3": 1 << 52}),
    "memory": (5, {"not_present": 5}, {"bytes": [{"hex": "00"}]}, {"bytes": [{"address": 0x3FFFFFF, "hex": "0011"}]},
               {"bytes": [{"address": 0, "hex": "zz"}]}, {"colour": 1}, {"not_present": list(range(0, 0x40000, 0x1000))},
               {"bytes": [{"address": -1, "hex": "00"}]}),
    "expect": (5, {}, {"vmexit": "nope"}, {"exception": 256}, {"completes": False}, {"vmexit": "cpuid", "exception": 6},
               {"kvm": 5}, {"vmexit": "cpuid", "stage": "LATE"}, {"vmexit": "cpuid", "next_rip": "+x"},
               {"exception": 6, "error_code": -1}, {"completes": True, "regs": {"rip": 1}}),
    "description": (5, []),
}


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value) if -(1 << 63) <= value < 1 << 63 else json.dumps(hex(value))
    if isinstance(value, float):
        return "inf" if value == float("inf") else repr(value)
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    if isinstance(value, str):
        return json.dumps(value)           # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"


def toml_vectors(tables: list[dict]) -> str:
    return "".join("[[vector]]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in t.items()) for t in tables)


def mutate_vector(rng: random.Random, table: dict) -> tuple[str, str]:
    """Make ``table`` malformed in one way; (what was done, the expectation)."""
    choice = rng.random()
    if choice < 0.45:
        key = rng.choice(sorted(BAD_VALUES))
        value = rng.choice(BAD_VALUES[key])
        if key == "asm":
            table.pop("code", None)
        if key == "code":
            table.pop("asm", None)
        table[key] = value
        return f"{key} = {toml_value(value)}", USAGE
    if choice < 0.6:
        key = rng.choice(sorted(table))
        table[key] = rng.choice([t for t in WRONG_TYPES if not (t == {} and key in EMPTY_TABLE_OK)])
        return f"{key} = {toml_value(table[key])}", USAGE
    if choice < 0.7:
        key = rng.choice(("name", "mode", "expect", "code" if "code" in table else "asm"))
        table.pop(key)
        return f"no {key}", USAGE
    if choice < 0.8:
        table[rng.choice(("colour", "Name", "expected", "regs2"))] = 1
        return "an unknown key", USAGE
    if choice < 0.9:
        if table["mode"] == "real":
            table["cpl"] = 3
            return "cpl 3 in real mode", USAGE
        table["asm"], table["code"] = "nop", "90"
        return "both code and asm", USAGE
    path = rng.choice(_paths(table))
    _set_path(table, path, rng.choice((*WRONG_TYPES, -1, 1 << 64, "x", True, [], None)))
    return f"{'.'.join(map(str, path))} changed", ANY


def _paths(value, prefix=()) -> list[tuple]:
    """Every key path into nested tables and lists."""
    out = [prefix] if prefix else []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, inner in items:
        out += _paths(inner, prefix + (key,))
    return out


def _set_path(table, path: tuple, value) -> None:
    for key in path[:-1]:
        table = table[key]
    if value is None and isinstance(table, dict):
        del table[path[-1]]
    elif value is not None:
        table[path[-1]] = value


def corrupt_text(rng: random.Random, text: str) -> tuple[bytes, str]:
    data = text.encode()
    kind = rng.randrange(6)
    if kind == 0:
        cut = rng.randrange(len(data))
        return data[:cut], f"cut at {cut}"
    if kind == 1:
        at = rng.randrange(len(data))
        junk = bytes(rng.choice(b"[]{}=\"'\n\\#.,x0 \x00\xff") for _ in range(rng.randint(1, 4)))
        return data[:at] + junk + data[at:], f"{junk!r} inserted at {at}"
    if kind == 2:
        depth = rng.choice((100, 1000, 5000))
        return data + b"deep = " + b"[" * depth + b"]" * depth + b"\n", f"an array nested {depth} deep"
    if kind == 3:
        return b"\xff\xfe" + data, "not UTF-8"
    if kind == 4:
        return data + b"big = " + b"1" * 5000 + b"\n", "a 5000-digit integer"
    return data.replace(b"[[vector]]", b"[vector]", 1), "a table where an array of tables belongs"


def vector_case(rng: random.Random, directory: Path) -> Case:
    tables = [base_vector(rng, f"v{i}") for i in range(rng.randint(1, 3))]
    expect, why = RUNS, "valid"
    choice = rng.random()
    if choice < 0.6:
        why, expect = mutate_vector(rng, rng.choice(tables))
    elif choice < 0.7 and len(tables) > 1:
        tables[1]["name"] = tables[0]["name"]
        why, expect = "a name used twice", USAGE
    text = toml_vectors(tables).encode()
    if 0.7 <= choice < 0.85:
        text, why = corrupt_text(rng, text.decode())
        expect = ANY
    path = directory / "vectors.toml"
    path.write_bytes(text)
    argv = ["harness", str(path)]
    if rng.random() < 0.2:
        argv.append(str(path))                      # a file named twice runs twice
    if rng.random() < 0.3:
        argv += ["--profile", rng.choice(("kvm", "apm", "qemu"))]
    if rng.random() < 0.15:
        argv += ["--via", rng.choice(("guest", "both"))]
    if rng.random() < 0.3:
        argv.append("--json")
    if rng.random() < 0.15:
        bad = rng.choice((["--profile", "bochs"], ["--via", "neither"], ["--via"], [str(directory / "none.toml")],
                          [str(_empty_dir(directory))], ["--frobnicate"], [str(directory / "nul\0.toml")]))
        argv += bad
        why, expect = f"{why}; {' '.join(bad)}", USAGE
    return Case(argv, expect, why, json="--json" in argv, files={"vectors.toml": text.decode("utf-8", "replace")})


def _empty_dir(directory: Path) -> Path:
    path = directory / "no-vectors"
    path.mkdir(exist_ok=True)
    return path


# -- argv noise ----------------------------------------------------------------------------------

def noise_case(rng: random.Random, directory: Path) -> Case:
    """Command lines put together from option names and values at random."""
    image = directory / "image.bin"
    image.write_bytes(HLT)
    words = ["run", "harness", str(image), "--boot", "long", "--mem", "-", "--", "=", "--json", "--set",
             "rax=1", "--load", "0x100000", "--timeout", "--max-insns", "5", "-h0", "--guest", "--via", "x",
             "fuzz", "", "--intercept", "all", "\x00", "é"]
    argv = [rng.choice(words) for _ in range(rng.randint(0, 8))]
    if rng.random() < 0.8:
        argv.insert(0, rng.choice(("run", "harness")))
    if argv[:1] == ["fuzz"]:
        argv[0] = "run"                              # the fuzz runner has its own campaign
    if "run" in argv[:1]:
        argv += ["--max-insns", str(MAX_INSNS), "--timeout", TIMEOUT]
    return Case(argv, ANY, "random words")


MAKERS = ((5, run_case), (3, elf_case), (4, vector_case), (1, noise_case))


# -- the contract --------------------------------------------------------------------------------

def call_main(argv: list[str]) -> tuple[int, str, str]:
    """``ringminus.cli.main(argv)`` in this process: (status, stdout, stderr)."""
    from ..cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(argv)
        except SystemExit as done:                  # argparse's --help and friends
            if not isinstance(done.code, (int, type(None))):
                raise Finding("contract", f"SystemExit({done.code!r}) is not a status") from None
            status = done.code or 0
    return status, out.getvalue(), err.getvalue()


def check(case: Case, status, out: str, err: str) -> None:
    def fail(problem: str, key: str) -> None:
        raise Finding("contract", f"{problem} for {describe(case)}", key=key)

    if not isinstance(status, int) or isinstance(status, bool) or not 0 <= status <= 255:
        fail(f"main returned {status!r}, not a status", "status not an int")
    for marker in ("Traceback (most recent call last)", "Exception ignored"):
        if marker in err or marker in out:
            fail(f"printed {marker!r}", f"printed {marker}")
    if status == USAGE_ERROR_STATUS:
        lines = err.splitlines()
        if "--trace" in case.argv:       # the trace goes to stderr too: the error is what follows it
            lines = [line for line in lines if not TRACE_LINE.match(line)]
        if len(lines) != 1 or not err.endswith("\n") or not lines[0].startswith("ringminus: "):
            fail(f"usage error is not one 'ringminus: …' line on stderr: {err[:200]!r}", "usage error not one line")
        if out:
            fail(f"usage error also printed {out[:80]!r}", "usage error printed output")
        if case.expect == RUNS:
            fail(f"valid input refused: {lines[0] if lines else err!r}", "valid input refused")
    elif case.expect == USAGE:
        fail(f"wrong input was not a usage error: status {status}, stderr {err[:120]!r}",
             f"not refused: {case.why.split(' ')[0]}")
    elif case.json and case.argv[:1] in (["run"], ["harness"]) and "--help" not in case.argv and "-h" not in case.argv:
        try:
            json.loads(out)
        except ValueError:
            fail(f"--json printed no JSON: {out[:80]!r}", "--json not JSON")


def describe(case: Case) -> str:
    text = " ".join(repr(a) if not a or " " in a else a for a in case.argv)
    shown = f"{text} ({case.why})"
    return (shown.replace(case.dir, "TMP") if case.dir else shown)[:500]


def one_run(seed: int) -> None:
    rng = random.Random(seed)
    maker = rng.choices([m for _, m in MAKERS], [w for w, _ in MAKERS])[0]
    with tempfile.TemporaryDirectory(prefix="ringminus-inputs-") as name:
        directory = Path(name)
        case = maker(rng, directory)
        case.dir = name
        try:
            status, out, err = call_main(case.argv)
        except Finding:
            raise
        except Exception as escaped:                # anything but a status is a bug in ringminus
            where = raising_frame(escaped)
            raise Finding("exception", f"{type(escaped).__name__}: {escaped} (raised at {where}) for {describe(case)}",
                          key=f"{type(escaped).__name__} at {where}") from escaped
        check(case, status, out, err)
