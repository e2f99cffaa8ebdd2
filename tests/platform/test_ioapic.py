"""The IOAPIC (ringminus/platform/ioapic.py) against QEMU 7.2's ioapic.c: the register window
and its access sizes, ID and version, the redirection table's read-only bits, edge and level
pins with remote IRR and coalescing, EOI from the local APIC and from the EOI register, the
delivery modes, the interrupt-storm delay, snapshots — and a 32-bit guest that programs a
level-triggered pin and ends it with a local APIC EOI."""
import random

import pytest

from ringminus import Machine, StopReason
from ringminus.arch.segments import SYS_INT_GATE, pack_gate
from ringminus.emulator.boot import IDT_BASE, SEL_CODE32
from ringminus.platform.ioapic import IOAPIC_BASE, IoApic
from ringminus.platform.lapic import APIC_BASE, LocalApic

from ..helpers import asm
from .fakes import FakeMachine

MASKED, LEVEL, REMOTE_IRR = 1 << 16, 1 << 15, 1 << 14


@pytest.fixture
def machine():
    return FakeMachine()


@pytest.fixture
def lapic(machine):
    apic = LocalApic(machine)
    apic.write(0xF0, 4, 0x1FF)
    return apic


@pytest.fixture
def ioapic(lapic, machine):
    return IoApic(lapic, clock=machine.clock)


def select(ioapic, register):
    ioapic.write(0x00, 4, register)


def read_reg(ioapic, register):
    select(ioapic, register)
    return ioapic.read(0x10, 4)


def write_reg(ioapic, register, value):
    select(ioapic, register)
    ioapic.write(0x10, 4, value)


def route(ioapic, pin, low, high=0):
    write_reg(ioapic, 0x11 + 2 * pin, high)
    write_reg(ioapic, 0x10 + 2 * pin, low)


def entry(ioapic, pin):
    return read_reg(ioapic, 0x11 + 2 * pin) << 32 | read_reg(ioapic, 0x10 + 2 * pin)


def irr_has(lapic, vector):
    return bool(lapic.irr >> vector & 1)


# -- registers ---------------------------------------------------------------------------------------
def test_reset_values(ioapic):
    assert read_reg(ioapic, 0) == 0
    assert read_reg(ioapic, 1) == 0x0017_0020           # version 0x20, 24 entries
    assert read_reg(ioapic, 2) == 0
    assert [entry(ioapic, pin) for pin in range(24)] == [MASKED] * 24
    assert read_reg(ioapic, 0x10 + 48) == 0             # past the table


def test_id_is_four_bits_and_arbitration_reads_it(ioapic):
    write_reg(ioapic, 0, 0xFFFF_FFFF)
    assert read_reg(ioapic, 0) == read_reg(ioapic, 2) == 0x0F00_0000
    write_reg(ioapic, 1, 0)
    write_reg(ioapic, 2, 0)
    assert read_reg(ioapic, 1) == 0x0017_0020 and read_reg(ioapic, 2) == 0x0F00_0000


def test_ioregsel_is_a_byte_read_at_any_size(ioapic):
    ioapic.write(0x00, 4, 0x1234)
    assert ioapic.read(0x00, 1) == ioapic.read(0x00, 2) == ioapic.read(0x00, 4) == 0x34
    ioapic.write(0x00, 1, 0x12)
    assert ioapic.read(0x00, 4) == 0x12


def test_iowin_and_eoi_take_only_four_bytes(ioapic):
    select(ioapic, 1)
    assert ioapic.read(0x10, 1) == ioapic.read(0x10, 2) == 0
    select(ioapic, 0x10)
    ioapic.write(0x10, 2, 0x41)
    assert entry(ioapic, 0) == MASKED


def test_misaligned_accesses_are_dropped(ioapic):
    ioapic.write(0x01, 2, 0x0101)
    assert ioapic.read(0x00, 4) == 0 and ioapic.read(0x02, 4) == 0


def test_the_window_repeats_every_256_bytes(ioapic):
    ioapic.write(0x300, 4, 1)
    assert ioapic.read(0x210, 4) == 0x0017_0020


def test_an_eight_byte_access_is_two_four_byte_ones(ioapic):
    select(ioapic, 1)
    assert ioapic.read(0x10, 8) == 0x0017_0020         # then offset 0x14, which reads 0
    ioapic.write(0x00, 8, 0xFFFF_FFFF_0000_0012)
    assert ioapic.read(0x00, 4) == 0x12


