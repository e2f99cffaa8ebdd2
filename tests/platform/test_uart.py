"""The 16550A UART (ringminus/platform/uart.py) against QEMU 7.2's hw/char/serial.c: reset
values, instant transmission, IIR priorities and values with and without FIFOs, THRI
acknowledgement, receiving with QEMU's flow control, the FIFO trigger level and character
timeout, loopback, the divisor latch, wide and unaligned accesses, snapshots — and real-mode
guests that detect the UART as SeaBIOS does, print through it as kvm-unit-tests does, and take
its receive interrupt."""
import random

from ringminus import Machine, StopReason
from ringminus.emulator.irq import InterruptLine
from ringminus.platform.uart import COM1_BASE, Uart16550, char_transmit_time

from ..helpers import asm

RBR = THR = DLL = COM1_BASE
IER, IIR, LCR, MCR, LSR, MSR, SCR = (COM1_BASE + n for n in range(1, 8))
FCR, DLM = IIR, IER


class FakeClock:
    """now_ns/add_timer for the character timeout: timers fire when ``advance`` passes them."""

    def __init__(self):
        self.now, self.timers = 0, []

    def now_ns(self):
        return self.now

    def add_timer(self, after_ns, callback):
        clock = self

        class Timer:
            def cancel(self):
                if self in clock.timers:
                    clock.timers.remove(self)
        timer = Timer()
        timer.at, timer.callback = self.now + after_ns, callback
        self.timers.append(timer)
        return timer

    def advance(self, ns):
        self.now += ns
        for timer in [t for t in self.timers if t.at <= self.now]:
            self.timers.remove(timer)
            timer.callback()


def uart(**kwargs):
    levels = []
    line = InterruptLine("irq4", levels.append)
    return Uart16550(irq=line, **kwargs), line, levels


def outb(dev, port, value):
    dev.write(port, 1, value)


def inb(dev, port):
    return dev.read(port, 1)


# -- registers at reset, transmission -----------------------------------------------------------

def test_reset_values_are_qemus():
    dev, line, _ = uart()
    assert [inb(dev, p) for p in (IER, IIR, LCR, MCR, LSR, MSR, SCR)] == [0, 0x01, 0, 0x08, 0x60, 0xB0, 0]
    assert dev.char_transmit_time == 1_000_000_000 // 9600 * 10     # 9600 baud, 10-bit frames
    outb(dev, LCR, 0x80)
    assert (inb(dev, DLL), inb(dev, DLM)) == (0x0C, 0x00)
    assert dev.char_transmit_time == 1_000_000_000 // 9600 * 7      # LCR 0: 5 data bits, as QEMU recomputes
    assert not line.level


def test_transmitted_bytes_go_out_at_once():
    sent = []
    dev = Uart16550(on_output=sent.append)
    for byte in b"hi\n":
        outb(dev, THR, byte)
        assert inb(dev, LSR) == 0x60                                 # THRE and TEMT again
    assert dev.output == b"hi\n" and sent == [b"h", b"i", b"\n"]


def test_thri_interrupt_is_acknowledged_by_reading_iir_and_rises_again_per_byte():
    dev, line, levels = uart()
    outb(dev, IER, 0x02)                                             # THRI on with THR empty
    assert line.level and levels == [True]
    assert inb(dev, IIR) == 0x02                                     # reading it acknowledges
    assert inb(dev, IIR) == 0x01 and not line.level
    outb(dev, THR, ord("x"))                                         # sent at once: THR empty again
    assert levels == [True, False, True] and inb(dev, IIR) == 0x02
    outb(dev, IER, 0x02)                                             # unchanged IER: no resample
    assert inb(dev, IIR) == 0x01
    outb(dev, IER, 0x00)
    outb(dev, IER, 0x02)                                             # THRI turned on again: resampled
    assert inb(dev, IIR) == 0x02


