"""The device interfaces of the core (emulator/mmio.py, pci.py, irq.py, clock.py, Core.post):
an MMIO access that stops the run or raises an event completes exactly once and its
instruction retires; PCI configuration mechanism #1 with writable masks and BARs; interrupt
lines; the deterministic virtual clock and its timers; requests posted from another thread."""
import struct
import threading

import pytest

from ringminus import Machine, StopReason
from ringminus.arch.segments import SYS_INT_GATE, pack_gate
from ringminus.emulator.boot import IDT_BASE, SEL_CODE32
from ringminus.emulator.pci import PciFunction

from ..helpers import asm, boot_guest

MMIO = 0xFEB0_0000
CODE = 0x100000


class Doorbell:
    """Register 0: writing stops the run.  Register 8: writing raises INTR 0x30 (a
    self-IPI).  Every read answers 0x40."""

    def __init__(self, machine):
        self.machine, self.writes, self.reads = machine, [], 0

    def read(self, offset, size):
        self.reads += 1
        return 0x40

    def write(self, offset, size, value):
        self.writes.append((offset, size, value))
        if offset == 0:
            self.machine.request_stop()
        elif offset == 8:
            self.machine.raise_intr(0x30)


def doorbell_guest(source, **machine_args):
    machine = boot_guest(source, "protected", **machine_args)
    device = Doorbell(machine)
    machine.add_mmio(MMIO, 0x1000, device)
    return machine, device


@pytest.mark.parametrize("limit", [None, 1000])
def test_a_write_that_stops_the_run_completes_once_and_retires(limit):
    # add [reg0], 1 reads then writes the register; the write asks for a stop.
    machine, device = doorbell_guest(f"mov eax, 7; mov [{MMIO + 4:#x}], eax; add dword ptr [{MMIO:#x}], 1; "
                                     "inc ebx; hlt")
    result = machine.run(max_instructions=limit)
    assert result.stop.reason is StopReason.STOPPED
    assert device.writes == [(4, 4, 7), (0, 4, 0x41)] and device.reads == 1      # each access once
    assert result.regs["rip"] == CODE + 17 and result.regs["rbx"] == 0            # after the ADD, before INC
    if limit is not None:
        assert result.instructions == 3
    done = machine.run()
    assert done.stop.reason is StopReason.HLT and done.regs["rbx"] == 1 and len(device.writes) == 2


def test_a_write_that_raises_an_interrupt_sends_it_once_after_the_instruction():
    # The handler counts in ESI and IRETs; the guest then halts: one interrupt, one write.
    machine, device = doorbell_guest(f"sti; mov dword ptr [{MMIO + 8:#x}], 1; inc ebx; cli; hlt")
    machine.write_memory(IDT_BASE + 0x30 * 8, pack_gate(0x180000, SEL_CODE32, SYS_INT_GATE))
    machine.write_memory(0x180000, bytes.fromhex("46cf"))                 # inc esi; iret
    result = machine.run(max_instructions=1000)
    assert result.stop.reason is StopReason.HLT
    assert device.writes == [(8, 4, 1)] and result.regs["rsi"] == 1 and result.regs["rbx"] == 1
    interrupt = [e for e in result.events if e["kind"] == "external"]
    assert len(interrupt) == 1 and interrupt[0]["rip"] == CODE + 11        # taken after the MOV


def test_mmio_regions_are_checked_when_added():
    machine = Machine(memory_size=2 << 20)
    device = Doorbell(machine)
    with pytest.raises(ValueError, match="whole pages"):
        machine.add_mmio(MMIO + 8, 0x1000, device)
    with pytest.raises(ValueError, match="overlaps memory"):
        machine.add_mmio(0x100000, 0x1000, device)
    with pytest.raises(TypeError, match="not an MMIO device"):
        machine.add_mmio(MMIO, 0x1000, object())
    machine.add_mmio(MMIO, 0x1000, device)
    with pytest.raises(ValueError, match="overlaps"):
        machine.add_mmio(MMIO, 0x2000, device)


