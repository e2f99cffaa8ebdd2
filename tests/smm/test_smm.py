"""SMI entry and RSM per semantics.md §C (kvm profile unless stated), SMRAM views, the
chipset's SMRAM register and SMI enables, and the §E.3 SMM vectors (S64 baseline with
private SMRAM at 0x30000)."""
import json
import struct

import pytest

from ringminus import Machine, StopReason
from ringminus.smm import layouts as L
from ringminus.smm.smram import D_OPEN, G_SMRAME

from ..helpers import RSM, SMM_ENTRY, add_smram, asm, boot_guest, run_cli, set_smram_field, smram_field

CODE = 0x401000
S64 = {"rax": 0x1111, "rsp": 0x8000, "rflags": 0x246, "cr0": 0x8005_0033, "cr4": 0x6A0, "efer": 0xD01,
       "dr6": 0xFFFF_0FF0, "dr7": 0x400}


def s64_machine(profile="kvm", handler=RSM, code="mov ebx, 0x77; hlt"):
    """The S64 baseline: 64-bit CPL0 at 0x401000, SMRAM private at 0x30000-0x3FFFF."""
    machine = add_smram(Machine(profile=profile), handler)
    machine.write_memory(CODE, asm(code, 64, CODE))
    machine.boot("long", CODE)
    for name, value in S64.items():
        machine[name] = value
    machine.cpu.set_table_register("idtr", 0x6000, 0xFFF)
    machine.break_at(SMM_ENTRY)
    return machine


def test_smi_entry_state_kvm():                                            # §E.3 #65
    machine = s64_machine()
    cr3 = machine["cr3"]
    machine.raise_smi()
    result = machine.run()
    regs = result.regs
    assert result.stop.reason is StopReason.BREAKPOINT and result.smm["smm"] is True
    assert regs["cs"] == {"selector": 0x3000, "base": 0x30000, "limit": 0xFFFF_FFFF, "attributes": 0x8093}
    for name in ("ds", "es", "fs", "gs", "ss"):
        assert regs[name] == {"selector": 0, "base": 0, "limit": 0xFFFF_FFFF, "attributes": 0x8093}
    assert regs["rip"] == 0x8000 and regs["rflags"] == 0x2
    assert regs["cr0"] == 0x0005_0032 and regs["cr3"] == cr3 and regs["cr4"] == 0 and regs["efer"] == 0
    assert regs["dr7"] == 0x400 and regs["dr6"] == 0xFFFF_0FF0
    assert regs["idtr"] == {"base": 0, "limit": 0}                         # KVM zeroes IDTR (§F.10)
    assert regs["rax"] == 0x1111 and regs["rsp"] == 0x8000
    assert result.smm["entries"] == 1
    # The save map, written into SMRAM.
    assert smram_field(machine, "revision", 4) == L.REVISION_64 and smram_field(machine, "smbase", 4) == 0x30000
    assert smram_field(machine, "rip") == CODE and smram_field(machine, "rflags") == 0x246
    assert smram_field(machine, "cr0") == 0x8005_0033 and smram_field(machine, "cr4") == 0x6A0 and smram_field(machine, "efer") == 0xD01
    assert smram_field(machine, "cs.attributes", 2) == 0xA09B and smram_field(machine, "idtr_base") == 0x6000


def test_qemu_profile_keeps_idtr():
    machine = s64_machine("qemu")
    machine.raise_smi()
    assert machine.run().regs["idtr"] == {"base": 0x6000, "limit": 0xFFF}


def test_rsm_restores_the_interrupted_state():                             # §E.3 #69
    machine = s64_machine()
    machine.raise_smi()
    machine.run()
    result = machine.run()
    regs = result.regs
    assert result.stop.reason is StopReason.HLT and regs["rbx"] == 0x77
    assert regs["rflags"] == 0x246 and regs["cr0"] == 0x8005_0033 and regs["cr4"] == 0x6A0
    assert regs["efer"] == 0xD01 and regs["cs"]["attributes"] == 0xA09B and regs["idtr"] == {"base": 0x6000, "limit": 0xFFF}
    assert result.smm["smm"] is False
    assert [e["kind"] for e in result.events] == ["smi", "rsm"]


