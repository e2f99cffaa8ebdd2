"""In-guest SVM: the guest itself is the hypervisor (L1) and VMRUNs its own L2.

Written from the APM (Vol. 2 chapter 15, Vol. 3 VMRUN/VMLOAD/VMSAVE/STGI/CLGI) and
semantics.md §A.9, §B, §C.7, §F.19 — not from ringminus's implementation.  The guest
hypervisor is tests/l1.py: it sets EFER.SVME and VM_HSAVE_PA with WRMSR, VMRUNs the VMCB the
test wrote, logs every #VMEXIT (VMCB fields and what L1 itself sees after VMRUN) and dispatches
on EXITCODE to handlers in assembly.  Profile kvm unless a test says otherwise.
"""
from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest

from ringminus import StopReason
from ringminus.cli import main

from ..helpers import SMM_ENTRY, SMRAM_BASE, add_smram, asm, boot_guest, smram_field
from ..l1 import (CLGI, CPUID, DATA, GREGS, GPR_NUMBER, HLT, HSAVE, INIT, INTR, INVLPGA, INVLPGA_EXIT,
                 IOIO, L1_CODE, L2_CODE, L2_DATA, L2_STACK, LOG, MSR, NMI, RESULTS, SAVE_RAX, SAVE_RIP,
                 SHUTDOWN, SKINIT, SKINIT_EXIT, SMI, STGI, VINTR, VMCB, VMCB2, VMEXIT_INVALID, VMLOAD,
                 VMMCALL, VMRUN, VMRUN_EXIT, VMSAVE, Exit, GuestHypervisor, addresses, clear_intercept,
                 exit_codes, gate64, new_vmcb, read_vmcb, set_msr, set_port)

IDT = 0x4000                    # L1's IDT (the long boot state's; 256 not-present gates)
L1_HANDLERS = 0x180000          # L1 interrupt/exception handlers
L2_HANDLERS = L2_CODE + 0x800
EFER, VM_HSAVE_PA = 0xC000_0080, 0xC001_0117
V_IRQ, V_GIF, V_INTR_MASKING, V_GIF_ENABLE = 1 << 8, 1 << 9, 1 << 24, 1 << 25
EVENT_VALID, EVENT_EV = 1 << 31, 1 << 11
EXCEPTION = 3


def event(vector: int, kind: int, error_code: int | None = None) -> int:
    """EVENTINJ / EXITINTINFO (APM Figure 15-1)."""
    value = EVENT_VALID | kind << 8 | vector
    if error_code is not None:
        value |= EVENT_EV | error_code << 32
    return value


def with_smram(machine):
    add_smram(machine)
    machine.break_at(SMM_ENTRY)
    return machine


def at_smm_entry(result):
    return result.smm["smm"] is True and result.regs["cs"]["base"] == SMRAM_BASE and result.regs["rip"] == 0x8000


def l1_gate(machine, vector, source):
    """Install an L1 handler (64-bit code) for ``vector`` in L1's IDT; after boot."""
    address = L1_HANDLERS + 0x100 * vector
    machine.write_memory(address, asm(source, 64, address))
    machine.write_memory(IDT + 16 * vector, gate64(address))


def plain_l1(source, profile="kvm", **machine_args):
    """An L1 program that is not the l1.py loop: 64-bit CPL 0 at L1_CODE."""
    return boot_guest(source, "long", address=L1_CODE, profile=profile, **machine_args)


def qword(machine, address):
    return struct.unpack("<Q", machine.read_memory(address, 8))[0]


SET_SVME = f"""
    mov ecx, {EFER:#x}
    rdmsr
    or eax, 0x1000
    wrmsr
    mov ecx, {VM_HSAVE_PA:#x}
    mov eax, {HSAVE:#x}
    xor edx, edx
    wrmsr
"""


# -- CPUID and the MSRs ---------------------------------------------------------------------------

CPUID_PROGRAM = f"""
    mov rbx, {DATA + RESULTS:#x}
    mov rdi, rbx
    mov eax, 0x80000000
    cpuid
    mov [rdi], rax
    mov eax, 0x80000001
    cpuid
    mov [rdi + 8], rcx
    mov eax, 0x8000000a
    cpuid
    mov [rdi + 0x10], rax
    mov [rdi + 0x18], rbx
    mov [rdi + 0x20], rdx
    hlt
"""


@pytest.mark.parametrize("profile,decode_assists", [("kvm", False), ("apm", True), ("qemu", False)])
def test_cpuid_advertises_svm_nrips_and_decode_assists_by_profile(profile, decode_assists):
    machine = plain_l1(CPUID_PROGRAM, profile)
    assert machine.run(timeout=30).stop.reason is StopReason.HLT
    base = DATA + RESULTS
    assert qword(machine, base) & 0xFFFF_FFFF >= 0x8000_000A            # the SVM leaf exists
    assert qword(machine, base + 8) >> 2 & 1 == 1                         # Fn8000_0001 ECX.SVM
    assert qword(machine, base + 0x10) & 0xFF == 1                        # SVM revision 1
    assert qword(machine, base + 0x18) & 0xFFFF_FFFF >= 1                 # number of ASIDs
    features = qword(machine, base + 0x20) & 0xFFFF_FFFF
    assert features & 1 == 0                                              # no nested paging
    assert features >> 3 & 1 == 1                                         # NRIPS
    assert bool(features >> 7 & 1) is decode_assists                      # DecodeAssists


def test_efer_svme_and_vm_hsave_pa_read_back():
    machine = plain_l1(f"""
        mov rdi, {DATA + RESULTS:#x}
        mov ecx, {EFER:#x}
        rdmsr
        mov [rdi], eax
        {SET_SVME}
        mov ecx, {EFER:#x}
        rdmsr
        mov [rdi + 8], eax
        mov ecx, {VM_HSAVE_PA:#x}
        rdmsr
        mov [rdi + 0x10], eax
        mov [rdi + 0x14], edx
        hlt""")
    assert machine.run(timeout=30).stop.reason is StopReason.HLT
    before, after = qword(machine, DATA + RESULTS), qword(machine, DATA + RESULTS + 8)
    assert before & 0x1000 == 0 and before & 0x500 == 0x500               # LME|LMA, no SVME yet
    assert after == before | 0x1000                                       # SVME kept, nothing else
    assert qword(machine, DATA + RESULTS + 0x10) == HSAVE


# -- a guest hypervisor running an L2 through several exits ----------------------------------------

MAIN_L2 = [
    "mov eax, 0x40000000",
    "cpuid",                                    # exit 1: CPUID
    "mov r8, rax", "mov r9, rbx", "mov r10, rcx", "mov r11, rdx",
    "mov al, 0x41",
    "out 0xe9, al",                             # not in the IOPM: L2 writes the console itself
    "in al, 0x80",                              # exit 2: IOIO IN, port 0x80, 8 bits
    "mov r12, rax",
    "mov dx, 0x5000",
    "mov ax, 0xbeef",
    "out dx, ax",                               # exit 3: IOIO OUT, port 0x5000, 16 bits
    "mov ecx, 0x277",
    "rdmsr",                                    # exit 4: MSR read
    "mov r13, rax", "mov r14, rdx",
    "mov ecx, 0x277", "mov eax, 0x12345678", "mov edx, 0x9abcdef0",
    "wrmsr",                                    # exit 5: MSR write
    "sub rsp, 0x40",
    "mov eax, 1",
    "cpuid",                                    # exit 6: CPUID
    "mov r15, rax",
    "hlt",                                      # exit 7: HLT (L1 stops here)
]
MAIN_HANDLERS = {
    # CPUID: EAX = leaf + 0x1000 (through the VMCB), EBX/ECX/EDX = 0x1111/0x2222/0x3333
    # (straight into L2's registers, which L1 keeps in GREGS), then RIP := NEXT_RIP.
    CPUID: f"""
        mov rax, [rbx + {SAVE_RAX:#x}]
        add rax, 0x1000
        mov [rbx + {SAVE_RAX:#x}], rax
        mov qword ptr [rbx + {GREGS + 8 * 3:#x}], 0x1111
        mov qword ptr [rbx + {GREGS + 8 * 1:#x}], 0x2222
        mov qword ptr [rbx + {GREGS + 8 * 2:#x}], 0x3333
        jmp advance""",
    # IOIO: IN gives AL = 0x5A; OUT records RAX; RIP := EXITINFO2 (the next instruction).
    IOIO: f"""
        mov rax, [rbx + 0x78]
        test al, 1
        jz io_out
        mov rax, [rbx + {SAVE_RAX:#x}]
        mov al, 0x5a
        mov [rbx + {SAVE_RAX:#x}], rax
        jmp io_next
    io_out:
        mov rax, [rbx + {SAVE_RAX:#x}]
        mov [rbx + {RESULTS:#x}], rax
    io_next:
        mov rax, [rbx + 0x80]
        mov [rbx + {SAVE_RIP:#x}], rax
        jmp vmrun_loop""",
    # MSR: RDMSR gives EDX:EAX = 0x11223344:0xAABBCCDD; WRMSR records ECX, EAX, EDX.
    MSR: f"""
        mov rax, [rbx + 0x78]
        test rax, rax
        jnz msr_write
        mov eax, 0xaabbccdd
        mov [rbx + {SAVE_RAX:#x}], rax
        mov qword ptr [rbx + {GREGS + 8 * 2:#x}], 0x11223344
        jmp advance
    msr_write:
        mov rax, [rbx + {GREGS + 8 * 1:#x}]
        mov [rbx + {RESULTS + 8:#x}], rax
        mov rax, [rbx + {SAVE_RAX:#x}]
        mov [rbx + {RESULTS + 0x10:#x}], rax
        mov rax, [rbx + {GREGS + 8 * 2:#x}]
        mov [rbx + {RESULTS + 0x18:#x}], rax
        jmp advance""",
}
MAIN_HOST_RFLAGS = 0x8C3                        # OF SF ZF CF and bit 1: L1's RFLAGS at VMRUN


