"""Run a vector through a generated in-guest L1: a small hypervisor image that VMRUNs the
vector's code as its L2, so the #VMEXIT is the core's world switch (APM §15.5-§15.6), not
the host-side ``enter_guest``.

How the image is made, per vector:

1. ``runner.setup`` prepares the L2 exactly as the host-side harness does (boot state, code,
   paging, memory bytes, registers, the breakpoint after the code).
2. That CPU state becomes the VMCB's save area (segments with hidden parts, GDTR/IDTR,
   CR0/2/3/4, EFER with SVME, RFLAGS, RIP, RSP, RAX, DR6/7, CPL, the VMLOAD MSRs); the
   vector's intercepts (VMRUN's included: ``runner.controls_for``), exception bitmap, IOPM and MSRPM
   become its control area, with ASID 1.  The GPRs VMRUN does not load go into L1's code.
3. The machine boots L1 in long mode at CPL 0.  That boot writes its tables over the L2's
   low memory (GDT 0x1000, TSS 0x1100, IDT 0x4000, page tables 0x10000 -- a protected-mode
   L2 has 8-byte IDT gates and a 32-bit TSS there), so L1 takes copies of its GDT, IDT and
   page tables in its own region at the top of RAM, and every low-memory page the boot
   changed gets the L2's bytes back.
4. L1's code: EFER.SVME on (RDMSR/OR/WRMSR), VM_HSAVE_PA, VMLOAD (FS, GS, TR, LDTR and the
   syscall MSRs, which VMRUN does not load), the L2's GPRs, VMRUN; after the #VMEXIT it
   writes L1_DONE to the exit port.

VMRUN refuses EFER.SVME clear (§B.5), and most vectors leave it clear.  Such an L2 starts at
CPL 0 in a stub at L2_STUB that writes the vector's EFER with WRMSR, restores the registers
WRMSR used, and jumps to the code (CPL 0) or far-returns to it (CPL 3: RETF has no intercept,
IRET has).  A vector this L1 cannot run as written is reported as a SKIP that says why: its
intercepts or state would catch the stub (STUB_CONFLICTS); VMRUN refuses its state for another
reason (say EFER.LME and CR0.PG without CR4.PAE, which the host-side L1 would load unchecked);
or the stub does not bring the L2 to the vector's first instruction in exactly the vector's
state -- checked there, register by register, as the stub's last instruction retires (RF
cannot survive the stub, 16/32-bit code cannot restore bits 63:32 of the registers WRMSR
uses, a real-mode far jump cannot restore a CS base other than selector × 16, and the stub
cannot run where the vector's paging does not map it).
"""
from __future__ import annotations

import struct
import time
from dataclasses import dataclass

import numpy as np

from ..emulator.boot import RING0_STACK_TOP, SEL_CODE32, SEL_CODE64, SEL_DATA, SYSTEM_AREA, BootState
from ..arch.control import CR0_PG, CR4_SMAP, CR4_SMEP, EFER_SVME, MSR_EFER, RFLAGS_TF
from ..arch.registers import GPRS
from ..arch.segments import Segment, unpack_descriptor
from ..emulator.ports import EXIT_PORT
from ..emulator.result import StopReason
from ..intercepts.controls import IOPM_BYTES, MSRPM_BYTES
from ..arch.exitcodes import ExitCode
from ..intercepts.vmcb import (GUEST_INSTRUCTION_COUNT_MASK, MSR_VM_HSAVE_PA, VMCB_SIZE, new_vmcb,
                               set_intercept_vector, vmcb_view, write_segment)
from ..svm.vmload import MSRS as VMLOAD_MSRS
from .runner import EXCEPTION_EVENTS, MAX_INSTRUCTIONS, TIMEOUT, NotRunnable, Setup, l2_outcome, setup, vmexit_outcome
from .vectors import Outcome, TestVector, assemble_text

