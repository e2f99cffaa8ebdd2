"""What the `--via both` fuzz campaign (ringminus/fuzz/viaboth.py) found where the host-side
L1 (`enter_guest`) and the generated in-guest L1 (a real VMRUN/#VMEXIT) disagreed: one test
per class, through the harness's public API and CLI."""
import tomllib

import pytest

from ringminus.harness import run_vector
from ringminus.harness.vectors import parse_vector
from ringminus.arch.exitcodes import ExitCode

from ..helpers import run_cli, vectors_file


def vector(text: str):
    return parse_vector(tomllib.loads(text)["vector"][0], "test", 0)


# A fault that Unicorn itself raised while ringminus flushed its translation cache at a linear
# address the L2's page tables do not map stayed "in flight": the L2's first real #PF came out
# as #DF (error code 0) on the host side, and as a silent end of the slice (QEMU's triple
# fault) in the guest.  Here the L2's CR3 points at an empty table, so nothing is mapped;
# EFER.SVME is set, so the in-guest L2 needs no entry stub and starts right at the code.
FIRST_FETCH_FAULTS = """
[[vector]]
name = "first-fetch-page-fault"
mode = "long"
code = "90"
regs = { efer = 0x1500, cr3 = 0x3000000 }
expect = { exception = 14, error_code = 0, cr2 = 0x100000 }
"""
# The same with the #PF intercepted: an exit with the #PF's error code and CR2, nothing in flight.
FIRST_FETCH_EXITS = """
[[vector]]
name = "first-fetch-page-fault-exits"
mode = "long"
code = "90"
regs = { efer = 0x1500, cr3 = 0x3000000 }
exceptions = [8, 14]
expect = { vmexit = "excp14", info1 = 0, info2 = 0x100000 }
"""


@pytest.mark.parametrize("via", ["host", "guest", "both"])
@pytest.mark.parametrize("profile", ["kvm", "apm", "qemu"])
def test_a_first_fault_under_unmapped_paging_keeps_its_vector(via, profile):
    for text in (FIRST_FETCH_FAULTS, FIRST_FETCH_EXITS):
        result = run_vector(vector(text), profile, via)
        assert result.status == "PASS", result.line()
        assert result.got.kind != "exception" or result.got.fields["exception"] == 14


def test_the_exit_of_a_first_fetch_fault_has_no_event_in_flight():
    result = run_vector(vector(FIRST_FETCH_EXITS), "kvm", "guest")
    assert result.status == "PASS", result.line()
    assert result.got.fields["vmexit"] == ExitCode.EXCP14 and result.got.fields["exit_int_info"] == 0


# An L2 state VMRUN refuses (§B.5: EFER.LME and CR0.PG with CR4.PAE clear) was a VMEXIT_INVALID
# (exit code -1) through the in-guest L1 and ran as given on the host side.  The in-guest L1
# cannot run it: a SKIP that names the failed check.
REFUSED_STATE = """
[[vector]]
name = "long-mode-without-pae"
mode = "long"
code = "90"
regs = { cr4 = 0 }
expect = { completes = true }
"""


def test_a_state_vmrun_refuses_is_a_skip_naming_the_check(tmp_path, capsys):
    result = run_vector(vector(REFUSED_STATE), "kvm", "both")
    assert result.status == "SKIP"
    assert result.note == ("via guest: VMRUN refuses the L2's state: EFER.LME and CR0.PG set with "
                           "CR4.PAE clear (APM §15.5.1)")
    status, out, _ = run_cli(capsys, "harness", vectors_file(tmp_path, REFUSED_STATE), "--via", "both")
    assert status == 0
    out = out.splitlines()
    assert out[0].startswith("SKIP long-mode-without-pae [kvm, via both]: via guest: VMRUN refuses")
    assert out[-1] == "0 passed, 0 failed, 1 skipped"


# The in-guest L2 enters through a stub that clears EFER.SVME with WRMSR and restores RAX, RCX
# and RDX; in 32-bit code it can only restore their low halves, so a protected-mode vector
# with RAX above 32 bits completed with another RAX.  The L1 now checks, as the stub's last
# instruction retires, that the L2 is in exactly the vector's state, and says what it is not.
WIDE_RAX_PROTECTED = """
[[vector]]
name = "wide-rax-protected"
mode = "protected"
cpl = 3
code = "90"
regs = { rax = 0x9d97caec40c67c08 }
expect = { completes = true, regs = { rax = 0x9d97caec40c67c08 } }
"""
# The same stub in 64-bit code restores all of RAX.
WIDE_RAX_LONG = WIDE_RAX_PROTECTED.replace('"protected"', '"long"').replace("wide-rax-protected", "wide-rax-long")
# RFLAGS.RF is cleared by every instruction that completes, the stub's too.
RESUME_FLAG = """
[[vector]]
name = "resume-flag"
mode = "protected"
code = "90"
regs = { rflags = 0x10002 }
expect = { completes = true }
"""


