"""The pc and q35 boards (platform/boards.py): QEMU's PCI functions, PAM shadow RAM, q35's
MMCONFIG window, the PM block and port 0x92, driven by guests and through the API."""
from __future__ import annotations

import json
import struct

import pytest

from ringminus import Machine, StopReason
from ringminus.emulator.memory import UnbackedMemory
from ringminus.arch.segments import SYS_INT_GATE, pack_gate

from ..helpers import asm, run_cli

BIOS = bytes(range(256)) * 256 + b"\x00" * 0x10000 * 2 + b"\xf4" * 0x10000      # 256 KiB, HLTs at the end


def config(machine: Machine, device: int, function: int, offset: int, size: int = 4) -> int:
    return machine.pci.read_config(0, device, function, offset, size)


@pytest.mark.parametrize("kind, functions", [
    ("pc", {(0, 0): (0x1237, 0x060000, 0x00), (1, 0): (0x7000, 0x060100, 0x80), (1, 1): (0x7010, 0x010180, 0x00),
            (1, 3): (0x7113, 0x068000, 0x00)}),
    ("q35", {(0, 0): (0x29C0, 0x060000, 0x00), (0x1F, 0): (0x2918, 0x060100, 0x80),
             (0x1F, 2): (0x2922, 0x010601, 0x80), (0x1F, 3): (0x2930, 0x0C0500, 0x80)}),
])
def test_the_functions_qemu_builds_answer_configuration_mechanism_1(kind, functions):
    # A real-mode guest reads vendor/device, class and header type of each function through
    # 0xCF8/0xCFC; an absent function reads all ones.
    machine = Machine(machine=kind)
    reads = []
    for device, function in [*functions, (3, 0)]:
        address = 0x8000_0000 | device << 11 | function << 8
        reads += [f"mov eax, {address:#x}; mov dx, 0xcf8; out dx, eax; mov dx, 0xcfc; in eax, dx; push eax",
                  f"mov eax, {address | 8:#x}; mov dx, 0xcf8; out dx, eax; mov dx, 0xcfc; in eax, dx; push eax",
                  f"mov eax, {address | 0x2C:#x}; mov dx, 0xcf8; out dx, eax; mov dx, 0xcfc; in ax, dx; push eax",
                  f"mov eax, {address | 0x0C:#x}; mov dx, 0xcf8; out dx, eax; mov dx, 0xcfe; in al, dx; push eax"]
    machine.write_memory(0x7C00, asm("mov esp, 0x7000; " + "; ".join(reads) + "; hlt", 16, 0x7C00))
    machine.boot("real", 0x7C00)
    assert machine.run().stop.reason is StopReason.HLT
    stack = struct.unpack(f"<{4 * (len(functions) + 1)}I", machine.read_memory(0x7000 - 16 * (len(functions) + 1),
                                                                                16 * (len(functions) + 1)))[::-1]
    for i, (device_id, class_code, header) in enumerate(functions.values()):
        ids, revision_class, subsystem, header_byte = stack[4 * i:4 * i + 4]
        assert ids == 0x8086 | device_id << 16
        assert revision_class >> 8 == class_code
        assert subsystem & 0xFFFF == 0x1AF4                    # SeaBIOS's qemu_detect needs it
        assert header_byte & 0xFF == header
    assert stack[-4] == 0xFFFF_FFFF                            # no function at 00:03.0


@pytest.mark.parametrize("kind, pam", [("pc", 0x59), ("q35", 0x90)])
def test_pam_shows_the_bios_then_ram_then_read_only_ram(kind, pam):
    # SeaBIOS's dance: the F-segment shows the BIOS (PCI space) at reset (BL); with 0x30 it
    # is the RAM the BIOS copies itself into (CL, and a write sticks); with 0x10 that RAM is
    # read-only (the second write is dropped: CH).
    machine = Machine(machine=kind)
    machine.load_bios(BIOS)
    machine.write_memory(0xF0000, b"\x11\x22")                 # RAM beneath, hidden at reset
    code = asm(f"""
        mov ax, 0xf000; mov ds, ax
        mov bl, [0]
        mov eax, {0x8000_0000 | pam & ~3:#x}; mov dx, 0xcf8; out dx, eax
        mov dx, {0xCFC + (pam & 3):#x}; mov al, 0x30; out dx, al
        mov cl, [0]
        mov byte ptr [1], 0x33
        mov al, 0x10; out dx, al
        mov byte ptr [1], 0x44
        mov ch, [1]
        hlt""", 16, 0x7C00)
    machine.write_memory(0x7C00, code)
    machine.boot("real", 0x7C00)
    result = machine.run()
    assert result.stop.reason is StopReason.HLT
    regs = result.regs
    assert regs["rbx"] & 0xFF == BIOS[0x30000] and regs["rcx"] & 0xFFFF == 0x3311
    assert machine.read_memory(0xF0000, 2) == b"\x11\x33"
    assert config(machine, 0, 0, pam, 1) == 0x10