def main_hypervisor() -> GuestHypervisor:
    hv = GuestHypervisor("\n".join(MAIN_L2), handlers=MAIN_HANDLERS, host_rflags=MAIN_HOST_RFLAGS,
                         intercepts=(HLT, CPUID, IOIO, MSR))
    set_port(hv.iopm, 0x80)
    set_port(hv.iopm, 0x5001)                   # a 16-bit OUT to 0x5000 touches 0x5000-0x5001
    set_msr(hv.msrpm, 0x277)
    hv.save["rax"] = 0x7777
    hv.gregs.update(rsi=0x5151_5151_5151_5151, rbp=0xB0B0, rdi=0xD1D1)
    return hv


def check_main_run(exits: list[Exit], l2: dict, vmcb, results: dict):
    at = dict(zip(range(len(MAIN_L2)), addresses(MAIN_L2)))
    line = {text: i for i, text in reversed(list(enumerate(MAIN_L2)))}
    cpuid1, inb, outw, rdmsr, wrmsr = line["cpuid"], line["in al, 0x80"], line["out dx, ax"], line["rdmsr"], line["wrmsr"]
    cpuid2 = len(MAIN_L2) - 3
    hlt = len(MAIN_L2) - 1
    assert [e.exitcode for e in exits] == [CPUID, IOIO, IOIO, MSR, MSR, CPUID, HLT]
    # RIP of the intercepted instruction, NEXT_RIP after it (§A.9: nRIP on instruction intercepts)
    for e, i in zip(exits, (cpuid1, inb, outw, rdmsr, wrmsr, cpuid2, hlt)):
        assert e.rip == at[i], (hex(e.exitcode), hex(e.rip))
        assert e.nrip == (at[i + 1] if i + 1 < len(MAIN_L2) else at[i] + 1), hex(e.exitcode)
        assert e.exitintinfo == 0
    # IOIO EXITINFO1 (APM Fig. 15-2; kvm fills A16/32/64, not SEG), EXITINFO2 = next RIP (§A.5)
    assert exits[1].exitinfo1 == 0x0080_0000 | 1 << 9 | 1 << 4 | 1        # port 0x80, A64, SZ8, IN
    assert exits[2].exitinfo1 == 0x5000_0000 | 1 << 9 | 1 << 5            # port 0x5000, A64, SZ16, OUT
    assert exits[1].exitinfo2 == at[inb + 1] and exits[2].exitinfo2 == at[outw + 1]
    assert (exits[3].exitinfo1, exits[4].exitinfo1) == (0, 1)             # RDMSR 0, WRMSR 1 (§A.6)
    # L2's RAX travels in the VMCB, the other GPRs stay in the registers across #VMEXIT
    assert exits[0].rax == 0x4000_0000 and exits[5].rax == 1
    assert exits[2].rax & 0xFFFF == 0xBEEF and exits[3].rcx & 0xFFFF_FFFF == 0x277
    assert exits[4].rdx & 0xFFFF_FFFF == 0x9ABC_DEF0
    # What L1 sees after every #VMEXIT: its own RAX, RSP and RFLAGS from VMRUN time (host save)
    for e in exits:
        assert e.host_rax == VMCB
        assert e.host_rflags == MAIN_HOST_RFLAGS
        assert e.host_rsp == results["rsp_at_vmrun"]
    # L2's registers after the run
    assert (l2["r8"], l2["r9"], l2["r10"], l2["r11"]) == (0x4000_1000, 0x1111, 0x2222, 0x3333)
    assert l2["r12"] & 0xFF == 0x5A
    assert (l2["r13"], l2["r14"]) == (0xAABB_CCDD, 0x1122_3344)
    assert l2["r15"] == 0x1001
    assert (l2["rsi"], l2["rbp"], l2["rdi"]) == (0x5151_5151_5151_5151, 0xB0B0, 0xD1D1)  # untouched
    assert (results["out"] & 0xFFFF, results["wrmsr"]) == (0xBEEF, (0x277, 0x1234_5678, 0x9ABC_DEF0))
    # The VMCB after the last exit: guest state written back (§B.6)
    control, save = vmcb["control"], vmcb["save"]
    assert int(control["exitcode"]) == HLT and int(control["nrip"]) == at[hlt] + 1
    assert int(save["rip"]) == at[hlt] and int(save["rsp"]) == L2_STACK - 0x40
    assert int(save["rax"]) == 0x1001 and int(save["cpl"]) == 0
    assert int(save["cs"]["selector"]) == 0x28 and int(save["cs"]["attrib"]) == 0xA9B
    assert int(save["efer"]) == 0x1500 and int(save["cr0"]) == 0x8000_0011 and int(save["cr4"]) == 0x20
    assert int(save["cr3"]) == 0x10000 and int(save["rflags"]) & 0x2


def test_guest_hypervisor_runs_l2_through_cpuid_ioio_msr_and_hlt_exits():
    hv = main_hypervisor()
    machine = hv.build()
    result = hv.run()
    assert result.stop.reason is StopReason.HLT, result.stop
    assert result.regs["rip"] > L1_CODE and result.regs["rip"] < L1_CODE + len(hv.l1)   # L1 halted
    exits = hv.exits()
    results = {"rsp_at_vmrun": qword(machine, DATA + 0x3118), "out": hv.result(0),
               "wrmsr": tuple(hv.result(o) & 0xFFFF_FFFF for o in (8, 0x10, 0x18))}
    check_main_run(exits, hv.l2_registers(), hv.read_vmcb(), results)
    assert result.console == b"A" or result.console == "A"                # the unintercepted OUT
    # L1 runs in its own world again: CPL 0, 64-bit CS, its page tables and EFER (§B.6)
    regs = result.regs
    assert regs["cpl"] == 0 and regs["cs"]["selector"] == 0x28 and regs["cs"]["attributes"] == 0xA09B
    assert regs["cr3"] == 0x10000 and regs["efer"] & 0x500 == 0x500 and regs["cr0"] & 0x8000_0001 == 0x8000_0001
    # The machine's view of the exits
    assert result.stats["vmexits"] == 7
    assert exit_codes(result.events) == [CPUID, IOIO, IOIO, MSR, MSR, CPUID, HLT]
    assert machine.last_exit is not None and int(machine.last_exit.code) == HLT
    assert machine.gif is False                                           # #VMEXIT cleared GIF


