"""Exit codes, IOPM/MSRPM layouts, the decoder, and the staged checker through the API."""
import pytest

from ringminus import Machine, StopReason
from ringminus.decode.decoder import decode
from ringminus.decode.table import ROWS, Stage
from ringminus.intercepts import ExitCode, InterceptControls, exit_name, parse_exit
from ringminus.intercepts.controls import msrpm_bit
from ringminus.intercepts.profiles import PROFILES

from ..helpers import asm, boot_guest


def guest(source, boot="long", cpl=0, setup=None, profile="kvm", on_exit="stop", **controls_args):
    machine = boot_guest(bytes.fromhex(source[4:]) if source.startswith("hex:") else source, boot, cpl)
    controls = InterceptControls()
    controls.set(*controls_args.get("codes", ()))
    for port in controls_args.get("ports", ()):
        controls.set(ExitCode.IOIO)
        controls.set_ports(port)
    for msr, read, write in controls_args.get("msrs", ()):
        controls.set(ExitCode.MSR)
        controls.set_msr(msr, read, write)
    if setup:
        setup(machine)
    machine.enter_guest(controls, profile, on_exit)
    return machine, machine.run(max_instructions=10_000)


def test_exit_codes_and_names():
    assert ExitCode.CR0_READ == 0 and ExitCode.CR0_SEL_WRITE == 0x65 and ExitCode.IDLE_HLT == 0xA6
    assert ExitCode.NPF == 0x400 and ExitCode.INVALID == -1
    assert exit_name(0x4E) == "excp14" and exit_name(0x75) == "swint"
    assert parse_exit("read_cr0") == parse_exit("cr0_read") == 0
    assert parse_exit("write_cr0") == 0x10 and parse_exit("excp_13") == parse_exit("EXCP13") == 0x4D
    assert parse_exit("SVM_EXIT_NPF") == 0x400 and parse_exit("err") == parse_exit("vmexit_invalid") == -1
    assert parse_exit("0x72") == ExitCode.CPUID
    with pytest.raises(ValueError):
        parse_exit("nonsense")


def test_intercept_vector_bit_is_the_exit_code():
    controls = InterceptControls()
    controls.set(ExitCode.CR0_READ, ExitCode.IDLE_HLT)
    assert ExitCode.CR0_READ in controls and controls.vector == 1 | (1 << 0xA6)
    controls.intercept_exception(14)
    assert controls.exception_bitmap == 1 << 14 and ExitCode.EXCP14 in controls
    with pytest.raises(ValueError):
        controls.set(ExitCode.NPF)


def test_iopm_layout_and_tail_bits():
    controls = InterceptControls()
    controls.set(ExitCode.IOIO)
    assert controls.iopm.size == 12 * 1024
    controls.set_ports(0x5000)
    assert controls.iopm[0xA00] == 0x01
    assert controls.port_intercepted(0x4FFF, 4) and not controls.port_intercepted(0x4FFB, 4)
    controls.iopm[0x2000] = 0x01                        # bit 0x10000: the first tail bit
    assert controls.port_intercepted(0xFFFF, 2) and not controls.port_intercepted(0, 1)


def test_msrpm_layout_and_out_of_range_msrs():
    assert msrpm_bit(0x10, False) == 0x20 and msrpm_bit(0x10, True) == 0x21
    assert msrpm_bit(0xC001_0015, False) == (0x1000 * 8 + 0x2A) and msrpm_bit(0x4000_0000, False) is None
    controls = InterceptControls()
    controls.set(ExitCode.MSR)
    controls.msrpm[0x1005] = 0x04
    assert controls.msr_intercepted(0xC001_0015, False) and not controls.msr_intercepted(0xC001_0015, True)
    assert controls.msr_intercepted(0x4000_0000, False)          # outside all ranges: always
    assert controls.msrpm.size == 8 * 1024


def test_every_row_decodes_from_its_own_encoding():
    for row in ROWS:
        code = (bytes([row.prefix]) if row.prefix else b"") + row.opcode
        if isinstance(row.modrm, int):
            code += bytes([row.modrm])
        elif row.modrm == "r":
            code += b"\xc0"
        elif row.modrm:
            code += bytes([(int(row.modrm[1:]) << 3) | 0x00])       # memory form [rax]
        code += b"\x00" * (row.immediate + 8)
        insn = decode(code, 64)
        assert insn is not None and insn.row is row, row.name
        assert row.intercept is None or row.intercept.stage in Stage     # VMCALL has no intercept


def test_decoder_never_raises_on_random_bytes():
    import random
    rng = random.Random(7)
    for _ in range(20000):
        for bits in (16, 32, 64):
            decode(bytes(rng.randrange(256) for _ in range(rng.randrange(0, 16))), bits)


def test_cpuid_exit_then_skip_and_continue():
    machine, result = guest("mov eax, 1; cpuid; mov ebx, 7; hlt", codes=[ExitCode.CPUID])
    assert result.stop.reason is StopReason.VMEXIT and result.stop.exit_status == 16
    assert result.vmexit["name"] == "cpuid" and result.vmexit["stage"] == "PRE_EXCEPT"
    assert result.regs["rip"] == 0x100005 and result.vmexit["next_rip"] == 0x100007
    machine.skip_instruction()
    again = machine.run()
    assert again.stop.reason is StopReason.HLT and again.regs["rbx"] == 7


