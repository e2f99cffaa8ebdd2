"""The 16550A UART on COM1 (ports 0x3F8-0x3FF, ISA IRQ 4) as QEMU 7.2 builds it for
``-serial stdio``: hw/char/serial.c (serial_ioport_read/write, serial_update_irq,
serial_xmit, serial_receive1, serial_can_receive, fifo_timeout_int, serial_reset) and
hw/char/serial-isa.c; reference/platform.md §8.

Access sizes: QEMU's region is 8 ports of byte-wide handlers (``.impl.max_access_size = 1``)
with ``.valid.unaligned = 1`` (7.2's "serial: Allow unaligned i/o access"), so a word or
dword at any port is split into byte accesses at consecutive offsets, lowest first,
little-endian: ``inw 0x3FD`` reads LSR then MSR.  One that runs past 0x3FF would reach the
handlers with offset 8, where QEMU 7.2 aborts on ``assert(size == 1 && addr < 8)``; here those
bytes read 0xFF and writes to them are dropped, as for an unclaimed port.

Left out: break conditions (LSR.BI, from the host), parity/framing errors, modem-line changes
and the transmit retry path (a backend that refuses a byte)."""
from __future__ import annotations

from collections import deque
from typing import Callable

COM1_BASE = 0x3F8
REGISTERS = 8
BAUDBASE = 115_200                       # QEMU's "baudbase" default
FIFO_LENGTH = 16
NS_PER_SECOND = 1_000_000_000

LCR_DLAB = 0x80
IER_RDI, IER_THRI, IER_RLSI, IER_MSI = 0x01, 0x02, 0x04, 0x08
IIR_NO_INT, IIR_ID, IIR_FE = 0x01, 0x06, 0xC0
IIR_MSI, IIR_THRI, IIR_RDI, IIR_RLSI, IIR_CTI = 0x00, 0x02, 0x04, 0x06, 0x0C
MCR_LOOP, MCR_OUT2 = 0x10, 0x08
MSR_DCD, MSR_DSR, MSR_CTS, MSR_ANY_DELTA = 0x80, 0x20, 0x10, 0x0F
LSR_DR, LSR_OE, LSR_BI, LSR_INT_ANY, LSR_THRE, LSR_TEMT = 0x01, 0x02, 0x10, 0x1E, 0x20, 0x40
FCR_FE, FCR_RFR, FCR_XFR, FCR_STICKY = 0x01, 0x02, 0x04, 0xC9
TRIGGER_LEVELS = {0x00: 1, 0x40: 4, 0x80: 8, 0xC0: 14}      # FCR bits 7-6 -> bytes

# QEMU's SerialState registers and flags: a UART's whole state with the FIFO and the input.
FIELDS = ("divider", "rbr", "thr", "tsr", "ier", "iir", "lcr", "mcr", "lsr", "msr", "scr", "fcr",
          "recv_fifo_itl", "thr_ipending", "timeout_ipending", "char_transmit_time")


def char_transmit_time(lcr: int, divider: int) -> int | None:
    """Nanoseconds one frame takes at this LCR and divisor (serial_update_parameters);
    None where QEMU keeps the old value (a divisor of 0 or above the base rate)."""
    if divider == 0 or divider > BAUDBASE:
        return None
    frame = 1 + (lcr & 0x03) + 5 + (2 if lcr & 0x04 else 1) + (1 if lcr & 0x08 else 0)
    return NS_PER_SECOND // (BAUDBASE // divider) * frame


