"""Hypercalls through the API: KVM x86's VMMCALL/VMCALL ABI outside guest mode (semantics.md
§D.2), the arm64-style filter (§D.1, §D.3), the §E.4 vectors that apply to x86, VMCALL per
profile, and L2 calls, which the filter never sees."""
import pytest

from ringminus import (Hypercall, HypercallAction, HypercallFilterBusyError, HypercallFilterError,
                       HypercallHandlerError, InvalidHypercallRangeError, Machine,
                       OverlappingHypercallRangeError, StopReason)
from ringminus.hypercalls import BUILTIN_RESULTS, KVM_ENOSYS, KvmHypercall
from ringminus.intercepts import ExitCode, InterceptControls
from ringminus.intercepts.profiles import PROFILES

from ..helpers import BITS, LOAD, asm, boot_guest

VMMCALL = ".byte 0x0f, 0x01, 0xd9"          # spelled as bytes: not every keystone knows them
VMCALL = ".byte 0x0f, 0x01, 0xc1"
BYTES = {VMMCALL: bytes.fromhex("0f01d9"), VMCALL: bytes.fromhex("0f01c1")}
ENOSYS64, ENOSYS32 = 0xFFFF_FFFF_FFFF_FC18, 0xFFFF_FC18
MODES = [("real", 0xFFFF_FFFF), ("protected", 0xFFFF_FFFF), ("long", 0xFFFF_FFFF_FFFF_FFFF)]
DATA = 0x9000                               # results the guests store, in every mode


def machine_for(source, boot="long", cpl=0, profile="kvm", regs=None, ranges=(), handler=None):
    machine = boot_guest(source, boot, cpl, profile=profile)
    for name, value in (regs or {}).items():
        machine[name] = value
    for base, count, action in ranges:
        machine.hypercalls.add(base, count, action)
    machine.hypercalls.handler = handler
    return machine


def hypercall_events(result):
    return [e for e in result.events if e["kind"] == "hypercall"]


def stored(machine, index, size=4):
    return int.from_bytes(machine.read_memory(DATA + 4 * index, size), "little")


# -- the ABI -------------------------------------------------------------------------------------
def test_vector_87_unknown_number_in_32_bit_mode_returns_a_u32():                 # §E.4 #87
    machine = machine_for(f"{VMMCALL}; hlt", "protected", regs={"rax": 0xDEAD_0000_0001_2345})
    result = machine.run()
    assert result.stop.reason is StopReason.HLT
    assert result.regs["rax"] == ENOSYS32                           # zero-extended u32
    assert result.regs["rip"] == LOAD["protected"] + 4
    assert hypercall_events(result) == [{"kind": "hypercall", "rip": LOAD["protected"], "conduit": "vmmcall",
                                         "nr": 0x12345, "action": "handle", "result": ENOSYS32}]


def test_vector_89_vapic_poll_irq_returns_0():                                      # §E.4 #89
    result = machine_for(f"mov rax, 1; {VMMCALL}; hlt").run()
    assert result.regs["rax"] == 0 and result.stats["hypercalls"] == 1


def test_vector_91_map_gpa_range_without_the_capability_is_enosys():               # §E.4 #91
    result = machine_for(f"mov rax, 12; {VMMCALL}; hlt").run()
    assert result.regs["rax"] == ENOSYS64 == (-KVM_ENOSYS) & 0xFFFF_FFFF_FFFF_FFFF


