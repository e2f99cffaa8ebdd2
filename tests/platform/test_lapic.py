"""The local APIC (ringminus/platform/lapic.py) against QEMU 7.2's apic.c and apic_common.c:
reset values, access sizes, acceptance and priority, EOI, the ICR's modes, shorthands and
destinations, MSIs, the LVTs and the timer (divider, one-shot, periodic, masking), the 8259
behind LINT0, the APIC base MSR, INIT, snapshots — and 32-bit guests that take the timer, a
self-IPI and a TPR-held vector through the IDT."""
import random

import pytest

from ringminus import Machine, StopReason
from ringminus.arch.segments import SYS_INT_GATE, pack_gate
from ringminus.emulator.boot import IDT_BASE, SEL_CODE32
from ringminus.emulator.plugins import Msr
from ringminus.platform.lapic import APIC_BASE, LocalApic
from ringminus.platform.pic import Pic8259Pair

from ..helpers import asm
from .fakes import FakeMachine

ID, VERSION, TPR, APR, PPR, EOI, LDR, DFR, SPIV = 0x20, 0x30, 0x80, 0x90, 0xA0, 0xB0, 0xD0, 0xE0, 0xF0
ISR, TMR, IRR, ESR, ICR_LOW, ICR_HIGH = 0x100, 0x180, 0x200, 0x280, 0x300, 0x310
LVT_TIMER, LVT_THERMAL, LVT_PERF, LVT_LINT0, LVT_LINT1, LVT_ERROR = 0x320, 0x330, 0x340, 0x350, 0x360, 0x370
INITIAL, CURRENT, DIVIDE = 0x380, 0x390, 0x3E0
MASKED, PERIODIC = 0x10000, 0x20000


def rd(apic, offset):
    return apic.read(offset, 4)


def wr(apic, offset, value):
    apic.write(offset, 4, value)


def in_register(apic, base, vector):
    return bool(rd(apic, base + 0x10 * (vector >> 5)) >> (vector & 31) & 1)


@pytest.fixture
def machine():
    return FakeMachine()


@pytest.fixture
def apic(machine):
    lapic = LocalApic(machine)
    wr(lapic, SPIV, 0x1FF)
    return lapic


# -- registration, reset values, access sizes ----------------------------------------------------
def test_registers_as_the_cpus_controller_and_maps_its_page(machine):
    lapic = LocalApic(machine)
    assert machine.interrupt_controllers == [lapic]
    assert machine.mmio == [(APIC_BASE, 0x1000, lapic, "lapic")]
    assert machine.reset_hooks == [lapic.init_reset]


def test_reset_values_are_qemus(machine):
    lapic = LocalApic(machine)
    expected = {ID: 0, VERSION: 0x0005_0014, TPR: 0, APR: 0, PPR: 0, EOI: 0, LDR: 0, DFR: 0xFFFF_FFFF,
                SPIV: 0xFF, ESR: 0, ICR_LOW: 0, ICR_HIGH: 0, INITIAL: 0, CURRENT: 0, DIVIDE: 0}
    expected.update({lvt: MASKED for lvt in range(LVT_TIMER, LVT_ERROR + 1, 0x10)})
    expected.update({base + 0x10 * i: 0 for base in (ISR, TMR, IRR) for i in range(8)})
    assert {offset: rd(lapic, offset) for offset in expected} == expected
    assert lapic.read_msr() == 0xFEE0_0900
    assert not lapic.intr_pending()


@pytest.mark.parametrize("size", [1, 2, 8])
def test_accesses_other_than_four_bytes_read_zero_and_write_nothing(apic, size):
    assert apic.read(VERSION, size) == 0
    apic.write(TPR, size, 0x20)
    assert rd(apic, TPR) == 0 and rd(apic, ESR) == 0


def test_misaligned_accesses_read_zero_and_write_nothing(apic):
    assert apic.read(VERSION + 2, 4) == 0
    apic.write(TPR + 1, 4, 0x20)
    assert rd(apic, TPR) == 0


def test_the_register_index_is_offset_bits_4_to_11(apic):
    assert rd(apic, 0x34) == rd(apic, 0x38) == rd(apic, 0x3C) == 0x0005_0014    # version again
    wr(apic, TPR + 8, 0x30)
    assert rd(apic, TPR) == 0x30


def test_undefined_registers_set_the_illegal_address_bit(apic):
    assert rd(apic, 0x40) == 0
    assert rd(apic, ESR) == 0x80
    wr(apic, ESR, 0)                        # QEMU ignores ESR writes: the bit stays
    assert rd(apic, ESR) == 0x80


