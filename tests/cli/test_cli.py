"""The command line: JSON schema, exit statuses, options, and one-line usage errors."""
import json
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from ..helpers import asm, run_cli

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_hello_example_summary(capsys):
    status, out, _ = run_cli(capsys, "run", EXAMPLES / "hello.bin")
    assert status == 0
    assert "Hello from ringminus!" in out and "stop: hlt" in out and "rbx=0x0000000052494e47" in out


def test_json_schema(tmp_path, capsys):
    image = write(tmp_path, "g.bin", asm("mov al, 0x41; out 0xe9, al; mov ebx, 0x1234; mov al, 3; out 0xf4, al", 32, 0x100000))
    status, out, _ = run_cli(capsys, "run", image, "--boot", "protected", "--json", "--max-insns", "100")
    doc = json.loads(out)
    assert status == 7                                       # 2 * 3 + 1
    assert doc["stop"] == {"reason": "exit", "rip": 0x100000 + 13, "value": 3}
    assert doc["console"] == "A" and doc["instructions"] == 5
    regs = doc["regs"]
    assert regs["rbx"] == 0x1234 and regs["rip"] == 0x10000D
    assert regs["cs"] == {"selector": 8, "base": 0, "limit": 0xFFFFFFFF, "attributes": 0xC09B}
    for name in ("rax", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r15", "rflags", "cr0", "cr2",
                 "cr3", "cr4", "efer", "cpl"):
        assert isinstance(regs[name], int)
    for name in ("cs", "ds", "es", "fs", "gs", "ss", "ldtr", "tr"):
        assert set(regs[name]) == {"selector", "base", "limit", "attributes"}
    assert set(regs["gdtr"]) == set(regs["idtr"]) == {"base", "limit"}
    assert doc["stats"]["port_writes"] == 2


def test_plain_run_may_not_count(tmp_path, capsys):
    image = write(tmp_path, "g.bin", asm("hlt", 16))
    _, out, _ = run_cli(capsys, "run", image, "--json")
    assert json.loads(out)["instructions"] is None


def test_limit_is_exact(tmp_path, capsys):
    image = write(tmp_path, "loop.bin", asm("mov ecx, 1000000; l: inc eax; dec ecx; jnz l; hlt", 16, 0x7C00))
    status, out, _ = run_cli(capsys, "run", image, "--max-insns", "1001", "--json")
    doc = json.loads(out)
    assert status == 10 and doc["stop"]["reason"] == "limit"
    assert doc["instructions"] == 1001
    assert doc["regs"]["rax"] == 334 and doc["regs"]["rcx"] == 1000000 - 333   # 1 + 3*333 + 1 (inc)


def test_timeout(tmp_path, capsys):
    image = write(tmp_path, "spin.bin", asm("l: jmp l", 16, 0x7C00))
    status, out, _ = run_cli(capsys, "run", image, "--timeout", "0.2", "--json")
    assert status == 12 and json.loads(out)["stop"]["reason"] == "timeout"


def test_set_blob_and_debugcon_port(tmp_path, capsys):
    image = write(tmp_path, "g.bin", asm("mov al, [0x9000]; mov dx, 0x402; out dx, al; hlt", 16, 0x7C00))
    blob = write(tmp_path, "data.bin", b"Z")
    status, out, _ = run_cli(capsys, "run", image, "--blob", f"{blob}@0x9000", "--set", "rbx=0x77", "--set", "ESI=5",
                             "--debugcon-port", "0x402", "--json")
    doc = json.loads(out)
    assert status == 0 and doc["console"] == "Z"
    assert doc["regs"]["rbx"] == 0x77 and doc["regs"]["rsi"] == 5
    assert doc["stats"]["unclaimed_ports"] == []


def test_set_segment_register_in_real_mode(tmp_path, capsys):
    image = write(tmp_path, "g.bin", asm("mov al, [0]; out 0xe9, al; hlt", 16, 0x7C00))
    blob = write(tmp_path, "d.bin", b"Q")
    _, out, _ = run_cli(capsys, "run", image, "--blob", f"{blob}@0x20000", "--set", "ds=0x2000", "--json")
    doc = json.loads(out)
    assert doc["console"] == "Q" and doc["regs"]["ds"]["base"] == 0x20000


def elf(bits, code, address, machine=None):
    """A minimal executable ELF with one PT_LOAD segment."""
    if bits == 32:
        header_size, ph_size = 52, 32
        header = struct.pack("<4sBBBB8xHHIIIIIHHHHHH", b"\x7fELF", 1, 1, 1, 0, 2, machine or 3, 1,
                             address, header_size, 0, 0, header_size, ph_size, 1, 0, 0, 0)
        ph = struct.pack("<IIIIIIII", 1, header_size + ph_size, address, address, len(code), len(code) + 16, 5, 0x1000)
    else:
        header_size, ph_size = 64, 56
        header = struct.pack("<4sBBBB8xHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 2, machine or 62, 1,
                             address, header_size, 0, 0, header_size, ph_size, 1, 0, 0, 0)
        ph = struct.pack("<IIQQQQQQ", 1, 5, header_size + ph_size, address, address, len(code), len(code) + 16, 0x1000)
    return header + ph + code