def test_seabios_detect_serial():
    """src/serial.c detect_serial: IER <- 2, IER reads 2, IIR & 0x3F == 2, IER <- 0."""
    dev, line, _ = uart()
    outb(dev, IER, 0x02)
    assert inb(dev, IER) == 0x02 and inb(dev, IIR) & 0x3F == 0x02
    outb(dev, IER, 0x00)
    assert not line.level


def test_fifo_bits_in_iir():
    dev, _, _ = uart()
    outb(dev, FCR, 0x01)
    assert inb(dev, IIR) == 0xC1
    outb(dev, IER, 0x02)
    assert inb(dev, IIR) == 0xC2 and inb(dev, IIR) == 0xC1
    outb(dev, FCR, 0xC7)                                             # trigger 14, both FIFOs reset
    assert dev.recv_fifo_itl == 14 and dev.fcr == 0xC1
    assert inb(dev, IIR) == 0xC2                                     # XFR makes THR-empty pending again
    outb(dev, FCR, 0x00)
    assert inb(dev, IIR) & 0xC0 == 0


def test_divisor_latch_and_character_time():
    dev, _, _ = uart()
    outb(dev, LCR, 0x83)
    outb(dev, DLL, 0x01)
    outb(dev, DLM, 0x00)
    assert (inb(dev, DLL), inb(dev, DLM), dev.divider) == (1, 0, 1)
    outb(dev, LCR, 0x03)
    assert dev.char_transmit_time == 1_000_000_000 // 115_200 * 10
    assert inb(dev, IER) == 0                                        # IER is back
    assert char_transmit_time(0x0F, 12) == 1_000_000_000 // 9600 * 12    # 8 data, 2 stop, parity
    assert char_transmit_time(0x03, 0) is None and char_transmit_time(0x03, 200_000) is None


# -- receiving ---------------------------------------------------------------------------------

def test_receive_without_fifo_takes_one_byte_at_a_time():
    dev, line, _ = uart()
    dev.feed(b"ok")
    assert inb(dev, LSR) == 0x61 and bytes(dev.pending_input) == b"k"
    outb(dev, IER, 0x01)
    assert line.level and inb(dev, IIR) == 0x04
    assert inb(dev, RBR) == ord("o")
    assert inb(dev, LSR) == 0x61 and inb(dev, RBR) == ord("k")      # the next one entered on the read
    assert inb(dev, LSR) == 0x60 and not line.level and inb(dev, IIR) == 0x01


def test_fifo_fills_to_the_trigger_level_then_one_at_a_time():
    dev, line, _ = uart()
    outb(dev, FCR, 0x41)                                             # FIFO on, trigger 4
    outb(dev, IER, 0x01)
    dev.feed(b"abcdefgh")
    assert len(dev.recv_fifo) == 4 and line.level and inb(dev, IIR) == 0xC4
    assert inb(dev, RBR) == ord("a")
    assert len(dev.recv_fifo) == 4 and bytes(dev.pending_input) == b"fgh"
    got = bytes(inb(dev, RBR) for _ in range(7))
    assert got == b"bcdefgh" and inb(dev, LSR) == 0x60 and inb(dev, RBR) == 0    # empty FIFO reads 0


def test_character_timeout_below_the_trigger_level():
    clock = FakeClock()
    dev, line, _ = uart(clock=clock)
    outb(dev, FCR, 0x81)                                             # trigger 8
    outb(dev, IER, 0x01)
    dev.feed(b"xy")
    assert not line.level and inb(dev, IIR) == 0xC1
    clock.advance(4 * dev.char_transmit_time - 1)
    assert not line.level
    clock.advance(1)
    assert line.level and inb(dev, IIR) == 0xCC
    assert inb(dev, RBR) == ord("x") and inb(dev, IIR) == 0xC1       # a read clears it and re-arms
    clock.advance(4 * dev.char_transmit_time)
    assert inb(dev, IIR) == 0xCC
    outb(dev, FCR, 0x83)                                             # receive FIFO reset: gone
    assert inb(dev, IIR) == 0xC1 and not clock.timers