PAGE = 0x1000
L1_REGION = 1 << 20                       # at the top of RAM, out of every vector's way
L1_DONE = 0x4C                            # what L1 writes to the exit port after its #VMEXIT
# The SVME-clearing entry stub: the page above the ring-0 stack's top, which no boot state
# uses, and out of segment 0, which a real-mode L2 running on past its code wraps around in.
L2_STUB = RING0_STACK_TOP
L2_STUB_SIZE = 0x100
# L1's region, offsets from its base: (name, offset, size)
L1_LAYOUT = (
    ("code", 0x0000, PAGE),
    ("vmcb", 0x1000, VMCB_SIZE),
    ("hsave", 0x2000, PAGE),
    ("iopm", 0x3000, IOPM_BYTES),
    ("msrpm", 0x6000, MSRPM_BYTES),
    ("gdt", 0x8000, PAGE),
    ("idt", 0x9000, PAGE),
    ("stack", 0xA000, 0x6000),            # L1 pushes nothing; VMRUN saves its RSP
    ("page_tables", 0x10000, L1_REGION - 0x10000),
)
VMCB_SEGMENTS = ("es", "cs", "ss", "ds", "fs", "gs", "ldtr", "tr")
VMCB_REGISTERS = ("cr0", "cr2", "cr3", "cr4", "dr6", "dr7", "rflags", "rip", "rsp", "rax")
L1_LOADS_GPRS = tuple(name for name in GPRS if name not in ("rax", "rsp"))   # VMRUN loads those two
STUB_SCRATCH = ("rax", "rcx", "rdx")      # what WRMSR uses
ENTRY_PRESENT, ENTRY_LARGE = 1, 0x80
ENTRY_ADDRESS = 0x000F_FFFF_FFFF_F000

L1_SOURCE = """
    mov ecx, {efer:#x}
    rdmsr
    or eax, {svme:#x}
    wrmsr
    mov ecx, {hsave_msr:#x}
    mov eax, {hsave_low:#x}
    mov edx, {hsave_high:#x}
    wrmsr
    mov rax, {vmcb:#x}
    vmload rax
{gprs}
    mov rax, {vmcb:#x}
    vmrun rax
    mov al, {done:#x}
    out {port:#x}, al
    hlt
"""
STUB_SOURCE = """
    mov ecx, {efer:#x}
    mov eax, {low:#x}
    mov edx, {high:#x}
    wrmsr
{restore}
"""                                       # then the way to the code (_enter_through_stub)


class Layout:
    """Where L1's pieces sit: an attribute per L1_LAYOUT row."""

    def __init__(self, ram_size: int):
        self.base = ram_size - L1_REGION
        for name, offset, size in L1_LAYOUT:
            setattr(self, name, self.base + offset)
            setattr(self, f"{name}_end", self.base + offset + size)


