"""The i8042 keyboard controller at ports 0x60 (data) and 0x64 (status/command) with a PS/2
keyboard and mouse behind it, as QEMU 7.2 builds them for pc and q35: hw/input/pckbd.c (with
its defaults ``extended-state=on``, ``kbd-throttle=off``) and hw/input/ps2.c.  SeaBIOS's
ps2port_setup gets the bytes it gets on QEMU and prints "PS2 keyboard initialized"
(reference/platform.md §10.1 step 7).

Output port bit 1 is the A20 gate: recorded (``I8042.a20``) and reported
(``a20_changed``), but ringminus does not mask address line 20 — memory above 1 MiB never
wraps, whatever the gate says.

Access sizes: QEMU's two regions are one port each with byte-wide handlers that ignore the
offset, so a word or dword access is 2 or 4 accesses of the same port, lowest byte first:
``inw 0x60`` reads the data port twice, ``outw 0x64`` sends two commands.

Left out: keys and mouse movement from the host (no input events, so no scan codes, and
AUX_POLL sends an all-zero packet), typematic repeat, LED output, the keyboard-throttle timer,
and the controller commands QEMU ignores too (0xA1 version and other unknown ones)."""
from __future__ import annotations

from typing import Callable

DATA_PORT, COMMAND_PORT = 0x60, 0x64

# Status register (port 0x64).
STAT_OBF, STAT_IBF, STAT_SELFTEST, STAT_CMD, STAT_UNLOCKED, STAT_MOUSE_OBF = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
# Command byte ("mode").
MODE_KBD_INT, MODE_MOUSE_INT, MODE_DISABLE_KBD, MODE_DISABLE_MOUSE, MODE_KCC = 0x01, 0x02, 0x10, 0x20, 0x40
# Output port.
OUT_RESET, OUT_A20, OUT_OBF, OUT_MOUSE_OBF, OUT_ONES = 0x01, 0x02, 0x10, 0x20, 0xCC
# Which sources have a byte (QEMU's "pending"; the keyboard's and mouse's bits are the
# command byte's disable bits, so one AND masks a disabled interface).
PENDING_CTRL_KBD, PENDING_CTRL_AUX, PENDING_KBD, PENDING_AUX = 0x04, 0x08, MODE_DISABLE_KBD, MODE_DISABLE_MOUSE
# What the output buffer holds ("obsrc").
OBSRC_KBD, OBSRC_MOUSE, OBSRC_CTRL = 0x01, 0x02, 0x04

ACK, RESEND, BAT_OK, KBD_ID = 0xFA, 0xFE, 0xAA, 0xAB
QUEUE_SIZE = 16                         # PS2_QUEUE_SIZE: scan codes / mouse bytes held
BUFFER_SIZE = 256                       # PS2_BUFFER_SIZE: the ring, command replies included
SCANCODE_SET_TRANSLATED = {1: 0x43, 2: 0x41, 3: 0x3F}     # translate_table[set], for F0 00

# KBDState, the PS/2 devices' common state, and each device's own (QEMU's vmstate fields).
CONTROLLER_FIELDS = ("write_cmd", "status", "mode", "outport", "pending", "obsrc", "obdata", "cbdata")
KEYBOARD_FIELDS = ("write_cmd", "scan_enabled", "translate", "scancode_set", "ledstate")
MOUSE_FIELDS = ("write_cmd", "mouse_status", "mouse_resolution", "mouse_sample_rate", "mouse_wrap",
                "mouse_type", "mouse_detect_state")
MOUSE_STATUS_SCALE21, MOUSE_STATUS_ENABLED, MOUSE_STATUS_REMOTE = 0x10, 0x20, 0x40


