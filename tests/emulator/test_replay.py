"""Replay bit for bit (issue 11): ``snapshot()`` then ``restore()`` repeats a run exactly —
results, events, counters, memory — and a budget cut into several ``run()`` calls ends where
the budget in one call ends."""
import hashlib
import struct
import subprocess
import sys

import pytest

from ringminus import Machine, StopReason
from ringminus.emulator.boot import IDT_BASE, SEL_CODE64
from ringminus.arch.segments import SYS_INT_GATE, pack_gate
from ringminus.fuzz import load
from ringminus.intercepts import InterceptControls
from ringminus.arch.exitcodes import ExitCode

from ..helpers import add_smram, asm

ENTRY = 0x7C00
IVT_HANDLER = 0x600


def outcome(machine, result) -> dict:
    """Everything a replay must repeat: the result, hidden CPU state, memory."""
    return {**result.as_dict(), "halted": machine.halted, "nmi_blocked": machine.cpu.nmi_blocked,
            "tsc": machine.tsc.value, "ram": hashlib.sha1(machine.memory.ram.data).hexdigest(),
            "smram": [hashlib.sha1(r.data.data).hexdigest() for r in machine.smram.ranges]}


def issue_machine() -> Machine:
    """The issue's case: every IVT vector at ``add sp, 4; iret``, code ``ff03 0fa2 07 f4``,
    an NMI at instruction 109 and an SMI at 273, qemu32 under the qemu profile."""
    machine = Machine(cpu_model="qemu32", profile="qemu")
    machine.write_memory(0, struct.pack("<HH", IVT_HANDLER, 0) * 256)
    machine.write_memory(IVT_HANDLER, bytes.fromhex("83c404cf"))
    machine.write_memory(ENTRY, bytes.fromhex("ff030fa207f4"))
    machine.boot("real", ENTRY)
    machine.at_instruction(109, Machine.raise_nmi)
    machine.at_instruction(273, Machine.raise_smi)
    return machine


def test_the_issue_case_replays_from_the_start_and_from_every_point():
    fresh = issue_machine()
    reference = outcome(fresh, fresh.run(max_instructions=600))
    smi = next(e for e in reference["events"] if e["kind"] == "smi")
    assert smi["instructions"] == 273
    for prefix in (0, 1, 108, 109, 110, 272, 273, 274, 400):
        machine = issue_machine()
        if prefix:
            machine.run(max_instructions=prefix)
        snap = machine.snapshot()
        first = outcome(machine, machine.run(max_instructions=600 - prefix))
        machine.restore(snap)
        second = outcome(machine, machine.run(max_instructions=600 - prefix))
        assert second == first, prefix
        assert first["events"] == reference["events"] and first["regs"] == reference["regs"], prefix


def test_the_issue_case_cut_into_pieces_ends_as_in_one_run():
    whole = issue_machine()
    reference = outcome(whole, whole.run(max_instructions=600))
    for pieces in ((109, 164, 327), (1,) * 20 + (580,), (272, 1, 1, 326), (50,) * 12):
        machine = issue_machine()
        for piece in pieces:
            result = machine.run(max_instructions=piece)
            assert result.stop.reason is StopReason.LIMIT
        cut = outcome(machine, result)
        for work in ("slices", "code_sites"):    # more calls, more slices; blocks begin elsewhere
            del cut["stats"][work], reference["stats"][work]
        assert cut == reference, pieces
        reference = outcome(whole, whole.result())


def counting_guest() -> Machine:
    """Real mode: two port writes and an INT 3 per round of a loop."""
    machine = Machine(memory_size=2 << 20)
    machine.write_memory(0, struct.pack("<HH", IVT_HANDLER, 0) * 256)
    machine.write_memory(IVT_HANDLER, b"\xcf")                  # iret
    code = asm("inc bx; mov al, bl; out 0x80, al; out 0xe9, al; int3; cmp bx, 40; jne 0x7c00; hlt", 16, ENTRY)
    machine.write_memory(ENTRY, code)
    machine.boot("real", ENTRY)
    return machine