class Uart16550:
    """QEMU's SerialState and the functions acting on it:

    * Transmission is instant — QEMU's chardev write succeeds at once — so a byte written to
      THR (or through the transmit FIFO) is sent before the OUT completes: LSR.THRE and
      LSR.TEMT read set again, and with IER.THRI the line drops and rises again (an edge per
      byte).  Sent bytes go to ``output`` and to ``on_output(bytes)``.
    * IIR is the highest of RLSI, CTI (character timeout), RDI, THRI and MSI, with bits 7-6
      set while the FIFOs are enabled: 0xC1 nothing pending, 0xC2 THR empty.  Reading an IIR
      that says THRI clears it; turning IER.THRI on while THR is empty raises it again.
    * MCR loopback (bit 4): sent bytes are received instead, and MSR reads MCR's outputs
      (DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD).  Host input is still received, as in QEMU.
    * MSR reads 0xB0 (DCD, DSR, CTS) outside loopback and never shows a delta: a stdio
      backend has no modem lines (serial_update_msl gets -ENOTSUP and stops polling).
    * Input (``feed``) waits on the host side and enters as serial_can_receive lets the
      chardev deliver it: one byte in RBR without the FIFO, up to the trigger level with it;
      more enters when the guest reads RBR or resets the receive FIFO.  The FIFO's character
      timeout (4 character times after a byte arrives or is read) needs ``clock``.
    * The line follows every serial_update_irq; MCR.OUT2 does not gate it (QEMU has no gate).

    A port device for COM1 (``register(machine.ports)``).  ``irq``: the IRQ 4 line, an
    object with ``raise_()`` and ``lower()`` (``machine.interrupt_line("com1", ...)`` or a PIC
    input), None for none.  ``on_output(data)``: called with each byte sent (bytes of length
    1).  ``clock``: ``now_ns()``/``add_timer()`` (``machine.clock``) for the FIFO's character
    timeout.  ``feed`` and the snapshot calls belong on the machine's thread (from another
    thread, post a request that makes them)."""
    precise = False

    def __init__(self, irq=None, on_output: Callable[[bytes], None] | None = None, clock=None,
                 base: int = COM1_BASE):
        self.irq, self.on_output, self.clock, self.base = irq, on_output, clock, base
        self.output = bytearray()                # every byte sent, in order
        self.pending_input = bytearray()          # fed by the host, not yet taken by the UART
        self.recv_fifo: deque[int] = deque()
        self._timer = None
        self._timeout_at: int | None = None       # when the character timeout fires
        self.reset()

    @property
    def ports(self) -> tuple[int, ...]:
        return tuple(range(self.base, self.base + REGISTERS))

    def register(self, ports) -> "Uart16550":
        """Claim the ports on a PortBus (``machine.ports``)."""
        ports.register(self.ports, self)
        return self

    def reset(self) -> None:
        """serial_reset: 9600 baud 8N1, OUT2 set, FIFOs off and empty, nothing pending."""
        for name in FIELDS:
            setattr(self, name, 0)
        self.iir, self.lsr = IIR_NO_INT, LSR_TEMT | LSR_THRE
        self.msr, self.mcr, self.divider = MSR_DCD | MSR_DSR | MSR_CTS, MCR_OUT2, 0x0C
        self.char_transmit_time = NS_PER_SECOND // 9600 * 10
        self.recv_fifo.clear()
        self._cancel_timeout()
        self._set_irq(False)

    # -- the port bus ---------------------------------------------------------------------------
    def read(self, port: int, size: int) -> int:
        value = 0
        for i in range(size):
            offset = port - self.base + i
            byte = READ[offset](self) if 0 <= offset < REGISTERS else 0xFF
            value |= (byte & 0xFF) << (8 * i)
        return value

    def write(self, port: int, size: int, value: int) -> None:
        for i in range(size):
            offset = port - self.base + i
            if 0 <= offset < REGISTERS:
                WRITE[offset](self, (value >> (8 * i)) & 0xFF)

    # -- the host side --------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Bytes arriving on the line: they enter the UART as it can take them."""
        self.pending_input += data
        self._accept_input()

    def _accept_input(self) -> None:
        """The chardev's delivery: as many bytes as serial_can_receive allows, until it allows none."""
        while self.pending_input and (room := self._can_receive()):
            chunk = bytes(self.pending_input[:room])
            del self.pending_input[:room]
            self._receive(chunk)

    def _can_receive(self) -> int:
        if not self.fcr & FCR_FE:
            return 0 if self.lsr & LSR_DR else 1
        count = len(self.recv_fifo)
        if count >= FIFO_LENGTH:
            return 0
        # QEMU offers the bytes up to the trigger level, then one at a time (none at exactly it).
        return self.recv_fifo_itl - count if count <= self.recv_fifo_itl else 1

    def _receive(self, data: bytes) -> None:
        """serial_receive1: into the FIFO (overruns are dropped and flagged) or into RBR."""
        if self.fcr & FCR_FE:
            for byte in data:
                if len(self.recv_fifo) < FIFO_LENGTH:
                    self.recv_fifo.append(byte)
                else:
                    self.lsr |= LSR_OE
            self.lsr |= LSR_DR
            self._arm_timeout()
        else:
            if self.lsr & LSR_DR:
                self.lsr |= LSR_OE
            self.rbr = data[0]
            self.lsr |= LSR_DR
        self._update_irq()

    def _send(self, byte: int) -> None:
        self.output.append(byte)
        if self.on_output is not None:
            self.on_output(bytes((byte,)))

    # -- interrupts -----------------------------------------------------------------------------
    def _pending_interrupt(self) -> int:
        """The IIR interrupt ID by serial_update_irq's priorities (IIR_NO_INT: none)."""
        ier, lsr = self.ier, self.lsr
        if ier & IER_RLSI and lsr & LSR_INT_ANY:
            return IIR_RLSI
        if ier & IER_RDI and self.timeout_ipending:      # IER.RDI masks it: QEMU's observed hardware
            return IIR_CTI
        if ier & IER_RDI and lsr & LSR_DR and (not self.fcr & FCR_FE or len(self.recv_fifo) >= self.recv_fifo_itl):
            return IIR_RDI
        if ier & IER_THRI and self.thr_ipending:
            return IIR_THRI
        if ier & IER_MSI and self.msr & MSR_ANY_DELTA:
            return IIR_MSI
        return IIR_NO_INT

    def _update_irq(self) -> None:
        pending = self._pending_interrupt()
        self.iir = pending | (self.iir & 0xF0)
        self._set_irq(pending != IIR_NO_INT)

    def _set_irq(self, level: bool) -> None:
        if self.irq is not None:
            self.irq.raise_() if level else self.irq.lower()

    # -- the FIFO's character timeout (fifo_timeout_int) ---------------------------------------
    def _arm_timeout(self) -> None:
        if self.clock is None:
            return
        self._cancel_timeout()
        self._timeout_at = self.clock.now_ns() + 4 * self.char_transmit_time
        self._start_timer()

    def _start_timer(self) -> None:
        timer = self.clock.add_timer(max(self._timeout_at - self.clock.now_ns(), 0), lambda: self._timed_out(timer))
        self._timer = timer

    def _cancel_timeout(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._timeout_at = None

    def _timed_out(self, timer) -> None:
        if timer is not self._timer:                 # cancelled, or from before a restore
            return
        self._timer = self._timeout_at = None
        if self.recv_fifo:
            self.timeout_ipending = 1
            self._update_irq()

    # -- transmitting (serial_xmit, always succeeding) ------------------------------------------
    def _transmit(self) -> None:
        """Send what THR (or the transmit FIFO) holds: it is one byte, written just now."""
        self.tsr = self.thr
        self.lsr |= LSR_THRE
        if not self.thr_ipending:
            self.thr_ipending = 1
            self._update_irq()
        if self.mcr & MCR_LOOP:
            self._receive(bytes((self.tsr,)))       # loopback: we just received it
        else:
            self._send(self.tsr)
        self.lsr |= LSR_TEMT

    # -- registers ------------------------------------------------------------------------------
    def _read_rbr(self) -> int:
        if self.lcr & LCR_DLAB:
            return self.divider & 0xFF
        if self.fcr & FCR_FE:
            value = self.recv_fifo.popleft() if self.recv_fifo else 0
            if not self.recv_fifo:
                self.lsr &= ~(LSR_DR | LSR_BI)
            else:
                self._arm_timeout()
            self.timeout_ipending = 0
        else:
            value = self.rbr
            self.lsr &= ~(LSR_DR | LSR_BI)
        self._update_irq()
        self._accept_input()
        return value

    def _read_ier(self) -> int:
        return self.divider >> 8 if self.lcr & LCR_DLAB else self.ier

    def _read_iir(self) -> int:
        value = self.iir
        if value & IIR_ID == IIR_THRI:              # reading it acknowledges THR empty
            self.thr_ipending = 0
            self._update_irq()
        return value

    def _read_lsr(self) -> int:
        value = self.lsr
        if self.lsr & (LSR_BI | LSR_OE):            # break and overrun clear on read
            self.lsr &= ~(LSR_BI | LSR_OE)
            self._update_irq()
        return value

    def _read_msr(self) -> int:
        mcr = self.mcr
        if mcr & MCR_LOOP:                          # the modem outputs wired to the inputs
            return (mcr & 0x0C) << 4 | (mcr & 0x02) << 3 | (mcr & 0x01) << 5
        value = self.msr
        if value & MSR_ANY_DELTA:
            self.msr &= 0xF0
            self._update_irq()
        return value

    def _write_thr(self, value: int) -> None:
        if self.lcr & LCR_DLAB:
            self._set_divider((self.divider & 0xFF00) | value)
            return
        self.thr = value
        self.thr_ipending = 0
        self.lsr &= ~(LSR_THRE | LSR_TEMT)
        self._update_irq()
        self._transmit()

    def _write_ier(self, value: int) -> None:
        if self.lcr & LCR_DLAB:
            self._set_divider((self.divider & 0x00FF) | value << 8)
            return
        changed = (self.ier ^ value) & 0x0F
        self.ier = value & 0x0F
        if changed & IER_THRI:                      # THRI turned on samples THRE again (Windows needs it)
            self.thr_ipending = int(bool(self.ier & IER_THRI and self.lsr & LSR_THRE))
        if changed:
            self._update_irq()

    def _write_fcr(self, value: int) -> None:
        if (value ^ self.fcr) & FCR_FE:             # enabling or disabling flushes both FIFOs
            value |= FCR_XFR | FCR_RFR
        if value & FCR_RFR:
            self.lsr &= ~(LSR_DR | LSR_BI)
            self._cancel_timeout()
            self.timeout_ipending = 0
            self.recv_fifo.clear()
        if value & FCR_XFR:
            self.lsr |= LSR_THRE
            self.thr_ipending = 1
        self.fcr = value & FCR_STICKY
        if self.fcr & FCR_FE:
            self.iir |= IIR_FE
            self.recv_fifo_itl = TRIGGER_LEVELS[self.fcr & 0xC0]
        else:
            self.iir &= ~IIR_FE
        self._update_irq()
        self._accept_input()                        # room may have been made

    def _write_lcr(self, value: int) -> None:
        self.lcr = value
        self._update_parameters()

    def _write_mcr(self, value: int) -> None:
        self.mcr = value & 0x1F

    def _write_scr(self, value: int) -> None:
        self.scr = value

    def _set_divider(self, divider: int) -> None:
        self.divider = divider
        self._update_parameters()

    def _update_parameters(self) -> None:
        frame = char_transmit_time(self.lcr, self.divider)
        if frame is not None:
            self.char_transmit_time = frame

    # -- snapshots ------------------------------------------------------------------------------
    def state(self) -> tuple:
        return (tuple(getattr(self, name) for name in FIELDS), bytes(self.recv_fifo), bytes(self.output),
                bytes(self.pending_input), self._timeout_at)

    def restore(self, state: tuple) -> None:
        """Put ``state`` back: the registers, the FIFO, the output so far, the host's input, the
        character timeout (re-armed from the clock's now); the IRQ line is driven to the level
        IIR says.  In a machine snapshot, restore after the core's instruction count and
        before the interrupt controller (whose own restored state then wins)."""
        fields, fifo, output, pending, timeout_at = state
        for name, value in zip(FIELDS, fields):
            setattr(self, name, value)
        self.recv_fifo = deque(fifo)
        self.output, self.pending_input = bytearray(output), bytearray(pending)
        self._cancel_timeout()
        if timeout_at is not None and self.clock is not None:
            self._timeout_at = timeout_at
            self._start_timer()
        self._set_irq(self.iir & 0x0F != IIR_NO_INT)


def _const(name: str) -> Callable[[Uart16550], int]:
    return lambda uart: getattr(uart, name)


# Register offset -> read / write handler.
READ: dict[int, Callable[[Uart16550], int]] = {
    0: Uart16550._read_rbr, 1: Uart16550._read_ier, 2: Uart16550._read_iir, 3: _const("lcr"),
    4: _const("mcr"), 5: Uart16550._read_lsr, 6: Uart16550._read_msr, 7: _const("scr"),
}
WRITE: dict[int, Callable[[Uart16550, int], None]] = {
    0: Uart16550._write_thr, 1: Uart16550._write_ier, 2: Uart16550._write_fcr, 3: Uart16550._write_lcr,
    4: Uart16550._write_mcr, 5: lambda uart, value: None, 6: lambda uart, value: None,     # LSR, MSR: read-only
    7: Uart16550._write_scr,
}