@pytest.mark.parametrize("bits,boot", [(32, "protected"), (64, "long")])
def test_elf_images(tmp_path, capsys, bits, boot):
    code = asm("mov al, 0x45; out 0xe9, al; mov ebx, [0x300010]; hlt", bits, 0x300000)
    image = write(tmp_path, "g.elf", elf(bits, code, 0x300000))
    status, out, _ = run_cli(capsys, "run", image, "--boot", boot, "--json")
    doc = json.loads(out)
    assert status == 0 and doc["console"] == "E"
    assert doc["regs"]["rip"] == 0x300000 + len(code)
    assert doc["regs"]["rbx"] == 0                     # bss (memsz > filesz) is zeroed


def test_bios_example_matches_qemu_reset_state(capsys):
    status, out, _ = run_cli(capsys, "run", "--boot", "bios", EXAMPLES / "bios-reset.bin")
    assert status == 2 * 0x21 + 1
    assert out.startswith("edx=00060FB1 cr0=60000010 eflags=00000046 cs-base-ok")


def test_trace_prints_each_instruction(tmp_path, capsys):
    image = write(tmp_path, "g.bin", asm("mov ax, 1; add ax, 2; hlt", 16, 0x7C00))
    status, _, err = run_cli(capsys, "run", image, "--trace")
    lines = err.strip().splitlines()
    assert status == 0 and len(lines) == 3
    assert "mov ax, 1" in lines[0] and "add ax, 2" in lines[1] and lines[2].endswith("hlt")
    assert lines[0].startswith("0x0000000000007c00")


BAD_INPUTS = [
    (["run", "/nonexistent/image.bin"], "cannot read"),
    (["run", "{image}", "--load", "0xzz"], "not a number"),
    (["run", "{image}", "--mem", "12Q"], "not a size"),
    (["run", "{image}", "--mem", "100"], "multiple of 4 KiB"),
    (["run", "{image}", "--boot", "smm"], "invalid choice"),
    (["run", "{image}", "--cpl", "2"], "invalid choice"),
    (["run", "{image}", "--cpl", "3"], "--cpl 3 needs"),
    (["run", "{image}", "--load", "0x3fffff0"], "not fit"),
    (["run", "{image}", "--mem", "1M", "--load", "0xffff0"], "not fit"),
    (["run", "{image}", "--blob", "nofile"], "FILE@ADDR"),
    (["run", "{image}", "--blob", "/nonexistent@0x1000"], "cannot read"),
    (["run", "{image}", "--set", "xyz=1"], "known register"),
    (["run", "{image}", "--set", "rax=banana"], "not a number"),
    (["run", "{image}", "--boot", "protected", "--set", "ds=0x1238"], "not in the descriptor table"),
    (["run", "{image}", "--set", "ds=0x12345"], "not 16 bits"),
    (["run", "{image}", "--debugcon-port", "0x10000"], "outside"),
    (["run", "{image}", "--boot", "bios"], "multiple of 64 KiB"),
    (["run", "{arm_elf}"], "another architecture"),
    (["run", "{image}", "--boot", "protected", "--load", "0x1000"], "system tables"),
    (["run", "{image}", "--max-insns", "-5"], "negative"),
    (["run", "{image}", "--timeout", "0"], "positive"),
    (["frobnicate"], "invalid choice"),
    ([], "required"),
]


@pytest.mark.parametrize("argv,message", BAD_INPUTS)
def test_bad_input_is_one_line_and_status_2(tmp_path, capsys, argv, message):
    image = write(tmp_path, "big.bin", b"\xf4" * 0x20)
    arm_elf = write(tmp_path, "arm.elf", elf(32, b"\0" * 4, 0x8000, machine=40))
    args = [a.format(image=image, arm_elf=arm_elf) for a in argv]
    status, out, err = run_cli(capsys, *args)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("ringminus: ") and message in err


def test_console_script_runs_as_a_module():
    done = subprocess.run([sys.executable, "-m", "ringminus", "run", str(EXAMPLES / "hello.bin"), "--json"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and json.loads(done.stdout)["console"] == "Hello from ringminus!\n"


def test_a_reader_that_goes_away_ends_the_output_quietly():
    """``ringminus harness … | head -1``: no traceback, the status of a process SIGPIPE ends."""
    vectors = Path(__file__).parents[1] / "vectors"
    process = subprocess.Popen([sys.executable, "-m", "ringminus", "harness", str(vectors)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.readline()
    process.stdout.close()
    status = process.wait(timeout=120)
    assert status == 128 + signal.SIGPIPE and process.stderr.read() == b""