def test_loopback_receives_what_is_sent_and_overruns():
    dev, line, _ = uart()
    outb(dev, MCR, 0x1F)
    assert inb(dev, MSR) == 0xF0                                     # DTR, RTS, OUT1, OUT2 -> DSR, CTS, RI, DCD
    outb(dev, MCR, 0x11)
    assert inb(dev, MSR) == 0x20
    outb(dev, IER, 0x04)                                             # line status interrupts
    outb(dev, THR, 0x41)
    outb(dev, THR, 0x42)                                             # RBR still full: overrun
    assert dev.output == b"" and line.level and inb(dev, IIR) == 0x06
    assert inb(dev, LSR) == 0x63 and inb(dev, LSR) == 0x61           # OE clears on read
    assert not line.level and inb(dev, RBR) == 0x42
    outb(dev, MCR, 0x08)
    assert inb(dev, MSR) == 0xB0


# -- access sizes and robustness ---------------------------------------------------------------

def test_wide_and_unaligned_accesses_are_byte_accesses():
    dev, _, _ = uart()
    outb(dev, SCR, 0x5A)
    assert dev.read(LSR, 2) == 0x60 | 0xB0 << 8                      # LSR then MSR
    assert dev.read(IER, 2) == 0x00 | 0x01 << 8                      # unaligned: IER then IIR
    assert dev.read(MCR, 4) == 0x08 | 0x60 << 8 | 0xB0 << 16 | 0x5A << 24
    assert dev.read(SCR, 2) == 0x5A | 0xFF << 8                      # past 0x3FF: QEMU would abort
    dev.write(MCR, 4, 0x11_00_00_00)                                 # MCR, LSR, MSR, SCR
    assert inb(dev, SCR) == 0x11
    dev.write(SCR, 4, 0xFFFF_FF22)
    assert inb(dev, SCR) == 0x22
    dev.write(RBR, 2, 0x0268)                                        # THR 'h', then IER 2
    assert dev.output == b"h" and inb(dev, IER) == 0x02


def test_no_guest_access_raises():
    rng = random.Random(16550)
    dev = Uart16550(irq=InterruptLine("irq4"), clock=FakeClock())
    for _ in range(20_000):
        port, size = rng.randrange(COM1_BASE, COM1_BASE + 8), rng.choice((1, 2, 4))
        if rng.random() < 0.5:
            dev.write(port, size, rng.getrandbits(32))
        else:
            assert 0 <= dev.read(port, size) < 1 << (8 * size)
        if rng.random() < 0.05:
            dev.feed(bytes(rng.getrandbits(8) for _ in range(rng.randrange(20))))
        dev.clock.advance(rng.choice((0, 1000, 10_000_000)))


def test_state_and_restore():
    clock = FakeClock()
    dev, line, _ = uart(clock=clock)
    outb(dev, FCR, 0x81)
    outb(dev, IER, 0x03)
    outb(dev, THR, ord("a"))
    dev.feed(b"123")
    state = dev.state()
    inb(dev, RBR)
    outb(dev, THR, ord("b"))
    outb(dev, IER, 0)
    dev.restore(state)
    assert dev.output == b"a" and bytes(dev.recv_fifo) == b"123" and line.level
    assert dev.state() == state
    clock.advance(4 * dev.char_transmit_time)                        # the timeout was re-armed
    assert inb(dev, IIR) == 0xCC


# -- real-mode guests ----------------------------------------------------------------------------

def guest(machine, lines):
    machine.write_memory(0x7C00, asm("\n".join(lines), 16, 0x7C00))
    machine.boot("real", 0x7C00)