def test_on_exit_skip_lists_every_exit():
    _, result = guest("mov ecx, 3; l: cpuid; dec ecx; jnz l; hlt", codes=[ExitCode.CPUID], on_exit="skip")
    assert result.stop.reason is StopReason.HLT
    assert [e["name"] for e in result.events] == ["cpuid"] * 3


def test_exception_intercept_during_delivery_reports_exitintinfo():
    # INT 0x30 through a not-present gate raises #NP(0x182); with #NP intercepted the exit
    # carries no EXITINTINFO (the INT itself is not an exception being delivered) ...
    _, result = guest("int 0x30", "protected", codes=[ExitCode.EXCP11])
    assert result.vmexit["name"] == "excp11" and result.vmexit["info1"] == 0x182
    assert result.vmexit["exit_int_info"] == 0x80000430                      # INTn (type 4) 0x30
    # ... and #GP during #NP delivery, with #GP intercepted: EXITINTINFO = the #NP.
    def bad_np_gate(m):
        from ringminus.emulator.boot import IDT_BASE
        from ringminus.arch.segments import SYS_TRAP_GATE, pack_gate
        m.write_memory(IDT_BASE + 11 * 8, pack_gate(0x2000, 0x1000, SYS_TRAP_GATE))
    _, result = guest("int 0x30", "protected", setup=bad_np_gate, codes=[ExitCode.EXCP13, ExitCode.EXCP8])
    assert result.vmexit["name"] == "excp13" and result.vmexit["info1"] == 0x1001     # EXT: during an exception
    np_info = 11 | 3 << 8 | 1 << 11 | 1 << 31 | 0x182 << 32
    assert result.vmexit["exit_int_info"] == np_info
    _, result = guest("int 0x30", "protected", setup=bad_np_gate, codes=[ExitCode.EXCP8])
    assert result.vmexit["name"] == "excp8" and result.vmexit["exit_int_info"] == np_info


def test_shutdown_intercept_on_triple_fault():
    _, result = guest("mov eax, cr0", "protected", cpl=3, codes=[ExitCode.SHUTDOWN])
    assert result.stop.reason is StopReason.VMEXIT and result.vmexit["name"] == "shutdown"


def test_page_fault_exit_has_instruction_bytes_with_decode_assists():
    _, result = guest("mov rax, 0x70000000; mov rbx, [rax]", codes=[ExitCode.EXCP14], profile="apm")
    vmcb = bytes.fromhex(result.vmexit["insn_bytes"])      # VMCB 0xD0: count, then the bytes
    assert len(vmcb) == 16 and vmcb[0] == 15 and vmcb[1:4] == bytes.fromhex("488b18")
    _, result = guest("mov rax, 0x70000000; mov rbx, [rax]", codes=[ExitCode.EXCP14], profile="kvm")
    assert result.vmexit["insn_bytes"] == ""


def test_rep_with_zero_count_follows_the_profile_switch():
    from dataclasses import replace
    machine, result = guest("xor ecx, ecx; mov dx, 0x80; rep outsb; hlt", "protected", ports=[0x80])
    assert result.vmexit["name"] == "ioio"                                  # F.18: KVM exits
    machine, _ = guest("xor ecx, ecx; mov dx, 0x80; rep outsb; hlt", "protected", ports=[0x80])
    machine.guest.profile = replace(PROFILES["kvm"], rep_zero_count_intercepts=False)
    machine.cpu.rip = 0x100000
    assert machine.run().stop.reason is StopReason.HLT


def test_intercepts_cost_nothing_outside_flagged_instructions():
    # Every intercept set, a loop with no flagged instruction: no exit, one slice.
    machine = Machine()
    machine.write_memory(0x100000, asm("mov ecx, 100000; l: add eax, ecx; dec ecx; jnz l; hlt", 64, 0x100000))
    machine.boot("long", 0x100000)
    controls = InterceptControls()
    controls.set_all()
    machine.enter_guest(controls)
    result = machine.run()
    assert result.stop.reason is StopReason.VMEXIT and result.vmexit["name"] == "hlt"
    assert result.stats["slices"] == 1


def test_code_written_by_the_guest_into_scanned_pages_is_rescanned():
    # The guest writes CPUID (0F A2) over two NOPs of its own page, then runs them.
    source = "mov word ptr [rip + patch], 0xa20f; jmp patch; patch: nop; nop; hlt"
    machine, result = guest(source, codes=[ExitCode.CPUID])
    assert result.stop.reason is StopReason.VMEXIT and result.vmexit["name"] == "cpuid"
    assert machine.sites.rescans == 1


def test_moving_cr3_rearms_sites_at_the_new_linear_addresses():
    # Map the code's physical page at a second linear address, switch to those tables and
    # jump there: the CPUID must still exit.
    alias = 0x4000_0000                               # PDPT slot 1 -> the same page directory
    head = "mov rax, cr3; mov rbx, [rax]; and rbx, -4096; mov rcx, [rbx]; mov [rbx + 8], rcx; mov cr3, rax; "
    probe = asm(head + f"mov rax, {alias:#x}; jmp rax", 64, 0x100000)       # same encoding size
    target = alias + 0x100000 + len(probe)
    source = head + f"mov rax, {target:#x}; jmp rax; cpuid; hlt"
    machine, result = guest(source, codes=[ExitCode.CPUID])
    assert result.stop.reason is StopReason.VMEXIT and result.vmexit["name"] == "cpuid"
    assert result.vmexit["rip"] >= alias
