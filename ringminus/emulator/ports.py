"""The port-I/O bus and its built-in devices: the debug console and the exit device."""
from __future__ import annotations

import inspect
from collections import Counter
from typing import Callable, Iterable, NamedTuple, Protocol

from .cpu import At
from ..arch.control import RFLAGS_VM
from .memory import UnbackedMemory
from ..arch.exceptions import GuestFault, SecondStageFault

DEBUGCON_PORT = 0xE9      # Bochs / QEMU debugcon
EXIT_PORT = 0xF4          # QEMU isa-debug-exit as commonly configured (iobase=0xf4)



class IoAccess(NamedTuple):
    """The I/O instruction performing a port access (``Core.io_access`` while a device sees
    it): its RIP and RCX/RSI/RDI before it ran.  SMM's I/O-instruction SMIs record it."""
    registers: tuple[int, int, int, int]
    port: int
    read: bool
    size: int = 1
    string: bool = False
    repeat: bool = False

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

    def __init__(self, on_output: Callable[[], None] | None = None):
        self.output = bytearray()
        self.on_output = on_output

    def read(self, port: int, size: int) -> int:
        return 0xE9

    def write(self, port: int, size: int, value: int) -> None:
        self.output += (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        if self.on_output is not None:
            self.on_output()


class ExitDevice:
    """``out EXIT_PORT, al`` ends the run at once with reason ``exit`` and value AL."""
    precise = True

    def __init__(self, on_exit: Callable[[int], None]):
        self._on_exit = on_exit

    def read(self, port: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, port: int, size: int, value: int) -> None:
        self._on_exit(value)


def _takes(function: Callable, *arguments) -> bool:
    """Whether ``function`` can be called with these positional arguments (True when Python
    cannot tell, e.g. for some builtins)."""
    try:
        inspect.signature(function).bind(*arguments)
    except TypeError:
        return False
    except ValueError:
        return True
    return True


PARAMETERS = ("port", "size", "value")
CALLS = {"read": (0, 1), "write": (0, 1, 0)}          # how the bus calls a device: sample arguments


def _check_device(device) -> None:
    """What the bus calls on a device: read(port, size), write(port, size, value), precise."""
    for method, arguments in CALLS.items():
        function = getattr(device, method, None)
        if not callable(function):
            raise TypeError(f"port device {device!r} has no {method}() method")
        if not _takes(function, *arguments):
            raise TypeError(f"port device {device!r}: {method}() must take ({', '.join(PARAMETERS[:len(arguments)])})")
    if not isinstance(getattr(device, "precise", None), bool):
        raise TypeError(f"port device {device!r} needs a bool attribute 'precise' "
                        "(True: an access stops the guest exactly at the instruction)")


def _port_list(ports) -> list[int]:
    if isinstance(ports, bool):
        raise TypeError(f"ports must be a port number or an iterable of them, not {ports!r}")
    if isinstance(ports, int):
        ports = [ports]
    try:
        ports = list(ports)
    except TypeError:
        raise TypeError(f"ports must be a port number or an iterable of them, not {ports!r}") from None
    if not ports:
        raise ValueError("no ports to claim")
    for port in ports:
        if not isinstance(port, int) or isinstance(port, bool):
            raise TypeError(f"a port is a number, not {port!r}")
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"port {port:#x} is outside 0-0xffff")
    if len(set(ports)) != len(ports):
        raise ValueError("the same port is claimed twice in one registration")
    return ports


class PortBus:
    def __init__(self):
        self._devices: dict[int, PortDevice] = {}
        self._shadowed: dict[int, list[PortDevice]] = {}    # port -> claims an overlay hides, oldest first
        self.stats = Counter()
        self.unclaimed = Counter()

    def register(self, ports: int | Iterable[int], device: PortDevice | None = None, *,
                 read: Callable[[int, int], int] | None = None,
                 write: Callable[[int, int, int], None] | None = None, precise: bool = False,
                 overlay: bool = False) -> PortDevice:
        """Claim ``ports`` for ``device`` (or for the ``read``/``write`` callables).

        Everything the bus will call is checked here, so a device that lacks it fails at
        registration (TypeError), not in the middle of a run; a port outside 0-0xFFFF or one
        that is already claimed is a ValueError.  ``overlay`` claims over an existing device
        instead (a decoder moved over another one, as a guest can move a chipset's I/O base):
        the new device answers until it is unregistered, and the one below comes back."""
        if device is None:
            for name, function in (("read", read), ("write", write)):
                if function is not None and not (callable(function) and _takes(function, *CALLS[name])):
                    raise TypeError(f"{name} must be a callable taking ({', '.join(PARAMETERS[:len(CALLS[name])])}), "
                                    f"not {function!r}")
            if not isinstance(precise, bool):
                raise TypeError(f"precise must be True or False, not {precise!r}")
            device = FunctionDevice(read, write, precise)
        elif read is not None or write is not None:
            raise TypeError("give a device or read/write callables, not both")
        _check_device(device)
        ports = _port_list(ports)
        if not overlay:
            for port in ports:
                if port in self._devices:
                    raise ValueError(f"cannot claim port {port:#x} for {type(device).__name__}: "
                                     f"{type(self._devices[port]).__name__} claims it")
        for port in ports:
            if port in self._devices:
                self._shadowed.setdefault(port, []).append(self._devices[port])
            self._devices[port] = device
        return device

    def unregister(self, port: int) -> None:
        """Drop the newest claim on ``port``; a claim it overlaid answers again."""
        if self._devices.pop(port, None) is not None and self._shadowed.get(port):
            self._devices[port] = self._shadowed[port].pop()

    def movable_block(self, size: int, read: Callable[[int, int], int],
                      write: Callable[[int, int, int], None]) -> Callable[[int | None], None]:
        """A block of ``size`` ports whose base the guest moves (an I/O BAR): returns the
        function that places it at a base (None: nowhere), claimed over what is there.
        ``read(offset, size)`` and ``write(offset, size, value)`` get offsets in the block; a
        base where the block would pass port 0xFFFF decodes nothing."""
        placed: list[int] = []

        def place(base: int | None) -> None:
            for port in placed:
                self.unregister(port)
            placed.clear()
            if base is not None and base + size <= 0x10000:
                placed.extend(range(base, base + size))
                self.register(placed, read=lambda port, width: read(port - base, width),
                              write=lambda port, width, value: write(port - base, width, value), overlay=True)
        return place

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
    except (GuestFault, SecondStageFault, UnbackedMemory):
        return False
    return not (bits >> (port & 7)) & ((1 << size) - 1)