def test_an_undefined_register_write_sets_it_too_but_read_only_ones_do_not(machine):
    lapic = LocalApic(machine)
    for offset in (VERSION, APR, PPR, ISR, TMR + 0x70, IRR, ESR, CURRENT):
        wr(lapic, offset, 0xFFFF_FFFF)
    assert rd(lapic, ESR) == 0 and rd(lapic, VERSION) == 0x0005_0014
    wr(lapic, 0x3F0, 1)
    assert rd(lapic, ESR) == 0x80


def test_no_guest_access_raises(machine):
    lapic = LocalApic(machine, pic=Pic8259Pair())
    rng = random.Random(7)
    for _ in range(10000):
        offset, size = rng.randrange(0x1000), rng.choice((1, 2, 4, 8))
        if rng.random() < 0.5:
            lapic.read(offset, size)
        else:
            lapic.write(offset, size, rng.getrandbits(rng.choice((8, 32, 64))))
        if rng.random() < 0.01:
            machine.clock.advance(rng.randrange(1000))
            if lapic.intr_pending():
                lapic.acknowledge()


def test_id_ldr_dfr_keep_their_fields(apic):
    wr(apic, ID, 0xAB12_3456)
    wr(apic, LDR, 0xCD12_3456)
    wr(apic, DFR, 0x0123_4567)
    assert (rd(apic, ID), rd(apic, LDR), rd(apic, DFR)) == (0xAB00_0000, 0xCD00_0000, 0x0FFF_FFFF)


def test_lvt_icr_and_tpr_keep_what_was_written(apic):
    """QEMU stores LVT and ICR values whole (no reserved bits), TPR as a byte."""
    wr(apic, LVT_THERMAL, 0xFFFF_FFFF)
    wr(apic, ICR_HIGH, 0x1234_5678)
    wr(apic, TPR, 0x1FF)
    assert (rd(apic, LVT_THERMAL), rd(apic, ICR_HIGH), rd(apic, TPR)) == (0xFFFF_FFFF, 0x1234_5678, 0xFF)


# -- acceptance, priority, EOI ----------------------------------------------------------------------
def test_a_fixed_interrupt_goes_from_irr_to_isr_at_acknowledge(apic, machine):
    apic.deliver(0x41)
    assert in_register(apic, IRR, 0x41) and apic.intr_pending() and machine.raised == 1
    assert apic.acknowledge() == 0x41
    assert in_register(apic, ISR, 0x41) and not in_register(apic, IRR, 0x41)
    assert rd(apic, PPR) == 0x40 and not apic.intr_pending()


def test_the_highest_vector_is_taken_first(apic):
    for vector in (0x31, 0x95, 0x62):
        apic.deliver(vector)
    assert apic.acknowledge() == 0x95
    assert not apic.intr_pending()          # 0x62 and 0x31 wait below the in-service class 9
    wr(apic, EOI, 0)
    assert apic.acknowledge() == 0x62


def test_a_higher_class_nests_over_one_in_service(apic):
    apic.deliver(0x41)
    assert apic.acknowledge() == 0x41
    apic.deliver(0x4F)                      # same class: held
    assert not apic.intr_pending()
    apic.deliver(0x51)
    assert apic.acknowledge() == 0x51
    wr(apic, EOI, 0)                        # ends 0x51, the highest in service
    assert in_register(apic, ISR, 0x41) and not in_register(apic, ISR, 0x51)
    wr(apic, EOI, 0)
    assert apic.acknowledge() == 0x4F


def test_tpr_holds_back_its_class_and_below(apic):
    wr(apic, TPR, 0x55)
    apic.deliver(0x5F)
    assert rd(apic, PPR) == 0x55 and not apic.intr_pending()
    apic.deliver(0x60)
    assert apic.acknowledge() == 0x60
    assert rd(apic, PPR) == 0x60            # in service class 6 beats TPR 0x55
    wr(apic, EOI, 0)
    wr(apic, TPR, 0x40)
    assert apic.acknowledge() == 0x5F


def test_a_held_vector_acknowledged_anyway_is_the_spurious_vector(apic):
    wr(apic, SPIV, 0x1E7)
    wr(apic, TPR, 0xF0)
    apic.deliver(0x41)
    assert apic.acknowledge() == 0xE7       # the core asked although INTR was low
    assert in_register(apic, IRR, 0x41) and not in_register(apic, ISR, 0x41)


