"""Campaign ``streams``: random instruction streams in every boot state, plain and as L2.

One run builds a machine from its seed — CPU model, profile, chipset, ``apm_smi``, memory
size, boot state and CPL — fills it with a stream that mixes random bytes with a weighted
table of encodings that reach ringminus's own code (port I/O to the exit, debug and APM
ports, CPUID, the MSRs it keeps, MOV CR, descriptor-table loads and stores, INT n/IRET/HLT,
RSM, the SVM instructions, hypercalls, far transfers, stack and SYSCALL/SYSENTER, string I/O,
self-modifying stores), optionally IVT/IDT handlers and an SMM handler, a random hypercall
filter, SMIs/NMIs/INTRs/INITs at random instruction counts, and runs it — plain, or as L2
under a random intercept set with the caller as L1 (``stop`` or ``skip``) — for a few
bounded run()/resume() rounds.  ``check_run`` is the contract every round must keep.
"""
from __future__ import annotations

import json
import random
import struct
import time

from . import Finding
from ..emulator import StopReason
from ..machine import Machine
from ..arch.control import CR4_DEFINED, EFER_DEFINED
from ..emulator.boot import GDT_BASE, IDT_BASE, PAGE_TABLES, SEL_CODE32, SEL_CODE64
from ..arch.segments import SYS_INT_GATE, SYS_TRAP_GATE, pack_gate
from ..emulator.memory import UnbackedMemory
from ..arch.exceptions import GuestFault
from ..intercepts.controls import LAST_INTERCEPT_BIT, MSR_RANGES, InterceptControls
from ..arch.exitcodes import ExitCode
from ..intercepts.profiles import PROFILES

MB = 1 << 20
RUN_TIMEOUT = 10.0                  # seconds per machine run: 5,000 delivered events take ~0.5 s, 2 s on a busy host
HLT = 0xF4
CODE_AT = {"real": 0x7C00, "protected": 0x100000, "long": 0x100000}
HANDLER_AT = 0x9000                 # exception/interrupt handlers (free in every boot state)
VMCB_AT = 0x200000                  # a page a guest VMRUN/VMLOAD/VMSAVE may name
BIOS_SIZE = 0x10000
SLOW_SETUP = 5.0                    # seconds: setting up a guest must stay cheap (issue 11, costs)

EFER, STAR, LSTAR, SYSENTER_CS, VM_CR, VM_HSAVE_PA = 0xC0000080, 0xC0000081, 0xC0000082, 0x174, 0xC0010114, 0xC0010117
MSRS = (EFER, VM_CR, VM_HSAVE_PA, STAR, LSTAR, 0xC0000084, SYSENTER_CS, 0x175, 0x176, 0x10, 0x1B, 0xC0000100,
        0xC0000101, 0xC0000102, 0xC0010015, 0x277, 0x3A, 0x1D9, 0x1DB, 0x3B)
PORTS = (0xF4, 0xE9, 0xB2, 0xB3, 0x80, 0xCF8, 0xCFC, 0xCFD, 0x402, 0x20, 0x21, 0x40, 0x60, 0x70, 0x71, 0x92)


# -- building encodings -------------------------------------------------------------------------

def interesting_value(rng: random.Random, bits: int = 32) -> int:
    value = rng.choice((0, 1, 2, 0x7F, 0x80, 0xFF, 0xFFFF, 0x8000_0000, 0xFFFF_FFFF, 0x1000, 0xFFF,
                        rng.getrandbits(8), rng.getrandbits(16), rng.getrandbits(32), rng.getrandbits(64),
                        1 << rng.randrange(64), (1 << 63) - 1, 1 << 63, 0xFFFF_FFFF_FFFF_FFFF))
    return value & ((1 << bits) - 1)


def interesting_address(rng: random.Random, ram: int, code: int) -> int:
    return rng.choice((code, code + rng.randrange(64), GDT_BASE, IDT_BASE, PAGE_TABLES, PAGE_TABLES + 0x1000,
                       PAGE_TABLES + 0x2000, 0x7FF00, 0x9EF00, 0x3FE00, 0x38000, 0xA0000, 0xB8000, 0xFFFF,
                       0xFFFE, ram - 1, ram - 2, ram - 8, ram, ram + 0x1000, 0x1000_0000, 0xFFFF_FFF0, 0xFFFF_F000,
                       rng.randrange(ram), rng.getrandbits(32), HANDLER_AT, VMCB_AT))