def test_vector_93_forwarded_map_gpa_range_stops_then_completes():                 # §E.4 #93
    source = f"mov rax, 12; mov rbx, 0x100000; mov rcx, 0x10; xor edx, edx; {VMMCALL}; hlt"
    machine = machine_for(source, ranges=[(12, 1, "forward")])
    at = LOAD["long"] + len(asm("mov rax, 12; mov rbx, 0x100000; mov rcx, 0x10; xor edx, edx", 64))
    result = machine.run(max_instructions=100)
    assert result.stop.reason is StopReason.HYPERCALL and result.stop.exit_status == 20
    assert result.stop.value == 12 and result.stop.rip == at
    assert result.regs["rip"] == at                                 # not advanced yet
    assert result.instructions == 4                                 # the VMMCALL has not retired
    record = result.hypercall
    assert record["nr"] == 12 and record["args"][:3] == [0x10_0000, 0x10, 0]
    assert record["long_mode"] is True and record["conduit"] == "vmmcall" and record["cpl"] == 0
    assert record["rip"] == at and result.vmexit is None
    assert isinstance(result.call, Hypercall) and result.call.args[:3] == (0x10_0000, 0x10, 0)
    again = machine.resume(ret=0, max_instructions=100)
    assert again.stop.reason is StopReason.HLT
    assert again.regs["rax"] == 0 and again.regs["rip"] == at + 3 + 1
    assert again.instructions == 6 and again.hypercall is None


@pytest.mark.parametrize("budget", [1, 2, 3])
def test_a_resumed_budget_counts_the_completed_hypercall(budget):
    """Replay seed 3580738: resume(ret, max_instructions=N) retired N + 1 instructions, so a
    budget cut at a forwarded hypercall ran further than the same budget in one piece."""
    machine = machine_for(f"mov rax, 12; {VMMCALL}; inc rbx; inc rbx; inc rbx; hlt", ranges=[(12, 1, "forward")])
    assert machine.run(max_instructions=100).stop.reason is StopReason.HYPERCALL
    again = machine.resume(ret=0, max_instructions=budget)
    assert again.stop.reason is StopReason.LIMIT
    assert again.instructions == 1 + budget and again.regs["rbx"] == budget - 1


@pytest.mark.parametrize("nr", [KvmHypercall.VAPIC_POLL_IRQ, KvmHypercall.SCHED_YIELD, KvmHypercall.KICK_CPU])
@pytest.mark.parametrize("boot,mask", MODES)
def test_builtins_return_0_in_every_mode(boot, mask, nr):
    result = machine_for(f"{VMMCALL}; hlt", boot, regs={"rax": nr}).run()
    assert result.regs["rax"] == 0 and BUILTIN_RESULTS[nr] == 0
    assert result.regs["rip"] == LOAD[boot] + 4                     # real mode: CS = 0, IP = 0x7C00
    assert hypercall_events(result)[0]["action"] == "handle"


@pytest.mark.parametrize("boot,mask", MODES)
def test_number_and_result_width_by_mode(boot, mask):
    # Outside 64-bit mode RAX = 0x1_0000_000B is SCHED_YIELD; in 64-bit mode it is unknown.
    result = machine_for(f"{VMMCALL}; hlt", boot, regs={"rax": 0x1_0000_000B}).run()
    expected = ENOSYS64 if boot == "long" else 0
    assert result.regs["rax"] == expected
    assert hypercall_events(result)[0]["nr"] == 0x1_0000_000B & mask


@pytest.mark.parametrize("boot,mask", MODES)
def test_forwarded_record_truncates_arguments_and_result_outside_64_bit_mode(boot, mask):
    seen = []

    def handler(call):
        seen.append(call)
        return -2

    regs = {"rax": 0xAAAA_0000_0000_0070, "rbx": 0x1111_2222_3333_4444, "rcx": 0x5555_6666_7777_8888,
            "rdx": 0x9999_AAAA_BBBB_CCCC, "rsi": 0xDDDD_EEEE_FFFF_0000}
    machine = machine_for(f"{VMMCALL}; hlt", boot, regs=regs, ranges=[(0x70, 1, "forward"),
                                                                      (0xAAAA_0000_0000_0070, 1, "forward")],
                          handler=handler)
    result = machine.run()
    rip = LOAD[boot]
    assert seen == [Hypercall(regs["rax"] & mask, tuple(regs[r] & mask for r in ("rbx", "rcx", "rdx", "rsi")),
                              "vmmcall", boot == "long", 0, rip)]
    assert result.regs["rax"] == (-2) & mask
    assert result.regs["rip"] == rip + 3 + 1