def test_a_state_the_entry_stub_cannot_give_is_a_skip_naming_the_registers():
    result = run_vector(vector(WIDE_RAX_PROTECTED), "kvm", "both")
    assert result.status == "SKIP" and result.note == \
        "via guest: the L2 entry stub cannot give the L2 the vector's rax"
    assert run_vector(vector(WIDE_RAX_PROTECTED), "kvm", "host").status == "PASS"
    long_mode = run_vector(vector(WIDE_RAX_LONG), "kvm", "both")
    assert long_mode.status == "PASS", long_mode.line()
    rf = run_vector(vector(RESUME_FLAG), "kvm", "both")
    assert rf.status == "SKIP" and rf.note == "via guest: the L2 entry stub cannot give the L2 the vector's rflags"


# The stub runs at 0x9F000 in the L2's own paging: where that maps nothing, it faulted and the
# fault was taken for the vector's (the same #PF vector, at the stub's address).
STUB_UNMAPPED = """
[[vector]]
name = "stub-page-unmapped"
mode = "protected"
code = "90"
regs = { cr0 = 0x80000011, cr3 = 0x3000000 }
expect = { exception = 14, cr2 = 0x100000 }
"""


def test_a_stub_that_cannot_run_is_a_skip_not_the_vectors_fault():
    assert run_vector(vector(STUB_UNMAPPED), "kvm", "host").status == "PASS"
    result = run_vector(vector(STUB_UNMAPPED), "kvm", "guest")
    assert result.status == "SKIP"
    assert result.note.startswith("via guest: the L2 entry stub did not reach its end (exception exception=0xe")
    assert "cr2=0x9f000" in result.note


# An L2 VMRUN that the vector does not list: the in-guest L1 must intercept VMRUN (VMRUN refuses
# a VMCB without it), so it took a VMRUN exit while the host-side L1 stopped as `unsupported`
# (a third level of nesting).  Every L1 intercepts VMRUN now, the host-side one too.
L2_VMRUN = """
[[vector]]
name = "l2-vmrun-not-listed"
mode = "long"
code = "0f01d8"
regs = { efer = 0x1500, rax = 0x200000 }
expect = { vmexit = "vmrun", next_rip = "+3", stage = "POST_EXCEPT" }
"""


@pytest.mark.parametrize("profile", ["kvm", "apm", "qemu"])
def test_an_l2_vmrun_exits_through_either_l1(profile):
    result = run_vector(vector(L2_VMRUN), profile, "both")
    assert result.status == "PASS", result.line()
    assert result.got.fields["vmexit"] == ExitCode.VMRUN


# `regs` that change the mode were applied as MOV-to-CR writes on the host side: QEMU then kept
# a 64-bit CS's 32-bit operand size after CR0.PG went (rax = 0x12345678), while VMRUN loads the
# same registers as a state and takes the size from CS.D, L being ignored outside long mode
# (16-bit: `mov ax, 0x5678; xor al, 0x12`).  And setting CR0.PG that way kept QEMU's TLB from
# before paging, so the first fetch did not fault on the host side.
LEGACY_MODE_64BIT_CS = """
[[vector]]
name = "legacy-mode-with-a-64-bit-cs"
mode = "long"
code = "b878563412"
regs = { cr0 = 0x11, efer = 0x1100 }
expect = { completes = true, regs = { rax = 0x566a } }
"""
PAGING_FROM_REGS = """
[[vector]]
name = "paging-set-by-regs"
mode = "protected"
code = "90"
regs = { cr0 = 0x80000011, cr3 = 0x3000000, efer = 0x1000 }
expect = { exception = 14, error_code = 0, cr2 = 0x100000 }
"""


@pytest.mark.parametrize("text", [LEGACY_MODE_64BIT_CS, PAGING_FROM_REGS], ids=["cs-size", "tlb"])
@pytest.mark.parametrize("profile", ["kvm", "apm", "qemu"])
def test_mode_registers_are_a_state_on_both_sides(text, profile):
    result = run_vector(vector(text), profile, "both")
    assert result.status == "PASS", result.line()


# Expected, documented differences (README "The nested-intercept harness"; the campaign's
# docstring): an L2 that reads VM_HSAVE_PA sees the in-guest L1's page, the host-side L1 has
# none; an L2 that writes it moves the page the apm/qemu #VMEXIT reloads L1's state from.
HSAVE_READ = """
[[vector]]
name = "l2-reads-vm-hsave-pa"
mode = "long"
asm = "mov ecx, 0xc0010117; rdmsr"
expect = { completes = true }
"""
HSAVE_WRITE = """
[[vector]]
name = "l2-writes-vm-hsave-pa"
mode = "long"
asm = "mov ecx, 0xc0010117; mov eax, 0x5000; xor edx, edx; wrmsr; vmmcall"
intercepts = ["vmmcall"]
expect = { vmexit = "vmmcall" }
"""


