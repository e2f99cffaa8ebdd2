"""The nested-intercept harness: vector files (TOML), a runner, and a report.  ``via`` says
who plays L1: ringminus from Python (host), a generated in-guest hypervisor (guest), or both."""
from .runner import VIAS, Result, run_vector
from .vectors import TestVector, VectorError, collect, load_vectors

__all__ = ["VIAS", "Result", "TestVector", "VectorError", "collect", "load_vectors", "run_vector"]