def test_a_software_disabled_apic_accepts_but_does_not_interrupt(apic):
    wr(apic, SPIV, 0xFF)
    apic.deliver(0x41)
    assert in_register(apic, IRR, 0x41)
    assert not apic.intr_pending() and apic.acknowledge() is None
    wr(apic, SPIV, 0x100)
    assert apic.acknowledge() == 0x41


def test_vector_zero_counts_as_nothing_as_in_qemu(apic):
    apic.deliver(0)
    assert in_register(apic, IRR, 0) and not apic.intr_pending()


def test_eoi_of_a_level_triggered_vector_is_broadcast(apic):
    seen = []
    apic.eoi_broadcast = seen.append
    apic.deliver(0x61, level_triggered=True)
    apic.deliver(0x71)
    assert in_register(apic, TMR, 0x61) and not in_register(apic, TMR, 0x71)
    apic.acknowledge()
    wr(apic, EOI, 0)                        # 0x71: edge
    apic.acknowledge()
    wr(apic, EOI, 0)                        # 0x61: level
    wr(apic, EOI, 0)                        # nothing in service: nothing
    assert seen == [0x61]


# -- the ICR -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("icr, reaches", [
    (0x0004_0041, True),                    # self
    (0x0008_0041, True),                    # all including self
    (0x000C_0041, False),                   # all excluding self: nobody else here
    (0x0000_0041, True),                    # physical destination 0 (ICR high 0)
])
def test_shorthands(apic, icr, reaches):
    wr(apic, ICR_LOW, icr)
    assert in_register(apic, IRR, 0x41) is reaches
    assert rd(apic, ICR_LOW) == icr


@pytest.mark.parametrize("dest, reaches", [(0x00, True), (0x01, False), (0xFF, True)])
def test_physical_destinations(apic, dest, reaches):
    wr(apic, ICR_HIGH, dest << 24)
    wr(apic, ICR_LOW, 0x41)
    assert in_register(apic, IRR, 0x41) is reaches


@pytest.mark.parametrize("dfr, ldr, dest, reaches", [
    (0xFFFF_FFFF, 0x01, 0x01, True),        # flat: any common bit
    (0xFFFF_FFFF, 0x01, 0x06, False),
    (0xFFFF_FFFF, 0x00, 0xFF, False),       # LDR 0 matches nothing
    (0x0FFF_FFFF, 0x12, 0x13, True),        # cluster 1, member bit 1
    (0x0FFF_FFFF, 0x12, 0x22, False),       # another cluster
    (0x0FFF_FFFF, 0x12, 0x11, False),       # no common member
    (0x5FFF_FFFF, 0x12, 0x12, False),       # a model QEMU does not know
])
def test_logical_destinations(apic, dfr, ldr, dest, reaches):
    wr(apic, DFR, dfr)
    wr(apic, LDR, ldr << 24)
    wr(apic, ICR_HIGH, dest << 24)
    wr(apic, ICR_LOW, 0x0841)
    assert in_register(apic, IRR, 0x41) is reaches


def test_shorthands_address_qemus_apic_slot_not_the_changed_id(apic):
    wr(apic, ID, 0x0100_0000)
    wr(apic, ICR_LOW, 0x0004_0041)          # "self" sets bit 1: no APIC there
    assert not in_register(apic, IRR, 0x41)
    wr(apic, ICR_LOW, 0x000C_0042)          # "all but self" keeps bit 0: this APIC
    assert in_register(apic, IRR, 0x42)
    wr(apic, ICR_HIGH, 0x0100_0000)
    wr(apic, ICR_LOW, 0x43)                 # physical destination = the new ID
    assert in_register(apic, IRR, 0x43)


def test_delivery_modes(apic, machine):
    wr(apic, ICR_LOW, 0x0004_0151)          # lowest priority
    wr(apic, ICR_LOW, 0x0004_0752)          # ExtINT: QEMU sets IRR as for fixed
    wr(apic, ICR_LOW, 0x0004_0353)          # reserved mode 3: nothing
    assert [v for v in (0x51, 0x52, 0x53) if in_register(apic, IRR, v)] == [0x51, 0x52]
    wr(apic, ICR_LOW, 0x0004_0400)
    wr(apic, ICR_LOW, 0x0004_0200)
    assert (machine.nmis, machine.smis, machine.inits) == (1, 1, 0)


def test_a_level_triggered_ipi_sets_tmr(apic):
    wr(apic, ICR_LOW, 0x0004_C061)
    assert in_register(apic, TMR, 0x61)