def test_guest_hypervisor_through_the_cli(tmp_path):
    hv = main_hypervisor()
    (tmp_path / "l1.bin").write_bytes(hv.l1)
    (tmp_path / "l2.bin").write_bytes(hv.l2)
    (tmp_path / "data.bin").write_bytes(hv.data_image())
    command = [sys.executable, "-m", "ringminus", "run", str(tmp_path / "l1.bin"), "--boot", "long",
               "--blob", f"{tmp_path / 'l2.bin'}@{L2_CODE:#x}", "--blob", f"{tmp_path / 'data.bin'}@{DATA:#x}",
               "--timeout", "30", "--json",
               "--dump", f"{DATA + LOG:#x}:{7 * 128}", "--dump", f"{VMCB:#x}:4096",
               "--dump", f"{DATA + GREGS:#x}:128", "--dump", f"{DATA + RESULTS:#x}:32",
               "--dump", f"{DATA + 0x3118:#x}:8"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["stop"]["reason"] == "hlt" and doc["stats"]["vmexits"] == 7 and doc["console"] == "A"
    dumps = [bytes.fromhex(d["hex"]) for d in doc["dump"]]
    exits = []
    for i in range(7):
        values = list(struct.unpack_from("<16Q", dumps[0], 128 * i))
        exits.append(Exit(*values))
    from ringminus.intercepts.vmcb import vmcb_view
    vmcb = vmcb_view(bytearray(dumps[1]))
    l2 = {name: struct.unpack_from("<Q", dumps[2], 8 * n)[0] for name, n in GPR_NUMBER.items()}
    res = struct.unpack("<4Q", dumps[3])
    results = {"rsp_at_vmrun": struct.unpack("<Q", dumps[4])[0], "out": res[0],
               "wrmsr": tuple(v & 0xFFFF_FFFF for v in res[1:])}
    check_main_run(exits, l2, vmcb, results)


@pytest.mark.parametrize("mode,bits,address", [("protected", 32, L2_CODE), ("real", 16, 0x8000)])
def test_l2_in_another_mode_and_l1_back_in_long_mode(mode, bits, address):
    l2 = ["mov eax, 0x12", "cpuid", "mov esi, ebx", "hlt"]
    at = addresses(l2, bits, address)
    hv = GuestHypervisor("\n".join(l2), l2_bits=bits, mode=mode, l2_address=address,
                         handlers={CPUID: MAIN_HANDLERS[CPUID]}, intercepts=(HLT, CPUID),
                         done=f"mov rax, 0x1122334455667788\nmov [rbx + {RESULTS:#x}], rax\n"
                              f"mov eax, 0x8000000a\ncpuid\nmov rbx, {DATA:#x}\nmov [rbx + {RESULTS + 8:#x}], rax")
    result = hv.run()
    assert result.stop.reason is StopReason.HLT, result.stop
    exits = hv.exits()
    base = 0 if mode == "protected" else address & ~0xFFFF
    assert [(e.exitcode, e.rip, e.nrip) for e in exits] == [(CPUID, at[1] - base, at[2] - base),
                                                           (HLT, at[3] - base, at[3] - base + 1)]
    assert hv.l2_registers()["rsi"] & 0xFFFF_FFFF == 0x1111
    assert exits[1].rax & 0xFFFF_FFFF == 0x1012
    vmcb = hv.read_vmcb()
    assert int(vmcb["save"]["cs"]["selector"]) == (0x08 if mode == "protected" else 0)
    assert int(vmcb["save"]["cr0"]) & 1 == (1 if mode == "protected" else 0)
    # Back in L1: 64-bit code ran (a 64-bit immediate stored), long mode and paging restored
    assert hv.result(0) == 0x1122_3344_5566_7788
    assert hv.result(8) & 0xFFFF_FFFF == 1      # L1's own CPUID is not intercepted (SVM revision 1)
    assert result.stats["vmexits"] == 2
    regs = result.regs
    assert regs["efer"] & 0x500 == 0x500 and regs["cr0"] >> 31 == 1 and regs["cr4"] & 0x20 and regs["cr3"] == 0x10000


# -- VMRUN consistency checks (§B.5) → VMEXIT_INVALID ----------------------------------------------

def _set(path, value):
    def change(v):
        record = v
        parts = path.split(".")
        for part in parts[:-1]:
            record = record[part]
        record[parts[-1]] = value
    return change


def _or(path, bits):
    def change(v):
        record = v
        parts = path.split(".")
        for part in parts[:-1]:
            record = record[part]
        record[parts[-1]] = int(record[parts[-1]]) | bits
    return change


def _clear_vmrun_intercept(v):
    clear_intercept(v["control"], VMRUN_EXIT)


ILLEGAL = {
    "efer-svme-clear": _set("save.efer", 0x500),
    "cr0-nw-without-cd": _or("save.cr0", 1 << 29),
    "cr0-high-bits": _or("save.cr0", 1 << 32),
    "cr3-mbz": _or("save.cr3", 1 << 60),
    "cr4-mbz": _or("save.cr4", 1 << 40),
    "dr6-high-bits": _or("save.dr6", 1 << 32),
    "dr7-high-bits": _or("save.dr7", 1 << 32),
    "efer-mbz": _or("save.efer", 1 << 40),
    "lme-pg-without-pae": _set("save.cr4", 0),
    "lme-pg-without-pe": _set("save.cr0", 0x8000_0010),
    "long-mode-cs-l-and-d": _set("save.cs.attrib", 0xA9B | 1 << 10),
    "vmrun-intercept-clear": _clear_vmrun_intercept,
    "msrpm-beyond-physical": _set("control.msrpm_base_pa", (1 << 52) - 0x1000),
    # qemu64 has 40-bit physical addresses (CPUID Fn8000_0008 EAX[7:0] = 0x28): a map that
    # starts below 2^40 but whose last byte lies above it
    "msrpm-straddles-max-phys": _set("control.msrpm_base_pa", (1 << 40) - 0x1000),
    "iopm-straddles-max-phys": _set("control.iopm_base_pa", (1 << 40) - 0x1000),
    "iopm-beyond-physical": _set("control.iopm_base_pa", (1 << 52) - 0x2000),
    "eventinj-reserved-type-1": _set("control.eventinj", event(0x20, 1)),
    "eventinj-reserved-type-5": _set("control.eventinj", event(0x20, 5)),
    "eventinj-reserved-type-6": _set("control.eventinj", event(0x20, 6)),
    "eventinj-reserved-type-7": _set("control.eventinj", event(0x20, 7)),
    "eventinj-exception-vector-2": _set("control.eventinj", event(2, EXCEPTION)),
    "eventinj-exception-vector-32": _set("control.eventinj", event(32, EXCEPTION)),
    "eventinj-exception-vector-255": _set("control.eventinj", event(255, EXCEPTION)),
    "asid-zero": _set("control.guest_asid", 0),
    "np-enable": _set("control.nested_control", 1),
}
MARKER = 0x4D41524B                             # what L2 stores first thing if it ever runs
MARKING_L2 = f"mov rdi, {L2_DATA:#x}\nmov dword ptr [rdi], {MARKER:#x}\nhlt"


def invalid_run(change=None, profile="kvm"):
    hv = GuestHypervisor(MARKING_L2, profile=profile, host_rflags=0x8C3)
    hv.save["rax"] = 0x7777
    if change:
        change(hv.vmcb)
    result = hv.run()
    return hv, result


def test_baseline_vmcb_is_valid():
    """The VMCB the consistency tests start from runs L2 (otherwise they would prove nothing)."""
    hv, result = invalid_run()
    assert result.stop.reason is StopReason.HLT
    assert [e.exitcode for e in hv.exits()] == [HLT]
    assert qword(hv.machine, L2_DATA) & 0xFFFF_FFFF == MARKER


@pytest.mark.parametrize("name", sorted(ILLEGAL))
def test_consistency_failure_exits_with_vmexit_invalid(name):
    hv, result = invalid_run(ILLEGAL[name])
    assert result.stop.reason is StopReason.HLT, result.stop
    exits = hv.exits()
    assert [e.exitcode for e in exits] == [VMEXIT_INVALID], name            # EXITCODE = -1 in the VMCB
    assert int(hv.read_vmcb()["control"]["exitcode"]) == -1
    assert qword(hv.machine, L2_DATA) == 0                                  # L2 never ran
    # L1 went on right after its VMRUN with its own RAX, RSP and RFLAGS
    assert exits[0].host_rax == VMCB and exits[0].host_rflags == 0x8C3
    assert exits[0].host_rsp == qword(hv.machine, DATA + 0x3118)
    assert result.regs["cpl"] == 0 and result.regs["cs"]["selector"] == 0x28
    assert hv.machine.last_exit is not None and int(hv.machine.last_exit.code) == -1


@pytest.mark.parametrize("profile,gif_after", [("kvm", True), ("apm", False)])
def test_vmexit_invalid_and_gif_by_profile(profile, gif_after):
    """The APM makes a failed VMRUN a #VMEXIT (which clears GIF, §B.6); KVM's nested VMRUN
    only writes SVM_EXIT_ERR into vmcb12 and leaves GIF alone (nested_svm_vmrun)."""
    hv, result = invalid_run(ILLEGAL["asid-zero"], profile=profile)
    assert result.stop.reason is StopReason.HLT
    assert [e.exitcode for e in hv.exits()] == [VMEXIT_INVALID]
    assert hv.machine.gif is gif_after


def test_paged_real_mode_is_not_a_consistency_failure():
    """§B.5: VMRUN may load CR0.PE=0 with PG=1 (paged real mode) when EFER.LME is clear."""
    hv = GuestHypervisor(asm("hlt", 16), mode="real", l2_address=0x8000)
    page_directory = 0x3F_0000                  # 32-bit paging, one 4 MiB identity page (PSE)
    hv.save["cr0"] = 0x8000_0010
    hv.save["cr3"] = page_directory
    hv.save["cr4"] = 1 << 4
    machine = hv.build()
    machine.write_memory(page_directory, struct.pack("<I", 0x87).ljust(0x1000, b"\0"))
    result = hv.run()
    assert result.stop.reason is StopReason.HLT
    assert [e.exitcode for e in hv.exits()] == [HLT]


def pae_guest(pdpte_bits: int = 0, index: int = 1, profile: str = "kvm") -> GuestHypervisor:
    """A legacy-PAE L2 (32-bit, paging on) on four PDPTEs at PDPT, each to a page directory
    of 2 MiB identity pages; ``pdpte_bits`` are ORed into PDPTE ``index``."""
    hv = GuestHypervisor("mov eax, 0x77; hlt", 32, mode="protected", profile=profile)
    hv.save["cr0"] = 0x8000_0011
    hv.save["cr3"] = PDPT
    hv.save["cr4"] = 1 << 5
    machine = hv.build()
    for i in range(4):
        directory = PDPT + 0x1000 * (i + 1)
        entry = directory | 1 | (pdpte_bits if i == index else 0)
        machine.write_memory(PDPT + 8 * i, struct.pack("<Q", entry))
        machine.write_memory(directory, b"".join(struct.pack("<Q", (i << 30 | j << 21) | 0x83) for j in range(512)))
    return hv


PDPT = 0x3F_0000


@pytest.mark.parametrize("bits", [0, 1 << 9 | 1 << 10 | 1 << 11], ids=["clean", "ignored-bits"])
def test_a_pae_guest_runs_on_its_pdptes(bits):
    hv = pae_guest(bits)
    assert hv.run().stop.reason is StopReason.HLT
    assert [e.exitcode for e in hv.exits()] == [HLT] and hv.exits()[0].rax == 0x77


@pytest.mark.parametrize("bit", [52, 62, 63, 1, 5, 8])
@pytest.mark.parametrize("index", [0, 3])
def test_a_pdpte_reserved_bit_fails_vmrun(index, bit):
    """kvm-unit-tests' svm_pae_test (no NPT): KVM loads the PDPTEs as it enters the guest, and
    a reserved bit fails the VMRUN with VMEXIT_INVALID by a whole #VMEXIT, which clears GIF."""
    hv = pae_guest(1 << bit, index)
    assert hv.run().stop.reason is StopReason.HLT
    assert [e.exitcode for e in hv.exits()] == [VMEXIT_INVALID]
    assert hv.machine.gif is False


def test_qemu_loads_no_pdptes_at_vmrun():
    """QEMU's helper_vmrun checks no PDPTE: an unused bad PDPTE3 is never seen."""
    hv = pae_guest(1 << 52, 3, profile="qemu")
    assert hv.run().stop.reason is StopReason.HLT
    assert [e.exitcode for e in hv.exits()] == [HLT]


# -- #UD and #GP from the SVM instructions themselves ----------------------------------------------

def recording_handlers(machine):
    """#UD and #GP handlers in L1 that record the vector, error code and the frame, then halt."""
    for vector, has_error in ((6, False), (13, True)):
        pop = "pop rax\nmov [rdi + 8], rax" if has_error else "mov qword ptr [rdi + 8], -1"
        l1_gate(machine, vector, f"""
            mov rdi, {DATA + RESULTS:#x}
            mov qword ptr [rdi], {vector}
            {pop}
            mov rax, [rsp]
            mov [rdi + 0x10], rax
            mov rax, [rsp + 8]
            mov [rdi + 0x18], rax
            hlt""")


SVM_INSTRUCTIONS = {"vmrun": VMRUN, "vmload": VMLOAD, "vmsave": VMSAVE, "stgi": STGI, "clgi": CLGI,
                    "invlpga": INVLPGA}


@pytest.mark.parametrize("name", sorted(SVM_INSTRUCTIONS))
def test_svm_instructions_raise_ud_while_efer_svme_is_clear(name):
    machine = plain_l1(f"mov rax, {VMCB:#x}\nxor ecx, ecx\n{SVM_INSTRUCTIONS[name]}\n"
                       f"mov rdi, {DATA + RESULTS + 0x40:#x}\nmov qword ptr [rdi], 1\nhlt")
    recording_handlers(machine)
    assert machine.run(timeout=30).stop.reason is StopReason.HLT
    base = DATA + RESULTS
    insn = L1_CODE + len(asm(f"mov rax, {VMCB:#x}\nxor ecx, ecx", 64))
    assert qword(machine, base) == 6 and qword(machine, base + 0x10) == insn
    assert qword(machine, base + 0x40) == 0                               # it did not complete


@pytest.mark.parametrize("name", sorted(SVM_INSTRUCTIONS))
def test_svm_instructions_at_cpl3_raise_gp0(name):
    """With EFER.SVME set, VMRUN, VMLOAD, VMSAVE, STGI, CLGI and INVLPGA at CPL 3 → #GP(0)."""
    user = L1_CODE + 0x800
    machine = plain_l1(f"""
        {SET_SVME}
        push 0x23
        push 0x70000
        push 0x2
        push 0x33
        mov rax, {user:#x}
        push rax
        iretq""")
    machine.write_memory(user, asm(f"mov rax, {VMCB:#x}\n{SVM_INSTRUCTIONS[name]}\nhlt", 64, user))
    recording_handlers(machine)
    new = new_vmcb()[0]
    machine.write_memory(VMCB, bytes(new))
    assert machine.run(timeout=30).stop.reason is StopReason.HLT
    base = DATA + RESULTS
    assert qword(machine, base) == 13 and qword(machine, base + 8) == 0      # #GP(0)
    vmrun_at = user + len(asm(f"mov rax, {VMCB:#x}", 64))
    assert qword(machine, base + 0x10) == vmrun_at and qword(machine, base + 0x18) == 0x33
    assert machine.last_exit is None or int(machine.last_exit.code) != VMEXIT_INVALID


@pytest.mark.parametrize("name", sorted(SVM_INSTRUCTIONS))
def test_a_locked_svm_instruction_raises_ud(name):
    """With EFER.SVME set at CPL 0 (where they run inside Unicorn's hooks): LOCK → #UD."""
    machine = plain_l1(f"{SET_SVME}\nmov rax, {VMCB:#x}\nxor ecx, ecx\n.byte 0xf0\n{SVM_INSTRUCTIONS[name]}\n"
                       f"mov rdi, {DATA + RESULTS + 0x40:#x}\nmov qword ptr [rdi], 1\nhlt")
    recording_handlers(machine)
    machine.write_memory(VMCB, bytes(new_vmcb()[0]))
    assert machine.run(timeout=30).stop.reason is StopReason.HLT
    base = DATA + RESULTS
    insn = L1_CODE + len(asm(f"{SET_SVME}\nmov rax, {VMCB:#x}\nxor ecx, ecx", 64))
    assert qword(machine, base) == 6 and qword(machine, base + 0x10) == insn
    assert qword(machine, base + 0x40) == 0                               # it did not complete


BAD_VMCB_ADDRESSES = [("vmrun", VMCB + 8), ("vmrun", VMCB + 0x800), ("vmrun", 1 << 52), ("vmrun", 1 << 40),
                      ("vmload", 1 << 52), ("vmload", 1 << 40), ("vmsave", 1 << 52), ("vmsave", 1 << 40)]


@pytest.mark.parametrize("name,rax", BAD_VMCB_ADDRESSES)
def test_a_bad_vmcb_address_raises_gp0(name, rax):
    """VMRUN: rAX not 4 KiB aligned or beyond the physical address space (40 bits on
    qemu64) → #GP(0).  VMLOAD/VMSAVE: beyond the physical address space → #GP(0); KVM uses the
    page rAX points into without checking its low bits, so alignment is not tested for them."""
    machine = plain_l1(f"{SET_SVME}\nmov rax, {rax:#x}\n{SVM_INSTRUCTIONS[name]}\nhlt")
    recording_handlers(machine)
    machine.write_memory(VMCB, bytes(new_vmcb()[0]))
    assert machine.run(timeout=30).stop.reason is StopReason.HLT
    base = DATA + RESULTS
    vmrun_at = L1_CODE + len(asm(f"{SET_SVME}\nmov rax, {rax:#x}", 64))
    assert (qword(machine, base), qword(machine, base + 8), qword(machine, base + 0x10)) == (13, 0, vmrun_at)


def test_skinit_in_l1_is_ud_in_the_kvm_profile():
    """KVM (and QEMU) raise #UD for SKINIT instead of performing a secure init (§F.5)."""
    machine = plain_l1(f"{SET_SVME}\nmov eax, 0x200000\n{SKINIT}\nhlt")
    recording_handlers(machine)
    assert machine.run(timeout=30).stop.reason is StopReason.HLT
    skinit_at = L1_CODE + len(asm(f"{SET_SVME}\nmov eax, 0x200000", 64))
    assert (qword(machine, DATA + RESULTS), qword(machine, DATA + RESULTS + 0x10)) == (6, skinit_at)


def test_invlpga_at_cpl0_with_svme_completes():
    machine = plain_l1(f"{SET_SVME}\nmov rax, 0x200000\nmov ecx, 1\n{INVLPGA}\nmov rbx, 0x77\nhlt")
    recording_handlers(machine)
    result = machine.run(timeout=30)
    assert result.stop.reason is StopReason.HLT and result.regs["rbx"] == 0x77
    assert qword(machine, DATA + RESULTS) == 0                            # no exception


# -- SVM instructions in L2 are intercepted (§E.1 #53, APM §15.4) ----------------------------------

L2_SVM_EXITS = [("vmrun", VMRUN, VMRUN_EXIT), ("vmmcall", VMMCALL, 0x081), ("vmload", VMLOAD, 0x082),
                ("vmsave", VMSAVE, 0x083), ("stgi", STGI, 0x084), ("clgi", CLGI, 0x085),
                ("skinit", SKINIT, SKINIT_EXIT), ("invlpga", INVLPGA, INVLPGA_EXIT)]


@pytest.mark.parametrize("name,insn,code", L2_SVM_EXITS, ids=[n for n, _, _ in L2_SVM_EXITS])
def test_svm_instruction_in_l2_takes_its_intercept(name, insn, code):
    l2 = [f"mov rax, {VMCB2:#x}", "xor ecx, ecx", insn, "hlt"]
    at = addresses(l2)
    hv = GuestHypervisor("\n".join(l2), intercepts=(HLT, code), handlers={code: "jmp advance"})
    result = hv.run()
    assert result.stop.reason is StopReason.HLT
    exits = hv.exits()
    assert [(e.exitcode, e.rip, e.nrip) for e in exits] == [(code, at[2], at[3]), (HLT, at[3], at[3] + 1)]
    assert exits[0].rax == VMCB2


def test_msr_intercept_follows_the_msrpm_and_always_exits_outside_its_ranges():
    """APM §15.11 (§A.6): the MSRPM's read and write bits are separate; an MSR outside the
    three ranges always exits while the MSR intercept is set."""
    l2 = ["mov ecx, 0x277", "rdmsr", "wrmsr", "mov ecx, 0x40000000", "rdmsr", "hlt"]
    at = addresses(l2)
    hv = GuestHypervisor("\n".join(l2), intercepts=(HLT, MSR), handlers={MSR: "jmp advance"})
    set_msr(hv.msrpm, 0x277, read=False, write=True)
    result = hv.run()
    assert result.stop.reason is StopReason.HLT
    assert [(e.exitcode, e.rip, e.exitinfo1, e.rcx & 0xFFFF_FFFF) for e in hv.exits()] == [
        (MSR, at[2], 1, 0x277), (MSR, at[4], 0, 0x4000_0000), (HLT, at[5], 0, 0x4000_0000)]


# -- VMLOAD / VMSAVE ---------------------------------------------------------------------------------

VMLOAD_STATE = {
    "fs": (0x10, 0xC93, 0xFFFF_FFFF, 0x35_0000),
    "gs": (0x23, 0xCF3, 0xFFFF_FFFF, 0x36_0000),
    "tr": (0x40, 0x08B, 0x67, 0x37_0000),
    "ldtr": (0x50, 0x082, 0xFF, 0x37_1000),
    "kernel_gs_base": 0xFFFF_8000_1234_5000,
    "star": 0x0023_0010_0000_0000,
    "lstar": 0xFFFF_FFFF_8100_0000,
    "cstar": 0xFFFF_FFFF_8100_1000,
    "sfmask": 0x4_7700,
    "sysenter_cs": 0x10,
    "sysenter_esp": 0xFFFF_8000_0000_9000,
    "sysenter_eip": 0xFFFF_8000_0012_3456,
}
MSR_READS = [("fs_base", 0xC000_0100), ("gs_base", 0xC000_0101), ("kernel_gs_base", 0xC000_0102),
             ("star", 0xC000_0081), ("lstar", 0xC000_0082), ("cstar", 0xC000_0083), ("sfmask", 0xC000_0084),
             ("sysenter_cs", 0x174), ("sysenter_esp", 0x175), ("sysenter_eip", 0x176)]
NEW_LSTAR = 0xFFFF_FFFF_8765_4321


def test_vmload_then_vmsave_round_trip():
    reads = "\n".join(f"mov ecx, {msr:#x}\nrdmsr\nshl rdx, 32\nor rax, rdx\nmov [rbx + {8 * i:#x}], rax"
                      for i, (_, msr) in enumerate(MSR_READS))
    n = len(MSR_READS)
    machine = plain_l1(f"""
        {SET_SVME}
        mov rbx, {DATA + RESULTS:#x}
        mov rax, {VMCB:#x}
        {VMLOAD}
        {reads}
        xor eax, eax
        mov ax, fs
        mov [rbx + {8 * n:#x}], rax
        mov ax, gs
        mov [rbx + {8 * (n + 1):#x}], rax
        str ax
        mov [rbx + {8 * (n + 2):#x}], rax
        sldt ax
        mov [rbx + {8 * (n + 3):#x}], rax
        xor esi, esi
        mov rax, fs:[rsi]
        mov [rbx + {8 * (n + 4):#x}], rax
        mov rax, gs:[rsi + 8]
        mov [rbx + {8 * (n + 5):#x}], rax
        mov ecx, 0xC0000082
        mov eax, {NEW_LSTAR & 0xFFFF_FFFF:#x}
        mov edx, {NEW_LSTAR >> 32:#x}
        wrmsr
        mov rax, {VMCB2:#x}
        {VMSAVE}
        hlt""")
    buffer, v = new_vmcb()
    save = v["save"]
    for name, value in VMLOAD_STATE.items():
        if isinstance(value, tuple):
            save[name]["selector"], save[name]["attrib"], save[name]["limit"], save[name]["base"] = value
        else:
            save[name] = value
    machine.write_memory(VMCB, bytes(buffer))
    other, w = new_vmcb()
    w["save"]["rip"] = 0xDEAD_BEEF                  # VMSAVE must leave what it does not save
    w["control"]["guest_asid"] = 0x55
    machine.write_memory(VMCB2, bytes(other))
    machine.write_memory(0x35_0000, struct.pack("<Q", 0xF5F5_F5F5_0000_0001))
    machine.write_memory(0x36_0008, struct.pack("<Q", 0x6565_6565_0000_0002))
    recording_handlers(machine)
    result = machine.run(timeout=30)
    assert result.stop.reason is StopReason.HLT, result.stop
    got = {name: qword(machine, DATA + RESULTS + 8 * i) for i, (name, _) in enumerate(MSR_READS)}
    assert got == {"fs_base": 0x35_0000, "gs_base": 0x36_0000,
                   **{name: VMLOAD_STATE[name] for name, _ in MSR_READS[2:]}}
    selectors = [qword(machine, DATA + RESULTS + 8 * (n + i)) & 0xFFFF for i in range(4)]
    assert selectors == [0x10, 0x23, 0x40, 0x50]                         # FS, GS, TR, LDTR
    assert qword(machine, DATA + RESULTS + 8 * (n + 4)) == 0xF5F5_F5F5_0000_0001    # through FS.base
    assert qword(machine, DATA + RESULTS + 8 * (n + 5)) == 0x6565_6565_0000_0002    # through GS.base
    regs = result.regs
    assert regs["tr"] == {"selector": 0x40, "base": 0x37_0000, "limit": 0x67, "attributes": 0x8B}
    assert regs["ldtr"] == {"selector": 0x50, "base": 0x37_1000, "limit": 0xFF, "attributes": 0x82}
    saved = read_vmcb(machine, VMCB2)["save"]
    for name, value in VMLOAD_STATE.items():
        if isinstance(value, tuple):
            record = saved[name]
            assert (int(record["selector"]), int(record["attrib"]), int(record["limit"]), int(record["base"])) == value, name
        elif name == "lstar":
            assert int(saved[name]) == NEW_LSTAR                         # the value at VMSAVE time
        else:
            assert int(saved[name]) == value, name
    assert int(saved["rip"]) == 0xDEAD_BEEF
    assert int(read_vmcb(machine, VMCB2)["control"]["guest_asid"]) == 0x55


NONCANONICAL = 0xAAAA_0000_0000_0000           # kvm-unit-tests' mask above bit 47


@pytest.mark.parametrize("field", ["fs", "gs", "tr", "ldtr", "kernel_gs_base"])
def test_vmload_loads_a_noncanonical_base_canonical(field):
    """kvm-unit-tests' test_canonicalization: VMLOAD then VMSAVE of a non-canonical base gives
    it back sign-extended from bit 47."""
    machine = plain_l1(f"{SET_SVME}\nmov rax, {VMCB:#x}\n{VMLOAD}\nmov rax, {VMCB2:#x}\n{VMSAVE}\nhlt")
    buffer, v = new_vmcb()
    low = 0x0000_8000_0103_C000
    if field == "kernel_gs_base":
        v["save"][field] = NONCANONICAL | low
    else:
        v["save"][field]["base"] = NONCANONICAL | low
    machine.write_memory(VMCB, bytes(buffer))
    machine.write_memory(VMCB2, bytes(new_vmcb()[0]))
    assert machine.run(timeout=30).stop.reason is StopReason.HLT
    saved = read_vmcb(machine, VMCB2)["save"]
    got = int(saved[field]) if field == "kernel_gs_base" else int(saved[field]["base"])
    assert got == 0xFFFF_8000_0103_C000


@pytest.mark.parametrize("segment", ["es", "cs", "ss", "ds"])
def test_vmrun_of_a_noncanonical_segment_base_enters_the_guest(segment):
    """Same test's VMRUN half: a 64-bit L2 whose ES/CS/SS/DS base is not canonical runs (the
    base is loaded canonical; in 64-bit mode the CPU ignores it)."""
    hv = GuestHypervisor("mov eax, 0x77; hlt")
    hv.save[segment]["base"] = NONCANONICAL
    assert hv.run().stop.reason is StopReason.HLT
    assert [e.exitcode for e in hv.exits()] == [HLT] and hv.exits()[0].rax == 0x77


# -- EVENTINJ ----------------------------------------------------------------------------------------

HANDLER_WITH_ERROR = f"""
    mov rdi, {L2_DATA:#x}
    mov rax, [rdi]
    mov [rdi + 8], rax
    pop rax
    mov [rdi + 0x10], rax
    mov rax, [rsp]
    mov [rdi + 0x18], rax
    mov rax, [rsp + 8]
    mov [rdi + 0x20], rax
    mov rax, [rsp + 16]
    mov [rdi + 0x28], rax
    mov [rdi + 0x30], rsp
    hlt"""
HANDLER_WITHOUT_ERROR = HANDLER_WITH_ERROR.replace("pop rax", "mov rax, -1")


@pytest.mark.parametrize("vector,kind,error_code,intercept_gp", [
    (13, EXCEPTION, 0x1234, False),             # #GP with an error code
    (13, EXCEPTION, 0x1234, True),              # ... not subject to L1's #GP intercept (APM §15.20)
    (0x41, 0, None, False),                     # an external interrupt: no error code
])
def test_eventinj_is_delivered_through_l2s_idt_before_its_first_instruction(vector, kind, error_code, intercept_gp):
    hv = GuestHypervisor(f"mov rdi, {L2_DATA:#x}\nmov qword ptr [rdi], 1\nhlt",
                         intercepts=(HLT, 0x040 + 13) if intercept_gp else (HLT,))
    handler = L2_HANDLERS
    source = HANDLER_WITH_ERROR if error_code is not None else HANDLER_WITHOUT_ERROR
    code = asm(source, 64, handler)
    hv.l2 = hv.l2.ljust(handler - L2_CODE, b"\xcc") + code
    hv.idt[16 * vector:16 * vector + 16] = gate64(handler)
    hv.control["eventinj"] = event(vector, kind, error_code)
    hv.save["rflags"] = 0x202
    result = hv.run()
    assert result.stop.reason is StopReason.HLT, result.stop
    exits = hv.exits()
    assert [e.exitcode for e in exits] == [HLT]
    assert exits[0].rip == handler + len(code) - 1 and exits[0].exitintinfo == 0
    m = hv.machine
    assert qword(m, L2_DATA + 8) == 0                                     # handler ran first
    pushed = L2_STACK - (48 if error_code is not None else 40)
    if error_code is not None:
        assert qword(m, L2_DATA + 0x10) == error_code
    assert qword(m, L2_DATA + 0x18) == L2_CODE                            # return RIP: L2's first instruction
    assert qword(m, L2_DATA + 0x20) == 0x28 and qword(m, L2_DATA + 0x28) == 0x202
    assert qword(m, L2_DATA + 0x30) == pushed + (8 if error_code is not None else 0)
    assert exits[0].rflags & 0x200 == 0                                   # interrupt gate cleared IF


def test_a_permission_map_where_no_ram_is_intercepts_every_access():
    # An MSRPM inside MAXPHYADDR but where nothing is: VMRUN goes on (it used to end the run
    # with a memory stop), and the map reads all-ones, as KVM exits when it cannot read it.
    hv = GuestHypervisor("mov ecx, 0x10\nrdmsr\nhlt", intercepts=(HLT, 0x07C))
    hv.control["msrpm_base_pa"] = 0x80_0000_0000
    result = hv.run()
    assert result.stop.reason is StopReason.HLT, result.stop
    exits = hv.exits()
    assert [e.exitcode for e in exits][:1] == [0x07C] and exits[0].exitinfo1 == 0


@pytest.mark.parametrize("profile, left", [("kvm", 0), ("apm", 0), ("qemu", 0x1234 << 32)])
def test_the_exit_after_an_injection_clears_eventinj(profile, left):
    # The injection is over once L2 runs: #VMEXIT clears EVENTINJ (kvm-unit-tests' exc_inject
    # checks V), its error code too on KVM, not on QEMU.
    hv = GuestHypervisor("hlt", intercepts=(HLT,), profile=profile)
    hv.l2 = hv.l2.ljust(L2_HANDLERS - L2_CODE, b"\xcc") + asm("add rsp, 8\niretq", 64, L2_HANDLERS)
    hv.idt[16 * 13:16 * 13 + 16] = gate64(L2_HANDLERS)
    hv.control["eventinj"] = event(13, EXCEPTION, 0x1234)
    result = hv.run()
    assert result.stop.reason is StopReason.HLT and [e.exitcode for e in hv.exits()] == [HLT]
    assert qword(hv.machine, VMCB + 0x0A8) == left


# -- exception intercepts in L2 ------------------------------------------------------------------

def test_exception_during_delivery_exits_with_exitintinfo():
    """§B.2: #UD whose delivery raises #GP (vector beyond the IDT limit), #GP intercepted →
    #VMEXIT(#GP) with EXITINFO1 = the #GP error code and EXITINTINFO = the #UD."""
    l2 = ["nop", "ud2", "hlt"]
    at = addresses(l2)
    hv = GuestHypervisor("\n".join(l2), intercepts=(HLT, 0x040 + 13))
    hv.save["idtr"]["limit"] = 0xF                                        # only vector 0 is inside
    result = hv.run()
    assert result.stop.reason is StopReason.HLT
    exits = hv.exits()
    assert [e.exitcode for e in exits] == [0x040 + 13]
    e = exits[0]
    assert e.exitinfo1 & ~1 == 6 << 3 | 2                                 # IDT bit, vector 6 (EXT aside)
    assert e.exitintinfo == event(6, EXCEPTION)                           # #UD, no error code
    assert e.rip == at[1]


def test_intercepted_exception_exits_without_delivery():
    l2 = ["mov eax, 1", "xor ecx, ecx", "div ecx", "hlt"]
    at = addresses(l2)
    hv = GuestHypervisor("\n".join(l2), intercepts=(HLT, 0x040 + 0))
    result = hv.run()
    assert result.stop.reason is StopReason.HLT
    e = hv.exits()[0]
    assert (e.exitcode, e.rip, e.exitintinfo) == (0x040, at[2], 0)
    assert e.rsp == L2_STACK                                              # nothing was pushed


@pytest.mark.parametrize("intercepted", [True, False])
def test_l2_triple_fault_is_a_shutdown_exit_when_intercepted(intercepted):
    l2 = ["nop", "ud2", "hlt"]
    hv = GuestHypervisor("\n".join(l2), intercepts=(HLT, SHUTDOWN) if intercepted else (HLT,),
                         done=f"mov qword ptr [rbx + {RESULTS:#x}], 0x5d")
    hv.save["idtr"]["limit"] = 0                                          # every delivery faults
    result = hv.run()
    if intercepted:
        assert result.stop.reason is StopReason.HLT, result.stop
        exits = hv.exits()
        assert [e.exitcode for e in exits] == [SHUTDOWN]
        assert exits[0].host_rax == VMCB and hv.result(0) == 0x5D          # L1 resumed
        assert result.regs["cpl"] == 0 and result.regs["cs"]["selector"] == 0x28
    else:
        assert result.stop.reason is StopReason.SHUTDOWN                  # the whole machine
        assert hv.exits() == []


# -- GIF, interrupts, NMI, SMI, INIT -----------------------------------------------------------------

def test_a_hypervisors_entry_path_runs_inside_the_hooks():
    # CLGI; VMLOAD; VMSAVE; STGI, 500 times: executed in Unicorn's #UD hook, not one slice
    # each (issue 14, divergence 9), with the same effects: FS.base loaded, GIF set again.
    machine = plain_l1(f"""{SET_SVME}
        mov rax, {VMCB:#x}
        mov qword ptr [rax + 0x448], 0x1234000
        mov ecx, 500
    again:
        {CLGI}
        {VMLOAD}
        {VMSAVE}
        {STGI}
        dec ecx
        jnz again
        hlt""")
    result = machine.run(timeout=60)
    assert result.stop.reason is StopReason.HLT and machine.gif is True
    assert machine.cpu.segment("fs").base == 0x1234000          # the save area's FS.base (+0x048)
    assert result.stats["slices"] < 20


def gif_smi_program(clgi: bool):
    lines = [SET_SVME.strip(), CLGI if clgi else "nop", "mov rbx, 1", "mov rcx, 2", STGI, "mov rdx, 3", "hlt"]
    return lines


@pytest.mark.parametrize("clgi", [True, False])
def test_smi_raised_while_gif_is_clear_is_held_until_stgi(clgi):
    lines = gif_smi_program(clgi)
    at = addresses(lines, 64, L1_CODE)
    machine = with_smram(plain_l1("\n".join(lines)))
    mov_rbx, stgi, after_stgi = at[2], at[4], at[5]
    machine.break_at(mov_rbx)
    if clgi:
        machine.break_at(stgi)
    result = machine.run(timeout=30)
    assert result.stop.reason is StopReason.BREAKPOINT and result.regs["rip"] == mov_rbx
    if clgi:
        assert machine.gif is False
    machine.raise_smi()
    result = machine.run(timeout=30)
    assert result.stop.reason is StopReason.BREAKPOINT
    if clgi:                    # held: the code up to STGI ran outside SMM
        assert result.regs["rip"] == stgi and result.smm["smm"] is False and result.smm["pending"] is True
        assert (result.regs["rbx"], result.regs["rcx"]) == (1, 2)
        result = machine.run(timeout=30)
        assert result.stop.reason is StopReason.BREAKPOINT and at_smm_entry(result)
        assert smram_field(machine, "rip") == after_stgi                   # taken right after STGI
        assert (smram_field(machine, "rbx"), smram_field(machine, "rcx"), smram_field(machine, "rdx")) == (1, 2, 0)
    else:                       # GIF = 1: taken at once
        assert at_smm_entry(result) and smram_field(machine, "rip") == mov_rbx
    assert result.smm["smm"] is True and smram_field(machine, "svm_guest") == 0
    result = machine.run(timeout=30)
    if not clgi:                # RSM returns to the breakpoint's instruction: it stops there again
        assert result.stop.reason is StopReason.BREAKPOINT and result.regs["rip"] == mov_rbx
        result = machine.run(timeout=30)
    assert result.stop.reason is StopReason.HLT and result.regs["rdx"] == 3
    assert [e["kind"] for e in result.events if isinstance(e, dict) and e.get("kind") in ("smi", "rsm")] == ["smi", "rsm"]
    assert machine.gif is True


def l2_with_breakpoint():
    l2 = ["mov rbx, 0x1234", "nop", "mov rcx, 7", "nop", "hlt"]
    return l2, addresses(l2)


def test_smi_in_l2_without_the_smi_intercept_enters_smm_from_the_guest_and_rsm_returns_to_it():
    l2, at = l2_with_breakpoint()
    hv = GuestHypervisor("\n".join(l2))
    hv.save["rax"] = 0x5555
    machine = with_smram(hv.build())
    machine.break_at(at[2])
    result = hv.run()
    assert result.stop.reason is StopReason.BREAKPOINT and result.regs["rip"] == at[2]
    machine.raise_smi()
    result = hv.run()
    assert result.stop.reason is StopReason.BREAKPOINT and at_smm_entry(result)
    # The state-save map holds L2's state, with the SVM fields (§C.3, §C.7, §F.19)
    assert smram_field(machine, "svm_guest") == 1
    assert smram_field(machine, "svm_guest_vmcb") == VMCB
    assert smram_field(machine, "rip") == at[2] and smram_field(machine, "rbx") == 0x1234
    assert smram_field(machine, "rax") == 0x5555                          # L2's RAX, not L1's
    assert smram_field(machine, "efer") & 0x1500 == 0x1500
    result = hv.run()
    # RSM returns to the breakpoint's instruction in L2, so the run stops there once more
    assert result.stop.reason is StopReason.BREAKPOINT and result.regs["rip"] == at[2], result.stop
    assert result.regs["cs"]["selector"] == 0x28 and result.regs["rax"] == 0x5555
    result = hv.run()
    # RSM went back into L2, still under L1's intercepts: L2 ran on to its HLT, which exited
    assert result.stop.reason is StopReason.HLT, result.stop
    exits = hv.exits()
    assert [(e.exitcode, e.rip) for e in exits] == [(HLT, at[4])]
    assert hv.l2_registers()["rcx"] == 7 and exits[0].rax == 0x5555


@pytest.mark.parametrize("profile,info1", [("kvm", 0), ("apm", 1)])
def test_smi_in_l2_with_the_smi_intercept_exits_and_is_taken_in_l1_after_stgi(profile, info1):
    """§B.3, §E.2 #59: #VMEXIT(SMI) with the SMI still pending, taken in L1 once GIF=1.
    EXITINFO1 bit 0 (SMISRC, external SMI) is set by hardware (APM Fig. 15-3), 0 in KVM's
    synthesized exit (§F.8)."""
    l2, at = l2_with_breakpoint()
    after_stgi = f"""
        {STGI}
        nop
        mov qword ptr [rbx + {RESULTS:#x}], 1
        jmp l1_done"""
    hv = GuestHypervisor("\n".join(l2), intercepts=(HLT, SMI), handlers={SMI: after_stgi}, profile=profile)
    machine = with_smram(hv.build())
    machine.break_at(at[2])
    assert hv.run().stop.reason is StopReason.BREAKPOINT
    machine.raise_smi()
    result = hv.run()
    assert result.stop.reason is StopReason.BREAKPOINT and at_smm_entry(result)
    exits = hv.exits()
    assert [(e.exitcode, e.rip, e.exitinfo1, e.exitinfo2) for e in exits] == [(SMI, at[2], info1, 0)]
    assert smram_field(machine, "svm_guest") == 0                          # taken in L1
    saved_rip = smram_field(machine, "rip")
    assert L1_CODE < saved_rip < L1_CODE + len(hv.l1)
    assert machine.read_memory(saved_rip - 3, 4) == bytes.fromhex("0f01dc90")   # right after STGI
    assert hv.run().stop.reason is StopReason.HLT and hv.result(0) == 1


def nmi_handler(machine):
    l1_gate(machine, 2, f"""
        push rax
        push rbx
        mov rbx, {DATA + RESULTS:#x}
        inc qword ptr [rbx + 0x80]
        pop rbx
        pop rax
        iretq""")


COUNT_AROUND_STGI = f"""
    mov rax, [rbx + {RESULTS + 0x80:#x}]
    mov [rbx + {RESULTS + 0x88:#x}], rax
    {STGI}
    nop
    nop
    mov rax, [rbx + {RESULTS + 0x80:#x}]
    mov [rbx + {RESULTS + 0x90:#x}], rax
    jmp l1_done"""


def test_nmi_in_l2_with_the_nmi_intercept_exits_and_is_taken_in_l1_after_stgi():
    l2, at = l2_with_breakpoint()
    hv = GuestHypervisor("\n".join(l2), intercepts=(HLT, NMI), handlers={NMI: COUNT_AROUND_STGI})
    machine = hv.build()
    nmi_handler(machine)
    machine.break_at(at[2])
    assert hv.run().stop.reason is StopReason.BREAKPOINT
    machine.raise_nmi()
    result = hv.run()
    assert result.stop.reason is StopReason.HLT, result.stop
    assert [(e.exitcode, e.rip) for e in hv.exits()] == [(NMI, at[2])]
    assert (hv.result(0x88), hv.result(0x90)) == (0, 1)                    # pending until STGI


def test_init_in_l2_with_the_init_intercept_exits_and_stays_pending_while_gif_is_clear():
    l2, at = l2_with_breakpoint()
    hv = GuestHypervisor("\n".join(l2), intercepts=(HLT, INIT),
                         done=f"mov qword ptr [rbx + {RESULTS:#x}], 0x1d")
    machine = hv.build()
    machine.break_at(at[2])
    assert hv.run().stop.reason is StopReason.BREAKPOINT
    machine.raise_init()
    result = hv.run()
    assert result.stop.reason is StopReason.HLT, result.stop
    assert [(e.exitcode, e.rip) for e in hv.exits()] == [(INIT, at[2])]
    assert hv.result(0) == 0x1D and result.regs["cs"]["selector"] == 0x28     # L1, not reset


def intr_handler(machine, vector):
    l1_gate(machine, vector, f"""
        push rax
        push rbx
        mov rbx, {DATA + RESULTS:#x}
        inc qword ptr [rbx + 0x80]
        mov rax, [rsp + 16]
        mov [rbx + 0x98], rax
        pop rbx
        pop rax
        iretq""")


def test_intr_in_l2_with_the_intr_intercept_exits_stays_pending_and_is_taken_in_l1_after_stgi():
    l2, at = l2_with_breakpoint()
    hv = GuestHypervisor("\n".join(l2), intercepts=(HLT, INTR), handlers={INTR: COUNT_AROUND_STGI},
                         host_rflags=0x202)
    hv.save["rflags"] = 0x202
    hv.control["int_ctl"] = V_INTR_MASKING
    machine = hv.build()
    intr_handler(machine, 0x30)
    machine.break_at(at[2])
    assert hv.run().stop.reason is StopReason.BREAKPOINT
    machine.raise_intr(0x30)
    result = hv.run()
    assert result.stop.reason is StopReason.HLT, result.stop
    exits = hv.exits()
    assert [(e.exitcode, e.rip, e.exitinfo1, e.exitinfo2) for e in exits] == [(INTR, at[2], 0, 0)]
    assert exits[0].host_rflags & 0x200                                   # L1's IF is back on...
    assert (hv.result(0x88), hv.result(0x90)) == (0, 1)                   # ...but GIF=0 held it
    delivered = [e for e in result.events if isinstance(e, dict) and e.get("kind") == "external"]
    assert [e["vector"] for e in delivered] == [0x30]
    assert L1_CODE < hv.result(0x98) < L1_CODE + len(hv.l1)               # taken in L1


def test_raise_intr_is_held_while_if_is_clear():
    lines = ["cli", "nop", "nop", "mov rax, [rbx + 0x80]", "mov [rbx + 0x88], rax", "sti", "nop", "nop",
             "mov rax, [rbx + 0x80]", "mov [rbx + 0x90], rax", "hlt", "hlt"]
    machine = plain_l1(f"mov rbx, {DATA + RESULTS:#x}\n" + "\n".join(lines))
    at = addresses([f"mov rbx, {DATA + RESULTS:#x}"] + lines, 64, L1_CODE)
    intr_handler(machine, 0x31)
    machine.break_at(at[2])
    assert machine.run(timeout=30).stop.reason is StopReason.BREAKPOINT
    machine.raise_intr(0x31)
    result = machine.run(timeout=30)
    assert result.stop.reason is StopReason.HLT
    assert (qword(machine, DATA + RESULTS + 0x88), qword(machine, DATA + RESULTS + 0x90)) == (0, 1)
    assert at[7] <= qword(machine, DATA + RESULTS + 0x98) <= at[8]        # after STI (and its shadow)


def test_cli_irq_at_delivers_through_the_idt(tmp_path):
    handler = L1_CODE + 0x100
    source = f"""
        mov rax, {handler:#x}
        mov rdi, {IDT + 16 * 0x40:#x}
        mov word ptr [rdi], ax
        mov word ptr [rdi + 2], 0x28
        mov word ptr [rdi + 4], 0x8e00
        shr rax, 16
        mov word ptr [rdi + 6], ax
        mov dword ptr [rdi + 8], 0
        mov dword ptr [rdi + 12], 0
        sti
    spin:
        inc rbx
        jmp spin"""
    code = asm(source, 64, L1_CODE).ljust(0x100, b"\x90") + asm("mov al, 0x21\nout 0xf4, al", 64, handler)
    image = tmp_path / "irq.bin"
    image.write_bytes(code)
    status = main(["run", str(image), "--boot", "long", "--irq-at", "40:0x40", "--max-insns", "100000", "--json"])
    assert status == (2 * 0x21 + 1) % 256                                 # the handler's exit port


def virtual_interrupt_guest(l2: list[str], rflags: int, intercepts=(HLT,)):
    """An L2 running ``l2`` with V_IRQ pending (vector 0x50, priority 15, V_TPR 0) under
    V_INTR_MASKING, and a handler at L2_HANDLERS that records its frame and halts: (the
    hypervisor, the handler's address, its code)."""
    hv = GuestHypervisor("\n".join(l2), intercepts=intercepts)
    handler = L2_HANDLERS
    code = asm(HANDLER_WITHOUT_ERROR, 64, handler)
    hv.l2 = hv.l2.ljust(handler - L2_CODE, b"\xcc") + code
    hv.idt[16 * 0x50:16 * 0x51] = gate64(handler)
    hv.control["int_ctl"] = V_IRQ | V_INTR_MASKING | 0xF << 16
    hv.control["v_intr_vector"] = 0x50
    hv.save["rflags"] = rflags
    return hv, handler, code


@pytest.mark.parametrize("vintr_intercepted,l2_if", [(True, True), (False, True), (False, False)])
def test_virtual_interrupt(vintr_intercepted, l2_if):
    """V_IRQ with V_INTR_MASKING: VINTR intercept → #VMEXIT(0x064) before the guest takes it,
    V_IRQ still set; no intercept → taken through L2's IDT at V_INTR_VECTOR, V_IRQ cleared;
    L2's IF = 0 → not taken."""
    l2 = ["nop", "hlt"]
    at = addresses(l2)
    hv, handler, code = virtual_interrupt_guest(l2, 0x202 if l2_if else 0x2,
                                                (HLT, VINTR) if vintr_intercepted else (HLT,))
    result = hv.run()
    assert result.stop.reason is StopReason.HLT, result.stop
    exits = hv.exits()
    if vintr_intercepted:
        assert [(e.exitcode, e.rip) for e in exits] == [(VINTR, L2_CODE)]
        assert exits[0].int_ctl & V_IRQ
    elif l2_if:
        assert [(e.exitcode, e.rip) for e in exits] == [(HLT, handler + len(code) - 1)]
        assert qword(hv.machine, L2_DATA + 0x18) == L2_CODE               # taken before the first insn
        assert exits[0].int_ctl & V_IRQ == 0
    else:
        assert [(e.exitcode, e.rip) for e in exits] == [(HLT, at[1])]
        assert qword(hv.machine, L2_DATA + 0x18) == 0
        assert exits[0].int_ctl & V_IRQ


def test_a_single_stepped_vmrun_traps_after_the_vmexit():
    """kvm-unit-tests' host_rflags: with the host's TF set at VMRUN, the #DB trap comes after
    the #VMEXIT, at the instruction after VMRUN (DR6.BS), not one instruction later; L1's
    RF is clear after it."""
    hv = GuestHypervisor("mov eax, 1\nhlt", host_rflags=0x102)
    machine = hv.build()
    after_vmrun = L1_CODE + hv.l1.index(bytes.fromhex("0f01d8")) + 3
    log = DATA + RESULTS
    handler = f"""
        push rax
        push rbx
        mov rbx, {log:#x}
        mov rax, [rbx + 0x80]
        inc qword ptr [rbx + 0x80]
        push rcx
        mov rcx, [rsp + 24]
        mov [rbx + rax * 8], rcx
        mov rax, {after_vmrun:#x}
        cmp rcx, rax
        jne db_done
        and qword ptr [rsp + 40], -0x101
        mov rax, dr6
        mov [rbx + 0x88], rax
    db_done:
        pop rcx
        pop rbx
        pop rax
        iretq"""
    l1_gate(machine, 1, handler)
    assert hv.run().stop.reason is StopReason.HLT
    count = qword(machine, log + 0x80)
    rips = [qword(machine, log + 8 * i) for i in range(count)]
    assert rips[-1] == after_vmrun and rips[-2] == after_vmrun - 3      # VMRUN, then right after it
    assert qword(machine, log + 0x88) & 1 << 14                              # DR6.BS
    assert [e.exitcode for e in hv.exits()] == [HLT]
    # a VMRUN that fails its checks completes at once: the trap follows it
    hv = GuestHypervisor("hlt", host_rflags=0x102)
    hv.control["guest_asid"] = 0
    machine = hv.build()
    l1_gate(machine, 1, handler)
    assert hv.run().stop.reason is StopReason.HLT
    assert [e.exitcode for e in hv.exits()] == [VMEXIT_INVALID]
    assert qword(machine, log + 8 * (qword(machine, log + 0x80) - 1)) == after_vmrun


def test_a_virtual_interrupt_is_taken_once_l2_sets_if():
    """kvm-unit-tests' virq_inject alone: an L2 that starts with IF = 0 and runs STI; NOP;
    CLI takes the pending V_IRQ after the NOP (the STI shadow).  STI was not a site unless a
    physical interrupt had been raised before, so the virtual one was never looked at."""
    l2 = ["mov eax, 1", "sti", "nop", "cli", "hlt"]
    at = addresses(l2)
    hv, _, _ = virtual_interrupt_guest(l2, 0x2)
    assert hv.run().stop.reason is StopReason.HLT
    assert qword(hv.machine, L2_DATA + 0x18) == at[3]                     # after STI's shadow, before CLI
    assert [e.exitcode for e in hv.exits()] == [HLT] and hv.exits()[0].int_ctl & V_IRQ == 0


@pytest.mark.parametrize("v_intr_masking,l2_if,host_if,exits_at_once", [
    (True, False, True, True),      # V_INTR_MASKING: the host's IF masks physical interrupts, not L2's
    (False, False, True, False),    # without it L2's IF=0 holds the interrupt
    (True, True, False, False),     # the host's IF=0 (saved at VMRUN) holds it, whatever L2's IF
])
def test_intr_masking_in_l2(v_intr_masking, l2_if, host_if, exits_at_once):
    """APM §15.21.1: with V_INTR_MASKING=1 physical interrupts are masked by the host's
    RFLAGS.IF, with 0 by the guest's; a masked interrupt stays pending (L2 runs on to its HLT)."""
    l2, at = l2_with_breakpoint()
    hv = GuestHypervisor("\n".join(l2), intercepts=(HLT, INTR),
                         handlers={INTR: COUNT_AROUND_STGI, HLT: COUNT_AROUND_STGI},
                         host_rflags=0x202 if host_if else 0x2)
    hv.save["rflags"] = 0x202 if l2_if else 0x2
    hv.control["int_ctl"] = V_INTR_MASKING if v_intr_masking else 0
    machine = hv.build()
    intr_handler(machine, 0x30)
    machine.break_at(at[2])
    assert hv.run().stop.reason is StopReason.BREAKPOINT
    machine.raise_intr(0x30)
    result = hv.run()
    assert result.stop.reason is StopReason.HLT, result.stop
    exits = [(e.exitcode, e.rip) for e in hv.exits()]
    if exits_at_once:
        assert exits == [(INTR, at[2])]
    else:
        assert exits == [(HLT, at[4])]                                    # L2 ran on with it pending
        assert hv.l2_registers()["rcx"] == 7
    # In L1 after STGI it is taken if L1's IF (restored from the host save) is set
    assert (hv.result(0x88), hv.result(0x90)) == (0, 1 if host_if else 0)


# -- L2's own world: IDT, CR2, interrupt shadow ------------------------------------------------------

def test_l2_handles_its_own_exceptions_through_its_idt():
    """An exception L1 does not intercept is delivered in L2 through L2's IDTR (VMCB), and
    L2's IRET returns inside L2."""
    l2 = ["int3", "mov rcx, 0x33", "hlt"]
    at = addresses(l2)
    hv = GuestHypervisor("\n".join(l2))
    handler = L2_HANDLERS
    code = asm(f"mov rdi, {L2_DATA:#x}\nmov rax, [rsp]\nmov [rdi], rax\ninc qword ptr [rdi + 8]\niretq", 64, handler)
    hv.l2 = hv.l2.ljust(handler - L2_CODE, b"\xcc") + code
    hv.idt[16 * 3:16 * 4] = gate64(handler, trap=True)
    result = hv.run()
    assert result.stop.reason is StopReason.HLT
    assert [(e.exitcode, e.rip) for e in hv.exits()] == [(HLT, at[2])]
    assert (qword(hv.machine, L2_DATA), qword(hv.machine, L2_DATA + 8)) == (at[1], 1)   # INT3: trap RIP
    assert hv.l2_registers()["rcx"] == 0x33


def test_vmrun_loads_cr2_and_vmexit_saves_it():
    l2 = [f"mov rdi, {L2_DATA:#x}", "mov rax, cr2", "mov [rdi], rax", "mov rax, 0x7000000", "mov cr2, rax", "hlt"]
    hv = GuestHypervisor("\n".join(l2))
    hv.save["cr2"] = 0x1234_5000
    result = hv.run()
    assert result.stop.reason is StopReason.HLT
    assert qword(hv.machine, L2_DATA) == 0x1234_5000
    assert int(hv.read_vmcb()["save"]["cr2"]) == 0x700_0000


def test_vmrun_loads_the_interrupt_shadow():
    """With the VMCB's interrupt shadow set, a pending virtual interrupt is taken only after
    L2's first instruction (APM §15.21.5)."""
    l2 = ["nop", "nop", "hlt"]
    at = addresses(l2)
    hv, _, _ = virtual_interrupt_guest(l2, 0x202)
    hv.control["interrupt_state"] = 1
    result = hv.run()
    assert result.stop.reason is StopReason.HLT
    assert qword(hv.machine, L2_DATA + 0x18) == at[1]                     # after the first NOP


def test_vmexit_records_the_interrupt_shadow_of_an_intercepted_instruction_after_sti():
    """An exit on the instruction right after STI finds the STI shadow active: VMCB
    interrupt_state bit 0 (APM Table B-1, offset 0x68)."""
    l2 = ["cli", "cpuid", "sti", "cpuid", "hlt"]
    at = addresses(l2)
    shadow = f"""
        mov rax, [rbx + 0x68]
        mov rcx, [rbx + {RESULTS + 0x100:#x}]
        mov [rbx + rcx * 8 + {RESULTS + 0x108:#x}], rax
        inc qword ptr [rbx + {RESULTS + 0x100:#x}]
        jmp advance"""
    hv = GuestHypervisor("\n".join(l2), intercepts=(HLT, CPUID), handlers={CPUID: shadow})
    result = hv.run()
    assert result.stop.reason is StopReason.HLT
    assert [(e.exitcode, e.rip) for e in hv.exits()] == [(CPUID, at[1]), (CPUID, at[3]), (HLT, at[4])]
    assert hv.result(0x100) == 2
    assert (hv.result(0x108) & 1, hv.result(0x110) & 1) == (0, 1)


@pytest.mark.parametrize("model,virtual", [("max", True), ("qemu64", False)])
def test_stgi_and_clgi_in_l2_with_vgif(model, virtual):
    """APM §15.33 (kvm-unit-tests' vgif): on a model with VGIF and V_GIF_ENABLE set, L2's CLGI
    and STGI clear and set int_ctl.V_GIF, not GIF, and V_GIF = 0 holds a virtual interrupt;
    without VGIF (qemu64) they are GIF's."""
    hv, _, _ = virtual_interrupt_guest([CLGI, "sti", "nop", "nop", "hlt"], 0x2)
    hv.machine_args["cpu_model"] = model
    hv.control["int_ctl"] |= V_GIF_ENABLE | V_GIF
    assert hv.run().stop.reason is StopReason.HLT
    exits = hv.exits()
    assert [e.exitcode for e in exits] == [HLT]
    if virtual:
        assert exits[0].int_ctl & (V_GIF | V_IRQ) == V_IRQ                # V_GIF cleared, V_IRQ held
    else:
        assert exits[0].int_ctl & V_GIF                                  # untouched: CLGI cleared GIF