def test_the_bios_image_ends_at_4_gib_and_its_tail_at_1_mib():
    machine = Machine(machine="q35")
    machine.load_bios(BIOS)
    assert machine.read_memory(0xFFFF_FFF0, 16) == BIOS[-16:] == machine.read_memory(0xFFFF0, 16)
    assert machine.read_memory(0xC0000, 16) == bytes(16)       # pc.rom: zeros


def test_q35_mmconfig_window_follows_pciexbar():
    # PCIEXBAR = 0xB0000001 opens 256 MiB of MMCONFIG: the MCH's vendor/device and an absent
    # function's all ones read through memory; register 0x100 and up read all ones.
    machine = Machine(machine="q35")
    code = asm("""
        mov eax, 0x80000060; mov dx, 0xcf8; out dx, eax
        mov dx, 0xcfc; mov eax, 0xb0000001; out dx, eax
        mov ebx, [0xb0000000]
        mov ecx, [0xb00f8000]
        mov esi, [0xb0000100]
        mov edi, [0xb00fa02c]
        hlt""", 32, 0x100000)
    machine.write_memory(0x100000, code)
    machine.boot("protected", 0x100000)
    result = machine.run()
    assert result.stop.reason is StopReason.HLT
    regs = result.regs
    assert regs["rbx"] == 0x29C0_8086 and regs["rsi"] == 0xFFFF_FFFF
    assert regs["rcx"] == 0x2918_8086                          # 00:1f.0 through the window
    assert regs["rdi"] == 0x1100_1AF4                          # AHCI's subsystem
    machine.pci.write_config(0, 0, 0, 0x60, 4, 0xB000_0000)   # disabled: the window goes
    assert "pcie-mmcfg" not in [region.name for region in machine.mmio.regions]


@pytest.mark.parametrize("kind, function, enable", [("pc", (1, 3), (0x80, 0x01)), ("q35", (0x1F, 0), (0x44, 0x80))])
def test_the_pm_timer_counts_at_3_58_mhz_of_the_clock(kind, function, enable):
    machine = Machine(machine=kind)
    machine.pci.write_config(0, *function, 0x40, 4, 0x601)
    machine.pci.write_config(0, *function, enable[0], 1, enable[1])
    code = asm("mov dx, 0x608; in eax, dx; mov ebx, eax; mov ecx, 100000; l: loop l; in eax, dx; hlt", 32, 0x100000)
    machine.write_memory(0x100000, code)
    machine.boot("protected", 0x100000)
    result = machine.run()
    elapsed = (result.regs["rax"] - result.regs["rbx"]) & 0xFF_FFFF
    assert elapsed == pytest.approx(100_000 * 3_579_545 / 1e9, abs=1)       # 1 instruction = 1 ns


def test_port_92_reset_bit_stops_the_run():
    machine = Machine(machine="pc")
    machine.write_memory(0x7C00, asm("mov al, 2; out 0x92, al; in al, 0x92; mov bl, al; mov al, 3; out 0x92, al; "
                                     "hlt", 16, 0x7C00))
    machine.boot("real", 0x7C00)
    result = machine.run()
    assert result.regs["rbx"] & 0xFF == 2
    assert result.stop.reason is StopReason.SHUTDOWN and "0x92" in result.stop.detail


def test_a_snapshot_restores_pam_and_mmconfig():
    machine = Machine(machine="q35")
    machine.load_bios(BIOS)
    snapshot = machine.snapshot()
    machine.pci.write_config(0, 0, 0, 0x90, 1, 0x30)
    machine.pci.write_config(0, 0, 0, 0x60, 4, 0xB000_0001)
    machine.write_memory(0xF0000, b"\x99")
    windows = lambda: [region.name for region in machine.mmio.regions if region.name == "pcie-mmcfg"]   # noqa: E731
    assert machine.read_memory(0xF0000, 1) == b"\x99" and windows()
    machine.restore(snapshot)
    assert machine.read_memory(0xF0000, 1) == BIOS[0x30000:0x30001] and not windows()