def test_remote_irr_and_delivery_status_are_read_only(ioapic):
    route(ioapic, 3, MASKED | LEVEL | REMOTE_IRR | 1 << 12 | 0x31)
    assert entry(ioapic, 3) == MASKED | LEVEL | 0x31
    route(ioapic, 3, 0x31, high=0xFF00_0000)
    assert entry(ioapic, 3) == 0xFF00_0000 << 32 | 0x31


def test_no_guest_access_raises(ioapic, machine):
    rng = random.Random(11)
    for _ in range(20000):
        offset, size = rng.randrange(0x1000), rng.choice((1, 2, 4, 8))
        if rng.random() < 0.5:
            ioapic.read(offset, size)
        else:
            ioapic.write(offset, size, rng.getrandbits(64))
        if rng.random() < 0.05:
            ioapic.set_irq(rng.randrange(-2, 30), rng.random() < 0.5)
        if rng.random() < 0.01 and ioapic.apic.intr_pending():
            ioapic.apic.acknowledge()
            ioapic.apic.eoi()


# -- pins --------------------------------------------------------------------------------------------
def test_an_edge_is_delivered_and_a_masked_edge_is_lost(ioapic, lapic):
    route(ioapic, 4, 0x34)
    ioapic.set_irq(4, True)
    assert irr_has(lapic, 0x34) and lapic.intr_pending()
    route(ioapic, 5, MASKED | 0x35)
    ioapic.set_irq(5, True)
    route(ioapic, 5, 0x35)
    assert not irr_has(lapic, 0x35)


def test_gsi_0_is_pin_2(ioapic, lapic):
    route(ioapic, 2, 0x30)
    ioapic.set_irq(0, True)
    assert irr_has(lapic, 0x30)


def test_a_level_sets_remote_irr_and_coalesces_until_eoi(ioapic, lapic):
    route(ioapic, 9, LEVEL | 0x39)
    ioapic.set_irq(9, True)
    assert entry(ioapic, 9) & REMOTE_IRR and irr_has(lapic, 0x39)
    assert lapic.acknowledge() == 0x39
    ioapic.set_irq(9, True)                 # asserted again: remote IRR holds it
    assert not irr_has(lapic, 0x39)
    lapic.eoi()                             # level-triggered in TMR: broadcast; still high: again
    assert irr_has(lapic, 0x39) and entry(ioapic, 9) & REMOTE_IRR
    assert lapic.acknowledge() == 0x39
    ioapic.set_irq(9, False)
    lapic.eoi()
    assert not entry(ioapic, 9) & REMOTE_IRR and not lapic.intr_pending()


def test_a_masked_level_waits_in_irr(ioapic, lapic):
    route(ioapic, 10, MASKED | LEVEL | 0x3A)
    ioapic.set_irq(10, True)
    assert not irr_has(lapic, 0x3A)
    route(ioapic, 10, LEVEL | 0x3A)         # unmasking services the pin
    assert irr_has(lapic, 0x3A)


def test_the_eoi_register(ioapic, lapic):
    route(ioapic, 11, LEVEL | 0x3B)
    ioapic.set_irq(11, True)
    ioapic.write(0x40, 4, 0x13B)            # not the vector: nothing
    assert entry(ioapic, 11) & REMOTE_IRR
    ioapic.write(0x40, 2, 0x3B)
    assert entry(ioapic, 11) & REMOTE_IRR
    ioapic.set_irq(11, False)
    ioapic.write(0x40, 4, 0x3B)
    assert not entry(ioapic, 11) & REMOTE_IRR


def test_becoming_edge_triggered_clears_remote_irr(ioapic):
    route(ioapic, 12, LEVEL | 0x3C)
    ioapic.set_irq(12, True)
    route(ioapic, 12, MASKED | 0x3C)        # Linux's EOI for IOAPICs without the register
    assert entry(ioapic, 12) == MASKED | 0x3C


@pytest.mark.parametrize("mode, counter", [(2, "smis"), (4, "nmis"), (5, "inits")])
def test_smi_nmi_init_entries(ioapic, machine, mode, counter):
    route(ioapic, 6, mode << 8)
    ioapic.set_irq(6, True)
    assert getattr(machine, counter) == 1