def mov_imm(bits: int, reg: int, value: int) -> bytes:
    """``mov reg, value`` (reg 0-7: eax ecx edx ebx esp ebp esi edi) in a ``bits``-bit mode."""
    if bits == 64 and value >> 32:
        return bytes([0x48, 0xB8 + reg]) + struct.pack("<Q", value & (2**64 - 1))
    prefix = b"\x66" if bits == 16 else b""
    return prefix + bytes([0xB8 + reg]) + struct.pack("<I", value & 0xFFFF_FFFF)


def absolute(bits: int, reg_field: int, address: int) -> bytes:
    """ModRM (+SIB) + displacement naming ``[address]`` (DS-relative; 64-bit: not RIP-relative)."""
    if bits == 16:
        return bytes([(reg_field << 3) | 6]) + struct.pack("<H", address & 0xFFFF)
    if bits == 32:
        return bytes([(reg_field << 3) | 5]) + struct.pack("<I", address & 0xFFFF_FFFF)
    return bytes([(reg_field << 3) | 4, 0x25]) + struct.pack("<I", address & 0x7FFF_FFFF)


def _io(rng, bits, ctx):
    port = rng.choice(PORTS) if rng.random() < 0.85 else rng.getrandbits(16)
    value = mov_imm(bits, 0, rng.choice((0, 1, 2, 3, 0x80, port & 0xFF, rng.getrandbits(32))))
    form = rng.randrange(4)
    if form == 0 and port < 0x100:
        return value + bytes([rng.choice((0xE6, 0xE7)), port])            # out imm8, al/eax
    if form == 1 and port < 0x100:
        return bytes([rng.choice((0xE4, 0xE5)), port])                    # in al/eax, imm8
    return value + mov_imm(bits, 2, port) + bytes([rng.choice((0xEE, 0xEF, 0xEC, 0xED))])   # dx forms


def _pci_config(rng, bits, ctx):
    """Program the host bridge's SMRAM register or the LPC/PM SMI enables through 0xCF8/0xCFC."""
    target = rng.choice((0x8000_009C, 0x8000_0070, 0x8000_F840, 0x8000_F844, 0x8000_0958, 0x8000_0000,
                         0x8000_0000 | rng.getrandbits(24)))
    value = rng.choice((0x4A << 8, 0x0A << 8, 0x1A << 8, 0x4A << 16, 0x0A << 16, 0x0600, 0x80, 0x02 << 24,
                        rng.getrandbits(32)))
    return (mov_imm(bits, 0, target) + mov_imm(bits, 2, 0xCF8) + b"\xef" + mov_imm(bits, 0, value)
            + mov_imm(bits, 2, 0xCFC + rng.randrange(4)) + bytes([rng.choice((0xEE, 0xEF))]))


def _cpuid(rng, bits, ctx):
    leaf = rng.choice((0, 1, 0x8000_0000, 0x8000_0001, 0x8000_000A, 0x4000_0000, rng.getrandbits(32)))
    return mov_imm(bits, 0, leaf) + mov_imm(bits, 1, rng.getrandbits(8)) + b"\x0f\xa2"


def _msr(rng, bits, ctx):
    msr = rng.choice(MSRS) if rng.random() < 0.8 else rng.getrandbits(32)
    if msr == EFER:
        value = rng.choice((0x1000, 0x1500, 0x500, 0x100, 0xD01, 0x1D01, 0, rng.getrandbits(16), 1 << 12 | 1 << 8))
    elif msr == VM_HSAVE_PA:
        value = rng.choice((VMCB_AT + 0x1000, ctx["ram"] - 0x1000, ctx["ram"], 0x123, 1 << 52, rng.getrandbits(64)))
    elif msr == VM_CR:
        value = rng.choice((0, 0x8, 0x10, 0x18, 0x1F, rng.getrandbits(32)))
    else:
        value = interesting_value(rng, 64)
    code = mov_imm(bits, 1, msr) + mov_imm(bits, 0, value & 0xFFFF_FFFF) + mov_imm(bits, 2, value >> 32)
    return code + (b"\x0f\x30" if rng.random() < 0.6 else b"\x0f\x32")


CR_VALUES = {
    0: lambda rng, ctx: rng.choice((0x11, 0x10, 0x8000_0011, 0x8000_0001, 0x6000_0011, 0x2000_0011, 0x8001_0033,
                                    0xE000_0011, 0x31, 0x1_0000_0011, rng.getrandbits(32))),
    3: lambda rng, ctx: rng.choice((PAGE_TABLES, 0, 0x9000, ctx["ram"] - 0x1000, ctx["ram"], 0x8785_D000, 0x1000_0000,
                                    rng.getrandbits(32) & ~0xFFF, 1 << 52, rng.getrandbits(64))),
    4: lambda rng, ctx: rng.choice((0, 0x20, 0x10, 0x30, 0x200, 0x600, 0x800, 0x1000, 0x20000, 0x40000,
                                    rng.getrandbits(24), 1 << 32)),
    2: lambda rng, ctx: interesting_value(rng, 64),
    8: lambda rng, ctx: rng.getrandbits(4),
}