def test_rsm_to_long_mode_with_pcide():                                   # §E.3 #71
    machine = s64_machine()
    machine.raise_smi()
    machine.run()
    set_smram_field(machine, "cr4", 0x2_06A0)
    set_smram_field(machine, "cr3", machine["cr3"] | 5)
    result = machine.run()
    assert result.stop.reason is StopReason.HLT
    assert result.regs["cr3"] & 0xFFF == 5 and result.regs["cr4"] & (1 << 17)


@pytest.mark.parametrize("profile,expect_shutdown", [("kvm", True), ("apm", True), ("qemu", False)])
def test_rsm_rejects_nw_without_cd(profile, expect_shutdown):              # §E.3 #73
    machine = s64_machine(profile)
    machine.raise_smi()
    machine.run()
    set_smram_field(machine, "cr0", 0xA005_0033)
    result = machine.run()
    if expect_shutdown:
        assert result.stop.reason is StopReason.SHUTDOWN and "CR0.NW set with CR0.CD clear" in result.stop.detail
        assert result.smm["smm"] is False                                   # KVM leaves SMM first
    else:
        assert result.stop.reason is not StopReason.SHUTDOWN


def test_rsm_rejects_long_mode_without_pae():                             # §E.3 #75
    machine = s64_machine()
    machine.raise_smi()
    machine.run()
    set_smram_field(machine, "cr4", 0)
    result = machine.run()
    assert result.stop.reason is StopReason.SHUTDOWN and "PAE" in result.stop.detail


def test_modified_revision_id_per_profile():                              # §E.3 #77
    outcomes = {}
    for profile in ("kvm", "apm", "qemu"):
        machine = s64_machine(profile)
        machine.raise_smi()
        machine.run()
        set_smram_field(machine, "revision", 0, 4)
        set_smram_field(machine, "smbase", 0x50000, 4)
        result = machine.run()
        outcomes[profile] = (result.stop.reason, result.smm["smbase"])
    assert outcomes["kvm"] == (StopReason.HLT, 0x50000)        # ignored, SMBASE reloaded
    assert outcomes["apm"][0] is StopReason.SHUTDOWN          # "SMM revision identifier modified"
    assert outcomes["qemu"] == (StopReason.HLT, 0x30000)      # bit 17 clear: no relocation


def test_smbase_relocation_takes_effect_at_the_next_smi():
    machine = s64_machine(code="nop; nop; hlt")
    machine.smram.add_range(0x50000, 0x10000)
    machine.load_smram(0x58000, RSM)
    machine.raise_smi()
    machine.run()
    set_smram_field(machine, "smbase", 0x50000, 4)
    machine.break_at(0x58000)
    machine.at_instruction(1, Machine.raise_smi)
    result = machine.run()
    assert result.stop.reason is StopReason.BREAKPOINT and result.regs["cs"]["base"] == 0x50000
    assert result.smm["smbase"] == 0x50000 and result.smm["entries"] == 2


def test_smram_is_private_outside_smm():                                  # §E.3 #85
    machine = s64_machine(handler=RSM)
    machine.memory.write(0x38000, b"\xaa")                 # outside SMM: lands in normal RAM
    assert machine.read_view(0x38000, 2) == b"\xaa\x00"
    machine.raise_smi()
    machine.run()
    assert machine.read_view(0x38000, 2) == RSM             # in SMM: the handler's bytes
    machine.run()
    assert machine.read_view(0x38000, 2) == b"\xaa\x00"


