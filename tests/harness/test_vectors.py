"""Every shipped vector, under every profile: the harness must report PASS (or SKIP where a
vector has no outcome for that profile)."""
from pathlib import Path

import pytest

from ringminus.harness import collect, run_vector
from ringminus.intercepts.profiles import PROFILES

VECTORS = collect([str(Path(__file__).parents[1] / "vectors")])


def test_vector_names_are_unique():
    names = [v.name for v in VECTORS]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("profile", sorted(PROFILES))
@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: v.name)
def test_vector(vector, profile):
    result = run_vector(vector, profile)
    assert result.status in ("PASS", "SKIP"), result.line()
