"""In-guest SVM details beside the guest-hypervisor tests (test_nested.py): the CPU models'
CPUID, EFER's #GP rules, SKINIT under the apm profile, and snapshots taken inside L2."""
from __future__ import annotations

import pytest

from ringminus import Machine, StopReason
from ringminus.svm.cpuid import cpuid_table
from ringminus.arch.models import SVM, MODELS
from ringminus.emulator.boot import TSS_BASE
from ringminus.intercepts.controls import EXCEPTION_BASE
from ringminus.intercepts.profiles import PROFILES

from ..helpers import asm, boot_guest
from ..l1 import CPUID, HLT, L2_CODE, GuestHypervisor

CODE = 0x100000
EFER = 0xC000_0080


def run_l1(source: str, profile: str = "kvm", cpu_model: str = "qemu64"):
    machine = boot_guest(source, "long" if cpu_model == "qemu64" else "protected", address=CODE, profile=profile,
                         cpu_model=cpu_model)
    return machine, machine.run(timeout=30)


def cpuid(leaf: int, cpu_model: str = "qemu64", profile: str = "kvm") -> tuple[int, int, int, int]:
    source = f"mov eax, {leaf:#x}\nxor ecx, ecx\ncpuid\nhlt"
    _, result = run_l1(source, profile, cpu_model)
    return tuple(result.regs[r] & 0xFFFF_FFFF for r in ("rax", "rbx", "rcx", "rdx"))


def test_qemu64_is_an_amd_cpu_with_svm():
    _, ebx, ecx, edx = cpuid(0)
    assert (ebx.to_bytes(4, "little") + edx.to_bytes(4, "little") + ecx.to_bytes(4, "little")) == b"AuthenticAMD"
    assert cpuid(1)[0] == 0x0006_0FB1                  # the signature EDX holds at reset
    assert cpuid(0x8000_0001)[2] & SVM
    assert cpuid(0x8000_000A)[:2] == (1, 16)
    assert cpuid(0x8000_000A)[3] & 1 == 0              # no nested paging


def test_qemu32_has_no_svm_and_no_svm_leaf():
    _, ebx, ecx, edx = cpuid(0, "qemu32")
    assert (ebx.to_bytes(4, "little") + edx.to_bytes(4, "little") + ecx.to_bytes(4, "little")) == b"GenuineIntel"
    assert cpuid(0x8000_0000, "qemu32")[0] == 0x8000_0004
    assert cpuid(0x8000_0001, "qemu32")[2] & SVM == 0
    assert cpuid(0x8000_000A, "qemu32") == (0, 0, 0, 0)


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_skinit_is_advertised_exactly_where_it_executes(profile):
    table = cpuid_table(MODELS["qemu64"], PROFILES[profile])
    assert bool(table[0x8000_0001][2] & (1 << 12)) == PROFILES[profile].skinit


@pytest.mark.parametrize("value, faults", [
    (0x1000 | 0x500, False),            # SVME, with LME|LMA as they are
    (0x1000 | 0x500 | 1 << 2, True),    # a reserved bit
    (0x1000 | 0x400, True),             # clearing LME while paging is on
])
def test_efer_writes(value, faults):
    source = f"""
        mov ecx, {EFER:#x}
        mov eax, {value:#x}
        xor edx, edx
        wrmsr
        rdmsr
        hlt"""
    machine, result = run_l1(source)
    delivered = [e["vector"] for e in result.events if e.get("kind") == "exception"]
    if faults:
        assert delivered[:1] == [13]
    else:
        assert not delivered and result.stop.reason is StopReason.HLT
        assert result.regs["rax"] & 0xFFFF_FFFF == value and result.regs["efer"] == value


def test_skinit_enters_the_secure_loader_in_flat_protected_mode():
    slb, entry = 0x20_0000, 0x40
    source = f"""
        mov ecx, {EFER:#x}
        rdmsr
        or eax, 0x1000
        wrmsr
        mov eax, {slb | 0x1234:#x}
        .byte 0x0f, 0x01, 0xde"""
    machine = Machine(profile="apm")
    machine.write_memory(CODE, asm(source, 64, CODE))
    machine.write_memory(slb, entry.to_bytes(2, "little") + (0x100).to_bytes(2, "little"))
    machine.write_memory(slb + entry, asm("mov ebx, 0x5a\nhlt", 32, slb + entry))
    machine.boot("long", CODE)
    result = machine.run(timeout=30)
    regs = result.regs
    assert result.stop.reason is StopReason.HLT
    assert regs["rip"] == slb + entry + 6 and regs["rbx"] == 0x5A        # ran the loader's code
    assert regs["rax"] == slb and regs["rsp"] == slb + 0x1_0000 and regs["rdx"] == 0x0006_0FB1
    assert regs["cr0"] & 1 and not regs["cr0"] & 1 << 31 and regs["efer"] == 0
    assert regs["cs"]["base"] == 0 and regs["cs"]["limit"] == 0xFFFF_FFFF and regs["cpl"] == 0
    assert machine.gif is False
    assert result.svm["vm_cr"] & 0b111 == 0b111        # DPD, R_INIT, DIS_A20M


