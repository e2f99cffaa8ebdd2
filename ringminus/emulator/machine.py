"""The core machine: one 64-bit Unicorn handle, its memory, ports and events, and the run
loop.  It knows no feature: SMM, SVM, the intercepts and the hypercall conduit plug in through
plugins.py (ringminus.machine composes them).

Unicorn executes the guest natively.  Python runs only when Unicorn reports an event (a fault
or software interrupt, an invalid opcode, port I/O, an access to unbacked memory, HLT) or when
an armed code site is reached (sites.py) — never per instruction or per block, except with
``trace``.  Each report ends the current ``emu_start`` slice; the loop decides, delivers and
resumes.
"""
from __future__ import annotations

import collections
import heapq
import itertools
import math
import threading
import time
import weakref
from collections import Counter
from dataclasses import dataclass, replace
from typing import Callable, TextIO

import numpy as np
from unicorn import (UC_ARCH_X86, UC_HOOK_CODE, UC_HOOK_INSN, UC_HOOK_INSN_INVALID, UC_HOOK_INTR,
                     UC_HOOK_MEM_INVALID, UC_HOOK_TLB_FILL, UC_MEM_FETCH, UC_MEM_FETCH_PROT, UC_MEM_FETCH_UNMAPPED,
                     UC_MEM_READ_UNMAPPED, UC_MEM_WRITE_PROT, UC_MEM_WRITE_UNMAPPED, UC_MODE_64, UC_TLB_CPU,
                     UC_TLB_VIRTUAL, Uc, UcError)
from unicorn import x86_const as X

from ..arch.control import CR0_PG, RFLAGS_IF, RFLAGS_TF, cr_write_refused
from ..arch.exceptions import PUSHES_ERROR_CODE, GuestFault, SecondStageFault, Vector
from ..arch.exitcodes import ExitCode
from ..arch.models import LM, MODELS, TSC_ADJUST, max_physical_bits
from ..arch.msrs import MSR_TSC, MSR_TSC_ADJUST
from ..arch.registers import SEGMENT_REGISTERS
from ..arch.segments import Segment
from ..decode.decoder import Instruction, decode
from ..decode.length import instruction_length, instruction_text
from ..decode.prefixes import is_prefix
from ..decode.table import (ALWAYS_ARMED_OPCODES, INTERRUPT_WINDOW_OPCODES, INTERRUPT_WINDOW_ROWS, OUT_OPCODES,
                            PORT_OUT_ROWS)
from . import boot as boot_states, boundary
from . import ucinternals
from .cpu import ArchState, At, Cpu
from .delivery import Delivered, Delivery, Event, EventKind, Unsupported
from .loader import Image, bios_windows, check_bios
from .clock import VirtualClock, VirtualTsc
from .irq import InterruptController, InterruptLine
from .lbr import LBR_MSRS, BranchRecord
from .memory import ROM, MissingMemory, PhysicalMemory, UnbackedMemory
from .mmio import MmioBus, MmioDevice, MmioRegion
from .paging import LinearMemory, SecondStage
from .pci import PciBus
from .plugins import Gate, HookContext, Msr, OnExit, Registry, Source
from .ports import DEBUGCON_PORT, EXIT_PORT, DebugConsole, ExitDevice, IoAccess, PortBus, io_permitted
from .result import EventLog, RunResult, Stop, StopReason
from .sites import EVICTION_INTERVAL, CodeSites
from .snapshot import CORE_PARTS, Snapshot, restore as restore_snapshot, take as take_snapshot

DEFAULT_MEMORY = 64 << 20
CLOCKS = ("virtual", "host")
UNBOUNDED_COUNT = 1 << 62
MASK_64 = 0xFFFF_FFFF_FFFF_FFFF
CHAIN_LIMIT = 8                 # instructions a hook executes after its own (_chain_in_hook)
DR7_ENABLES = 0xFF              # L0-G3: a breakpoint armed
ROTATES = frozenset({0xC0, 0xC1, 0xD0, 0xD1, 0xD2, 0xD3})     # group 2: /2 RCL, /3 RCR
STAT_KEYS = ("slices", "exceptions_delivered", "interrupts_delivered", "device_interrupts", "port_reads",
             "port_writes", "unclaimed_port_reads", "unclaimed_port_writes")
ICEBP, INT3, INTO, HLT = 0xF1, 0xCC, 0xCE, 0xF4
MSR_ROWS = frozenset({"rdmsr", "wrmsr"})


class _Watchdog(threading.Thread):
    """Ends a run at its deadline by stopping the emulator: one thread per ``run()``.
    (Unicorn's own ``emu_start`` timeout starts and joins a timer thread for every slice,
    which costs milliseconds per slice on a loaded host.)  Once the deadline has passed it
    stops the emulator every 10 ms until cancelled, so a stop that falls between two slices
    is not lost; ``cancel`` joins the thread, so no stop outlives its run."""

    def __init__(self, uc: Uc, seconds: float):
        super().__init__(daemon=True)
        self._uc, self._seconds, self._done = uc, seconds, threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self._seconds
        while (left := deadline - time.monotonic()) > 0:       # Event.wait takes at most TIMEOUT_MAX
            if self._done.wait(min(left, threading.TIMEOUT_MAX)):
                return
        while True:
            self._uc.emu_stop()
            if self._done.wait(0.01):
                return

    def cancel(self) -> None:
        self._done.set()
        self.join()


# Traps that stop the slice before their instruction and leave it to run again later: an
# interrupt shadow it is in still holds (a site stepped alone, say).
_BEFORE_IT = frozenset({"step", "breakpoint", "miss", "mmio", "refetch", "memory"})


@dataclass(frozen=True, slots=True)
class _Trap:
    """What a hook saw before it stopped the slice."""
    kind: str                   # a key of Core._AFTER_TRAP: what the run loop does next
    vector: int = 0
    error_code: int = 0
    software: bool = False
    cr2: int = 0                # #PF: read in the hook; Unicorn clobbers CR2 (to -2) on the way out
    address: int = 0
    port: int = 0
    detail: str = ""
    outcome: object = None      # "exit": the gate's exit; "fault": a Fault; "port", "msr": the insn
    flags_in_cc_src: bool = False   # "memory", "miss", "refused fill": see Core._flags_in_cc_src
    handler: object = None      # "miss": the handler that maps the address


