"""Exact instruction counting, instruction-indexed events, HLT and the internals self-check."""
import io

import pytest

from ringminus import Machine, StopReason
from ringminus.emulator import ucinternals
from ringminus.emulator.boot import IDT_BASE
from ringminus.arch.segments import SYS_TRAP_GATE, pack_gate
from ringminus.intercepts import ExitCode, InterceptControls

from ..helpers import add_smram, asm, boot_guest

PROGRAM = """
    mov eax, 1
    xor ecx, ecx
    div ecx
    int 0x40
    mov ecx, 3
l:  inc edx
    dec ecx
    jnz l
    mov al, 0x21
    out 0xe9, al
    hlt
"""
HANDLERS = 0x200000


def machine_for_program():
    machine = boot_guest(PROGRAM, "protected")   # boot first: it installs the (empty) IDT
    machine.write_memory(HANDLERS, asm("add dword ptr [esp], 2; iretd", 32, HANDLERS))        # #DE: skip div
    machine.write_memory(HANDLERS + 0x10, asm("inc esi; iretd", 32, HANDLERS + 0x10))           # INT 0x40
    machine.write_memory(IDT_BASE, pack_gate(HANDLERS, 0x08, SYS_TRAP_GATE))
    machine.write_memory(IDT_BASE + 0x40 * 8, pack_gate(HANDLERS + 0x10, 0x08, SYS_TRAP_GATE))
    return machine


def test_limits_count_retired_instructions_exactly_across_faults_and_interrupts():
    trace = io.StringIO()
    full = machine_for_program().run(trace=trace)
    assert full.stop.reason is StopReason.HLT and full.regs["rsi"] == 1 and full.console == "!"
    started = [int(line.split()[0], 16) for line in trace.getvalue().splitlines()]
    div = 0x100000 + len(asm("mov eax, 1; xor ecx, ecx", 32))
    retired_positions = [i for i, address in enumerate(started) if address != div]   # div faults
    assert len(retired_positions) == len(started) - 1
    for k in range(len(retired_positions)):
        result = machine_for_program().run(max_instructions=k)
        assert result.stop.reason is StopReason.LIMIT and result.instructions == k
        next_start = retired_positions[k - 1] + 1 if k else 0
        assert result.regs["rip"] == started[next_start], k
    whole = machine_for_program().run(max_instructions=1000)
    assert whole.stop.reason is StopReason.HLT and whole.instructions == len(retired_positions)


def test_instruction_event_fires_at_its_index():
    machine = machine_for_program()
    seen = []
    machine.at_instruction(6, lambda m: seen.append((m.instructions, m.cpu.rip, m.cpu["esi"])))
    result = machine.run()
    assert result.stop.reason is StopReason.HLT and result.instructions is not None
    # Retired: mov, xor, (div faults) add, iretd, int 0x40, inc esi -> the 6th retires inside INT 0x40's handler.
    assert seen == [(6, HANDLERS + 0x10 + len(asm("inc esi", 32)), 1)]


def test_event_pending_at_hlt_is_delivered_to_the_halted_cpu():
    machine = Machine()
    machine.write_memory(0x7C00, asm("hlt; mov bx, 7; hlt", 16, 0x7C00))
    machine.write_memory(0x8000, asm("mov cx, 0x99; iret", 16, 0x8000))
    machine.write_memory(0x20 * 4, bytes([0x00, 0x80, 0, 0]))
    machine.boot("real", 0x7C00)
    from ringminus import Event, EventKind
    machine.at_instruction(1000, lambda m: m.deliver(Event(0x20, EventKind.EXTERNAL, m.cpu.rip)))
    result = machine.run()
    assert result.stop.reason is StopReason.HLT
    assert result.regs["rcx"] & 0xFFFF == 0x99 and result.regs["rbx"] & 0xFFFF == 7
    assert result.instructions == 5             # hlt, mov cx, iret, mov bx, hlt


def test_unicorn_internals_self_check():
    ucinternals.verify()        # raises UnicornLayoutError on another Unicorn release