def test_the_vm_hsave_pa_differences_are_told_apart_by_the_campaign():
    from ringminus.fuzz import viaboth
    from ringminus.harness import inguest, runner
    read = run_vector(vector(HSAVE_READ), "kvm", "both")
    assert read.status == "FAIL" and read.got.fields == {"regs": {"rax": 0}}
    assert read.other.fields == {"regs": {"rax": inguest.Layout(64 << 20).hsave}}
    for text, profile, why in ((HSAVE_READ, "kvm", "vm_hsave_pa read"), (HSAVE_WRITE, "apm", "vm_hsave_pa written")):
        v = vector(text.replace('mode = "long"', f'mode = "long"\nprofile = "{profile}"'))
        guest = viaboth.run_guest(v)
        host, machine = viaboth.run_host(v)
        assert runner.differences(host, guest) is not None
        assert viaboth.expected_difference(v, host, guest, machine) == why
    # under kvm the host state never leaves the CPU: moving the page changes nothing
    assert run_vector(vector(HSAVE_WRITE), "kvm", "both").status == "PASS"


# A 64-bit delivery whose stack (here IST1 = 0 in the TSS) lies at the bottom of the address
# space pushed at a negative address: the #PF's CR2 came out as -40, which the in-guest L1's
# #VMEXIT could not even write into the VMCB (an escaped struct.error).  RSP wraps as on the
# CPU; a frame that is not canonical is #SS(EXT) (SDM Vol. 2A, INT n).
IST_AT_ZERO = """
[[vector]]
name = "ist-stack-wraps"
mode = "long"
code = "0f0b"
exceptions = [14]
memory = { bytes = [{ address = 0x4060, hex = "00602800018e00000000000000000000" }] }
expect = { vmexit = "excp14", info1 = 0x2, info2 = 0xffffffffffffffd8 }
"""
IST_NON_CANONICAL = """
[[vector]]
name = "ist-stack-non-canonical"
mode = "long"
code = "0f0b"
exceptions = [12]
memory = { bytes = [{ address = 0x4060, hex = "00602800018e00000000000000000000" },
                    { address = 0x1124, hex = "0000000000000080" }] }
expect = { vmexit = "excp12", info1 = 0x1 }
"""


@pytest.mark.parametrize("text", [IST_AT_ZERO, IST_NON_CANONICAL], ids=["wraps", "non-canonical"])
@pytest.mark.parametrize("profile", ["kvm", "apm", "qemu"])
def test_a_64_bit_delivery_stack_wraps_and_must_be_canonical(text, profile):
    result = run_vector(vector(text), profile, "both")
    assert result.status == "PASS", result.line()
    assert result.got.fields["exit_int_info"] == 0x8000_0306       # delivering the #UD


# A Unicorn bug, not an L1 difference (documented in the campaign and the README): a store into
# the translation block being executed makes QEMU restart it, and RFLAGS' arithmetic flags can
# come out of stale operands -- on both sides, and whether it does depends on what the CPU ran
# before (an L1 has).  Campaign seed 6650, cut down: `jns` back over zero bytes (ADDs)
# into `push`, whose store lands on those ADDs; the two sides disagreed on RFLAGS alone.
SELF_MODIFYING = """
[[vector]]
name = "push-over-the-running-block"
mode = "real"
code = "2679b66aa1"
regs = { rbx = 0xf000 }
expect = { completes = true }
"""


def campaign_verdict(text: str) -> tuple[set[str], str | None]:
    """The viaboth campaign on one vector: the registers the two L1s disagree on, and why
    it expects them to (None: a finding)."""
    from ringminus.fuzz import viaboth
    from ringminus.harness import runner
    v = vector(text)
    guest = viaboth.run_guest(v)
    host, machine = viaboth.run_host(v)
    differ = runner.differences(host, guest)
    assert differ is not None
    return set(differ[0].fields["regs"]), viaboth.expected_difference(v, host, guest, machine)


def test_the_campaign_tells_unicorns_self_modifying_flags_apart():
    assert campaign_verdict(SELF_MODIFYING) == ({"rflags"}, "self-modifying code (Unicorn's flags)")
    # with the stack away from the code, the two agree
    away = vector(SELF_MODIFYING.replace("rbx = 0xf000", "rbx = 0xf000, rsp = 0x9000"))
    assert run_vector(away, "kvm", "both").status == "PASS"


# Campaign seed 3600229, cut down (RDTSCP there, which qemu64 lacks): RDTSC at CPL 3 reads
# the virtual clock, one tick per instruction retired; the in-guest L1's own instructions
# come first, so it reads more there.
READS_THE_TSC = """
[[vector]]
name = "rdtsc-through-either-l1"
mode = "long"
cpl = 3
code = "0f31"
expect = { completes = true }
"""


def test_the_campaign_tells_the_time_stamp_counter_apart():
    registers, why = campaign_verdict(READS_THE_TSC)
    assert registers == {"rax"} and why.startswith("the time-stamp counter")


# Campaign seed 4315256, cut down: RDMSR 10h reads the same clock as RDTSC (since MSR 10h
# stopped reading 0), and the campaign must tell it apart the same way.
READS_THE_TSC_MSR = """
[[vector]]
name = "rdmsr-10-through-either-l1"
mode = "real"
code = "66b9100000000f32"
expect = { completes = true }
"""


def test_the_campaign_tells_the_tsc_msr_apart():
    registers, why = campaign_verdict(READS_THE_TSC_MSR)
    assert "rax" in registers and why.startswith("the time-stamp counter")
