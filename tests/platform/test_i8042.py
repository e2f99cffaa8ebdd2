"""The i8042 with its PS/2 keyboard and mouse (ringminus/platform/i8042.py) against QEMU 7.2's
hw/input/pckbd.c and ps2.c: reset values, controller commands, SeaBIOS 1.16.2's
ps2_keyboard_setup run byte for byte to "PS2 keyboard initialized", keyboard and mouse
commands, the output buffer's sources and interface masking, IRQ 1 and IRQ 12, the output
port (A20, reset), access sizes, snapshots — and real-mode guests polling port 0x64 through
the self-tests and a keyboard reset, taking IRQ 1, and resetting the machine with 0xFE."""
import random

from ringminus import Machine, StopReason
from ringminus.emulator.irq import InterruptLine
from ringminus.platform.i8042 import I8042

from ..helpers import asm

DATA, STATUS = 0x60, 0x64
OBF, IBF, AUXDATA = 0x01, 0x02, 0x20
CTR_KBDINT, CTR_AUXINT, CTR_KBDDIS, CTR_AUXDIS, CTR_XLATE = 0x01, 0x02, 0x10, 0x20, 0x40


def controller(**kwargs):
    irq1, irq12 = InterruptLine("irq1"), InterruptLine("irq12")
    return I8042(irq1=irq1, irq12=irq12, **kwargs), irq1, irq12


def command(kbc, value, *data):
    kbc.write(STATUS, 1, value)
    for byte in data:
        kbc.write(DATA, 1, byte)


def drain(kbc):
    """Every byte the output buffer gives, with the status it had: [(byte, status)]."""
    got = []
    while (status := kbc.read(STATUS, 1)) & OBF:
        got.append((kbc.read(DATA, 1), status))
    return got


def data_of(kbc):
    return [byte for byte, _ in drain(kbc)]


# -- SeaBIOS 1.16.2 src/hw/ps2port.c, as port accesses (a poll that finds nothing is a timeout) --

class SeaBios:
    def __init__(self, kbc):
        self.kbc, self.ctr, self.log = kbc, CTR_KBDDIS | CTR_AUXDIS, []

    def i8042_command(self, value, params=b""):
        receive, send = (value >> 8) & 0xF, (value >> 12) & 0xF
        assert not self.kbc.read(STATUS, 1) & IBF
        self.kbc.write(STATUS, 1, value & 0xFF)
        for byte in params[:send]:
            assert not self.kbc.read(STATUS, 1) & IBF
            self.kbc.write(DATA, 1, byte)
        got = []
        for _ in range(receive):
            assert self.kbc.read(STATUS, 1) & OBF, f"i8042 command {value:#x} timed out"
            got.append(self.kbc.read(DATA, 1))
        return got

    def recvbyte(self, aux, needack):
        while (status := self.kbc.read(STATUS, 1)) & OBF:
            data = self.kbc.read(DATA, 1)
            if bool(status & AUXDATA) == aux and (not needack or data in (0xFA, 0xFE)):
                return data
            self.log.append(f"Discarding ps2 data {data:02x} (status={status:02x})")
        return None                                              # timeout

    def sendbyte(self, aux, byte):
        if aux:
            self.i8042_command(0x10D4, bytes((byte,)))
        else:
            self.kbc.write(DATA, 1, byte)
        return self.recvbyte(aux, True) == 0xFA

    def ps2_command(self, aux, value, params=b""):
        receive, send = (value >> 8) & 0xF, (value >> 12) & 0xF
        old = self.ctr
        new = (old | CTR_AUXDIS | CTR_KBDDIS) & ~(CTR_KBDINT | CTR_AUXINT)
        self.i8042_command(0x1060, bytes((new,)))
        new &= ~(CTR_AUXDIS if aux else CTR_KBDDIS)
        self.i8042_command(0x1060, bytes((new,)))
        got, ok = [], False
        if value & 0xFF == 0xFF:                                 # reset: BAT, maybe a second byte
            if self.sendbyte(aux, 0xFF) and (first := self.recvbyte(aux, False)) is not None:
                second = self.recvbyte(aux, False)
                got, ok = [first, 0 if second is None else second], True
        elif self.sendbyte(aux, value & 0xFF) and all(self.sendbyte(aux, b) for b in params[:send]):
            got = [self.recvbyte(aux, False) for _ in range(receive)]
            ok = None not in got
        self.i8042_command(0x1060, bytes((self.ctr,)))          # restore
        return ok, got

    def keyboard_setup(self):
        """ps2_keyboard_setup: True where SeaBIOS prints "PS2 keyboard initialized"."""
        for _ in range(16):                                      # i8042_flush
            if not self.kbc.read(STATUS, 1) & OBF:
                break
            self.kbc.read(DATA, 1)
        if self.i8042_command(0x01AA) != [0x55] or self.i8042_command(0x01AB) != [0x00]:
            return False
        ok, param = self.ps2_command(False, 0x02FF)
        if not ok or param[0] != 0xAA:
            return False
        if not self.ps2_command(False, 0x00F5)[0] or not self.ps2_command(False, 0x10F0, b"\x02")[0]:
            return False
        self.ctr = CTR_AUXDIS | CTR_XLATE | CTR_KBDINT
        return self.ps2_command(False, 0x00F4)[0]


