"""What the CPU is plugged into: ``none`` — the bare machine (RAM, the debug console and
the chipset's SMM pieces: SMRAM control and the APM port) — or QEMU 7.2's ``pc`` (i440FX +
PIIX) and ``q35`` (MCH + ICH9) as ``-nodefaults`` builds them (reference/platform.md).  Each
device is a plug-in over the core's public device interface (ports, MMIO, PCI functions,
interrupt lines, the clock); ``boards.install`` assembles a machine's."""

MACHINES = ("none", "pc", "q35")
