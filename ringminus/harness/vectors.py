"""TestVector files: TOML with one or more ``[[vector]]`` tables (format in README.md).

Parsing checks every key against a declarative schema (VECTOR_FIELDS and the tables below
it: key -> what it must hold), then the few rules that tie keys together (RULES), and
assembles ``asm``, so every type and value error is found before any vector runs.  A
malformed file raises VectorError with one line naming the file, the vector and the key."""
from __future__ import annotations

import os
import pickle
import select
import signal
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

from ..decode.table import Stage
from ..emulator.boot import DEFAULT_LOAD, BootState
from ..arch.control import DEFINED_BITS
from ..arch.registers import GPRS
from ..emulator.machine import DEFAULT_MEMORY
from ..intercepts.controls import LAST_INTERCEPT_BIT, msrpm_bit
from ..arch.exitcodes import parse_exit
from ..intercepts.profiles import PROFILES

MODES = ("real", "protected", "long")
BITS = {"real": 16, "protected": 32, "long": 64}
U32, U64 = (1 << 32) - 1, (1 << 64) - 1
# The registers a vector may set or expect, and the bits each can hold (arch.control).
REGISTERS = {**dict.fromkeys(GPRS, U64), **DEFINED_BITS}
# Where a vector's code may run: a real-mode vector's CS is 0, so its code ends at the 64 KiB
# segment; above 1 MiB the code has the rest of the runner's guest RAM.
CODE_ROOM = {"real": 0x10000 - DEFAULT_LOAD[BootState.REAL],
             "protected": DEFAULT_MEMORY - DEFAULT_LOAD[BootState.PROTECTED],
             "long": DEFAULT_MEMORY - DEFAULT_LOAD[BootState.LONG]}
# Long mode splits a 2 MiB page per not-present address into spare tables from
# runner.SPLIT_TABLES (0x40000), which must stay below the initial guest stack.
MAX_NOT_PRESENT = 32


class VectorError(ValueError):
    """A vector file ringminus cannot use; the message names the file and the problem."""


class Invalid(Exception):
    """What is wrong with one value (a phrase that follows the key's name)."""


@dataclass(frozen=True)
class Outcome:
    kind: str                         # "vmexit", "exception", "completes"
    fields: dict

    def describe(self) -> str:
        return ", ".join(f"{k}={_show(v)}" for k, v in self.fields.items())


def _show(value) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return hex(value) if value >= 0 else str(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={_show(v)}" for k, v in value.items()) + "}"
    return str(value)


@dataclass(frozen=True)
class TestVector:
    __test__ = False                # a test vector, not a pytest test class
    name: str
    source: str
    mode: str
    cpl: int
    profile: str
    code: bytes                       # the bytes the vector runs (``asm`` is assembled when parsed)
    asm: str | None
    intercepts: tuple[int, ...]
    exceptions: tuple[int, ...]
    iopm: tuple[tuple[int, int], ...]
    msrpm: tuple[tuple[int, bool, bool], ...]
    regs: dict
    not_present: tuple[int, ...]
    memory_bytes: tuple[tuple[int, bytes], ...]
    expect: dict = field(default_factory=dict)     # profile name -> Outcome; "*" = any profile

    def outcome_for(self, profile: str) -> Outcome | None:
        return self.expect.get(profile, self.expect.get("*"))


# --- value checks --------------------------------------------------------------------------------
# A check takes the TOML value and where it is, and returns the parsed value; a problem with
# the value itself is raised as Invalid (a phrase that follows the key), which _apply turns
# into the one-line VectorError.

class Where(NamedTuple):
    vector: str                       # "FILE: NAME", or "FILE: vector N" before the name is known
    key: str = ""                     # the key path: "memory.bytes[0].hex"

    def at(self, key: str) -> "Where":
        return Where(self.vector, f"{self.key}.{key}" if self.key else key)

    def item(self, index: int) -> "Where":
        return Where(self.vector, f"{self.key}[{index}]")

    def error(self, problem: str) -> VectorError:
        return VectorError(f"{self.vector}: {self.key} {problem}" if self.key else f"{self.vector}: {problem}")


Check = Callable[[Any, Where], Any]


def _apply(check: Check, value, where: Where):
    try:
        return check(value, where)
    except Invalid as e:
        raise where.error(str(e)) from None


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def number(low: int = 0, high: int = U64, what: str = "a number") -> Check:
    """An integer, or a string holding one in decimal or 0x hex, in low..high."""
    def check(value, where):
        parsed = None
        if isinstance(value, int) and not isinstance(value, bool):
            parsed = value
        elif isinstance(value, str):
            try:
                parsed = int(value.strip(), 0)
            except ValueError:
                pass
        if parsed is None:
            raise Invalid(f"must be {what}, not {_shown(value)}")
        if not low <= parsed <= high:
            raise Invalid(f"must be {what} in {low:#x}..{high:#x}, not {_shown(value)}")
        return parsed
    return check


