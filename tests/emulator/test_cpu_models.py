"""What a CPU model does not advertise behaves as absent (issue 14, divergence 6): the
instruction is #UD in the translated code itself, as under QEMU TCG with the same -cpu."""
import pytest

from ringminus import StopReason

from ..helpers import LOAD, asm, boot_guest

# (name, bytes, {model: executes?}); every instruction then HLTs.  Long mode for qemu64,
# 32-bit protected mode for qemu32 (it has no long mode).
INSTRUCTIONS = [
    ("rdtscp", "0f01f9", {"qemu64": False, "qemu32": False, "max": True}),
    ("monitor", "0f01c8", {"qemu64": False, "qemu32": False, "max": False}),
    ("mwait", "0f01c9", {"qemu64": False, "qemu32": False, "max": False}),
    ("popcnt eax, eax", "f30fb8c0", {"qemu64": False, "qemu32": False, "max": True}),
    ("pshufb xmm0, xmm1", "660f3800c1", {"qemu64": False, "qemu32": False, "max": True}),
    ("movbe eax, [eax]", "0f38f000", {"qemu64": False, "qemu32": False, "max": True}),
    ("rdrand eax", "0fc7f0", {"qemu64": False, "qemu32": False, "max": True}),
    ("xgetbv", "0f01d0", {"qemu64": False, "qemu32": False, "max": False}),
    ("xsave [rax]", "0fae20", {"qemu64": False, "max": False}),
    ("aesenc xmm0, xmm1", "660f38dcc1", {"qemu64": False, "qemu32": False, "max": True}),
    ("pclmulqdq xmm0, xmm1, 0", "660f3a44c100", {"qemu64": False, "max": True}),
    ("andn eax, eax, eax (BMI1)", "c4e278f2c0", {"qemu64": False, "max": True}),
    ("adcx eax, ecx (ADX)", "660f38f6c1", {"qemu64": False, "max": True}),
    ("extrq xmm0, xmm1 (SSE4A)", "660f79c1", {"max": True}),          # QEMU 5 TCG runs it on any model
    ("clflushopt [rax]", "660fae38", {"qemu64": False, "max": True}),
    ("rdpid eax", "f30fc7f8", {"qemu64": False, "max": False}),
    ("sha1msg1 xmm0, xmm1", "0f38c9c1", {"qemu64": False, "max": False}),
    ("cmpxchg16b [rax]", "480fc708", {"qemu64": True, "max": True}),
    ("addsubps xmm0, xmm1 (SSE3)", "f20fd0c1", {"qemu64": True, "qemu32": True, "max": True}),
    ("cpuid", "0fa2", {"qemu64": True, "qemu32": True, "max": True}),
]
CASES = [(model, name, code, executes) for name, code, answers in INSTRUCTIONS
         for model, executes in answers.items()]