def _mov_cr(rng, bits, ctx):
    cr = rng.choice((0, 0, 3, 4, 4, 2, 8))
    if rng.random() < 0.2:                                              # read it
        return (b"\x44" if cr == 8 and bits == 64 else b"") + b"\x0f\x20" + bytes([0xC0 | (cr & 7) << 3])
    value = CR_VALUES[cr](rng, ctx)
    if cr == 8 and bits != 64:
        return mov_imm(bits, 0, value) + b"\xf0\x0f\x22\xc0"           # LOCK MOV CR0 = CR8 on AMD
    return mov_imm(bits, 0, value) + (b"\x44" if cr == 8 else b"") + b"\x0f\x22" + bytes([0xC0 | (cr & 7) << 3])


def _descriptor_table(rng, bits, ctx):
    op = rng.randrange(4)                                              # sgdt sidt lgdt lidt
    address = interesting_address(rng, ctx["ram"], ctx["code"])
    code = b"\x0f\x01" + absolute(bits, op, address)
    if op >= 2 and rng.random() < 0.5:                                 # write a pseudo-descriptor first
        limit, base = rng.choice((0xFFFF, 0x47, 0x7FF, 0, 0xFFF)), interesting_address(rng, ctx["ram"], ctx["code"])
        code = (mov_imm(bits, 0, limit | (base & 0xFFFF) << 16) + b"\x89" + absolute(bits, 0, address)
                + mov_imm(bits, 0, base >> 16) + b"\x89" + absolute(bits, 0, address + 4)) + code
    return code


def _system(rng, bits, ctx):
    """The other privileged and system instructions with rows in the decode table."""
    return rng.choice((b"\x0f\x01\xf0", b"\x0f\x06", b"\x0f\x09", b"\x0f\x08", b"\x0f\x31", b"\x0f\x01\xf9",
                       b"\x0f\x33", b"\x0f\x01\xc8", b"\x0f\x01\xc9", b"\x0f\x01\xd1", b"\xf3\x90", b"\x0f\x0b",
                       b"\x0f\x00\xd8", b"\x0f\x00\xd0", b"\x0f\x00\xc8", b"\x0f\x00\xc0", b"\x0f\x01\xe0",
                       b"\x0f\x23\xf8", b"\x0f\x21\xc0", b"\x0f\x23\xc0", b"\x0f\x01\x38", b"\xfa", b"\xfb",
                       b"\xf0\x0f\xa2", b"\xf0\x90", b"\x0f\x01\xfa", b"\x0f\x01\xfc", b"\x0f\x01\xfd", b"\x0f\x01\xfe",
                       b"\x66\x0f\x38\x82\x00", b"\x0f\x01\xd0", b"\x0f\x01\xdf"))


def _interrupts(rng, bits, ctx):
    vector = rng.choice((0, 1, 3, 4, 6, 8, 13, 14, 0x10, 0x13, 0x20, 0x80, 0xFF, rng.getrandbits(8)))
    return rng.choice((bytes([0xCD, vector]), b"\xcc", b"\xce", b"\xf1", b"\x48\xcf" if bits == 64 else b"\xcf",
                       b"\xcf", b"\x66\xcf", b"\xf4", b"\xfb\xf4", b"\xfa\xf4"))


def _svm(rng, bits, ctx):
    address = rng.choice((VMCB_AT, VMCB_AT + 0x10, ctx["ram"] - 0x1000, ctx["ram"], 0x1_0000_0000, 0,
                          rng.getrandbits(32) & ~0xFFF))
    insn = rng.choice((b"\x0f\x01\xd8", b"\x0f\x01\xd9", b"\x0f\x01\xda", b"\x0f\x01\xdb", b"\x0f\x01\xdc",
                       b"\x0f\x01\xdd", b"\x0f\x01\xde", b"\x0f\x01\xdf", b"\x0f\x01\xc1", b"\x0f\xaa",
                       b"\xf0\x0f\x01\xd9", b"\x66\x0f\x01\xd8"))
    return mov_imm(bits, 0, address) + insn