def text(value, where) -> str:
    if not isinstance(value, str):
        raise Invalid(f"must be a string, not {_shown(value)}")
    return value


def line(value, where) -> str:
    """A non-empty string that prints on one line (a name shows in the report)."""
    if not isinstance(value, str) or not value.strip() or not value.isprintable():
        raise Invalid(f"must be a non-empty one-line string, not {_shown(value)}")
    return value


def boolean(value, where) -> bool:
    if not isinstance(value, bool):
        raise Invalid(f"must be true or false, not {_shown(value)}")
    return value


def one_of(choices, what: str | None = None) -> Check:
    def check(value, where):
        if not isinstance(value, (str, int)) or isinstance(value, bool) or value not in choices:
            raise Invalid(f"must be {what or 'one of ' + ', '.join(map(str, choices))}, not {_shown(value)}")
        return value
    return check


def hex_bytes(value, where) -> bytes:
    if not isinstance(value, str):
        raise Invalid(f"must be a string of hex bytes, not {_shown(value)}")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise Invalid(f"is not hex bytes: {_shown(value)}") from None


def exit_code(value, where) -> int:
    """An exit code by name (APM or Linux spelling) or number."""
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise Invalid(f"must be an exit name or code, not {_shown(value)}")
    try:
        return int(parse_exit(str(value)))
    except ValueError as e:
        raise Invalid(f"is not an exit code: {e}") from None


def intercept(value, where) -> int:
    """An exit code that has an intercept bit (bit number = exit code, 0x000-0x0A6)."""
    code = exit_code(value, where)
    if not 0 <= code <= LAST_INTERCEPT_BIT:
        raise Invalid(f"names exit code {code:#x}, which has no intercept bit (0x0-{LAST_INTERCEPT_BIT:#x})")
    return code


def port_range(value, where) -> tuple[int, int]:
    """A port, or ``"LOW-HIGH"`` (both included)."""
    port = number(0, 0xFFFF, "a port")
    if isinstance(value, str) and "-" in value.strip()[1:]:
        low, high = (port(x, where) for x in value.split("-", 1))
        if high < low:
            raise Invalid(f"runs backwards: {_shown(value)}")
        return low, high
    low = port(value, where)
    return low, low


def msr(value, where) -> int:
    value = number(0, U32, "an MSR number")(value, where)
    if msrpm_bit(value, False) is None:
        raise Invalid(f"{value:#x} is outside the MSRPM's ranges (0-0x1fff, 0xc0000000-0xc0001fff, "
                      "0xc0010000-0xc0011fff); an access outside them always exits")
    return value


def next_rip(value, where) -> int | str:
    """Absolute, or ``"+N"``: N bytes past the intercepted instruction's RIP."""
    if isinstance(value, str) and value.strip().startswith("+"):
        number(0, 15, "an instruction length after '+'")(value.strip()[1:], where)
        return value.strip()
    return number(0, U64, "an address or \"+N\"")(value, where)


def exactly_true(value, where) -> bool:
    if value is not True:
        raise Invalid(f"must be true, not {_shown(value)}")
    return True


def list_of(item: Check, limit: int | None = None) -> Check:
    def check(value, where):
        if not isinstance(value, list):
            raise Invalid(f"must be a list, not {_shown(value)}")
        if limit is not None and len(value) > limit:
            raise Invalid(f"has {len(value)} entries; at most {limit}")
        return tuple(_apply(item, v, where.item(i)) for i, v in enumerate(value))
    return check


class Field(NamedTuple):
    check: Check
    required: str | None = None       # what is missing, for "needs …"; None: optional
    default: Any = None


def table(fields: dict[str, Field], fill: bool = True) -> Check:
    """A TOML table with only these keys: a dict of the parsed values, with the optional keys
    it lacks set to their defaults (``fill``) or left out."""
    def check(value, where):
        if not isinstance(value, dict):
            raise Invalid(f"must be a table, not {_shown(value)}")
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise VectorError(f"{where.vector}: unknown key {where.at(unknown[0]).key!r}")
        out = {}
        for key, spec in fields.items():
            if key in value:
                out[key] = _apply(spec.check, value[key], where.at(key))
            elif spec.required:
                raise where.error(f"needs {spec.required}")
            elif fill:
                out[key] = spec.default
        return out
    return check


def register(bits: int) -> Check:
    """A register value with none of the register's reserved bits (those outside ``bits``)."""
    def check(value, where):
        value = number()(value, where)
        if value & ~bits:
            raise Invalid(f"{value:#x} sets reserved bits {value & ~bits:#x}")
        return value
    return check


registers = table({name: Field(register(bits)) for name, bits in sorted(REGISTERS.items())}, fill=False)