def test_lowest_priority_and_destinations(ioapic, lapic):
    route(ioapic, 7, 1 << 8 | 0x47, high=0xFF00_0000)     # lowest priority, broadcast
    route(ioapic, 8, 0x48, high=0x0100_0000)              # physical APIC 1: nobody
    lapic.write(0xD0, 4, 0x0200_0000)
    route(ioapic, 13, 1 << 11 | 0x4D, high=0x0200_0000)   # logical, flat, bit 1: this APIC
    for pin in (7, 8, 13):
        ioapic.set_irq(pin, True)
    assert [v for v in (0x47, 0x48, 0x4D) if irr_has(lapic, v)] == [0x47, 0x4D]


def test_an_extint_entry_acknowledges_the_8259_when_serviced(lapic, machine):
    class Pic:
        output, int_output, acks = True, None, 0

        def acknowledge(self):
            self.acks += 1
            return 0x08

    pic = Pic()
    ioapic = IoApic(lapic, pic)
    route(ioapic, 0 + 2, 7 << 8 | 0x99)
    ioapic.set_irq(0, True)
    assert pic.acks == 1 and irr_has(lapic, 0x08) and not irr_has(lapic, 0x99)


def test_an_interrupt_storm_waits_10_ms(ioapic, lapic, machine):
    route(ioapic, 14, LEVEL | 0x4E)
    ioapic.set_irq(14, True)                # held high: every EOI re-asserts
    for _ in range(9999):
        assert lapic.acknowledge() == 0x4E
        lapic.eoi()
    assert lapic.acknowledge() == 0x4E
    lapic.eoi()                             # the 10,000th: delayed
    assert not lapic.intr_pending() and machine.clock.armed() == [10_000_000]
    machine.clock.advance(10_000_000)
    assert lapic.acknowledge() == 0x4E


def test_reset_masks_everything(ioapic):
    route(ioapic, 1, 0x31)
    write_reg(ioapic, 0, 0x0500_0000)
    ioapic.reset()
    assert entry(ioapic, 1) == MASKED and read_reg(ioapic, 0) == 0


def test_restore(ioapic, lapic):
    route(ioapic, 15, LEVEL | 0x4F)
    ioapic.set_irq(15, True)
    saved = ioapic.state()
    ioapic.reset()
    ioapic.restore(saved)
    assert ioapic.state() == saved and entry(ioapic, 15) & REMOTE_IRR


# -- a guest ---------------------------------------------------------------------------------------------
def test_guest_level_triggered_pin_ended_by_a_local_apic_eoi():
    """The guest routes pin 5 (level) to vector 0x55; a device holds the line up; the handler
    counts, drops the line through an OUT to a device port, then EOIs the local APIC, which
    broadcasts to the IOAPIC: remote IRR clears and the pin is not delivered again."""
    machine = Machine(exact_instructions=True)
    lapic = LocalApic(machine)
    ioapic = IoApic(lapic, clock=machine.clock)
    ioapic.register(machine)
    machine.ports.register(0x7F0, read=lambda port, size: 0, write=lambda port, size, value: ioapic.set_irq(5, False))
    A, IO, COUNT = APIC_BASE, IOAPIC_BASE, 0x190000
    code = f"""
        mov dword ptr [{A + 0xF0:#x}], 0x1FF
        mov dword ptr [{IO:#x}], 0x1B
        mov dword ptr [{IO + 0x10:#x}], 0
        mov dword ptr [{IO:#x}], 0x1A
        mov dword ptr [{IO + 0x10:#x}], 0x8055
        sti
        hlt
        mov ebx, dword ptr [{A + 0x180 + 0x20:#x}]
        mov dword ptr [{IO:#x}], 0x1A
        mov edx, dword ptr [{IO + 0x10:#x}]
        cli
        hlt
    """
    handler = f"inc dword ptr [{COUNT:#x}]\nout dx, al\nmov dword ptr [{A + 0xB0:#x}], 0\niretd\n"
    machine.write_memory(0x100000, asm(code, 32, 0x100000))
    machine.boot("protected", 0x100000)
    machine.write_memory(0x180000, asm("mov dx, 0x7F0\n" + handler, 32, 0x180000))
    machine.write_memory(IDT_BASE + 0x55 * 8, pack_gate(0x180000, SEL_CODE32, SYS_INT_GATE))
    machine.clock.add_timer(300, lambda: ioapic.set_irq(5, True))
    result = machine.run(max_instructions=1000)
    assert result.stop.reason is StopReason.HLT
    assert int.from_bytes(machine.read_memory(COUNT, 4), "little") == 1
    assert result.regs["rbx"] == 1 << (0x55 & 31)      # TMR: it came level-triggered
    assert result.regs["rdx"] == 0x8055                # remote IRR clear after the EOI
