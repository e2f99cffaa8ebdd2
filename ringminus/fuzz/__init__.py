"""ringminus fuzzes itself: seeded, time-bounded, replayable campaigns (issue 11).

A campaign is a module ``ringminus.fuzz.<name>`` with ``one_run(seed: int) -> None``.  It
builds everything from ``random.Random(seed)`` — the same seed is the same run — and raises
``Finding(kind, message)`` for a contract violation it detects; any other exception that
escapes is an escaped exception (kind ``exception``).  ``runner.main`` drives the campaigns
(``ringminus fuzz CAMPAIGN …`` or ``python -m ringminus.fuzz CAMPAIGN …``).

Campaign modules are imported lazily, by name, so a campaign that is not there yet (or does
not import) is reported by the runner instead of breaking the others.
"""
from __future__ import annotations

import importlib
from types import ModuleType

# The contract a finding breaks (issue 11): a Python exception out of the emulator, SMRAM
# seen where it must not be, a replay that differs, two L1s that disagree, or any other
# broken promise of the API (a stop reason that lies, a result that is not JSON, …).
KINDS = ("exception", "isolation", "replay", "disagreement", "contract")

CAMPAIGNS = ("streams", "savemap", "smram", "inputs", "viaboth", "replay")


class Finding(Exception):
    """A contract violation a campaign detected: ``kind`` (one of KINDS), a one-line
    ``message`` and, optionally, the ``key`` that names its class for triage."""

    def __init__(self, kind: str, message: str, key: str | None = None):
        if kind not in KINDS:
            raise ValueError(f"finding kind {kind!r} is not one of {', '.join(KINDS)}")
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message
        self.key = key          # what makes two findings one class (default: the message, numbers elided)


class CampaignMissing(Exception):
    """A campaign name the runner cannot load: unknown, or its module missing or broken."""


def load(name: str) -> ModuleType:
    """The campaign module ``ringminus.fuzz.<name>``, which must define ``one_run(seed)``."""
    if name not in CAMPAIGNS:
        raise CampaignMissing(f"unknown campaign {name!r} (one of {', '.join(CAMPAIGNS)}, or all)")
    module_name = f"{__name__}.{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as missing:
        if missing.name != module_name:
            raise CampaignMissing(f"campaign {name!r} does not import: {missing}") from missing
        raise CampaignMissing(f"campaign {name!r} is not available: no module {module_name}") from None
    except Exception as broken:                      # a syntax error, say: report it, run the rest
        raise CampaignMissing(f"campaign {name!r} does not import: {type(broken).__name__}: {broken}") from broken
    if not callable(getattr(module, "one_run", None)):
        raise CampaignMissing(f"campaign {name!r}: {module_name} defines no one_run(seed)")
    return module


__all__ = ["CAMPAIGNS", "KINDS", "CampaignMissing", "Finding", "load"]