def test_counters_are_restored_not_added_to():
    machine = counting_guest()
    machine.run(max_instructions=50)
    snap = machine.snapshot()
    at_snapshot = machine.result().stats
    first = machine.run()
    assert first.stop.reason is StopReason.HLT
    assert first.stats["interrupts_delivered"] == 40 and first.stats["port_writes"] == 80
    machine.restore(snap)
    assert machine.result().stats == at_snapshot
    second = machine.run()
    assert second.as_dict() == first.as_dict()
    assert second.stats["unclaimed_ports"] == [0x80] and second.console == first.console


def test_restore_into_a_machine_that_never_ran():
    machine = issue_machine()
    machine.run(max_instructions=200)
    snap = machine.snapshot()
    first = outcome(machine, machine.run(max_instructions=300))
    other = issue_machine()
    other.restore(snap)
    assert outcome(other, other.run(max_instructions=300)) == first


def test_self_modifying_code_replays_with_events():
    # A loop that keeps rewriting a byte inside its own block (QEMU restarts the store):
    # whatever Unicorn counts there, the run after restore counts the same.
    code = asm("again: mov byte ptr [0x7c40], 0x90; inc cx; add byte ptr [0x7c41], 1; jmp again", 16, ENTRY)
    for prefix in (0, 3, 10, 57):
        machine = Machine(memory_size=2 << 20)
        machine.write_memory(0, struct.pack("<HH", IVT_HANDLER, 0) * 256)
        machine.write_memory(IVT_HANDLER, b"\xcf")
        machine.write_memory(ENTRY, code.ljust(0x50, b"\x90"))
        machine.boot("real", ENTRY)
        machine.at_instruction(77, lambda m: m.raise_intr(0x20))
        machine.at_instruction(150, Machine.raise_nmi)
        machine["rflags"] = 0x202
        if prefix:
            machine.run(max_instructions=prefix)
        snap = machine.snapshot()
        first = outcome(machine, machine.run(max_instructions=400))
        machine.restore(snap)
        assert outcome(machine, machine.run(max_instructions=400)) == first, prefix


def test_chipset_registers_are_part_of_the_snapshot():
    # The guest reads APM status (0xB3) and the PCI address latch, then changes both: after
    # restore it must read what it read the first time.
    code = asm("in al, 0xb3; mov bl, al; mov dx, 0xcf8; in eax, dx; mov esi, eax; "
               "mov al, 0x5a; out 0xb3, al; mov eax, 0x8000009c; out dx, eax; hlt", 16, ENTRY)
    machine = Machine(memory_size=2 << 20)
    machine.write_memory(ENTRY, code)
    machine.boot("real", ENTRY)
    snap = machine.snapshot()
    first = machine.run()
    machine.restore(snap)
    second = machine.run()
    assert (second.regs["rbx"] & 0xFF, second.regs["rsi"]) == (0, 0)
    assert second.as_dict() == first.as_dict()


def test_smram_views_and_swaps_replay():
    # SMIs from OUT 0xB2 into a handler in private SMRAM: each RSM hides the range again, and
    # the next SMI maps it; a snapshot between them must map (and count) the same way.
    machine = Machine(memory_size=2 << 20, apm_smi=True)
    add_smram(machine, asm("inc dword ptr cs:[0x7000]; rsm", 16, 0x8000))
    machine.write_memory(ENTRY, asm("again: out 0xb2, al; mov ax, [0x1234]; inc cx; jmp again", 16, ENTRY))
    machine.boot("real", ENTRY)
    machine.run(max_instructions=7)
    snap = machine.snapshot()
    first = machine.run(max_instructions=40)
    assert first.stats["smram_swaps"] > 0 and first.smm["entries"] >= 5
    machine.restore(snap)
    assert machine.run(max_instructions=40).as_dict() == first.as_dict()


def test_skip_after_restore_skips_the_exit_of_the_snapshot():
    machine = Machine(memory_size=2 << 20)
    machine.write_memory(ENTRY, asm("cpuid; inc bx; cpuid; inc cx; hlt", 16, ENTRY))
    machine.boot("real", ENTRY)
    controls = InterceptControls()
    controls.set(ExitCode.CPUID)
    machine.enter_guest(controls)
    assert machine.run().vmexit["rip"] == ENTRY
    snap = machine.snapshot()
    machine.skip_instruction()
    assert machine.run().vmexit["rip"] == ENTRY + 3          # the second CPUID
    machine.restore(snap)
    machine.skip_instruction()                               # the first one's, again
    assert machine["rip"] == ENTRY + 2 and machine.run().vmexit["rip"] == ENTRY + 3


