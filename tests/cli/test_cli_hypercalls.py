"""Hypercalls from the command line: --hypercall ranges, --hypercall-handler, the `hypercall`
stop reason and JSON keys, and one-line errors with exit status 2."""
import json
import subprocess
import sys
import uuid

import pytest

from ..helpers import asm, guest_image, run_cli

VMMCALL = ".byte 0x0f, 0x01, 0xd9"
VMCALL = ".byte 0x0f, 0x01, 0xc1"
CODE = 0x100000
PROGRAM = f"""
    mov eax, 11
    {VMMCALL}
    mov rdi, rax
    mov eax, 0x40
    {VMMCALL}
    mov rbp, rax
    mov eax, 0x41
    mov ebx, 0x1000
    {VMMCALL}
    hlt
"""
FORWARD_AT = CODE + len(asm(PROGRAM.split("hlt")[0].rsplit(VMMCALL, 1)[0], 64, CODE))


def image(tmp_path, source=PROGRAM, bits=64):
    return guest_image(tmp_path, source, bits, CODE)


def handler_module(tmp_path, body):
    """A handler module with a unique name (modules imported in-process stay imported)."""
    name = f"hc_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text(body)
    return name


def test_forward_without_handler_stops_with_the_record(tmp_path, capsys):
    status, out, _ = run_cli(capsys, "run", image(tmp_path), "--boot", "long", "--hypercall", "0x40=deny",
                             "--hypercall", "0x41-0x4f=forward", "--json")
    doc = json.loads(out)
    assert status == 20
    assert doc["stop"] == {"reason": "hypercall", "rip": FORWARD_AT, "value": 0x41}
    assert doc["hypercall"] == {"nr": 0x41, "args": [0x1000, 0, doc["regs"]["rdx"], 0], "conduit": "vmmcall",
                                "long_mode": True, "cpl": 0, "rip": FORWARD_AT}
    assert doc["vmexit"] is None and doc["regs"]["rip"] == FORWARD_AT
    assert doc["regs"]["rdi"] == 0 and doc["regs"]["rbp"] == 0xFFFF_FFFF_FFFF_FC18
    assert [(e["kind"], e["nr"], e["action"], e["result"]) for e in doc["events"]] == [
        ("hypercall", 11, "handle", 0), ("hypercall", 0x40, "deny", 0xFFFF_FFFF_FFFF_FC18),
        ("hypercall", 0x41, "forward", None)]
    assert doc["stats"]["hypercalls"] == 3


def test_summary_names_the_forwarded_call(tmp_path, capsys):
    status, out, _ = run_cli(capsys, "run", image(tmp_path), "--boot", "long", "--hypercall", "0x41=forward")
    assert status == 20
    assert f"stop: hypercall 0x41 at rip {FORWARD_AT:#x}" in out
    assert "hypercall: nr=0x41 args=[0x1000, 0x0," in out and "conduit=vmmcall long_mode=True cpl=0" in out
    assert "events: 3 hypercall" in out


def test_plain_run_has_a_null_hypercall_key(tmp_path, capsys):
    status, out, _ = run_cli(capsys, "run", image(tmp_path), "--boot", "long", "--json")
    doc = json.loads(out)
    assert status == 0 and doc["hypercall"] is None
    assert doc["regs"]["rax"] == 0xFFFF_FFFF_FFFF_FC18            # 0x41: no range, not built in


def test_handler_by_module_name(tmp_path, capsys, monkeypatch):
    name = handler_module(tmp_path, "def answer(call):\n    return call.nr * 0x100 + call.args[0] + call.cpl\n")
    monkeypatch.chdir(tmp_path)
    status, out, _ = run_cli(capsys, "run", image(tmp_path), "--boot", "long", "--hypercall", "0x41=forward",
                             "--hypercall-handler", f"{name}:answer", "--json")
    doc = json.loads(out)
    assert status == 0 and doc["stop"]["reason"] == "hlt" and doc["hypercall"] is None
    assert doc["regs"]["rax"] == 0x5100
    assert doc["events"][-1] == {"kind": "hypercall", "rip": FORWARD_AT, "conduit": "vmmcall", "nr": 0x41,
                                 "action": "forward", "result": 0x5100}