def test_smi_while_in_smm_is_latched_and_taken_after_rsm():
    machine = s64_machine()
    machine.raise_smi()
    machine.run()
    machine.raise_smi()                                     # while in SMM
    assert machine.run().stop.reason is StopReason.BREAKPOINT
    assert [e["kind"] for e in machine.result().events] == ["smi", "rsm", "smi"]


def test_rsm_outside_smm_is_ud():
    machine = Machine()
    machine.write_memory(0x100000, RSM)
    machine.boot("protected", 0x100000)
    result = machine.run()
    assert result.events[0]["kind"] == "exception" and result.events[0]["vector"] == 6


def test_smi_at_is_exact_and_auto_halted_cpus_take_pending_events():
    machine = Machine()
    add_smram(machine, asm("inc byte ptr [0x9000]; rsm", 16))
    machine.write_memory(0x7C00, asm("inc edi; inc edi; inc edi; hlt; mov ebx, 1; hlt", 16, 0x7C00))
    machine.boot("real", 0x7C00)
    machine.at_instruction(2, Machine.raise_smi)
    machine.at_instruction(1000, Machine.raise_smi)          # still pending at the HLT
    result = machine.run()
    smis = [e for e in result.events if e["kind"] == "smi"]
    assert [e["instructions"] for e in smis] == [2, 6] and smis[0]["rip"] == 0x7C04   # after two inc edi
    assert machine.read_view(0x9000, 1) == b"\x02" and result.regs["rdi"] == 3 and result.regs["rbx"] == 1
    assert smis[1]["rip"] == 0x7C07                           # the halted CPU resumes after HLT


def test_32_bit_map_for_qemu32():
    machine = Machine(cpu_model="qemu32")
    add_smram(machine, RSM)
    machine.write_memory(0x100000, asm("mov eax, 0x1234; hlt", 32, 0x100000))
    machine.boot("protected", 0x100000)
    machine.raise_smi()
    machine.break_at(0x38000)
    machine.run()
    area = L.from_bytes(machine.read_view(0x3FE00, 512), L.SMRAM_STATE_32)
    assert int(area["revision"]) == L.REVISION_32 and int(area["eip"]) == 0x100000
    assert int(area["cs_selector"]) == 0x08 and int(area["cs_cache"]["flags"]) == 0x00C09B00
    assert machine.run().regs["rax"] == 0x1234


def test_smram_register_open_closed_locked_from_the_guest():
    # q35: host bridge 00:00.0, SMRAM register 0x9D.  Open (0x4A), write a marker into the
    # A-segment SMRAM, close (0x0A), read it back from outside SMM, lock (0x1A), try to reopen.
    out = "mov dx, 0xcf8; mov eax, 0x8000009c; out dx, eax; mov dx, 0xcfd; mov al, {}; out dx, al; "
    source = (out.format(0x4A) + "mov byte ptr [0xa8000], 0x5a; mov bl, [0xa8000]; " + out.format(0x0A) +
              "mov cl, [0xa8000]; " + out.format(0x1A) + out.format(0x4A) + "movzx esi, byte ptr [0xa8000]; "
              "in al, dx; hlt")
    machine = Machine()
    machine.write_memory(0x100000, asm(source, 32, 0x100000))
    machine.boot("protected", 0x100000)
    result = machine.run()
    assert result.regs["rbx"] & 0xFF == 0x5A                  # open: SMRAM visible
    assert result.regs["rcx"] & 0xFF == 0                     # closed: the RAM behind it
    assert result.regs["rsi"] == 0                            # locked: reopening failed
    assert result.regs["rax"] & 0xFF == 0x1A and result.smm["smram"] == "locked"
    assert machine.smram.ranges[0].data[0x8000] == 0x5A


