"""The nested-intercept harness: vector files (TOML), a runner, and a report.  ``via`` says
who plays L1: ringminus from Python (host), a generated in-guest hypervisor (guest), or both.
The runner and the vector reader load on first use (PEP 562): ``ringminus run`` never needs
them, and its start-up time counts."""
from importlib import import_module

VIAS = ("host", "guest", "both")
_LAZY = {"Result": "runner", "run_vector": "runner", "TestVector": "vectors", "VectorError": "vectors",
         "collect": "vectors", "load_vectors": "vectors"}

__all__ = ["VIAS", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