def test_compatibility_mode_is_not_64_bit_mode():
    machine = Machine()
    machine.write_memory(0x100000, asm(f"{VMMCALL}; hlt", 32, 0x100000))
    machine.boot("long", 0x100000)
    machine["cs"] = 0x08                        # a 32-bit code segment: compatibility mode
    machine["rax"] = 0x1_0000_0001
    machine.hypercalls.add(1, 1, "forward")
    result = machine.run()
    assert result.stop.reason is StopReason.HYPERCALL
    assert result.hypercall["nr"] == 1 and result.hypercall["long_mode"] is False
    assert machine.resume(ret=-1).regs["rax"] == 0xFFFF_FFFF


@pytest.mark.parametrize("boot,mask", [("protected", 0xFFFF_FFFF), ("long", 0xFFFF_FFFF_FFFF_FFFF)])
def test_cpl3_gets_eperm_before_any_lookup(boot, mask):
    called = []
    machine = machine_for(f"mov eax, 1; {VMMCALL}; hlt", boot, cpl=3, ranges=[(1, 1, "forward")],
                          handler=lambda call: called.append(call) or 0)
    result = machine.run(max_instructions=100)
    # The ring-3 HLT raises #GP through an empty IDT: what matters happened before it.
    assert not called
    assert result.regs["rax"] == mask                               # −KVM_EPERM
    assert hypercall_events(result) == [{"kind": "hypercall", "rip": LOAD[boot] + 5, "conduit": "vmmcall",
                                         "nr": 1, "action": "eperm", "result": mask}]
    assert result.events[1]["vector"] == 13 and result.events[1]["rip"] == LOAD[boot] + 8     # at the HLT


def test_lock_prefix_is_ud():
    result = machine_for(".byte 0xf0, 0x0f, 0x01, 0xd9; hlt", "real").run(max_instructions=10)
    assert result.events[0]["kind"] == "exception" and result.events[0]["vector"] == 6
    assert not hypercall_events(result)


def test_prefixed_vmmcall_advances_past_its_prefixes():
    result = machine_for(".byte 0x66, 0x0f, 0x01, 0xd9; hlt", regs={"rax": 11}).run()
    assert result.regs["rax"] == 0 and result.regs["rip"] == LOAD["long"] + 5


def test_calls_count_as_one_instruction():
    result = machine_for(f"mov eax, 1; {VMMCALL}; {VMMCALL}; hlt").run(max_instructions=100)
    assert result.instructions == 4 and result.stats["hypercalls"] == 2


# -- the filter ----------------------------------------------------------------------------------
def test_deny_returns_enosys_and_advances():                                         # cf. §E.4 #95
    machine = machine_for(f"mov eax, 1; {VMMCALL}; hlt", "protected", ranges=[(1, 1, "deny")])
    result = machine.run()
    assert result.regs["rax"] == ENOSYS32 and result.regs["rip"] == LOAD["protected"] + 5 + 3 + 1
    assert hypercall_events(result)[0]["action"] == "deny"


def test_forward_handler_gets_the_record_and_answers_rax():
    calls = []

    def handler(call):
        calls.append(call)
        return call.nr + call.args[0]

    source = f"mov rax, 0x40000001; mov rbx, 5; mov rcx, 6; mov rdx, 7; mov rsi, 8; {VMMCALL}; hlt"
    machine = machine_for(source, ranges=[(0x4000_0000, 0x100, HypercallAction.FORWARD)], handler=handler)
    result = machine.run()
    rip = LOAD["long"] + len(asm("mov rax, 0x40000001; mov rbx, 5; mov rcx, 6; mov rdx, 7; mov rsi, 8", 64))
    assert calls == [Hypercall(0x4000_0001, (5, 6, 7, 8), "vmmcall", True, 0, rip)]
    assert calls[0].as_dict() == {"nr": 0x4000_0001, "args": [5, 6, 7, 8], "conduit": "vmmcall",
                                  "long_mode": True, "cpl": 0, "rip": rip}
    assert result.regs["rax"] == 0x4000_0006 and result.stop.reason is StopReason.HLT
    assert hypercall_events(result) == [{"kind": "hypercall", "rip": rip, "conduit": "vmmcall",
                                         "nr": 0x4000_0001, "action": "forward", "result": 0x4000_0006}]