def test_seabios_initialises_the_keyboard():
    kbc, irq1, irq12 = controller()
    bios = SeaBios(kbc)
    assert bios.keyboard_setup() and bios.log == []
    assert kbc.mode == 0x61 and kbc.keyboard.translate and kbc.keyboard.scan_enabled
    assert kbc.keyboard.scancode_set == 2 and kbc.read(STATUS, 1) == 0x1C
    assert not irq1.level and not irq12.level
    ok, ident = bios.ps2_command(False, 0x02F2)                  # GETID with translation on
    assert ok and ident == [0xAB, 0x41]
    ok, info = bios.ps2_command(True, 0x02FF)                    # the mouse's reset
    assert ok and info == [0xAA, 0x00]


# -- the controller ---------------------------------------------------------------------------

def test_reset_values_are_qemus():
    kbc, _, _ = controller()
    assert kbc.read(STATUS, 1) == 0x18                           # CMD and UNLOCKED, nothing to read
    command(kbc, 0x20)
    assert drain(kbc) == [(0x03, 0x19)]                          # both interrupts on, no translation
    command(kbc, 0xD0)
    assert data_of(kbc) == [0xCF]                                # taken before OBF is set
    assert kbc.outport == 0xCF and kbc.a20


def test_tests_and_input_port():
    kbc, _, _ = controller()
    command(kbc, 0xAA)
    assert drain(kbc) == [(0x55, 0x1D)] and kbc.read(STATUS, 1) == 0x1C     # SYS set from now on
    for value, answer in ((0xAB, 0x00), (0xA9, 0x00), (0xC0, 0x80)):
        command(kbc, value)
        assert data_of(kbc) == [answer]
    command(kbc, 0xA1)                                           # no version: ignored, as QEMU
    assert drain(kbc) == []


def test_write_command_byte_and_output_buffer_echoes():
    kbc, _, irq12 = controller()
    command(kbc, 0x60, 0x47)
    command(kbc, 0x20)
    assert data_of(kbc) == [0x47] and kbc.keyboard.translate
    command(kbc, 0xD2, 0x12)
    assert drain(kbc) == [(0x12, 0x19)]
    command(kbc, 0x60, 0x03)
    command(kbc, 0xD3, 0x34)
    assert irq12.level and drain(kbc) == [(0x34, 0x39)]          # as mouse data: AUX_OBF, IRQ 12
    assert not irq12.level


def test_an_empty_buffer_reads_the_last_byte_again():
    kbc, _, _ = controller()
    command(kbc, 0xD2, 0x77)
    assert kbc.read(DATA, 1) == 0x77 and kbc.read(DATA, 1) == 0x77 and kbc.read(STATUS, 1) & OBF == 0


def test_a_disabled_interface_holds_its_data_back():
    kbc, _, _ = controller()
    command(kbc, 0x60, 0x00)
    kbc.write(DATA, 1, 0xF2)                                     # FA in the buffer; AB, 83 queued
    command(kbc, 0xAD)                                           # a loaded byte stays loaded
    assert kbc.read(DATA, 1) == 0xFA
    assert kbc.read(STATUS, 1) & OBF == 0                        # the rest waits
    command(kbc, 0xAE)
    assert drain(kbc) == [(0xAB, 0x19), (0x83, 0x19)]
    command(kbc, 0xD4, 0xF2)                                     # the mouse interface too
    command(kbc, 0xA7)
    assert kbc.read(DATA, 1) == 0xFA
    assert kbc.read(STATUS, 1) & OBF == 0
    command(kbc, 0xA8)
    assert drain(kbc) == [(0x00, 0x39)]