@dataclass(frozen=True)
class GeneratedL1:
    layout: Layout
    done_rip: int                # where the run stops once L1 has signalled (after its OUT)
    start: int = 0               # linear address of the vector's first instruction
    wanted: dict | None = None   # the L2 registers the vector asks for (RunResult.regs form)
    stub_leave: int | None = None  # linear address of the entry stub's jump to the code; None: no stub

    def run(self, machine, max_instructions: int = MAX_INSTRUCTIONS, timeout: float = TIMEOUT) -> Outcome:
        """Run L1 and its L2, at most ``max_instructions`` between them.  A vector this L1
        cannot run as written is NotRunnable: VMRUN refuses its state, or the entry stub does
        not bring the L2 to the vector's code in the vector's state (checked as the stub's
        last instruction retires)."""
        first, deadline = machine.instructions, time.monotonic() + timeout

        def run_on(count: int | None = None):
            left = max_instructions - (machine.instructions - first)
            return machine.run(max_instructions=max(min(left, count or left), 0),
                               timeout=max(deadline - time.monotonic(), 0.001))

        if self.stub_leave is not None:
            machine.break_at(self.stub_leave)
        result = run_on()
        refused = next((e for e in result.events if e.get("kind") == "vmrun-invalid"), None)
        if refused is not None:        # the L2's own VMRUN is always intercepted: this was L1's
            raise NotRunnable(f"via guest: VMRUN refuses the L2's state: {refused['reason']} (APM §15.5.1)")
        if self.stub_leave is None:
            return self.observe(machine, result)
        if not self._at(result, StopReason.BREAKPOINT, self.stub_leave):
            outcome = self.observe(machine, result)
            if outcome.kind == "stop" and outcome.fields.get("reason") == "l1":
                return outcome
            raise NotRunnable(f"via guest: the L2 entry stub did not reach its end "
                              f"({outcome.kind} {outcome.describe()})")
        result = run_on(1)
        if not self._at(result, StopReason.LIMIT, self.start):
            outcome = self.observe(machine, result)
            raise NotRunnable(f"via guest: the L2 entry stub did not reach the vector's code "
                              f"({outcome.kind} {outcome.describe()})")
        wrong = [name for name, value in (self.wanted or {}).items() if result.regs.get(name) != value]
        if wrong:
            raise NotRunnable(f"via guest: the L2 entry stub cannot give the L2 the vector's {', '.join(wrong)}")
        result = run_on()
        while self._at(result, StopReason.BREAKPOINT, self.stub_leave):     # the L2 ran into the stub
            result = run_on()
        return self.observe(machine, result)

    @staticmethod
    def _at(result, reason: StopReason, linear: int) -> bool:
        stop = result.stop
        return stop.reason is reason and (result.regs["cs"]["base"] + stop.rip) & 0xFFFF_FFFF_FFFF_FFFF == linear

    def finished(self, result) -> bool:
        stop = result.stop
        return stop.reason is StopReason.EXIT and stop.value == L1_DONE and stop.rip == self.done_rip

    def observe(self, machine, result) -> Outcome:
        if self.finished(result):
            return self.exit_outcome(machine)
        return self.failure(result) or l2_outcome(result)

    def in_l1(self, rip: int) -> bool:
        return self.layout.base <= rip < self.layout.base + L1_REGION

    def failure(self, result) -> Outcome | None:
        """L1 itself faulted or stopped (a core that lacks what it uses): say so rather than
        blame the L2."""
        fault = next((e for e in result.events if e["kind"] in EXCEPTION_EVENTS and self.in_l1(e["rip"])), None)
        if fault is not None:
            what, rip = f"exception {fault['vector']}", fault["rip"]
        elif self.in_l1(result.stop.rip):
            what, rip = result.stop.reason.value, result.stop.rip
        else:
            return None
        return Outcome("stop", {"reason": "l1", "detail": f"{what} in the generated L1 at {rip:#x}"})

    def exit_outcome(self, machine) -> Outcome:
        """The #VMEXIT as L1 finds it in its VMCB; the stage, which the architecture does
        not record, from the machine's last exit."""
        vmcb = vmcb_view(bytearray(machine.read_memory(self.layout.vmcb, VMCB_SIZE)))
        control, save = vmcb["control"], vmcb["save"]
        count = int(control["guest_instruction_count"]) & GUEST_INSTRUCTION_COUNT_MASK
        stage = machine.last_exit.stage if machine.last_exit is not None else None
        return vmexit_outcome(int(control["exitcode"]), int(control["exitinfo1"]), int(control["exitinfo2"]),
                              int(control["nrip"]), stage.name if stage else None, int(save["rip"]),
                              int(control["exitintinfo"]), bytes(control["guest_instruction_bytes"][:count]))


# --- the L2: VMCB and entry stub --------------------------------------------------------------

# Why a vector's L2 cannot enter through the stub: (reason, condition on the prepared setup).
STUB_CONFLICTS = (
    ("this vector intercepts the WRMSR to EFER that clears SVME",
     lambda s: s.controls.msr_intercepted(MSR_EFER, write=True) or ExitCode.EFER_WRITE_TRAP in s.controls),
    ("RFLAGS.TF would single-step the stub", lambda s: bool(s.machine["rflags"] & RFLAGS_TF)),
    ("CR4.SMEP/SMAP forbid the stub's CPL-0 code and stack on a user page",
     lambda s: bool(s.machine["cr4"] & (CR4_SMEP | CR4_SMAP) and s.machine["cr0"] & CR0_PG)),
    (f"the stub's page {L2_STUB:#x} is not present",
     lambda s: any(a >> 12 == L2_STUB >> 12 for a in s.vector.not_present)),
)