def test_a_run_that_starts_at_a_breakpoint_stops_there():
    def fresh():
        machine = Machine(memory_size=2 << 20)
        machine.write_memory(ENTRY, asm("inc ax; inc bx; inc cx; inc dx; hlt", 16, ENTRY))
        machine.boot("real", ENTRY)
        machine.break_at(ENTRY + 2)
        return machine

    whole = fresh()
    stops = [whole.run(max_instructions=10).stop, whole.run(max_instructions=10).stop]
    assert [s.reason for s in stops] == [StopReason.BREAKPOINT, StopReason.HLT]
    cut = fresh()
    assert cut.run(max_instructions=2).stop.reason is StopReason.LIMIT     # limit right at it
    assert cut.run(max_instructions=8).stop == stops[0] and cut.instructions == 2
    snap = cut.snapshot()
    assert cut.run(max_instructions=8).stop == stops[1]                    # passes it now
    cut.restore(snap)
    assert cut.run(max_instructions=8).stop == stops[1]


@pytest.mark.parametrize("limit", [None, 1000])
def test_a_fault_frame_holds_the_flags_before_the_fault(limit):
    # add esi, [rsi+0x77] leaves ZF and PF (0 + 0); the load through RAX then faults (#PF).
    # Unicorn's code hooks (a limit counts through one) used to misreport these flags.
    machine = Machine(memory_size=4 << 20)
    machine.write_memory(0x100000, asm("xor esi, esi; add esi, [rsi + 0x77]; mov eax, [rax + 0x77]", 64, 0x100000))
    machine.boot("long", 0x100000)
    machine.write_memory(IDT_BASE + 14 * 16, pack_gate(0x180000, SEL_CODE64, SYS_INT_GATE, long_mode=True))
    machine.write_memory(0x180000, b"\xf4")
    machine["rax"] = 0xFFFF_0FF0
    result = machine.run(max_instructions=limit)
    assert result.stop.reason is StopReason.HLT and result.events[0]["vector"] == 14
    error_code, rip, cs, rflags = struct.unpack("<4Q", machine.read_memory(result.regs["rsp"], 32))
    assert rip == 0x100005 and rflags == 0x46


@pytest.mark.parametrize("between", ["", "cpuid;", "nop;"])
@pytest.mark.parametrize("pieces", [(None,), (1000,), (1, 1, 1000), (2, 1000)])
def test_an_invalid_opcode_frame_holds_the_flags_before_it(between, pieces):
    # add [rax], al from 0 + 0 leaves ZF and PF (0x46), then #UD (lock nop) through a handler
    # that halts: the frame holds 0x46 however the run is counted, cut or hooked (CPUID).
    machine = Machine(memory_size=4 << 20)
    machine.write_memory(0x100000, asm(f"add [rax], al; {between}", 64, 0x100000) + bytes.fromhex("f090"))
    machine.boot("long", 0x100000)
    machine.write_memory(IDT_BASE + 6 * 16, pack_gate(0x180000, SEL_CODE64, SYS_INT_GATE, long_mode=True))
    machine.write_memory(0x180000, b"\xf4")
    machine["rax"] = 0x1000
    for piece in pieces:
        result = machine.run(max_instructions=piece)
    assert result.stop.reason is StopReason.HLT and result.events[0]["vector"] == 6
    rip, cs, rflags = struct.unpack("<3Q", machine.read_memory(result.regs["rsp"], 24))
    assert rflags == 0x46