def outcome(value, where) -> Outcome:
    if not isinstance(value, dict):
        raise Invalid(f"must be a table, not {_shown(value)}")
    kinds = [k for k in OUTCOME_FIELDS if k in value]
    if len(kinds) != 1:
        raise Invalid(f"must have exactly one of {', '.join(OUTCOME_FIELDS)}")
    return Outcome(kinds[0], table(OUTCOME_FIELDS[kinds[0]], fill=False)(value, where))


def expectations(value, where) -> dict:
    """One outcome for every profile (key "*"), or a table of profile -> outcome."""
    if not isinstance(value, dict) or not value:
        raise Invalid("must be a table holding an outcome (vmexit, exception or completes)")
    if set(value) <= set(PROFILES):
        return {profile: _apply(outcome, o, where.at(profile)) for profile, o in value.items()}
    return {"*": outcome(value, where)}


# --- the schema --------------------------------------------------------------------------------

MSRPM_FIELDS = {"msr": Field(msr, "an msr"), "read": Field(boolean, default=False),
                "write": Field(boolean, default=False)}
PLACED_FIELDS = {"address": Field(number(0, DEFAULT_MEMORY - 1, "a physical address"), "an address"),
                 "hex": Field(hex_bytes, "hex bytes")}
MEMORY_FIELDS = {"not_present": Field(list_of(number(what="a linear address"), MAX_NOT_PRESENT), default=()),
                 "bytes": Field(list_of(table(PLACED_FIELDS)), default=())}
OUTCOME_FIELDS = {
    "vmexit": {"vmexit": Field(exit_code), "info1": Field(number()), "info2": Field(number()),
               "next_rip": Field(next_rip), "stage": Field(one_of(tuple(Stage.__members__)))},
    "exception": {"exception": Field(number(0, 0xFF, "a vector")), "error_code": Field(number(0, U32)),
                  "cr2": Field(number())},
    "completes": {"completes": Field(exactly_true), "regs": Field(registers)},
}
VECTOR_FIELDS = {
    "name": Field(line, "a name"),
    "description": Field(text),
    "mode": Field(one_of(MODES), f"a mode ({', '.join(MODES)})"),
    "cpl": Field(one_of((0, 3), "0 or 3"), default=0),
    "profile": Field(one_of(tuple(PROFILES)), default="kvm"),
    "code": Field(hex_bytes),
    "asm": Field(line),
    "intercepts": Field(list_of(intercept), default=()),
    "exceptions": Field(list_of(number(0, 31, "an exception vector")), default=()),
    "iopm": Field(list_of(port_range), default=()),
    "msrpm": Field(list_of(table(MSRPM_FIELDS)), default=()),
    "regs": Field(registers, default={}),
    "memory": Field(table(MEMORY_FIELDS), default={"not_present": (), "bytes": ()}),
    "expect": Field(expectations, "an expect table"),
}

# Rules that tie keys together: (message, broken(parsed values)).
RULES = (
    ("cpl must be 0, or 3 in protected/long mode", lambda v: v["cpl"] == 3 and v["mode"] == "real"),
    ("needs exactly one of code and asm", lambda v: (v["code"] is None) == (v["asm"] is None)),
    ("memory.not_present needs protected or long mode", lambda v: v["memory"]["not_present"] and v["mode"] == "real"),
    ("memory.not_present: protected mode's 32-bit paging has linear addresses below 4 GiB only",
     lambda v: v["mode"] == "protected" and any(a > U32 for a in v["memory"]["not_present"])),
    (f"memory.bytes: an entry ends beyond the runner's {DEFAULT_MEMORY >> 20} MiB of RAM",
     lambda v: any(b["address"] + len(b["hex"]) > DEFAULT_MEMORY for b in v["memory"]["bytes"])),
)


ASSEMBLY_SECONDS = 10.0              # keystone loops forever on some text (e.g. "0x10000000000000000")


def assemble_text(source: str, bits: int, address: int, where: str, time_limit: float | None = None) -> bytes:
    """``source`` assembled with keystone at ``address``.  ``time_limit``: assemble in a child
    process and give up after that many seconds -- for text a user wrote, on which keystone
    can hang inside its parser, where no Python signal reaches it."""
    try:
        from keystone import KS_ARCH_X86, KS_MODE_16, KS_MODE_32, KS_MODE_64, Ks, KsError
    except ImportError:
        raise VectorError(f"{where}: assembling needs keystone-engine "
                          "(pip install 'ringminus[test]')") from None
    mode = {16: KS_MODE_16, 32: KS_MODE_32, 64: KS_MODE_64}[bits]

    def assemble() -> tuple[bool, bytes | str]:
        try:
            encoding, _ = Ks(KS_ARCH_X86, mode).asm(source, address)
        except KsError as e:
            return False, str(e)
        return True, bytes(encoding or b"")

    done, result = assemble() if time_limit is None or not hasattr(os, "fork") else _in_child(assemble, time_limit)
    if done is None:
        raise VectorError(f"{where}: the assembler did not finish within {time_limit:g} s")
    if not done:
        raise VectorError(f"{where}: cannot assemble: {result}")
    return result


