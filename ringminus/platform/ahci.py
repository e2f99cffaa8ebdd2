"""ICH9's AHCI HBA (00:1f.2) as QEMU 7.2 models it (hw/ide/ahci.c, ich.c) with six empty
ports: the ABAR registers (BAR5, 4 KiB MMIO) and the index/data pair behind BAR4 (32 bytes
of I/O, index at +0x10, data at +0x14).  No command is ever processed: an empty port's
handle_cmd fails, so PxCI only accumulates.

QEMU facts kept here:
- CAP 0xC0141F05 (5 = six ports, 31 command slots, Gen1, SAM, NCQ, S64A), PI 0x3F,
  VS 0x00010000; GHC resets to AE (bit 31); a write with HR resets the HBA, otherwise GHC =
  (value & 3) | AE.  IS is recomputed from the ports (PxIS & PxIE) after every change, so a
  write-1-to-clear of IS only sticks where the port's interrupt is gone.
- Port reset values: PxCMD 6 (SUD|POD), PxTFD 0x7F, PxSIG 0xFFFFFFFF; PxSSTS reads 0 (no
  device); PxIE keeps value & 0xFDC000FF; PxCMD keeps the read-only bits (0x007DFFE0) and
  drops ICC; ST sets CR, FRE sets FR (QEMU maps the list/FIS buffers; here mapping always
  succeeds); once FR is on, the first time after a reset QEMU "receives" the initial D2H
  register FIS: 20 bytes at FB+0x40 (34 40 50 00 01 FF FF A0 00 00 00 00 01 00 00..),
  PxTFD = 0x50, PxSIG = 0xFFFF0101, PxIS.DHRS.  PxSCTL.DET 1 -> 0 resets the port's
  TFD/SIG/SSTS/SERR/SACT (COMRESET).  PxSERR is write-1-to-clear, PxSACT and PxCI
  write-1-to-set.
- Accesses: any size, but one that is not aligned to its size is rejected by QEMU's memory
  core (reads 0, writes dropped); an 8-byte access is two 4-byte ones; a write of 1 or 2
  bytes at an aligned offset stores the zero-extended value into the whole register.
"""
from __future__ import annotations

from typing import Callable

PORTS = 6
ABAR_SIZE = 0x1000
IDP_SIZE = 32
IDP_INDEX, IDP_DATA = 0x10, 0x14

CAP = (PORTS - 1) | 31 << 8 | 1 << 20 | 1 << 30 | 1 << 18 | 1 << 31
PI = (1 << PORTS) - 1
VS = 0x0001_0000
GHC_HR, GHC_IE, GHC_AE = 1 << 0, 1 << 1, 1 << 31

HOST_END = 0x2C                     # QEMU's AHCI_GENERIC_HOST_CONTROL_REGS_MAX_ADDR
PORT_BASE, PORT_SIZE = 0x100, 0x80

CMD_ST, CMD_SUD, CMD_POD, CMD_FRE = 1 << 0, 1 << 1, 1 << 2, 1 << 4
CMD_FR, CMD_CR = 1 << 14, 1 << 15
CMD_RO_MASK, CMD_ICC_MASK = 0x007D_FFE0, 0xF << 28
IE_MASK = 0xFDC0_00FF
IS_DHRS = 1 << 0
RES_FIS_RFIS = 0x40

# The empty port's IDE registers after reset (ide_reset + ide_set_signature, no drive):
# status READY|SEEK, error 0, sector 1, cylinder 0xFFFF, select 0xA0, count 1.
D2H_FIS = bytes([0x34, 0x40, 0x50, 0x00, 0x01, 0xFF, 0xFF, 0xA0, 0, 0, 0, 0, 0x01, 0x00]) + bytes(6)
INIT_TFD = 0x0050
INIT_SIG = 0xFFFF_0101

# Port register indexes (offset / 4)
CLB, CLBU, FB, FBU, IS, IE, CMD, TFD, SIG, SSTS, SCTL, SERR, SACT, CI = 0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14
FIELDS = ("clb", "clbu", "fb", "fbu", "is_", "ie", "cmd", "tfd", "sig", "sctl", "serr", "sact", "ci", "d2h_sent")
MASK32 = 0xFFFF_FFFF