def _hypercall(rng, bits, ctx):
    nr = rng.choice((0, 1, 5, 11, 12, 0x4000_0000, 0x4000_00FF, 0x1_0000_0005, 0xFFFF_FFFF, rng.getrandbits(64)))
    return mov_imm(bits, 0, nr) + mov_imm(bits, 3, rng.getrandbits(32)) + rng.choice((b"\x0f\x01\xd9", b"\x0f\x01\xc1"))


def _far(rng, bits, ctx):
    selector = rng.choice((0x08, 0x10, 0x18, 0x1B, 0x20, 0x28, 0x2B, 0x30, 0x33, 0x38, 0x40, 0, 0xF000,
                           rng.getrandbits(16)))
    target = ctx["code"] + rng.randrange(0, 64)
    form = rng.randrange(5)
    if form == 0:                                                     # jmp far ptr16:16/32 (#UD in 64-bit)
        return b"\xea" + (struct.pack("<HH", target & 0xFFFF, selector) if bits == 16 else
                          struct.pack("<IH", target & 0xFFFF_FFFF, selector))
    if form == 1:                                                     # jmp/call far [mem]
        address = HANDLER_AT + 0x800
        return (mov_imm(bits, 0, target & 0xFFFF_FFFF) + b"\x89" + absolute(bits, 0, address)
                + mov_imm(bits, 0, selector) + b"\x89" + absolute(bits, 0, address + (2 if bits == 16 else 4))
                + b"\xff" + absolute(bits, rng.choice((3, 5)), address))
    if form == 2:                                                     # push selector, target; retf
        return (mov_imm(bits, 0, selector) + b"\x50" + mov_imm(bits, 0, target) + b"\x50"
                + rng.choice((b"\xcb", b"\x48\xcb" if bits == 64 else b"\xcb", b"\xca\x04\x00")))
    if form == 3:                                                     # mov segment register
        return mov_imm(bits, 0, selector) + b"\x8e" + bytes([0xC0 | rng.choice((0, 2, 3, 4, 5)) << 3])
    return mov_imm(bits, 0, selector) + b"\x0f\x00" + bytes([0xC0 | rng.choice((2, 3)) << 3])   # lldt/ltr


def _stack(rng, bits, ctx):
    return rng.choice((b"\x9c", b"\x9d", b"\x50", b"\x58", b"\x6a" + bytes([rng.getrandbits(8)]), b"\x17",
                       b"\x1f", b"\x07", b"\xc9", b"\xc8\x10\x00\x01", b"\x0f\xa1", b"\x0f\xa9", b"\xc3",
                       mov_imm(bits, 4, rng.choice((0, 2, 0x7C00, 0x80000, ctx["ram"], ctx["ram"] + 4,
                                                   0xFFFF_FFFF, rng.getrandbits(32)))),
                       mov_imm(bits, 0, rng.getrandbits(32)) + b"\x50\x9d",        # popf with random flags
                       b"\x66\x9d", b"\x8e\xd0", b"\x8e\xd0\xfb"))


def _syscall(rng, bits, ctx):
    return rng.choice((b"\x0f\x05", b"\x0f\x07", b"\x48\x0f\x07", b"\x0f\x34", b"\x0f\x35", b"\x48\x0f\x35"))


def _string_io(rng, bits, ctx):
    count = rng.choice((0, 1, 2, 3, 0x100, 0xFFFF_FFFF))
    port = rng.choice(PORTS)
    return (mov_imm(bits, 1, count) + mov_imm(bits, 2, port) + mov_imm(bits, 6, interesting_address(rng, ctx["ram"], ctx["code"]))
            + mov_imm(bits, 7, interesting_address(rng, ctx["ram"], ctx["code"]))
            + rng.choice((b"", b"\xf3", b"\xf2", b"\x67", b"\xf3\x67")) + bytes([rng.choice((0x6C, 0x6D, 0x6E, 0x6F))]))


def _self_modify(rng, bits, ctx):
    """A store into the code itself (or the handlers) of a byte that starts something flagged."""
    target = rng.choice((ctx["code"] + rng.randrange(0, 96), HANDLER_AT + rng.randrange(16)))
    value = rng.choice((0xF4, 0xCC, 0x0F, 0xE6, 0xEE, 0xCF, 0x90, 0xAA, 0x01, 0xD8, 0xD9, 0xA2, rng.getrandbits(8)))
    if rng.random() < 0.3:                                            # a whole VMMCALL/RSM/OUT word
        word = rng.choice((0x010F, 0xAA0F, 0xF4E6, 0xA20F))
        return b"\x66" * (bits != 16) + b"\xc7" + absolute(bits, 0, target) + struct.pack("<H", word)
    return b"\xc6" + absolute(bits, 0, target) + bytes([value])


