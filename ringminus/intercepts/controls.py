"""What L1 intercepts: the intercept vector (bit number = exit code, §A.9), whose word 2 is
the exception-intercept bitmap, the 12 KiB I/O permission map and the 8 KiB MSR permission
map, as numpy bit arrays in the APM's layouts (§A.5, §A.6)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..arch.exitcodes import ExitCode

IOPM_BYTES = 12 * 1024
MSRPM_BYTES = 8 * 1024
IOPM_PORT_BITS = 0x10000 + 3          # the three tail bits serve wide accesses at 0xFFFD-0xFFFF
MSR_RANGES = ((0x0000_0000, 0x000), (0xC000_0000, 0x800), (0xC001_0000, 0x1000))  # (first MSR, byte offset)
MSR_RANGE_SIZE = 0x2000
EXCEPTION_BASE = 0x040
LAST_INTERCEPT_BIT = 0x0A6


def msrpm_bit(msr: int, write: bool) -> int | None:
    """The MSRPM bit of ``msr`` (read bit, or write bit = read bit + 1); None outside all
    three ranges, where an MSR access always exits (APM §15.11)."""
    for first, byte_offset in MSR_RANGES:
        if first <= msr < first + MSR_RANGE_SIZE:
            return byte_offset * 8 + (msr - first) * 2 + int(write)
    return None


@dataclass
class InterceptControls:
    vector: int = 0                 # bit n set = exit code n is intercepted
    iopm: np.ndarray = field(default_factory=lambda: np.zeros(IOPM_BYTES, dtype=np.uint8))
    msrpm: np.ndarray = field(default_factory=lambda: np.zeros(MSRPM_BYTES, dtype=np.uint8))
    # Read from a guest hypervisor's VMCB: where its maps lie (guest physical), which the
    # maps above then show as they are in its memory (svm/world.py bind_maps).
    iopm_address: int | None = None
    msrpm_address: int | None = None

    def set(self, *codes: int) -> None:
        for code in codes:
            if not 0 <= code <= LAST_INTERCEPT_BIT:
                raise ValueError(f"exit code {code:#x} has no intercept bit")
            self.vector |= 1 << code

    def clear(self, *codes: int) -> None:
        for code in codes:
            self.vector &= ~(1 << code)

    def set_all(self) -> None:
        self.vector = (1 << (LAST_INTERCEPT_BIT + 1)) - 1

    def __contains__(self, code: int) -> bool:
        return 0 <= code <= LAST_INTERCEPT_BIT and bool(self.vector >> code & 1)

    @property
    def exception_bitmap(self) -> int:
        return (self.vector >> EXCEPTION_BASE) & 0xFFFF_FFFF

    def intercept_exception(self, *vectors: int) -> None:
        self.set(*(EXCEPTION_BASE + v for v in vectors))

    # -- I/O permission map ----------------------------------------------------------------
    def set_ports(self, first: int, last: int | None = None) -> None:
        last = first if last is None else last
        if not 0 <= first <= last <= 0xFFFF:
            raise ValueError(f"bad port range {first:#x}-{last:#x}")
        bits = np.unpackbits(self.iopm, bitorder="little")
        bits[first:last + 1] = 1
        self.iopm[:] = np.packbits(bits, bitorder="little")

    def port_intercepted(self, port: int, size: int) -> bool:
        """Any of the bits port .. port+size-1 set (the tail bits, not port 0, past 0xFFFF)."""
        if ExitCode.IOIO not in self:
            return False
        bits = np.unpackbits(self.iopm[port // 8:(port + size - 1) // 8 + 1], bitorder="little")
        return bool(bits[port % 8:port % 8 + size].any())

    # -- MSR permission map ----------------------------------------------------------------
    def set_msr(self, msr: int, read: bool = True, write: bool = True) -> None:
        for is_write, wanted in ((False, read), (True, write)):
            bit = msrpm_bit(msr, is_write)
            if bit is None:
                raise ValueError(f"MSR {msr:#x} is outside the MSRPM ranges (always intercepted)")
            if wanted:
                self.msrpm[bit // 8] |= 1 << (bit % 8)

    def msr_intercepted(self, msr: int, write: bool) -> bool:
        if ExitCode.MSR not in self:
            return False
        bit = msrpm_bit(msr & 0xFFFF_FFFF, write)
        return True if bit is None else bool(self.msrpm[bit // 8] >> (bit % 8) & 1)

    @classmethod
    def of(cls, codes=(), exceptions=(), ports=(), msrs=()) -> "InterceptControls":
        """Controls as a user states them (the CLI's options, a vector file's keys): exit
        codes (or "all"), exception vectors, I/O port ranges (``(first, last)``: IOIO
        intercepted, those ports set in the IOPM) and MSR permissions (``(msr, read,
        write)``: MSR intercepted, those bits set in the MSRPM)."""
        controls = cls()
        for code in codes:
            if code == "all":
                controls.set_all()
            else:
                controls.set(code)
        controls.intercept_exception(*exceptions)
        if ports:
            controls.set(ExitCode.IOIO)
        for first, last in ports:
            controls.set_ports(first, last)
        if msrs:
            controls.set(ExitCode.MSR)
        for msr, read, write in msrs:
            controls.set_msr(msr, read, write)
        return controls