def test_controller_replies_come_before_device_data():
    kbc, _, _ = controller()
    command(kbc, 0x60, 0x00)
    kbc.write(DATA, 1, 0xF2)                                     # FA loaded; AB, 83 queued
    command(kbc, 0xAA)                                           # 0x55 waits for the buffer
    assert data_of(kbc) == [0xFA, 0x55, 0xAB, 0x83]


def test_irq_lines_follow_the_buffer_and_the_command_byte():
    kbc, irq1, irq12 = controller()
    command(kbc, 0xAA)
    assert irq1.level and not irq12.level                        # controller bytes are IRQ 1's
    kbc.read(DATA, 1)
    assert not irq1.level
    command(kbc, 0xD4, 0xF2)                                     # mouse: FA, 00
    assert irq12.level and not irq1.level
    kbc.read(DATA, 1)
    assert irq12.level                                           # the next byte raises it again
    kbc.read(DATA, 1)
    assert not irq12.level
    command(kbc, 0x60, 0x00)
    command(kbc, 0xD2, 0x01)
    assert not irq1.level
    command(kbc, 0x60, 0x01)                                     # interrupt enable acts at once
    assert irq1.level
    command(kbc, 0x60, 0x11)                                     # keyboard interface disabled: no IRQ 1
    assert not irq1.level and kbc.read(STATUS, 1) & OBF


# -- the keyboard --------------------------------------------------------------------------------

def keyboard(kbc, *data):
    for byte in data:
        kbc.write(DATA, 1, byte)
    return data_of(kbc)


def test_keyboard_commands():
    kbc, _, _ = controller()
    assert keyboard(kbc, 0xFF) == [0xFA, 0xAA]
    assert keyboard(kbc, 0xF2) == [0xFA, 0xAB, 0x83]            # translation off
    assert keyboard(kbc, 0xEE) == [0xEE]
    assert keyboard(kbc, 0xED) == [0xFA] and keyboard(kbc, 0x07) == [0xFA] and kbc.keyboard.ledstate == 7
    assert keyboard(kbc, 0xF3) == [0xFA] and keyboard(kbc, 0x20) == [0xFA]
    assert keyboard(kbc, 0xF0) == [0xFA] and keyboard(kbc, 0x00) == [0xFA, 0x02]
    assert keyboard(kbc, 0xF0) == [0xFA] and keyboard(kbc, 0x05) == [0xFE]
    assert keyboard(kbc, 0xF0) == [0xFA] and keyboard(kbc, 0x03) == [0xFA] and kbc.keyboard.scancode_set == 3
    assert keyboard(kbc, 0xF5) == [0xFA] and not kbc.keyboard.scan_enabled and kbc.keyboard.scancode_set == 2
    assert keyboard(kbc, 0xF4) == [0xFA] and kbc.keyboard.scan_enabled
    assert keyboard(kbc, 0xF6, 0xFA, 0xFC, 0x00) == [0xFA]      # the last command's reply only
    assert keyboard(kbc, 0x42) == [0xFE] and keyboard(kbc, 0x05) == [0xFE]
    command(kbc, 0x60, 0x43)                                     # translation on
    assert keyboard(kbc, 0xF2) == [0xFA, 0xAB, 0x41]
    assert keyboard(kbc, 0xF0, 0x00) == [0xFA, 0x41]             # set 2, as translated


def test_a_new_keyboard_command_drops_unread_replies():
    kbc, _, _ = controller()
    kbc.write(DATA, 1, 0xF2)                                     # FA (OBF set), AB, 83
    kbc.write(DATA, 1, 0xF4)                                     # all three dropped; the buffer
    assert data_of(kbc) == [0xFA]                                # reads the queue: F4's ACK


# -- the mouse -------------------------------------------------------------------------------------

def mouse(kbc, *data):
    for byte in data:
        command(kbc, 0xD4, byte)
    return data_of(kbc)


def test_mouse_commands():
    kbc, _, _ = controller()
    assert mouse(kbc, 0xFF) == [0xFA, 0xAA, 0x00]
    assert mouse(kbc, 0xF2) == [0xFA, 0x00]
    assert mouse(kbc, 0xE9) == [0xFA, 0x00, 0x02, 100]          # status, resolution, rate after reset
    assert mouse(kbc, 0xF4, 0xE7, 0xF0, 0xE8, 0x03, 0xE9) == [0xFA] * 5 + [0xFA, 0x70, 0x03, 100]
    assert mouse(kbc, 0xF5, 0xE6, 0xEA, 0xF6, 0xE9) == [0xFA] * 4 + [0xFA, 0x00, 0x02, 100]
    assert mouse(kbc, 0xEB) == [0xFA, 0x08, 0x00, 0x00]         # poll: nothing moved
    assert mouse(kbc, 0x42) == []                                # unknown: no answer