def _jump(rng, bits, ctx):
    return rng.choice((b"\xeb" + bytes([rng.getrandbits(8)]), b"\xeb\xfe", b"\x74\x02", b"\xe2\xfe",
                       b"\xe8\x00\x00" + b"\x00\x00" * (bits != 16)))


def _random_bytes(rng, bits, ctx):
    return rng.randbytes(rng.randint(1, 8))


ENCODINGS = ((_io, 10), (_pci_config, 3), (_cpuid, 4), (_msr, 8), (_mov_cr, 9), (_descriptor_table, 6),
             (_system, 7), (_interrupts, 8), (_svm, 6), (_hypercall, 5), (_far, 5), (_stack, 5),
             (_syscall, 2), (_string_io, 4), (_self_modify, 4), (_jump, 2), (_random_bytes, 12))
_MAKERS, _WEIGHTS = zip(*ENCODINGS)


def random_stream(rng: random.Random, bits: int, ctx: dict, items: int) -> bytes:
    parts = [maker(rng, bits, ctx) for maker in rng.choices(_MAKERS, _WEIGHTS, k=items)]
    tail = rng.choice((b"\xf4", b"\xe6\xf4", b"\xeb\xfe", b"", rng.randbytes(4)))
    return b"".join(parts) + tail


# -- the contract of one run() ------------------------------------------------------------------

def check_run(machine: Machine, result, requested_stop: bool = False, before: tuple[int, int] | None = None,
              halt_anywhere: bool = False, reserved_ok: bool = False, budget: int | None = None) -> None:
    """What every run must keep (issue 11): a StopReason; JSON-serialisable results; an
    honest ``hlt`` (RIP just past a HLT byte); no reserved bits in CR0/CR4/EFER (RSM and
    VMRUN refuse such a state, so the CPU must never hold one); a ``shutdown`` that says why;
    ``stopped`` only when someone asked; a vmexit stop with its exit record; and a run that
    ends by its ``max_instructions``, not by its timeout, when events pile up and no
    instruction retires.

    ``before``: instructions and events when this run started (the instruction count is
    exact in these runs); ``budget``: its ``max_instructions`` (a timeout that came first
    on a busy host, before the events reached it, proves nothing).  ``halt_anywhere``: an RSM with auto-HALT restart may have halted
    the CPU at any RIP.  ``reserved_ok``: the state came from a map Python wrote, restored by
    a profile that checks nothing (QEMU's RSM loads what it reads)."""
    stop = result.stop
    if not isinstance(stop.reason, StopReason):
        raise Finding("contract", f"stop reason {stop.reason!r} is not a StopReason", key="stop reason type")
    try:
        json.dumps(result.as_dict())
    except (TypeError, ValueError) as error:
        raise Finding("contract", f"result.as_dict() is not JSON: {error}", key="result not JSON") from error
    if stop.reason is StopReason.HLT and not halt_anywhere:
        linear = (machine.cpu.segment("cs").base + stop.rip - 1) & 0xFFFF_FFFF_FFFF_FFFF
        try:
            byte = machine.linear.read(linear, 1)[0]
        except (GuestFault, UnbackedMemory):
            byte = None     # the guest broke its paging after the fetch (a stale TLB ran the HLT): unknown
        if byte is not None and byte != HLT:
            raise Finding("contract", f"hlt stop at rip {stop.rip:#x} but the byte before it ({linear:#x}) is "
                          f"{byte:#04x}, not HLT", key="hlt stop without a HLT")
    regs = result.regs
    for name, reserved in (("cr4", ~CR4_DEFINED), ("efer", ~EFER_DEFINED), ("cr0", ~0xFFFF_FFFF)):
        if regs[name] & reserved and not reserved_ok:
            raise Finding("contract", f"{name.upper()} = {regs[name]:#x} holds reserved bits "
                          f"{regs[name] & reserved:#x} at rip {stop.rip:#x}", key=f"{name.upper()} holds reserved bits")
    if stop.reason is StopReason.SHUTDOWN and not stop.detail:
        raise Finding("contract", f"shutdown at rip {stop.rip:#x} without a reason", key="shutdown without reason")
    if stop.reason is StopReason.STOPPED and not requested_stop:
        raise Finding("contract", f"'stopped' at rip {stop.rip:#x} though nothing requested a stop "
                      f"(detail {stop.detail!r})", key="unrequested stopped")
    if stop.reason is StopReason.VMEXIT and (result.vmexit is None or result.vmexit["code"] != stop.value):
        raise Finding("contract", f"vmexit stop value {stop.value} without a matching exit record",
                      key="vmexit record")
    if stop.reason is StopReason.TIMEOUT and before is not None and result.instructions is not None:
        retired, events = result.instructions - before[0], len(result.event_log) - before[1]
        if (retired < 10 or events > 3 * retired + 10) and (budget is None or events > budget):
            raise Finding("contract", f"a run bounded by max_instructions ended by its timeout at rip "
                          f"{stop.rip:#x}: {retired} instructions retired, {events} events (last "
                          f"{_describe(result.event_log[-1]) if result.event_log else None})",
                          key="max_instructions does not bound a loop that retires nothing")