def test_apm_port_smi_needs_the_chipset_enable():
    # pc/PIIX4: config 0x5B bit 1 enables SMIs from APM_CNT writes.
    enable = "mov dx, 0xcf8; mov eax, 0x80000b58; out dx, eax; mov dx, 0xcff; mov al, 2; out dx, al; "
    for source, smis in (("mov al, 1; out 0xb2, al; hlt", 0), (enable + "mov al, 1; out 0xb2, al; hlt", 1)):
        machine = Machine(chipset="pc")
        add_smram(machine, RSM)
        machine.write_memory(0x100000, asm(source, 32, 0x100000))
        machine.boot("protected", 0x100000)
        result = machine.run()
        assert result.smm["entries"] == smis and result.stop.reason is StopReason.HLT


def test_cli_smm_options_and_json(tmp_path, capsys):
    image = tmp_path / "g.bin"
    image.write_bytes(asm("mov al, 1; out 0xb2, al; mov ebx, 2; hlt", 16, 0x7C00))
    handler = tmp_path / "h.bin"
    handler.write_bytes(asm("mov byte ptr [0x9000], 0x77; rsm", 16))
    status, out, _ = run_cli(capsys, "run", image, "--smram", "0x50000:0x10000", "--smbase", "0x50000",
                             "--smram-load", f"{handler}@0x58000", "--apm-smi", "--json", "--dump", "0x58000:4",
                             "--dump", "0x9000:1")
    doc = json.loads(out)
    assert status == 0 and doc["regs"]["rbx"] == 2
    assert doc["smm"] == {"smm": False, "pending": False, "inside_nmi": False, "latched_init": False,
                          "smbase": 0x50000, "entries": 1, "smram": "closed"}
    kinds = [(e["kind"], e["smbase"]) for e in doc["events"]]
    assert kinds == [("smi", 0x50000), ("rsm", 0x50000)]
    assert doc["dump"][0]["hex"] == "00000000"                # outside SMM: not the handler
    assert doc["dump"][1]["hex"] == "77"


@pytest.mark.parametrize("args,message", [
    (["--smram", "0x30001:0x1000"], "4 KiB"),
    (["--smram-load", "{h}@0x38000"], "SMRAM range"),
    (["--boot", "long", "--cpu", "qemu32"], "no long mode"),
    (["--smram", "0x30000:0x10000", "--smram", "0x38000:0x1000"], "overlaps"),
    (["--smram-state", "ajar"], "invalid choice"),
])
def test_cli_smm_errors(tmp_path, capsys, args, message):
    image = tmp_path / "g.bin"
    image.write_bytes(b"\xf4")
    handler = tmp_path / "h.bin"
    handler.write_bytes(RSM)
    status, _, err = run_cli(capsys, "run", image, *[a.format(h=handler) for a in args])
    assert status == 2 and err.count("\n") == 1 and message in err


def real_mode_machine(handler, main="nop; nop; nop; nop; hlt", profile="kvm"):
    """Real-mode code at 0x7C00, an NMI handler at 0:0x8000 (IVT vector 2) that records the IP
    it interrupted in [0x9002] and counts in [0x9000], and an SMI handler in SMRAM."""
    machine = add_smram(Machine(profile=profile), asm(handler, 16, 0x8000) if isinstance(handler, str) else handler)
    machine.write_memory(0x7C00, asm(main, 16, 0x7C00))
    machine.write_memory(0x8000, asm("inc byte ptr [0x9000]; push bp; mov bp, sp; mov ax, [bp + 2]; "
                                     "mov [0x9002], ax; pop bp; iret", 16, 0x8000))
    machine.write_memory(2 * 4, struct.pack("<HH", 0x8000, 0))
    machine.boot("real", 0x7C00)
    return machine


def nmi_count(machine):
    return machine.read_view(0x9000, 1)[0]


def test_nmi_in_smm_waits_for_rsm():                                     # §E.3 #79
    machine = real_mode_machine(RSM)
    machine.at_instruction(1, Machine.raise_smi)
    machine.break_at(0x38000)
    machine.run()                                           # in the SMI handler
    machine.raise_nmi()
    result = machine.run()
    assert result.stop.reason is StopReason.HLT and nmi_count(machine) == 1
    assert struct.unpack("<H", machine.read_view(0x9002, 2))[0] == 0x7C01   # taken right after RSM
    assert [e["kind"] for e in result.events] == ["smi", "rsm", "nmi"]


