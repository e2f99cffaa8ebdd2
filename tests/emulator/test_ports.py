"""The port-I/O bus: console, exit device, user handlers, unclaimed ports, I/O permission."""
import pytest

from ringminus import Machine, StopReason
from ringminus.emulator.boot import TSS_BASE
from ringminus.emulator.ports import PortBus

from ..helpers import LOAD, asm, run_guest


@pytest.mark.parametrize("boot", ["real", "protected", "long"])
@pytest.mark.parametrize("form", ["mov al, 5; out 0xf4, al", "mov al, 5; mov dx, 0xf4; out dx, al",
                                  "mov eax, 0x105; mov dx, 0xf4; out dx, eax"])
def test_exit_stops_before_any_later_instruction(boot, form):
    source = f"mov ebx, 1; {form}; mov ebx, 2; mov ecx, 3; hlt"
    _, result = run_guest(source, boot)
    assert result.stop.reason is StopReason.EXIT
    assert result.stop.value & 0xFF == 5 and result.stop.exit_status == 11
    assert result.regs["rbx"] == 1 and result.regs["rcx"] == 0
    assert result.stop.rip == result.regs["rip"] == LOAD[boot] + len(asm(f"mov ebx, 1; {form}", 16 if boot == "real" else 32 if boot == "protected" else 64))


def test_exit_is_exact_in_counted_runs():
    _, result = run_guest("mov ecx, 10; l: dec ecx; jnz l; mov al, 1; out 0xf4, al; inc ebx; hlt", "protected",
                          max_instructions=1000)
    assert result.stop.reason is StopReason.EXIT and result.instructions == 1 + 20 + 2
    assert result.regs["rbx"] == 0


def test_exit_from_code_the_guest_copied_itself():
    # Code the guest writes at run time was never scanned: the exit still ends the run.
    payload = asm("mov al, 9; out 0xf4, al; hlt", 32, 0x200000)
    source = "mov esi, 0x180000; mov edi, 0x200000; mov ecx, %d; rep movsb; mov eax, 0x200000; jmp eax" % len(payload)
    machine = Machine()
    machine.write_memory(0x100000, asm(source, 32, 0x100000))
    machine.memory.load(0x180000, payload)        # bytes only: not scanned for code sites
    machine.boot("protected", 0x100000)
    result = machine.run()
    assert result.stop.reason is StopReason.EXIT and result.stop.value == 9


def test_user_port_handlers_and_unclaimed_ports():
    writes = []
    source = ("mov dx, 0x80; mov al, 0x11; out dx, al; in al, dx; mov bl, al; "
              "mov dx, 0x1234; in al, dx; mov cl, al; in ax, dx; mov si, ax; in eax, dx; mov edi, eax; "
              "out dx, al; in al, 0xe9; mov ah, al; hlt")

    def setup(m):
        m.ports.register(0x80, read=lambda port, size: 0x5A, write=lambda port, size, value: writes.append((port, size, value)))

    _, result = run_guest(source, "protected", setup=setup)
    assert writes == [(0x80, 1, 0x11)]
    assert result.regs["rbx"] & 0xFF == 0x5A
    assert result.regs["rcx"] & 0xFF == 0xFF and result.regs["rsi"] & 0xFFFF == 0xFFFF
    assert result.regs["rdi"] == 0xFFFFFFFF
    assert (result.regs["rax"] >> 8) & 0xFF == 0xE9            # debugcon read-back
    assert result.stats["unclaimed_port_reads"] == 3 and result.stats["unclaimed_port_writes"] == 1
    assert result.stats["unclaimed_ports"] == [0x1234]


def test_precise_user_device_can_stop_the_run():
    def setup(m):
        m.ports.register(0x99, write=lambda port, size, value: m.request_stop(value=value), precise=True)

    _, result = run_guest("mov al, 0x42; out 0x99, al; mov ebx, 1; hlt", "long", setup=setup)
    assert result.stop.reason is StopReason.STOPPED and result.stop.value == 0x42
    assert result.regs["rbx"] == 0


def test_emulated_out_honours_the_tss_io_bitmap():
    # Ring 3 sets the bitmap bit of port 0xF4 (the TSS is writable with paging off): the OUT
    # raises #GP(0) instead of exiting; the #GP handler then exits with another value.
    bit_byte = TSS_BASE + 0x68 + 0xF4 // 8
    source = f"or byte ptr [{bit_byte:#x}], {1 << (0xF4 % 8):#x}; mov al, 1; out 0xf4, al; hlt"

    def setup(m):
        from ringminus.emulator.boot import IDT_BASE
        from ringminus.arch.segments import SYS_TRAP_GATE, pack_gate
        m.write_memory(0x200000, asm("mov ebx, [esp]; and byte ptr [%#x], 0; mov al, 2; out 0xf4, al" % bit_byte,
                                     32, 0x200000))
        m.write_memory(IDT_BASE + 13 * 8, pack_gate(0x200000, 0x08, SYS_TRAP_GATE))

    _, result = run_guest(source, "protected", cpl=3, setup=setup)
    assert result.stop.reason is StopReason.EXIT and result.stop.value == 2
    assert result.regs["rbx"] == 0 and result.regs["cpl"] == 0


def test_a_movable_block_follows_its_base_over_what_is_there():
    bus = PortBus()
    bus.register(0x200, read=lambda port, size: 0x11)
    seen = []
    place = bus.movable_block(8, lambda offset, size: offset, lambda offset, size, value: seen.append((offset, value)))
    place(0x1FC)
    assert bus.read(0x1FE, 1) == 2 and bus.read(0x200, 1) == 4      # offsets, over the port below
    bus.write(0x203, 1, 0x5A)
    assert seen == [(7, 0x5A)]
    place(0xFFFC)                                                   # would pass 0xFFFF: nowhere
    assert bus.read(0x200, 1) == 0x11 and bus.device(0x1FC) is None and bus.device(0xFFFC) is None