def _describe(event) -> str:
    if isinstance(event, dict):
        return " ".join(f"{k}={v:#x}" if isinstance(v, int) and k != "vector" else f"{k}={v}" for k, v in event.items())
    return f"vmexit {event.name} at {event.rip:#x}"


# -- one run ------------------------------------------------------------------------------------

def _handlers(rng: random.Random, machine: Machine, state: str, bits: int, ctx: dict) -> None:
    """IVT or IDT entries pointing at a small handler, as a guest OS would have."""
    iret = b"\x48\xcf" if bits == 64 else b"\xcf"
    pop_error = {16: b"\x83\xc4\x02", 32: b"\x83\xc4\x04", 64: b"\x48\x83\xc4\x08"}[bits]
    handler = rng.choice((iret, pop_error + iret, b"\xf4" + iret, b"\xfb" + iret, b"\xe6\xf4",
                          random_stream(rng, bits, ctx, rng.randint(1, 4)) + iret))
    machine.write_memory(HANDLER_AT, handler)
    if state in ("real", "bios"):
        machine.write_memory(0, struct.pack("<HH", HANDLER_AT, 0) * 256)
        return
    long_mode = state == "long"
    selector = SEL_CODE64 if long_mode else SEL_CODE32
    gates = b"".join(pack_gate(HANDLER_AT, rng.choice((selector,) * 6 + (0x18, 0x38, 0)),
                               rng.choice((SYS_INT_GATE, SYS_TRAP_GATE)), dpl=rng.choice((0, 3, 3)),
                               present=rng.random() < 0.95, ist=rng.choice((0, 0, 0, 1)) if long_mode else 0,
                               long_mode=long_mode) for _ in range(256))
    machine.write_memory(IDT_BASE, gates)


PD_32, PT_32, PDPT_PAE, PD_PAE, PT_LONG = 0x20000, 0x21000, 0x22000, 0x23000, 0x24000   # free in the system area
PRESENT, WRITABLE, USER, LARGE, NX = 1, 2, 4, 0x80, 1 << 63


def _spoil(rng: random.Random, entry: int) -> int:
    """A page-table entry made not present, read-only, supervisor-only, NX, reserved-bit or
    pointing elsewhere: the walks ringminus does itself at armed sites must cope."""
    return rng.choice((entry & ~PRESENT, entry & ~WRITABLE, entry & ~USER, entry | NX, entry | (1 << 51),
                       (entry & 0xFFF) | rng.getrandbits(32) & ~0xFFF, entry & ~LARGE, 0))


def _paging(rng: random.Random, machine: Machine, state: str) -> None:
    """Paging the guest did not build: 32-bit (PSE), PAE or a changed long-mode identity
    map, each with a few spoiled entries."""
    ram, spoiled = machine.memory.ram_size, rng.randint(0, 4)
    if state == "protected" and rng.random() < 0.5:                  # 32-bit paging, 4 MiB pages
        pd = [(i << 22) | PRESENT | WRITABLE | USER | LARGE for i in range(1024)]
        pd[0] = PT_32 | PRESENT | WRITABLE | USER                      # the first 4 MiB in 4 KiB pages
        pt = [(i << 12) | PRESENT | WRITABLE | USER for i in range(1024)]
        for _ in range(spoiled):
            table = rng.choice((pd, pt, pt))
            index = rng.choice((0, 1, 0x100 >> (10 if table is pd else 0), rng.randrange(1024)))
            table[index] = _spoil(rng, table[index]) & 0xFFFF_FFFF
        machine.write_memory(PD_32, struct.pack("<1024I", *pd))
        machine.write_memory(PT_32, struct.pack("<1024I", *pt))
        machine["cr3"], machine["cr4"] = PD_32, machine["cr4"] | 0x10
    elif state == "protected":                                         # PAE, 2 MiB pages
        machine.write_memory(PDPT_PAE, struct.pack("<4Q", *((PD_PAE + 0x1000 * i) | PRESENT for i in range(4))))
        pds = [(i << 21) | PRESENT | WRITABLE | USER | LARGE for i in range(2048)]
        for _ in range(spoiled):
            index = rng.choice((0, rng.randrange(2048)))
            pds[index] = _spoil(rng, pds[index])
        if 0x1000 * 4 + PD_PAE <= ram:
            machine.write_memory(PD_PAE, struct.pack("<2048Q", *pds))
        machine["cr3"], machine["cr4"] = PDPT_PAE, machine["cr4"] | 0x20
    else:                                                              # long mode: change the identity map
        pd_base = PAGE_TABLES + 0x2000
        pd = list(struct.unpack("<512Q", machine.read_memory(pd_base, 0x1000)))
        pt = [(i << 12) | PRESENT | WRITABLE | USER for i in range(512)]
        pd[0] = PT_LONG | PRESENT | WRITABLE | USER
        for _ in range(spoiled):
            table = rng.choice((pd, pt))
            index = rng.choice((0, 1, 8, rng.randrange(512)))
            table[index] = _spoil(rng, table[index])
        machine.write_memory(PT_LONG, struct.pack("<512Q", *pt))
        machine.write_memory(pd_base, struct.pack("<512Q", *pd))
        if rng.random() < 0.5:
            machine["efer"] = machine["efer"] | 0x800                  # NXE: bit 63 is NX, not reserved
        return
    machine["cr0"] = machine["cr0"] | 0x8000_0000 | (0x1_0000 if rng.random() < 0.5 else 0)


