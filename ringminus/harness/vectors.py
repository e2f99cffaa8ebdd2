"""Vector files: TOML with one or more ``[[vector]]`` tables (format in README.md).  Parsing
validates every key; a malformed file raises VectorError with a one-line message."""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..decode.table import Stage
from ..intercepts.exitcodes import parse_exit
from ..intercepts.profiles import PROFILES

MODES = ("real", "protected", "long")
REGISTERS = frozenset({"rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10",
                       "r11", "r12", "r13", "r14", "r15", "rflags", "cr0", "cr3", "cr4", "efer",
                       "dr6", "dr7"})
VECTOR_KEYS = frozenset({"name", "mode", "cpl", "profile", "code", "asm", "intercepts", "exceptions",
                         "iopm", "msrpm", "regs", "memory", "expect", "description"})
OUTCOME_KEYS = {"vmexit": {"vmexit", "info1", "info2", "next_rip", "stage"},
                "exception": {"exception", "error_code", "cr2"},
                "completes": {"completes", "regs"}}


class VectorError(ValueError):
    """A vector file ringminus cannot use; the message names the file and the problem."""


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
class Vector:
    name: str
    source: str
    mode: str
    cpl: int
    profile: str
    code: bytes | None
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


def _int(value, where: str) -> int:
    if isinstance(value, bool):
        raise VectorError(f"{where}: expected a number, not {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value, 0)
        except ValueError:
            pass
    raise VectorError(f"{where}: expected a number, not {value!r}")


def _unknown(table: dict, allowed, where: str) -> None:
    extra = sorted(set(table) - set(allowed))
    if extra:
        raise VectorError(f"{where}: unknown key {extra[0]!r}")


def _outcome(table: dict, where: str) -> Outcome:
    if not isinstance(table, dict):
        raise VectorError(f"{where}: an outcome is a table")
    kinds = [k for k in OUTCOME_KEYS if k in table]
    if len(kinds) != 1:
        raise VectorError(f"{where}: an outcome has exactly one of vmexit, exception, completes")
    kind = kinds[0]
    _unknown(table, OUTCOME_KEYS[kind], where)
    fields: dict = {}
    if kind == "vmexit":
        try:
            fields["vmexit"] = int(parse_exit(str(table["vmexit"])))
        except ValueError as e:
            raise VectorError(f"{where}: {e}") from None
        for key in ("info1", "info2"):
            if key in table:
                fields[key] = _int(table[key], f"{where}.{key}")
        if "next_rip" in table:
            value = table["next_rip"]
            fields["next_rip"] = value if isinstance(value, str) and value.startswith("+") else _int(value, f"{where}.next_rip")
            if isinstance(fields["next_rip"], str):
                _int(value[1:], f"{where}.next_rip")
        if "stage" in table:
            if table["stage"] not in Stage.__members__:
                raise VectorError(f"{where}.stage: one of {', '.join(Stage.__members__)}")
            fields["stage"] = table["stage"]
    elif kind == "exception":
        fields["exception"] = _int(table["exception"], f"{where}.exception")
        for key in ("error_code", "cr2"):
            if key in table:
                fields[key] = _int(table[key], f"{where}.{key}")
    else:
        if table["completes"] is not True:
            raise VectorError(f"{where}.completes: must be true")
        fields["completes"] = True
        if "regs" in table:
            fields["regs"] = _registers(table["regs"], f"{where}.regs")
    return Outcome(kind, fields)


def _registers(table, where: str) -> dict:
    if not isinstance(table, dict):
        raise VectorError(f"{where}: a table of registers")
    _unknown(table, REGISTERS, where)
    return {name: _int(value, f"{where}.{name}") for name, value in table.items()}


def _ports(items, where: str) -> tuple[tuple[int, int], ...]:
    ranges = []
    for item in items:
        if isinstance(item, str) and "-" in item:
            low, high = (_int(x, where) for x in item.split("-", 1))
        else:
            low = high = _int(item, where)
        if not 0 <= low <= high <= 0xFFFF:
            raise VectorError(f"{where}: bad port range {item!r}")
        ranges.append((low, high))
    return tuple(ranges)


def parse_vector(table: dict, source: str, index: int) -> Vector:
    where = f"{source}: vector {index + 1}"
    if not isinstance(table, dict):
        raise VectorError(f"{where}: not a table")
    _unknown(table, VECTOR_KEYS, where)
    name = table.get("name")
    if not isinstance(name, str) or not name:
        raise VectorError(f"{where}: needs a name")
    where = f"{source}: {name}"
    mode = table.get("mode")
    if mode not in MODES:
        raise VectorError(f"{where}: mode must be one of {', '.join(MODES)}")
    cpl = _int(table.get("cpl", 0), f"{where}.cpl")
    if cpl not in (0, 3) or (cpl == 3 and mode == "real"):
        raise VectorError(f"{where}: cpl must be 0, or 3 in protected/long mode")
    profile = table.get("profile", "kvm")
    if profile not in PROFILES:
        raise VectorError(f"{where}: unknown profile {profile!r}")
    if ("code" in table) == ("asm" in table):
        raise VectorError(f"{where}: needs exactly one of code and asm")
    code = None
    if "code" in table:
        try:
            code = bytes.fromhex(str(table["code"]))
        except ValueError:
            raise VectorError(f"{where}.code: not hex bytes") from None
    try:
        intercepts = tuple(int(parse_exit(str(n))) for n in table.get("intercepts", []))
    except ValueError as e:
        raise VectorError(f"{where}.intercepts: {e}") from None
    exceptions = tuple(_int(v, f"{where}.exceptions") for v in table.get("exceptions", []))
    if any(not 0 <= v <= 31 for v in exceptions):
        raise VectorError(f"{where}.exceptions: vectors are 0-31")
    msrpm = []
    for entry in table.get("msrpm", []):
        if not isinstance(entry, dict):
            raise VectorError(f"{where}.msrpm: entries are {{msr, read, write}} tables")
        _unknown(entry, ("msr", "read", "write"), f"{where}.msrpm")
        msrpm.append((_int(entry.get("msr"), f"{where}.msrpm.msr"), bool(entry.get("read", False)),
                      bool(entry.get("write", False))))
    memory = table.get("memory", {})
    if not isinstance(memory, dict):
        raise VectorError(f"{where}.memory: a table")
    _unknown(memory, ("not_present", "bytes"), f"{where}.memory")
    if memory.get("not_present") and mode == "real":
        raise VectorError(f"{where}.memory.not_present: needs protected or long mode")
    placed = []
    for entry in memory.get("bytes", []):
        if not isinstance(entry, dict):
            raise VectorError(f"{where}.memory.bytes: entries are {{address, hex}} tables")
        _unknown(entry, ("address", "hex"), f"{where}.memory.bytes")
        try:
            placed.append((_int(entry.get("address"), f"{where}.memory.bytes.address"), bytes.fromhex(entry["hex"])))
        except (KeyError, ValueError, TypeError):
            raise VectorError(f"{where}.memory.bytes: needs hex bytes") from None
    expect_table = table.get("expect")
    if not isinstance(expect_table, dict) or not expect_table:
        raise VectorError(f"{where}: needs an expect table")
    if set(expect_table) <= set(PROFILES):
        expect = {p: _outcome(t, f"{where}.expect.{p}") for p, t in expect_table.items()}
    else:
        expect = {"*": _outcome(expect_table, f"{where}.expect")}
    return Vector(name, source, mode, cpl, profile, code, table.get("asm"), intercepts, exceptions,
                  _ports(table.get("iopm", []), f"{where}.iopm"), tuple(msrpm),
                  _registers(table.get("regs", {}), f"{where}.regs"),
                  tuple(_int(a, f"{where}.memory.not_present") for a in memory.get("not_present", [])),
                  tuple(placed), expect)


def load_vectors(path: Path) -> list[Vector]:
    try:
        document = tomllib.loads(path.read_text())
    except OSError as e:
        raise VectorError(f"cannot read {path}: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise VectorError(f"{path}: not valid TOML ({e})") from None
    _unknown(document, ("vector",), str(path))
    tables = document.get("vector")
    if not isinstance(tables, list) or not tables:
        raise VectorError(f"{path}: holds no [[vector]] tables")
    return [parse_vector(t, str(path), i) for i, t in enumerate(tables)]


def collect(paths: list[str]) -> list[Vector]:
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