def test_handler_that_declines_gives_enosys():
    result = machine_for(f"mov eax, 7; {VMMCALL}; hlt", ranges=[(7, 1, "forward")], handler=lambda call: None).run()
    assert result.regs["rax"] == ENOSYS64


def test_handler_errors_are_reported_as_handler_errors():
    def broken(call):
        raise KeyError("boom")

    with pytest.raises(HypercallHandlerError, match="KeyError"):
        machine_for(f"mov eax, 7; {VMMCALL}; hlt", ranges=[(7, 1, "forward")], handler=broken).run()
    with pytest.raises(HypercallHandlerError, match="returned str"):
        machine_for(f"mov eax, 7; {VMMCALL}; hlt", ranges=[(7, 1, "forward")], handler=lambda c: "0").run()


def test_handler_may_stop_the_run_after_the_call():
    holder = {}

    def handler(call):
        holder["machine"].request_stop()
        return 9

    machine = machine_for(f"mov eax, 7; {VMMCALL}; mov ebx, 1; hlt", ranges=[(7, 1, "forward")], handler=handler)
    holder["machine"] = machine
    result = machine.run()
    assert result.stop.reason is StopReason.STOPPED and result.regs["rax"] == 9
    assert result.stop.rip == result.regs["rip"] == LOAD["long"] + 5 + 3 and result.regs["rbx"] == 0


def test_no_range_means_handle_and_builtins_are_not_reserved():
    machine = machine_for(f"mov eax, 11; {VMMCALL}; hlt", ranges=[(11, 1, "deny")])
    assert machine.hypercalls.action(11) is HypercallAction.DENY
    assert machine.hypercalls.action(12) is HypercallAction.HANDLE
    assert machine.run().regs["rax"] == ENOSYS64


def test_high_numbers_match_only_in_64_bit_mode():
    ranges = [(0x1_0000_0005, 1, "deny")]
    assert machine_for(f"mov rax, 0x100000005; {VMMCALL}; hlt", ranges=ranges).run().regs["rax"] == ENOSYS64
    # Outside 64-bit mode the same RAX is truncated to 5 (KICK_CPU), which no range covers.
    assert machine_for(f"{VMMCALL}; hlt", "protected", regs={"rax": 0x1_0000_0005}, ranges=ranges).run().regs["rax"] == 0


def test_ranges_are_inclusive_and_kept_in_order():
    machine = Machine()
    machine.hypercalls.add(0x20, 0x10, "deny")
    machine.hypercalls.add(0x10, 0x10, "forward")            # adjacent below: 0x10-0x1f
    machine.hypercalls.add(0x30, 1, 0)                       # adjacent above, action by number
    assert [(r.base, r.end, r.action) for r in machine.hypercalls.ranges] == [
        (0x10, 0x1F, HypercallAction.FORWARD), (0x20, 0x2F, HypercallAction.DENY), (0x30, 0x30, HypercallAction.HANDLE)]
    assert [machine.hypercalls.action(n) for n in (0xF, 0x10, 0x1F, 0x20, 0x2F, 0x30, 0x31)] == [
        HypercallAction.HANDLE, HypercallAction.FORWARD, HypercallAction.FORWARD, HypercallAction.DENY,
        HypercallAction.DENY, HypercallAction.HANDLE, HypercallAction.HANDLE]
    machine.hypercalls.add(0xFFFF_FFFF_FFFF_FFFF, 1, "deny")       # the last number, count 1
    machine.hypercalls.add(0xFFFF_FFFF, 2, "deny")                 # crosses 2**32: 64-bit numbers
    assert machine.hypercalls.action(0x1_0000_0000) is HypercallAction.DENY


