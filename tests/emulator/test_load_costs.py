"""What loading and arming cost, in counts (never times): Unicorn hooks installed, ranges
armed, blocks searched — and that code the guest writes or copies later is still found.

Sites are armed as Unicorn translates code (emulator/sites.py): nothing is scanned at load,
nothing is write-hooked, and data that looks like code is never armed.
"""
from __future__ import annotations

import struct
from collections import Counter

import pytest
from unicorn import UC_HOOK_CODE, UC_HOOK_MEM_WRITE

from ringminus import Machine, StopReason
from ringminus.emulator.boot import IDT_BASE, SEL_CODE64
from ringminus.arch.segments import SYS_INT_GATE, pack_gate
from ringminus.emulator.loader import parse_elf
from ringminus.emulator.ports import EXIT_PORT
from ringminus.emulator.sites import EVICTION_INTERVAL, MERGE_GAP, RANGE_BUDGET
from ringminus.intercepts import InterceptControls
from ringminus.arch.exitcodes import ExitCode

from .. import l1
from ..helpers import asm, boot_guest

TEXT = 0x100000
BSS = 0x200000
BSS_SIZE = 12 << 20                         # as large as kvm-unit-tests' .bss
STACK_TOP = BSS + BSS_SIZE
BUFFER = BSS + 0x1000                       # where the guest copies code to
PAGES_64K = 16


