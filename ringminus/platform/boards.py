"""The machines: ``none`` is the bare machine with the chipset's SMM pieces; ``pc`` and
``q35`` are QEMU 7.2's boards with ``-nodefaults`` and one vCPU (reference/platform.md) —
their PCI functions with QEMU's identities and reset values (§3.3), PAM shadow RAM and the
BIOS windows (§1.3-1.5), q35's MMCONFIG window (§3.2), the ACPI PM I/O block (§4) and the
legacy ports.  ``install`` builds one from the device table of its kind."""
from __future__ import annotations

import struct
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from ..emulator.loader import FOUR_GIB, check_bios
from ..emulator.memory import ROM
from ..emulator.pci import PciFunction
from ..emulator.plugins import Msr, Part
from ..emulator.result import Section
from ..smm import plugin as smm
from . import MACHINES, ahci, ide
from .chipset import Chipset
from .cmos import PORTS as CMOS_PORTS, Cmos
from .fwcfg import FwCfg, add_option_rom, add_qemu_x86_contents, qemu_ram_split
from .hpet import PC_INTCAP, Q35_INTCAP, Hpet
from .i8042 import I8042
from .ioapic import IoApic
from .lapic import LocalApic
from .mmconfig import MmConfig
from .pam import Pam
from .pic import Pic8259Pair
from .pit import Pit8254
from .pm import PmRegisters
from .tables import AcpiTables, recordings
from .uart import Uart16550

if TYPE_CHECKING:
    from ..machine import Machine

SUBSYSTEM = (0x1AF4, 0x1100)            # every QEMU function's subsystem IDs (SeaBIOS's qemu_detect)
MINIMUM_MEMORY = 1 << 20                # PAM shadows RAM up to 1 MiB


class Function(NamedTuple):
    """A PCI function as QEMU 7.2 builds it: where, who, and its reset registers."""
    device: int
    function: int
    vendor_device: tuple[int, int]
    class_code: int
    revision: int
    header: int                         # 0x80: multifunction
    status: int
    interrupt_pin: int
    registers: dict[int, bytes]         # other reset values, offset -> bytes
    bars: tuple[tuple[int, int, bool], ...] = ()       # (index, size, io)


# platform.md §3.3 (reset values QEMU 7.2 shows, and the registers SeaBIOS programs).
FUNCTIONS = {
    "pc": (
        Function(0, 0, (0x8086, 0x1237), 0x060000, 0x02, 0x00, 0x0000, 0, {}),            # i440FX
        Function(1, 0, (0x8086, 0x7000), 0x060100, 0x00, 0x80, 0x0200, 0, {                # PIIX3 ISA
            0x4C: b"\x4d", 0x4E: b"\x03", 0x60: b"\x80\x80\x80\x80", 0x69: b"\x02", 0x70: b"\x80",
            0x76: b"\x0c\x0c", 0x78: b"\x02", 0xA0: b"\x08", 0xA8: b"\x0f"}),
        Function(1, 1, (0x8086, 0x7010), 0x010180, 0x00, 0x00, 0x0280, 0, {},              # PIIX3 IDE
                 bars=((4, 0x10, True),)),
        Function(1, 3, (0x8086, 0x7113), 0x068000, 0x03, 0x00, 0x0280, 1, {                # PIIX4 PM
            0x40: b"\x01\x00\x00\x00", 0x5F: b"\x10", 0x63: b"\x60", 0x90: b"\x01\xb1\x00\x00",
            0xD2: b"\x09"}),
    ),
    "q35": (
        Function(0, 0, (0x8086, 0x29C0), 0x060000, 0x00, 0x00, 0x0000, 0, {                # MCH
            0x50: b"\x10\x00", 0x60: struct.pack("<Q", 0xB000_0000), 0x9E: b"\x38"}),
        Function(0x1F, 0, (0x8086, 0x2918), 0x060100, 0x02, 0x80, 0x0000, 0, {             # ICH9 LPC
            0x40: b"\x01\x00\x00\x00", 0x60: b"\x80\x80\x80\x80", 0x68: b"\x80\x80\x80\x80"}),
        Function(0x1F, 2, (0x8086, 0x2922), 0x010601, 0x02, 0x80, 0x0010, 1, {},           # ICH9 AHCI
                 bars=((4, 0x20, True), (5, 0x1000, False))),
        Function(0x1F, 3, (0x8086, 0x2930), 0x0C0500, 0x02, 0x80, 0x0000, 1, {},           # ICH9 SMBus
                 bars=((4, 0x40, True),)),
    ),
}
PAM_REGISTERS = {"pc": 0x59, "q35": 0x90}
PCIEXBAR = 0x60


