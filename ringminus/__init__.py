"""ringminus: an instruction-level x86 emulator for SVM intercepts (ring -1) and System
Management Mode (ring -2), with Unicorn executing guest code."""
from .emulator import (BootState, Event, EventKind, Machine, RunResult, Stop, StopReason,
                       Vector)

__version__ = "0.1.0"
__all__ = ["BootState", "Event", "EventKind", "Machine", "RunResult", "Stop", "StopReason",
           "Vector", "__version__"]
