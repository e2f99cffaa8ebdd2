"""The 8259 pair (ringminus/platform/pic.py) against QEMU 7.2's i8259.c: initialisation,
priority, EOI and rotation, OCW3, auto-EOI, edge and level triggering per ELCR, the cascade,
spurious vectors, QEMU's access-size rule, snapshots — and a real-mode guest that initialises
it as SeaBIOS does and takes IRQ1 through the IVT."""
import random

import pytest

from ringminus import Machine, StopReason
from ringminus.platform.pic import ELCR_PORTS, Pic8259Pair


def wire(pic: Pic8259Pair, machine) -> None:
    """The pair drives the CPU's INTR as the boards wire it: INTA when the CPU takes it."""
    machine.add_interrupt_controller(pic)
    pic.int_output = lambda level: machine.interrupt_raised() if level else None

from ..helpers import asm

MASTER, SLAVE = 0x20, 0xA0


def outb(pic, port, value):
    pic.write(port, 1, value)


def inb(pic, port):
    return pic.read(port, 1)


def initialise(pic, icw4=0x01, master_base=0x08, slave_base=0x70, masks=(0x00, 0x00)):
    """SeaBIOS's pic_reset: ICW1 0x11, ICW2 the bases, ICW3 4/2, ICW4; then the masks."""
    for port, base, icw3, mask in ((MASTER, master_base, 4, masks[0]), (SLAVE, slave_base, 2, masks[1])):
        outb(pic, port, 0x11)
        outb(pic, port + 1, base)
        outb(pic, port + 1, icw3)
        outb(pic, port + 1, icw4)
        outb(pic, port + 1, mask)


@pytest.fixture
def pic():
    pair = Pic8259Pair()
    initialise(pair)
    return pair


def pulse(pic, irq):
    pic.set_irq(irq, True)
    pic.set_irq(irq, False)


def read_isr(pic, port=MASTER):
    outb(pic, port, 0x0B)
    value = inb(pic, port)
    outb(pic, port, 0x0A)
    return value


# -- initialisation and masks ------------------------------------------------------------------

def test_the_seabios_sequence_sets_the_bases_and_the_masks():
    pic = Pic8259Pair()
    initialise(pic, masks=(0xFB, 0xFF))
    assert (pic.master.irq_base, pic.slave.irq_base) == (0x08, 0x70)
    assert (inb(pic, 0x21), inb(pic, 0xA1)) == (0xFB, 0xFF)
    assert pic.master.init_state == pic.slave.init_state == 0
    pulse(pic, 0)                                   # masked: latched in IRR, not signalled
    assert inb(pic, 0x20) == 0x01 and not pic.output
    outb(pic, 0x21, 0xFA)                           # OCW1 unmasks it: INT rises
    assert pic.output and pic.acknowledge() == 0x08


def test_icw1_without_icw4_and_single_mode_skip_their_words():
    pic = Pic8259Pair()
    outb(pic, MASTER, 0x12)                         # single, no ICW4: ICW2 ends it
    outb(pic, 0x21, 0x20)
    assert pic.master.init_state == 0 and pic.master.irq_base == 0x20
    outb(pic, 0x21, 0x5A)
    assert inb(pic, 0x21) == 0x5A                   # that was OCW1
    outb(pic, MASTER, 0x10)                         # cascade, no ICW4: ICW2, ICW3
    outb(pic, 0x21, 0x47)
    outb(pic, 0x21, 0x04)
    assert pic.master.init_state == 0 and pic.master.irq_base == 0x40


def test_icw1_resets_everything_but_the_elcr_and_level_requests(pic):
    outb(pic, ELCR_PORTS[1], 0x04)                  # IRQ10 level-triggered
    pic.set_irq(10, True)
    pulse(pic, 11)
    outb(pic, 0xA1, 0x33)
    outb(pic, SLAVE, 0x11)
    assert pic.slave.imr == 0 and pic.slave.irr == 0x04 and pic.slave.elcr == 0x04