class Ps2Queue:
    """PS2Queue: a 256-byte ring of which at most 16 bytes are queued data; command replies
    are put in front of them (between ``rptr`` and ``cwptr``)."""

    def __init__(self):
        self.data = bytearray(BUFFER_SIZE)
        self.reset()

    def reset(self) -> None:
        self.rptr = self.wptr = self.count = 0
        self.cwptr = -1                          # no command replies

    def push(self, byte: int) -> None:
        """ps2_queue_noirq: dropped when 16 bytes are queued."""
        if self.count >= QUEUE_SIZE:
            return
        self.data[self.wptr] = byte
        self.wptr = (self.wptr + 1) % BUFFER_SIZE
        self.count += 1

    def put_replies(self, replies: bytes) -> None:
        """ps2_cqueue_N: the replies go before everything queued (no room check, as QEMU)."""
        self.rptr = (self.rptr - len(replies)) % BUFFER_SIZE
        self.cwptr = self.rptr
        for byte in replies:
            self.data[self.cwptr] = byte
            self.cwptr = (self.cwptr + 1) % BUFFER_SIZE
            self.count += 1

    def drop_replies(self) -> None:
        """ps2_cqueue_reset: a new command drops the replies to the last one not yet read."""
        if self.cwptr == -1:
            return
        self.count -= (self.cwptr - self.rptr) % BUFFER_SIZE
        self.rptr, self.cwptr = self.cwptr, -1

    def pop(self) -> int | None:
        """The next byte, or None when empty."""
        if not self.count:
            return None
        byte = self.data[self.rptr]
        self.rptr = (self.rptr + 1) % BUFFER_SIZE
        self.count -= 1
        if self.rptr == self.cwptr:
            self.cwptr = -1                      # the replies are all read
        return byte

    def last(self) -> int:
        """What an empty queue reads: the byte before rptr (QEMU's EMM386 note)."""
        return self.data[(self.rptr - 1) % BUFFER_SIZE]

    def state(self) -> tuple:
        return bytes(self.data), self.rptr, self.wptr, self.cwptr, self.count

    def restore(self, state: tuple) -> None:
        data, self.rptr, self.wptr, self.cwptr, self.count = state
        self.data = bytearray(data)


class Ps2Device:
    """PS2State: the queue, a pending command's argument (``write_cmd``), and the IRQ output
    to the controller, ``irq(level)``, called at every change as QEMU's qemu_set_irq is."""
    FIELDS: tuple[str, ...] = ("write_cmd",)

    def __init__(self, irq: Callable[[int], None]):
        self.irq = irq
        self.queue = Ps2Queue()
        self.write_cmd = -1

    def reset(self) -> None:
        """ps2_reset: the queue emptied, the IRQ lowered."""
        self.write_cmd = -1
        self.queue.reset()
        self.irq(0)

    def send(self, *data: int) -> None:
        """ps2_queue / ps2_queue_2..4: all or nothing, then the IRQ."""
        if QUEUE_SIZE - self.queue.count < len(data):
            return
        for byte in data:
            self.queue.push(byte)
        self.irq(1)

    def reply(self, *data: int) -> None:
        """ps2_cqueue_1..3: command replies, ahead of queued data."""
        self.queue.put_replies(bytes(data))
        self.irq(1)

    def read_data(self) -> int:
        """ps2_read_data: the next byte (IRQ dropped, raised again if more remain), or the
        last one again when the queue is empty."""
        byte = self.queue.pop()
        if byte is None:
            return self.queue.last()
        self.irq(0)
        if self.queue.count:
            self.irq(1)
        return byte

    def state(self) -> tuple:
        return tuple(getattr(self, name) for name in self.FIELDS), self.queue.state()

    def restore(self, state: tuple) -> None:
        fields, queue = state
        for name, value in zip(self.FIELDS, fields):
            setattr(self, name, value)
        self.queue.restore(queue)


