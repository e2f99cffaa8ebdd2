"""The machine: Unicorn, guest memory, boot states, loaders, ports, event delivery, run loop."""
from .boot import BootState
from .delivery import Event, EventKind
from .loader import ImageError, parse_elf, parse_flat
from .machine import Machine
from .result import RunResult, Stop, StopReason
from ..arch.exceptions import Vector

__all__ = ["BootState", "Event", "EventKind", "ImageError", "Machine", "RunResult", "Stop",
           "StopReason", "Vector", "parse_elf", "parse_flat"]
