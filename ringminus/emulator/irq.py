"""Interrupt lines: the wire from a device to an interrupt controller.  A device raises and
lowers its line (level) or pulses it (edge); whatever the line is connected to turns the
level into an interrupt.  Until a platform supplies a controller, ``Core.interrupt_line``
connects a line straight to ``raise_intr(vector)`` on each rising edge."""
from __future__ import annotations

from typing import Callable, Protocol


class InterruptLine:
    def __init__(self, name: str, sink: Callable[[bool], None] | None = None):
        self.name = name
        self.level = False
        self._sink = sink

    def connect(self, sink: Callable[[bool], None]) -> None:
        """``sink(level)`` is called at every change of the line's level."""
        self._sink = sink

    def set(self, level: bool) -> None:
        if level != self.level:
            self.level = level
            if self._sink is not None:
                self._sink(level)

    def raise_(self) -> None:
        self.set(True)

    def lower(self) -> None:
        self.set(False)

    def pulse(self) -> None:
        """An edge: up, then down."""
        self.set(True)
        self.set(False)


class InterruptController(Protocol):
    """What drives the CPU's INTR pin (``Core.add_interrupt_controller``): a PIC, or a local
    APIC in front of one.  ``intr_pending()`` is the pin now (masks, priorities and the
    controller's own state applied); ``acknowledge()`` is the INTA cycle: the vector, which
    the controller then counts as in service (None: nothing after all — the CPU takes no
    interrupt).  A controller whose output rises calls ``Core.interrupt_raised()``."""

    def intr_pending(self) -> bool: ...

    def acknowledge(self) -> int | None: ...