# -- priority, the cascade, spurious vectors ---------------------------------------------------

def test_the_lowest_irq_is_taken_first_and_blocks_lower_ones_until_eoi(pic):
    pulse(pic, 3)
    pulse(pic, 1)
    assert pic.acknowledge() == 0x09
    assert read_isr(pic) == 0x02 and not pic.output        # IRQ3 waits for the EOI
    outb(pic, MASTER, 0x20)                                  # non-specific EOI
    assert pic.output and pic.acknowledge() == 0x0B


def test_a_higher_priority_irq_nests_and_the_eoi_clears_the_highest(pic):
    pulse(pic, 3)
    assert pic.acknowledge() == 0x0B
    pulse(pic, 1)
    assert pic.output and pic.acknowledge() == 0x09
    assert read_isr(pic) == 0x0A
    outb(pic, MASTER, 0x20)
    assert read_isr(pic) == 0x08


def test_a_slave_irq_goes_through_irq2_with_the_slaves_vector(pic):
    pulse(pic, 8)
    assert pic.master.irr == 0x04 and pic.output
    assert pic.acknowledge() == 0x70
    assert (read_isr(pic, MASTER), read_isr(pic, SLAVE)) == (0x04, 0x01)
    pulse(pic, 12)                                  # lower priority on the slave: waits
    assert not pic.output
    outb(pic, SLAVE, 0x20)
    outb(pic, MASTER, 0x20)
    assert pic.output and pic.acknowledge() == 0x74


def test_nothing_pending_gives_the_spurious_irq7_vectors(pic):
    assert pic.acknowledge() == 0x0F and read_isr(pic) == 0          # no ISR bit
    pulse(pic, 9)                                   # the master latches IRQ2 ...
    outb(pic, 0xA1, 0x02)                           # ... then the slave's request is masked
    assert pic.acknowledge() == 0x77                # slave spurious: IRQ15's vector
    assert (read_isr(pic, MASTER), read_isr(pic, SLAVE)) == (0x04, 0x00)


def test_special_fully_nested_mode_lets_the_slave_interrupt_its_own_service():
    plain, nested = Pic8259Pair(), Pic8259Pair()
    initialise(plain)
    initialise(nested, icw4=0x11)
    for pic in (plain, nested):
        pulse(pic, 12)
        assert pic.acknowledge() == 0x74
        pulse(pic, 8)
    assert not plain.output
    assert nested.output and nested.acknowledge() == 0x70


# -- edge and level triggering -------------------------------------------------------------------

def test_the_elcr_keeps_only_its_writable_bits():
    pic = Pic8259Pair()
    outb(pic, 0x4D0, 0xFF)
    outb(pic, 0x4D1, 0xFF)
    assert (inb(pic, 0x4D0), inb(pic, 0x4D1)) == (0xF8, 0xDE)
    pic.reset()
    assert (inb(pic, 0x4D0), inb(pic, 0x4D1)) == (0, 0)


def test_an_edge_triggered_irq_needs_a_new_rising_edge(pic):
    pic.set_irq(4, True)
    pic.set_irq(4, True)
    assert pic.acknowledge() == 0x0C
    outb(pic, MASTER, 0x20)
    assert not pic.output                           # still high: no new edge
    pic.set_irq(4, False)
    pic.set_irq(4, True)
    assert pic.output


def test_a_level_triggered_irq_follows_its_line_and_stays_in_irr_when_acknowledged(pic):
    outb(pic, 0x4D1, 0x0C)                          # IRQ10 and IRQ11 level, as SeaBIOS leaves it
    pic.set_irq(10, True)
    assert pic.slave.irr == 0x04 and pic.acknowledge() == 0x72
    assert pic.slave.irr == 0x04                    # QEMU does not clear it at the acknowledge
    pic.set_irq(10, False)
    assert pic.slave.irr == 0
    pulse(pic, 5)                                   # edge: stays latched after the line drops
    assert pic.master.irr & 0x20


