"""Multiboot direct boot (``--kernel``) as QEMU 7.2's -kernel: QEMU's buffer and information
structure in fw_cfg, its multiboot_dma.bin option ROM run by Debian's SeaBIOS, the kernel
entered as the specification and QEMU's ROM do (platform.md §11)."""
from __future__ import annotations

import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from ringminus import Machine, StopReason
from ringminus.emulator.loader import ImageError
from ringminus.platform import multiboot

from ..helpers import run_cli

SEABIOS = Path("/usr/share/seabios/bios-256k.bin")
ROMS = Path("/usr/share/qemu")
KUT = Path(__file__).parents[1] / "kut"             # kvm-unit-tests' svm.flat (SOURCE.txt)
DATA = Path(__file__).parent / "data"
ENTRY = 0x100040
needs_firmware = pytest.mark.skipif(
    not (SEABIOS.exists() and (ROMS / "multiboot_dma.bin").exists() and (ROMS / "kvmvapic.bin").exists()),
    reason="Debian's seabios and qemu-system-data are not installed")


def aout_kernel(code: bytes, bss: int = 0) -> bytes:
    """An a.out-kludge multiboot kernel at 1 MiB: the header, then ``code`` at ENTRY."""
    flags = 0x10000
    header = struct.pack("<8I", multiboot.MAGIC, flags, -(multiboot.MAGIC + flags) & 0xFFFF_FFFF,
                         0x100000, 0x100000, 0, 0x100000 + 0x40 + len(code) + bss if bss else 0, ENTRY)
    return header.ljust(0x40, b"\0") + code


def test_the_buffer_and_information_are_laid_out_as_qemu_lays_them():
    kernel = aout_kernel(b"\xf4", bss=0x1800)
    loaded = multiboot.load(kernel, "probe.bin", "-foo bar", [("env.txt", b"A=1\n"), ("two x y", b"2" * 5000)])
    assert (loaded.entry, loaded.load_address) == (ENTRY, 0x100000)
    flags, lower, upper, device, cmdline, count, records = struct.unpack_from("<7I", loaded.info)
    assert (flags, lower, upper, device, count) == (0x24F, 0, 0, 0x8000FFFF, 2)
    assert struct.unpack_from("<I", loaded.info, 48)[0] == 0x9000
    base = loaded.load_address
    text = lambda address: loaded.buffer[address - base:loaded.buffer.index(b"\0", address - base)].decode()  # noqa: E731
    assert records == base + 0x2000                 # after the kernel and its BSS, page aligned
    first, second = struct.unpack_from("<3I", loaded.buffer, records - base), struct.unpack_from("<3I", loaded.buffer, records - base + 16)
    assert (text(first[2]), text(second[2]), text(cmdline)) == ("env.txt", "two x y", "probe.bin -foo bar")
    assert text(struct.unpack_from("<I", loaded.info, 64)[0]) == "qemu"
    assert first[:2] == (base + 0x3000, base + 0x3004) and second[:2] == (base + 0x4000, base + 0x4000 + 5000)
    assert loaded.buffer[first[0] - base:first[1] - base] == b"A=1\n" and len(loaded.buffer) == 0x6000


@pytest.mark.parametrize("kernel, message", [
    (b"\0" * 64, "no multiboot header"),
    (struct.pack("<3I", multiboot.MAGIC, 0, -multiboot.MAGIC & 0xFFFF_FFFF) + b"\0" * 64, "must be ELF"),
    (struct.pack("<8I", multiboot.MAGIC, 0x10000, -(multiboot.MAGIC + 0x10000) & 0xFFFF_FFFF,
                 0x1000, 0x2000, 0, 0, 0x2000), "invalid multiboot load address"),
])
def test_a_kernel_qemu_refuses_is_an_image_error(kernel, message):
    with pytest.raises(ImageError, match=message):
        multiboot.load(kernel, "k", "")