def test_intellimouse_detection():
    kbc, _, _ = controller()
    assert mouse(kbc, 0xF3, 200, 0xF3, 100, 0xF3, 80, 0xF2) == [0xFA] * 6 + [0xFA, 0x03]
    assert mouse(kbc, 0xEB) == [0xFA, 0x08, 0, 0, 0]            # a wheel byte now
    assert mouse(kbc, 0xF3, 200, 0xF3, 200, 0xF3, 80, 0xF2) == [0xFA] * 6 + [0xFA, 0x04]
    assert mouse(kbc, 0xFF) == [0xFA, 0xAA, 0x00]


def test_mouse_wrap_mode_echoes():
    kbc, _, _ = controller()
    assert mouse(kbc, 0xEE, 0x12, 0xE9, 0xEC, 0xF2) == [0xFA, 0x12, 0xE9, 0xFA, 0xFA, 0x00]
    assert mouse(kbc, 0xEE) == [0xFA]
    assert mouse(kbc, 0xFF) == [0xFA, 0xAA, 0x00]               # reset is obeyed, wrap mode stays (QEMU)
    assert mouse(kbc, 0x34) == [0x34]


def test_the_mouse_queue_holds_sixteen_bytes():
    kbc, _, _ = controller()
    for _ in range(9):
        command(kbc, 0xD4, 0xF2)                                 # FA 00 each, unread
    assert data_of(kbc) == [0xFA, 0x00] * 8                      # the ninth found no room for two


# -- output port, A20 and reset ------------------------------------------------------------------

def test_output_port_a20_and_reset_requests():
    resets, a20 = [], []
    kbc, _, _ = controller(reset_request=lambda: resets.append(1), a20_changed=a20.append)
    command(kbc, 0xD1, 0xCD)                                     # A20 off, reset line high
    assert not kbc.a20 and a20 == [False] and resets == []
    command(kbc, 0xDF)
    assert kbc.a20 and a20 == [False, True]
    command(kbc, 0xDD)
    assert not kbc.a20
    command(kbc, 0xD1, 0xCE)                                     # bit 0 low: reset
    assert resets == [1]
    for value in (0xFE, 0xF0, 0xF2, 0xFC):                       # pulse with bit 0: reset
        command(kbc, value)
    assert len(resets) == 5
    for value in (0xFF, 0xF1, 0xFD):
        command(kbc, value)
    assert len(resets) == 5


# -- access sizes, robustness, snapshots ----------------------------------------------------------

def test_wide_accesses_repeat_the_port():
    kbc, _, _ = controller()
    kbc.write(STATUS, 2, 0xAB_AA)                                # two commands: self-test, kbd test
    assert kbc.read(DATA, 2) == 0x0000                           # 0x00 replaced the unread 0x55, then again
    command(kbc, 0xD2, 0x66)
    assert kbc.read(DATA, 4) == 0x66666666                       # then the last byte again
    assert kbc.read(STATUS, 2) == 0x1C1C
    kbc.write(DATA, 4, 0xF4F4F4F4)
    assert data_of(kbc) == [0xFA]


def test_no_guest_access_raises():
    rng = random.Random(8042)
    kbc, _, _ = controller(reset_request=lambda: None, a20_changed=lambda level: None)
    for _ in range(30_000):
        port, size = rng.choice((DATA, STATUS)), rng.choice((1, 2, 4))
        if rng.random() < 0.5:
            kbc.write(port, size, rng.getrandbits(32))
        else:
            assert 0 <= kbc.read(port, size) < 1 << (8 * size)


def test_state_and_restore():
    kbc, irq1, _ = controller()
    kbc.write(DATA, 1, 0xFF)
    command(kbc, 0xD4, 0xF2)
    state = kbc.state()
    rest = [kbc.read(DATA, 1) for _ in range(4)]
    kbc.reset()
    kbc.restore(state)
    assert irq1.level and kbc.state() == state
    assert [kbc.read(DATA, 1) for _ in range(4)] == rest == [0xFA, 0xFA, 0xAA, 0x00]     # taking turns


