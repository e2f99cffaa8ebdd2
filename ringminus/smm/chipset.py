"""The chipset pieces SMM firmware programs, as QEMU's q35 and pc machines have them
(oracle/README.md): PCI configuration mechanism #1 (0xCF8/0xCFC), the host bridge with its
SMRAM register, the SMI enables of ICH9's LPC bridge (q35) or PIIX4's PM function (pc), and
the APM control port 0xB2 whose writes raise an SMI when enabled.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Callable

from ..emulator.ports import PortBus
from .smram import Smram

CONFIG_ADDRESS, CONFIG_DATA = 0xCF8, 0xCFC
APM_CNT, APM_STS = 0xB2, 0xB3
ACPI_ENABLE, ACPI_DISABLE = 0x02, 0x03      # APM commands ICH9 handles itself (no SMI)

# ICH9 LPC (00:1f.0): PMBASE dword at 0x40 (I/O space, bit 0 reads 1), ACPI_CNTL at 0x44
ICH9_PMBASE, ICH9_ACPI_CNTL, ICH9_ACPI_EN = 0x40, 0x44, 0x80
ICH9_SMI_EN, ICH9_APMC_EN, ICH9_GBL_SMI_EN = 0x30, 1 << 5, 1 << 0
# PIIX4 PM (00:01.3): config 0x5B bit 1 enables SMIs from APM_CNT writes
PIIX4_APMC, PIIX4_APMC_EN = 0x5B, 0x02


@dataclass
class PciFunction:
    """256 bytes of configuration space with per-byte write masks and a write hook."""
    vendor: int
    device: int
    class_code: int
    writable: dict[int, int] = field(default_factory=dict)      # offset -> writable bit mask
    on_write: Callable[[int], None] | None = None               # called with the offset written

    def __post_init__(self):
        self.config = bytearray(256)
        struct.pack_into("<HH", self.config, 0, self.vendor, self.device)
        struct.pack_into("<I", self.config, 8, self.class_code << 8)

    def read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.config[offset:offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        for i in range(size):
            mask = self.writable.get(offset + i, 0)
            if mask:
                byte = (value >> (8 * i)) & 0xFF
                self.config[offset + i] = (self.config[offset + i] & ~mask) | (byte & mask)
                if self.on_write:
                    self.on_write(offset + i)


class Chipset:
    """``q35`` (MCH + ICH9) or ``pc`` (i440FX + PIIX4), enough of each for SMM."""

    def __init__(self, kind: str, smram: Smram, ports: PortBus, raise_smi: Callable[[], None],
                 apm_smi_always: bool = False):
        if kind not in ("q35", "pc"):
            raise ValueError(f"chipset must be q35 or pc, not {kind!r}")
        self.kind = kind
        self.smram = smram
        self.raise_smi = raise_smi
        self.apm_smi_always = apm_smi_always
        self.address = 0
        self.apm_status = 0
        self.smi_enable = 0                 # ICH9 SMI_EN (PMBASE + 0x30)
        self.pm_base: int | None = None
        self.smram_offset = 0x9D if kind == "q35" else 0x72
        bridge = PciFunction(0x8086, 0x29C0 if kind == "q35" else 0x1237, 0x060000,
                             writable={self.smram_offset: 0xFF}, on_write=self._bridge_written)
        bridge.config[self.smram_offset] = smram.register
        self.functions: dict[tuple[int, int, int], PciFunction] = {(0, 0, 0): bridge}
        if kind == "q35":
            self.lpc = PciFunction(0x8086, 0x2918, 0x060100,
                                   writable={ICH9_PMBASE: 0x80, ICH9_PMBASE + 1: 0xFF, ICH9_ACPI_CNTL: 0xFF},
                                   on_write=self._lpc_written)
            self.lpc.config[ICH9_PMBASE] = 0x01                  # I/O space indicator
            self.functions[(0, 0x1F, 0)] = self.lpc
        else:
            self.pm = PciFunction(0x8086, 0x7113, 0x068000, writable={PIIX4_APMC: 0xFF})
            self.functions[(0, 1, 3)] = self.pm
        ports.register(range(CONFIG_ADDRESS, CONFIG_ADDRESS + 4), read=self._read_address, write=self._write_address)
        ports.register(range(CONFIG_DATA, CONFIG_DATA + 4), read=self._read_data, write=self._write_data)
        # Precise: the SMI is taken right after the OUT, before the next instruction.
        ports.register(APM_CNT, read=lambda port, size: 0, write=self._write_apm_control, precise=True)
        ports.register(APM_STS, read=lambda port, size: self.apm_status,
                       write=lambda port, size, value: setattr(self, "apm_status", value & 0xFF))
        self._ports = ports

    # -- configuration mechanism #1 ----------------------------------------------------------
    def _read_address(self, port: int, size: int) -> int:
        return (self.address >> (8 * (port - CONFIG_ADDRESS))) & ((1 << (8 * size)) - 1)

    def _write_address(self, port: int, size: int, value: int) -> None:
        if port == CONFIG_ADDRESS and size == 4:
            self.address = value & 0x80FF_FFFC

    def _target(self) -> tuple[PciFunction | None, int]:
        if not self.address & 0x8000_0000:
            return None, 0
        bus, device, function = (self.address >> 16) & 0xFF, (self.address >> 11) & 0x1F, (self.address >> 8) & 7
        return self.functions.get((bus, device, function)), self.address & 0xFC

    def _read_data(self, port: int, size: int) -> int:
        target, offset = self._target()
        if target is None:
            return (1 << (8 * size)) - 1
        if target is self.functions[(0, 0, 0)]:     # the SMRAM register lives in Smram (set_state too)
            target.config[self.smram_offset] = self.smram.register
        return target.read(offset + (port - CONFIG_DATA), size)

    def _write_data(self, port: int, size: int, value: int) -> None:
        target, offset = self._target()
        if target is not None:
            target.write(offset + (port - CONFIG_DATA), size, value)

    # -- the devices -------------------------------------------------------------------------
    def _bridge_written(self, offset: int) -> None:
        if offset == self.smram_offset:
            bridge = self.functions[(0, 0, 0)]
            self.smram.write_register(bridge.config[offset])
            bridge.config[offset] = self.smram.register          # locked bits read back as held

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
