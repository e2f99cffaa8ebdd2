"""The CLI as L1: --guest with intercept options, and the harness command."""
import json

import pytest

from ..helpers import guest_image, run_cli, vectors_file


def test_guest_stops_at_an_intercept_with_the_exit_record(tmp_path, capsys):
    path = guest_image(tmp_path, "mov dx, 0x5000; in al, dx; hlt")
    status, out, _ = run_cli(capsys, "run", path, "--boot", "long", "--guest", "--iopm", "0x5000", "--json")
    doc = json.loads(out)
    assert status == 16 and doc["stop"]["reason"] == "vmexit"
    exit_ = doc["vmexit"]
    assert exit_["name"] == "ioio" and exit_["code"] == 0x7B and exit_["info1"] == 0x5000_0211
    assert exit_["info2"] == exit_["next_rip"] == 0x100005 and exit_["stage"] == "POST_EXCEPT"
    assert set(exit_) >= {"code", "name", "info1", "info2", "next_rip", "stage", "exit_int_info", "insn_bytes"}
    assert doc["regs"]["rip"] == 0x100004                  # the IN did not execute


def test_guest_skip_lists_every_exit(tmp_path, capsys):
    path = guest_image(tmp_path, "mov ecx, 0x10; rdmsr; wrmsr; cpuid; hlt")
    status, out, _ = run_cli(capsys, "run", path, "--boot", "long", "--guest", "--msrpm", "0x10:w",
                             "--intercept", "cpuid", "--on-exit", "skip", "--json")
    doc = json.loads(out)
    assert status == 0 and doc["vmexit"] is None
    assert [(e["name"], e["info1"]) for e in doc["events"]] == [("msr", 1), ("cpuid", 0)]


def test_profile_changes_the_exit_information(tmp_path, capsys):
    path = guest_image(tmp_path, "mov rax, cr0; mov cr0, rax")
    exits = {}
    for profile in ("kvm", "apm"):
        _, out, _ = run_cli(capsys, "run", path, "--boot", "long", "--guest", "--intercept", "write_cr0",
                            "--profile", profile, "--json")
        exits[profile] = json.loads(out)["vmexit"]
    assert exits["kvm"]["info1"] == 0 and exits["apm"]["info1"] == (1 << 63) | 0   # decode assist: RAX


def test_exception_intercept_by_vector(tmp_path, capsys):
    path = guest_image(tmp_path, "ud2")
    _, out, _ = run_cli(capsys, "run", path, "--boot", "long", "--guest", "--intercept-exception", "6", "--json")
    assert json.loads(out)["vmexit"]["name"] == "excp6"


@pytest.mark.parametrize("args,message", [
    (["--intercept", "cpuid"], "need --guest"),
    (["--guest", "--intercept", "nonsense"], "unknown exit code"),
    (["--guest", "--intercept-exception", "40"], "0-31"),
    (["--guest", "--iopm", "0x90-0x80"], "backwards"),
    (["--guest", "--msrpm", "0x10:x"], "MSR:r|w|rw"),
    (["--guest", "--msrpm", "0x40000000:r"], "outside the MSRPM"),
    (["--guest", "--profile", "bochs"], "invalid choice"),
    (["--guest", "--on-exit", "ignore"], "invalid choice"),
])
def test_bad_guest_options(tmp_path, capsys, args, message):
    status, out, err = run_cli(capsys, "run", guest_image(tmp_path, "hlt"), "--boot", "long", *args)
    assert status == 2 and out == "" and err.count("\n") == 1 and message in err


VECTOR = """
[[vector]]
name = "{name}"
mode = "long"
asm = "cpuid"
intercepts = ["cpuid"]
{expect}
"""


def test_harness_pass_fail_and_summary(tmp_path, capsys):
    good = VECTOR.format(name="good", expect='expect = { vmexit = "cpuid", next_rip = "+2" }')
    bad = VECTOR.format(name="bad", expect='expect = { vmexit = "hlt" }')
    status, out, _ = run_cli(capsys, "harness", vectors_file(tmp_path, good + bad))
    lines = out.strip().splitlines()
    assert status == 1
    assert lines[0] == "PASS good [kvm]" and lines[1].startswith("FAIL bad [kvm]: expected vmexit")
    assert lines[-1] == "1 passed, 1 failed"


def test_harness_profiles_and_json(tmp_path, capsys):
    text = VECTOR.format(name="per-profile", expect='[vector.expect.apm]\nvmexit = "cpuid"')
    path = vectors_file(tmp_path, text)
    status, out, _ = run_cli(capsys, "harness", path)
    assert status == 0 and out.strip().splitlines()[-1] == "0 passed, 0 failed, 1 skipped"
    status, out, _ = run_cli(capsys, "harness", path, "--profile", "apm", "--json")
    doc = json.loads(out)
    assert status == 0 and doc["passed"] == 1 and doc["results"][0]["profile"] == "apm"


@pytest.mark.parametrize("text,message", [
    ("[[vector]]\nname = 'x'\nmode = 'long'\nasm = 'nop'\nexpect = { completes = true }\ncolour = 1\n", "unknown key 'colour'"),
    ("[[vector]\n", "not valid TOML"),
    ("[[vector]]\nname = 'x'\nmode = 'long'\nasm = 'nop'\n", "needs an expect table"),
    ("[[vector]]\nname = 'x'\nmode = 'long'\nasm = 'nop'\nintercepts = ['nope']\nexpect = { completes = true }\n", "unknown exit code"),
    ("[[vector]]\nname = 'x'\nmode = 'smm'\nasm = 'nop'\nexpect = { completes = true }\n", "mode must be"),
    ("[[vector]]\nname = 'x'\nmode = 'long'\nasm = 'nop'\nexpect = { vmexit = 'hlt', exception = 6 }\n", "exactly one"),
    ("[[vector]]\nname = 'x'\nmode = 'real'\ncpl = 3\nasm = 'nop'\nexpect = { completes = true }\n", "cpl must be"),
    ("[[vector]]\nname = 'x'\nmode = 'long'\ncode = 'zz'\nexpect = { completes = true }\n", "not hex"),
    ("title = 'no vectors'\n", "unknown key"),
])
def test_harness_rejects_malformed_files_in_one_line(tmp_path, capsys, text, message):
    status, out, err = run_cli(capsys, "harness", vectors_file(tmp_path, text))
    assert status == 2 and err.count("\n") == 1 and message in err, err


def test_harness_missing_path(capsys):
    status, _, err = run_cli(capsys, "harness", "/nonexistent/vectors")
    assert status == 2 and "cannot read" in err