# Seeds that found a class once: 0 (flags at a fault), 59 (a run starting at a breakpoint),
# 114 and 2004 (SMRAM views and swaps), 10151 (re-arming after restore), 10372 (flags at a
# memory stop), 70660 (flags at an invalid opcode), 80372 and 81464 (an SMI raised by OUTS),
# 3002302 (an SMI pending when a skipped INIT exit consumed its event), 3102854 (a guest-mode
# snapshot restored into another machine), 3103452 (a breakpoint on a faulting instruction),
# 3505518 (flags after a hooked CPUID), 3506875 (an interrupt shadow lost where a site in it
# was stepped alone), 3533083 (a fault still marked in flight after its delivery stopped the run).
@pytest.mark.parametrize("seed", [0, 3, 59, 114, 2004, 10151, 10372, 70660, 80372, 81464, 3002302, 3102854, 3103452,
                                  3505518, 3506875, 3533083])
def test_replay_campaign_seeds(seed):
    load("replay").one_run(seed)


@pytest.mark.parametrize("pieces", [(None,), (2,), (1, 1)])
def test_a_memory_stop_reports_the_flags_before_it(pieces):
    # sbb al, 0x17 from AL = 0, CF = 0: 0xE9 with CF, AF, SF (0x93); the next instruction's
    # operand lies beyond RAM, so the run stops there with those flags, however it is cut.
    machine = Machine(memory_size=4 << 20, cpu_model="qemu32")
    machine.write_memory(0x100000, bytes.fromhex("1c17" "c095b800800000"))   # rcl byte [ebp+0x8000b8], 0
    machine.boot("protected", 0x100000, 3)
    for piece in pieces:
        result = machine.run(max_instructions=piece)
    assert result.stop.reason is StopReason.MEMORY and result.stop.rip == 0x100002
    assert result.regs["rflags"] == 0x93


def real_mode_guest(code_source: str, handler_source: str) -> tuple[Machine, bytes]:
    """Real mode at ENTRY, every IVT vector at IVT_HANDLER: the machine and the code's bytes."""
    machine = Machine(memory_size=2 << 20)
    machine.write_memory(0, struct.pack("<HH", IVT_HANDLER, 0) * 256)
    machine.write_memory(IVT_HANDLER, asm(handler_source, 16, IVT_HANDLER))
    code = asm(code_source, 16, ENTRY)
    machine.write_memory(ENTRY, code)
    machine.boot("real", ENTRY)
    return machine, code


def test_an_interrupt_raised_after_restore_is_taken_where_it_was():
    # The first raise_intr flags STI/POPF/IRET for code sites, and code translated before
    # (the block at ``target``, run once already) must be translated again with its STI
    # armed: after restore as in the first run, or the interrupt comes a slice late.
    machine, code = real_mode_guest("again: cli; jmp target; target: inc cx; sti; inc dx; inc dx; jmp again",
                                    "inc si; iret")
    machine.run(max_instructions=7)                  # one round: back at ENTRY
    snap = machine.snapshot()

    def continuation():
        machine.run(max_instructions=9)              # a round, then cli; jmp: at target, IF = 0
        machine.raise_intr(0x20)
        return outcome(machine, machine.run(max_instructions=60))

    first = continuation()
    external = [e for e in first["events"] if e["kind"] == "external"]
    sti = code.index(b"\xfb")
    assert len(external) == 1 and external[0]["rip"] == ENTRY + sti + 2     # after STI and its shadow
    machine.restore(snap)
    assert continuation() == first


BREAKPOINT_GUEST = """
import struct
from ringminus import Machine
machine = Machine(memory_size=2 << 20)
code = bytes.fromhex("66b800700000" "0f23c0"        # mov eax, 0x7000; mov dr0, eax
                     "66b801040000" "0f23f8"        # mov eax, 0x401; mov dr7, eax (L0: execute)
                     "66b800040000" "0f23f8"        # mov eax, 0x400; mov dr7, eax (freed)
                     "f4")
machine.write_memory(0x7C00, code)
machine.boot("real", 0x7C00)
machine.run(max_instructions=4)
assert machine.cpu.breakpoints.armed() == 1
snapshot = machine.snapshot()
machine.run(max_instructions=2)
assert machine.cpu.breakpoints.armed() == 0
machine.restore(snapshot)                   # DR7 = 0x401 again: its breakpoint, armed anew
assert machine.cpu.breakpoints.armed() == 1
result = machine.run()                      # clearing DR7 frees it: once
assert result.stop.reason.value == "hlt" and machine.cpu.breakpoints.armed() == 0
print("ok")
"""


