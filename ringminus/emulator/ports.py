"""The port-I/O bus and its built-in devices: the debug console and the exit device."""
from __future__ import annotations

from collections import Counter
from typing import Callable, Iterable, Protocol

from .cpu import RFLAGS_VM, At
from .memory import UnbackedMemory
from .vectors import GuestFault

DEBUGCON_PORT = 0xE9      # Bochs / QEMU debugcon
EXIT_PORT = 0xF4          # QEMU isa-debug-exit as commonly configured (iobase=0xf4)


class PortDevice(Protocol):
    #: True when an access must stop the guest exactly at the instruction (the access is then
    #: performed by ringminus, never by Unicorn, so no later instruction runs).
    precise: bool

    def read(self, port: int, size: int) -> int: ...

    def write(self, port: int, size: int, value: int) -> None: ...


class FunctionDevice:
    """Wraps plain callables: ``read(port, size) -> int`` and ``write(port, size, value)``."""

    def __init__(self, read: Callable[[int, int], int] | None = None,
                 write: Callable[[int, int, int], None] | None = None, precise: bool = False):
        self._read, self._write, self.precise = read, write, precise

    def read(self, port: int, size: int) -> int:
        return self._read(port, size) if self._read else (1 << (8 * size)) - 1

    def write(self, port: int, size: int, value: int) -> None:
        if self._write:
            self._write(port, size, value)


class DebugConsole:
    """Bytes written are the run's console output; reads return 0xE9 as Bochs/QEMU do."""
    precise = False

    def __init__(self):
        self.output = bytearray()

    def read(self, port: int, size: int) -> int:
        return 0xE9

    def write(self, port: int, size: int, value: int) -> None:
        self.output += (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")


class ExitDevice:
    """``out EXIT_PORT, al`` ends the run at once with reason ``exit`` and value AL."""
    precise = True

    def __init__(self, on_exit: Callable[[int], None]):
        self._on_exit = on_exit

    def read(self, port: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, port: int, size: int, value: int) -> None:
        self._on_exit(value)


class PortBus:
    def __init__(self):
        self._devices: dict[int, PortDevice] = {}
        self.stats = Counter()
        self.unclaimed = Counter()

    def register(self, ports: int | Iterable[int], device: PortDevice | None = None, *,
                 read: Callable[[int, int], int] | None = None,
                 write: Callable[[int, int, int], None] | None = None, precise: bool = False) -> PortDevice:
        """Claim ``ports`` for ``device`` (or for the ``read``/``write`` callables)."""
        device = device or FunctionDevice(read, write, precise)
        for port in ([ports] if isinstance(ports, int) else ports):
            if not 0 <= port <= 0xFFFF:
                raise ValueError(f"port {port:#x} is outside 0-0xffff")
            self._devices[port] = device
        return device

    def unregister(self, port: int) -> None:
        self._devices.pop(port, None)

    def device(self, port: int) -> PortDevice | None:
        return self._devices.get(port)

    def is_precise(self, port: int) -> bool:
        device = self._devices.get(port)
        return bool(device and device.precise)

    def read(self, port: int, size: int) -> int:
        self.stats["port_reads"] += 1
        device = self._devices.get(port)
        if device is None:
            self.unclaimed[port] += 1
            self.stats["unclaimed_port_reads"] += 1
            return (1 << (8 * size)) - 1
        return device.read(port, size) & ((1 << (8 * size)) - 1)

    def write(self, port: int, size: int, value: int) -> None:
        self.stats["port_writes"] += 1
        device = self._devices.get(port)
        if device is None:
            self.unclaimed[port] += 1
            self.stats["unclaimed_port_writes"] += 1
            return
        device.write(port, size, value & ((1 << (8 * size)) - 1))


def io_permitted(state, linear, port: int, size: int) -> bool:
    """The protected-mode I/O permission check on the registers in ``state`` (an ArchState):
    CPL <= IOPL (outside virtual-8086 mode), or the TSS I/O bitmap clears every bit of the
    access (APM §8.2.10 "I/O permission")."""
    if not state.protected:
        return True
    rflags = state[At.rflags]
    if state.cpl <= (rflags >> 12) & 3 and not rflags & RFLAGS_VM:
        return True
    tr = state.segment("tr")
    if not tr.present or tr.type not in (0x9, 0xB) or tr.limit < 103:
        return False
    try:
        bitmap = linear.read_u(tr.base + 0x66, 2) + (port >> 3)
        if bitmap + 1 > tr.limit:
            return False
        bits = linear.read_u(tr.base + bitmap, 2)
    except (GuestFault, UnbackedMemory):
        return False
    return not (bits >> (port & 7)) & ((1 << size) - 1)