# -- OCW2, OCW3, auto-EOI ---------------------------------------------------------------------------

def test_rotation_and_specific_eois(pic):
    outb(pic, MASTER, 0xC4)                         # set priority: IRQ4 lowest, IRQ5 highest
    pulse(pic, 1)
    pulse(pic, 6)
    assert pic.acknowledge() == 0x0E
    outb(pic, MASTER, 0x66)                         # specific EOI for IRQ6
    assert pic.acknowledge() == 0x09
    outb(pic, MASTER, 0xA0)                         # rotate on non-specific EOI: IRQ1 lowest
    assert pic.master.priority_add == 2 and read_isr(pic) == 0
    pulse(pic, 3)
    pic.acknowledge()
    outb(pic, MASTER, 0xE3)                         # rotate on specific EOI
    assert pic.master.priority_add == 4 and read_isr(pic) == 0


def test_auto_eoi_leaves_isr_clear_and_can_rotate():
    pic = Pic8259Pair()
    initialise(pic, icw4=0x03)
    pulse(pic, 3)
    assert pic.acknowledge() == 0x0B and read_isr(pic) == 0
    outb(pic, MASTER, 0x80)                         # rotate in auto-EOI mode
    pulse(pic, 5)
    pic.acknowledge()
    assert pic.master.priority_add == 6
    outb(pic, MASTER, 0x00)
    assert pic.master.rotate_on_auto_eoi == 0


def test_ocw3_selects_irr_or_isr_and_polls(pic):
    pulse(pic, 6)
    assert inb(pic, MASTER) == 0x40                 # IRR by default
    outb(pic, MASTER, 0x0C)                         # poll: the read acknowledges
    assert inb(pic, MASTER) == 0x86
    assert read_isr(pic) == 0x40 and inb(pic, MASTER) == 0
    pulse(pic, 5)
    outb(pic, MASTER, 0x0C)
    assert inb(pic, 0x21) == 0x85                   # the data port polls too
    outb(pic, MASTER, 0x0C)
    assert inb(pic, 0x21) == 0                      # nothing pending
    assert inb(pic, 0x21) == 0                      # a poll is one read: IMR again


def test_special_mask_mode_unblocks_lower_irqs_at_the_next_update(pic):
    pulse(pic, 3)
    pic.acknowledge()
    outb(pic, 0x21, 0x08)                           # mask the one in service
    outb(pic, MASTER, 0x68)                         # special mask on: QEMU does not update here
    assert pic.master.special_mask == 1 and not pic.output
    pulse(pic, 5)
    assert pic.output and pic.acknowledge() == 0x0D
    outb(pic, MASTER, 0x48)                         # special mask off
    pulse(pic, 6)
    assert not pic.output


# -- the CPU side, the port bus, snapshots ----------------------------------------------------------

def test_int_output_is_called_when_the_level_changes(pic):
    seen = []
    pic.int_output = seen.append
    pulse(pic, 0)
    pulse(pic, 0)                                   # IRR already set: no change
    pic.acknowledge()
    assert seen == [True, False]


def test_two_and_four_byte_accesses_follow_qemus_rule(pic):
    pulse(pic, 1)
    outb(pic, 0x21, 0x5A)
    assert pic.read(0x20, 2) == 0x5A02              # IRR, then IMR
    assert pic.read(0x20, 4) == 0x5A5A5A02          # offsets 2 and 3 are the data port too
    assert pic.read(0x21, 2) == 0                   # unaligned: invalid, reads 0
    pic.write(0x21, 2, 0xFFFF)                      # ... and writes nothing
    assert inb(pic, 0x21) == 0x5A
    pic.write(0x20, 2, 0x330B)                      # OCW3 "read ISR", then IMR 0x33
    assert inb(pic, 0x21) == 0x33 and pic.master.read_reg_select == 1
    pic.write(0x4D0, 2, 0x0800)                     # the master ELCR, written twice
    assert pic.read(0x4D0, 2) == 0x0808 and pic.read(0x4D1, 4) == 0


