"""User input errors (issue 11): every bad option, vector file, ELF image or port device is
refused where it is given -- one line on stderr, exit status 2, no traceback -- and nothing
runs first."""
import json
import struct

import pytest

from ringminus import Machine, StopReason
from ringminus.cli import host_memory
from ringminus.fuzz import inputs

from ..helpers import run_cli, run_guest


def assert_usage_error(status, out, err, *words):
    assert status == 2 and out == "", (status, out, err)
    assert err.count("\n") == 1 and err.startswith("ringminus: ") and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "hlt.bin"
    path.write_bytes(b"\xf4")
    return path


# -- vector files ---------------------------------------------------------------------------------

GOOD = """[[vector]]
name = "good"
mode = "long"
code = "0fa2"
intercepts = ["cpuid"]
expect = { vmexit = "cpuid" }
"""
BAD = """[[vector]]
name = "bad"
mode = "long"
code = "0fa2"
{line}
expect = {{ vmexit = "cpuid" }}
"""


@pytest.mark.parametrize("line,key,words", [
    # the E-H, each of which used to pass parsing and raise while running
    ("profile = []", "profile", ["one of kvm, apm, qemu"]),
    ("intercepts = 5", "intercepts", ["must be a list"]),
    ("exceptions = 5", "exceptions", ["must be a list"]),
    ('intercepts = ["invalid"]', "intercepts[0]", ["no intercept bit"]),
    ("msrpm = [{ msr = 0x40000000, read = true }]", "msrpm[0].msr", ["outside the MSRPM"]),
    # and the rest of the format, key by key
    ('intercepts = ["npf"]', "intercepts[0]", ["no intercept bit"]),
    ("exceptions = [32]", "exceptions[0]", ["0x0..0x1f"]),
    ('iopm = ["0x90-0x80"]', "iopm[0]", ["backwards"]),
    ("iopm = [0x10000]", "iopm[0]", ["port"]),
    ("msrpm = [{ read = true }]", "msrpm[0]", ["needs an msr"]),
    ("msrpm = [{ msr = 0x10, read = 1 }]", "msrpm[0].read", ["true or false"]),
    ("regs = { rax = -1 }", "regs.rax", ["0xffffffffffffffff"]),
    ("regs = { rax = 1.5 }", "regs.rax", ["a number"]),
    ("regs = { rip = 0 }", "regs.rip", ["unknown key"]),
    # a value no CPU holds: once refused only by the in-guest L1's boot, with a RuntimeError
    ("regs = { efer = 0x80000000 }", "regs.efer", ["reserved bits 0x80000000"]),
    ("regs = { cr0 = 0x100000011 }", "regs.cr0", ["reserved bits 0x100000000"]),
    ("regs = { cr4 = 0x1000 }", "regs.cr4", ["reserved bits 0x1000"]),
    ("regs = { cr3 = 0x10000000000000 }", "regs.cr3", ["reserved bits"]),
    ("regs = { rflags = 0x400002 }", "regs.rflags", ["reserved bits 0x400000"]),
    ("regs = { dr7 = 0x100000400 }", "regs.dr7", ["reserved bits"]),
    ("memory = { bytes = [{ address = 0x3fffffe, hex = '001122' }] }", "memory.bytes", ["RAM"]),
    ("memory = { bytes = [{ address = 0x2000, hex = 'xyz' }] }", "memory.bytes[0].hex", ["not hex"]),
    ("memory = { not_present = 0x1000 }", "memory.not_present", ["must be a list"]),
    ("cpl = 2", "cpl", ["0 or 3"]),
    ('description = ["x"]', "description", ["a string"]),
    ("colour = 1", "colour", ["unknown key"]),
])
def test_a_bad_key_is_named_with_file_and_vector_before_anything_runs(tmp_path, capsys, line, key, words):
    path = tmp_path / "v.toml"
    path.write_text(GOOD + BAD.format(line=line))        # the good vector first: it must not run
    status, out, err = run_cli(capsys, "harness", path)
    assert_usage_error(status, out, err, f"{path}: bad: ", key, *words)