# -- PCI ----------------------------------------------------------------------------------------

def config_address(device, offset, function=0):
    return 0x8000_0000 | device << 11 | function << 8 | offset


def pci_guest(program):
    """``program``: (port, size, value or None) accesses; reads collected in EDI order."""
    lines = []
    for port, size, value in program:
        register = {1: "al", 2: "ax", 4: "eax"}[size]
        lines.append(f"mov dx, {port:#x}")
        lines.append(f"mov eax, {value:#x}; out dx, {register}" if value is not None
                     else f"xor eax, eax; in {register}, dx; mov [edi], eax; add edi, 4")
    return boot_guest("mov edi, 0x9000; " + "; ".join(lines) + "; hlt", "protected")


def test_pci_configuration_mechanism_one_with_masks_and_bar_sizing():
    machine = pci_guest([
        (0xCF8, 4, config_address(3, 0x00)), (0xCFC, 4, None),           # vendor/device
        (0xCF8, 4, config_address(4, 0x00)), (0xCFC, 4, None),           # no such function
        (0xCF8, 4, config_address(3, 0x10)), (0xCFC, 4, 0xFFFF_FFFF), (0xCFC, 4, None),   # BAR0 sizing
        (0xCF8, 4, config_address(3, 0x08)), (0xCFC, 4, 0xFFFF_FFFF), (0xCFC, 4, None),   # read-only
        (0xCF8, 4, config_address(3, 0x3C)), (0xCFD, 1, None),            # byte 0x3D through port 0xCFD
    ])
    mapped = []
    function = PciFunction(0x1234, 0x5678, 0x0C0300, revision=2, writable={0x3C: 0xFF})
    function.config[0x3D] = 1                                             # INTA#
    function.add_bar(0, 0x1000, map=mapped.append)
    machine.pci.add(0, 3, 0, function)
    assert machine.run().stop.reason is StopReason.HLT
    values = struct.unpack("<5I", machine.read_memory(0x9000, 20))
    assert values == (0x5678_1234, 0xFFFF_FFFF, 0xFFFF_F000, 0x0C03_0002, 1)
    assert mapped == []                                    # memory decoding is still off


def test_a_bar_is_placed_when_the_guest_enables_decoding():
    machine = pci_guest([(0xCF8, 4, config_address(5, 0x10)), (0xCFC, 4, MMIO),
                         (0xCF8, 4, config_address(5, 0x04)), (0xCFC, 2, 0x2),
                         (0xCF8, 4, config_address(5, 0x04)), (0xCFC, 2, 0x0)])
    mapped = []
    function = machine.pci.add(0, 5, 0, PciFunction(0x1234, 0x1, 0xFF0000))
    function.add_bar(0, 0x1000, map=mapped.append)
    machine.run()
    assert mapped == [MMIO, None] and function.bar_address(0) is None


def test_the_pci_bus_state_replays_from_a_snapshot():
    machine = pci_guest([(0xCF8, 4, config_address(3, 0x3C)), (0xCFC, 1, 0x0B)])
    function = machine.pci.add(0, 3, 0, PciFunction(0x1234, 0x1, 0xFF0000, writable={0x3C: 0xFF}))
    snap = machine.snapshot()
    machine.run()
    assert function.config[0x3C] == 0x0B and machine.pci.address == config_address(3, 0x3C)
    machine.restore(snap)
    assert function.config[0x3C] == 0 and machine.pci.address == 0


def test_pci_functions_are_checked_when_added():
    machine = Machine(memory_size=2 << 20)
    with pytest.raises(ValueError, match="taken"):
        machine.pci.add(0, 0, 0, PciFunction(0x1234, 1, 0))             # the chipset's host bridge
    with pytest.raises(ValueError, match="no PCI address"):
        machine.pci.add(0, 32, 0, PciFunction(0x1234, 1, 0))
    with pytest.raises(ValueError, match="power of two"):
        PciFunction(0x1234, 1, 0).add_bar(0, 0x1800)


