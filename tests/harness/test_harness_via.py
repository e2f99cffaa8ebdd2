"""`ringminus harness --via host|guest|both`: every shipped vector through a generated in-guest L1
(the core's VMRUN/#VMEXIT) agrees with the host-side L1, and `both` catches a disagreement."""
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from ringminus.harness import collect, run_vector, runner
from ringminus.harness.inguest import L1_DONE, generate_l1
from ringminus.harness.vectors import Outcome, parse_vector
from ringminus.arch.control import EFER_SVME
from ringminus.arch.exitcodes import ExitCode
from ringminus.intercepts.profiles import PROFILES
from ringminus.intercepts.vmcb import VMCB_SIZE, intercept_vector, vmcb_view

from ..helpers import run_cli, vectors_file

VECTORS_DIR = Path(__file__).parents[1] / "vectors"
VECTORS = collect([str(VECTORS_DIR)])

CPUID_EXIT = """
[[vector]]
name = "cpuid-exit"
mode = "long"
asm = "cpuid"
intercepts = ["cpuid"]
expect = { vmexit = "cpuid", next_rip = "+2", stage = "PRE_EXCEPT" }
"""
# L2 states the generated L1 must reproduce: EFER.SVME clear as RDMSR sees it (the entry stub),
# CPL 3 with SVME clear (the stub's far return), real mode, and a protected-mode fault that
# reads the L2's 8-byte IDT gates (not the long-mode ones L1's boot writes there).
STATES = """
[[vector]]
name = "efer-svme-clear-at-cpl0"
mode = "long"
asm = "mov ecx, 0xC0000080; rdmsr"
expect = { completes = true, regs = { rax = 0x500 } }

[[vector]]
name = "cpl3-long-completes"
mode = "long"
cpl = 3
asm = "mov rbx, rsp"
regs = { rsi = 0x1122334455667788 }
expect = { completes = true, regs = { rbx = 0x80000, rsi = 0x1122334455667788, efer = 0x500 } }

[[vector]]
name = "cpl3-protected-completes"
mode = "protected"
cpl = 3
asm = "nop"
expect = { completes = true, regs = { efer = 0 } }

[[vector]]
name = "real-mode-completes"
mode = "real"
asm = "mov bx, cs"
expect = { completes = true, regs = { rbx = 0 } }

[[vector]]
name = "protected-ud-delivered"
mode = "protected"
asm = "ud2"
expect = { exception = 6 }
"""
EFER_WRITE_INTERCEPTED = """
[[vector]]
name = "efer-write-intercepted"
mode = "long"
asm = "nop"
msrpm = [{ msr = 0xC0000080, write = true }]
expect = { completes = true }
"""


def vectors_in(text):
    return [parse_vector(table, "test", i) for i, table in enumerate(tomllib.loads(text)["vector"])]


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_shipped_vector_passes_and_agrees_via_both(profile):
    bad = [r.line() for r in (run_vector(v, profile, "both") for v in VECTORS)
           if not (r.status == "PASS" or r.status == "SKIP" and not r.note)]
    assert not bad, "\n".join(bad)


def test_cli_via_guest_runs_the_in_guest_l1():
    done = subprocess.run([sys.executable, "-m", "ringminus", "harness", str(VECTORS_DIR / "smoke.toml"),
                           "--via", "guest"], capture_output=True, text=True, timeout=120)
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0, done.stdout + done.stderr
    assert lines[0].startswith("PASS ") and lines[0].endswith(", via guest]")
    assert lines[-1].endswith(" 0 failed")


def test_generated_l1_takes_the_exit_through_its_vmcb():
    vector = vectors_in(CPUID_EXIT)[0]
    prepared = runner.setup(vector, "kvm")
    l1 = generate_l1(prepared)
    machine = prepared.machine
    result = machine.run(max_instructions=runner.MAX_INSTRUCTIONS, timeout=runner.TIMEOUT)
    assert l1.finished(result) and result.stop.value == L1_DONE
    assert result.stats["vmexits"] == 1 and machine.last_exit.code == ExitCode.CPUID
    vmcb = vmcb_view(bytearray(machine.read_memory(l1.layout.vmcb, VMCB_SIZE)))
    control, save = vmcb["control"], vmcb["save"]
    assert intercept_vector(control) == 1 << ExitCode.CPUID | 1 << ExitCode.VMRUN
    assert control["guest_asid"] == 1
    assert control["exitcode"] == ExitCode.CPUID and save["rip"] == 0x100000 and control["nrip"] == 0x100002
    assert save["efer"] & EFER_SVME == 0         # the L2 cleared SVME through the entry stub
    assert l1.observe(machine, result).fields["vmexit"] == ExitCode.CPUID