@pytest.mark.parametrize("base,count,action", [
    (0x8400_0001, 0, "deny"),                       # §E.4 #99: count 0
    (0x10, -1, "deny"),
    (0xFFFF_FFFF_FFFF_FFFF, 2, "deny"),             # wraps past 2**64 - 1 (cf. #99's u32 wrap)
    (0xFFFF_FFFF_FFFF_FFFF, 0xFFFF_FFFF_FFFF_FFFF, "deny"),
    (1 << 64, 1, "deny"),                           # not a 64-bit number
    (-1, 1, "deny"),
    (0x10, 1, "allow"),                             # §E.4 #99: unknown action
    (0x10, 1, 3),
    (0x10, 1, None),
])
def test_invalid_ranges(base, count, action):                                        # §E.4 #99
    machine = Machine()
    with pytest.raises(InvalidHypercallRangeError) as caught:
        machine.hypercalls.add(base, count, action)
    assert isinstance(caught.value, HypercallFilterError) and isinstance(caught.value, ValueError)
    assert caught.value.errno_name == "EINVAL" and len(machine.hypercalls) == 0


@pytest.mark.parametrize("base,count", [
    (0x8400_0000, 1),                               # §E.4 #97: the same range twice
    (0x83FF_FFFF, 2),                               # overlaps the start
    (0x8400_0003, 0x10),                            # overlaps the end
    (0x8300_0000, 0x0200_0000),                     # contains it
    (0x8400_0001, 1),                               # inside it
])
def test_overlapping_ranges(base, count):                                            # §E.4 #97
    machine = Machine()
    machine.hypercalls.add(0x8400_0000, 4, "deny")
    with pytest.raises(OverlappingHypercallRangeError) as caught:
        machine.hypercalls.add(base, count, "forward")
    assert caught.value.errno_name == "EEXIST" and isinstance(caught.value, HypercallFilterError)
    assert [r.base for r in machine.hypercalls.ranges] == [0x8400_0000]            # nothing changed


def test_filter_is_busy_once_the_machine_has_run():                                   # §E.4 #101
    machine = machine_for(f"{VMMCALL}; hlt", ranges=[(0x100, 1, "deny")])
    assert machine.has_run is False
    machine.hypercalls.add(0x200, 1, "deny")                # before the first run: fine
    machine.run()
    assert machine.has_run is True
    with pytest.raises(HypercallFilterBusyError) as caught:
        machine.hypercalls.add(0x300, 1, "deny")
    assert caught.value.errno_name == "EBUSY" and isinstance(caught.value, HypercallFilterError)
    # arm64's order (§D.1): EINVAL before EBUSY, EBUSY before EEXIST.
    with pytest.raises(InvalidHypercallRangeError):
        machine.hypercalls.add(0x300, 0, "deny")
    with pytest.raises(HypercallFilterBusyError):
        machine.hypercalls.add(0x100, 1, "deny")
    assert len(machine.hypercalls) == 2


# -- forwarding without a handler ------------------------------------------------------------------
def test_resume_completes_with_a_u32_outside_64_bit_mode_and_keeps_earlier_results():
    machine = machine_for(f"mov eax, 0x70; {VMMCALL}; hlt", "real", ranges=[(0x70, 1, "forward")])
    first = machine.run()
    at = LOAD["real"] + 6                                            # after 66 B8 imm32
    assert first.stop.reason is StopReason.HYPERCALL and first.regs["rip"] == at
    assert first.hypercall["long_mode"] is False
    assert hypercall_events(first)[0]["result"] is None
    second = machine.resume(ret=0x1_2345_6789)
    assert second.regs["rax"] == 0x2345_6789 and second.regs["rip"] == at + 3 + 1
    assert hypercall_events(second) == [{"kind": "hypercall", "rip": at, "conduit": "vmmcall", "nr": 0x70,
                                         "action": "forward", "result": 0x2345_6789}]
    assert hypercall_events(first)[0]["result"] is None              # the earlier result is unchanged