@pytest.mark.parametrize("expect,words", [
    ('{ vmexit = "nope" }', ["expect.vmexit", "unknown exit code"]),
    ('{ vmexit = "cpuid", stage = "LATE" }', ["expect.stage", "POST_EXCEPT"]),
    ('{ vmexit = "cpuid", next_rip = "+x" }', ["expect.next_rip"]),
    ('{ exception = 256 }', ["expect.exception"]),
    ('{ exception = 6, error_code = -1 }', ["expect.error_code"]),
    ('{ completes = false }', ["expect.completes", "must be true"]),
    ('{ completes = true, regs = { rip = 1 } }', ["unknown key 'expect.regs.rip'"]),
    ('{ kvm = 5 }', ["expect.kvm", "must be a table"]),
    ('{}', ["expect", "outcome"]),
])
def test_bad_outcomes_are_found_when_parsing(tmp_path, capsys, expect, words):
    path = tmp_path / "v.toml"
    path.write_text(f'[[vector]]\nname = "x"\nmode = "long"\ncode = "90"\nexpect = {expect}\n')
    assert_usage_error(*run_cli(capsys, "harness", path), *words)


@pytest.mark.parametrize("text,words", [
    ('[[vector]]\nname = "x"\nmode = "long"\nasm = "no such insn"\nexpect = { completes = true }\n',
     ["x: asm: cannot assemble"]),
    ('[[vector]]\nname = "x"\nmode = "long"\ncode = ""\nexpect = { completes = true }\n', ["holds no instructions"]),
    ('[[vector]]\nname = "x"\nmode = "real"\ncode = "' + "90" * 0x8500 + '"\nexpect = { completes = true }\n',
     ["real mode has room for"]),
    ('[[vector]]\nname = "a\\nb"\nmode = "long"\ncode = "90"\nexpect = { completes = true }\n', ["vector 1: name"]),
    ('[[vector]]\nname = "x"\nmode = "long"\ncode = "90"\nexpect = { completes = true }\n' * 2,
     ["vector 2: name 'x' is taken by vector 1"]),
    ("x = " + "[" * 3000 + "]" * 3000 + "\n", ["not valid TOML"]),
    ("x = " + "1" * 5000 + "\n", ["not valid TOML"]),                # beyond Python's int-string limit
])
def test_whole_vector_and_file_errors(tmp_path, capsys, text, words):
    path = tmp_path / "v.toml"
    path.write_text(text)
    assert_usage_error(*run_cli(capsys, "harness", path), *words)


def test_how_deep_a_file_may_nest_does_not_depend_on_the_callers_stack(tmp_path, capsys):
    """Inputs seed 3603741: a 100-deep array parsed, or was 'nested too deeply', or escaped as
    a RecursionError, depending on how deep the stack calling the CLI was."""
    path = tmp_path / "v.toml"
    path.write_text(GOOD + "deep = " + "[" * 100 + "]" * 100 + "\n")

    def called_from(depth):
        return called_from(depth - 1) if depth else run_cli(capsys, "harness", path)
    answers = {called_from(depth) for depth in (0, 400, 850)}
    assert len(answers) == 1
    assert_usage_error(*answers.pop(), "unknown key 'deep'")


def test_asm_the_assembler_never_finishes_is_a_usage_error(tmp_path, capsys, monkeypatch):
    """keystone loops forever on a statement that is a constant wider than 64 bits (found by
    the inputs campaign); the harness gives up on it and says so."""
    monkeypatch.setattr("ringminus.harness.vectors.ASSEMBLY_SECONDS", 1.0)
    path = tmp_path / "v.toml"
    path.write_text('[[vector]]\nname = "x"\nmode = "long"\nasm = "nop; 0x10000000000000000"\n'
                    'expect = { completes = true }\n')
    assert_usage_error(*run_cli(capsys, "harness", path), "x: asm: the assembler did not finish within 1 s")


def test_a_file_that_is_not_utf8_is_a_usage_error(tmp_path, capsys):
    path = tmp_path / "v.toml"
    path.write_bytes(b"\xff\xfe" + GOOD.encode())
    assert_usage_error(*run_cli(capsys, "harness", path), "not valid TOML")


def test_numbers_may_be_strings_and_asm_is_assembled_where_the_code_runs(tmp_path, capsys):
    path = tmp_path / "v.toml"
    path.write_text('[[vector]]\nname = "x"\nmode = "protected"\nasm = "call next; next: pop eax"\n'
                    'regs = { rbx = "0x10" }\nexpect = { completes = true, regs = { rax = "0x100005", rbx = 16 } }\n')
    status, out, _ = run_cli(capsys, "harness", path)
    assert status == 0 and out.splitlines() == ["PASS x [kvm]", "1 passed, 0 failed"]


# -- ELF images -----------------------------------------------------------------------------------