# -- interrupt lines, the clock, posted requests ---------------------------------------------------

def test_an_interrupt_line_raises_its_vector_on_each_rising_edge():
    machine = Machine(memory_size=2 << 20)
    line = machine.interrupt_line("timer", vector=0x20)
    line.raise_()
    line.raise_()                    # already high: no new edge
    line.lower()
    line.pulse()
    assert machine.interrupts == {0x20}
    seen = []
    line.connect(seen.append)        # a controller takes the line over
    line.pulse()
    assert seen == [True, False]


def test_timers_fire_at_the_same_instruction_in_a_run_and_its_replay():
    machine = boot_guest("l: inc eax; jmp l", "protected")
    fired = []
    machine.clock.add_timer(250, lambda: fired.append((machine.instructions, machine.clock.now_ns())))
    snap = machine.snapshot()
    machine.run(max_instructions=1000)
    assert fired == [(250, 250)]                            # 1 instruction = 1 ns, nominally
    cancelled = machine.clock.add_timer(10, lambda: fired.append("never"))
    cancelled.cancel()
    machine.run(max_instructions=100)
    assert fired == [(250, 250)]
    machine.restore(snap)
    machine.run(max_instructions=1000)
    assert fired == [(250, 250), (250, 250)]


def test_a_request_posted_from_another_thread_stops_a_tight_loop():
    machine = boot_guest("l: jmp l", "protected")
    poster = threading.Timer(0.2, machine.post, args=(lambda m: m.request_stop(StopReason.STOPPED, 7),))
    poster.start()
    result = machine.run(timeout=30)
    poster.join()
    assert result.stop.reason is StopReason.STOPPED and result.stop.value == 7


TSC_PROBE = """
    rdtsc
    mov ebx, eax
    nop
    nop
    nop
    nop
    nop
    rdtsc
    sub eax, ebx
    hlt
"""


@pytest.mark.parametrize("exact,delta", [(True, 7), (False, 1)])
def test_rdtsc_reads_the_virtual_clock(exact, delta):
    # 1 GHz on a clock of one nanosecond per instruction: counted, the second read is 7 ticks
    # on (MOV and five NOPs and the first RDTSC retired); uncounted, the clock stands still in
    # the slice and each read is one tick past the last.
    machine = Machine(exact_instructions=exact)
    machine.write_memory(0x100000, asm(TSC_PROBE, 32, 0x100000))
    machine.boot("protected", 0x100000)
    result = machine.run(timeout=30)            # no limit: a limit would count the instructions
    assert result.stop.reason is StopReason.HLT and result.regs["rax"] == delta
    assert machine.tsc.value == result.regs["rbx"] + delta


def test_time_halted_moves_the_tsc_too():
    # A timer 10 µs out wakes `sti; hlt`: the read after it is at least 10,000 ticks on.
    machine = Machine(exact_instructions=True)
    machine.write_memory(0x100000, asm("rdtsc\nmov ebx, eax\nsti\nhlt\nrdtsc\nsub eax, ebx\ncli\nhlt", 32, 0x100000))
    machine.write_memory(0x100100, asm("iretd", 32, 0x100100))
    machine.boot("protected", 0x100000)
    machine.write_memory(IDT_BASE + 0x30 * 8, pack_gate(0x100100, SEL_CODE32, SYS_INT_GATE))
    machine.clock.add_timer(10_000, lambda: machine.raise_intr(0x30))
    result = machine.run(max_instructions=100)
    assert result.stop.reason is StopReason.HLT and result.regs["rax"] >= 10_000


def test_the_host_clock_drives_the_tsc():
    machine = Machine(clock="host")
    machine.write_memory(0x100000, asm(TSC_PROBE, 32, 0x100000))
    machine.boot("protected", 0x100000)
    result = machine.run(max_instructions=100)
    assert result.stop.reason is StopReason.HLT and 1 <= result.regs["rax"] < 10**9     # nanoseconds, on
    with pytest.raises(ValueError, match="unknown clock"):
        Machine(clock="sundial")