def test_init_assert_resets_the_apic_and_deassert_does_not(apic, machine):
    wr(apic, TPR, 0x20)
    wr(apic, ICR_LOW, 0x0004_8500)          # INIT level de-assert: arbitration IDs only
    assert machine.inits == 0 and rd(apic, TPR) == 0x20
    wr(apic, ICR_LOW, 0x0004_4500)          # INIT assert to self
    assert machine.inits == 1
    assert rd(apic, TPR) == 0 and rd(apic, SPIV) == 0xFF and rd(apic, ICR_LOW) == 0


def test_seabios_ipis_reach_nobody_here(apic, machine):
    """SeaBIOS's smp_scan: INIT then SIPI to all excluding self."""
    wr(apic, ICR_LOW, 0x000C_4500)
    wr(apic, ICR_LOW, 0x000C_4610)
    assert machine.inits == 0 and apic.sipi_vector == 0 and rd(apic, ICR_LOW) == 0x000C_4610


def test_a_sipi_to_the_bsp_is_recorded_and_ignored(apic, machine):
    wr(apic, ICR_LOW, 0x0004_4610)
    assert apic.sipi_vector == 0x10 and machine.inits == 0 and not apic.intr_pending()


def test_a_write_to_the_first_register_is_an_msi(apic, machine):
    apic.write(0x000, 4, 0x0000_8031)       # fixed, level, vector 0x31 to physical 0
    assert in_register(apic, IRR, 0x31) and in_register(apic, TMR, 0x31)
    apic.write(0x004, 4, 0x0000_0032)       # logical destination 0: nobody
    assert not in_register(apic, IRR, 0x32)
    apic.write(0x008, 4, 0x0000_0400)       # NMI
    assert machine.nmis == 1 and rd(apic, ESR) == 0


def test_bus_messages_from_the_ioapic(apic, machine):
    apic.deliver_irq(0, 0, 0, 0x44, 1)
    apic.deliver_irq(1, 0, 0, 0x45, 0)      # another APIC ID
    apic.deliver_irq(0xFF, 0, 1, 0x46, 0)   # broadcast, lowest priority
    apic.deliver_irq(0, 0, 6, 0x47, 0)      # SIPI is no bus message: nothing
    assert [v for v in range(0x44, 0x48) if in_register(apic, IRR, v)] == [0x44, 0x46]
    apic.deliver_irq(0, 0, 5, 0, 0)
    assert machine.inits == 1


# -- the timer ---------------------------------------------------------------------------------------
def start_timer(apic, count, lvt=0x40, divide=None):
    if divide is not None:
        wr(apic, DIVIDE, divide)
    wr(apic, LVT_TIMER, lvt)
    wr(apic, INITIAL, count)


def test_the_reset_divider_is_one_although_dcr_reads_zero(apic, machine):
    """apic_init_reset sets count_shift 0 (divide by 1) and divide_conf 0 (which encodes
    divide by 2): until the guest writes DCR the timer runs at 1 GHz."""
    start_timer(apic, 10)
    assert rd(apic, DIVIDE) == 0 and machine.clock.armed() == [11]
    wr(apic, DIVIDE, 0)
    wr(apic, INITIAL, 10)
    assert machine.clock.armed() == [22]


@pytest.mark.parametrize("code, divisor", [(0x0, 2), (0x1, 4), (0x2, 8), (0x3, 16), (0x8, 32), (0x9, 64),
                                           (0xA, 128), (0xB, 1), (0xF, 1), (0x4, 2)])
def test_divide_configuration(apic, machine, code, divisor):
    start_timer(apic, 99, divide=code)
    assert rd(apic, DIVIDE) == code & 0xB
    assert machine.clock.armed() == [100 * divisor]
    machine.clock.advance(10 * divisor + divisor - 1)
    assert rd(apic, CURRENT) == 89


def test_one_shot(apic, machine):
    start_timer(apic, 100, divide=0xB)
    machine.clock.advance(30)
    assert rd(apic, CURRENT) == 70
    machine.clock.advance(70)
    assert rd(apic, CURRENT) == 0 and not apic.intr_pending()     # counted out, not yet fired
    machine.clock.advance(1)
    assert in_register(apic, IRR, 0x40) and apic.intr_pending()
    assert machine.clock.armed() == [] and rd(apic, CURRENT) == 0