def elf64(entry=0x100000, phoff=64, phentsize=56, phnum=None, segments=((0x100000, 0x100000, 1, 1),),
          offset=None, machine=62):
    """ELF64 header + program headers (paddr, vaddr, filesz, memsz) + one HLT byte each."""
    data_at = offset if offset is not None else 64 + 56 * len(segments)
    header = struct.pack("<4sBBBB8xHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 2, machine, 1, entry, phoff, 0, 0,
                         64, phentsize, len(segments) if phnum is None else phnum, 0, 0, 0)
    ph = b"".join(struct.pack("<IIQQQQQQ", 1, 5, data_at, paddr, vaddr, filesz, memsz, 0x1000)
                  for paddr, vaddr, filesz, memsz in segments)
    return header + ph + b"\xf4" * len(segments) + bytes(16)


@pytest.mark.parametrize("fields,words", [
    ({"phoff": 1 << 63}, ["program headers", "beyond the file"]),             # the I
    ({"phoff": (1 << 64) - 1}, ["beyond the file"]),
    ({"phnum": 0xFFFF}, ["extended program header numbering"]),
    ({"phnum": 40}, ["beyond the file"]),
    ({"phentsize": 8}, ["entries are 8 bytes"]),
    ({"offset": 1 << 63}, ["segment 0", "beyond the file"]),
    ({"segments": ((0x100000, 0x100000, 2, 1),)}, ["more file bytes"]),
    ({"segments": (((1 << 64) - 1, 0, 1, 2),)}, ["past the end of the 64-bit address space"]),
    ({"segments": ((0x100000, 0x100000, 1, 1 << 63),)}, ["does not fit"]),
    ({"segments": ((0x100000, 0x100000, 1, 0x2000), (0x101000, 0x101000, 1, 1))}, ["segments 0 and 1 overlap"]),
    ({"entry": 0x500000}, ["entry point 0x500000 lies in no loadable segment"]),
    ({"machine": 40}, ["another architecture"]),
])
def test_malformed_elf_is_one_line(tmp_path, capsys, fields, words):
    path = tmp_path / "bad.elf"
    path.write_bytes(elf64(**fields))
    assert_usage_error(*run_cli(capsys, "run", path, "--boot", "long"), str(path), *words)


def test_truncated_elf_headers(tmp_path, capsys):
    whole = elf64()
    for size in (4, 20, 52, 63, 64, 100):
        path = tmp_path / f"cut{size}.elf"
        path.write_bytes(whole[:size])
        assert_usage_error(*run_cli(capsys, "run", path, "--boot", "long"))


def test_a_well_formed_elf_still_loads_and_runs(tmp_path, capsys):
    path = tmp_path / "ok.elf"
    path.write_bytes(elf64(segments=((0x100000, 0x100000, 1, 0x10),)))
    status, out, _ = run_cli(capsys, "run", path, "--boot", "long", "--json")
    assert status == 0 and json.loads(out)["regs"]["rip"] == 0x100001


def test_load_is_for_flat_images_only(tmp_path, capsys):
    path = tmp_path / "ok.elf"
    path.write_bytes(elf64())
    assert_usage_error(*run_cli(capsys, "run", path, "--boot", "long", "--load", "0x200000"), "flat images")


# -- run options ----------------------------------------------------------------------------------

@pytest.mark.parametrize("args,words", [
    (["--timeout", "nan"], ["--timeout", "finite"]),
    (["--timeout", "inf"], ["--timeout", "finite"]),
    (["--timeout", "1e400"], ["--timeout", "finite"]),
    (["--timeout=-1"], ["--timeout", "positive"]),
    (["--timeout", "1e300"], ["--timeout", "too long"]),
    (["--load=-1"], ["--load", "negative"]),
    (["--load", "0x10000000000000000"], ["--load", "too large"]),
    (["--smi-at=-1"], ["--smi-at", "negative"]),
    (["--nmi-at=-3"], ["--nmi-at", "negative"]),
    (["--irq-at", "5:-1"], ["--irq-at", "negative"]),
    (["--max-insns", str(1 << 64)], ["--max-insns", "too large"]),
    (["--dump=-1:4"], ["--dump", "negative"]),
    (["--dump", "0xffffffffffffffff:16"], ["--dump", "past the end"]),
    (["--smram=-4096:4K"], ["--smram", "negative"]),
    (["--smram", "0xa0000:4K"], ["--smram 0xa0000:0x1000", "overlaps"]),
    (["--smram-load", "{image}@0x100000"], ["--smram-load", "SMRAM range"]),
    (["--smbase=-5"], ["--smbase", "negative"]),
    (["--smbase", "0x100000000"], ["--smbase", "below 4 GiB"]),
    (["--debugcon-port", "0xf4"], ["--debugcon-port 0xf4", "cannot claim port 0xf4"]),
    (["--debugcon-port", "0xcf8"], ["--debugcon-port 0xcf8", "cannot claim port 0xcf8"]),
    (["--guest", "--intercept", "invalid"], ["--intercept", "no intercept bit"]),
    (["--guest", "--intercept", ","], ["--intercept", "no exit names"]),
    (["--guest", "--msrpm", "0x40000000:r"], ["--msrpm", "outside the MSRPM"]),
    (["--cpu", "qemu32", "--boot", "long"], ["no long mode"]),
    (["--cpl", "3"], ["--cpl 3 needs"]),
    (["--blob", "{dir}@0x100000"], ["cannot read"]),
    (["--hypercall", "0x" + "f" * 5000 + "=deny"], ["--hypercall", "far too large"]),
    (["--load", "9" * 5000], ["--load", "not a number"]),
    (["--blob", "{image}\0x@0x100000"], ["cannot read", "\\x00"]),
])
def test_every_bad_option_value_is_one_line(tmp_path, capsys, image, args, words):
    args = [a.format(image=image, dir=tmp_path) for a in args]
    assert_usage_error(*run_cli(capsys, "run", image, *args), *words)


