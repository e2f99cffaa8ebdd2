"""A port-I/O device: a POST-code latch at port 0x80 that records every byte the guest writes
and answers the last one on a read.  Run: python examples/port_device.py"""
from ringminus import Machine, StopReason


class PostCodes:
    precise = False             # True: the access stops the guest exactly at the instruction

    def __init__(self):
        self.codes = []

    def read(self, port: int, size: int) -> int:
        return self.codes[-1] if self.codes else 0xFF

    def write(self, port: int, size: int, value: int) -> None:
        self.codes.append(value & 0xFF)


CODE = bytes.fromhex(
    "b905000000"                # mov ecx, 5
    "89c8"                      # l: mov eax, ecx
    "e680"                      # out 0x80, al
    "e2fa"                      # loop l
    "e480"                      # in al, 0x80
    "f4"                        # hlt
)


def main() -> list[int]:
    machine = Machine()
    latch = machine.ports.register(0x80, PostCodes())
    machine.write_memory(0x100000, CODE)
    machine.boot("protected", 0x100000)
    result = machine.run()
    assert result.stop.reason is StopReason.HLT
    print(f"POST codes {latch.codes}, the guest read back {result.regs['rax'] & 0xFF}")
    return latch.codes


if __name__ == "__main__":
    main()