def test_resume_without_ret_declines_and_without_a_pending_call_just_runs():
    machine = machine_for(f"mov eax, 0x70; {VMMCALL}; hlt", ranges=[(0x70, 1, "forward")])
    with pytest.raises(ValueError):
        machine.resume(ret=1)                                       # nothing pending yet
    machine.run()
    with pytest.raises(TypeError):
        machine.resume(ret="1")
    assert machine.resume().regs["rax"] == ENOSYS64


def test_run_instead_of_resume_issues_the_call_again():
    machine = machine_for(f"mov eax, 0x70; {VMMCALL}; hlt", ranges=[(0x70, 1, "forward")])
    first = machine.run()
    again = machine.run()
    assert again.stop.reason is StopReason.HYPERCALL and again.stop.rip == first.stop.rip
    assert [e["result"] for e in hypercall_events(again)] == [None, None]
    assert machine.resume(ret=3).regs["rax"] == 3


def test_snapshot_keeps_the_pending_call():
    machine = machine_for(f"mov eax, 0x70; {VMMCALL}; hlt", ranges=[(0x70, 1, "forward")])
    machine.run()
    snap = machine.snapshot()
    assert machine.resume(ret=1).regs["rax"] == 1
    machine.restore(snap)
    assert machine.resume(ret=2).regs["rax"] == 2


# -- VMCALL per profile ---------------------------------------------------------------------------
def test_profiles_name_the_vmcall_choice():
    assert PROFILES["kvm"].vmcall_fix_hypercall is True
    assert PROFILES["apm"].vmcall_fix_hypercall is PROFILES["qemu"].vmcall_fix_hypercall is False


@pytest.mark.parametrize("boot", ["real", "protected", "long"])
def test_kvm_rewrites_vmcall_to_vmmcall_and_executes_it(boot):
    address = LOAD[boot]
    source = f"mov ecx, 2; l: mov eax, 11; {VMCALL}; dec ecx; jnz l; hlt"
    machine = machine_for(source, boot)
    at = address + len(asm("mov ecx, 2; l: mov eax, 11", BITS[boot]))
    result = machine.run(max_instructions=100)
    assert machine.read_memory(at, 3) == BYTES[VMMCALL]
    assert result.stop.reason is StopReason.HLT and result.regs["rax"] == 0
    rip = at
    # The first call is the VMCALL the guest issued (rewritten, then run at once as VMMCALL);
    # the second finds the VMMCALL in memory.
    assert [(e["conduit"], e["nr"], e["result"]) for e in hypercall_events(result)] == [
        ("vmcall", 11, 0), ("vmmcall", 11, 0)]
    assert hypercall_events(result)[0]["rip"] == rip
    assert result.instructions == 1 + 2 * 4 + 1                     # the VMCALL retired once, as the call


def test_kvm_vmcall_forwarded_reports_the_vmcall_conduit():
    seen = []
    machine = machine_for(f"mov eax, 0x70; {VMCALL}; hlt", "protected", ranges=[(0x70, 1, "forward")],
                          handler=lambda call: seen.append(call.conduit) or 1)
    assert machine.run().regs["rax"] == 1 and seen == ["vmcall"]


def test_kvm_vmcall_at_cpl3_is_gp0():
    machine = machine_for(f"mov eax, 11; {VMCALL}; hlt", "long", cpl=3)
    result = machine.run(max_instructions=100)
    at = LOAD["long"] + 5
    assert result.events[0] == {"kind": "exception", "vector": 13, "rip": at, "error_code": 0}
    assert machine.read_memory(at, 3) == BYTES[VMCALL] and not hypercall_events(result)