def identify(function: PciFunction, spec: Function) -> None:
    """Give ``function`` QEMU's identity and reset registers; bytes 0x40-0xFF are writable,
    as QEMU's default write mask has them (a device narrows it where it must)."""
    config = function.config
    struct.pack_into("<HH", config, 0, *spec.vendor_device)
    struct.pack_into("<I", config, 8, spec.class_code << 8 | spec.revision)
    struct.pack_into("<H", config, 6, spec.status)
    config[0x0E] = spec.header
    struct.pack_into("<HH", config, 0x2C, *SUBSYSTEM)
    config[0x3D] = spec.interrupt_pin
    function.writable[0x0C:0x0E] = b"\xff\x00"           # cache line size; latency timer is read-only
    function.writable[0x3C] = 0xFF                       # interrupt line
    for offset in range(0x40, 0x100):
        if not function.writable[offset]:               # a mask the chipset narrowed stays
            function.writable[offset] = 0xFF
    for offset, value in spec.registers.items():
        config[offset:offset + len(value)] = value
    for index, size, io in spec.bars:
        function.add_bar(index, size, io)


APIC_BASE_MSR = 0x1B
APIC, HYPERVISOR = 1 << 9, 1 << 31           # Fn0000_0001 EDX (and AMD's Fn8000_0001 EDX), ECX
HYPERVISOR_LEAVES = {0x4000_0000: (0x4000_0001, *struct.unpack("<3I", b"TCGTCGTCGTCG")), 0x4000_0001: (0, 0, 0, 0)}


def under_tcg(table: dict, apic: bool) -> dict:
    """CPUID on a board as QEMU 7.2 TCG answers it: QEMU's hypervisor bit and leaves
    ("TCGTCGTCGTCG"), and the APIC bit while the local APIC is enabled in its MSR (QEMU clears
    it when the guest disables the APIC)."""
    table = {**table, **HYPERVISOR_LEAVES}
    present = APIC if apic else 0
    eax, ebx, ecx, edx = table[1]
    table[1] = (eax, ebx, ecx | HYPERVISOR, edx | present)
    if 0x8000_0001 in table and table[0x8000_0001][0]:         # AMD repeats the APIC bit
        eax, ebx, ecx, edx = table[0x8000_0001]
        table[0x8000_0001] = (eax, ebx, ecx, edx | present)
    return table


def install(machine: "Machine", kind: str, chipset: str, apm_smi: bool) -> None:
    """Build machine ``kind`` (``chipset``: the bare machine's SMM chipset, q35 or pc)."""
    if kind not in MACHINES:
        raise ValueError(f"machine must be one of {', '.join(MACHINES)}, not {kind!r}")
    bridge_kind = chipset if kind == "none" else kind
    machine.chipset = Chipset(bridge_kind, machine.smram, machine.ports, machine.pci, lambda: smm.raise_smi(machine),
                              apm_smi)
    machine.add_snapshot_part(Part(80, "chipset", _take_chipset, _put_chipset))
    machine.board = None if kind == "none" else Board(machine, kind)