def test_a_failing_l1_is_reported_as_such():
    prepared = runner.setup(vectors_in(CPUID_EXIT)[0], "kvm")
    l1 = generate_l1(prepared)
    prepared.machine.write_memory(l1.layout.code, bytes.fromhex("0f0b"))      # UD2 as L1's first instruction
    result = prepared.machine.run(max_instructions=runner.MAX_INSTRUCTIONS, timeout=runner.TIMEOUT)
    assert l1.observe(prepared.machine, result) == Outcome(
        "stop", {"reason": "l1", "detail": f"exception 6 in the generated L1 at {l1.layout.code:#x}"})


@pytest.mark.parametrize("vector", vectors_in(STATES), ids=lambda v: v.name)
def test_the_in_guest_l2_starts_in_the_vectors_state(vector):
    result = run_vector(vector, "kvm", "both")
    assert result.status == "PASS", result.line()


def test_both_reports_a_disagreement(tmp_path, capsys, monkeypatch):
    guest = runner.OBSERVERS["guest"]

    def off_by_one(vector, profile):
        got = guest(vector, profile)
        return Outcome(got.kind, {**got.fields, "next_rip": got.fields["next_rip"] + 1})

    monkeypatch.setitem(runner.OBSERVERS, "guest", off_by_one)
    path = vectors_file(tmp_path, CPUID_EXIT)
    status, out, _ = run_cli(capsys, "harness", path, "--via", "both")
    assert status == 1
    assert out.splitlines() == [
        "FAIL cpuid-exit [kvm, via both]: host and guest disagree: host vmexit next_rip=0x100002, "
        "guest vmexit next_rip=0x100003",
        "0 passed, 1 failed"]
    status, out, _ = run_cli(capsys, "harness", path, "--via", "both", "--json")
    doc = json.loads(out)
    assert status == 1 and doc["via"] == "both" and doc["failed"] == 1
    (result,) = doc["results"]
    assert result["via"] == "both" and result["status"] == "FAIL"
    assert result["disagreement"] == {"host": {"kind": "vmexit", "next_rip": 0x100002},
                                      "guest": {"kind": "vmexit", "next_rip": 0x100003}}
    # the host side alone still passes; the guest side alone fails its expectation
    assert run_cli(capsys, "harness", path)[0] == 0
    status, out, _ = run_cli(capsys, "harness", path, "--via", "guest")
    assert status == 1 and out.startswith("FAIL cpuid-exit [kvm, via guest]: expected vmexit")


def test_both_compares_every_register_when_the_code_completes(tmp_path, monkeypatch):
    guest = runner.OBSERVERS["guest"]

    def other_r15(vector, profile):
        got = guest(vector, profile)
        return Outcome(got.kind, {**got.fields, "regs": {**got.fields["regs"], "r15": 1}})

    monkeypatch.setitem(runner.OBSERVERS, "guest", other_r15)
    result = run_vector(vectors_in(STATES)[0], "kvm", "both")
    assert result.status == "FAIL"
    assert result.got.fields == {"regs": {"r15": 0}} and result.other.fields == {"regs": {"r15": 1}}


def test_json_names_the_via(tmp_path, capsys):
    path = vectors_file(tmp_path, CPUID_EXIT)
    status, out, _ = run_cli(capsys, "harness", path, "--via", "guest", "--json")
    doc = json.loads(out)
    assert status == 0 and doc["via"] == "guest" and doc["passed"] == 1
    assert doc["results"][0]["via"] == "guest" and doc["results"][0]["got"]["vmexit"] == ExitCode.CPUID
    status, out, _ = run_cli(capsys, "harness", path, "--json")
    assert json.loads(out)["via"] == "host"


def test_a_vector_the_l1_cannot_run_is_skipped_with_the_reason(tmp_path, capsys):
    path = vectors_file(tmp_path, EFER_WRITE_INTERCEPTED)
    status, out, _ = run_cli(capsys, "harness", path, "--via", "both")
    line = out.splitlines()[0]
    assert status == 0 and line.startswith("SKIP efer-write-intercepted [kvm, via both]: via guest:")
    assert "intercepts the WRMSR to EFER" in line
    assert run_cli(capsys, "harness", path)[1].startswith("PASS efer-write-intercepted [kvm]")


def test_a_bad_via_is_a_one_line_usage_error(tmp_path, capsys):
    status, _, err = run_cli(capsys, "harness", vectors_file(tmp_path, CPUID_EXIT), "--via", "sideways")
    assert status == 2 and err.count("\n") == 1 and "--via" in err
    with pytest.raises(ValueError, match="via must be one of"):
        run_vector(vectors_in(CPUID_EXIT)[0], "kvm", "sideways")
