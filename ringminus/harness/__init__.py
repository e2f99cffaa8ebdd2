"""The nested-intercept harness: vector files (TOML), a runner, and a report."""
from .runner import Result, run_vector
from .vectors import Vector, VectorError, collect, load_vectors

__all__ = ["Result", "Vector", "VectorError", "collect", "load_vectors", "run_vector"]
