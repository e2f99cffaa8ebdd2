"""Exception vectors, their classes, and the Python signals for a fault raised while ringminus
itself performs an access on the guest's behalf (event delivery, emulated instructions):
an architectural exception, or a second translation stage's refusal."""
from __future__ import annotations

from enum import IntEnum


class Vector(IntEnum):
    DE = 0
    DB = 1
    NMI = 2
    BP = 3
    OF = 4
    BR = 5
    UD = 6
    NM = 7
    DF = 8
    TS = 10
    NP = 11
    SS = 12
    GP = 13
    PF = 14
    MF = 16
    AC = 17
    MC = 18
    XM = 19
    VE = 20
    CP = 21
    SX = 30


# Exceptions that push an error code (in protected and long mode).
PUSHES_ERROR_CODE = frozenset({Vector.DF, Vector.TS, Vector.NP, Vector.SS, Vector.GP, Vector.PF,
                               Vector.AC, Vector.CP, Vector.SX})
# Double-fault classes (SDM Vol. 3 Table 6-4 / APM §8.2.9).
CONTRIBUTORY = frozenset({Vector.DE, Vector.TS, Vector.NP, Vector.SS, Vector.GP})


class GuestFault(Exception):
    """An architectural exception raised by ringminus's own accesses; it never leaves the
    emulator — the machine turns it into a delivered exception (or #DF / shutdown)."""

    def __init__(self, vector: int, error_code: int | None = None, cr2: int | None = None):
        super().__init__(f"guest fault {vector}" + ("" if error_code is None else f"({error_code:#x})"))
        self.vector = vector
        self.error_code = error_code
        self.cr2 = cr2


def gp(error_code: int = 0) -> GuestFault:
    """#GP(error_code), as a check or an executor raises it."""
    return GuestFault(Vector.GP, error_code)


def ud() -> GuestFault:
    return GuestFault(Vector.UD)


class SecondStageFault(Exception):
    """A guest-physical address that a second translation stage refuses (SVM nested paging's
    #NPF): not an exception the guest sees — the hypervisor that owns the stage takes it as an
    exit (the gate's ``second_stage_exit``).  ``info`` is the stage's fault description (for
    SVM, EXITINFO1), ``address`` the guest-physical address."""

    def __init__(self, info: int, address: int):
        super().__init__(f"second-stage fault at guest-physical {address:#x} ({info:#x})")
        self.info = info
        self.address = address