def test_periodic(apic, machine):
    start_timer(apic, 9, lvt=PERIODIC | 0x40, divide=0xB)
    fired = []
    for _ in range(3):
        machine.clock.advance(10)
        fired.append(apic.acknowledge())
        wr(apic, EOI, 0)
    assert fired == [0x40] * 3 and machine.clock.armed() == [40]
    machine.clock.advance(5)
    assert rd(apic, CURRENT) == 9 - 35 % 10


def test_no_timer_while_masked_or_without_a_count(apic, machine):
    start_timer(apic, 100, lvt=MASKED | 0x40)
    assert machine.clock.armed() == []
    wr(apic, LVT_TIMER, 0x40)               # unmasked: armed for the count loaded before
    assert machine.clock.armed() == [101]
    wr(apic, INITIAL, 0)
    assert machine.clock.armed() == []
    start_timer(apic, 0, lvt=PERIODIC | 0x40)
    assert machine.clock.armed() == []


def test_masking_stops_an_armed_timer(apic, machine):
    start_timer(apic, 50)
    wr(apic, LVT_TIMER, MASKED | 0x40)
    machine.clock.advance(100)
    assert not in_register(apic, IRR, 0x40)
    wr(apic, LVT_TIMER, 0x40)               # expired meanwhile: a one-shot is not re-armed
    assert machine.clock.armed() == []


def test_the_timer_lvt_in_nmi_mode(apic, machine):
    start_timer(apic, 5, lvt=0x400)
    machine.clock.advance(6)
    assert machine.nmis == 1 and not apic.irr


def test_a_timer_taken_before_the_clock_shows_it_counts_as_expired(apic, machine):
    """A timer fired before the clock reaches its due time (a host-time clock): the device's
    time is the expiry from then on (the current count, a periodic timer re-armed from it)."""
    start_timer(apic, 999, lvt=PERIODIC | 0x40, divide=0xB)
    machine.clock.fire_next_halted()
    assert machine.clock.now == 0 and in_register(apic, IRR, 0x40)
    assert rd(apic, CURRENT) == 999 and machine.clock.armed() == [2000]
    machine.clock.advance(1500)             # the clock catches up past the device's time
    assert rd(apic, CURRENT) == 999 - 500


# -- the 8259 through LINT0 ------------------------------------------------------------------------
@pytest.fixture
def pic():
    pair = Pic8259Pair()
    for port, base, icw3 in ((0x20, 0x08, 4), (0xA0, 0x70, 2)):
        for offset, value in ((0, 0x11), (1, base), (1, icw3), (1, 0x01), (1, 0x00)):
            pair.write(port + offset, 1, value)
    return pair


def test_a_masked_lint0_blocks_the_8259(machine, pic):
    lapic = LocalApic(machine, pic)
    pic.set_irq(1, True)
    assert pic.output and not lapic.intr_pending()      # QEMU's reset: LINT0 masked
    assert lapic.acknowledge() is None


def test_extint_lint0_passes_the_8259_through(machine, pic):
    lapic = LocalApic(machine, pic)
    wr(lapic, LVT_LINT0, 0x700)             # SeaBIOS writes 0x8700
    pic.set_irq(1, True)
    assert lapic.intr_pending() and machine.raised >= 1
    assert lapic.acknowledge() == 0x09      # the 8259's vector, acknowledged there
    assert not pic.output and not lapic.intr_pending()


def test_the_8259_goes_before_a_pending_apic_vector(machine, pic):
    lapic = LocalApic(machine, pic)
    wr(lapic, SPIV, 0x1FF)
    wr(lapic, LVT_LINT0, 0x700)
    lapic.deliver(0xE1)
    pic.set_irq(3, True)
    assert lapic.acknowledge() == 0x0B and lapic.acknowledge() == 0xE1


def test_a_fixed_lint0_turns_the_8259_into_an_apic_vector(machine, pic):
    """QEMU: the rising INT sets LINT0's vector in IRR, and the acknowledge still goes to the
    8259 while its INT is high (apic_check_pic)."""
    lapic = LocalApic(machine, pic)
    wr(lapic, SPIV, 0x1FF)
    wr(lapic, LVT_LINT0, 0x31)
    pic.set_irq(4, True)
    assert in_register(lapic, IRR, 0x31) and lapic.intr_pending()
    assert lapic.acknowledge() == 0x0C
    assert lapic.acknowledge() == 0x31


def test_a_globally_disabled_apic_with_a_masked_lint0_still_blocks_the_8259(machine, pic):
    lapic = LocalApic(machine, pic)
    lapic.write_msr(0xFEE0_0000)
    pic.set_irq(1, True)
    assert not lapic.intr_pending()