def test_reset_empties_everything_but_keeps_the_last_byte():
    kbc, irq1, _ = controller()
    command(kbc, 0x60, 0x61)
    kbc.write(DATA, 1, 0xFF)
    kbc.reset()
    assert kbc.read(STATUS, 1) == 0x18 and not irq1.level and kbc.mode == 0x03
    assert kbc.keyboard.translate == 0 and kbc.keyboard.queue.count == 0


# -- real-mode guests ------------------------------------------------------------------------------

def guest(machine, lines):
    machine.write_memory(0x7C00, asm("\n".join(lines), 16, 0x7C00))
    machine.boot("real", 0x7C00)


def read_byte():
    """Poll 0x64 for OBF (0xEE if it never comes), read 0x60, store it at [di], advance di."""
    return ["call getb", "mov byte ptr [di], al", "inc di"]


GETB = ["getb: mov cx, 1000",
        "poll: in al, 0x64", "test al, 1", "jnz ready", "loop poll", "mov al, 0xEE", "ret",
        "ready: in al, 0x60", "ret"]


def test_a_guest_runs_the_self_tests_and_a_keyboard_reset():
    machine = Machine(memory_size=2 << 20)
    kbc = I8042().register(machine.ports)
    code = ["mov di, 0x500",
            "in al, 0x64", "mov byte ptr [0x4F0], al",
            "mov al, 0xAA", "out 0x64, al", *read_byte(),
            "mov al, 0xAB", "out 0x64, al", *read_byte(),
            "mov al, 0x60", "out 0x64, al", "mov al, 0x20", "out 0x60, al",
            "mov al, 0xFF", "out 0x60, al", *read_byte(), *read_byte(),
            "in al, 0x64", "mov byte ptr [0x4F1], al",
            "mov al, 0xF2", "out 0x60, al", *read_byte(), *read_byte(), *read_byte(),
            "mov al, 0xD4", "out 0x64, al", "mov al, 0xFF", "out 0x60, al",
            "in al, 0x64", "mov byte ptr [0x4F2], al",
            *read_byte(), *read_byte(), *read_byte(),
            "mov al, 0", "out 0xF4, al", *GETB]
    guest(machine, code)
    result = machine.run(max_instructions=20_000)
    assert result.stop.reason is StopReason.EXIT
    assert machine.read_memory(0x4F0, 3) == bytes((0x18, 0x1C, 0x3D))
    assert machine.read_memory(0x500, 10) == bytes((0x55, 0x00, 0xFA, 0xAA, 0xFA, 0xAB, 0x83, 0xFA, 0xAA, 0x00))
    assert kbc.mode == 0x00


def test_a_guest_takes_irq1_for_each_reply():
    """IRQ 1 as a line raising vector 9 (the BIOS's INT 09h): the handler reads port 0x60."""
    machine = Machine(memory_size=2 << 20)
    I8042(irq1=machine.interrupt_line("kbd", vector=0x09)).register(machine.ports)
    code = ["mov word ptr [0x24], handler", "mov word ptr [0x26], 0", "mov di, 0x500",
            "mov al, 0x60", "out 0x64, al", "mov al, 0x61", "out 0x60, al",    # SeaBIOS's final command byte
            "sti", "mov al, 0xFF", "out 0x60, al",
            "idle: cli", "cmp di, 0x502", "jae done", "sti", "hlt", "jmp idle",
            "done: mov al, 0", "out 0xF4, al",
            "handler: in al, 0x64", "mov byte ptr [di + 0x10], al", "in al, 0x60", "mov byte ptr [di], al",
            "inc di", "iret"]
    guest(machine, code)
    result = machine.run(max_instructions=10_000)
    assert result.stop.reason is StopReason.EXIT
    assert machine.read_memory(0x500, 2) == b"\xfa\xaa" and machine.read_memory(0x510, 2) == b"\x19\x19"
    assert [event["vector"] for event in result.events if "vector" in event] == [0x09, 0x09]


def test_a_guest_resets_the_machine_through_the_controller():
    machine = Machine(memory_size=2 << 20)
    I8042(reset_request=lambda: machine.request_stop_shutdown("reset through the i8042")).register(machine.ports)
    guest(machine, ["wait: in al, 0x64", "test al, 2", "jnz wait", "mov al, 0xFE", "out 0x64, al",
                    "mov al, 1", "out 0xF4, al"])
    result = machine.run(max_instructions=1000)
    assert result.stop.reason is StopReason.SHUTDOWN and result.instructions == 5