def test_iret_in_the_smi_handler_unblocks_nmis():                        # §E.3 #81
    # KVM zeroes IDTR on entry: the handler loads the real-mode IVT first, then IRETs.
    head = "lidt [0x9100]; pushf; push cs; mov ax, 0x8000; push ax; iret; "
    after_iret = 0x8000 + len(asm(head, 16, 0x8000))
    code = asm(head.replace("0x8000", hex(after_iret)) + "inc byte ptr [0x9004]", 16, 0x8000) + RSM
    machine = real_mode_machine(code)
    machine.write_memory(0x9100, struct.pack("<HI", 0x3FF, 0))
    machine.at_instruction(1, Machine.raise_smi)
    machine.break_at(0x38000)
    machine.run()
    machine.raise_nmi()                                     # blocked until the handler's IRET
    result = machine.run()
    assert nmi_count(machine) == 1 and result.smm["entries"] == 1
    nmi = next(e for e in result.events if e["kind"] == "nmi")
    assert result.events.index(nmi) == 1                    # inside SMM, before the RSM


def test_smi_inside_an_nmi_handler_keeps_nmis_blocked_after_rsm():
    machine = real_mode_machine(RSM, main="nop; nop; nop; nop; nop; nop; hlt")
    machine.raise_nmi()                                     # taken at once: handler at 0x8000
    machine.at_instruction(1, Machine.raise_smi)            # inside the NMI handler
    machine.at_instruction(2, Machine.raise_nmi)            # while in SMM
    result = machine.run()
    smi = next(e for e in result.events if e["kind"] == "smi")
    assert smi["rip"] != 0x7C00 and nmi_count(machine) == 2  # the second NMI after the handler's IRET
    kinds = [e["kind"] for e in result.events]
    assert kinds == ["nmi", "smi", "rsm", "nmi"]


def test_init_in_smm_is_latched_until_rsm():                             # §E.3 #83
    machine = real_mode_machine(RSM)
    machine.at_instruction(1, Machine.raise_smi)
    machine.break_at(0x38000)
    machine.run()
    machine.raise_init()
    assert machine.result().smm["latched_init"] is True
    result = machine.run(max_instructions=1)
    assert [e["kind"] for e in result.events][-2:] == ["rsm", "init"]
    assert result.regs["cs"]["base"] == 0xFFFF0000 and result.regs["rip"] == 0xFFF0   # reset vector
    assert result.smm["smbase"] == 0x30000 and result.smm["latched_init"] is False


def test_auto_halt_restart_in_the_apm_profile():
    for profile, halts_again in (("apm", True), ("kvm", False)):
        machine = real_mode_machine(RSM, main="hlt; mov bx, 5; hlt", profile=profile)
        machine.at_instruction(100, Machine.raise_smi)     # pending when the CPU halts
        result = machine.run()
        revision = int.from_bytes(machine.smram.ranges[1].data[0xFEFC:0xFF00].tobytes(), "little")
        assert machine.smram.ranges[1].data[0xFEC9] == (1 if profile == "apm" else 0)
        io_restart = L.REVISION_IO_RESTART if profile == "apm" else 0
        assert result.stop.reason is StopReason.HLT and revision == L.REVISION_64 | io_restart
        assert (result.regs["rbx"] & 0xFFFF == 5) is not halts_again


def test_set_smm_state_like_kvm_vcpu_events():
    machine = s64_machine()
    machine.set_smm_state(smm=True, pending=True)
    assert machine.read_view(0x38000, 2) == RSM and machine.result().smm["pending"] is True
    machine.set_smm_state(smm=False, pending=False, latched_init=True)
    state = machine.result().smm
    assert state["smm"] is False and state["pending"] is False and state["latched_init"] is True
    assert machine.read_view(0x38000, 2) == b"\0\0"