class Ps2Keyboard(Ps2Device):
    """PS2KbdState and ps2_write_keyboard: an MF2 keyboard, scan code set 2 by default.  Reset
    0xFF answers ACK, BAT 0xAA; F2 answers ACK, 0xAB and 0x41 with translation on (command
    byte bit 6), 0x83 off; ED/F0/F3/FC take an argument; EE echoes; unknown commands answer
    RESEND 0xFE.  Replies go in front of queued scan codes, and a new command drops the
    unread replies to the last one (ps2_cqueue_*)."""
    FIELDS = KEYBOARD_FIELDS

    def __init__(self, irq: Callable[[int], None]):
        super().__init__(irq)
        self.ledstate = 0                       # ps2_kbd_reset leaves the LEDs as they are

    def reset(self) -> None:
        super().reset()
        self.scan_enabled, self.translate, self.scancode_set = 1, 0, 2

    def write(self, value: int) -> None:
        self.queue.drop_replies()
        command, self.write_cmd = self.write_cmd, -1
        handler = ARGUMENT_OF.get(command)
        if handler is not None:
            handler(self, value)
        else:
            KEYBOARD_COMMANDS.get(value, Ps2Keyboard._resend)(self, value)

    def _reset_keyboard(self) -> None:
        """ps2_reset_keyboard: scanning on, set 2, queue emptied (the IRQ is left as it is), LEDs off."""
        self.scan_enabled, self.scancode_set, self.ledstate = 1, 2, 0
        self.queue.reset()

    # -- commands -------------------------------------------------------------------------------
    def _ack(self, value: int) -> None:
        self.reply(ACK)

    def _resend(self, value: int) -> None:
        self.reply(RESEND)

    def _get_id(self, value: int) -> None:
        self.reply(ACK, KBD_ID, 0x41 if self.translate else 0x83)

    def _echo(self, value: int) -> None:
        self.reply(0xEE)

    def _enable(self, value: int) -> None:
        self.scan_enabled = 1
        self.reply(ACK)

    def _takes_argument(self, value: int) -> None:
        self.write_cmd = value
        self.reply(ACK)

    def _reset_disable(self, value: int) -> None:
        self._reset_keyboard()
        self.scan_enabled = 0
        self.reply(ACK)

    def _reset_enable(self, value: int) -> None:
        self._reset_keyboard()
        self.reply(ACK)

    def _reset(self, value: int) -> None:
        self._reset_keyboard()
        self.reply(ACK, BAT_OK)

    # -- arguments ------------------------------------------------------------------------------
    def _scancode_set(self, value: int) -> None:
        if value == 0:                          # get: as the translated code with translation on
            current = self.scancode_set
            self.reply(ACK, SCANCODE_SET_TRANSLATED.get(current, current) if self.translate else current)
        elif 1 <= value <= 3:
            self.scancode_set = value
            self.reply(ACK)
        else:
            self.reply(RESEND)

    def _leds(self, value: int) -> None:
        self.ledstate = value
        self.reply(ACK)


# Keyboard command byte -> handler (anything else: RESEND), and the commands taking an argument.
KEYBOARD_COMMANDS = {
    0x00: Ps2Keyboard._ack, 0x05: Ps2Keyboard._resend, 0xF2: Ps2Keyboard._get_id, 0xEE: Ps2Keyboard._echo,
    0xF4: Ps2Keyboard._enable, 0xF0: Ps2Keyboard._takes_argument, 0xED: Ps2Keyboard._takes_argument,
    0xF3: Ps2Keyboard._takes_argument, 0xFC: Ps2Keyboard._takes_argument, 0xF5: Ps2Keyboard._reset_disable,
    0xF6: Ps2Keyboard._reset_enable, 0xFF: Ps2Keyboard._reset, 0xFA: Ps2Keyboard._ack,
}
ARGUMENT_OF = {
    0xF0: Ps2Keyboard._scancode_set, 0xED: Ps2Keyboard._leds,
    0xF3: Ps2Keyboard._ack, 0xFC: Ps2Keyboard._ack,           # typematic rate, make/break: only ACKed
}


