"""The ``ringminus`` command: ``fuzz …`` goes to the fuzz runner (which itself drives the
CLI: its ``inputs`` campaign), everything else to the CLI."""
from __future__ import annotations

import sys

from . import cli


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["fuzz"]:
        from .fuzz import runner                # only for fuzzing: start-up time
        return cli.guarded(lambda: runner.main(argv[1:]))
    return cli.main(argv)