@needs_firmware
@pytest.mark.parametrize("kind, mmap_length", [("pc", 0xA8), ("q35", 0xD8)])
def test_seabios_enters_the_kernel_as_qemus_rom_does(kind, mmap_length):
    # The entry state QEMU's multiboot_dma.bin leaves (platform.md §11.3, observed with -m 128M).
    machine = Machine(machine=kind, memory_size=128 << 20, debugcon_port=0x402)
    machine.load_bios(SEABIOS.read_bytes())
    machine.board.add_option_rom("kvmvapic.bin", (ROMS / "kvmvapic.bin").read_bytes())
    multiboot.load(aout_kernel(b"\xf4"), "probe.bin", "-foo bar", [("env.txt", b"A=1\n")]).install(
        machine.board.fw_cfg, (ROMS / "multiboot_dma.bin").read_bytes())
    machine.boot("bios")
    result = machine.run(max_instructions=100_000_000)
    assert result.stop.reason is StopReason.HLT and result.regs["rip"] == ENTRY + 1
    regs = result.regs
    assert (regs["rax"], regs["rbx"], regs["rcx"], regs["cr0"], regs["cr4"]) == (0x2BADB002, 0x9500, ENTRY, 0x11, 0)
    assert regs["cs"]["selector"] == 0x08 and regs["ds"]["selector"] == 0x10 and not regs["rflags"] & 0x600
    info = machine.read_memory(0x9500, 88)
    flags, lower, upper = struct.unpack_from("<3I", info)
    assert (flags, lower, upper) == (0x24F, 639, 0x1FB80)
    assert struct.unpack_from("<2I", info, 44) == (mmap_length, 0x9000)
    assert machine.read_memory(0x9000, 24) == struct.pack("<IQQI", 20, 0, 0x9FC00, 1)
    assert "Booting from c000:003c" in result.console


KUT_ARGS = ["--kernel", str(KUT / "svm.flat"), "--append", "-pause_filter_test -svm_unsupported_instruction_intercept_test"]


@needs_firmware
def test_kvm_unit_tests_svm_boots_with_qemus_seabios_log(tmp_path, capsys):
    # q35 with 4 GiB, as kvm-unit-tests' runner gives it (with -nographic: QEMU's runner has
    # -display none, whose SeaBIOS has no serial console; the log is otherwise the same).
    status, out, _err = run_cli(capsys, "run", "--machine", "q35", "--mem", "4G", "--debugcon-port", "0x402",
                                *KUT_ARGS, "--until-console", "SVM test: vmrun", "--json")
    result = json.loads(out)
    assert result["stop"]["reason"] == "output"
    recorded = (DATA / "seabios-q35-svm.flat-4096M-qemu-7.2.log").read_text()
    assert result["console"] == recorded
    assert "enabling apic" in result["serial"] and "PASS: null" in result["serial"]
    if shutil.which("qemu-system-x86_64"):
        log = tmp_path / "debug.log"
        subprocess.run(["timeout", "5", "qemu-system-x86_64", "-nodefaults", "-machine", "q35,accel=tcg",
                        "-cpu", "max,+svm", "-m", "4g", "-smp", "1", "-nographic", "-monitor", "none",
                        "-serial", "null", "-chardev", f"file,id=dbg,path={log}",
                        "-device", "isa-debugcon,iobase=0x402,chardev=dbg", *(a.replace("--", "-", 1) if a.startswith("--") else a for a in KUT_ARGS)],
                       capture_output=True)
        assert log.read_text(errors="replace") == recorded


@pytest.mark.parametrize("args, message", [
    (["--append", "x", "image.bin"], "need --kernel"),
    (["--kernel", "missing.flat"], "missing.flat"),
    (["--kernel", "image.bin", "--boot", "long"], "cannot be combined with --boot long"),
    (["--kernel", "image.bin"], "no multiboot header"),
])
def test_kernel_option_errors_are_one_line(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "image.bin").write_bytes(b"\xf4" * 64)
    status, _out, err = run_cli(capsys, "run", "--machine", "q35", *args)
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1
