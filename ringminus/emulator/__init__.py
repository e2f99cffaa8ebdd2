"""The core: Unicorn, guest memory, boot states, loaders, ports, event delivery, the run loop,
and what features attach to it (plugins.py).  It imports no feature."""
from ..arch.exceptions import Vector
from .boot import BootState
from .delivery import Event, EventKind
from .loader import ImageError, parse_elf, parse_flat
from .machine import Core
from .result import RunResult, Stop, StopReason

__all__ = ["BootState", "Core", "Event", "EventKind", "ImageError", "RunResult", "Stop", "StopReason",
           "Vector", "parse_elf", "parse_flat"]
