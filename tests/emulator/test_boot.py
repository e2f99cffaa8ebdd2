"""Every boot state starts a guest with the documented register state."""
import struct

import pytest

from ringminus import Machine, StopReason
from ringminus.emulator.boot import GDT_BASE, GUEST_STACK_TOP, IDT_BASE

from ..helpers import asm, run_guest

RESET_JUMP = bytes.fromhex("e90d00")   # at 0xFFF0: jmp near 0x0000 (rel16 0x000d)

PRINT_AND_HALT = "mov al, 0x4f; out 0xe9, al; mov al, 0x4b; out 0xe9, al; mov ebx, 0xC0FFEE; hlt"


def test_real_mode_starts_at_0_7c00():
    _, r = run_guest(PRINT_AND_HALT + "", "real")
    assert r.stop.reason is StopReason.HLT
    assert r.console == "OK"
    assert r.regs["rbx"] == 0xC0FFEE
    assert r.regs["cs"] == {"selector": 0, "base": 0, "limit": 0xFFFF, "attributes": 0x9B}
    assert r.regs["cr0"] == 0x6000_0010 and r.regs["rflags"] & 0x2
    assert r.regs["rip"] == 0x7C00 + len(asm(PRINT_AND_HALT, 16))


@pytest.mark.parametrize("boot,cs,attributes", [("protected", 0x08, 0xC09B), ("long", 0x28, 0xA09B)])
def test_flat_modes_at_cpl0(boot, cs, attributes):
    _, r = run_guest(PRINT_AND_HALT, boot)
    assert r.stop.reason is StopReason.HLT and r.console == "OK"
    assert r.regs["cs"]["selector"] == cs and r.regs["cs"]["attributes"] == attributes
    assert r.regs["ss"]["attributes"] == 0xC093
    assert r.regs["cpl"] == 0 and r.regs["rsp"] == GUEST_STACK_TOP
    assert r.regs["gdtr"]["base"] == GDT_BASE and r.regs["idtr"]["base"] == IDT_BASE
    assert r.regs["tr"]["selector"] == 0x38
    if boot == "long":
        assert r.regs["efer"] & 0x500 == 0x500 and r.regs["cr0"] & 0x8000_0001 == 0x8000_0001
        assert r.regs["cr4"] & 0x20
    else:
        assert r.regs["cr0"] & 0x8000_0001 == 0x1 and r.regs["efer"] == 0


def test_long_mode_identity_maps_all_ram():
    # The last byte of the 64 MiB of RAM is reachable through the identity map.
    _, r = run_guest("mov rax, 0x3ffffff; mov byte ptr [rax], 0x5a; movzx ebx, byte ptr [rax]; hlt", "long")
    assert r.stop.reason is StopReason.HLT and r.regs["rbx"] == 0x5A


@pytest.mark.parametrize("boot,cs,ss", [("protected", 0x1B, 0x23), ("long", 0x33, 0x23)])
def test_cpl3_entry(boot, cs, ss):
    # Ring 3 finds the machine's tables with SGDT/SIDT and can still use the console.
    src = "sgdt [0x70000]; sidt [0x70010]; mov al, 0x33; out 0xe9, al; mov ecx, 7; out 0xf4, al"
    machine, r = run_guest(src, boot, cpl=3)
    assert r.stop.reason is StopReason.EXIT and r.stop.value == 0x33 and r.console == "3"
    assert r.regs["cpl"] == 3
    assert r.regs["cs"]["selector"] == cs and r.regs["ss"]["selector"] == ss
    assert r.regs["cs"]["attributes"] & 0x60 == 0x60          # DPL 3
    _, gdt_base = struct.unpack_from("<HI", machine.read_memory(0x70000, 6))
    _, idt_base = struct.unpack_from("<HI", machine.read_memory(0x70010, 6))
    assert (gdt_base, idt_base) == (GDT_BASE, IDT_BASE)


def test_bios_boots_from_the_reset_vector():
    # 64 KiB image: code at offset 0; the reset vector (0xFFFFFFF0) jumps to it.
    body = asm("mov ebp, edx; mov al, 0x42; out 0xe9, al; mov eax, cs:[0xfff0]; mov ebx, eax; "
               "ljmp 0xf000:0x20", 16)
    low = asm("mov al, 0x4c; out 0xe9, al; hlt", 16)        # runs from the 0xF0000 alias
    image = bytearray(0x10000)
    image[0:len(body)] = body
    image[0x20:0x20 + len(low)] = low
    image[0xFFF0:0xFFF3] = RESET_JUMP
    machine = Machine()
    machine.load_bios(bytes(image))
    machine.boot("bios")
    start = machine.result().regs
    assert start["cs"] == {"selector": 0xF000, "base": 0xFFFF0000, "limit": 0xFFFF, "attributes": 0x9B}
    assert start["rip"] == 0xFFF0 and start["rdx"] == 0x0006_0FB1 and start["cr0"] == 0x6000_0010
    assert start["rflags"] == 0x2 and start["dr6"] == 0xFFFF0FF0 and start["dr7"] == 0x400
    assert start["gdtr"] == {"base": 0, "limit": 0xFFFF} and start["idtr"] == {"base": 0, "limit": 0xFFFF}
    assert start["ds"] == {"selector": 0, "base": 0, "limit": 0xFFFF, "attributes": 0x93}
    r = machine.run()
    assert r.stop.reason is StopReason.HLT and r.console == "BL"
    assert r.regs["rbp"] == 0x0006_0FB1
    assert r.regs["rbx"] & 0xFFFF == int.from_bytes(RESET_JUMP[:2], "little")
    assert r.regs["cs"]["base"] == 0xF0000


def test_bios_rom_is_read_only():
    # Writes to the ROM are dropped, as on QEMU: the byte reads back unchanged.
    image = bytearray(0x10000)
    code = asm("mov byte ptr cs:[0], 1; mov al, cs:[0]; hlt", 16)
    image[:len(code)] = code
    image[0xFFF0:0xFFF3] = RESET_JUMP
    machine = Machine()
    machine.load_bios(bytes(image))
    machine.boot("bios")
    r = machine.run()
    assert r.stop.reason is StopReason.HLT and r.regs["rax"] & 0xFF == code[0]
    assert r.stats["rom_writes_ignored"] == 1