def test_a_halted_cpu_stays_halted_until_woken():
    machine = Machine()
    machine.write_memory(0x7C00, asm("xor bx, bx; hlt; inc bx; hlt", 16, 0x7C00))
    machine.boot("real", 0x7C00)
    first = machine.run()
    again = machine.run()
    assert first.stop.reason is again.stop.reason is StopReason.HLT
    assert again.regs["rip"] == first.regs["rip"] == 0x7C03 and again.regs["rbx"] == 0
    machine.halted = False                      # as an interrupt's delivery would
    woken = machine.run()
    assert woken.regs["rbx"] == 1 and woken.regs["rip"] == 0x7C05


def test_random_bytes_never_raise():
    import random
    rng = random.Random(1234)
    for boot, address in (("real", 0x7C00), ("protected", 0x100000), ("long", 0x100000)):
        for _ in range(15):
            machine = Machine(memory_size=8 << 20)
            machine.write_memory(address, bytes(rng.randrange(256) for _ in range(256)))
            machine.boot(boot, address)
            result = machine.run(max_instructions=5000, timeout=5)
            assert result.stop.reason in set(StopReason)


def test_code_at_linear_address_zero_runs():
    machine = Machine()
    machine.write_memory(0, asm("mov bx, 5; hlt", 16, 0))
    machine.write_memory(0x7C00, asm("ljmp 0:0", 16, 0x7C00))
    machine.boot("real", 0x7C00)
    result = machine.run()
    assert result.stop.reason is StopReason.HLT and result.regs["rbx"] & 0xFFFF == 5 and result.regs["rip"] == 4


def test_cr2_survives_the_end_of_a_run_with_paging():
    machine = Machine()
    machine.write_memory(0x100000, asm("mov rax, 0x1234; mov cr2, rax; hlt", 64, 0x100000))
    machine.boot("long", 0x100000)
    assert machine.run().regs["cr2"] == 0x1234


@pytest.mark.parametrize("pieces", [(100,), (5, 95), (3, 4, 93)])
def test_after_a_skipped_event_exit_the_next_pending_event_is_taken_at_the_same_boundary(pieces):
    # INIT (intercepted; the caller as L1 skips it) and an SMI arrive together: the SMI is
    # taken at that boundary, however the run is cut.
    machine = add_smram(boot_guest("l: inc ax; jmp l"))
    controls = InterceptControls()
    controls.set(ExitCode.INIT)
    machine.enter_guest(controls, on_exit="skip")

    def init_and_smi(m):
        m.raise_init()
        m.raise_smi()
    machine.at_instruction(5, init_and_smi)
    for piece in pieces:
        result = machine.run(max_instructions=piece)
    kinds = [(e["kind"], e.get("name"), e.get("instructions")) for e in result.events]
    assert kinds[:2] == [("vmexit", "init", None), ("smi", None, 5)]


def test_the_event_log_is_bounded_and_counts_the_rest():
    # A real-mode loop of INT 0x40 (its handler an IRET): every delivery counts in stats, the
    # log keeps the first ``limit``, and a snapshot keeps the count of the unlisted.
    machine = Machine()
    machine.write_memory(0x7C00, asm("mov cx, 50\nl: int 0x40\nloop l\nhlt", 16, 0x7C00))
    machine.write_memory(0x40 * 4, (0x7E00).to_bytes(2, "little") + bytes(2))
    machine.write_memory(0x7E00, b"\xcf")                                  # iret
    machine.boot("real", 0x7C00)
    machine.events.limit = 20
    before = machine.snapshot()
    result = machine.run(max_instructions=1000)
    assert result.stop.reason is StopReason.HLT
    assert len(result.events) == 20 and result.stats["events_unlisted"] == 30
    assert result.stats["interrupts_delivered"] == 50
    machine.restore(before)
    again = machine.run(max_instructions=1000)
    assert again.events == result.events and again.stats["events_unlisted"] == 30