def test_a_globally_disabled_apic_acknowledges_through_the_8259(machine, pic):
    lapic = LocalApic(machine, pic)
    wr(lapic, LVT_LINT0, 0x700)
    lapic.write_msr(0xFEE0_0000)
    pic.set_irq(1, True)
    assert lapic.intr_pending() and lapic.acknowledge() == 0x09


def test_lint1_nmi(apic, machine):
    wr(apic, LVT_LINT1, 0x400)
    apic.external_nmi()
    wr(apic, LVT_LINT1, MASKED | 0x400)
    apic.external_nmi()
    assert machine.nmis == 1


# -- the MSR, CR8, INIT, snapshots -------------------------------------------------------------------
@pytest.mark.parametrize("sticks", [True, False], ids=["qemu", "kvm"])
def test_clearing_the_global_enable(machine, sticks):
    apic = LocalApic(machine, enable_sticks_off=lambda: sticks)
    wr(apic, SPIV, 0x1FF)
    apic.write_msr(0xFEE0_0100)             # BSP kept, ENABLE cleared
    assert apic.read_msr() == 0xFEE0_0100 and not apic.hardware_enabled
    assert rd(apic, SPIV) == 0xFF           # software-disabled too
    apic.write_msr(0xFEE0_0900)
    # QEMU 7.2's TCG APIC: "if disabled, cannot be enabled again"; KVM's sets it again
    # (kvm-unit-tests disables and re-enables it as it starts, then sends itself IPIs)
    assert apic.read_msr() == (0xFEE0_0100 if sticks else 0xFEE0_0900)
    wr(apic, SPIV, 0x1FF)                   # the registers still work
    apic.deliver(0x41)
    assert apic.acknowledge() == 0x41


def test_msr_base_bsp_and_extd(apic):
    wr(apic, ID, 0x0500_0000)
    apic.write_msr(0x1_2345_6C00)           # EXTD: the ID resets; high and low bits dropped
    assert apic.read_msr() == 0x2345_6900 and rd(apic, ID) == 0


def test_reset_brings_the_msr_back(apic):
    apic.write_msr(0)
    apic.reset()
    assert apic.read_msr() == 0xFEE0_0900


def test_cr8_is_the_tpr_class(apic):
    apic.write_cr8(0x15)
    assert rd(apic, TPR) == 0x50 and apic.read_cr8() == 5


def test_init_keeps_the_id_and_the_msr(apic):
    wr(apic, ID, 0x0300_0000)
    apic.write_msr(0xFEE0_0100)
    start_timer(apic, 100)
    apic.init_reset()
    assert rd(apic, ID) == 0x0300_0000 and apic.read_msr() == 0xFEE0_0100
    assert rd(apic, LVT_TIMER) == MASKED and apic.machine.clock.armed() == []


def test_restore_rearms_the_timer_and_drops_the_old_one(apic, machine):
    start_timer(apic, 99, lvt=PERIODIC | 0x40, divide=0xB)
    machine.clock.advance(150)
    apic.acknowledge()
    saved = apic.state()
    machine.clock.advance(100)
    wr(apic, INITIAL, 0)
    machine.clock.now = 150                 # the machine's restore brings its clock back first
    apic.restore(saved)
    assert apic.state() == saved and machine.clock.armed() == [200]
    machine.clock.advance(60)
    assert in_register(apic, IRR, 0x40) and in_register(apic, ISR, 0x40)


# -- guests ------------------------------------------------------------------------------------------
HANDLERS = 0x180000
COUNT = 0x190000                            # a dword the handlers count in


def apic_guest(code: str, handlers: dict[int, str], pic=None):
    """A bare machine counting instructions (1 instruction = 1 ns), its local APIC, ``code``
    in 32-bit protected mode (IF clear) and an interrupt gate per handler."""
    machine = Machine(exact_instructions=True)
    lapic = LocalApic(machine, pic)
    machine.write_memory(0x100000, asm(code, 32, 0x100000))
    machine.boot("protected", 0x100000)
    for index, (vector, source) in enumerate(handlers.items()):
        address = HANDLERS + 0x100 * index
        machine.write_memory(address, asm(source, 32, address))
        machine.write_memory(IDT_BASE + vector * 8, pack_gate(address, SEL_CODE32, SYS_INT_GATE))
    return machine, lapic


def count(machine) -> int:
    return int.from_bytes(machine.read_memory(COUNT, 4), "little")