def _check_fits(prepared: Setup, layout: Layout, stub: bool) -> None:
    """L1's region and the stub's must be unused by the vector, and the stub uncaught."""
    taken = [(layout.base, L1_REGION, "the generated L1")]
    if stub:
        taken.append((L2_STUB, L2_STUB_SIZE, "the L2 entry stub"))
        for reason, conflicts in STUB_CONFLICTS:
            if conflicts(prepared):
                raise NotRunnable(f"via guest: the L2 must clear EFER.SVME itself (VMRUN requires it set), "
                                  f"through a stub, but {reason}")
    for start, size, what in taken:
        placed = any(a < start + size and a + len(data) > start for a, data in prepared.vector.memory_bytes)
        if placed or prepared.machine.read_memory(start, size) != bytes(size):
            raise NotRunnable(f"via guest: the vector uses {start:#x}-{start + size - 1:#x}, where {what} goes")


def _vmcb(machine, controls, layout: Layout) -> np.void:
    """A VMCB that runs the machine's current state as L2 under ``controls``."""
    cpu = machine.cpu
    record = new_vmcb()
    save, control = record["save"], record["control"]
    for name in VMCB_SEGMENTS:
        write_segment(save[name], cpu.segment(name))
    for name in ("gdtr", "idtr"):
        save[name]["base"], save[name]["limit"] = cpu.table_register(name)
    for name in VMCB_REGISTERS:
        save[name] = machine[name]
    for name, msr in VMLOAD_MSRS:
        save[name] = cpu.fast.read_msr(msr)
    save["cpl"], save["efer"] = cpu.cpl, machine["efer"] | EFER_SVME
    set_intercept_vector(control, controls.vector)           # VMRUN's bit included (controls_for)
    control["iopm_base_pa"], control["msrpm_base_pa"], control["guest_asid"] = layout.iopm, layout.msrpm, 1
    return record


def _enter_through_stub(machine, save) -> tuple[list[tuple[int, bytes]], int]:
    """The stub at L2_STUB that gives the L2 the vector's EFER (SVME clear) with WRMSR,
    restores the registers WRMSR used and goes to the code: a far JMP from the stub's own
    segment in real mode, a JMP at CPL 0, at CPL 3 a far return from CPL 0 (RETF has no
    intercept; IRET has) whose frame ends the stub's area.  ``save`` is changed to start the
    L2 in the stub.  Returns what to place where, and the linear address of that last
    instruction (the stub runs identity-mapped)."""
    cpu = machine.cpu
    bits = cpu.code_bits()
    names = STUB_SCRATCH if bits == 64 else tuple("e" + name[1:] for name in STUB_SCRATCH)
    restore = "\n".join(f"    mov {name}, {machine[name]:#x}" for name in names)
    cs, frame = cpu.segment("cs"), b""
    if not cpu.protected:
        write_segment(save["cs"], Segment(L2_STUB >> 4, L2_STUB, cs.limit, cs.flags))
        leave = f"ljmp {cs.selector:#x}:{cpu.rip:#x}"
    elif cpu.cpl == 0:
        leave = f"jmp {cs.base + cpu.rip:#x}"
    else:
        slot, width = ("<Q", (1 << 64) - 1) if bits == 64 else ("<I", 0xFFFF_FFFF)    # a 32-bit RETF pops 32 bits
        frame = b"".join(struct.pack(slot, value & width)
                         for value in (cpu.rip, cs.selector, machine["rsp"], machine["ss"]))
        leave = "retfq" if bits == 64 else "retf"
        gdt, _ = cpu.table_register("gdtr")
        for name, selector in (("cs", SEL_CODE64 if bits == 64 else SEL_CODE32), ("ss", SEL_DATA)):
            write_segment(save[name], unpack_descriptor(machine.read_memory(gdt + selector, 8), selector))
        save["cpl"], save["rsp"] = 0, L2_STUB + L2_STUB_SIZE - len(frame)
    efer = machine["efer"]
    source = STUB_SOURCE.format(efer=MSR_EFER, low=efer & 0xFFFF_FFFF, high=efer >> 32, restore=restore)
    save["rip"] = L2_STUB - int(save["cs"]["base"])
    body = assemble_text(source, bits, int(save["rip"]), "the in-guest L2 entry stub")
    code = body + assemble_text(leave, bits, int(save["rip"]) + len(body), "the in-guest L2 entry stub")
    pieces = [(L2_STUB, code)] + ([(int(save["rsp"]), frame)] if frame else [])
    return pieces, L2_STUB + len(body)


# --- L1 ----------------------------------------------------------------------------------------