def test_memory_beyond_the_host_is_refused(capsys, image):
    too_much = (host_memory() >> 20) + 1024
    assert_usage_error(*run_cli(capsys, "run", image, "--mem", f"{too_much}M"), "--mem", "this host")


def test_an_allocation_the_host_refuses_is_a_usage_error(capsys, image, monkeypatch):
    """Where the host does not say how much memory it has, a failed allocation (1 PiB:
    beyond any user address space) is still a usage error, not a MemoryError traceback."""
    monkeypatch.setattr("ringminus.cli.host_memory", lambda: 0)
    assert_usage_error(*run_cli(capsys, "run", image, "--mem", f"{1 << 20}G"), "--mem", "cannot give")


@pytest.mark.parametrize("assignment,words", [
    ("al=0x100", ["not 8 bits wide", "0..0xff"]),
    ("ah=0x1ff", ["not 8 bits wide"]),
    ("r9b=0x100", ["not 8 bits wide"]),
    ("ax=0x10000", ["not 16 bits wide"]),
    ("ip=0x10000", ["not 16 bits wide"]),
    ("ss=0x10000", ["not 16 bits wide"]),
    ("eax=0x100000000", ["not 32 bits wide"]),
    ("r10d=0x100000000", ["not 32 bits wide"]),
    ("eflags=0x100000000", ["not 32 bits wide"]),
    ("rax=0x10000000000000000", ["not 64 bits wide"]),
    ("cr3=0x10000000000000000", ["not 64 bits wide"]),
    ("efer=0x10000000000000000", ["not 64 bits wide"]),
    ("rbx=-1", ["is negative"]),
])
def test_set_values_wider_than_the_register_are_refused(capsys, image, assignment, words):
    assert_usage_error(*run_cli(capsys, "run", image, "--set", assignment), "--set", assignment, *words)


def test_set_values_that_fit_are_written_exactly(capsys, image):
    status, out, _ = run_cli(capsys, "run", image, "--json", "--set", "rax=0xffffffffffffffff", "--set", "al=0x12",
                             "--set", "ah=0xff", "--set", "bx=0xffff", "--set", "ecx=0xffffffff")
    regs = json.loads(out)["regs"]
    assert status == 0
    assert regs["rax"] == 0xFFFF_FFFF_FFFF_FF12 and regs["rbx"] == 0xFFFF and regs["rcx"] == 0xFFFF_FFFF


@pytest.mark.parametrize("boot", ["protected", "long"])
@pytest.mark.parametrize("address", [0x1000, 0x5000, 0x9FFFF, 0xFFF])
def test_blob_into_the_system_area_is_refused(tmp_path, capsys, boot, address):
    image = tmp_path / "g.bin"
    image.write_bytes(b"\xf4")
    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"\x11\x22")
    status, out, err = run_cli(capsys, "run", image, "--boot", boot, "--blob", f"{blob}@{address:#x}")
    assert_usage_error(status, out, err, "--blob", "system tables")


def test_blob_below_the_system_area_and_in_real_mode_is_placed(tmp_path, capsys):
    image = tmp_path / "g.bin"
    image.write_bytes(b"\xf4")
    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"\x11\x22")
    for boot, address in (("protected", 0xFFE), ("long", 0xA0000), ("real", 0x5000)):
        status, out, _ = run_cli(capsys, "run", image, "--boot", boot, "--blob", f"{blob}@{address:#x}",
                                 "--dump", f"{address:#x}:2", "--json")
        assert status == 0 and json.loads(out)["dump"][0]["hex"] == "1122", boot