@pytest.mark.parametrize("profile", ["apm", "qemu"])
def test_vmcall_is_ud_without_kvms_emulation(profile):
    machine = machine_for(f"mov eax, 11; {VMCALL}; hlt", "protected", profile=profile)
    result = machine.run(max_instructions=100)
    at = LOAD["protected"] + 5
    assert result.events[0] == {"kind": "exception", "vector": 6, "rip": at}
    assert machine.read_memory(at, 3) == BYTES[VMCALL] and not hypercall_events(result)


def test_kvm_vmcall_on_a_write_protected_page_takes_the_pf():
    code = 0x200000                                     # the second 2 MiB page of the identity map
    machine = Machine()
    machine.write_memory(code, asm(f"mov eax, 11; {VMCALL}; hlt", 64, code))
    machine.boot("long", code)
    pd = machine["cr3"] + 0x2000                        # PML4, PDPT, then the first page directory
    entry = int.from_bytes(machine.read_memory(pd + 8, 8), "little")
    machine.write_memory(pd + 8, (entry & ~2).to_bytes(8, "little"))       # read-only
    machine["cr0"] = machine["cr0"] | (1 << 16)          # CR0.WP: supervisor writes obey it
    result = machine.run(max_instructions=100)
    assert result.events[0] == {"kind": "exception", "vector": 14, "rip": code + 5, "error_code": 3,
                                "cr2": code + 5}
    assert machine.read_memory(code + 5, 3) == BYTES[VMCALL]


def test_kvm_vmcall_in_rom_stays_vmcall_and_is_still_a_call():
    rom = bytearray(b"\xf4" * 0x10000)
    rom[0xFFF0:0xFFF7] = asm(f"mov ax, 1; {VMCALL}; hlt", 16)
    machine = Machine()
    machine.load_bios(bytes(rom))
    machine.boot("bios")
    result = machine.run(max_instructions=100)
    assert result.stop.reason is StopReason.HLT and result.regs["rax"] & 0xFFFF == 0
    assert machine.read_view(0xFFFF_FFF3, 3) == BYTES[VMCALL]     # ROM: the write is dropped
    assert [(e["conduit"], e["action"]) for e in hypercall_events(result)] == [("vmcall", "handle")]
    assert result.stats["rom_writes_ignored"] >= 1


# -- as L2 the filter is never consulted (§D.3 point 1) ------------------------------------------
def l2_machine(source, intercept, boot="long", cpl=0, profile="kvm", exceptions=()):
    calls = []
    machine = machine_for(source, boot, cpl, profile, ranges=[(0, 0x1000, "forward")],
                          handler=lambda call: calls.append(call) or 0)
    controls = InterceptControls()
    if intercept:
        controls.set(ExitCode.VMMCALL)
    controls.intercept_exception(*exceptions)
    machine.enter_guest(controls, profile)
    return machine, calls


@pytest.mark.parametrize("cpl", [0, 3])
def test_l2_vmmcall_intercepted_exits_to_l1(cpl):                                   # §E.1 #51
    machine, calls = l2_machine(f"mov eax, 1; {VMMCALL}; hlt", intercept=True, cpl=cpl)
    result = machine.run(max_instructions=100)
    assert result.stop.reason is StopReason.VMEXIT and result.vmexit["code"] == 0x081
    assert result.vmexit["rip"] == LOAD["long"] + 5 and result.vmexit["next_rip"] == LOAD["long"] + 8
    assert not calls and not hypercall_events(result) and result.stats["hypercalls"] == 0


@pytest.mark.parametrize("instruction", [VMMCALL, VMCALL])
def test_l2_call_not_intercepted_is_ud(instruction):
    machine, calls = l2_machine(f"mov eax, 1; {instruction}; hlt", intercept=False)
    result = machine.run(max_instructions=100)
    assert result.events[0] == {"kind": "exception", "vector": 6, "rip": LOAD["long"] + 5}
    assert not calls and not hypercall_events(result)
    assert machine.read_memory(LOAD["long"] + 5, 3) == BYTES[instruction]          # not rewritten