def test_snapshot_restore_reproduces_the_run_bit_for_bit():
    source = """mov ecx, 200
    l:  rdtsc
        add [0x9000], eax
        mov al, cl
        out 0xe9, al
        dec ecx
        jnz l
        hlt"""
    machine = Machine()
    add_smram(machine, asm("inc dword ptr [0x9100]; rsm", 16))
    machine.write_memory(0x7C00, asm(source, 16, 0x7C00))
    machine.boot("real", 0x7C00)
    for index in (150, 500, 900):
        machine.at_instruction(index, Machine.raise_smi)
    first = machine.run(max_instructions=400)
    assert first.stop.reason is StopReason.LIMIT
    snap = machine.snapshot()

    def finish():
        result = machine.run()
        return (result.stop, result.regs, result.console, result.events, result.instructions, result.smm,
                machine.read_view(0, 0x10000), machine.smram.ranges[1].data.tobytes(), machine.tsc.value)

    reference = finish()
    assert reference[0].reason is StopReason.HLT and reference[5]["entries"] == 3
    machine.restore(snap)
    assert finish() == reference
    machine.restore(snap)
    assert finish() == reference


def test_io_instruction_restart_in_the_apm_profile():
    # The handler asks, on its first entry only, for the OUT that raised the SMI to run again.
    handler = ("inc byte ptr [0x9000]; cmp byte ptr [0x9000], 1; jne done; mov eax, 0x3fec8; "
               "mov byte ptr [eax], 0xff; done: rsm")
    for profile, smis in (("apm", 2), ("kvm", 1)):
        machine = Machine(profile=profile, apm_smi=True)
        add_smram(machine, asm(handler.replace("rsm", "nop"), 16, 0x8000)[:-1] + RSM)
        machine.write_memory(0x7C00, asm("mov ecx, 0x11; mov al, 1; out 0xb2, al; inc ebx; hlt", 16, 0x7C00))
        machine.boot("real", 0x7C00)
        result = machine.run()
        assert result.smm["entries"] == smis and result.regs["rbx"] & 0xFFFF == 1
        if profile == "apm":
            rip = int.from_bytes(machine.smram.ranges[1].data[0xFEA0:0xFEA8].tobytes(), "little")
            rcx = int.from_bytes(machine.smram.ranges[1].data[0xFEA8:0xFEB0].tobytes(), "little")
            assert rip == 0x7C00 + len(asm("mov ecx, 0x11; mov al, 1", 16)) and rcx == 0x11
            trap = int.from_bytes(machine.smram.ranges[1].data[0xFEC0:0xFEC4].tobytes(), "little")
            assert trap == 0xB2 << 16 | 1 << 4 | 0b10        # port 0xB2, SZ8, valid, a write


def test_an_smi_raised_by_outs_is_taken_right_after_it():
    # OUTS reaches the APM port through Unicorn's own OUT hook (no code site): the SMI is still
    # taken at the next boundary, and the APM map records a string I/O instruction.
    for code, entries, rip, io_regs, trap in (
            ("outsb", 1, 0x7C0D, (0x7C0C, 3, 0x500), 0xB2 << 16 | 1 << 4 | 0b110),
            ("rep outsb", 3, 0x7C0C, (0x7C0C, 1, 0x502), 0xB2 << 16 | 1 << 4 | 0b1110)):    # the 3rd iteration
        machine = Machine(profile="apm", apm_smi=True)
        add_smram(machine, asm("inc byte ptr [0x9000]", 16, 0x8000) + RSM)
        machine.write_memory(0x7C00, asm(f"mov ecx, 3; mov si, 0x500; mov dx, 0xb2; {code}; inc ebx; hlt",
                                         16, 0x7C00))
        machine.boot("real", 0x7C00)
        result = machine.run(max_instructions=1000)
        data = machine.smram.ranges[1].data
        saved = lambda offset, size=8: int.from_bytes(data[offset:offset + size].tobytes(), "little")
        assert result.stop.reason is StopReason.HLT and result.smm["entries"] == entries
        assert machine.read_memory(0x9000, 1)[0] == entries and result.regs["rbx"] & 0xFFFF == 1
        assert saved(0xFF78) == rip                                  # taken after the OUTS (iteration)
        assert (saved(0xFEA0), saved(0xFEA8), saved(0xFEB0)) == io_regs     # RIP, RCX, RSI before it
        assert saved(0xFEC0, 4) == trap
        if code == "outsb":
            assert result.as_dict()["events"][0]["instructions"] == 4      # counted with the OUTS