class Ps2Mouse(Ps2Device):
    """PS2MouseState and ps2_write_mouse: a PS/2 mouse that never moves.  FF answers ACK,
    0xAA, the type (0); status, resolution, sample rate, scaling, remote/stream and wrap modes
    and the IntelliMouse knocks (rates 200,100,80 and 200,200,80) are QEMU's."""
    FIELDS = MOUSE_FIELDS

    def reset(self) -> None:
        super().reset()
        for name in MOUSE_FIELDS[1:]:
            setattr(self, name, 0)

    def write(self, value: int) -> None:
        if self.write_cmd in MOUSE_ARGUMENTS:
            command, self.write_cmd = self.write_cmd, -1
            MOUSE_ARGUMENTS[command](self, value)
            self.send(ACK)
        elif self.mouse_wrap and value not in (0xEC, 0xFF):
            self.send(value)                    # wrap mode echoes all but reset-wrap and reset
        elif self.mouse_wrap and value == 0xEC:
            self.mouse_wrap = 0
            self.send(ACK)
        elif value in MOUSE_COMMANDS:
            MOUSE_COMMANDS[value](self, value)  # unknown commands get no answer

    def _status(self, set_bits: int, clear_bits: int) -> None:
        self.mouse_status = (self.mouse_status & ~clear_bits) | set_bits
        self.send(ACK)

    def _set_defaults(self) -> None:
        self.mouse_sample_rate, self.mouse_resolution, self.mouse_status = 100, 2, 0

    def _takes_argument(self, value: int) -> None:
        self.write_cmd = value
        self.send(ACK)

    def _set_wrap(self, value: int) -> None:
        self.mouse_wrap = 1
        self.send(ACK)

    def _get_type(self, value: int) -> None:
        self.send(ACK, self.mouse_type)

    def _get_info(self, value: int) -> None:
        self.send(ACK, self.mouse_status, self.mouse_resolution, self.mouse_sample_rate)

    def _poll(self, value: int) -> None:
        self.send(ACK)
        size = 4 if self.mouse_type else 3      # IntelliMouse packets carry a wheel byte
        self.send(0x08, *(0,) * (size - 1))     # no buttons, no movement

    def _default(self, value: int) -> None:
        self._set_defaults()
        self.send(ACK)

    def _reset(self, value: int) -> None:
        self._set_defaults()
        self.mouse_type = 0
        self.queue.reset()
        self.send(ACK, BAT_OK, self.mouse_type)

    def _sample_rate(self, value: int) -> None:
        """The rate, and the IntelliMouse knock: 200,100,80 makes type 3, 200,200,80 type 4."""
        self.mouse_sample_rate = value
        state = self.mouse_detect_state
        if state == 1:
            self.mouse_detect_state = {100: 2, 200: 3}.get(value, 0)
        elif state in (2, 3):
            if value == 80:
                self.mouse_type = 3 if state == 2 else 4
            self.mouse_detect_state = 0
        elif value == 200:
            self.mouse_detect_state = 1

    def _resolution(self, value: int) -> None:
        self.mouse_resolution = value


MOUSE_COMMANDS = {
    0xE6: lambda mouse, value: mouse._status(0, MOUSE_STATUS_SCALE21),       # scaling 1:1
    0xE7: lambda mouse, value: mouse._status(MOUSE_STATUS_SCALE21, 0),       # scaling 2:1
    0xEA: lambda mouse, value: mouse._status(0, MOUSE_STATUS_REMOTE),        # stream mode
    0xF0: lambda mouse, value: mouse._status(MOUSE_STATUS_REMOTE, 0),        # remote mode
    0xF4: lambda mouse, value: mouse._status(MOUSE_STATUS_ENABLED, 0),       # enable reporting
    0xF5: lambda mouse, value: mouse._status(0, MOUSE_STATUS_ENABLED),       # disable reporting
    0xE8: Ps2Mouse._takes_argument, 0xF3: Ps2Mouse._takes_argument, 0xEE: Ps2Mouse._set_wrap,
    0xF2: Ps2Mouse._get_type, 0xE9: Ps2Mouse._get_info, 0xEB: Ps2Mouse._poll, 0xF6: Ps2Mouse._default,
    0xFF: Ps2Mouse._reset,
}
MOUSE_ARGUMENTS = {0xF3: Ps2Mouse._sample_rate, 0xE8: Ps2Mouse._resolution}


def _line(line, level: bool) -> None:
    if line is not None:
        line.raise_() if level else line.lower()


