"""The conduit: VMMCALL and VMCALL executed outside guest mode, with ringminus as the host
hypervisor (semantics.md §D.2 for the ABI, §D.3 for the mapping, §F.20 for arm64's
differences).

KVM's x86 ABI: number in RAX, arguments in RBX, RCX, RDX, RSI, all truncated to 32 bits
outside 64-bit mode (compatibility mode included); CPL ≠ 0 gets −KVM_EPERM before the number
is looked at; the result goes to RAX (as a u32 outside 64-bit mode) and RIP moves past the
instruction.  Between the CPL check and the built-ins sits the filter (filter.py).  A
forwarded call without a handler stops the run with RIP still at the instruction, as KVM's
KVM_EXIT_HYPERCALL does; completing it (``Machine.resume``) writes RAX and advances RIP.

In guest mode none of this runs: the L1 intercept decides, then #UD (§D.3 point 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING

from ..decode.decoder import decode
from ..emulator.delivery import Event, EventKind
from ..emulator.memory import UnbackedMemory
from ..emulator.result import StopReason
from ..arch.exceptions import GuestFault, SecondStageFault, Vector
from .filter import HypercallAction

if TYPE_CHECKING:
    from ..decode.decoder import Instruction
    from ..machine import Machine

# include/uapi/linux/kvm_para.h
KVM_EPERM = 1
KVM_ENOSYS = 1000
VMMCALL = bytes.fromhex("0f01d9")
CONDUITS = frozenset({"vmmcall", "vmcall"})       # decode-table rows that are hypercalls
ARGUMENT_REGISTERS = ("rbx", "rcx", "rdx", "rsi")


class KvmHypercall(IntEnum):
    """KVM_HC_* (kvm_para.h; semantics.md §D.2)."""
    VAPIC_POLL_IRQ = 1
    MMU_OP = 2
    FEATURES = 3
    PPC_MAP_MAGIC_PAGE = 4
    KICK_CPU = 5
    MIPS_GET_CLOCK_FREQ = 6
    MIPS_EXIT_VM = 7
    MIPS_CONSOLE_OUTPUT = 8
    CLOCK_PAIRING = 9
    SEND_IPI = 10
    SCHED_YIELD = 11
    MAP_GPA_RANGE = 12


# The ``handle`` action: the KVM x86 hypercalls that make sense without a host kernel, and
# what KVM returns for them.  Every other number gets −KVM_ENOSYS — including CLOCK_PAIRING
# (needs the host clock), SEND_IPI (needs a local APIC) and MAP_GPA_RANGE (KVM answers
# −KVM_ENOSYS unless userspace enabled KVM_CAP_EXIT_HYPERCALL: forward it to model that).
BUILTIN_RESULTS: dict[int, int] = {
    KvmHypercall.VAPIC_POLL_IRQ: 0,     # returns 0, no other effect
    KvmHypercall.KICK_CPU: 0,           # wakes a halted vCPU by APIC ID: the only vCPU is running
    KvmHypercall.SCHED_YIELD: 0,        # a hint to the host scheduler
}


# What ringminus answers itself, per action (§D.3 point 6); FORWARD asks the user instead.
OWN_ANSWERS = {
    HypercallAction.HANDLE: lambda nr: BUILTIN_RESULTS.get(nr, -KVM_ENOSYS),
    HypercallAction.DENY: lambda nr: -KVM_ENOSYS,
}
IP_MASK = {16: 0xFFFF, 32: 0xFFFF_FFFF, 64: 0xFFFF_FFFF_FFFF_FFFF}     # by code-segment size


class HypercallHandlerError(RuntimeError):
    """The user's forward handler raised, or returned something other than an int or None."""


@dataclass(frozen=True)
class Hypercall:
    """A forwarded call, as the user handler and a ``hypercall`` stop see it (KVM's
    ``run->hypercall``, with arm64's conduit flag as a name)."""
    nr: int                         # RAX (32 bits outside 64-bit mode)
    args: tuple[int, int, int, int]  # RBX, RCX, RDX, RSI (likewise truncated)
    conduit: str                    # "vmmcall", or "vmcall": the guest issued the Intel encoding
    long_mode: bool                 # 64-bit mode (KVM_EXIT_HYPERCALL_LONG_MODE)
    cpl: int
    rip: int                        # the instruction

    def as_dict(self) -> dict:
        return {"nr": self.nr, "args": list(self.args), "conduit": self.conduit,
                "long_mode": self.long_mode, "cpl": self.cpl, "rip": self.rip}


@dataclass(frozen=True)
class PendingHypercall:
    """A forwarded call the run stopped at, waiting for ``Machine.resume(ret=…)``."""
    call: Hypercall
    next_rip: int
    event_index: int                # its record in machine.events, completed with the result


def _mask(long_mode: bool) -> int:
    return 0xFFFF_FFFF_FFFF_FFFF if long_mode else 0xFFFF_FFFF


def read_call(machine: "Machine", insn: "Instruction", conduit: str) -> Hypercall:
    long_mode = insn.bits == 64
    mask = _mask(long_mode)
    cpu = machine.cpu
    return Hypercall(cpu["rax"] & mask, tuple(cpu[r] & mask for r in ARGUMENT_REGISTERS), conduit,
                     long_mode, cpu.cpl, insn.address)


