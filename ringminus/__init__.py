"""ringminus: an instruction-level x86 emulator for SVM intercepts (ring -1) and System
Management Mode (ring -2), with Unicorn executing guest code."""
from .emulator import BootState, Event, EventKind, RunResult, Stop, StopReason, Vector
from .machine import Machine
from .hypercalls import (Hypercall, HypercallAction, HypercallFilter, HypercallFilterBusyError,
                         HypercallFilterError, HypercallHandlerError, HypercallRange,
                         InvalidHypercallRangeError, OverlappingHypercallRangeError)

__version__ = "0.1.0"
__all__ = ["BootState", "Event", "EventKind", "Hypercall", "HypercallAction", "HypercallFilter",
           "HypercallFilterBusyError", "HypercallFilterError", "HypercallHandlerError", "HypercallRange",
           "InvalidHypercallRangeError", "Machine", "OverlappingHypercallRangeError", "RunResult", "Stop",
           "StopReason", "Vector", "__version__"]