class I8042:
    """KBDState: one output buffer, filled from three sources — the controller's own reply
    (``cbdata``: self-test 0x55, interface tests, the command byte, D2/D3 echoes), the
    keyboard's queue, the mouse's queue — in that priority, the keyboard's and the mouse's
    only while their interface is enabled in the command byte (kbd_pending).  Status: OBF
    while the buffer is full, AUX_OBF (bit 5) when it holds mouse data or a D3 byte, SYS (bit
    2) once self-test 0xAA ran, bits 3 and 4 always (QEMU's reset value); IBF never: every
    command completes inside the OUT.  Reading port 0x60 empties the buffer and refills it
    from the next source; an empty buffer reads the last byte again (``obdata``).  IRQ 1 is
    high while the buffer holds a keyboard/controller byte, command byte bit 0 set and bit 4
    clear; IRQ 12 while it holds a mouse byte and bit 1 is set (kbd_update_irq_lines).  At
    reset the command byte is 0x03 (interrupts on, translation off), the output port 0xCF.
    Output port bit 0 clear — written with D1, or pulsed by 0xFE and the other even commands
    0xF0-0xFE — asks for a system reset.

    The controller with its keyboard and mouse: a port device for 0x60 and 0x64
    (``register(machine.ports)``).  ``irq1``, ``irq12``: the keyboard's and the mouse's
    lines, objects with ``raise_()``/``lower()`` (``machine.interrupt_line(...)`` or PIC
    inputs), None for none.  ``reset_request()``: the guest asked for a system reset (the
    board decides what that does).  ``a20_changed(level)``: the A20 gate was driven."""
    PORTS = (DATA_PORT, COMMAND_PORT)
    precise = False

    def __init__(self, irq1=None, irq12=None, reset_request: Callable[[], None] | None = None,
                 a20_changed: Callable[[bool], None] | None = None):
        self.irq1, self.irq12 = irq1, irq12
        self.reset_request, self.a20_changed = reset_request, a20_changed
        for name in CONTROLLER_FIELDS:
            setattr(self, name, 0)
        self.keyboard = Ps2Keyboard(lambda level: self._device_irq(PENDING_KBD, level))
        self.mouse = Ps2Mouse(lambda level: self._device_irq(PENDING_AUX, level))
        self.reset()

    def register(self, ports) -> "I8042":
        """Claim the ports on a PortBus (``machine.ports``)."""
        ports.register(self.PORTS, self)
        return self

    def reset(self) -> None:
        """System reset: kbd_reset (a pending command's argument and the last byte read
        stay, as there) and both devices' resets."""
        self.mode, self.status = MODE_KBD_INT | MODE_MOUSE_INT, STAT_CMD | STAT_UNLOCKED
        self.outport, self.pending = OUT_RESET | OUT_A20 | OUT_ONES, 0
        self._deassert()
        self.keyboard.reset()
        self.mouse.reset()

    @property
    def a20(self) -> bool:
        """The A20 gate as the output port drives it (ringminus never masks the address line)."""
        return bool(self.outport & OUT_A20)

    # -- the port bus ---------------------------------------------------------------------------
    def read(self, port: int, size: int) -> int:
        read = self._read_data if port == DATA_PORT else self._read_status
        return sum(read() << (8 * i) for i in range(size))

    def write(self, port: int, size: int, value: int) -> None:
        write = self._write_data if port == DATA_PORT else self._write_command
        for i in range(size):
            write((value >> (8 * i)) & 0xFF)

    # -- the output buffer and the IRQs ---------------------------------------------------------
    def _pending(self) -> int:
        """kbd_pending: a disabled interface's data waits."""
        return self.pending & (~self.mode | ~(PENDING_KBD | PENDING_AUX)) & 0xFF

    def _update_lines(self) -> None:
        """kbd_update_irq_lines: IRQ 1 for a keyboard/controller byte, IRQ 12 for a mouse byte."""
        full, mouse = self.status & STAT_OBF, self.status & STAT_MOUSE_OBF
        _line(self.irq1, bool(full and not mouse and self.mode & MODE_KBD_INT and not self.mode & MODE_DISABLE_KBD))
        _line(self.irq12, bool(full and mouse and self.mode & MODE_MOUSE_INT))

    def _set_full(self, mouse: bool) -> None:
        self.status |= STAT_OBF | (STAT_MOUSE_OBF if mouse else 0)
        self.outport |= OUT_OBF | (OUT_MOUSE_OBF if mouse else 0)

    def _deassert(self) -> None:
        self.status &= ~(STAT_OBF | STAT_MOUSE_OBF)
        self.outport &= ~(OUT_OBF | OUT_MOUSE_OBF)
        self._update_lines()

    def _fill(self) -> None:
        """kbd_update_irq: load the output buffer from the highest-priority source."""
        pending = self._pending()
        self.status &= ~(STAT_OBF | STAT_MOUSE_OBF)
        self.outport &= ~(OUT_OBF | OUT_MOUSE_OBF)
        for bit, source, mouse in SOURCES:
            if pending & bit:
                self.obsrc = source
                self._set_full(mouse)
                break
        self._update_lines()

    def _safe_fill(self) -> None:
        """kbd_safe_update_irq: only an empty buffer is loaded (a full one is refilled when read)."""
        if not self.status & STAT_OBF and self._pending():
            self._fill()

    def _device_irq(self, bit: int, level: int) -> None:
        """kbd_update_kbd_irq / kbd_update_aux_irq: a device's IRQ output says it has data."""
        self.pending = self.pending | bit if level else self.pending & ~bit
        self._safe_fill()

    def _queue(self, byte: int, aux: bool = False) -> None:
        """kbd_queue (extended state): the controller's own byte, replacing an unread one."""
        self.cbdata = byte & 0xFF
        source = PENDING_CTRL_AUX if aux else PENDING_CTRL_KBD
        self.pending = (self.pending & ~(PENDING_CTRL_KBD | PENDING_CTRL_AUX)) | source
        self._safe_fill()

    def _dequeue(self) -> int:
        self.pending &= ~(PENDING_CTRL_KBD | PENDING_CTRL_AUX)
        if self._pending():
            self._fill()
        return self.cbdata

    # -- port 0x60 ------------------------------------------------------------------------------
    def _read_data(self) -> int:
        """kbd_read_data: take the buffer's byte from its source; an empty buffer reads the last byte again."""
        if self.status & STAT_OBF:
            self._deassert()
            if self.obsrc & OBSRC_KBD:
                self.obdata = self.keyboard.read_data()
            elif self.obsrc & OBSRC_MOUSE:
                self.obdata = self.mouse.read_data()
            elif self.obsrc & OBSRC_CTRL:
                self.obdata = self._dequeue()
        return self.obdata

    def _write_data(self, value: int) -> None:
        command, self.write_cmd = self.write_cmd, 0
        DATA_WRITES.get(command, I8042._to_keyboard)(self, value)

    def _to_keyboard(self, value: int) -> None:
        self.keyboard.write(value)
        self.mode &= ~MODE_DISABLE_KBD          # sending to the keyboard enables its interface
        self._safe_fill()

    def _to_mouse(self, value: int) -> None:
        self.mouse.write(value)
        self.mode &= ~MODE_DISABLE_MOUSE
        self._safe_fill()

    def _write_mode(self, value: int) -> None:
        self.mode = value
        self.keyboard.translate = int(bool(value & MODE_KCC))
        self._update_lines()                    # the interrupt enables act at once
        self._safe_fill()                       # an enabled interface may have data waiting

    def _write_outport(self, value: int) -> None:
        self.outport = value
        if self.a20_changed is not None:
            self.a20_changed(bool(value & OUT_A20))
        if not value & OUT_RESET:
            self._request_reset()

    # -- port 0x64 ------------------------------------------------------------------------------
    def _read_status(self) -> int:
        return self.status

    def _write_command(self, value: int) -> None:
        if value & 0xF0 == 0xF0:                # pulse output port bits 3-0: only bit 0 (reset) matters
            value = 0xFE if not value & 1 else 0xFF
        CONTROLLER_COMMANDS.get(value, I8042._ignore)(self)

    def _ignore(self) -> None:
        """Unknown commands (0xA1 included) and 0xFF: QEMU logs and does nothing."""

    def _expect_data(self, command: int) -> None:
        self.write_cmd = command                # the next byte written to 0x60 is its argument

    def _self_test(self) -> None:
        self.status |= STAT_SELFTEST
        self._queue(0x55)

    def _set_mode_bits(self, set_bits: int, clear_bits: int) -> None:
        self.mode = (self.mode & ~clear_bits) | set_bits
        if clear_bits:                          # an interface enabled: its data may load now
            self._safe_fill()

    def _set_a20(self, level: bool) -> None:
        self.outport = self.outport | OUT_A20 if level else self.outport & ~OUT_A20
        if self.a20_changed is not None:
            self.a20_changed(level)

    def _request_reset(self) -> None:
        if self.reset_request is not None:
            self.reset_request()

    # -- snapshots ------------------------------------------------------------------------------
    def state(self) -> tuple:
        return (tuple(getattr(self, name) for name in CONTROLLER_FIELDS), self.keyboard.state(), self.mouse.state())

    def restore(self, state: tuple) -> None:
        """Put ``state`` back and drive IRQ 1 and IRQ 12 to the levels it implies.  In a
        machine snapshot, restore before the interrupt controller (whose own state then wins)."""
        controller, keyboard, mouse = state
        for name, value in zip(CONTROLLER_FIELDS, controller):
            setattr(self, name, value)
        self.keyboard.restore(keyboard)
        self.mouse.restore(mouse)
        self._update_lines()