def _copy_page_tables(memory, root: int, destination: int) -> int:
    """Copy the 4-level hierarchy at ``root`` to consecutive pages from ``destination``,
    pointers rewritten, leaves (4 KiB entries, 2 MiB/1 GiB pages) kept; returns the new root."""
    free = [destination]

    def copy(table: int, level: int) -> int:
        here = free[0]
        free[0] += PAGE
        entries = np.frombuffer(memory.read(table, PAGE), dtype="<u8").copy()
        if level > 1:
            for i in np.flatnonzero(entries & ENTRY_PRESENT):
                entry = int(entries[i])
                if level == 4 or not entry & ENTRY_LARGE:
                    entries[i] = entry & ~ENTRY_ADDRESS | copy(entry & ENTRY_ADDRESS, level - 1)
        memory.load(here, entries.tobytes())
        return here

    return copy(root, 4)


def _boot_l1(machine, layout: Layout) -> None:
    """Long mode, CPL 0, at L1's code, with GDT, IDT, page tables and stack in L1's region."""
    machine.boot(BootState.LONG, layout.code, 0)
    cpu = machine.cpu
    for name, copy in (("gdtr", layout.gdt), ("idtr", layout.idt)):
        base, limit = cpu.table_register(name)
        machine.memory.load(copy, machine.read_memory(base, limit + 1))
        cpu.set_table_register(name, copy, limit)
    cpu["cr3"] = _copy_page_tables(machine.memory, cpu["cr3"] & ENTRY_ADDRESS, layout.page_tables)
    cpu["rsp"] = layout.stack_end


def _restore_pages(machine, saved: bytes) -> None:
    """Give back, page by page, what changed in RAM from address 0 since ``saved``."""
    now = np.frombuffer(machine.read_memory(0, len(saved)), dtype=np.uint8)
    changed = np.flatnonzero(now != np.frombuffer(saved, dtype=np.uint8))
    for page in np.unique(changed // PAGE) * PAGE:
        machine.write_memory(int(page), saved[page:page + PAGE])


def _l1_code(machine, layout: Layout) -> bytes:
    gprs = "\n".join(f"    mov {name}, {machine[name]:#x}" for name in L1_LOADS_GPRS)
    source = L1_SOURCE.format(efer=MSR_EFER, svme=EFER_SVME, hsave_msr=MSR_VM_HSAVE_PA,
                              hsave_low=layout.hsave & 0xFFFF_FFFF, hsave_high=layout.hsave >> 32,
                              vmcb=layout.vmcb, gprs=gprs, done=L1_DONE, port=EXIT_PORT)
    return assemble_text(source, 64, layout.code, "the in-guest L1")


def generate_l1(prepared: Setup) -> GeneratedL1:
    """Make the machine's prepared L2 the L2 of a generated L1, and boot that L1."""
    machine, controls = prepared.machine, prepared.controls
    layout = Layout(machine.memory.ram_size)
    stub = not machine["efer"] & EFER_SVME
    _check_fits(prepared, layout, stub)
    vmcb = _vmcb(machine, controls, layout)
    pieces = [(layout.iopm, controls.iopm.tobytes()), (layout.msrpm, controls.msrpm.tobytes())]
    leave = None
    if stub:
        stub_pieces, leave = _enter_through_stub(machine, vmcb["save"])
        pieces += stub_pieces
    pieces.append((layout.vmcb, vmcb.tobytes()))
    l1_code = _l1_code(machine, layout)      # holds the L2's GPRs: made before L1 boots
    wanted = machine.cpu.snapshot().registers()
    start = (wanted["cs"]["base"] + wanted["rip"]) & 0xFFFF_FFFF_FFFF_FFFF
    low_memory = machine.read_memory(0, SYSTEM_AREA.stop)
    _boot_l1(machine, layout)
    _restore_pages(machine, low_memory)
    for address, data in (*pieces, (layout.code, l1_code)):
        machine.write_memory(address, data)
    # done_rip: the OUT's successor, HLT
    return GeneratedL1(layout, layout.code + len(l1_code) - 1, start, wanted, leave)


def run_in_guest(vector: TestVector, profile: str, max_instructions: int = MAX_INSTRUCTIONS,
                 timeout: float = TIMEOUT) -> Outcome:
    prepared = setup(vector, profile)
    return generate_l1(prepared).run(prepared.machine, max_instructions, timeout)