class _Port:
    def __init__(self):
        self.clb = self.clbu = self.fb = self.fbu = self.is_ = self.ie = self.sctl = 0
        self.cmd = CMD_SUD | CMD_POD
        self.ci = 0
        self.reset()

    def reset(self) -> None:
        """ahci_reset_port for a port with no drive."""
        self.serr = self.sact = 0
        self.tfd, self.sig = 0x7F, MASK32
        self.d2h_sent = False


class Ahci:
    """The HBA.  ``irq(level)`` is its INTx line (MSI is not modelled); ``write_memory(address,
    data)`` receives the initial D2H FIS QEMU writes into the guest's FIS buffer (optional)."""

    def __init__(self, irq: Callable[[bool], None] | None = None,
                 write_memory: Callable[[int, bytes], None] | None = None):
        self.irq = irq
        self.write_memory = write_memory
        self.ports = [_Port() for _ in range(PORTS)]
        self.ghc = GHC_AE
        self.is_ = 0
        self.idp_index = 0
        self.level = False

    # --- MMIO (ABAR) ---------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4, 8) or offset & (size - 1) or not 0 <= offset < ABAR_SIZE:
            return 0
        if size == 8:
            return self._read32(offset) | self._read32(offset + 4) << 32
        return (self._read32(offset & ~3) >> (8 * (offset & 3))) & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        if size not in (1, 2, 4, 8) or offset & (size - 1) or not 0 <= offset < ABAR_SIZE:
            return
        value &= (1 << (8 * size)) - 1
        if size == 8:
            self._write32(offset, value & MASK32)
            self._write32(offset + 4, value >> 32)
        elif not offset & 3:                # QEMU: "Mis-aligned write" (a byte at +1..+3) is dropped
            self._write32(offset, value)

    def _read32(self, offset: int) -> int:
        if offset < HOST_END:
            return {0x00: CAP, 0x04: self.ghc, 0x08: self.is_, 0x0C: PI, 0x10: VS}.get(offset, 0)
        if PORT_BASE <= offset < PORT_BASE + PORTS * PORT_SIZE:
            port = self.ports[(offset - PORT_BASE) // PORT_SIZE]
            register = (offset % PORT_SIZE) // 4
            if register == SSTS:
                return 0                    # SATA_SCR_SSTATUS_DET_NODEV
            name = {CLB: "clb", CLBU: "clbu", FB: "fb", FBU: "fbu", IS: "is_", IE: "ie", CMD: "cmd", TFD: "tfd",
                    SIG: "sig", SCTL: "sctl", SERR: "serr", SACT: "sact", CI: "ci"}.get(register)
            return getattr(port, name) if name else 0
        return 0

    def _write32(self, offset: int, value: int) -> None:
        if offset < HOST_END:
            if offset == 0x04:
                if value & GHC_HR:
                    self.reset()
                else:
                    self.ghc = (value & 3) | GHC_AE
                    self._check_irq()
            elif offset == 0x08:
                self.is_ &= ~value
                self._check_irq()
            return
        if not PORT_BASE <= offset < PORT_BASE + PORTS * PORT_SIZE:
            return
        port = self.ports[(offset - PORT_BASE) // PORT_SIZE]
        register = (offset % PORT_SIZE) // 4
        if register in (CLB, CLBU, FB, FBU):
            setattr(port, ("clb", "clbu", "fb", "fbu")[register], value)
        elif register == IS:
            port.is_ &= ~value
            self._check_irq()
        elif register == IE:
            port.ie = value & IE_MASK
            self._check_irq()
        elif register == CMD:
            self._write_cmd(port, value)
        elif register == SCTL:
            if port.sctl & 0xF == 1 and value & 0xF == 0:
                port.reset()
            port.sctl = value
        elif register == SERR:
            port.serr &= ~value
        elif register == SACT:
            port.sact |= value
        elif register == CI:
            port.ci |= value                # check_cmd: handle_cmd fails on an empty port

    def _write_cmd(self, port: _Port, value: int) -> None:
        port.cmd = (port.cmd & CMD_RO_MASK) | (value & ~(CMD_RO_MASK | CMD_ICC_MASK) & MASK32)
        # ahci_cond_start_engines: the list (CR) and FIS receive (FR) engines follow ST / FRE.
        if port.cmd & CMD_ST:
            port.cmd |= CMD_CR
        else:
            port.cmd &= ~CMD_CR
        if port.cmd & CMD_FRE:
            port.cmd |= CMD_FR
        else:
            port.cmd &= ~CMD_FR
        if port.cmd & CMD_FR and not port.d2h_sent:
            self._init_d2h(port)

    def _init_d2h(self, port: _Port) -> None:
        """ahci_init_d2h: the empty port's register FIS, as if the device had sent it."""
        port.d2h_sent = True
        if self.write_memory is not None:
            self.write_memory((port.fbu << 32 | port.fb) + RES_FIS_RFIS, D2H_FIS)
        port.tfd = INIT_TFD
        port.sig = INIT_SIG
        port.is_ |= IS_DHRS
        self._check_irq()

    def _check_irq(self) -> None:
        self.is_ = 0
        for i, port in enumerate(self.ports):
            if port.is_ & port.ie:
                self.is_ |= 1 << i
        self._set_level(bool(self.is_ and self.ghc & GHC_IE))

    def _set_level(self, level: bool) -> None:
        self.level = level
        if self.irq is not None:
            self.irq(level)

    def reset(self) -> None:
        """ahci_reset (GHC.HR, device reset).  Like QEMU it leaves the interrupt line alone."""
        self.is_ = 0
        self.ghc = GHC_AE
        for port in self.ports:
            port.is_ = port.ie = port.sctl = 0
            port.cmd = CMD_SUD | CMD_POD
            port.reset()

    # --- the index/data pair (BAR4) ------------------------------------------------------

    def idp_read(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4) or offset & (size - 1):
            return 0
        if offset == IDP_INDEX:
            return self.idp_index & ((1 << (8 * size)) - 1)
        if offset == IDP_DATA:
            return self.read(self.idp_index, size)
        return 0

    def idp_write(self, offset: int, size: int, value: int) -> None:
        if size not in (1, 2, 4) or offset & (size - 1):
            return
        value &= (1 << (8 * size)) - 1
        if offset == IDP_INDEX:
            self.idp_index = value & ((ABAR_SIZE - 1) & ~3)
        elif offset == IDP_DATA:
            self.write(self.idp_index, size, value)

    # --- snapshots -----------------------------------------------------------------------

    def state(self) -> tuple:
        return (self.ghc, self.is_, self.idp_index, self.level,
                tuple(tuple(getattr(port, name) for name in FIELDS) for port in self.ports))

    def restore(self, state: tuple) -> None:
        self.ghc, self.is_, self.idp_index, self.level, ports = state
        for port, values in zip(self.ports, ports):
            for name, value in zip(FIELDS, values):
                setattr(port, name, value)


def plug(machine, function, irq: Callable[[bool], None] | None = None) -> Ahci:
    """Attach an Ahci to ICH9's 00:1f.2 ``function`` (after boards.identify): re-declares BAR4
    (I/O, 32 bytes) and BAR5 (MMIO, 4 KiB) with map callbacks that follow the guest's
    placement.  ``irq(level)``: the function's INTx line."""
    ahci = Ahci(irq=irq, write_memory=machine.memory.write)      # a DMA write, as the CPU would see it
    mapped: dict[str, object] = {}            # the ABAR's MMIO region

    def map_abar(address: int | None) -> None:
        region = mapped.pop("abar", None)
        if region is not None:
            machine.remove_mmio(region)
        if address is not None:
            try:
                mapped["abar"] = machine.add_mmio(address, ABAR_SIZE, ahci, "ahci")
            except ValueError:              # placed over RAM or another region: not decoded here
                pass

    function.add_bar(4, IDP_SIZE, io=True, map=machine.ports.movable_block(IDP_SIZE, ahci.idp_read, ahci.idp_write))
    function.add_bar(5, ABAR_SIZE, io=False, map=map_abar)
    return ahci