def test_handler_by_file_path_in_32_bit_mode(tmp_path, capsys):
    path = tmp_path / "answers.py"
    path.write_text("def answer(call):\n    assert not call.long_mode and call.conduit == 'vmcall'\n    return -3\n")
    source = f"mov eax, 0x41; {VMCALL}; hlt"
    status, out, _ = run_cli(capsys, "run", image(tmp_path, source, 32), "--boot", "protected",
                             "--hypercall", "0x41=forward", "--hypercall-handler", f"{path}:answer", "--json")
    doc = json.loads(out)
    assert status == 0 and doc["regs"]["rax"] == 0xFFFF_FFFD
    assert doc["events"][0]["conduit"] == "vmcall"


def test_vmcall_profiles_from_the_cli(tmp_path, capsys):
    source = f"mov eax, 1; {VMCALL}; hlt"
    status, out, _ = run_cli(capsys, "run", image(tmp_path, source, 32), "--boot", "protected", "--json",
                             "--profile", "apm")
    doc = json.loads(out)
    assert status == 4 and doc["events"][0] == {"kind": "exception", "vector": 6, "rip": CODE + 5}
    status, out, _ = run_cli(capsys, "run", image(tmp_path, source, 32), "--boot", "protected", "--json",
                             "--dump", f"{CODE + 5:#x}:3")
    doc = json.loads(out)
    assert status == 0 and doc["dump"][0]["hex"] == "0f01d9" and doc["regs"]["rax"] == 0


def test_handler_imported_from_the_working_directory_by_the_console_script(tmp_path):
    name = handler_module(tmp_path, "def answer(call):\n    return 0x77\n")
    done = subprocess.run([sys.executable, "-m", "ringminus", "run", str(image(tmp_path)), "--boot", "long",
                           "--hypercall", "0x41=forward", "--hypercall-handler", f"{name}:answer", "--json"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0 and json.loads(done.stdout)["regs"]["rax"] == 0x77


BAD = [
    (["--hypercall", "0x40"], "BASE[-END]=handle|deny|forward"),
    (["--hypercall", "=deny"], "BASE[-END]=handle|deny|forward"),
    (["--hypercall", "0x40=allow"], "unknown hypercall action"),
    (["--hypercall", "zz=deny"], "not a number"),
    (["--hypercall", "9-3=deny"], "runs backwards"),
    (["--hypercall", "0xffffffffffffffff-0x10000000000000000=deny"], "wraps past 0xffffffffffffffff (EINVAL)"),
    (["--hypercall", "0x10000000000000000=deny"], "(EINVAL)"),
    (["--hypercall", "0x10-0x1f=deny", "--hypercall", "0x18-0x30=forward"], "overlaps 0x10-0x1f=deny (EEXIST)"),
    (["--hypercall", "0x10=deny", "--hypercall", "16=handle"], "(EEXIST)"),
    (["--hypercall-handler", "nocolon"], "MODULE:FUNCTION"),
    (["--hypercall-handler", "mod:not-a-name"], "MODULE:FUNCTION"),
    (["--hypercall-handler", "no_such_module_for_ringminus:f"], "cannot import no_such_module_for_ringminus"),
    (["--hypercall-handler", "/nonexistent/handler.py:f"], "no such file"),
    (["--hypercall-handler", "{broken}:f"], "SyntaxError"),
    (["--hypercall-handler", "{good}:missing"], "has no missing"),
    (["--hypercall-handler", "{good}:VALUE"], "VALUE is not callable"),
    (["--hypercall", "0x41=forward", "--hypercall-handler", "{good}:raises"], "ZeroDivisionError"),
    (["--hypercall", "0x41=forward", "--hypercall-handler", "{good}:wrong_type"], "returned str"),
]


@pytest.mark.parametrize("extra,message", BAD)
def test_bad_hypercall_options_are_one_line_and_status_2(tmp_path, capsys, extra, message):
    good = tmp_path / "good.py"
    good.write_text("VALUE = 3\ndef raises(call):\n    return 1 // 0\ndef wrong_type(call):\n    return '5'\n")
    broken = tmp_path / "broken.py"
    broken.write_text("def f(:\n")
    args = [a.format(good=good, broken=broken) for a in extra]
    status, out, err = run_cli(capsys, "run", image(tmp_path), "--boot", "long", *args)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("ringminus: ") and message in err