def test_fuzz_command_hands_over_to_the_fuzz_runner(capsys):
    status, out, _ = run_cli(capsys, "fuzz", "inputs", "--seed", "7", "--runs", "3")
    assert status == 0 and out.strip().splitlines()[-1].startswith("inputs: 3 runs, 0 failures")
    status, _, err = run_cli(capsys, "fuzz", "no-such-campaign")
    assert status == 2 and err.count("\n") == 1


# 1065670: a handler that raises under --trace (the trace's lines precede the error's one line).
@pytest.mark.parametrize("seed", [*range(0, 400, 10), 1065670])
def test_input_fuzz_seeds_keep_the_contract(seed):
    inputs.one_run(seed)


# -- port devices ---------------------------------------------------------------------------------

class NoRead:
    precise = False

    def write(self, port, size, value):
        pass


class NoPrecise:
    def read(self, port, size):
        return 0

    def write(self, port, size, value):
        pass


class ShortWrite(NoPrecise):
    precise = False

    def write(self, port):
        pass


@pytest.mark.parametrize("call,error,words", [
    (lambda m: m.ports.register(0x80, NoRead()), TypeError, "no read() method"),
    (lambda m: m.ports.register(0x80, NoPrecise()), TypeError, "'precise'"),
    (lambda m: m.ports.register(0x80, ShortWrite()), TypeError, "write() must take (port, size, value)"),
    (lambda m: m.ports.register(0x80, read=lambda port: 0), TypeError, "read must be a callable taking (port, size)"),
    (lambda m: m.ports.register(0x80, write=5), TypeError, "write must be a callable"),
    (lambda m: m.ports.register(0x80, NoPrecise(), read=lambda p, s: 0), TypeError, "not both"),
    (lambda m: m.ports.register("0x80", read=lambda p, s: 0), TypeError, "a port is a number"),
    (lambda m: m.ports.register(True, read=lambda p, s: 0), TypeError, "port number"),
    (lambda m: m.ports.register(0x10000, read=lambda p, s: 0), ValueError, "outside 0-0xffff"),
    (lambda m: m.ports.register(range(0), read=lambda p, s: 0), ValueError, "no ports"),
    (lambda m: m.ports.register([0x80, 0x80], read=lambda p, s: 0), ValueError, "twice"),
    (lambda m: m.ports.register(0xF4, read=lambda p, s: 0), ValueError, "cannot claim port 0xf4"),
    (lambda m: m.ports.register(range(0xCF0, 0xD00), read=lambda p, s: 0), ValueError, "cannot claim port 0xcf8"),
])
def test_a_port_device_without_what_the_bus_needs_is_refused_at_registration(call, error, words):
    machine = Machine(memory_size=1 << 20)
    with pytest.raises(error, match=None) as raised:
        call(machine)
    assert words in str(raised.value)
    # a refused registration claims nothing: the port still reads as unclaimed
    assert machine.ports.device(0x80) is None and machine.ports.read(0x80, 1) == 0xFF


def test_an_overlay_answers_until_unregistered_then_the_claim_below_returns():
    machine = Machine(memory_size=1 << 20)
    below = machine.ports.register(0x80, read=lambda port, size: 0x11)
    machine.ports.register(0x80, read=lambda port, size: 0x22, overlay=True)
    assert machine.ports.read(0x80, 1) == 0x22
    machine.ports.unregister(0x80)
    assert machine.ports.device(0x80) is below and machine.ports.read(0x80, 1) == 0x11


def test_a_guest_moving_pmbase_over_the_apm_ports_shadows_them_and_gets_them_back():
    """ICH9's SMI_EN at PMBASE+0x30: with PMBASE 0x80 it lands on APM_CNT/APM_STS (0xB2/0xB3).
    The guest's move is an overlay, not an error, and disabling ACPI brings APM_STS back."""
    source = """
        mov eax, 0x8000F840
        mov dx, 0xcf8
        out dx, eax
        mov eax, 0x81
        mov dx, 0xcfc
        out dx, eax
        mov eax, 0x8000F844
        mov dx, 0xcf8
        out dx, eax
        mov al, 0x80
        mov dx, 0xcfc
        out dx, al
        in al, 0xb3
        mov bl, al
        mov al, 0
        out dx, al
        mov al, 0x5a
        out 0xb3, al
        in al, 0xb3
        hlt
    """
    _, result = run_guest(source, "real", max_instructions=100)
    assert result.stop.reason is StopReason.HLT
    assert result.regs["rbx"] & 0xFF == 0x00            # SMI_EN's top byte while it covers 0xB3
    assert result.regs["rax"] & 0xFF == 0x5A            # APM_STS again once ACPI is off