# The output buffer's sources by priority: pending bit, obsrc, whether it is mouse data.
SOURCES = ((PENDING_CTRL_KBD, OBSRC_CTRL, False), (PENDING_CTRL_AUX, OBSRC_CTRL, True),
           (PENDING_KBD, OBSRC_KBD, False), (PENDING_AUX, OBSRC_MOUSE, True))

# Controller command (port 0x64) -> handler.
CONTROLLER_COMMANDS: dict[int, Callable[[I8042], None]] = {
    0x20: lambda kbc: kbc._queue(kbc.mode),                            # read command byte
    0x60: lambda kbc: kbc._expect_data(0x60),                          # write command byte
    0xA7: lambda kbc: kbc._set_mode_bits(MODE_DISABLE_MOUSE, 0),       # disable mouse interface
    0xA8: lambda kbc: kbc._set_mode_bits(0, MODE_DISABLE_MOUSE),       # enable mouse interface
    0xA9: lambda kbc: kbc._queue(0x00),                                # mouse interface test: OK
    0xAA: I8042._self_test,                                            # controller self-test: 0x55
    0xAB: lambda kbc: kbc._queue(0x00),                                # keyboard interface test: OK
    0xAD: lambda kbc: kbc._set_mode_bits(MODE_DISABLE_KBD, 0),         # disable keyboard interface
    0xAE: lambda kbc: kbc._set_mode_bits(0, MODE_DISABLE_KBD),         # enable keyboard interface
    0xC0: lambda kbc: kbc._queue(0x80),                                # read input port
    0xD0: lambda kbc: kbc._queue(kbc.outport),                         # read output port
    0xD1: lambda kbc: kbc._expect_data(0xD1),                          # write output port
    0xD2: lambda kbc: kbc._expect_data(0xD2),                          # write keyboard output buffer
    0xD3: lambda kbc: kbc._expect_data(0xD3),                          # write mouse output buffer
    0xD4: lambda kbc: kbc._expect_data(0xD4),                          # write to the mouse
    0xDD: lambda kbc: kbc._set_a20(False),                             # A20 off (HP Vectra)
    0xDF: lambda kbc: kbc._set_a20(True),                              # A20 on
    0xFE: I8042._request_reset,                                        # pulse reset
    0xFF: I8042._ignore,                                               # pulse nothing
}
# The pending command (write_cmd) -> what a byte written to port 0x60 does; 0: to the keyboard.
DATA_WRITES: dict[int, Callable[[I8042, int], None]] = {
    0x60: I8042._write_mode,
    0xD1: I8042._write_outport,
    0xD2: lambda kbc, value: kbc._queue(value),
    0xD3: lambda kbc, value: kbc._queue(value, aux=True),
    0xD4: I8042._to_mouse,
}