def _controls(rng: random.Random) -> InterceptControls:
    controls = InterceptControls()
    codes = [code for code in ExitCode if 0 <= code <= LAST_INTERCEPT_BIT]
    if rng.random() < 0.1:
        controls.set_all()
    else:
        controls.set(*rng.sample(codes, rng.randint(0, 40)))
    for _ in range(rng.randint(0, 3)):
        first = rng.choice(PORTS) if rng.random() < 0.7 else rng.getrandbits(16)
        controls.set_ports(first, min(0xFFFF, first + rng.randrange(4)))
    for _ in range(rng.randint(0, 3)):
        base, _offset = rng.choice(MSR_RANGES)
        msr = rng.choice(MSRS) if rng.random() < 0.6 else base + rng.randrange(0x2000)
        if any(first <= msr < first + 0x2000 for first, _ in MSR_RANGES):
            controls.set_msr(msr, read=rng.random() < 0.5, write=rng.random() < 0.7)
    return controls


def _hypercall_filter(rng: random.Random, machine: Machine) -> None:
    taken: list[tuple[int, int]] = []
    for _ in range(rng.randint(0, 3)):
        base, count = rng.choice(((0, 16), (1, 1), (5, 1), (11, 1), (12, 1), (0x4000_0000, 0x100),
                                  (0xFFFF_FFFF, 2), (rng.getrandbits(32), rng.randint(1, 1 << 20))))
        if any(base < end and start < base + count for start, end in taken) or base + count > 1 << 64:
            continue
        machine.hypercalls.add(base, count, rng.choice(("handle", "deny", "forward")))
        taken.append((base, base + count))
    if rng.random() < 0.3:
        answers = [rng.choice((0, 1, None, 2**64 - 1, rng.getrandbits(64))) for _ in range(4)]
        machine.hypercalls.handler = lambda call: answers[call.nr % 4]


EVENTS = (("smi", 4), ("nmi", 3), ("intr", 3), ("init", 1))


def _schedule_events(rng: random.Random, machine: Machine, budget: int) -> None:
    names, weights = zip(*EVENTS)
    for name in rng.choices(names, weights, k=rng.choice((0, 0, 1, 2, 3, 5))):
        at = rng.randrange(0, budget + 1)
        if name == "smi":
            machine.at_instruction(at, lambda m: m.raise_smi())
        elif name == "nmi":
            machine.at_instruction(at, lambda m: m.raise_nmi())
        elif name == "init":
            machine.at_instruction(at, lambda m: m.raise_init())
        else:
            vector = rng.choice((0x20, 0x21, 0x30, 0x80, 0xFF, 8, 14, rng.getrandbits(8)))
            machine.at_instruction(at, lambda m, v=vector: m.raise_intr(v))