class Board:
    """The devices of a pc or q35 machine beyond the SMM chipset."""

    def __init__(self, machine: "Machine", kind: str):
        if machine.memory.ram_size < MINIMUM_MEMORY:
            raise ValueError(f"the {kind} machine needs at least 1 MiB of RAM")
        self.machine, self.kind = machine, kind
        machine.exact_instructions = True       # devices read the clock: time moves within slices
        chipset = machine.chipset
        existing = {(0, 0, 0): chipset.bridge, (0, 0x1F, 0): getattr(chipset, "lpc", None),
                    (0, 1, 3): getattr(chipset, "pm", None)}
        self.functions = {}
        for spec in FUNCTIONS[kind]:
            where = (0, spec.device, spec.function)
            function = existing.get(where) or machine.pci.add(*where, PciFunction(*spec.vendor_device, spec.class_code))
            identify(function, spec)
            self.functions[where] = function
        self.bridge = chipset.bridge
        if kind == "pc":
            self.bridge.config[0x57] = min(machine.memory.ram_size >> 23, 255)    # RAM size in 8 MiB units
        self.pam = Pam(machine.memory)
        self.bridge.on_write = self._bridge_written
        self.mmconfig = MmConfig(machine) if kind == "q35" else None
        self.pm = PmRegisters(machine, kind, chipset)
        self.fw_cfg = FwCfg(machine.memory)
        self.fw_cfg.register_ports(machine.ports)
        ram = machine.memory.ram_size
        below, above = qemu_ram_split(ram, kind)
        if above:
            machine.memory.place_above_4g(below)
        self.smi_features = add_qemu_x86_contents(self.fw_cfg, ram, below, above, cpus=1, board=kind)
        builds = recordings(kind, ram)                              # QEMU's ACPI and SMBIOS tables
        self.acpi = AcpiTables(self.fw_cfg, builds, self._acpi_state) if builds else None
        machine.ports.register(0x92, read=self._read_port92, write=self._write_port92)
        self.port92 = 0
        self._add_legacy_devices(below, above)
        if kind == "q35":           # six empty SATA ports (INTx not routed yet: no port raises one)
            self.disks = ahci.plug(machine, self.functions[(0, 0x1F, 2)])
        else:                       # two empty IDE channels on IRQ 14 and 15
            self.disks = ide.plug(machine, self.functions[(0, 1, 1)],
                                  irqs=(lambda level: self.gsi(14, level), lambda level: self.gsi(15, level)))
        machine.add_cpuid_change(lambda table: under_tcg(table, self.lapic.hardware_enabled))
        machine.add_snapshot_part(Part(85, "board", self._take, self._put))

    # -- the host bridge's registers -----------------------------------------------------------
    def _bridge_written(self, offset: int) -> None:
        pam = PAM_REGISTERS[self.kind]
        if pam <= offset < pam + 7:
            self.pam.write_registers(self.bridge.config[pam:pam + 7])
        elif self.mmconfig is not None and PCIEXBAR <= offset < PCIEXBAR + 8:
            self.mmconfig.place(struct.unpack_from("<Q", self.bridge.config, PCIEXBAR)[0])

    def _acpi_state(self) -> tuple[int, int | None]:
        """What QEMU's ACPI build reads of the chipset (tables.built_for)."""
        mmconfig = self.mmconfig.placed if self.mmconfig is not None else None
        return self.pm.base or 0, mmconfig[0] if mmconfig is not None else None

    # -- BIOS -----------------------------------------------------------------------------------
    def load_bios(self, data: bytes) -> None:
        """QEMU's -bios: the image read-only below 4 GiB, its last 128 KiB the isa-bios PAM shows."""
        check_bios(data)
        rom = np.frombuffer(bytearray(data), dtype=np.uint8)
        self.machine.memory.add_overlay("pc.bios", FOUR_GIB - len(data), rom, ROM, over_ram=False)
        self.pam.set_isa_bios(data)

    def _add_legacy_devices(self, below: int, above: int) -> None:
        """The interrupt controllers and timers both boards have, wired as QEMU wires its GSIs:
        ISA IRQ n reaches the 8259 pair's input n and the IOAPIC's pin n (IRQ 0: pin 2); the
        8259 pair sits behind the local APIC's LINT0, which drives the CPU's INTR.  The 8254
        counts from reset as QEMU's does."""
        machine = self.machine
        self.pic = Pic8259Pair().register(machine.ports)
        self.lapic = LocalApic(machine, pic=self.pic,
                               enable_sticks_off=lambda: machine.profile.apic_enable_sticks_off)
        machine.add_msr(Msr(lambda msr: msr == APIC_BASE_MSR, lambda msr: self.lapic.read_msr(),
                            lambda msr, value: self.lapic.write_msr(value)))
        self.ioapic = IoApic(self.lapic, pic=self.pic, clock=machine.clock)
        self.ioapic.register(machine)
        # The 8254's IRQ 0 and the RTC's IRQ 8 pass through the HPET, which takes both over in
        # legacy-replacement mode (QEMU's hpet "pit" and "rtc" inputs).
        self.hpet = Hpet(machine.clock, irq=self.gsi, intcap=Q35_INTCAP if self.kind == "q35" else PC_INTCAP)
        self.hpet.register(machine)
        self.pit = Pit8254(machine.clock, irq0=self.hpet.pit_input, irq0_at_reset=True).register(machine.ports)
        rtc_line = machine.interrupt_line("rtc")
        rtc_line.connect(self.hpet.rtc_input)
        self.cmos = Cmos(machine.clock, machine.memory.ram_size, below, above, irq=rtc_line,
                         host_time=machine.clock.host_time)
        machine.ports.register(CMOS_PORTS, self.cmos)
        self.uart = Uart16550(irq=self._isa_line("com1", 4), clock=machine.clock).register(machine.ports)
        self.uart.on_output = lambda data: machine.output_written()
        machine.add_output_source("serial port", lambda: self.uart.output)
        machine.add_result_section(lambda stop: Section("serial", self.uart.output.decode("latin-1")))
        self.i8042 = I8042(irq1=self._isa_line("keyboard", 1), irq12=self._isa_line("mouse", 12),
                           reset_request=lambda: machine.request_stop_shutdown("reset through the i8042 (0xFE)"))
        self.i8042.register(machine.ports)

    def gsi(self, gsi: int, level: bool) -> None:
        """A global system interrupt line's level (QEMU's gsi_handler)."""
        if gsi < 16:
            self.pic.set_irq(gsi, level)
        self.ioapic.set_irq(2 if gsi == 0 else gsi, level)

    def _isa_line(self, name: str, irq: int):
        line = self.machine.interrupt_line(name)
        line.connect(lambda level: self.gsi(irq, level))
        return line

    def add_option_rom(self, name: str, data: bytes) -> None:
        """An option ROM SeaBIOS runs from fw_cfg (QEMU's ``genroms/<name>``: kvmvapic.bin)."""
        add_option_rom(self.fw_cfg, name, data)

    # -- port 0x92 (A20 and fast reset: QEMU hw/i386/port92.c) ----------------------------------
    def _read_port92(self, port: int, size: int) -> int:
        return self.port92

    def _write_port92(self, port: int, size: int, value: int) -> None:
        self.port92 = value & 0x02              # A20 gate; bit 0 (reset) reads back 0
        if value & 0x01:
            self.machine.request_stop_shutdown("reset through port 0x92")

    # -- snapshots ------------------------------------------------------------------------------
    def _take(self, machine: "Machine") -> tuple:
        smi = self.smi_features.state() if self.smi_features else None
        acpi = self.acpi.state() if self.acpi else None
        return (self.port92, self.pm.state(), self.fw_cfg.state(), smi, acpi,
                tuple(device.state() for device in self._devices()))

    def _put(self, machine: "Machine", state: tuple) -> None:
        """After the PCI bus's part and the clock's (the count): the windows follow the
        restored registers, the timers are armed again."""
        self.port92, pm, fw_cfg, smi, acpi, devices = state
        for device, device_state in zip(self._devices(), devices):
            device.restore(device_state)
        self.fw_cfg.restore(fw_cfg)
        if acpi is not None:
            self.acpi.restore(acpi)
        if smi is not None:
            self.smi_features.restore(smi)
        pam = PAM_REGISTERS[self.kind]
        self.pam.rebuild(self.bridge.config[pam:pam + 7])
        if self.mmconfig is not None:
            self.mmconfig.place(struct.unpack_from("<Q", self.bridge.config, PCIEXBAR)[0])
        self.pm.restore(pm)


    def _devices(self) -> tuple:
        """The devices with state of their own, in restore order: the interrupt sources, then
        the controllers (their inputs' levels are put back first)."""
        return self.pit, self.hpet, self.cmos, self.uart, self.i8042, self.disks, self.ioapic, self.pic, self.lapic


def _take_chipset(machine: "Machine") -> tuple:
    return machine.chipset.apm_status, machine.chipset.smi_enable


def _put_chipset(machine: "Machine", state: tuple) -> None:
    """After the PCI bus's part (the configuration spaces)."""
    chipset = machine.chipset
    chipset.apm_status, chipset.smi_enable = state
    lpc = getattr(chipset, "lpc", None)
    if lpc is not None:                     # PMBASE decides where SMI_EN's ports are: re-derive
        lpc.on_write(next(iter(lpc.writable)))