def test_a_fault_whose_delivery_stopped_the_run_faults_alike_when_run_again():
    # The #GP's frame would go below RAM's end... above it: the run stops (memory).  Run
    # again, the instruction faults again — a #GP, not a #DF for a #GP still "in flight".
    machine = Machine(memory_size=2 << 20)
    machine.write_memory(0x100000, asm("mov esp, 0x300000; mov ax, 0x1238; mov ds, ax", 32, 0x100000))
    machine.boot("protected", 0x100000)
    machine.write_memory(IDT_BASE + 13 * 8, pack_gate(0x100100, 0x08, SYS_INT_GATE, long_mode=False))
    details = []
    for _ in range(2):
        result = machine.run(max_instructions=10)
        assert result.stop.reason is StopReason.MEMORY
        details.append(result.stop.detail.split(":")[0])
    assert details == ["delivering vector 13"] * 2


def test_a_restored_hardware_breakpoint_is_freed_once():
    # A snapshot holds QEMU's pointers to its DR0-DR3 breakpoint objects; restored after the
    # guest freed one, the next DR7 write freed it again and glibc aborted (seed 3531040).
    # In a child process: the failure is a crash.
    done = subprocess.run([sys.executable, "-c", BREAKPOINT_GUEST], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.parametrize("insn", ["cpuid", "rdtsc", "rdtscp"])
@pytest.mark.parametrize("limit", [None, 5, 6, 100])
def test_flags_survive_an_instruction_hook_however_the_run_is_counted(insn, limit):
    # Unicorn restores the state before a CPUID or RDTSC hook from the instruction's start
    # record, whose lazy-flags operation predates a code hook's prologue (the count's): the
    # block went on with ZF, PF from the ADD misread as CF, AF once INVLPG ended it.
    machine = Machine(memory_size=4 << 20)
    code = asm(f"xor eax, eax; add byte ptr [eax], al; {insn}; mov eax, 0x300000; invlpg [eax]; nop; hlt", 32, 0x100000)
    machine.write_memory(0x100000, code)
    machine.boot("protected", 0x100000)
    result = machine.run(max_instructions=limit)
    assert result.regs["rflags"] & 0xFFF == 0x46


@pytest.mark.parametrize("pieces", [(None,), (1,) * 8])
def test_an_iret_in_the_shadow_of_sti_holds_the_interrupt(pieces):
    # With an interrupt held, STI and IRET are sites run alone.  The IRET in STI's shadow
    # pops IF = 0: the interrupt is never taken (it was, at the IRET, once the site there
    # stopped the slice: the shadow was dropped although the IRET had not run).
    machine, code = real_mode_guest("cli; pushf; push cs; push after; sti; iret; after: hlt", "hlt")
    machine.raise_intr(0x20)
    for piece in pieces:
        result = machine.run(max_instructions=piece)
    assert [e for e in result.events if e["kind"] == "external"] == []
    assert result.stop.reason is StopReason.HLT and result.regs["rip"] == ENTRY + len(code)
    assert machine.interrupts == {0x20}


def test_a_forwarded_hypercall_completes_the_same_after_restore():
    # Snapshot at a ``hypercall`` stop: resume(ret) after restore completes the same call.
    machine = Machine(memory_size=4 << 20)
    code = asm("mov eax, 5; mov ebx, 1; .byte 0x0f, 0x01, 0xd9; add eax, ebx; hlt", 64, 0x100000)
    machine.write_memory(0x100000, code)
    machine.boot("long", 0x100000)
    machine.hypercalls.add(5, 1, "forward")
    stop = machine.run(max_instructions=100)
    assert stop.stop.reason is StopReason.HYPERCALL and stop.hypercall["nr"] == 5
    snap = machine.snapshot()
    first = machine.resume(ret=41, max_instructions=100)
    assert first.stop.reason is StopReason.HLT and first.regs["rax"] == 42
    machine.restore(snap)
    assert machine.resume(ret=41, max_instructions=100).as_dict() == first.as_dict()