def test_l2_vmcall_meets_l1s_ud_intercept():
    machine, calls = l2_machine(f"mov eax, 1; {VMCALL}; hlt", intercept=True, exceptions=[6])
    result = machine.run(max_instructions=100)
    assert result.stop.reason is StopReason.VMEXIT and result.vmexit["code"] == ExitCode.EXCP6
    assert result.vmexit["rip"] == LOAD["long"] + 5 and not calls


def test_l2_real_mode_vmmcall_takes_the_intercept_under_kvm():
    # KVM's hardware takes the intercept before its emulator's Prot rule (kvm-unit-tests'
    # mode_switch): no #UD, no hypercall, the exit.
    machine, calls = l2_machine(f"mov eax, 1; {VMMCALL}; hlt", intercept=True, boot="real")
    result = machine.run(max_instructions=100)
    assert result.stop.reason is StopReason.VMEXIT and result.vmexit["name"] == "vmmcall" and not calls


def test_after_leaving_the_guest_the_filter_applies_again():
    machine, calls = l2_machine(f"mov eax, 1; {VMMCALL}; hlt", intercept=True)
    assert machine.run().stop.reason is StopReason.VMEXIT
    machine.leave_guest()
    result = machine.run()
    assert result.stop.reason is StopReason.HLT and len(calls) == 1 and calls[0].nr == 1


# -- a guest that mixes everything, in 16-, 32- and 64-bit mode ----------------------------------
MIXED = f"""
    mov eax, 11
    {VMMCALL}
    mov [{DATA:#x}], eax
    mov eax, 0x40
    {VMMCALL}
    mov [{DATA + 4:#x}], eax
    mov eax, 0x41
    mov ebx, 7
    {VMMCALL}
    mov [{DATA + 8:#x}], eax
    mov eax, 0x42
    {VMMCALL}
    mov [{DATA + 12:#x}], eax
    mov eax, 0x43
    mov ebx, 9
    {VMCALL}
    mov [{DATA + 16:#x}], eax
    hlt
"""


@pytest.mark.parametrize("with_handler", [True, False])
@pytest.mark.parametrize("boot,mask", MODES)
def test_mixed_guest(boot, mask, with_handler):
    ranges = [(0x40, 1, "deny"), (0x41, 3, "forward")]     # 0x42 forwarded, 0x43 too (by VMCALL)
    handler = (lambda call: call.nr * 0x100 + call.args[0]) if with_handler else None
    machine = machine_for(MIXED, boot, ranges=ranges, handler=handler)
    result = machine.run(max_instructions=1000)
    if not with_handler:
        answers = []
        while result.stop.reason is StopReason.HYPERCALL:
            call = result.call
            assert result.regs["rip"] == call.rip and call.long_mode is (boot == "long")
            answers.append((call.nr, call.conduit))
            result = machine.resume(ret=call.nr * 0x100 + call.args[0], max_instructions=1000)
        assert answers == [(0x41, "vmmcall"), (0x42, "vmmcall"), (0x43, "vmcall")]
    assert result.stop.reason is StopReason.HLT
    assert [stored(machine, i) for i in range(5)] == [0, ENOSYS32, 0x4107, 0x4207, 0x4309]
    assert [(e["nr"], e["action"], e["result"], e["conduit"]) for e in hypercall_events(result)] == [
        (11, "handle", 0, "vmmcall"), (0x40, "deny", (-KVM_ENOSYS) & mask, "vmmcall"),
        (0x41, "forward", 0x4107, "vmmcall"), (0x42, "forward", 0x4207, "vmmcall"),
        (0x43, "forward", 0x4309, "vmcall")]
    assert result.stats["hypercalls"] == 5 and result.instructions == 18