@pytest.mark.parametrize("kind, below", [("pc", 0xC000_0000), ("q35", 0x8000_0000)])
def test_ram_past_the_pci_hole_shows_at_4_gib(kind, below):
    # -m 4G: QEMU's pc keeps 3 GiB below 4 GiB, q35 2 GiB; the rest of the same RAM shows at
    # 4 GiB, as a long-mode guest reads it, and the hole between belongs to devices.
    machine = Machine(machine=kind, memory_size=4 << 30)
    machine.write_memory(below - 8, b"lowtop!!")
    machine.write_memory(1 << 32, b"high RAM")
    assert [(base, size) for base, _offset, size in machine.memory.ram_blocks] == [(0, below), (1 << 32, (4 << 30) - below)]
    assert machine.memory.ram[below - 8:below + 8].tobytes() == b"lowtop!!high RAM"
    code = asm("mov rax, 0x100000000; mov rbx, [rax]; hlt", 64, 0x100000)
    machine.write_memory(0x100000, code)
    machine.boot("long", 0x100000)
    result = machine.run(max_instructions=10)
    assert result.stop.reason is StopReason.HLT and result.regs["rbx"].to_bytes(8, "little") == b"high RAM"
    assert machine.memory.ram_offset(below) is None and machine.memory.ram_offset((4 << 30) - 1) is None
    with pytest.raises(UnbackedMemory):             # the hole below 4 GiB is not RAM
        machine.read_memory(below + 0x1000_0000, 4)


@pytest.mark.parametrize("mem, said", [("100M", True), ("4G", False)])
def test_a_ram_size_without_qemu_tables_says_so(tmp_path, capsys, mem, said):
    image = tmp_path / "bios.bin"
    image.write_bytes(b"\xf4" * 0x10000)              # HLT at the reset vector
    status, _out, err = run_cli(capsys, "run", "--machine", "q35", "--mem", mem, "--boot", "bios", str(image))
    assert status == 0 and ("no ACPI/SMBIOS tables recorded from QEMU for 100 MiB on q35" in err) == said


@pytest.mark.parametrize("args, message", [
    (["--machine", "foo"], "invalid choice"),
    (["--machine", "q35", "--chipset", "pc"], "contradicts"),
])
def test_machine_option_errors_are_one_line(tmp_path, capsys, args, message):
    image = tmp_path / "i.bin"
    image.write_bytes(b"\xf4")
    status, _out, err = run_cli(capsys, "run", str(image), *args)
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("listed", [False, True])
def test_timer_interrupts_are_counted_not_listed_unless_asked(tmp_path, capsys, listed):
    # The 8254's IRQ 0 (QEMU's power-on mode 3, about 18.2 Hz) through the unmasked 8259 and
    # an ExtINT LINT0 (masked at reset, as QEMU 7.2's) to vector 0x20, ten times, each waking
    # `sti; hlt`.  The image at 1 MiB holds the code, the handler at +0x600, the IDTR at +0x700
    # and the IDT at +0x800.
    base = 0x100000
    code = asm(f"""
        lidt [{base + 0x700:#x}]
        mov dword ptr [0xfee00350], 0x700
        mov al, 0x11
        out 0x20, al
        mov al, 0x20
        out 0x21, al
        mov al, 4
        out 0x21, al
        mov al, 1
        out 0x21, al
        mov al, 0xfe
        out 0x21, al
        mov ecx, 10
    wait:
        sti
        hlt
        loop wait
        cli
        hlt
    """, 32, base)
    image = bytearray(0x800 + 0x21 * 8)
    image[:len(code)] = code
    handler = asm("push eax\nmov al, 0x20\nout 0x20, al\npop eax\niretd", 32, base + 0x600)
    image[0x600:0x600 + len(handler)] = handler
    image[0x700:0x706] = struct.pack("<HI", 0x21 * 8 - 1, base + 0x800)
    image[0x800 + 0x20 * 8:] = pack_gate(base + 0x600, 0x08, SYS_INT_GATE)
    path = tmp_path / "ticks.bin"
    path.write_bytes(bytes(image))
    status, out, err = run_cli(capsys, "run", "--machine", "pc", "--boot", "protected", "--json", "--max-insns", 10000, path,
                               *(["--log-interrupts"] if listed else []))
    result = json.loads(out)
    assert result["stop"]["reason"] == "hlt" and result["stats"]["device_interrupts"] == 10
    assert len([e for e in result["events"] if e["kind"] == "external"]) == (10 if listed else 0)


def test_a_usage_error_after_the_board_is_built_stays_one_line(tmp_path, capsys):
    # The note about unrecorded tables comes after the run, so a later error is the only line
    # (fuzz inputs seed 3625147).
    image = tmp_path / "bios.bin"
    image.write_bytes(b"\xf4" * 0x10000)
    status, _out, err = run_cli(capsys, "run", "--machine", "q35", "--mem", "8M", "--boot", "bios", str(image),
                                "--guest", "--hypercall", "0x100000000000000000000=deny")
    assert status == 2 and len(err.strip().splitlines()) == 1 and "--hypercall" in err