def _in_child(work: Callable[[], tuple[bool, Any]], seconds: float) -> tuple[bool | None, Any]:
    """``work()`` in a forked child, its (picklable) result back through a pipe; (None, None)
    when the child does not finish within ``seconds`` (it is killed)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:                                            # the child: work, report, leave at once
        status = 1
        try:
            os.close(read_end)
            with os.fdopen(write_end, "wb") as pipe:
                pipe.write(pickle.dumps(work()))
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    received, deadline = bytearray(), time.monotonic() + seconds
    try:
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            while (left := deadline - time.monotonic()) > 0 and select.select([pipe], [], [], left)[0]:
                chunk = pipe.read(1 << 16)
                if not chunk:
                    break
                received += chunk
            else:
                return None, None
    finally:
        os.kill(pid, signal.SIGKILL)            # done or not (a Ctrl-C, too): it never outlives this
        os.waitpid(pid, 0)
    return pickle.loads(bytes(received)) if received else (False, "the assembler failed")


def _code(values: dict, where: str) -> bytes:
    """The vector's bytes (``asm`` assembled where the runner places the code), checked to
    fit where they run."""
    mode = values["mode"]
    if values["code"] is not None:
        code, key = values["code"], "code"
    else:
        code, key = assemble_text(values["asm"], BITS[mode], DEFAULT_LOAD[BootState(mode)], f"{where}: asm",
                                  ASSEMBLY_SECONDS), "asm"
    if not code:
        raise VectorError(f"{where}: {key} holds no instructions")
    if len(code) > CODE_ROOM[mode]:
        raise VectorError(f"{where}: {key} is {len(code)} bytes; {mode} mode has room for {CODE_ROOM[mode]}")
    return code


def parse_vector(value, source: str, index: int) -> TestVector:
    where = Where(f"{source}: vector {index + 1}")
    if isinstance(value, dict) and "name" in value:
        where = Where(f"{source}: {_apply(line, value['name'], where.at('name'))}")
    values = _apply(table(VECTOR_FIELDS), value, where)
    for message, broken in RULES:
        if broken(values):
            raise where.error(message)
    return TestVector(values["name"], source, values["mode"], values["cpl"], values["profile"],
                  _code(values, where.vector), values["asm"], values["intercepts"], values["exceptions"],
                  values["iopm"], tuple((m["msr"], m["read"], m["write"]) for m in values["msrpm"]),
                  values["regs"], values["memory"]["not_present"],
                  tuple((b["address"], b["hex"]) for b in values["memory"]["bytes"]), values["expect"])


def _parse_toml(text: str) -> dict:
    """tomllib recurses once per nesting level: parse on a thread of its own, whose stack
    starts empty, so that how deep a file may nest does not depend on the caller's stack."""
    outcome: list = []

    def parse():
        try:
            outcome.append(tomllib.loads(text))
        except (ValueError, RecursionError) as e:
            outcome.append(e)
    thread = threading.Thread(target=parse, name="toml")
    thread.start()
    thread.join()
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def load_vectors(path: Path) -> list[TestVector]:
    try:
        document = _parse_toml(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise VectorError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:         # TOMLDecodeError, UnicodeDecodeError, an integer of > 4300 digits
        raise VectorError(f"{path}: not valid TOML ({e})") from None
    except RecursionError:
        raise VectorError(f"{path}: not valid TOML (nested too deeply)") from None
    unknown = sorted(set(document) - {"vector"})
    if unknown:
        raise VectorError(f"{path}: unknown key {unknown[0]!r} (a vector file holds [[vector]] tables)")
    tables = document.get("vector")
    if not isinstance(tables, list) or not tables:
        raise VectorError(f"{path}: holds no [[vector]] tables")
    vectors, seen = [], {}
    for i, value in enumerate(tables):
        vector = parse_vector(value, str(path), i)
        if vector.name in seen:
            raise VectorError(f"{path}: vector {i + 1}: name {vector.name!r} is taken by vector {seen[vector.name] + 1}")
        seen[vector.name] = i
        vectors.append(vector)
    return vectors


def collect(paths: list[str]) -> list[TestVector]:
    """Every vector in the files named, and in the *.toml files of the directories named."""
    vectors = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            files = sorted(path.glob("*.toml"))
            if not files:
                raise VectorError(f"{path}: no .toml vector files")
        elif path.exists():
            files = [path]
        else:
            raise VectorError(f"cannot read {path}: no such file or directory")
        for file in files:
            vectors.extend(load_vectors(file))
    return vectors