class Core(Registry):
    """The machine without features (ringminus.Machine is this with SMM, SVM, the intercepts
    and the hypercall conduit plugged in)."""
    _running_machines: "weakref.WeakSet[Core]" = weakref.WeakSet()   # for interrupt_all (Ctrl-C)

    def __init__(self, memory_size: int = DEFAULT_MEMORY, cpu_model: str = "qemu64",
                 debugcon_port: int = DEBUGCON_PORT, exact_instructions: bool = False, clock: str = "virtual"):
        """``clock``: ``virtual`` (time from the instructions retired: deterministic) or
        ``host`` (the host's monotonic clock, for devices and the TSC; emulator/clock.py)."""
        ucinternals.verify()
        if clock not in CLOCKS:
            raise ValueError(f"unknown clock {clock!r} ({' or '.join(CLOCKS)})")
        if cpu_model not in MODELS:
            raise ValueError(f"unknown CPU model {cpu_model!r} ({' or '.join(MODELS)})")
        self.cpu_model = cpu_model
        self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        self.uc.ctl_set_cpu_model(MODELS[cpu_model].unicorn_model)
        ucinternals.set_features(self.uc, MODELS[cpu_model].unicorn_words())
        # No ``until`` address: with one, Unicorn stops at it and, on leaving emu_start,
        # translates ``until - 1``, overwriting CR2 when the guest's paging does not map it.
        self.uc.ctl_exits_enabled(True)
        self.uc.ctl_set_exits([])
        self.cpu = Cpu(self.uc)
        self.memory = PhysicalMemory(self.uc, memory_size)
        self.linear = LinearMemory(self.cpu, self.memory, max_physical_bits(cpu_model))
        self.delivery = Delivery(self.cpu, self.linear)
        self.ports = PortBus()
        self.console = DebugConsole(on_output=self.output_written)
        self._output_sources: tuple[tuple[str, Callable[[], bytes]], ...] = (("debug console", lambda: self.console.output),)
        self._awaited_output: bytes | None = None      # stop_on_output
        self.ports.register(debugcon_port, self.console)
        self.ports.register(EXIT_PORT, ExitDevice(lambda value: self.request_stop(StopReason.EXIT, value)))
        self.pci = PciBus(self.ports)
        self._slice_recount = False             # an MMIO access scheduled an event (_recount_slice)
        self.mmio = MmioBus(self.uc, lambda: self._stop is not None or self._slice_recount or self._boundary_work(),
                            self._stop_after_mmio)
        self.clock = VirtualClock(self, host_time=clock == "host")
        self._posted: collections.deque[Callable[["Core"], None]] = collections.deque()
        self.nmi_pending = False
        self.init_pending = False               # an INIT held (in SMM, GIF = 0, …) until it can be taken
        self.interrupts: set[int] = set()       # INTR vectors raised and not yet taken
        self.interrupt_controllers: tuple[InterruptController, ...] = ()   # a platform's (add_interrupt_controller)
        self._io_access: IoAccess | Callable[[], IoAccess] | None = None     # see io_access
        self.uc.hook_add(UC_HOOK_INSN, self._on_cpuid, None, 1, 0, X.UC_X86_INS_CPUID)
        self.tsc = VirtualTsc(self.cpu, self.clock)
        self._tsc_hooks = [ucinternals.add_instruction_hook(self.uc, X.UC_X86_INS_RDTSC,
                                                            lambda: self._repair_synced_flags() or self.tsc.rdtsc()),
                           ucinternals.add_instruction_hook(self.uc, X.UC_X86_INS_RDTSCP,
                                                            lambda: self._repair_synced_flags() or self.tsc.rdtscp())]
        self.sites = CodeSites(self.uc, self._on_site, OUT_OPCODES | ALWAYS_ARMED_OPCODES, self.memory.read_fast,
                               self.memory.code_pages, self.linear.physical_as_executed)
        self.exact_instructions = exact_instructions
        self.instructions = 0
        self._instructions_exact = True
        self._slice_counted = False             # a counted slice is running (instructions_now)
        self._in_slice = False                  # Unicorn is running guest code (emu_start)
        self._nothing_to_chain_at: set[int] = set()     # RIPs _chain_in_hook found nothing to run at
        self._next_eviction = 0                 # when counted slices next evict cold code hooks
        self.halted = False
        self.stats: Counter = Counter()
        self._scheduled: list[tuple[int, int, Callable[["Core"], None]]] = []     # by instruction count
        self._timers: list[tuple[int, int, Callable[["Core"], None]]] = []        # by virtual time (ns)
        self.idle_ns = 0                        # virtual time the CPU spent halted
        self._running = False
        self._interrupt_requested = False       # interrupt(): any thread may set it
        self._events_this_run = 0               # deliveries and exits: bounded by max_instructions too
        self._sequence = itertools.count()
        self._trap: _Trap | None = None
        self._stop: Stop | None = None
        self.gate: Gate | None = None       # while a guest runs as L2: what its L1 intercepts
        self.events = EventLog()            # the event log: events delivered, exits, hypercalls, in order
        # Interrupts an interrupt controller delivers (a timer's, every tick) are counted
        # (stats: device_interrupts), not logged one by one, unless asked.
        self.log_device_interrupts = False
        self.has_run = False                # set by the first run()
        self._breakpoints: dict[int, int] = {}
        self._resuming_at_breakpoint: int | None = None
        self._decoded: dict[tuple[int, int], tuple[bytes, Instruction | None]] = {}
        self._stepping_over: int | None = None     # a MOV CR site run by a one-instruction slice
        # Hooks may finish a world switch themselves (an SMI raised by an OUT, RSM) and let
        # Unicorn go on, instead of ending the slice: only when no instruction count must stay
        # exact and no trace is printed, and never as L2, where intercepts decide first.
        self._switch_in_hooks = False
        self._tracing = False
        self._address_space: tuple | None = None
        self._armed_epoch = -1                      # paging_epoch when the last run ended
        self._armed_spaces: dict[tuple, int] = {}  # address space -> how many sites are armed there
        Registry.__init__(self, boundary.CORE_SOURCES, CORE_PARTS, STAT_KEYS)     # what features attach
        self.add_msr(Msr(lambda msr: msr == MSR_TSC, lambda msr: self.tsc.read(),
                         lambda msr, value: self.tsc.write(value)))
        self.lbr = BranchRecord(self)
        self.add_msr(Msr(lambda msr: msr in LBR_MSRS, self.lbr.read, self.lbr.write))
        self.add_reset_hook(lambda: self.lbr.set_debugctl(0))
        if MODELS[cpu_model].leaf7_ebx & TSC_ADJUST:
            self.add_msr(Msr(lambda msr: msr == MSR_TSC_ADJUST,
                             lambda msr: self.tsc.adjust & MASK_64,
                             lambda msr, value: self.tsc.write_adjust(value)))
        self.intr_unmasked: Callable[[], bool] = self._intr_unmasked     # SVM: set_intr_unmasked
        self.delivery.intercept = self._intercept_event
        self.delivery.second_stage_exit = lambda fault, event, rip: self.gate.take_exit(
            self.gate.second_stage_exit(fault, event, rip))
        self.uc.hook_add(UC_HOOK_INTR, self._on_interrupt)
        self.uc.hook_add(UC_HOOK_INSN_INVALID, self._on_invalid_opcode)
        self.uc.hook_add(UC_HOOK_INSN, self._on_in, None, 1, 0, X.UC_X86_INS_IN)
        self.uc.hook_add(UC_HOOK_INSN, self._on_out, None, 1, 0, X.UC_X86_INS_OUT)
        self.uc.hook_add(UC_HOOK_MEM_INVALID, self._on_bad_memory)
        # Called only while a second stage has Unicorn's TLB filled by ringminus (nested paging).
        self.uc.hook_add(UC_HOOK_TLB_FILL, self._on_tlb_fill)

    # -- setting up ------------------------------------------------------------------------
    def boot(self, state: boot_states.BootState | str, entry: int = 0, cpl: int = 0) -> None:
        """Put the CPU in a boot state (boot.py) with the guest entered at ``entry``."""
        for reset in self._reset_hooks:
            reset()
        boot_states.boot(self, boot_states.BootState(state), entry, cpl)
        self._trap, self.halted = None, False

    def write_memory(self, address: int, data: bytes) -> None:
        """Place bytes in guest RAM (code sites in them are armed when Unicorn translates
        them: sites.py)."""
        self.memory.load(address, data)
        self.linear.flush()
        self.cpu.clear_inflight_exception()        # see break_at

    def read_memory(self, address: int, size: int) -> bytes:
        return self.memory.read(address, size)

    def read_view(self, address: int, size: int) -> bytes:
        """Physical bytes as the CPU sees them now (SMRAM or not); 0xFF where nothing is mapped."""
        out = bytearray()
        at, end = address, address + size
        while at < end:
            count = min(0x1000 - (at & 0xFFF), end - at)         # up to the next page boundary
            chunk = self.memory.read_fast(at, count)
            out += chunk if chunk is not None else b"\xff" * count
            at += count
        return bytes(out)

    def load_image(self, image: Image) -> int:
        for segment in image.segments:
            end = segment.address + segment.memory_size
            if self.memory.ram_offset(segment.address, segment.memory_size) is None:
                raise ValueError(f"image segment {segment.address:#x}-{end:#x} does not fit in guest RAM "
                                 f"({self.memory.describe_ram()})")
            self.write_memory(segment.address, segment.data.ljust(segment.memory_size, b"\0"))
        return image.entry

    def load_bios(self, data: bytes) -> None:
        """Map a ``-bios`` image as QEMU does (read-only)."""
        check_bios(data)
        rom = np.frombuffer(bytearray(data), dtype=np.uint8)
        for address, offset, length in bios_windows(len(data)):
            self.memory.add_overlay(f"bios@{address:#x}", address, rom[offset:offset + length], ROM)

    def __setitem__(self, register: str, value: int) -> None:
        """Set a register by name; a segment register loads as the current mode loads it."""
        if register in SEGMENT_REGISTERS:
            self._load_segment_register(register, value)
        else:
            self.cpu[register] = value

    def __getitem__(self, register: str) -> int:
        return self.cpu[register]

    def _load_segment_register(self, name: str, selector: int) -> None:
        if not 0 <= selector <= 0xFFFF:
            raise ValueError(f"segment selector {selector:#x} is not 16 bits")
        if not self.cpu.protected or self.cpu.vm86:
            self.cpu.load_segments({name: Segment.real_mode(selector, code=name == "cs")})
            return
        if selector & ~3 == 0 and name != "cs":
            self.cpu.load_segments({name: Segment(selector, 0, 0, 0)})     # a null selector
            return
        try:
            descriptor = self.delivery.read_descriptor(selector, Vector.GP, 0)
        except (GuestFault, SecondStageFault, UnbackedMemory):
            raise ValueError(f"selector {selector:#x} is not in the descriptor table") from None
        self.cpu.load_segments({name: descriptor}, cpl=descriptor.dpl if name == "cs" else None)

    # -- pending events ------------------------------------------------------------------------
    @property
    def long_mode_capable(self) -> bool:
        """qemu64 has long mode (and so the 64-bit state-save map); qemu32 does not."""
        return bool(MODELS[self.cpu_model].ext_edx & LM)

    @property
    def cr4_defined(self) -> int:
        """The CR4 bits the CPU model has: MOV to CR4, VMRUN and RSM refuse the others."""
        return MODELS[self.cpu_model].cr4_defined

    def instructions_now(self) -> int:
        """Instructions retired before the one running now: inside a hook of a counted slice
        (a device reading the clock), Unicorn's count so far; otherwise ``instructions``."""
        if self._slice_counted:
            return self.instructions + ucinternals.emu_counter(self.uc) - 1
        return self.instructions

    @property
    def instructions_if_exact(self) -> int | None:
        return self.instructions if self._instructions_exact else None

    def raise_nmi(self) -> None:
        """An NMI: delivered at the next instruction boundary unless NMIs are blocked (after
        an NMI until its handler's IRET, and in SMM until RSM unless the handler IRETs)."""
        self.nmi_pending = True

    def raise_init(self) -> None:
        """An INIT: held while a feature holds it (in SMM: processed after RSM; GIF = 0) and in
        a guest whose L1 intercepts it (semantics.md §B.3, §C.7); otherwise the CPU resets to
        the reset vector (SMBASE and VM_HSAVE_PA are kept)."""
        self.init_pending = True
        if not self.init_held() and not self.intercepted(ExitCode.INIT):
            self.reset_cpu()

    def raise_intr(self, vector: int) -> None:
        """An external interrupt (INTR) with ``vector``: taken through the IDT at an
        instruction boundary where RFLAGS.IF = 1, GIF = 1 and no interrupt shadow holds it
        (the highest vector first); as L2, L1's INTR intercept decides first (§B.3)."""
        if not 0 <= vector <= 0xFF:
            raise ValueError(f"interrupt vector {vector:#x} is not 0-255")
        self.interrupts.add(vector)
        self._arm_interrupt_window()

    def events_held(self) -> bool:
        for holds in self._holds:
            if holds():
                return True
        return False

    def init_held(self) -> bool:
        if self.events_held():
            return True
        for holds in self._init_holds:
            if holds():
                return True
        return False

    def intercepted(self, exit_code: int) -> bool:
        return self.gate is not None and self.gate.intercepts(exit_code)

    def set_intr_unmasked(self, unmasked: Callable[[], bool]) -> None:
        """``unmasked()`` decides whether INTR can be taken now (SVM's V_INTR_MASKING)."""
        self.intr_unmasked = unmasked

    def _intr_unmasked(self) -> bool:
        return bool(self.cpu["rflags"] & RFLAGS_IF)

    def reset_cpu(self) -> None:
        """INIT: the features reset (SVM leaves guest mode), then the CPU goes to the reset vector."""
        self.init_pending = False
        for reset in self._reset_hooks:
            reset()
        boot_states.boot_bios(self)
        self.halted = False
        self.events.append({"kind": "init", "instructions": self.instructions_if_exact})

    def request_stop_shutdown(self, reason: str) -> None:
        self.request_stop(StopReason.SHUTDOWN, detail=reason)

    def add_interrupt_controller(self, controller: "InterruptController") -> None:
        """A platform's interrupt controller drives INTR: ``intr_pending()`` is its output,
        ``acknowledge()`` the vector it gives when the CPU takes the interrupt."""
        self.interrupt_controllers += (controller,)

    def interrupt_raised(self) -> None:
        """A controller's output rose: make sure the CPU looks when it can take it."""
        self._arm_interrupt_window()

    def _arm_interrupt_window(self) -> None:
        if not INTERRUPT_WINDOW_OPCODES <= self.sites.opcodes:
            self.sites.set_opcodes(self.sites.opcodes | INTERRUPT_WINDOW_OPCODES)

    # -- devices ---------------------------------------------------------------------------------
    def add_mmio(self, base: int, size: int, device: MmioDevice, name: str = "") -> MmioRegion:
        """Map ``device`` (``read(offset, size)``, ``write(offset, size, value)``) at physical
        ``base``..``base + size`` (whole pages, outside RAM and other regions)."""
        for start, end in self.memory.backed_ranges():
            if base < end and start < base + size:
                raise ValueError(f"MMIO region {base:#x}+{size:#x} overlaps memory at {start:#x}-{end:#x}")
        return self.mmio.add(base, size, device, name)

    def remove_mmio(self, region: MmioRegion) -> None:
        """Unmap a region ``add_mmio`` made (a BAR or window the guest moved or disabled)."""
        self.mmio.remove(region, lambda base, size: self.memory.physically(self.uc.mem_unmap, base, size))

    def interrupt_line(self, name: str, vector: int | None = None) -> InterruptLine:
        """A new interrupt line; with ``vector``, each rising edge raises that INTR vector
        (until a platform's interrupt controller takes the line over with ``connect``)."""
        line = InterruptLine(name)
        if vector is not None:
            if not 0 <= vector <= 0xFF:
                raise ValueError(f"interrupt vector {vector:#x} is not 0-255")
            line.connect(lambda level: self.raise_intr(vector) if level else None)
        return line

    def post(self, request: Callable[["Core"], None]) -> None:
        """Run ``request(machine)`` at the next instruction boundary.  Safe from any thread (a
        device's worker, a GUI): the running slice ends soon after."""
        self._posted.append(request)
        self._stop_from_outside(lambda: bool(self._posted))

    def _stop_after_mmio(self) -> None:
        ctx = self.cpu.context.snapshot()
        self._trap_and_stop(_Trap("mmio", flags_in_cc_src=self._flags_in_cc_src(ctx)))

    def arm_opcodes(self, opcodes: frozenset[bytes]) -> None:
        """Flag more opcodes for code sites (a guest's intercepts, say)."""
        if not opcodes <= self.sites.opcodes:
            self.sites.set_opcodes(self.sites.opcodes | opcodes)
            self.cpu.clear_inflight_exception()    # arming flushes; see break_at

    # -- snapshots --------------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """Everything the rest of the run depends on; ``restore`` brings it back exactly."""
        return take_snapshot(self)

    def restore(self, snapshot: Snapshot) -> None:
        restore_snapshot(self, snapshot)

    def forget_translations(self) -> None:
        """Drop what ringminus cached about code and paging (after memory changed wholesale)."""
        self._decoded.clear()
        self.linear.flush()
        self._forget_armed_spaces()
        self._stop = None

    def forget_tlb(self) -> None:
        """Drop every cached translation (INVLPGA, VMRUN's TLB_CONTROL): QEMU's and ringminus's."""
        self.linear.flush()
        self.cpu.fast.flush_tlb()

    def set_second_stage(self, stage: SecondStage | None) -> None:
        """Translate every guest-physical address through ``stage`` from now on (a feature's
        nested paging), or no more (None).  Under a stage ringminus fills Unicorn's TLB itself,
        one Python walk per TLB miss (UC_TLB_VIRTUAL and UC_HOOK_TLB_FILL); without one
        Unicorn's own walker runs at full speed, untouched."""
        if stage is None and self.linear.stage2 is None:
            return
        self.linear.stage2 = stage
        self.memory.tlb_filled_by_hook = stage is not None
        self.uc.ctl_set_tlb_mode(UC_TLB_CPU if stage is None else UC_TLB_VIRTUAL)
        self.cpu.fast.flush_tlb()               # (decoding's TLB keys by the stage; the stage keeps its own)

    # -- services for features (plugins.SERVICES) ---------------------------------------------
    @property
    def stop(self) -> Stop | None:
        """The stop this run will end with, once something asked for one."""
        return self._stop

    def retire(self, count: int = 1) -> None:
        """``count`` instructions retired (a feature executed them)."""
        self.instructions += max(count, 0)

    def record_event(self, record, bounded: bool = True) -> None:
        """Log an event (a dict, or an exit; None: count it, log nothing); ``bounded``: it
        counts against the run's ``max_instructions`` as delivered events do (a loop of exits
        must end)."""
        if bounded:
            self._events_this_run += 1
        if record is not None:
            self.events.append(record)

    @property
    def io_access(self) -> IoAccess | None:
        """The I/O instruction performing the port access a device sees now, else None."""
        io = self._io_access
        return io() if callable(io) else io

    def restamp_stop(self) -> None:
        """The stop asked for reports the current RIP (it was asked mid-instruction)."""
        if self._stop is not None:
            self._stop = replace(self._stop, rip=self.cpu.rip)

    def stop_at(self, reason: StopReason, rip: int, value: int | None = None, detail: str | None = None) -> None:
        """End the run now with this stop (a feature decided it: a #VMEXIT to the caller)."""
        self._stop = Stop(reason, rip, value, detail)

    def instruction_length_at(self, rip: int) -> int:
        """The length of the instruction at CS:``rip`` (1 where it cannot be read)."""
        try:
            code = self.linear.read((self.cpu.segment("cs").base + rip) & MASK_64, 15)
        except (GuestFault, SecondStageFault, UnbackedMemory):
            return 1
        return instruction_length(code, self.cpu.code_bits()) or 1

    def decode_at(self, state: ArchState) -> Instruction | None:
        """The instruction at CS:RIP of ``state`` (None where it cannot be fetched or decoded)."""
        rip = state[At.rip]
        code = self.linear.fetch(state[At.cs_base] + rip, 15, state[At.cr0], state[At.cr3])
        return self._decode(code, ucinternals.code_bits(state[At.hflags]), rip) if code else None

    def _intercept_event(self, event: Event, during: Event | None) -> bool:
        if self.gate is None:
            return False
        exit_ = self.gate.event_exit(event, during)
        if exit_ is None:
            return False
        self.gate.take_exit(exit_)
        return True

    # -- scheduled events, breakpoints, stops, delivery ----------------------------------
    def at_instruction(self, index: int, callback: Callable[["Core"], None]) -> None:
        """Call ``callback(machine)`` once exactly ``index`` instructions have retired (counted
        from the machine's creation).  If the CPU halts first, the event is delivered to the
        halted CPU.  Runs with a pending event count instructions exactly."""
        heapq.heappush(self._scheduled, (index, next(self._sequence), callback))
        self._recount_slice()

    def at_time(self, due_ns: int, callback: Callable[["Core"], None]) -> None:
        """Call ``callback(machine)`` once the clock (``clock.now_ns``) reaches ``due_ns``: at an
        instruction boundary, or — the CPU halted — after the time it waits (the clock moves
        on while the CPU is halted; the instruction count does not)."""
        heapq.heappush(self._timers, (due_ns, next(self._sequence), callback))
        self._recount_slice()

    def time_ns(self) -> int:
        """Virtual time: one nanosecond per instruction retired, plus the time spent halted."""
        return self.instructions_now() + self.idle_ns

    def _recount_slice(self) -> None:
        """An event was scheduled from a device's hook: the running slice's count may be too
        long, so it ends after this instruction (inside an MMIO access, the bus ends it:
        its way completes the instruction exactly once)."""
        if self._slice_counted and self._trap is None:
            if self.mmio.in_access:
                self._slice_recount = True
            else:
                self._trap_and_stop(_Trap("resume"))

    def break_at(self, address: int) -> None:
        """Stop with reason ``breakpoint`` before the instruction at linear ``address`` runs."""
        if address not in self._breakpoints:
            self._breakpoints[address] = self.uc.hook_add(UC_HOOK_CODE, self._on_breakpoint, begin=address, end=address)
            self.uc.ctl_remove_cache(address, address + 1)
            # Unicorn finds a flushed address through the guest's page tables; where they map
            # nothing, QEMU raises a #PF that nobody takes and leaves it in flight, and the
            # guest's next fault would be reported as #DF (unicorn.md §3).  Forget it.
            self.cpu.clear_inflight_exception()

    def _on_breakpoint(self, uc: Uc, address: int, size: int, _data) -> None:
        if address == self._resuming_at_breakpoint:      # the run starts where it stopped
            self._resuming_at_breakpoint = None
            return
        self._trap_and_stop(_Trap("breakpoint", address=address))

    def request_stop(self, reason: StopReason = StopReason.STOPPED, value: int | None = None,
                     detail: str | None = None) -> None:
        """End the run after the current instruction (devices and user handlers call this)."""
        if self._stop is None:
            self._stop = Stop(reason, self.cpu.rip, value, detail)

    def stop_on_output(self, text: bytes | None) -> None:
        """End a run with reason ``output`` once ``text`` appears in what the guest wrote to
        an output device (the debug console; a board's serial port), None: never."""
        self._awaited_output = text or None

    def add_output_source(self, name: str, output: Callable[[], bytes]) -> None:
        """An output device ``stop_on_output`` watches (it calls ``output_written``)."""
        self._output_sources += ((name, output),)

    def output_written(self) -> None:
        """An output device wrote: stop if the awaited text is there now."""
        text = self._awaited_output
        if text is None or self._stop is not None:
            return
        for name, output in self._output_sources:
            data = output()
            if data.find(text, max(0, len(data) - len(text) - 256)) >= 0:
                self.request_stop(StopReason.OUTPUT, detail=f"{text.decode('latin-1')!r} on the {name}")
                return

    def interrupt(self) -> None:
        """End the current run — or the next one, if none is running — with reason
        ``interrupted``, at the next point the emulator can stop.  Safe from any thread:
        Unicorn runs with the GIL released, so a signal handler never runs during a tight
        guest loop, but a thread that waits for the signal can call this (the CLI does)."""
        self._interrupt_requested = True
        self._stop_from_outside(lambda: self._interrupt_requested)

    @classmethod
    def interrupt_all(cls) -> None:
        """``interrupt()`` every machine of this process that is running now (a signal is
        the process's: the harness's Ctrl-C ends whichever vector runs)."""
        for machine in list(cls._running_machines):
            machine.interrupt()

    def _stop_from_outside(self, unseen: Callable[[], bool]) -> None:
        """End the running slice for a request made from another thread.  A stop that falls
        between two slices is lost: a helper thread repeats it while the run goes on and the
        loop has not seen the request (``unseen()``)."""
        self.uc.emu_stop()
        if self._running:
            threading.Thread(target=self._repeat_stop, args=(unseen,), daemon=True).start()

    def _repeat_stop(self, unseen: Callable[[], bool]) -> None:
        while unseen() and self._running:
            self.uc.emu_stop()
            time.sleep(0.01)

    def deliver(self, event: Event, injected: bool = False, logged: bool = True) -> None:
        """Deliver an event through the IVT/IDT now (wakes a halted CPU).  ``injected``:
        VMRUN's EVENTINJ, which L1's exception intercepts do not see; ``logged``: recorded in
        ``events`` (else only counted)."""
        self.halted = False
        # The breakpoint a run started at is passed once; an event leaves it, and coming back
        # is a new arrival (a faulting instruction there never fires its code hook).
        self._resuming_at_breakpoint = None
        self._events_this_run += 1
        record = {"kind": event.kind.value, "vector": event.vector, "rip": event.instruction_rip
                  if event.instruction_rip is not None else event.return_rip}
        if event.error_code is not None and event.pushes_error_code:
            record["error_code"] = event.error_code
        if event.cr2 is not None:
            record["cr2"] = event.cr2
        if logged:
            self.events.append(record)
        try:
            delivered = self.delivery.deliver(event, injected)
        except Unsupported as why:
            self.request_stop(StopReason.UNSUPPORTED, detail=str(why))
            delivered = None
        except UnbackedMemory as missing:
            self.request_stop(StopReason.MEMORY, missing.address, f"delivering vector {event.vector}: {missing}")
            delivered = None
        # Delivered or abandoned (the run stops), the event is no longer in flight: left
        # marked, a fault of the instruction run again would be taken for a #DF (seed 3533083).
        self.cpu.clear_inflight_exception()
        if delivered is None:
            return
        if delivered is Delivered.SHUTDOWN:
            shutdown = self.gate.shutdown_exit(self.cpu.rip) if self.gate else None
            if shutdown is not None:
                self.gate.take_exit(shutdown)
            else:
                self.request_stop(StopReason.SHUTDOWN, detail=f"triple fault while delivering vector {event.vector}")
        elif delivered is Delivered.DELIVERED:
            self.stats["exceptions_delivered" if event.kind is EventKind.EXCEPTION else "interrupts_delivered"] += 1

    # -- Unicorn hooks (they record and stop; the run loop acts) ---------------------------
    def _fetch_from_stale_tlb(self, address: int) -> bytes | None:
        """The code at a site that ringminus's walk of the guest's tables does not reach:
        Unicorn runs it from a TLB entry the tables no longer give.  Where QEMU's TLB lacks it
        too, its walk failed and left the fetch's #PF pending: the slice stops here and takes
        it before the instruction, returning to the instruction itself."""
        code, faulted = self.linear.fetch_as_executed(address, 15)
        if faulted:
            ctx = self.cpu.context.snapshot()
            ctx.put_u64(ucinternals.EXCEPTION_NEXT_EIP, ctx.u64(ucinternals.EIP))
            ctx.put_i32(ucinternals.EXCEPTION_IS_INT, 0)
            ctx.commit()
            self._trap_and_stop(_Trap("refetch"))
            return None
        return code

    def _trap_and_stop(self, trap: _Trap) -> None:
        self._trap = trap
        self.uc.emu_stop()

    def _on_interrupt(self, uc: Uc, intno: int, _data) -> None:
        ctx = self.cpu.context.snapshot()
        if intno != Vector.DB and not ctx.i32(ucinternals.EXCEPTION_IS_INT):
            self._repair_flags_at_fault(ctx)
        self._trap_and_stop(_Trap("exception", vector=intno, error_code=ctx.i32(ucinternals.ERROR_CODE) & 0xFFFFFFFF,
                                  software=bool(ctx.i32(ucinternals.EXCEPTION_IS_INT)),
                                  cr2=ctx.u64(ucinternals.CR + 2 * 8)))

    def _going_on_after_sync(self, flags_in_cc_src: bool) -> bool:
        """A memory hook lets its instruction go on: Unicorn restored the state before calling
        it (``_repair_synced_flags``), so the flags are put back as ``_flags_in_cc_src`` says."""
        if flags_in_cc_src:
            self._take_flags_from_cc_src(self.cpu.context.snapshot())
        return True

    def _repair_synced_flags(self) -> None:
        """Inside the callback of a CPUID, RDTSC(P) or memory hook, which Unicorn calls after
        restoring the CPU state from the instruction's start record: that record holds the
        lazy-flags operation from before a code hook's prologue folded the flags into cc_src,
        and the instruction and its block go on with it (a CPUID then INVLPG under a count lost
        CF: replay seed 3505518).  Where a code hook covers the instruction, the flags are
        cc_src's."""
        ctx = self.cpu.context.snapshot()
        if self._hooked_at(self._linear_pc(ctx)):
            self._take_flags_from_cc_src(ctx)

    @staticmethod
    def _linear_pc(ctx) -> int:
        return (ctx.segment("cs").base + ctx.u64(ucinternals.EIP)) & MASK_64

    def _hooked_at(self, pc: int) -> bool:
        """Whether a code hook covers the instruction at ``pc``: the count hook, a trace, a code
        site or a breakpoint (Unicorn compiles each in with a prologue that folds the flags
        into cc_src)."""
        return (ucinternals.emu_counter(self.uc) > 0 or self._tracing or pc in self.sites.armed
                or pc in self._breakpoints)

    def _flags_in_cc_src(self, ctx) -> bool:
        """Unicorn bug (its PR #2373): an instruction that computes RFLAGS into cc_src before
        it faults — one a code hook covers (the count hook, a trace, a code site, a
        breakpoint), or RCL/RCR of memory, which needs CF first — gets back its earlier
        lazy-flags operation at the fault, which then misreads cc_src.  True when so: the
        flags before the faulting instruction (``ctx`` is at it) are cc_src's."""
        pc = self._linear_pc(ctx)
        if self._hooked_at(pc):
            return True
        code = self.linear.fetch(pc, 4, ctx.u64(ucinternals.CR), ctx.u64(ucinternals.CR + 24)) or b""
        bits = ucinternals.code_bits(ctx.u32(ucinternals.HFLAGS))
        at = next((i for i, byte in enumerate(code) if not is_prefix(byte, bits)), len(code))
        return len(code) > at + 1 and code[at] in ROTATES and code[at + 1] < 0xC0 and (code[at + 1] >> 3) & 7 in (2, 3)

    def _repair_flags_at_fault(self, ctx) -> None:
        """Inside the hook of a fault or an invalid opcode: undo Unicorn's misread, if any."""
        if self._flags_in_cc_src(ctx):
            self._take_flags_from_cc_src(ctx)

    @staticmethod
    def _take_flags_from_cc_src(ctx) -> None:
        """Make QEMU's lazy flags "cc_src holds RFLAGS" in the CPU (``ctx`` is its copy now)."""
        ctx.put_i32(ucinternals.CC_OP, ucinternals.CC_OP_EFLAGS)
        ctx.commit()

    def _rflags_from_cc_src(self) -> None:
        """After a slice ended at such a fault (its exit already folded the misread flags into
        RFLAGS): the arithmetic flags are cc_src's."""
        ctx = self.cpu.context.snapshot()
        arithmetic = ucinternals.ARITHMETIC_FLAGS
        self.cpu["rflags"] = ctx.u64(ucinternals.EFLAGS) & ~arithmetic | ctx.u64(ucinternals.CC_SRC) & arithmetic

    def _on_invalid_opcode(self, uc: Uc, _data) -> bool:
        if self._switch_in_hooks and self._hook_executors:     # RSM, VMRUN: a world switch right here
            hook = HookContext(self.cpu.capture(rflags=False), self.cpu)     # RFLAGS if asked
            insn = self._hook_instruction(hook.state_without_rflags)
            execute = self._hook_executors.get(insn.row.name) if insn is not None else None
            if execute is not None and execute(insn, hook):
                if insn.row.name in self._leading_rows:
                    self._chain_in_hook()
                return True
        self._repair_flags_at_fault(self.cpu.context.snapshot())
        self._trap_and_stop(_Trap("invalid"))
        return True

    def _hook_instruction(self, state: ArchState) -> Instruction | None:
        """The instruction at CS:RIP of ``state`` if a hook executor may run it.  The #UD hook
        fires for every opcode Unicorn lacks: when the executors' rows have fixed bytes, only
        those bytes (unprefixed) are fetched and decoded; anything else goes to the run loop."""
        encodings = self._hook_encodings
        if encodings is None:
            return self.decode_at(state)
        rip = state[At.rip]
        code = self.linear.fetch(state[At.cs_base] + rip, self._hook_encoding_length, state[At.cr0], state[At.cr3])
        if code is None:
            return None
        for encoding in encodings:
            if code.startswith(encoding):
                return self._decode(encoding, ucinternals.code_bits(state[At.hflags]), rip)
        return None

    def continue_in_hook(self, hook: HookContext | None = None) -> None:
        """After a hook executed the instruction itself: take a pending event that can be
        taken right here (an SMI), or end the slice when the run must stop or the run loop has
        an event to deliver.  ``hook``: the registers after the instruction, if the hook
        still holds them current."""
        pending = self._first_pending()
        if (pending is not None and pending.take_in_hook is not None and self._stop is None and self.gate is None
                and not self.events_held() and pending.ready(self)):
            pending.take_in_hook(self, hook)
            pending = self._first_pending()
        if self._stop is not None or self.halted or pending is not None \
                or not self._rearm_if_address_space_changed(only_if_cheap=True):
            self._trap_and_stop(_Trap("resume"))

    def _chain_in_hook(self) -> None:
        """A hook has just executed an instruction that leads on (add_executor), or taken an
        exit into L1, and the CPU goes on: while the next instruction is one a hook executor
        runs — a hypervisor's CLGI; VMLOAD; VMRUN, or VMSAVE; STGI after the #VMEXIT —
        execute it here as well, saving a hook call and Unicorn's leaving its block for each.
        Only where nothing could come between them: no trap, stop or guest mode, and no
        breakpoint, single-step or debug register that the skipped hooks would have honoured.
        Where the next instruction was none to run here the last time (after an exit: L1's
        code after its VMRUN), the look is not taken again: not chaining is always correct,
        it only costs a hook."""
        for _ in range(CHAIN_LIMIT):
            if self._trap is not None or self._stop is not None or self.gate is not None or self.halted \
                    or not self._switch_in_hooks or self._stepping_over is not None:
                return
            rip = self.cpu.rip
            if rip in self._nothing_to_chain_at:
                return
            hook = HookContext(self.cpu.capture())
            state = hook.state
            if state[At.rflags] & RFLAGS_TF or state[At.dr7] & DR7_ENABLES or \
                    (state[At.cs_base] + rip) & MASK_64 in self._breakpoints:
                return
            insn = self._hook_instruction(state)
            execute = self._hook_executors.get(insn.row.name) if insn is not None else None
            if execute is None:
                if len(self._nothing_to_chain_at) > 4096:
                    self._nothing_to_chain_at.clear()
                self._nothing_to_chain_at.add(rip)
                return
            if not execute(insn, hook) or insn.row.name not in self._leading_rows:
                return

    def _first_pending(self) -> Source | None:
        """The first event source with an event pending (the run loop must look at it before
        the next instruction), in priority order."""
        for source in self._sources:
            if source.pending(self):
                return source
        return None

    def _boundary_work(self) -> bool:
        return self._first_pending() is not None

    def _on_bad_memory(self, uc: Uc, access: int, address: int, size: int, value: int, _data) -> bool:
        # Unicorn restored the state from the instruction's start record before calling this
        # (``_repair_synced_flags``): an access that ends the slice has its flags repaired once
        # the slice has ended (Unicorn restores it again), one that goes on here.
        repair = access not in (UC_MEM_FETCH_UNMAPPED, UC_MEM_FETCH_PROT) \
            and self._flags_in_cc_src(self.cpu.context.snapshot())
        for hidden_at, reveal in self._miss_handlers:
            if not hidden_at(address):
                continue
            if access not in (UC_MEM_READ_UNMAPPED, UC_MEM_WRITE_UNMAPPED):     # a fetch: run it again
                self._trap = _Trap("miss", address=address, flags_in_cc_src=repair, handler=reveal)
                return False
            # Map the view now and go on: Unicorn looks the address up again.  (Ending the
            # slice to run the instruction again would restart it from a stale EIP where
            # Unicorn did not sync it before the access — inside a REP MOVS, say.)
            reveal(address)
            if self.memory.fast.read_memory(address, 1) is not None:
                return self._going_on_after_sync(repair)
            break                                   # the view shows nothing there

        if access == UC_MEM_WRITE_PROT:          # ROM: the write is dropped, as QEMU drops it
            self.stats["rom_writes_ignored"] += 1
            return self._going_on_after_sync(repair)
        self._trap = _Trap("memory", address=address, detail=f"access to unbacked memory at {address:#x}",
                           flags_in_cc_src=repair)
        return False

    def _on_tlb_fill(self, uc: Uc, page: int, access: int, entry, _data) -> bool:
        """A TLB miss under a second stage: ringminus walks both stages (paging.fill).  A
        refusal — the guest's #PF or the stage's exit — is taken once Unicorn has ended the
        slice (it restored the faulting instruction's state before calling this), where the
        access's whole address is known (``_after_refused_fill``).  Outside a slice the
        miss is Unicorn's own lookup (hook_del, ctl_remove_cache drop translations by
        address): answered without side effects, a refusal ignored."""
        try:
            entry.paddr, entry.perms = (self.linear.fill if self._in_slice else self.linear.look_up)(page, access)
            return True
        except (GuestFault, SecondStageFault):
            if not self._in_slice:
                return False
        repair = access != UC_MEM_FETCH and self._flags_in_cc_src(self.cpu.context.snapshot())
        self._trap = _Trap("refused fill", address=page, outcome=access, flags_in_cc_src=repair)
        return False

    def _on_cpuid(self, uc: Uc, _data) -> int:
        """CPUID answers from the table a feature gives (svm/cpuid.py), not Unicorn's Haswell."""
        self._repair_synced_flags()
        read, write = self.cpu.fast.read, self.cpu.fast.write
        values = self._cpuid().get(read(X.UC_X86_REG_EAX) & 0xFFFF_FFFF, (0, 0, 0, 0))
        if isinstance(values, dict):                # a leaf with subleaves, by ECX
            subleaf = read(X.UC_X86_REG_RCX) & 0xFFFF_FFFF
            values = values.get(subleaf, values.get(None, (0, 0, 0, 0)))
        for register, value in zip((X.UC_X86_REG_RAX, X.UC_X86_REG_RBX, X.UC_X86_REG_RCX, X.UC_X86_REG_RDX), values):
            write(register, value)
        return 1                                  # the native CPUID is skipped

    def _on_in(self, uc: Uc, port: int, size: int, _data) -> int:
        return self.ports.read(port, size)

    def _on_out(self, uc: Uc, port: int, size: int, value: int, _data) -> None:
        """Unicorn's OUT: an OUT to a port no precise device claims, and OUTS (one call per
        iteration, the registers as they were before it).  What the write leaves pending is
        taken right after it, as after an emulated OUT: the slice ends there."""
        self._io_access = lambda: self._io_access_at_hook(port, size)     # made only if a device asks
        try:
            self.ports.write(port, size, value)
        finally:
            self._io_access = None
        if self._stop is not None or self._boundary_work():
            self._trap_and_stop(_Trap("resume"))

    def _io_access_at_hook(self, port: int, size: int) -> IoAccess:
        """The I/O instruction whose OUT hook runs (RIP at it): OUT, OUTS or REP OUTS."""
        state = self.cpu.capture()
        insn = self.decode_at(state)
        string = insn is not None and insn.row.name in ("outs", "outs_wide")
        return IoAccess((state[At.rip], state[At.rcx], state[At.rsi], state[At.rdi]), port, read=False, size=size,
                        string=string, repeat=string and insn.prefixes.rep)

    def _on_site(self, uc: Uc, address: int, size: int, _data) -> None:
        if address in self._breakpoints and address != self._resuming_at_breakpoint:
            return          # the breakpoint stops the run before this instruction (whichever hook runs first)
        ctx = self.cpu.context.snapshot()           # one copy serves mode, RIP, CR0 and CR3
        code = self.linear.fetch(address, 15, ctx.u64(ucinternals.CR), ctx.u64(ucinternals.CR + 24))
        if code is None:
            code = self._fetch_from_stale_tlb(address)
            if code is None:
                return
        bits = ucinternals.code_bits(ctx.u32(ucinternals.HFLAGS))
        insn = self._decode(code, bits, ctx.u64(ucinternals.EIP))
        if insn is not None:
            if self.gate is not None and self._check_at_site(insn):
                return
            name = insn.row.name
            execute = self._hook_executors.get(name) if self._switch_in_hooks else None
            if execute is not None and execute(insn, HookContext(self.cpu.capture(context_is_current=True))):
                if name in self._leading_rows:
                    self._chain_in_hook()
                return
            if name in MSR_ROWS and self._kept_msr(ctx.u64(ucinternals.GPRS + 8) & 0xFFFF_FFFF) is not None:
                self._trap_and_stop(_Trap("msr", address=address, outcome=insn))
                return
            if name == "mov_to_cr" and self._cr_write_refused(insn, ctx, self.cr4_defined):
                self._trap_and_stop(_Trap("fault", outcome=GuestFault(Vector.GP, 0)))    # Unicorn would take it
                return
            changes_space = name == "mov_to_cr" and self._changes_address_space(insn, ctx)
            opens_window = name in INTERRUPT_WINDOW_ROWS and boundary.waiting(self)
            if changes_space or opens_window:
                if self._stepping_over != address:       # run it alone, then look again
                    self._trap_and_stop(_Trap("step", address=address, detail="paging" if changes_space else ""))
                    return
                self._stepping_over = None
        if insn is None or insn.row.name not in PORT_OUT_ROWS:
            return
        port = insn.immediate if insn.immediate is not None else ctx.u64(ucinternals.GPRS + 2 * 8) & 0xFFFF
        if not self.ports.is_precise(port):
            return
        if self._switch_in_hooks:
            after = self._emulate_out(insn, port, self.cpu.capture(context_is_current=True))
            self.continue_in_hook(HookContext(after) if after is not None else None)
        else:
            self._trap_and_stop(_Trap("port", address=address, port=port, outcome=insn))

    def _kept_msr(self, msr: int) -> Msr | None:
        return next((kept for kept in self._msrs if kept.handles(msr)), None)

    @staticmethod
    def _changes_address_space(insn: Instruction, ctx) -> bool:
        """A MOV to CR0 that turns paging on or off, or to CR3 or CR4 with paging on (a switch
        between real and protected mode alone, as firmware makes thousands, does not)."""
        cr0 = ctx.u64(ucinternals.CR)
        if insn.reg == 0:
            return bool((cr0 ^ ctx.u64(ucinternals.GPRS + 8 * insn.rm)) & CR0_PG)
        return insn.reg in (3, 4) and bool(cr0 & CR0_PG)

    @staticmethod
    def _cr_write_refused(insn: Instruction, ctx, cr4_defined: int) -> bool:
        """Unicorn executes MOV to CR without the architecture's checks (it keeps reserved
        CR4 bits, say): they are made here, on the registers of the hook's context copy."""
        value = ctx.u64(ucinternals.GPRS + 8 * insn.rm) & (MASK_64 if insn.bits == 64 else 0xFFFF_FFFF)
        return cr_write_refused(insn.reg, value, ctx.u64(ucinternals.CR), ctx.u64(ucinternals.CR + 4 * 8),
                                ctx.u64(ucinternals.EFER), cr4_defined)

    def _decode(self, code: bytes, bits: int, rip: int) -> Instruction | None:
        """Decode once per (address, bytes, mode) — DESIGN.md §3."""
        key = (rip, bits)
        cached = self._decoded.get(key)
        if cached is None or cached[0] != code:
            if len(self._decoded) > 65536:
                self._decoded.clear()
            self._decoded[key] = cached = (code, decode(code, bits, rip))
        return cached[1]

    def _check_at_site(self, insn: Instruction) -> bool:
        """Run the guest-mode gate before an intercepted instruction executes.  True when the
        instruction has been dealt with (an exit, a fault, or skipped)."""
        if insn.row.intercept is None:
            return False
        gate, version = self.gate, self.cpu.version
        outcome = gate.check(insn)
        if outcome is None:
            return False
        if isinstance(outcome, GuestFault):
            self._trap_and_stop(_Trap("fault", outcome=outcome))
        elif gate.on_exit is OnExit.SKIP:
            gate.take_exit(outcome)                # moves RIP past it; Unicorn honours the write
        elif gate.on_exit is OnExit.L1 and self._switch_in_hooks:
            current = self.cpu.version == version             # the hook's context copy
            gate.take_exit(outcome, HookContext(self.cpu.capture(context_is_current=current)))   # #VMEXIT, here
            self.continue_in_hook()
            self._chain_in_hook()
        else:
            self._trap_and_stop(_Trap("exit", outcome=outcome))
        return True

    # -- running ---------------------------------------------------------------------------
    def run(self, max_instructions: int | None = None, timeout: float | None = None,
            trace: TextIO | None = None) -> RunResult:
        """Run until a stop reason (result.py).  ``max_instructions`` counts from this call and
        bounds the events delivered and exits taken as well, so a loop in which nothing
        retires (a fault whose handler faults again) ends with ``limit`` too."""
        if max_instructions is not None and (not isinstance(max_instructions, int) or max_instructions < 0):
            raise ValueError(f"max_instructions must be a whole number >= 0, not {max_instructions!r}")
        if timeout is not None and not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"timeout must be a finite number of seconds > 0, not {timeout!r}")
        limit = None if max_instructions is None else self.instructions + max_instructions
        deadline = None if timeout is None else time.monotonic() + timeout
        counting = self.exact_instructions or limit is not None or bool(self._scheduled) or bool(self._timers)
        if not counting:
            self._instructions_exact = False
        trace_hook = self._add_trace(trace) if trace else None
        self._tracing = trace_hook is not None
        self._stop = None
        self.has_run = True
        for starting in self._run_hooks:
            starting()
        if self.cpu.paging_epoch != self._armed_epoch:     # the caller changed paging registers
            self._forget_armed_spaces()
        pc = (self.cpu.segment("cs").base + self.cpu.rip) & 0xFFFF_FFFF_FFFF_FFFF
        # Only the breakpoint the machine stopped at is passed (a run can start at another
        # one, after a limit say: it stops there at once).
        self._resuming_at_breakpoint = pc if pc == self._resuming_at_breakpoint else None
        watchdog = None if timeout is None else _Watchdog(self.uc, timeout)
        if watchdog is not None:
            watchdog.start()
        self._events_this_run, self._running = 0, True
        self._running_machines.add(self)
        try:
            while self._stop is None:
                try:
                    self._step(limit, max_instructions, deadline, counting)
                except MissingMemory as missing:     # ringminus's own access reached nothing
                    self._stop = Stop(StopReason.MEMORY, self.cpu.rip, getattr(missing, "address", None),
                                      f"ringminus's own access: {missing}")
        finally:
            self._running = False
            self._running_machines.discard(self)
            if watchdog is not None:
                watchdog.cancel()
            if trace_hook is not None:
                self.uc.hook_del(trace_hook)
            self._tracing = self._switch_in_hooks = False
            self._armed_epoch = self.cpu.paging_epoch   # what a caller changes between runs shows
        return self.result()

    def result(self) -> RunResult:
        stats = dict.fromkeys(self._stat_keys, 0)
        stats.update(self.stats)
        stats.update(self.ports.stats)
        stats["unclaimed_ports"] = sorted(self.ports.unclaimed) if self.ports.unclaimed else []
        stats["code_sites"] = len(self.sites.armed)
        stats["events_unlisted"] = self.events.unlisted
        stats.update((name, value()) for name, value in self._reported_stats)
        stop = self._stop or Stop(StopReason.STOPPED, self.cpu.rip)
        return RunResult(stop, self.cpu.snapshot(), bytes(self.console.output), self.instructions_if_exact,
                         stats, tuple(self.events), tuple(section(stop) for section in self._sections))

    def resume(self, ret: int | None = None, max_instructions: int | None = None,
               timeout: float | None = None, trace: TextIO | None = None) -> RunResult:
        """Run on.  ``ret`` completes what the last stop left pending (a forwarded
        hypercall's result: hypercalls/conduit.py).  ``max_instructions`` counts from this call:
        the completed instruction is one of them."""
        start = self.instructions
        if not any(resume(ret) for resume in self._resume_handlers) and ret is not None:
            raise ValueError("nothing to complete with a value: the last run did not stop for a hypercall")
        if max_instructions is not None and isinstance(max_instructions, int):
            max_instructions = max(0, max_instructions - (self.instructions - start))
        return self.run(max_instructions, timeout, trace)

    def _fire_due_events(self) -> None:
        while self._scheduled and self._scheduled[0][0] <= self.instructions and self._stop is None:
            _, _, callback = heapq.heappop(self._scheduled)
            callback(self)
        while self._timers and self._timers[0][0] <= self.time_ns() and self._stop is None:
            _, _, callback = heapq.heappop(self._timers)
            callback(self)

    def _next_event_index(self) -> int | None:
        """The instruction count at which the next scheduled event or timer is due."""
        due = [self._scheduled[0][0]] if self._scheduled else []
        if self._timers:
            due.append(self._timers[0][0] - self.idle_ns)      # time moves one ns per instruction
        return min(due) if due else None

    def _wait_while_halted(self) -> bool:
        """The halted CPU waits for its next event: a timer after the time until it is due,
        else an instruction-indexed event at once.  False: nothing will ever come.  With
        interrupts masked (CLI; HLT) a device's timer cannot wake it: the run ends there."""
        timer = self._timers[0][0] if self._timers and self.intr_unmasked() else None
        index = self._scheduled[0][0] if self._scheduled else None
        if timer is not None and (index is None or timer <= index + self.idle_ns):
            self.idle_ns += max(0, timer - self.time_ns())
            _, _, callback = heapq.heappop(self._timers)
        elif index is not None:
            _, _, callback = heapq.heappop(self._scheduled)
        else:
            return False
        callback(self)
        return True

    def _step(self, limit: int | None, max_instructions: int | None, deadline: float | None,
              counting: bool) -> None:
        if self._interrupt_requested:
            self._interrupt_requested = False
            self._stop = Stop(StopReason.INTERRUPTED, self.cpu.rip)
            return
        while self._posted:
            self._posted.popleft()(self)
        self._fire_due_events()
        if self._stop is not None:
            return
        if not boundary.take_pending_event(self):
            return
        if self.halted:
            if limit is not None and self._events_this_run > max_instructions:
                self._stop = Stop(StopReason.LIMIT, self.cpu.rip)      # a halted loop of timer wake-ups
            elif self._wait_while_halted():
                self._events_this_run += 1
            else:
                self._stop = Stop(StopReason.HLT, self.cpu.rip)
            return
        if limit is not None and (self.instructions >= limit or self._events_this_run > max_instructions):
            self._stop = Stop(StopReason.LIMIT, self.cpu.rip)
            return
        budget = 0
        # An interrupt held only by the STI/MOV SS shadow: run the one instruction the shadow
        # covers, then end the shadow (Unicorn clears it only where a block ends normally).
        waiting = boundary.waiting(self)
        if waiting:                                 # a virtual interrupt too: STI/POPF/IRET must be sites
            self._arm_interrupt_window()
        shadow_step = waiting and self.cpu.interrupt_shadow
        if self._stepping_over is not None or shadow_step:
            budget, counting = 1, True              # run one instruction alone, then look again
        else:
            if counting and self.instructions >= self._next_eviction:
                self._evict_cold_sites()
            self._rearm_if_address_space_changed()
            if counting:                            # Unicorn counts only with a count
                targets = [t for t in (limit, self._next_event_index()) if t is not None]
                budget = min(targets) - self.instructions if targets else UNBOUNDED_COUNT
                budget = min(budget, EVICTION_INTERVAL)         # so that cold hooks are looked at
        if deadline is not None and time.monotonic() >= deadline:
            self._stop = Stop(StopReason.TIMEOUT, self.cpu.rip)
            return
        self._trap = None
        self.mmio.slice_starts()
        self._switch_in_hooks = not counting and not self._tracing and (
            self.gate is None or self.gate.on_exit is OnExit.L1)
        error = None
        self._slice_counted, self._slice_recount, self._in_slice = counting, False, True
        try:
            self.uc.emu_start(self.cpu.rip, 0, count=budget)
        except UcError as e:
            error = e
        self._slice_counted = self._in_slice = False
        self.stats["slices"] += 1
        started = ucinternals.emu_counter(self.uc) if counting else 0
        if shadow_step and self._stepping_over is None and (self._trap is None or self._trap.kind not in _BEFORE_IT):
            self.cpu.interrupt_shadow = False       # the shadowed instruction is done (or faulted)
        self._after_slice(error, budget, started, deadline)

    def _evict_cold_sites(self) -> None:
        """Counted slices pay for every code hook at every instruction (sites.py): drop the
        hooks of code that has not run since the last look, every EVICTION_INTERVAL."""
        self._next_eviction = self.instructions + EVICTION_INTERVAL
        self.sites.evict_cold()
        self.cpu.clear_inflight_exception()    # dropping translations; see break_at

    def _rearm_if_address_space_changed(self, only_if_cheap: bool = False) -> bool:
        """Sites are armed as Unicorn translates code, at the linear address it runs at
        (sites.py); what a hook cannot do safely inside Unicorn — merging ranges, translating
        again after sites were added — is owed to the run loop and done here, between
        slices, once per address space and count of sites.  False when that work is owed
        but ``only_if_cheap`` forbade it."""
        space = self.cpu.address_space()
        sites = len(self.sites.physical)
        if space == self._address_space and self._armed_spaces.get(space) == sites:
            return True
        if self._armed_spaces.get(space) != sites:                 # new space, or new sites
            if only_if_cheap:
                return False
            self.sites.remap()
            self.cpu.clear_inflight_exception()    # arming flushes; see break_at
            self._armed_spaces[space] = sites
        self._address_space = space
        return True

    def _forget_armed_spaces(self) -> None:
        """Page tables may have changed: the next address space is armed afresh."""
        self._address_space = None
        self._armed_spaces.clear()

    def _after_slice(self, error: UcError | None, budget: int, started: int, deadline: float | None) -> None:
        """Act on why the slice ended: the trap a hook recorded (``_AFTER_TRAP``), else an
        error from Unicorn, else a limit, a stop, a timeout, a HLT — or nothing ringminus
        knows (``ended``).  ``started``: instructions the slice began (0 when uncounted)."""
        trap = self._trap
        if trap is not None:
            if trap.flags_in_cc_src:
                self._rflags_from_cc_src()
            if error is None or trap.kind in ("miss", "memory", "refused fill"):
                self._AFTER_TRAP[trap.kind](self, trap, started)
                return
        if error is not None:
            self.retire(started - 1)
            self._stop = Stop(StopReason.UNSUPPORTED, self.cpu.rip, detail=f"Unicorn: {error}")
        elif budget and started > budget:
            self.retire(budget)                        # a limit or an event is due
        elif self._stop is not None or self._interrupt_requested or self._posted:   # the next step acts
            self.retire(started - 1)
        elif deadline is not None and time.monotonic() >= deadline:
            self.retire(started - 1)
            self._stop = Stop(StopReason.TIMEOUT, self.cpu.rip)
        elif self._follows_hlt():
            self.retire(started)                       # HLT retired; the CPU is halted
            self.halted = True
        else:
            self.retire(started - 1)
            self._stop = Stop(StopReason.ENDED, self.cpu.rip, detail="Unicorn ended the slice for no reason "
                              "ringminus knows (no HLT before RIP): an emu_stop() from outside?")

    # What the run loop does after each kind of trap.  All but "exception" and "resume" stopped
    # before the trapping instruction completed: the slice retired one fewer than it began.
    def _after_miss(self, trap: _Trap, started: int) -> None:
        self.retire(started - 1)
        trap.handler(trap.address)                  # map the view: the instruction runs again

    def _after_memory(self, trap: _Trap, started: int) -> None:
        self.retire(started - 1)
        self._stop = Stop(StopReason.MEMORY, self.cpu.rip, trap.address, trap.detail)

    def _after_invalid(self, trap: _Trap, started: int) -> None:
        self.retire(started - 1)
        self._on_invalid_trap()

    def _after_port(self, trap: _Trap, started: int) -> None:
        self.retire(started - 1)
        self._emulate_out(trap.outcome, trap.port, self.cpu.capture())

    def _after_msr(self, trap: _Trap, started: int) -> None:
        self.retire(started - 1)
        self._emulate_msr(trap.outcome)

    def _after_step(self, trap: _Trap, started: int) -> None:
        self.retire(started - 1)
        self._stepping_over = trap.address
        if trap.detail == "paging":
            self._forget_armed_spaces()     # even a reload of the same CR3 flushes the TLB
            self.linear.flush()

    def _after_refetch(self, trap: _Trap, started: int) -> None:
        """Unicorn did not take the pending #PF: drop its TLB, so the fetch walks afresh."""
        self.retire(started - 1)
        self.cpu.fast.flush_tlb()

    def _after_mmio(self, trap: _Trap, started: int) -> None:
        """An MMIO access left a stop or an event: Unicorn restarted its instruction, which
        now runs alone with the device's part already done (mmio.py), and retires."""
        self.retire(started - 1)
        rip = self.cpu.rip
        self._resuming_at_breakpoint = (self.cpu.segment("cs").base + rip) & MASK_64
        self.mmio.completing(True)
        try:
            self._trap = None
            error = None
            self._in_slice = True
            try:
                self.uc.emu_start(rip, 0, count=1)
            except UcError as e:
                error = e
            finally:
                self._in_slice = False
            self.stats["slices"] += 1
            self._after_slice(error, 1, ucinternals.emu_counter(self.uc), None)
        finally:
            self.mmio.completing(False)

    def _after_resume(self, trap: _Trap, started: int) -> None:
        self.retire(started)                # a hook finished the instruction; the loop acts

    def _after_breakpoint(self, trap: _Trap, started: int) -> None:
        self.retire(started - 1)
        self._stop = Stop(StopReason.BREAKPOINT, self.cpu.rip)
        self._resuming_at_breakpoint = trap.address     # the next run passes it

    def _after_refused_fill(self, trap: _Trap, started: int) -> None:
        """The walk again, for the whole address (the #PF's CR2, the #NPF's guest-physical
        address): its fault is the instruction's."""
        address = ucinternals.invalid_address(self.uc)
        if address & ~0xFFF != trap.address:
            address = trap.address
        try:
            self.linear.fill(address, trap.outcome)
        except GuestFault as fault:
            self._after_fault(replace(trap, outcome=fault), started)
            return
        except SecondStageFault as fault:
            self._after_exit(replace(trap, outcome=self.gate.second_stage_exit(fault, None, self.cpu.rip)), started)
            return
        self.retire(started - 1)                    # (no fault now: the instruction runs again)

    def _after_exit(self, trap: _Trap, started: int) -> None:
        self.retire(started - 1)
        self.gate.take_exit(trap.outcome)

    def _after_fault(self, trap: _Trap, started: int) -> None:
        self.retire(started - 1)
        fault = trap.outcome
        self.deliver(Event(fault.vector, EventKind.EXCEPTION, self.cpu.rip, fault.error_code, fault.cr2))

    _AFTER_TRAP = {"exception": lambda self, trap, started: self._on_exception_trap(trap, started),
                   "invalid": _after_invalid, "port": _after_port, "memory": _after_memory, "exit": _after_exit,
                   "fault": _after_fault, "step": _after_step, "breakpoint": _after_breakpoint,
                   "resume": _after_resume, "miss": _after_miss, "msr": _after_msr, "mmio": _after_mmio,
                   "refetch": _after_refetch, "refused fill": _after_refused_fill}

    def _follows_hlt(self) -> bool:
        """Unicorn ends a slice after HLT without a hook: only a HLT byte just before RIP
        tells a halt from any other unexplained end."""
        try:
            before = self.linear.fetch((self.cpu.segment("cs").base + self.cpu.rip - 1) & 0xFFFF_FFFF_FFFF_FFFF, 1)
        except MissingMemory:
            return False
        return before == bytes((HLT,))

    def _on_exception_trap(self, trap: _Trap, started: int) -> None:
        rip = self.cpu.rip
        if trap.software:                     # INT n / INT3 / INTO: retired, RIP is past it
            self.retire(started)
            try:
                last = self.linear.read(rip - 1, 1)[0]
            except (GuestFault, SecondStageFault, UnbackedMemory):
                last = None
            one_byte = (trap.vector, last) in ((3, INT3), (4, INTO))
            kind = EventKind.SOFTWARE_EXCEPTION if one_byte else EventKind.SOFTWARE_INTERRUPT
            self.deliver(Event(trap.vector, kind, rip, instruction_rip=rip - (1 if one_byte else 2)))
            return
        # #DB from TF or a data breakpoint is a trap (the instruction retired); others fault.
        self.retire(started if trap.vector == Vector.DB else started - 1)
        error_code = trap.error_code if trap.vector in PUSHES_ERROR_CODE else None
        cr2 = trap.cr2 if trap.vector == Vector.PF else None
        self.deliver(Event(trap.vector, EventKind.EXCEPTION, rip, error_code, cr2))

    def _on_invalid_trap(self) -> None:
        """An instruction Unicorn cannot execute: SVM instructions, RSM, VMMCALL, ICEBP, UD2…
        As L2 the guest-mode gate decides first; then a feature's executor runs it, or #UD."""
        rip = self.cpu.rip
        linear = (self.cpu.segment("cs").base + rip) & MASK_64
        try:
            code = self.linear.read(linear, 15)
        except (GuestFault, SecondStageFault, UnbackedMemory):
            code = b""
        insn = self._decode(code, self.cpu.code_bits(), rip) if code else None
        if insn is not None and self.gate is not None:
            outcome = self.gate.check(insn)
            if isinstance(outcome, GuestFault):
                self.deliver(Event(outcome.vector, EventKind.EXCEPTION, rip, outcome.error_code, outcome.cr2))
                return
            if outcome is not None:
                self.gate.take_exit(outcome)
                return
        execute = self._executors.get(insn.row.name) if insn is not None else None
        if execute is not None:
            execute(insn)
            return
        if code[:1] == bytes((ICEBP,)):          # INT1: a trap-like #DB that Unicorn reports as #UD
            self.retire(1)
            self.deliver(Event(Vector.DB, EventKind.ICEBP, rip + 1, instruction_rip=rip))
        else:
            self.deliver(Event(Vector.UD, EventKind.EXCEPTION, rip))

    def _emulate_msr(self, insn: Instruction) -> None:
        """RDMSR/WRMSR of an MSR a feature keeps (add_msr), at CPU ``insn``: #GP(0) above CPL 0
        (before the MSR is looked at), else the MSR's own read or write."""
        cpu, rip = self.cpu, insn.address
        msr = cpu["ecx"]
        kept = self._kept_msr(msr)
        try:
            if cpu.cpl:
                raise GuestFault(Vector.GP, 0)
            if insn.row.name == "rdmsr":
                value = kept.read(msr)
                cpu["rax"], cpu["rdx"] = value & 0xFFFF_FFFF, value >> 32
            else:
                kept.write(msr, (cpu["edx"] << 32) | cpu["eax"])
        except GuestFault as fault:
            self.deliver(Event(fault.vector, EventKind.EXCEPTION, rip, fault.error_code))
            return
        cpu.rip = insn.next_rip
        self.retire(1)

    def _emulate_out(self, io: Instruction, port: int, state: ArchState) -> ArchState | None:
        """Perform an OUT to a precise device, exactly as the CPU would, on the registers
        ``state`` holds at the OUT.  Its RIP write also makes Unicorn skip the native OUT
        when this runs inside the site's hook.  Returns ``state`` as it is after the OUT,
        unless the device changed registers (then None)."""
        rip = state[At.rip]
        size = min(io.operand_size, 4)
        if not io_permitted(state, self.linear, port, size):
            self.deliver(Event(Vector.GP, EventKind.EXCEPTION, rip, 0))
            return None
        self.cpu.rip = state[At.rip] = rip + io.length
        self.retire(1)
        version = self.cpu.version
        self._io_access = IoAccess((rip, state[At.rcx], state[At.rsi], state[At.rdi]), port, read=False, size=size)
        try:
            self.ports.write(port, size, state[At.rax])
        finally:
            self._io_access = None
        if self._stop is not None:
            self._stop = Stop(self._stop.reason, self.cpu.rip, self._stop.value, self._stop.detail)
        return state if self.cpu.version == version else None

    # -- tracing (the one per-instruction callback, on request) ----------------------------
    def _add_trace(self, out: TextIO) -> int:
        def on_code(uc: Uc, address: int, size: int, _data) -> None:
            # Unicorn gives no size (0xF1F1F1F1) for what it cannot run (VMRUN, RSM…): decode it.
            code = self.linear.fetch(address, size if size < 16 else 15) or b""
            text = instruction_text(code, self.cpu.code_bits(), address)
            if size >= 16 and text != "(undecodable)":
                code = code[:instruction_length(code, self.cpu.code_bits()) or len(code)]
            out.write(f"{address:#018x}  {code.hex():<30} {text}\n")

        return self.uc.hook_add(UC_HOOK_CODE, on_code)