A = APIC_BASE
ENABLE = f"mov dword ptr [{A + SPIV:#x}], 0x1FF\n"
EOI_AND_IRET = f"mov dword ptr [{A + EOI:#x}], 0\niretd\n"


def test_guest_timer_interrupt_at_the_exact_instruction():
    """Initial count 50 divided by 1: the interrupt comes (50 + 1) << 0 ns after the count's
    write, i.e. once the MOV and 50 more instructions have retired."""
    code = ("sti\n" + ENABLE + f"mov dword ptr [{A + DIVIDE:#x}], 0xB\nmov dword ptr [{A + LVT_TIMER:#x}], 0x40\n"
            f"xor ecx, ecx\nmov dword ptr [{A + INITIAL:#x}], 50\n" + "inc ecx\n" * 80 + "cli\nhlt\n")
    handler = f"mov esi, ecx\nmov edi, dword ptr [{A + CURRENT:#x}]\ninc dword ptr [{COUNT:#x}]\n" + EOI_AND_IRET
    machine, lapic = apic_guest(code, {0x40: handler})
    result = machine.run(max_instructions=1000)
    assert result.stop.reason is StopReason.HLT
    assert result.regs["rsi"] == 50 and result.regs["rdi"] == 0 and count(machine) == 1
    assert result.regs["rcx"] == 80 and lapic.isr == 0


def test_guest_timer_with_divide_by_two_and_periodic_mode():
    code = ("sti\n" + ENABLE + f"mov dword ptr [{A + DIVIDE:#x}], 0\nmov dword ptr [{A + LVT_TIMER:#x}], 0x20040\n"
            f"xor ecx, ecx\nmov dword ptr [{A + INITIAL:#x}], 9\n" + "inc ecx\n" * 70
            + f"mov dword ptr [{A + LVT_TIMER:#x}], 0x10040\ncli\nhlt\n")
    handler = f"mov eax, dword ptr [{COUNT:#x}]\nmov dword ptr [{COUNT + 4:#x} + eax*4], ecx\ninc dword ptr [{COUNT:#x}]\n" \
        + EOI_AND_IRET
    machine, lapic = apic_guest(code, {0x40: handler})
    assert machine.run(max_instructions=1000).stop.reason is StopReason.HLT
    # Every (9 + 1) << 1 = 20 ns; the handler's own 5 instructions are part of each period.
    seen = [int.from_bytes(machine.read_memory(COUNT + 4 + 4 * i, 4), "little") for i in range(count(machine))]
    assert seen == [19, 34, 49, 64]


def test_guest_halted_is_woken_by_the_timer():
    """The guest builds its own IDT (vector 0x40), enables the APIC, loads the one-shot timer
    (100000, divided by 1) with its 9th instruction, halts, and checks that the handler ran
    (it reads the current count and writes EOI).  The timer expires at 8 + 100000 + 1 ns while
    the CPU is halted; the clock waits until then."""
    idt, idtr, gate = 0x200000, COUNT + 0x10, 0x200000 + 0x40 * 8
    code = f"""
        mov dword ptr [{gate:#x}], {SEL_CODE32 << 16 | HANDLERS & 0xFFFF:#x}
        mov dword ptr [{gate + 4:#x}], {HANDLERS & 0xFFFF0000 | 0x8E00:#x}
        mov word ptr [{idtr:#x}], 0x7FF
        mov dword ptr [{idtr + 2:#x}], {idt:#x}
        lidt [{idtr:#x}]
        {ENABLE}
        mov dword ptr [{A + DIVIDE:#x}], 0xB
        mov dword ptr [{A + LVT_TIMER:#x}], 0x40
        mov dword ptr [{A + INITIAL:#x}], 100000
        sti
        hlt
        mov eax, 0xBAD
        cmp dword ptr [{COUNT:#x}], 1
        jne done
        mov eax, 0x600D
    done:
        cli
        hlt
    """
    handler = f"mov edi, dword ptr [{A + CURRENT:#x}]\ninc dword ptr [{COUNT:#x}]\n" + EOI_AND_IRET
    machine, lapic = apic_guest(code, {})
    machine.write_memory(HANDLERS, asm(handler, 32, HANDLERS))
    machine.log_device_interrupts = True
    result = machine.run(max_instructions=1000)
    assert result.stop.reason is StopReason.HLT and result.regs["rax"] == 0x600D
    assert result.regs["rdi"] == 0          # expired, from the handler's point of view
    assert [e["vector"] for e in result.events if e["kind"] == "external"] == [0x40]
    assert lapic.isr == lapic.irr == 0 and lapic.timer_expiry == -1
    assert lapic.initial_count_load_time == 8 and lapic.next_time == 8 + 100_001
    # After the wake: the handler (4), MOV, CMP, JNE, MOV, CLI, HLT.
    assert machine.clock.now_ns() == lapic.next_time + 10 and machine.instructions == 11 + 10