def elf64(text: bytes, data: bytes = b"", bss: int = BSS_SIZE) -> bytes:
    """An x86-64 ELF: text at TEXT (R E), then ``data`` and ``bss`` zero bytes at BSS (RW)."""
    header = struct.pack("<16sHHIQQQIHHHHHH", b"\x7fELF\x02\x01\x01", 2, 62, 1, TEXT, 64, 0, 0,
                         64, 56, 2, 0, 0, 0)
    text_at, data_at = 0x1000, 0x1000 + (-(-len(text) // 0x1000)) * 0x1000
    segments = struct.pack("<IIQQQQQQ", 1, 5, text_at, TEXT, TEXT, len(text), len(text), 0x1000) + \
        struct.pack("<IIQQQQQQ", 1, 6, data_at, BSS, BSS, len(data), len(data) + bss, 0x1000)
    image = bytearray(header + segments).ljust(text_at, b"\0")
    image[text_at:text_at + len(text)] = text
    image = image.ljust(data_at, b"\0") + data
    return bytes(image)


@pytest.fixture
def hooks(monkeypatch):
    """Every Unicorn hook machines made in the test install, counted by hook type."""
    added: Counter = Counter()
    uc_class = type(Machine(memory_size=1 << 20).uc)
    original = uc_class.hook_add

    def counting(self, htype, *args, **kwargs):
        added[htype] += 1
        return original(self, htype, *args, **kwargs)

    monkeypatch.setattr(uc_class, "hook_add", counting)
    return added


def controls(*codes: ExitCode) -> InterceptControls:
    c = InterceptControls()
    for code in codes:
        c.set(code)
    return c


def exits(result) -> list[dict]:
    return [event for event in result.events if event.get("kind") == "vmexit"]


def flat_guest(image: bytes, *codes: ExitCode, on_exit: str = "skip") -> Machine:
    machine = boot_guest(image, "long", address=TEXT)
    machine.enter_guest(controls(*codes), on_exit=on_exit)
    return machine


def test_a_bss_is_neither_searched_nor_watched(hooks):
    # An L2 whose stack lies in a 12 MiB .bss pushes, calls and pops around a CPUID exit,
    # 2000 times: its stack writes reach no Python, and only the blocks that ran were searched.
    code = asm(f"""
        mov rsp, {STACK_TOP:#x}
        mov ebp, 2000
    again:
        push rbp
        call leaf
        pop rbp
        cpuid
        dec ebp
        jnz again
        hlt
    leaf:
        push rax
        push rbx
        pop rbx
        pop rax
        ret
    """, 64, TEXT)
    machine = Machine()
    before = Counter(hooks)
    machine.load_image(parse_elf(elf64(code)))
    assert hooks == before                                  # loading arms and watches nothing
    machine.boot("long", TEXT)
    machine.enter_guest(controls(ExitCode.CPUID), on_exit="skip")
    result = machine.run(timeout=60)
    assert result.stop.reason is StopReason.HLT and result.stats["vmexits"] == 2000
    assert hooks[UC_HOOK_MEM_WRITE] == 0
    assert hooks[UC_HOOK_CODE] - before[UC_HOOK_CODE] <= 4
    assert machine.sites.translations <= 40
    assert len(machine.sites.armed) <= 4


def test_data_that_looks_like_code_is_never_armed(hooks):
    # 64 KiB of .data full of HLT and CPUID bytes, both intercepted; the code never runs it.
    data = (b"\xf4\x0f\xa2" * 0x5556)[:0x10000]
    code = asm(f"mov rax, {BSS:#x}; mov eax, [rax]; cpuid; hlt", 64, TEXT)
    machine = Machine()
    machine.load_image(parse_elf(elf64(code, data)))
    machine.boot("long", TEXT)
    machine.enter_guest(controls(ExitCode.CPUID, ExitCode.HLT), on_exit="skip")
    result = machine.run(timeout=60)
    assert [e["name"] for e in exits(result)] == ["cpuid", "hlt"]
    assert not any(address in machine.sites.armed for address in range(BSS, BSS + len(data)))
    assert len(machine.sites.ranges) <= 3 and hooks[UC_HOOK_MEM_WRITE] == 0


def test_a_dense_hlt_image_arms_a_few_ranges(hooks):
    # 64 KiB of HLT under the HLT intercept: entering the guest installs no hook, and 3000
    # skipped HLT exits leave a few ranges (about one per page).
    machine = Machine()
    machine.write_memory(TEXT, b"\xf4" * 0x10000)
    machine.boot("long", TEXT)
    before = Counter(hooks)
    machine.enter_guest(controls(ExitCode.HLT), on_exit="skip")
    assert hooks == before
    result = machine.run(max_instructions=3000, timeout=60)
    assert result.stop.reason is StopReason.LIMIT and result.stats["vmexits"] == 3000
    assert result.regs["rip"] == TEXT + 3000
    assert len(machine.sites.ranges) <= PAGES_64K
    assert hooks[UC_HOOK_CODE] - before[UC_HOOK_CODE] <= 3 * PAGES_64K


@pytest.mark.parametrize("pattern, code, name", [
    (b"\xf4\x90", ExitCode.HLT, "hlt"),             # HLT ends every block
    (b"\x0f\xa2\x90", ExitCode.CPUID, "cpuid"),       # long blocks of CPUIDs and NOPs
])
def test_dense_flagged_code_stays_within_the_range_budget(pattern, code, name):
    # Every other instruction is flagged; each one still exits once, and only those do.
    machine = flat_guest(pattern * (0x10000 // len(pattern)), code)
    result = machine.run(max_instructions=2400, timeout=120)
    assert result.stop.reason is StopReason.LIMIT
    taken = exits(result)
    assert len(taken) == 1200 == result.stats["vmexits"] and {e["name"] for e in taken} == {name}
    assert [e["rip"] for e in taken] == [TEXT + len(pattern) * i for i in range(1200)]
    assert len(machine.sites.ranges) <= RANGE_BUDGET + PAGES_64K
    machine.run(max_instructions=2400, timeout=120)         # ranges are merged between slices
    assert len(machine.sites.ranges) <= RANGE_BUDGET + PAGES_64K


def test_code_an_l2_copies_into_its_bss_exits():
    # L2 writes CPUID; RET into its .bss and calls it: the CPUID there exits.
    code = asm(f"""
        mov rsp, {STACK_TOP:#x}
        mov rdi, {BUFFER:#x}
        mov dword ptr [rdi], 0xc3a20f
        call rdi
        hlt
    """, 64, TEXT)
    machine = Machine()
    machine.load_image(parse_elf(elf64(code)))
    machine.boot("long", TEXT)
    machine.enter_guest(controls(ExitCode.CPUID))
    result = machine.run(timeout=60)
    assert result.stop.reason is StopReason.VMEXIT and result.vmexit["name"] == "cpuid"
    assert result.vmexit["rip"] == BUFFER


def test_code_written_over_bss_code_that_ran_exits():
    # The copied code runs once as NOP; RET, is overwritten with CPUID; RET, and runs again.
    code = asm(f"""
        mov rsp, {STACK_TOP:#x}
        mov rdi, {BUFFER:#x}
        mov word ptr [rdi], 0xc390
        call rdi
        mov dword ptr [rdi], 0xc3a20f
        call rdi
        hlt
    """, 64, TEXT)
    machine = Machine()
    machine.load_image(parse_elf(elf64(code)))
    machine.boot("long", TEXT)
    machine.enter_guest(controls(ExitCode.CPUID))
    result = machine.run(timeout=60)
    assert result.stop.reason is StopReason.VMEXIT and result.vmexit["rip"] == BUFFER
    assert result.regs["rsp"] == STACK_TOP - 8 and machine.sites.rescans == 1


def test_code_that_ran_before_its_intercept_was_set_exits_once_it_is():
    # The loop runs natively first, up to the exit port; then CPUID is intercepted and the
    # same loop, translated without a site, runs again.
    machine = Machine()
    machine.write_memory(TEXT, asm(f"""
        mov ebp, 3
    again:
        cpuid
        dec ebp
        jnz again
        out {EXIT_PORT:#x}, al
        mov ebp, 3
        jmp again
    """, 64, TEXT))
    machine.boot("long", TEXT)
    assert machine.run(timeout=60).stop.reason is StopReason.EXIT
    machine.enter_guest(controls(ExitCode.CPUID))
    result = machine.run(timeout=60)
    assert result.stop.reason is StopReason.VMEXIT and result.vmexit["rip"] == TEXT + 5


def test_a_guest_hypervisor_that_intercepts_more_later_gets_its_exits():
    # L1 runs L2's loop with only VMMCALL intercepted (its CPUID runs natively), then adds
    # the CPUID intercept in the VMCB and resumes: the CPUID translated before now exits.
    vmmcall = 0x081
    cpuid_bit = 1 << (l1.CPUID & 31)                         # in intercept word CPUID >> 5
    guest = l1.GuestHypervisor(
        l2=f"again: cpuid; {l1.VMMCALL}; jmp again", intercepts=(l1.HLT, vmmcall),
        handlers={vmmcall: f"or dword ptr [rbx + {4 * (l1.CPUID >> 5):#x}], {cpuid_bit:#x}\njmp advance"})
    result = guest.run()
    assert result.stop.reason is StopReason.HLT
    assert [e.exitcode for e in guest.exits()] == [vmmcall, l1.CPUID]
    assert guest.exits()[1].rip == l1.L2_CODE


def test_a_fault_inside_a_range_of_sites_holds_the_flags_before_it():
    # A block with more runs of flagged OUTs than RUNS_PER_BLOCK gets one hook over them,
    # which covers the faulting load between them too: Unicorn compiles a hook call before
    # it, and the #PF frame must still hold the flags ADD left (ZF and PF), as without sites.
    outs = "out 0x80, al; nop; " * 6
    machine = Machine(memory_size=4 << 20)
    machine.write_memory(TEXT, asm(f"xor esi, esi; {outs} add esi, [rsi + 0x77]; mov eax, [rax + 0x77]; "
                                   "out 0x80, al", 64, TEXT))
    machine.boot("long", TEXT)
    machine.write_memory(IDT_BASE + 14 * 16, pack_gate(0x180000, SEL_CODE64, SYS_INT_GATE, long_mode=True))
    machine.write_memory(0x180000, b"\xf4")
    machine["rax"] = 0xFFFF_0FF0
    result = machine.run()
    assert result.stop.reason is StopReason.HLT and result.events[0]["vector"] == 14
    fault_rip = TEXT + 2 + 3 * 6 + 3
    _error_code, rip, _cs, rflags = struct.unpack("<4Q", machine.read_memory(result.regs["rsp"], 32))
    assert rip == fault_rip and fault_rip in machine.sites.armed and rflags == 0x46


SPACED_CPUID = "cpuid\n" + "nop\n" * (MERGE_GAP + 64)        # a range of its own


def test_counted_runs_evict_the_hooks_of_code_that_ran_once():
    # Where instructions are counted every hook costs every instruction (sites.py), so the
    # hooks of code that ran once go.  A routine of 40 CPUIDs far apart (40 ranges) runs,
    # then a loop whose OUT fires each time, then the routine again: every CPUID exits both
    # times, the routine's ranges are evicted during the loop, the loop's is not.
    cold = SPACED_CPUID * 40
    code = asm(f"""
        mov rsp, {STACK_TOP:#x}
        call cold
        mov ecx, {EVICTION_INTERVAL}            # three intervals of instructions
    hot:
        out 0x80, al
        dec ecx
        jnz hot
        call cold
        hlt
    cold:
        {cold}
        ret
    """, 64, TEXT)
    machine = flat_guest(code, ExitCode.CPUID)
    result = machine.run(max_instructions=5 * EVICTION_INTERVAL, timeout=120)
    assert result.stop.reason is StopReason.HLT
    taken = [e["rip"] for e in exits(result) if e["name"] == "cpuid"]
    assert len(taken) == 80 and taken[:40] == taken[40:] and len(set(taken)) == 40
    assert result.stats["unclaimed_port_writes"] == EVICTION_INTERVAL
    # the routine's 40 ranges (and the boot code's) went, in one look; the loop's stayed
    assert 40 <= machine.sites.evictions <= 42 and machine.sites.flushes <= 2, \
        (machine.sites.evictions, machine.sites.flushes)


def test_uncounted_runs_keep_their_hooks():
    # Without a count a hook costs only where it is reached: nothing is evicted.
    code = asm(f"""
        mov rsp, {STACK_TOP:#x}
        {SPACED_CPUID * 3}
        mov ecx, {EVICTION_INTERVAL * 2}
    hot:
        dec ecx
        jnz hot
        hlt
    """, 64, TEXT)
    machine = flat_guest(code, ExitCode.CPUID)
    result = machine.run(timeout=60)
    taken = [e["rip"] for e in exits(result)]
    assert result.stop.reason is StopReason.HLT and len(taken) == 3
    assert machine.sites.evictions == 0 and all(rip in machine.sites.armed for rip in taken)
