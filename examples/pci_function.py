"""A PCI function with a memory BAR: device 00:03.0 (vendor 0x1AF4) decodes a 4 KiB register
window wherever the guest places BAR0, once the guest enables memory decoding.  The guest
reads the vendor/device ID through configuration mechanism #1 (0xCF8/0xCFC), places BAR0 at
0xFEB00000, sets the command register's memory bit, then writes and reads a register.
Run: python examples/pci_function.py"""
from ringminus import Machine, StopReason
from ringminus.emulator.pci import PciFunction


class Scratch:
    """The BAR's registers: one scratch dword at offset 0."""

    def __init__(self):
        self.value = 0

    def read(self, offset: int, size: int) -> int:
        return self.value if offset == 0 else 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self.value = value


CODE = bytes.fromhex(
    "66baf80c" "b800180080" "ef"            # CONFIG_ADDRESS := 00:03.0, register 0x00
    "66bafc0c" "ed" "89c7"                  # edi := vendor/device ID
    "66baf80c" "b810180080" "ef"            # register 0x10: BAR0
    "66bafc0c" "b80000b0fe" "ef"            # BAR0 := 0xFEB00000
    "66baf80c" "b804180080" "ef"            # register 0x04: command
    "66bafc0c" "66b80200" "66ef"            # memory decoding on
    "c7050000b0fe34120000"                  # mov dword ptr [0xfeb00000], 0x1234
    "8b350000b0fe"                          # mov esi, dword ptr [0xfeb00000]
    "f4"                                    # hlt
)


def main() -> tuple[int, int]:
    machine = Machine()
    registers = Scratch()
    function = PciFunction(vendor=0x1AF4, device=0x1000, class_code=0xFF0000)

    def place(address):                     # the guest moved BAR0 (None: decoding off)
        if address is not None:
            machine.add_mmio(address, 0x1000, registers, "scratch BAR0")

    function.add_bar(0, 0x1000, map=place)
    machine.pci.add(0, 3, 0, function)
    machine.write_memory(0x100000, CODE)
    machine.boot("protected", 0x100000)
    result = machine.run()
    assert result.stop.reason is StopReason.HLT
    print(f"ID {result.regs['rdi']:#010x}, BAR0 at {function.bar_address(0):#x}, "
          f"register read back {result.regs['rsi']:#x}")
    return result.regs["rdi"], result.regs["rsi"]


if __name__ == "__main__":
    main()