def test_skinit_is_ud_in_kvm_even_with_svme():
    source = f"""
        mov ecx, {EFER:#x}
        rdmsr
        or eax, 0x1000
        wrmsr
        mov eax, 0x200000
        .byte 0x0f, 0x01, 0xde"""
    _, result = run_l1(source, "kvm")
    assert [e["vector"] for e in result.events if e.get("kind") == "exception"][:1] == [6]


def test_a_snapshot_taken_in_l2_replays_the_same_exits():
    l2 = ["mov esi, 5", "again: cpuid", "dec esi", "jnz again", "hlt"]
    hv = GuestHypervisor("\n".join(l2), intercepts=(CPUID, HLT), handlers={CPUID: "jmp advance"})
    machine = hv.build()
    machine.at_instruction(40, lambda m: m.request_stop())
    first = machine.run(timeout=30)
    assert first.stop.reason is StopReason.STOPPED
    snapshot = machine.snapshot()
    in_guest = machine.svm.guest_mode
    finish = machine.run(timeout=30)
    machine.restore(snapshot)
    assert machine.svm.guest_mode == in_guest
    again = machine.run(timeout=30)
    assert again.stop == finish.stop and again.regs == finish.regs
    assert again.svm == finish.svm and not again.svm["guest_mode"]
    assert again.events[-6:] == finish.events[-6:]                  # five CPUIDs and the HLT
    assert [e["name"] for e in again.events[-6:]] == ["cpuid"] * 5 + ["hlt"]


def test_rdtsc_in_l2_reads_the_virtual_tsc_plus_the_vmcbs_tsc_offset():
    offset = 0x1234_0000_0000
    hv = GuestHypervisor("rdtsc\nshl rdx, 32\nor rax, rdx\nmov rbx, rax\nhlt", intercepts=(HLT,))
    hv.control["tsc_offset"] = offset
    machine = hv.build()
    before = machine.tsc.value
    result = machine.run(timeout=30)
    assert result.stop.reason is StopReason.HLT
    assert hv.exits(machine)[-1].rbx == machine.tsc.value + offset > before + offset   # L2's read, in RBX
    assert machine.tsc.offset == 0                                      # L1 reads the plain TSC


def test_booting_again_leaves_guest_mode():
    hv = GuestHypervisor("cpuid\nhlt", intercepts=(CPUID, HLT), handlers={CPUID: "jmp advance"})
    machine = hv.build()
    machine.break_at(L2_CODE)
    assert machine.run(timeout=30).stop.reason is StopReason.BREAKPOINT
    assert machine.svm.guest_mode and machine.guest is not None        # stopped inside L2
    machine.write_memory(CODE, asm("cpuid\nhlt", 64, CODE))
    machine.boot("long", CODE)
    assert not machine.svm.guest_mode and machine.guest is None and machine.gif
    result = machine.run(timeout=30)
    assert result.stop.reason is StopReason.HLT and result.stats["vmexits"] == 0   # CPUID ran natively


def test_an_out_the_io_bitmap_refuses_at_cpl3_exits_on_gp_and_l1_resumes():
    """L2 at CPL 3 whose OUT to the exit device (a port ringminus performs itself) the TSS's
    I/O bitmap refuses: #GP(0) before any IOIO intercept (§A.5), intercepted, and L1 — not
    the OUT, not the rest of L2's code — runs after the #VMEXIT."""
    hv = GuestHypervisor("mov al, 0x41\nout 0xf4, al\nmov rbx, 0x5a\nhlt",
                         intercepts=(HLT, EXCEPTION_BASE + 13))
    cs, ss = hv.save["cs"], hv.save["ss"]
    cs["selector"], cs["attrib"] = 0x33, 0xAFB          # 64-bit code, DPL 3
    ss["selector"], ss["attrib"] = 0x23, 0xCF3          # data, DPL 3
    hv.save["cpl"] = 3
    machine = hv.build()
    machine.memory.load(TSS_BASE + 0x68 + 0xF4 // 8, b"\x10")        # port 0xF4 refused
    result = machine.run(timeout=30)
    exits = hv.exits(machine)
    assert [e.exitcode for e in exits] == [EXCEPTION_BASE + 13]
    assert exits[0].exitinfo1 == 0 and exits[0].rip == L2_CODE + 2 and exits[0].rbx != 0x5A
    assert result.stop.reason is StopReason.HLT                        # not the exit device