def test_smbase_above_one_mib():
    # CS selector (SMBASE >> 4) & 0xFFFF with base SMBASE: a real-mode CS a selector write
    # could not express (reference/unicorn.md §5).
    machine = Machine()
    machine.smram.add_range(0x200000, 0x10000)
    machine.set_smbase(0x200000)
    machine.load_smram(0x208000, asm("mov ebx, 0x5a", 16) + RSM)
    machine.write_memory(0x7C00, asm("nop; hlt", 16, 0x7C00))
    machine.boot("real", 0x7C00)
    machine.break_at(0x208000)
    machine.raise_smi()
    entry = machine.run()
    assert entry.regs["cs"]["selector"] == 0x0000 and entry.regs["cs"]["base"] == 0x200000
    done = machine.run()
    saved = machine.smram.ranges[1].data
    assert done.stop.reason is StopReason.HLT and done.regs["rip"] == 0x7C02
    assert int.from_bytes(saved[0xFF00:0xFF04].tobytes(), "little") == 0x200000     # the SMBASE slot
    assert int.from_bytes(saved[0xFF78:0xFF80].tobytes(), "little") == 0x7C00       # saved RIP


# -- SMRAM views swap only where the CPU touches them (smram.py) ------------------------------
ASEG_HANDLER = 0xA8000


def test_after_rsm_the_guest_sees_ram_where_the_handler_ran():
    # RAM behind the A-segment holds other code and data than SMRAM; after SMIs that ran the
    # handler from SMRAM, the guest's reads and a far call into the A-segment reach RAM.
    machine = Machine(apm_smi=True)
    machine.set_smbase(0xA0000)
    machine.smram.set_state("closed")
    machine.load_smram(ASEG_HANDLER, asm("inc word ptr [0x9000]", 16, 0x8000) + RSM)
    far_call = bytes.fromhex("9a008000a0")                          # call 0xa000:0x8000, as SMM ran it
    machine.write_memory(0x7C00, asm("mov cx, 3; l: out 0xb2, al; dec cx; jnz l; mov ax, 0xa800; mov ds, ax; "
                                     "mov bx, [0]; xor ax, ax; mov ds, ax", 16, 0x7C00) + far_call + b"\xf4")
    machine.boot("real", 0x7C00)
    behind = asm("mov si, 0x5a5a", 16, 0) + b"\xcb"                   # retf (keystone adds 0x66)
    machine.write_memory(ASEG_HANDLER, behind)
    result = machine.run()
    assert result.stop.reason is StopReason.HLT and result.smm["entries"] == 3
    assert machine.read_memory(0x9000, 2) == b"\x03\x00"                   # the handler ran 3 times
    assert result.regs["rbx"] & 0xFFFF == int.from_bytes(behind[:2], "little")  # RAM, not SMRAM
    assert result.regs["rsi"] & 0xFFFF == 0x5A5A                            # RAM's code ran
    assert machine.smram.ranges[0].data[0x8000:0x8002].tobytes() != behind[:2]


