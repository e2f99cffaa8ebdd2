"""The ACPI PM I/O block at PMBASE (reference/platform.md §4; QEMU 7.2 hw/acpi/core.c,
piix4.c, ich9.c): PM1_STS/EN/CNT and the 24-bit PM timer, plus ICH9's GPE0 block and SMI_STS
(SMI_EN is the chipset's).  pc: PIIX4 PM's PMBASE (0x40, 64 bytes) decodes while PMREGMISC
(0x80) bit 0 is set; q35: ICH9 LPC's PMBASE (0x40, 128 bytes) while ACPI_CNTL (0x44) bit 7 is.

The PM timer counts at 3.579545 MHz from the machine's clock (virtual by default, so a run
and its replay read the same values)."""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..machine import Machine
    from .chipset import Chipset

PM_TIMER_HZ = 3_579_545
PM1_STS, PM1_EN, PM1_CNT, PM_TMR, GPE0, SMI_STS = 0x00, 0x02, 0x04, 0x08, 0x20, 0x34
TMR_STS, SCI_EN, SLP_EN = 1 << 0, 1 << 0, 1 << 13
# Where each chipset keeps PMBASE and the bit that turns the block on: (function, base mask,
# enable register, enable bit, size of the block).
DECODERS = {"pc": ("pm", 0xFFC0, 0x80, 0x01), "q35": ("lpc", 0xFF80, 0x44, 0x80)}
# The registers of each block: offset -> width (reads elsewhere in the block return all ones).
REGISTERS = {"pc": {PM1_STS: 2, PM1_EN: 2, PM1_CNT: 2, PM_TMR: 4},
             "q35": {PM1_STS: 2, PM1_EN: 2, PM1_CNT: 2, PM_TMR: 4, **{GPE0 + i: 1 for i in range(16)}, SMI_STS: 4}}


class PmRegisters:
    precise = False

    def __init__(self, machine: "Machine", kind: str, chipset: "Chipset"):
        self.machine, self.kind = machine, kind
        name, self.base_mask, self.enable_register, self.enable_bit = DECODERS[kind]
        self.function = getattr(chipset, name)
        self.registers = bytearray(0x40)       # PM1 and GPE0 as written
        self.timer_cleared = 0                  # PM-timer ticks when TMR_STS was last cleared
        self.base: int | None = None            # where the block decodes now
        self._ports = [offset + i for offset, width in REGISTERS[kind].items() for i in range(width)]
        chained = self.function.on_write
        self.function.on_write = lambda offset: (chained(offset) if chained else None, self.follow())[1]
        self.follow()

    def ticks(self) -> int:
        return self.machine.clock.now_ns() * PM_TIMER_HZ // 1_000_000_000

    # -- placement ---------------------------------------------------------------------------
    def follow(self) -> None:
        """Decode where the chipset's registers say now."""
        config = self.function.config
        enabled = config[self.enable_register] & self.enable_bit
        base = struct.unpack_from("<H", config, 0x40)[0] & self.base_mask if enabled else None
        if base == self.base:
            return
        ports = self.machine.ports
        if self.base is not None:
            for offset in self._ports:
                ports.unregister(self.base + offset)
        self.base = base
        if base is not None:
            ports.register([base + offset for offset in self._ports], self, overlay=True)

    # -- the registers ------------------------------------------------------------------------
    def _byte(self, offset: int) -> int:
        if PM_TMR <= offset < PM_TMR + 4:
            return (self.ticks() & 0xFF_FFFF) >> (8 * (offset - PM_TMR)) & 0xFF
        if offset == PM1_STS:
            overflowed = self.ticks() >> 23 != self.timer_cleared >> 23     # bit 23 of the timer changed
            return self.registers[PM1_STS] | (TMR_STS if overflowed else 0)
        if SMI_STS <= offset < SMI_STS + 4:
            return 0                            # QEMU never sets a bit of SMI_STS
        return self.registers[offset]

    def read(self, port: int, size: int) -> int:
        offset = port - self.base
        if offset == PM_TMR and size == 4:          # what firmware polls in its delays
            return self.ticks() & 0xFF_FFFF
        return sum(self._byte(offset + i) << (8 * i) for i in range(size) if offset + i < 0x40)

    def write(self, port: int, size: int, value: int) -> None:
        offset = port - self.base
        for i in range(size):
            at, byte = offset + i, (value >> (8 * i)) & 0xFF
            if at in (PM1_STS, PM1_STS + 1):               # write 1 to clear
                if at == PM1_STS and byte & TMR_STS:
                    self.timer_cleared = self.ticks()
                self.registers[at] &= ~byte
            elif PM_TMR <= at < PM_TMR + 4 or SMI_STS <= at < SMI_STS + 4 or at >= 0x40:
                continue                                    # read-only
            else:
                self.registers[at] = byte
        control = struct.unpack_from("<H", self.registers, PM1_CNT)[0]
        if control & SLP_EN:
            self.registers[PM1_CNT + 1] &= ~(SLP_EN >> 8)  # not stored (acpi_pm1_cnt_write)
            if (control >> 10) & 7 == 0:
                self.machine.request_stop_shutdown("ACPI power off (PM1_CNT.SLP_EN, sleep type 0)")

    # -- snapshots ----------------------------------------------------------------------------
    def state(self) -> tuple:
        return bytes(self.registers), self.timer_cleared

    def restore(self, state: tuple) -> None:
        registers, self.timer_cleared = state
        self.registers[:] = registers
        self.follow()