def build(rng: random.Random) -> tuple[Machine, dict]:
    """A machine in a random configuration and boot state, loaded and ready to run."""
    cpu_model = rng.choice(("qemu64", "qemu32"))
    states = ["real", "protected", "bios"] + (["long"] if cpu_model == "qemu64" else [])
    state = rng.choice(states)
    ram = rng.choice((2 * MB, 4 * MB, 16 * MB, 64 * MB))
    machine = Machine(memory_size=ram, cpu_model=cpu_model, chipset=rng.choice(("q35", "pc")),
                      profile=rng.choice(sorted(PROFILES)), apm_smi=rng.random() < 0.5,
                      exact_instructions=rng.random() < 0.2)
    cpl = rng.choice((0, 0, 3)) if state in ("protected", "long") else 0
    bits = {"real": 16, "bios": 16, "protected": 32, "long": 64}[state]
    code_at = 0xFFFF_0000 if state == "bios" else CODE_AT[state]
    ctx = {"ram": ram, "code": code_at if state != "bios" else 0, "state": state, "cpl": cpl, "bits": bits}
    code = random_stream(rng, bits, ctx, rng.randint(1, 24))
    if state == "bios":                   # the stream at the ROM's start; the reset vector jumps to it
        # Mostly zero fill; a ROM full of HLTs is the dense-sites cost case of issue 11.
        rom = bytearray(code[:BIOS_SIZE - 16].ljust(BIOS_SIZE, rng.choice((b"\0",) * 9 + (b"\xf4",))))
        rom[0xFFF0:0xFFF3] = b"\xe9" + struct.pack("<H", (0 - 0xFFF3) & 0xFFFF)
        machine.load_bios(bytes(rom))
        machine.boot("bios")
    else:
        machine.write_memory(code_at, code)
        machine.boot(state, code_at, cpl)
    if rng.random() < 0.6:
        _handlers(rng, machine, state, bits, ctx)
    if state in ("protected", "long") and rng.random() < 0.35:
        _paging(rng, machine, state)
    if rng.random() < 0.7:                # the SMM handler at the reset SMBASE + 0x8000
        smm_code = rng.choice((b"\x0f\xaa", b"\x0f\xaa", b"\x90\x0f\xaa", b"\xe6\xf4", b"\xf4\x0f\xaa",
                               random_stream(rng, 16, ctx, rng.randint(1, 3)) + b"\x0f\xaa"))
        machine.write_memory(0x38000, smm_code)
    if rng.random() < 0.4 and VMCB_AT + 0x1000 <= ram:
        machine.write_memory(VMCB_AT, rng.randbytes(0x1000) if rng.random() < 0.3 else bytes(0x1000))
    _hypercall_filter(rng, machine)
    ctx["code_bytes"] = code
    return machine, ctx


def one_run(seed: int) -> None:
    rng = random.Random(seed)
    machine, ctx = build(rng)
    budget = rng.choice((50, 200, 1000, 5000))
    _schedule_events(rng, machine, budget)
    slow_setup = None
    if rng.random() < 0.5:
        started = time.monotonic()
        machine.enter_guest(_controls(rng), rng.choice(sorted(PROFILES)), rng.choice(("stop", "skip")))
        elapsed = time.monotonic() - started
        if elapsed > SLOW_SETUP:          # reported after the runs, which matter more
            slow_setup = Finding("contract", f"enter_guest took {elapsed:.1f} s ({len(machine.sites.armed)} code "
                                 "sites armed)", key="enter_guest arming cost")
    requested = {"stop": False}
    if rng.random() < 0.1:
        at = rng.randrange(budget)

        def stop_now(m: Machine) -> None:
            requested["stop"] = True
            m.request_stop()
        machine.at_instruction(at, stop_now)
    before = (machine.instructions, len(machine.events))
    result = machine.run(max_instructions=budget, timeout=RUN_TIMEOUT)
    check_run(machine, result, requested["stop"], before, budget=budget)
    for _ in range(rng.randint(0, 4)):
        reason = result.stop.reason
        if reason is StopReason.VMEXIT and rng.random() < 0.7:
            machine.skip_instruction()
        elif reason is StopReason.HLT and rng.random() < 0.5:
            machine.raise_intr(rng.getrandbits(8))
        elif reason not in (StopReason.VMEXIT, StopReason.HYPERCALL, StopReason.LIMIT, StopReason.STOPPED,
                            StopReason.BREAKPOINT, StopReason.HLT):
            break
        before = (machine.instructions, len(machine.events))
        if reason is StopReason.HYPERCALL and rng.random() < 0.8:
            result = machine.resume(ret=rng.choice((None, 0, 1, rng.getrandbits(64))),
                                    max_instructions=budget, timeout=RUN_TIMEOUT)
        else:
            result = machine.run(max_instructions=budget, timeout=RUN_TIMEOUT)
        check_run(machine, result, requested["stop"], before, budget=budget)
    if slow_setup is not None:
        raise slow_setup
