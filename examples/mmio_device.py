"""An MMIO device with an interrupt line: a doorbell at 0xFEB00000.  Register 0 reads the
number of rings; writing register 4 rings it, which raises the device's line, routed to
interrupt vector 0x30 (a self-IPI).  The write completes once and its instruction retires
before the interrupt is taken.  Run: python examples/mmio_device.py"""
from ringminus import Machine, StopReason
from ringminus.arch.segments import SYS_INT_GATE, pack_gate
from ringminus.emulator.boot import IDT_BASE, SEL_CODE32

DOORBELL, VECTOR, HANDLER = 0xFEB0_0000, 0x30, 0x180000


class Doorbell:
    def __init__(self, line):
        self.line, self.rings = line, 0

    def read(self, offset: int, size: int) -> int:
        return self.rings if offset == 0 else 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 4:
            self.rings += 1
            self.line.pulse()           # an edge: the interrupt is raised once


CODE = bytes.fromhex(
    "fb"                        # sti
    "c7050400b0fe01000000"      # mov dword ptr [0xfeb00004], 1   (ring)
    "8b1d0000b0fe"              # mov ebx, dword ptr [0xfeb00000] (rings so far)
    "fa"                        # cli
    "f4"                        # hlt
)


def main() -> tuple[int, int]:
    machine = Machine()
    doorbell = Doorbell(machine.interrupt_line("doorbell", vector=VECTOR))
    machine.add_mmio(DOORBELL, 0x1000, doorbell)
    machine.write_memory(0x100000, CODE)
    machine.boot("protected", 0x100000)                         # (boot writes the IDT: gates after it)
    machine.write_memory(IDT_BASE + VECTOR * 8, pack_gate(HANDLER, SEL_CODE32, SYS_INT_GATE))
    machine.write_memory(HANDLER, bytes.fromhex("46cf"))       # inc esi; iret
    result = machine.run()
    assert result.stop.reason is StopReason.HLT
    interrupts = result.regs["rsi"]
    print(f"rings {doorbell.rings}, interrupts taken {interrupts}, the guest read {result.regs['rbx']} rings")
    return doorbell.rings, interrupts


if __name__ == "__main__":
    main()