def test_guest_self_ipi_is_delivered_once():
    code = ("sti\n" + ENABLE + f"mov dword ptr [{A + ICR_LOW:#x}], 0x40041\nmov ebx, dword ptr [{COUNT:#x}]\n"
            "cli\nhlt\n")
    handler = f"inc dword ptr [{COUNT:#x}]\n" + EOI_AND_IRET
    machine, lapic = apic_guest(code, {0x41: handler})
    result = machine.run(max_instructions=1000)
    assert result.stop.reason is StopReason.HLT
    assert count(machine) == 1 and result.regs["rbx"] == 1      # taken right after the ICR write
    assert lapic.isr == lapic.irr == 0


def test_guest_tpr_holds_a_vector_until_lowered():
    code = ("sti\n" + ENABLE + f"mov dword ptr [{A + TPR:#x}], 0x50\n"
            f"mov dword ptr [{A + ICR_LOW:#x}], 0x40041\n"
            f"mov ebx, dword ptr [{COUNT:#x}]\nmov edx, dword ptr [{A + IRR + 0x20:#x}]\n"
            f"mov dword ptr [{A + TPR:#x}], 0x30\nmov ecx, dword ptr [{COUNT:#x}]\ncli\nhlt\n")
    handler = f"inc dword ptr [{COUNT:#x}]\n" + EOI_AND_IRET
    machine, lapic = apic_guest(code, {0x41: handler})
    result = machine.run(max_instructions=1000)
    assert result.stop.reason is StopReason.HLT
    assert result.regs["rbx"] == 0 and result.regs["rdx"] == 1 << 1      # held: in IRR
    assert result.regs["rcx"] == 1 and count(machine) == 1              # taken once TPR fell


def test_guest_takes_the_8259_through_an_extint_lint0(pic):
    code = ("sti\n" + f"mov dword ptr [{A + LVT_LINT0:#x}], 0x8700\nhlt\ncli\nhlt\n")
    handler = f"inc dword ptr [{COUNT:#x}]\nmov al, 0x20\nout 0x20, al\niretd\n"
    machine, lapic = apic_guest(code, {0x09: handler}, pic=pic)
    pic.register(machine.ports)
    machine.clock.add_timer(200, lambda: pic.set_irq(1, True))
    result = machine.run(max_instructions=1000)
    assert result.stop.reason is StopReason.HLT and count(machine) == 1
    assert result.stats["device_interrupts"] == 1 and result.stats["interrupts_delivered"] == 1
    assert not [e for e in result.events if e["kind"] == "external"]      # counted, not listed


def test_guest_msr_wired_through_add_msr():
    """The wiring proposed for IA32_APIC_BASE (the board's to make): the core's kept-MSR
    interface.  Clearing the global enable software-disables the APIC; it stays disabled."""
    code = ENABLE + f"""
        mov ecx, 0x1B
        rdmsr
        mov esi, eax
        and eax, 0xFFFFF7FF
        wrmsr
        or eax, 0x800
        wrmsr
        rdmsr
        mov edi, eax
        mov ebx, dword ptr [{A + SPIV:#x}]
        hlt
    """
    machine, lapic = apic_guest(code, {})
    machine.add_msr(Msr(lambda msr: msr == 0x1B, lambda msr: lapic.read_msr(),
                        lambda msr, value: lapic.write_msr(value)))
    result = machine.run(max_instructions=100)
    assert result.stop.reason is StopReason.HLT
    assert (result.regs["rsi"], result.regs["rdi"], result.regs["rbx"]) == (0xFEE0_0900, 0xFEE0_0100, 0xFF)


def test_a_timer_armed_inside_an_mmio_write_completes_the_write_once():
    code = ("sti\n" + ENABLE + f"mov dword ptr [{A + LVT_TIMER:#x}], 0x40\n"
            f"mov dword ptr [{A + INITIAL:#x}], 20\n" + "nop\n" * 40 + "cli\nhlt\n")
    machine, _ = apic_guest(code, {0x40: f"inc dword ptr [{COUNT:#x}]\n" + EOI_AND_IRET})
    result = machine.run(max_instructions=500)
    assert result.stop.reason is StopReason.HLT and count(machine) == 1