# kvm-unit-tests lib/x86/io.c serial_init, then "hi\n" with '\n' sent as "\r\n" after polling LSR.THRE.
SERIAL_INIT = ["mov dx, 0x3FB", "in al, dx", "or al, 0x80", "out dx, al",
               "mov dx, 0x3F8", "mov al, 1", "out dx, al", "mov dx, 0x3F9", "xor al, al", "out dx, al",
               "mov dx, 0x3FB", "in al, dx", "and al, 0x7F", "out dx, al",
               "mov dx, 0x3F9", "xor al, al", "out dx, al",
               "mov dx, 0x3FB", "mov al, 3", "out dx, al",
               "mov dx, 0x3FA", "xor al, al", "out dx, al",
               "mov dx, 0x3FC", "mov al, 3", "out dx, al"]
PUTS = ["mov si, text",
        "next: mov bl, byte ptr [si]", "test bl, bl", "jz done", "inc si",
        "cmp bl, 10", "jne plain", "mov bh, 13", "call putc",
        "plain: mov bh, bl", "call putc", "jmp next",
        "putc: mov dx, 0x3FD",
        "wait: in al, dx", "test al, 0x20", "jz wait",
        "mov dx, 0x3F8", "mov al, bh", "out dx, al", "ret",
        "done: mov al, 0", "out 0xF4, al",
        "text: .byte 0x68, 0x69, 0x0A, 0"]


def test_a_guest_detects_the_uart_as_seabios_and_prints_as_kvm_unit_tests():
    machine = Machine(memory_size=2 << 20)
    printed = []
    dev = Uart16550(on_output=printed.append).register(machine.ports)
    detect = ["mov dx, 0x3FF", "mov al, 0xA5", "out dx, al", "in al, dx", "mov byte ptr [0x500], al",
              "mov dx, 0x3F9", "mov al, 2", "out dx, al", "in al, dx", "mov byte ptr [0x501], al",
              "mov dx, 0x3FA", "in al, dx", "mov byte ptr [0x502], al", "in al, dx", "mov byte ptr [0x503], al",
              "mov dx, 0x3F9", "xor al, al", "out dx, al",
              "mov dx, 0x3FA", "mov al, 1", "out dx, al", "in al, dx", "mov byte ptr [0x504], al"]
    guest(machine, detect + SERIAL_INIT + PUTS)
    result = machine.run(max_instructions=10_000)
    assert result.stop.reason is StopReason.EXIT
    assert machine.read_memory(0x500, 5) == bytes((0xA5, 0x02, 0x02, 0x01, 0xC1))
    assert dev.output == b"hi\r\n" and b"".join(printed) == b"hi\r\n"
    assert (dev.divider, dev.lcr, dev.mcr, dev.fcr) == (1, 0x03, 0x03, 0x00)


def test_a_guest_takes_the_receive_interrupt_for_each_byte():
    """IRQ 4 as a line raising vector 0x0C: the handler reads RBR (the next byte enters as it
    does, a new edge) and the guest exits after the second."""
    machine = Machine(memory_size=2 << 20)
    dev = Uart16550(irq=machine.interrupt_line("com1", vector=0x0C)).register(machine.ports)
    dev.feed(b"ok")
    code = ["mov word ptr [0x30], handler", "mov word ptr [0x32], 0", "mov di, 0x500",
            "mov dx, 0x3F9", "mov al, 1", "out dx, al",
            "idle: cli", "cmp di, 0x502", "jae done", "sti", "hlt", "jmp idle",
            "done: mov al, 0", "out 0xF4, al",
            "handler: mov dx, 0x3FA", "in al, dx", "mov byte ptr [di + 0x10], al",
            "mov dx, 0x3F8", "in al, dx", "mov byte ptr [di], al", "inc di", "iret"]
    guest(machine, code)
    result = machine.run(max_instructions=10_000)
    assert result.stop.reason is StopReason.EXIT
    assert machine.read_memory(0x500, 2) == b"ok" and machine.read_memory(0x510, 2) == b"\x04\x04"
    assert [event["vector"] for event in result.events if "vector" in event] == [0x0C, 0x0C]
    assert not dev.pending_input and inb(dev, LSR) == 0x60