def test_no_guest_access_raises():
    rng = random.Random(8259)
    pic = Pic8259Pair()
    for _ in range(5000):
        port = rng.choice(Pic8259Pair.PORTS)
        size = rng.choice((1, 2, 4))
        if rng.random() < 0.5:
            pic.write(port, size, rng.getrandbits(32))
        else:
            assert 0 <= pic.read(port, size) < 1 << (8 * size)
        if rng.random() < 0.3:
            pic.set_irq(rng.randrange(16), rng.random() < 0.5)
        if pic.output:
            assert 0 <= pic.acknowledge() <= 0xFF


def test_state_and_restore_round_trip(pic):
    pulse(pic, 9)
    outb(pic, 0x4D1, 0x08)
    pic.acknowledge()
    saved = pic.state()
    outb(pic, MASTER, 0x20)
    outb(pic, SLAVE, 0x11)
    other = Pic8259Pair()
    other.restore(saved)
    pic.restore(saved)
    assert pic.state() == other.state() == saved
    assert read_isr(other, SLAVE) == 0x02


def test_an_interrupt_line_connects_to_an_irq():
    machine = Machine(memory_size=2 << 20)
    pic = Pic8259Pair()
    initialise(pic)
    wire(pic, machine)
    line = machine.interrupt_line("rtc")
    line.connect(pic.sink(8))
    line.pulse()
    assert pic.intr_pending() and pic.acknowledge() == 0x70
    with pytest.raises(ValueError):
        pic.sink(16)


# -- a real-mode guest ----------------------------------------------------------------------------

GUEST = """
    mov word ptr [0x24], handler  # IVT entry 9 (IRQ1)
    mov word ptr [0x26], 0
    mov al, 0x11
    out 0x20, al
    out 0xA0, al
    mov al, 0x08
    out 0x21, al
    mov al, 0x70
    out 0xA1, al
    mov al, 4
    out 0x21, al
    mov al, 2
    out 0xA1, al
    mov al, 1
    out 0x21, al
    out 0xA1, al
    mov al, 0xFD  # only IRQ1
    out 0x21, al
    mov al, 0xFF
    out 0xA1, al
    in al, 0x21
    mov byte ptr [0x502], al
    sti
idle:
    hlt
    cmp word ptr [0x500], 3
    jb idle
    mov al, 0x42
    out 0xF4, al
handler:
    mov al, 0x0B  # OCW3: read ISR
    out 0x20, al
    in al, 0x20
    mov byte ptr [0x503], al
    inc word ptr [0x500]
    mov al, 0x20  # EOI
    out 0x20, al
    iret
"""


def test_a_guest_initialises_the_pair_and_takes_irq1_through_the_ivt():
    machine = Machine(memory_size=2 << 20)
    pic = Pic8259Pair().register(machine.ports)
    wire(pic, machine)
    keyboard = machine.interrupt_line("keyboard")
    keyboard.connect(pic.sink(1))
    pulses = []

    def press():
        keyboard.pulse()
        pulses.append(machine.instructions)
        if len(pulses) < 3:
            machine.clock.add_timer(5000, press)
    machine.clock.add_timer(5000, press)
    machine.write_memory(0x7C00, asm(GUEST, 16, 0x7C00))
    machine.boot("real", 0x7C00)
    machine.log_device_interrupts = True     # each listed, at its time
    result = machine.run(max_instructions=100_000)
    assert result.stop.reason is StopReason.EXIT and result.stop.value == 0x42
    memory = machine.read_memory(0x500, 4)
    assert int.from_bytes(memory[:2], "little") == 3
    assert memory[2] == 0xFD                        # IMR read back
    assert memory[3] == 0x02                        # ISR in the handler: IRQ1 in service
    assert [event["vector"] for event in result.events] == [9, 9, 9]
    assert read_isr(pic) == 0 and pic.master.irq_base == 0x08
