"""Scaffolding the benchmark scripts share: the import path, keystone, fresh machines and bare
Unicorns set up outside the timed region, best-of-N, the command line, and the JSON file.

Run a benchmark as ``python benchmarks/X.py``: its directory is then first on ``sys.path``, so
``import common`` finds this module, which puts the repository root there for ``ringminus``
(or the tree ``RINGMINUS_TREE`` names: compare.py measures another commit with these scripts).
"""
import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.environ.get("RINGMINUS_TREE") or str(Path(__file__).resolve().parents[1]))

import unicorn  # noqa: E402
from keystone import KS_ARCH_X86, KS_MODE_16, KS_MODE_32, KS_MODE_64, Ks  # noqa: E402
from unicorn import UC_ARCH_X86, UC_MODE_32, UC_MODE_64, UC_PROT_ALL, Uc  # noqa: E402
from unicorn.x86_const import UC_X86_REG_RSP  # noqa: E402

from ringminus import Machine  # noqa: E402

UNICORN_VERSION = unicorn.__version__
_KS_MODES = {16: KS_MODE_16, 32: KS_MODE_32, 64: KS_MODE_64}
_UC_MODES = {32: UC_MODE_32, 64: UC_MODE_64}


def assemble(source: str, address: int = 0, bits: int = 64) -> bytes:
    """``source`` assembled by keystone as ``bits``-bit code at ``address``."""
    encoding, _ = Ks(KS_ARCH_X86, _KS_MODES[bits]).asm(source, address)
    return bytes(encoding)


def booted_machine(code: bytes, address: int, boot: str = "long", **machine_args) -> Machine:
    """A fresh ``Machine(**machine_args)`` with ``code`` at ``address``, booted into ``boot`` there."""
    machine = Machine(**machine_args)
    machine.write_memory(address, code)
    machine.boot(boot, address)
    return machine


def bare_uc(code: bytes, address: int, memory: int, bits: int = 64, rsp: int | None = None) -> Uc:
    """A bare Unicorn: ``memory`` bytes mapped at 0 (all permissions), ``code`` at ``address``,
    RSP set if ``rsp`` is given."""
    uc = Uc(UC_ARCH_X86, _UC_MODES[bits])
    uc.mem_map(0, memory, UC_PROT_ALL)
    uc.mem_write(address, code)
    if rsp is not None:
        uc.reg_write(UC_X86_REG_RSP, rsp)
    return uc


def fastest(function, repeat: int, key=None):
    """The smallest of ``repeat`` results of ``function()`` (by ``key`` if given): the first
    such result on a tie, as ``min`` gives it."""
    return min((function() for _ in range(repeat)), key=key)


# -- the command line and the output ------------------------------------------------------------
def make_parser(doc: str) -> argparse.ArgumentParser:
    """A parser described by the first line of ``doc``, with ``--json FILE``."""
    result = argparse.ArgumentParser(description=doc.splitlines()[0])
    result.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    return result


def add_repeat(parser: argparse.ArgumentParser, per: str = "configuration") -> None:
    parser.add_argument("--repeat", type=int, default=3, help=f"timed runs per {per} (default 3)")


def require_positive(parser: argparse.ArgumentParser, args: argparse.Namespace, *names: str) -> None:
    """A usage error unless each option in ``names`` (dests: "exits", "repeat"...) is at least 1."""
    if any(getattr(args, name) < 1 for name in names):
        options = [f"--{name}" for name in names]
        listed = options[0] if len(options) == 1 else ", ".join(options[:-1]) + " and " + options[-1]
        parser.error(f"{listed} must be at least 1")


def banner(*details: str) -> None:
    """The first line of a report: the Unicorn version, then ``details``."""
    print(", ".join((f"unicorn {UNICORN_VERSION}", *details)))


def table_header(header: str) -> None:
    print(header)
    print("-" * len(header))


def write_json(path: str | None, results) -> None:
    """``results`` as indented JSON in ``path``; nothing without a path (no --json)."""
    if path:
        Path(path).write_text(json.dumps(results, indent=2) + "\n")
