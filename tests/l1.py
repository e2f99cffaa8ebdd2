"""A small guest hypervisor (L1) for the in-guest SVM tests and benchmarks/nested.py.

L1 is 64-bit code at CPL 0 (the machine's ``long`` boot state) that does what a real
hypervisor does: it sets EFER.SVME and VM_HSAVE_PA with WRMSR, keeps its L2's general
registers in memory (VMRUN/#VMEXIT switch only RAX and RSP, APM §15.5/§15.6, so after an exit
L2's RBX…R15 are still in the registers), VMRUNs the VMCB at ``VMCB``, logs every #VMEXIT and
dispatches on EXITCODE to handlers written in assembly by the tests.

Everything here follows the APM (Vol. 2 ch. 15, Appendix B), not ringminus's implementation:
the VMCB is written from Python through ``vmcb_view`` (offsets verified against the APM's
tables) before the run, and read back from guest memory after it.

Layout (guest-physical = linear: the boot identity map):

    0x100000  L1 code                    0x300000  VMCB            (DATA + 0x0000)
    0x200000  L2 code                    0x301000  host-save area  (DATA + 0x1000)
    0x380000  L2 stack top               0x302000  second VMCB     (DATA + 0x2000)
                                         0x303000  L2 GPRs by number (RCX=1 … R15=15)
                                         0x303100  what L1 saw after VMRUN (HOST_*)
                                         0x303200  next log record, exits left
                                         0x303400  RESULTS: free for tests
                                         0x304000  IOPM (12 KiB)
                                         0x308000  MSRPM (8 KiB)
                                         0x30A000  exit log (128-byte records)
                                         0x30C000  L2 IDT (256 × 16 bytes)
                                         0x30D000  L2_DATA: free for L2 stores

Memory operands in L1 are always [base + disp]: keystone's 64-bit absolute operands are
RIP-relative and sometimes mis-encoded.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from ringminus import Machine
from ringminus.intercepts.vmcb import VMCB_SIZE, vmcb_view

from .helpers import asm

# SVM instructions, spelled as bytes: keystone knows only some of them.
VMRUN = ".byte 0x0f, 0x01, 0xd8"
VMMCALL = ".byte 0x0f, 0x01, 0xd9"
VMLOAD = ".byte 0x0f, 0x01, 0xda"
VMSAVE = ".byte 0x0f, 0x01, 0xdb"
STGI = ".byte 0x0f, 0x01, 0xdc"
CLGI = ".byte 0x0f, 0x01, 0xdd"
SKINIT = ".byte 0x0f, 0x01, 0xde"
INVLPGA = ".byte 0x0f, 0x01, 0xdf"

L1_CODE = 0x100000
L2_CODE = 0x200000
L2_STACK = 0x380000
DATA = 0x300000
VMCB = DATA
HSAVE = DATA + 0x1000
VMCB2 = DATA + 0x2000
GREGS = 0x3000              # offsets from DATA from here on
HOST_RAX = 0x3100           # RAX, RFLAGS and RSP as L1 saw them right after its VMRUN
HOST_RFLAGS = 0x3108
HOST_RSP = 0x3110
HOST_RSP_AT_VMRUN = 0x3118
LOG_NEXT = 0x3200
EXITS_LEFT = 0x3208
RESULTS = 0x3400
IOPM = DATA + 0x4000
MSRPM = DATA + 0x8000
LOG = 0xA000
L2_IDT = DATA + 0xC000
L2_DATA = DATA + 0xD000
DATA_SIZE = 0xE000

# VMCB offsets (APM Table B-1 / B-2; save area at 0x400)
EXITCODE, EXITINFO1, EXITINFO2, EXITINTINFO, NRIP, INT_CTL = 0x070, 0x078, 0x080, 0x088, 0x0C8, 0x060
SAVE = 0x400
SAVE_RFLAGS, SAVE_RIP, SAVE_RSP, SAVE_RAX = SAVE + 0x170, SAVE + 0x178, SAVE + 0x1D8, SAVE + 0x1F8

GPR_NUMBER = {"rcx": 1, "rdx": 2, "rbx": 3, "rbp": 5, "rsi": 6, "rdi": 7,
              **{f"r{n}": n for n in range(8, 16)}}

# Exit codes (APM Appendix C)
INTR, NMI, SMI, INIT, VINTR = 0x060, 0x061, 0x062, 0x063, 0x064
CPUID, HLT, INVLPGA_EXIT, IOIO, MSR, SHUTDOWN = 0x072, 0x078, 0x07A, 0x07B, 0x07C, 0x07F
VMRUN_EXIT, VMMCALL_EXIT, VMLOAD_EXIT, VMSAVE_EXIT, STGI_EXIT, CLGI_EXIT, SKINIT_EXIT = range(0x080, 0x087)
VMEXIT_INVALID = -1

# One log record per exit: these qwords, in this order.
LOG_FIELDS = ("exitcode", "exitinfo1", "exitinfo2", "exitintinfo", "nrip", "rip", "rsp", "rax",
              "rflags", "int_ctl", "host_rax", "host_rflags", "host_rsp", "rbx", "rcx", "rdx")
LOG_RECORD = 128
_LOG_SOURCES = ([(EXITCODE, "v"), (EXITINFO1, "v"), (EXITINFO2, "v"), (EXITINTINFO, "v"), (NRIP, "v"),
                 (SAVE_RIP, "v"), (SAVE_RSP, "v"), (SAVE_RAX, "v"), (SAVE_RFLAGS, "v"), (INT_CTL, "v")]
                + [(HOST_RAX, "d"), (HOST_RFLAGS, "d"), (HOST_RSP, "d")]
                + [(GREGS + 8 * GPR_NUMBER[r], "d") for r in ("rbx", "rcx", "rdx")])

# Segment attributes in the VMCB's 12-bit form: type 3:0, S 4, DPL 6:5, P 7, AVL 8, L 9, D 10, G 11
CODE64_ATTRIB, DATA_ATTRIB, CODE32_ATTRIB = 0xA9B, 0xC93, 0xC9B
REAL_CODE_ATTRIB, REAL_DATA_ATTRIB = 0x09B, 0x093
SEL_CODE32, SEL_DATA, SEL_CODE64 = 0x08, 0x10, 0x28
GDT_BASE, GDT_LIMIT = 0x1000, 0x47
EFER_LME, EFER_LMA, EFER_SVME = 1 << 8, 1 << 10, 1 << 12
CR0_PE, CR0_ET, CR0_PG = 1, 1 << 4, 1 << 31
CR4_PAE = 1 << 5
PAGE_TABLES = 0x10000


def addresses(lines: list[str], bits: int = 64, base: int = L2_CODE) -> list[int]:
    """The address of each line of straight-line code (no jumps) assembled at ``base``."""
    out, at = [], base
    for line in lines:
        out.append(at)
        at += len(asm(line, bits, at))
    return out


# -- the L1 program ----------------------------------------------------------------------------

def l1_source(handlers: dict[int, str] | None = None, setup: str = "", before: str = "",
              done: str = "", host_rflags: int = 0x2, vmcb: int = VMCB) -> str:
    """L1's assembly.  ``handlers`` maps an exit code to code that runs with RBX = DATA and
    ends with ``jmp advance`` (save.rip := NEXT_RIP, VMRUN again), ``jmp vmrun_loop`` or
    ``jmp l1_done``; any other exit goes to l1_done, which runs ``done`` and halts."""
    restore = "\n".join(f"mov {r}, [rax + {GREGS + 8 * n:#x}]" for r, n in GPR_NUMBER.items())
    keep = "\n".join(f"mov [rax + {GREGS + 8 * n:#x}], {r}" for r, n in GPR_NUMBER.items())
    log = []
    for i, (offset, base) in enumerate(_LOG_SOURCES):
        log.append(f"mov rax, [{'rbx' if base == 'd' else 'rsi'} + {offset:#x}]")
        log.append(f"mov [rdi + {8 * i:#x}], rax")
    dispatch = "\n".join(f"cmp rax, {code}\nje handler_{i}" for i, code in enumerate(handlers or {}))
    bodies = "\n".join(f"handler_{i}:\n{body}" for i, body in enumerate((handlers or {}).values()))
    return f"""
        mov ecx, 0xC0000080
        rdmsr
        or eax, {EFER_SVME:#x}
        wrmsr
        mov ecx, 0xC0010117
        mov eax, {HSAVE:#x}
        xor edx, edx
        wrmsr
        mov rbx, {DATA:#x}
        {setup}
    vmrun_loop:
        mov rbx, {DATA:#x}
        {before}
        mov rax, {DATA:#x}
        mov [rax + {HOST_RSP_AT_VMRUN:#x}], rsp
        {restore}
        push {host_rflags:#x}
        popfq
        mov rax, {vmcb:#x}
        {VMRUN}
    after_vmrun:
        movabs [{DATA + HOST_RAX:#x}], rax
        mov rax, {DATA:#x}
        mov [rax + {HOST_RSP:#x}], rsp
        {keep}
        pushfq
        pop rcx
        mov [rax + {HOST_RFLAGS:#x}], rcx
        mov rbx, rax
        mov rsi, {vmcb:#x}
        mov rdi, [rbx + {LOG_NEXT:#x}]
        {chr(10).join(log)}
        add rdi, {LOG_RECORD}
        mov [rbx + {LOG_NEXT:#x}], rdi
        dec qword ptr [rbx + {EXITS_LEFT:#x}]
        jz l1_done
        mov rax, [rsi + {EXITCODE:#x}]
        {dispatch}
        jmp l1_done
    advance:
        mov rax, [rbx + {NRIP:#x}]
        mov [rbx + {SAVE_RIP:#x}], rax
        jmp vmrun_loop
    {bodies}
    l1_done:
        mov rbx, {DATA:#x}
        {done}
        hlt
        jmp l1_done
    """


# -- the VMCB ----------------------------------------------------------------------------------

def _segment(record, selector: int, attrib: int, limit: int = 0xFFFF_FFFF, base: int = 0) -> None:
    record["selector"], record["attrib"], record["limit"], record["base"] = selector, attrib, limit, base


def intercept(control, *codes: int) -> None:
    words = control["intercepts"]
    for code in codes:
        words[code >> 5] |= 1 << (code & 31)


def clear_intercept(control, *codes: int) -> None:
    words = control["intercepts"]
    for code in codes:
        words[code >> 5] &= ~(1 << (code & 31)) & 0xFFFF_FFFF


def new_vmcb(mode: str = "long", rip: int = L2_CODE, rsp: int = L2_STACK, intercepts=(HLT,)):
    """(buffer, view): a valid VMCB for an L2 in ``mode`` (long: 64-bit CPL 0 on L1's page
    tables and GDT; protected: flat 32-bit, paging off; real: CS base = rip & ~0xFFFF)."""
    buffer = bytearray(VMCB_SIZE)
    v = vmcb_view(buffer)
    control, save = v["control"], v["save"]
    intercept(control, VMRUN_EXIT, *intercepts)       # VMRUN must be intercepted (§B.5)
    control["guest_asid"] = 1
    control["iopm_base_pa"] = IOPM
    control["msrpm_base_pa"] = MSRPM
    save["gdtr"]["base"], save["gdtr"]["limit"] = GDT_BASE, GDT_LIMIT
    save["idtr"]["base"], save["idtr"]["limit"] = L2_IDT, 0xFFF
    save["dr6"], save["dr7"] = 0xFFFF_0FF0, 0x400
    save["rflags"] = 0x2
    save["g_pat"] = 0x0007_0406_0007_0406
    if mode == "long":
        _segment(save["cs"], SEL_CODE64, CODE64_ATTRIB)
        for name in ("ds", "es", "ss"):
            _segment(save[name], SEL_DATA, DATA_ATTRIB)
        save["efer"] = EFER_LME | EFER_LMA | EFER_SVME
        save["cr0"], save["cr3"], save["cr4"] = CR0_PG | CR0_ET | CR0_PE, PAGE_TABLES, CR4_PAE
        save["rip"], save["rsp"] = rip, rsp
    elif mode == "protected":
        _segment(save["cs"], SEL_CODE32, CODE32_ATTRIB)
        for name in ("ds", "es", "ss"):
            _segment(save[name], SEL_DATA, DATA_ATTRIB)
        save["efer"] = EFER_SVME
        save["cr0"], save["cr4"] = CR0_ET | CR0_PE, 0
        save["idtr"]["limit"] = 0x7FF
        save["rip"], save["rsp"] = rip, rsp
    elif mode == "real":
        base = rip & ~0xFFFF
        _segment(save["cs"], base >> 4, REAL_CODE_ATTRIB, 0xFFFF, base)
        for name in ("ds", "es", "ss"):
            _segment(save[name], base >> 4, REAL_DATA_ATTRIB, 0xFFFF, base)
        save["efer"] = EFER_SVME
        save["cr0"], save["cr4"] = CR0_ET, 0
        save["idtr"]["base"], save["idtr"]["limit"] = 0, 0x3FF
        save["rip"], save["rsp"] = rip - base, 0xFFF0
    else:
        raise ValueError(mode)
    return buffer, v


def read_vmcb(machine: Machine, address: int = VMCB):
    return vmcb_view(bytearray(machine.read_memory(address, VMCB_SIZE)))


def set_port(iopm: bytearray, port: int) -> None:
    iopm[port >> 3] |= 1 << (port & 7)


def set_msr(msrpm: bytearray, msr: int, read: bool = True, write: bool = True) -> None:
    """APM §15.11: 2 bits per MSR (read, then write) in three 2 KiB vectors."""
    for first, offset in ((0, 0), (0xC000_0000, 0x800), (0xC001_0000, 0x1000)):
        if first <= msr < first + 0x2000:
            bit = offset * 8 + (msr - first) * 2
            if read:
                msrpm[bit >> 3] |= 1 << (bit & 7)
            if write:
                msrpm[(bit + 1) >> 3] |= 1 << ((bit + 1) & 7)
            return
    raise ValueError(f"MSR {msr:#x} has no MSRPM bits")


def gate64(handler: int, selector: int = SEL_CODE64, dpl: int = 0, trap: bool = False, ist: int = 0) -> bytes:
    """A present 64-bit interrupt (or trap) gate."""
    kind = 0xF if trap else 0xE
    return struct.pack("<HHBBHII", handler & 0xFFFF, selector, ist, 0x80 | dpl << 5 | kind,
                       (handler >> 16) & 0xFFFF, handler >> 32, 0)


@dataclass
class Exit:
    exitcode: int
    exitinfo1: int
    exitinfo2: int
    exitintinfo: int
    nrip: int
    rip: int
    rsp: int
    rax: int
    rflags: int
    int_ctl: int
    host_rax: int
    host_rflags: int
    host_rsp: int
    rbx: int
    rcx: int
    rdx: int


# -- putting it together -----------------------------------------------------------------------

class GuestHypervisor:
    """L1 + L2 + VMCB in one machine.  Change ``vmcb``, ``gregs``, ``iopm``, ``msrpm``,
    ``idt`` (L2's, bytes at L2_IDT) before ``build()``."""

    def __init__(self, l2: str | bytes = "hlt", l2_bits: int = 64, mode: str = "long",
                 l2_address: int = L2_CODE, handlers: dict[int, str] | None = None, setup: str = "",
                 before: str = "", done: str = "", host_rflags: int = 0x2, intercepts=(HLT,),
                 max_exits: int = 64, profile: str = "kvm", **machine_args):
        self.l2 = l2 if isinstance(l2, bytes) else asm(l2, l2_bits, l2_address)
        self.l2_address = l2_address
        self.l1 = asm(l1_source(handlers, setup, before, done, host_rflags), 64, L1_CODE)
        self.buffer, self.vmcb = new_vmcb(mode, l2_address, intercepts=intercepts)
        self.gregs = {name: 0 for name in GPR_NUMBER}
        self.iopm = bytearray(12 * 1024)
        self.msrpm = bytearray(8 * 1024)
        self.idt = bytearray(256 * 16)
        self.max_exits = max_exits
        self.profile = profile
        self.machine_args = machine_args
        self.machine: Machine | None = None

    @property
    def control(self):
        return self.vmcb["control"]

    @property
    def save(self):
        return self.vmcb["save"]

    def data_image(self) -> bytes:
        """DATA .. DATA+DATA_SIZE as L1 finds it at start."""
        data = bytearray(DATA_SIZE)
        data[0:VMCB_SIZE] = self.buffer
        for name, number in GPR_NUMBER.items():
            struct.pack_into("<Q", data, GREGS + 8 * number, self.gregs[name] & (1 << 64) - 1)
        struct.pack_into("<QQ", data, LOG_NEXT, DATA + LOG, self.max_exits)
        data[IOPM - DATA:IOPM - DATA + len(self.iopm)] = self.iopm
        data[MSRPM - DATA:MSRPM - DATA + len(self.msrpm)] = self.msrpm
        data[L2_IDT - DATA:L2_IDT - DATA + len(self.idt)] = self.idt
        return bytes(data)

    def build(self) -> Machine:
        machine = Machine(profile=self.profile, **self.machine_args)
        machine.write_memory(L1_CODE, self.l1)
        machine.write_memory(self.l2_address, self.l2)
        machine.write_memory(DATA, self.data_image())
        machine.boot("long", L1_CODE)
        self.machine = machine
        return machine

    def run(self, **run_args):
        if self.machine is None:
            self.build()
        run_args.setdefault("timeout", 30)           # a safety net against a hang, not a measure
        return self.machine.run(**run_args)

    # -- reading back ------------------------------------------------------------------------
    def exits(self, machine: Machine | None = None) -> list[Exit]:
        machine = machine or self.machine
        end = struct.unpack("<Q", machine.read_memory(DATA + LOG_NEXT, 8))[0]
        count = (end - DATA - LOG) // LOG_RECORD
        raw = machine.read_memory(DATA + LOG, count * LOG_RECORD)
        out = []
        for i in range(count):
            values = list(struct.unpack_from("<16Q", raw, i * LOG_RECORD))
            values[0] = values[0] - (1 << 64) if values[0] >> 63 else values[0]   # EXITCODE is signed
            out.append(Exit(*values))
        return out

    def l2_registers(self, machine: Machine | None = None) -> dict[str, int]:
        machine = machine or self.machine
        raw = machine.read_memory(DATA + GREGS, 16 * 8)
        return {name: struct.unpack_from("<Q", raw, 8 * n)[0] for name, n in GPR_NUMBER.items()}

    def result(self, offset: int, machine: Machine | None = None) -> int:
        """The qword at DATA + RESULTS + offset."""
        machine = machine or self.machine
        return struct.unpack("<Q", machine.read_memory(DATA + RESULTS + offset, 8))[0]

    def read_vmcb(self, address: int = VMCB):
        return read_vmcb(self.machine, address)


def exit_codes(events) -> list[int]:
    """Exit codes among a run's events, whether recorded as VmExit objects or dicts."""
    codes = []
    for event in events:
        if isinstance(event, dict):
            if event.get("kind") == "vmexit":
                codes.append(event["code"])
        elif hasattr(event, "code"):
            codes.append(int(event.code))
    return codes
