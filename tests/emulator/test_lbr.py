"""Last-branch recording (emulator/lbr.py): DEBUGCTL.LBR and LastBranchFromIP/ToIP."""
import pytest

from ringminus import StopReason

from ..helpers import LOAD, asm, boot_guest

ENABLE = "mov ecx, 0x1d9; mov eax, 1; xor edx, edx; wrmsr"
READ_BACK = ("mov ecx, 0x1d9; xor eax, eax; xor edx, edx; wrmsr; "
             "mov ecx, 0x1db; rdmsr; mov r8, rax; mov ecx, 0x1dc; rdmsr; mov r9, rax; hlt")


def branch_at(source: str, branch: bytes) -> tuple[int, int]:
    """(where ``branch`` — a near JMP or CALL's bytes — is in ``source`` assembled at the
    long-mode load address, where it goes)."""
    code = asm(source, 64, LOAD["long"])
    at = LOAD["long"] + code.index(branch)
    return at, at + len(branch) + int.from_bytes(branch[1:], "little", signed=True)


JMP_OVER_TWO = bytes.fromhex("eb02")
CALL_OVER_ONE = bytes.fromhex("e801000000")


def test_the_last_jump_is_recorded_while_lbr_is_set():
    source = f"{ENABLE}; jmp to_here; nop; nop; to_here: nop; mov eax, 1; {READ_BACK}"
    result = boot_guest(source, "long").run(max_instructions=100)
    assert result.stop.reason is StopReason.HLT
    assert (result.regs["r8"], result.regs["r9"]) == branch_at(source, JMP_OVER_TWO)


def test_branches_with_lbr_clear_are_not_recorded():
    source = f"jmp skip; nop; skip: {ENABLE}; call to_here; nop; to_here: mov ecx, 3; rep stosb; dec ecx; {READ_BACK}"
    machine = boot_guest(source, "long")
    machine["rdi"], machine["rsp"] = 0x8000, 0x9000
    result = machine.run(max_instructions=100)
    # the CALL is the last branch: the JMP came before LBR, REP STOSB repeats in place
    assert result.stop.reason is StopReason.HLT
    assert (result.regs["r8"], result.regs["r9"]) == branch_at(source, CALL_OVER_ONE)


@pytest.mark.parametrize("value", [1 << 6, 1 << 32])
def test_a_reserved_debugctl_bit_is_gp(value):
    source = f"mov ecx, 0x1d9; mov eax, {value & 0xFFFF_FFFF:#x}; mov edx, {value >> 32:#x}; wrmsr; hlt"
    result = boot_guest(source, "long").run(max_instructions=10)
    assert [e["vector"] for e in result.events if e["kind"] == "exception"][:1] == [13]


def test_a_snapshot_keeps_the_record_and_the_recording():
    source = f"{ENABLE}; mov eax, 1; jmp to_here; nop; nop; to_here: nop; {READ_BACK}"
    machine = boot_guest(source, "long")
    assert machine.run(max_instructions=5).stop.reason is StopReason.LIMIT       # LBR set, before the JMP
    snapshot = machine.snapshot()
    first = machine.run(max_instructions=100)
    other = boot_guest("hlt", "long")
    other.restore(snapshot)                                         # LBR still set there
    again = other.run(max_instructions=100)
    expected = branch_at(source, JMP_OVER_TWO)
    assert (first.regs["r8"], first.regs["r9"]) == (again.regs["r8"], again.regs["r9"]) == expected