def test_a_handler_in_plain_ram_never_swaps_the_closed_a_segment():
    machine = Machine(apm_smi=True)
    machine.smram.set_state("closed")
    machine.write_memory(0x38000, asm("inc word ptr [0x9000]", 16, 0x8000) + RSM)
    machine.write_memory(0x7C00, asm("mov cx, 50; l: out 0xb2, al; dec cx; jnz l; hlt", 16, 0x7C00))
    machine.boot("real", 0x7C00)
    result = machine.run()
    assert result.smm["entries"] == 50 and machine.read_memory(0x9000, 2) == b"\x32\x00"
    assert result.stats["smram_swaps"] == 0


def test_an_smm_access_to_the_a_segment_swaps_it_in():
    # The handler lives in plain RAM but reads SMRAM: the first SMM access swaps the view in,
    # and the value read is SMRAM's; outside SMM the same address reads RAM.
    machine = Machine(apm_smi=True)
    machine.smram.set_state("closed")
    machine.load_smram(0xB0000, b"\x34\x12")
    machine.write_memory(0xB0000, b"\x78\x56")
    machine.write_memory(0x38000, asm("mov ax, 0xb000; mov ds, ax; mov ax, [0]; mov bx, 0; mov ds, bx; "
                                      "mov [0x9000], ax", 16, 0x8000) + RSM)
    machine.write_memory(0x7C00, asm("out 0xb2, al; mov ax, 0xb000; mov ds, ax; mov dx, [0]; hlt", 16, 0x7C00))
    machine.boot("real", 0x7C00)
    result = machine.run()
    assert machine.read_memory(0x9000, 2) == b"\x34\x12"                   # SMRAM, read in SMM
    assert result.regs["rdx"] & 0xFFFF == 0x5678                            # RAM, read after RSM
    assert result.stats["smram_swaps"] >= 1


def test_view_changes_and_restores_leave_the_guests_page_tables_alone():
    # Unicorn looks up a range it unmaps through the CPU's page tables, as if its physical
    # address were linear, and that walk sets Accessed bits (fuzz replay seed 3200857: a
    # restore changed the guest's page tables).  Nothing the guest did touched them here.
    machine = boot_guest("hlt", "long")
    machine.smram.add_range(0x6000000, 0x10000)         # beyond RAM: an overlay, unmapped alone
    machine.smram.set_state("open")
    machine.read_memory(0x6000000, 1)                   # maps SMRAM's view
    before, snapshot = machine.read_memory(0, machine.memory.ram_size), machine.snapshot()
    machine.smram.set_state("closed")                   # unmaps it
    assert machine.read_memory(0, machine.memory.ram_size) == before
    machine.restore(snapshot)                           # maps it, and unmaps it on the way
    assert machine.read_memory(0, machine.memory.ram_size) == before
    assert machine.cpu["cr0"] >> 31 and machine.cpu["cr2"] == 0


@pytest.mark.parametrize("exact", [False, True])
def test_a_data_access_that_reveals_smram_goes_on_inside_its_block(exact):
    # SMRAM opened behind the guest's back is hidden until touched.  The first touch is a REP
    # MOVSD after two PUSHes in the same translated block: the view is mapped in the access's
    # hook and the copy goes on.  (Restarting the instruction instead ran SeaBIOS's SMM setup,
    # uncounted, from an EIP Unicorn had not synced: the PUSHes twice.)
    machine = Machine(exact_instructions=exact)
    code = """
        mov esp, 0x7000
        mov esi, 0x8000
        push edi
        push esi
        mov edi, 0xa0000
        mov ecx, 4
        .byte 0xf3, 0xa5
        pop esi
        pop edi
        hlt
    """
    machine.write_memory(0x100000, asm(code, 32, 0x100000))
    machine.write_memory(0x8000, bytes(range(16)))
    machine.boot("protected", 0x100000)
    machine.smram.write_register(D_OPEN | G_SMRAME)
    result = machine.run(timeout=30)
    assert result.stop.reason is StopReason.HLT and result.regs["rsp"] == 0x7000
    assert machine.smram.ranges[0].data[:16].tobytes() == bytes(range(16))
