"""Pytest fixtures and hooks only; plain helpers are in helpers.py."""
from __future__ import annotations

import pytest

from .helpers import asm


@pytest.fixture
def assemble():
    return asm