def execute(machine: "Machine", insn: "Instruction") -> None:
    """A VMMCALL or VMCALL outside guest mode, reached through Unicorn's #UD trap."""
    if insn.prefixes.lock:                      # no hypercall instruction is lockable
        machine.deliver(Event(Vector.UD, EventKind.EXCEPTION, insn.address))
        return
    conduit = insn.row.name
    if conduit == "vmcall":
        insn = _emulate_vmcall(machine, insn)
        if insn is None:
            return
    call = read_call(machine, insn, conduit)
    next_rip = insn.next_rip & IP_MASK[insn.bits]
    machine.stats["hypercalls"] += 1            # KVM's stat.hypercalls: once per call
    if call.cpl != 0:                           # before any lookup, as KVM (§D.2, §F.20)
        _finish(machine, call, next_rip, "eperm", -KVM_EPERM)
        return
    action = machine.hypercalls.action(call.nr)
    answer = OWN_ANSWERS.get(action)
    if answer is not None:
        _finish(machine, call, next_rip, action.label, answer(call.nr))
    elif machine.hypercalls.handler is None:    # KVM_EXIT_HYPERCALL: RIP stays at the call
        machine.pending_hypercall = PendingHypercall(call, next_rip, len(machine.events))
        machine.events.append(_record(call, action.label, None))
        machine.request_stop(StopReason.HYPERCALL, call.nr)
    else:
        value = _ask(machine.hypercalls.handler, call)
        _finish(machine, call, next_rip, action.label, value)
        machine.restamp_stop()                  # if the handler asked to stop: after the call


def complete(machine: "Machine", pending: PendingHypercall, ret: int | None) -> None:
    """Finish a forwarded call with the user's answer (None: declined, −KVM_ENOSYS)."""
    if ret is not None and not isinstance(ret, int):
        raise TypeError(f"resume(ret=…) takes an int for RAX, or None to decline; not {type(ret).__name__}")
    value = -KVM_ENOSYS if ret is None else ret
    _finish(machine, pending.call, pending.next_rip, HypercallAction.FORWARD.label, value, pending.event_index)


def _ask(handler, call: Hypercall) -> int:
    try:
        ret = handler(call)
    except Exception as e:
        raise HypercallHandlerError(f"hypercall handler failed on nr {call.nr:#x} at rip {call.rip:#x}: "
                                    f"{type(e).__name__}: {e}") from e
    return -KVM_ENOSYS if ret is None else _checked(ret, call)


def _checked(ret, call: Hypercall) -> int:
    if not isinstance(ret, int):
        raise HypercallHandlerError(f"hypercall handler returned {type(ret).__name__} for nr {call.nr:#x}: "
                                    "expected an int for RAX, or None to decline")
    return ret


def _record(call: Hypercall, action: str, result: int | None) -> dict:
    return {"kind": "hypercall", "rip": call.rip, "conduit": call.conduit, "nr": call.nr,
            "action": action, "result": result}


def _finish(machine: "Machine", call: Hypercall, next_rip: int, action: str, value: int,
            event_index: int | None = None) -> None:
    """RAX := value (a u32, zero-extended, outside 64-bit mode), RIP past the call, one
    instruction retired, the call in ``events``."""
    result = value & _mask(call.long_mode)
    machine.cpu["rax"] = result
    machine.cpu.rip = next_rip
    machine.retire(1)
    record = _record(call, action, result)
    if event_index is None:
        machine.events.append(record)
    elif event_index < len(machine.events):     # a new dict: results taken at the stop keep what they saw
        machine.events[event_index] = record


def _emulate_vmcall(machine: "Machine", insn: "Instruction") -> "Instruction | None":
    """VMCALL (the Intel encoding) on this AMD machine, per the profile (§D.2): #UD (APM,
    QEMU), or KVM's emulation — ``Priv``, so #GP(0) at CPL > 0, else the three bytes at
    CS:RIP become VMMCALL and the guest re-executes them (FIX_HYPERCALL_INSN quirk).  The
    re-execution happens here, at once: returns the instruction to run as the call (the
    VMMCALL now at RIP; the VMCALL itself if the bytes could not change, e.g. in ROM), or
    None when an exception was delivered."""
    rip = insn.address
    if not machine.profile.vmcall_fix_hypercall:
        machine.deliver(Event(Vector.UD, EventKind.EXCEPTION, rip))
        return None
    if machine.cpu.cpl != 0:
        machine.deliver(Event(Vector.GP, EventKind.EXCEPTION, rip, 0))
        return None
    linear = (machine.cpu.segment("cs").base + rip) & _mask(insn.bits == 64)
    try:
        _write_code(machine, linear, VMMCALL)
    except GuestFault as fault:             # a write-protected page: the guest sees the #PF
        machine.deliver(Event(fault.vector, EventKind.EXCEPTION, rip, fault.error_code, fault.cr2))
        return None
    except SecondStageFault as fault:       # its hypervisor's nested tables refuse the write
        machine.gate.take_exit(machine.gate.second_stage_exit(fault, None, rip))
        return None
    except UnbackedMemory:
        return insn
    code = machine.linear.fetch(linear, 15)
    patched = decode(code, insn.bits, rip) if code else None
    return patched if patched is not None and patched.row.name == "vmmcall" else insn


def _write_code(machine: "Machine", linear: int, data: bytes) -> None:
    """Write instruction bytes as a CPL-0 write through the guest's paging.  ROM keeps its
    bytes (the write is dropped, as QEMU drops it); elsewhere Unicorn drops the
    translations over them.  Code sites need no rescan: VMCALL and VMMCALL share the
    0F 01 opcode the sites are armed on."""
    first = min(len(data), 0x1000 - (linear & 0xFFF))
    pieces = [(linear, data[:first]), (linear + first, data[first:])] if first < len(data) else [(linear, data)]
    targets = [(machine.linear.translate(address, write=True), chunk) for address, chunk in pieces]
    for physical, chunk in targets:
        if machine.memory.read_only(physical):
            machine.stats["rom_writes_ignored"] += 1
        else:
            machine.memory.write(physical, chunk)
    machine.linear.flush()