@pytest.mark.parametrize("model,name,code,executes", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_an_instruction_runs_only_where_the_model_advertises_it(model, name, code, executes):
    boot = "protected" if model == "qemu32" else "long"
    machine = boot_guest(bytes.fromhex(code) + b"\xf4", boot, cpu_model=model)
    machine["rax"] = 0x8000
    machine["cr4"] |= 1 << 9                                        # OSFXSR: SSE is on
    result = machine.run(max_instructions=10)
    undefined = [e for e in result.events if e["kind"] == "exception" and e["vector"] == 6]
    if executes:
        assert result.stop.reason is StopReason.HLT and not undefined
    else:
        assert undefined and undefined[0]["rip"] == LOAD[boot]
        assert result.stop.reason is StopReason.SHUTDOWN            # no IDT: #UD, #DF, shutdown


# CR4 bits of features a model lacks (KVM's __cr4_reserved_bits, QEMU's cr4_reserved_bits):
# VMXE, SMXE (no VMX/SMX on either model), OSXSAVE (no XSAVE), and bit 19, which no model has.
LACKING = {"vmxe": 1 << 13, "smxe": 1 << 14, "osxsave": 1 << 18, "bit19": 1 << 19}


@pytest.mark.parametrize("model", ["qemu64", "qemu32", "max"])
@pytest.mark.parametrize("bit", LACKING.values(), ids=LACKING)
def test_mov_to_cr4_of_a_bit_the_model_lacks_is_gp(model, bit):
    boot = "protected" if model == "qemu32" else "long"
    source = "mov rax, cr4; or rax, rbx; mov cr4, rax; hlt" if boot == "long" else \
        "mov eax, cr4; or eax, ebx; mov cr4, eax; hlt"
    machine = boot_guest(source, boot, cpu_model=model)
    machine["rbx"] = bit
    result = machine.run(max_instructions=10)
    faults = [e for e in result.events if e["kind"] == "exception"]
    assert faults and faults[0]["vector"] == 13 and faults[0]["error_code"] == 0
    # the bits every model has go in
    machine = boot_guest(source, boot, cpu_model=model)
    machine["rbx"] = 1 << 9 | 1 << 10                             # OSFXSR, OSXMMEXCPT
    result = machine.run(max_instructions=10)
    assert result.stop.reason is StopReason.HLT and result.regs["cr4"] & 0x600 == 0x600


@pytest.mark.parametrize("bit", LACKING.values(), ids=LACKING)
def test_rsm_to_a_cr4_bit_the_model_lacks_shuts_down(bit):
    from ..smm.test_smm import s64_machine
    from ..helpers import set_smram_field, smram_field
    machine = s64_machine()
    machine.raise_smi()
    machine.run()
    set_smram_field(machine, "cr4", smram_field(machine, "cr4") | bit)
    result = machine.run()
    assert result.stop.reason is StopReason.SHUTDOWN and "RSM: CR4 MBZ bits set" in result.stop.detail


# -- MSRs (arch/msrs.py) ---------------------------------------------------------------------
READ = "mov ecx, {msr:#x}; rdmsr; hlt"
WRITE = "mov ecx, {msr:#x}; xor eax, eax; xor edx, edx; wrmsr; hlt"


@pytest.mark.parametrize("profile,faults", [("kvm", True), ("apm", True), ("qemu", False)])
@pytest.mark.parametrize("access", [READ, WRITE], ids=["rdmsr", "wrmsr"])
@pytest.mark.parametrize("msr", [0x1FFF, 0x3B, 0xC000_0104, 0xC001_1FFF, 0x4000_0000])
def test_an_msr_the_cpu_does_not_have(profile, faults, access, msr):
    """kvm-unit-tests' divergence 6: RDMSR 0x1FFF read 0.  KVM and the APM: #GP(0); QEMU's
    TCG reads 0 and drops the write."""
    machine = boot_guest(access.format(msr=msr), "long", profile=profile)
    machine["rax"] = machine["rdx"] = 0x55
    result = machine.run(max_instructions=10)
    gps = [e for e in result.events if e["kind"] == "exception" and e["vector"] == 13]
    if faults:
        assert gps and gps[0]["error_code"] == 0 and result.stop.reason is StopReason.SHUTDOWN
    else:
        assert not gps and result.stop.reason is StopReason.HLT and result.regs["rax"] == 0


@pytest.mark.parametrize("msr", [0x174, 0x277, 0xC000_0081, 0xC001_0015, 0xC001_0117, 0x10])
def test_the_msrs_the_cpu_has_do_not_fault(msr):
    result = boot_guest(WRITE.format(msr=msr).replace("hlt", "rdmsr; hlt"), "long").run(max_instructions=10)
    assert result.stop.reason is StopReason.HLT and not result.events


def test_the_tsc_msr_reads_and_sets_the_time_stamp_counter():
    source = "mov ecx, 0x10; rdmsr; mov r8, rax; mov eax, 0x100000; xor edx, edx; wrmsr; rdtsc; mov r9, rax; hlt"
    machine = boot_guest(source, "long")
    assert machine.run(max_instructions=6).stop.reason is StopReason.LIMIT      # up to the WRMSR
    snapshot = machine.snapshot()
    result = machine.run(max_instructions=20)
    assert result.stop.reason is StopReason.HLT
    assert result.regs["r8"] == 1                                   # one instruction retired before it
    assert result.regs["r9"] == 0x100000 + 1                        # one tick per instruction: the WRMSR
    other = boot_guest("hlt", "long")
    other.restore(snapshot)                                         # the written TSC comes along
    assert other.run(max_instructions=20).regs["r9"] == 0x100001


@pytest.mark.parametrize("msr,machine", [(0x10, "none"), (0x1D9, "none"), (0xC000_0080, "none"), (0x1B, "q35")],
                         ids=["tsc", "debugctl", "efer", "apic-base-on-q35"])
@pytest.mark.parametrize("access", [READ, WRITE], ids=["rdmsr", "wrmsr"])
def test_a_kept_msr_at_cpl3_is_gp(access, msr, machine):
    """The core's check, before any MSR's own: the local APIC's base had none."""
    source = access.format(msr=msr)
    result = boot_guest(source, "long", cpl=3, machine=machine).run(max_instructions=10)
    at = LOAD["long"] + len(asm(source.split("; rdmsr")[0].split("; wrmsr")[0], 64))
    assert [(e["vector"], e["rip"]) for e in result.events if e["kind"] == "exception"][:1] == [(13, at)]


def test_max_advertises_what_it_runs():
    """--cpu max: the CPUID words are the ones Unicorn's CPU was given (its decoder's), and
    the CR4 bits of FSGSBASE, SMEP and SMAP go in."""
    from ringminus.arch.models import MODELS
    machine = boot_guest("mov eax, 7; xor ecx, ecx; cpuid; mov r8, rbx; mov eax, 0x80000001; cpuid; "
                         "mov rax, cr4; or eax, 0x10000; mov cr4, rax; hlt", "long", cpu_model="max")
    result = machine.run(max_instructions=20)
    assert result.stop.reason is StopReason.HLT and result.regs["cr4"] & 0x10000
    words = MODELS["max"].unicorn_words()
    assert result.regs["r8"] == words["7_0_ebx"] and result.regs["rdx"] == words["8000_0001_edx"]
    assert result.regs["rcx"] & ~(1 << 12) == words["8000_0001_ecx"]          # SKINIT: the profile's


def test_rdtscp_reads_tsc_aux():
    machine = boot_guest("mov ecx, 0xc0000103; mov eax, 0x1234; xor edx, edx; wrmsr; rdtscp; hlt", "long",
                         cpu_model="max")
    result = machine.run(max_instructions=10)
    assert result.stop.reason is StopReason.HLT and result.regs["rcx"] == 0x1234


def test_tsc_adjust_on_max():
    """IA32_TSC_ADJUST (SDM 17.17.3), which max advertises: a write to it moves the TSC by as
    much; a write to the TSC moves it by as much."""
    source = ("mov ecx, 0x3b; mov eax, 0x1000; xor edx, edx; wrmsr; rdtsc; mov r8, rax; "
              "mov ecx, 0x10; mov eax, 0x100000; wrmsr; mov ecx, 0x3b; rdmsr; mov r9, rax; hlt")
    result = boot_guest(source, "long", cpu_model="max").run(max_instructions=30)
    assert result.stop.reason is StopReason.HLT
    assert result.regs["r8"] == 0x1000 + 4                          # four instructions retired before RDTSC
    assert result.regs["r9"] == 0x100000 - 8                        # the TSC went to 0x100000 at count 8
    gps = [e for e in boot_guest("mov ecx, 0x3b; rdmsr; hlt", "long").run(max_instructions=10).events
           if e["kind"] == "exception"]
    assert [e["vector"] for e in gps[:1]] == [13]                   # qemu64 has no TSC_ADJUST
