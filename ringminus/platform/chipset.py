"""The chipset pieces SMM firmware programs, as QEMU's q35 and pc machines have them
(oracle/README.md): PCI functions on the machine's PCI bus — the host bridge with its SMRAM
register, ICH9's LPC bridge (q35: PMBASE, and SMI_EN behind it) or PIIX4's PM function (pc) —
and the APM control port 0xB2 whose writes raise an SMI when enabled.
"""
from __future__ import annotations

from typing import Callable

from ..emulator.pci import PciBus, PciFunction
from ..emulator.ports import PortBus
from ..smm.smram import Smram

APM_CNT, APM_STS = 0xB2, 0xB3
ACPI_ENABLE, ACPI_DISABLE = 0x02, 0x03      # APM commands ICH9 handles itself (no SMI)

# ICH9 LPC (00:1f.0): PMBASE dword at 0x40 (I/O space, bit 0 reads 1), ACPI_CNTL at 0x44
ICH9_PMBASE, ICH9_ACPI_CNTL, ICH9_ACPI_EN = 0x40, 0x44, 0x80
ICH9_SMI_EN, ICH9_APMC_EN, ICH9_GBL_SMI_EN = 0x30, 1 << 5, 1 << 0
# PIIX4 PM (00:01.3): config 0x5B bit 1 enables SMIs from APM_CNT writes
PIIX4_APMC, PIIX4_APMC_EN = 0x5B, 0x02


class HostBridge(PciFunction):
    """The MCH / i440FX: its SMRAM register (ESMRAMC/SMRAM) lives in Smram, where
    ``set_state`` changes it too; locked bits read back as held."""

    def __init__(self, kind: str, smram: Smram):
        self.smram = smram
        self.smram_offset = 0x9D if kind == "q35" else 0x72
        super().__init__(0x8086, 0x29C0 if kind == "q35" else 0x1237, 0x060000, writable={self.smram_offset: 0xFF})
        self.config[self.smram_offset] = smram.register

    def read(self, offset: int, size: int) -> int:
        self.config[self.smram_offset] = self.smram.register
        return super().read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        super().write(offset, size, value)
        if offset <= self.smram_offset < offset + size:
            self.smram.write_register(self.config[self.smram_offset])
            self.config[self.smram_offset] = self.smram.register


class Chipset:
    """``q35`` (MCH + ICH9) or ``pc`` (i440FX + PIIX4), enough of each for SMM."""

    def __init__(self, kind: str, smram: Smram, ports: PortBus, pci: PciBus, raise_smi: Callable[[], None],
                 apm_smi_always: bool = False):
        if kind not in ("q35", "pc"):
            raise ValueError(f"chipset must be q35 or pc, not {kind!r}")
        self.kind = kind
        self.smram = smram
        self.raise_smi = raise_smi
        self.apm_smi_always = apm_smi_always
        self.apm_status = 0
        self.smi_enable = 0                 # ICH9 SMI_EN (PMBASE + 0x30)
        self.pm_base: int | None = None
        self.bridge = pci.add(0, 0, 0, HostBridge(kind, smram))
        if kind == "q35":
            self.lpc = pci.add(0, 0x1F, 0, PciFunction(
                0x8086, 0x2918, 0x060100, writable={ICH9_PMBASE: 0x80, ICH9_PMBASE + 1: 0xFF, ICH9_ACPI_CNTL: 0xFF},
                on_write=self._lpc_written))
            self.lpc.config[ICH9_PMBASE] = 0x01                  # I/O space indicator
        else:
            self.pm = pci.add(0, 1, 3, PciFunction(0x8086, 0x7113, 0x068000, writable={PIIX4_APMC: 0xFF}))
        # Precise: the SMI is taken right after the OUT, before the next instruction.
        ports.register(APM_CNT, read=lambda port, size: 0, write=self._write_apm_control, precise=True)
        ports.register(APM_STS, read=lambda port, size: self.apm_status,
                       write=lambda port, size, value: setattr(self, "apm_status", value & 0xFF))
        self._ports = ports

    # -- the devices -------------------------------------------------------------------------
    def _lpc_written(self, offset: int) -> None:
        base = self.lpc.read(ICH9_PMBASE, 4) & 0xFF80
        enabled = self.lpc.config[ICH9_ACPI_CNTL] & ICH9_ACPI_EN
        new_base = base if enabled else None
        if new_base != self.pm_base:
            if self.pm_base is not None:
                for port in range(self.pm_base + ICH9_SMI_EN, self.pm_base + ICH9_SMI_EN + 4):
                    self._ports.unregister(port)
            self.pm_base = new_base
            if new_base is not None:
                self._ports.register(range(new_base + ICH9_SMI_EN, new_base + ICH9_SMI_EN + 4),
                                     read=self._read_smi_enable, write=self._write_smi_enable, overlay=True)

    def _read_smi_enable(self, port: int, size: int) -> int:
        return (self.smi_enable >> (8 * (port - self.pm_base - ICH9_SMI_EN))) & ((1 << (8 * size)) - 1)

    def _write_smi_enable(self, port: int, size: int, value: int) -> None:
        shift = 8 * (port - self.pm_base - ICH9_SMI_EN)
        mask = ((1 << (8 * size)) - 1) << shift
        self.smi_enable = (self.smi_enable & ~mask) | ((value << shift) & mask & 0xFFFF_FFFF)

    def apm_smi_enabled(self) -> bool:
        if self.apm_smi_always:
            return True
        if self.kind == "q35":
            return self.pm_base is not None and bool(self.smi_enable & ICH9_APMC_EN)
        return bool(self.pm.config[PIIX4_APMC] & PIIX4_APMC_EN)

    def _write_apm_control(self, port: int, size: int, value: int) -> None:
        command = value & 0xFF
        if self.kind == "q35" and command in (ACPI_ENABLE, ACPI_DISABLE) and not self.apm_smi_always:
            return                      # ICH9 (QEMU) handles ACPI enable/disable without an SMI
        if self.apm_smi_enabled():
            self.raise_smi()
