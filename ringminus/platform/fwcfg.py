"""QEMU's fw_cfg device as x86 ``pc``/``q35`` have it: the I/O interface at 0x510/0x511, the
DMA interface at 0x514–0x51B, and the items QEMU 7.2 puts in it for ``-nodefaults -m N``.

Behaviour follows QEMU 7.2 hw/nvram/fw_cfg.c (the device), hw/i386/fw_cfg.c
(``fw_cfg_arch_create``), hw/isa/lpc_ich9.c (SMI feature negotiation) and softmmu/memory.c
(which port accesses the regions' ``.valid`` rules let through under TCG);
reference/platform.md §5 and §1.2 give the observed values.  ACPI tables, the table-loader,
SMBIOS and option ROMs are other modules' business: each is one ``add_file`` call (the
names are below).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable

from ..emulator.memory import MissingMemory

# -- ports and keys (include/standard-headers/linux/qemu_fw_cfg.h, hw/i386/fw_cfg.h) ---------
IO_PORT = 0x510                     # "fwcfg": selector (16-bit write) and data (byte read)
DMA_PORT = 0x514                    # "fwcfg.dma": 8 bytes, the DMA address big-endian
IO_PORTS = range(IO_PORT, IO_PORT + 2)
DMA_PORTS = range(DMA_PORT, DMA_PORT + 8)

SIGNATURE, ID, UUID, RAM_SIZE, NOGRAPHIC, NB_CPUS = 0x00, 0x01, 0x02, 0x03, 0x04, 0x05
NUMA, BOOT_MENU, MAX_CPUS, FILE_DIR, FILE_FIRST = 0x0D, 0x0E, 0x0F, 0x19, 0x20
ARCH_LOCAL, WRITE_CHANNEL, ENTRY_MASK, INVALID = 0x8000, 0x4000, 0x3FFF, 0xFFFF
ACPI_TABLES, SMBIOS_ENTRIES, IRQ0_OVERRIDE, HPET = 0x8000, 0x8001, 0x8002, 0x8004
FILE_SLOTS = 0x20                   # "x-file-slots" default for these machines
NAME_MAX = 55                       # char name[56], NUL terminated

VERSION_TRADITIONAL, VERSION_DMA = 0x01, 0x02
DMA_ERROR, DMA_READ, DMA_SKIP, DMA_SELECT, DMA_WRITE = 0x01, 0x02, 0x04, 0x08, 0x10
DMA_SIGNATURE = b"QEMU CFG"         # what the DMA ports read, byte by byte in port order

# Files other modules add (each with one ``FwCfg.add_file`` call).
ACPI_RSDP_FILE, ACPI_TABLES_FILE = "etc/acpi/rsdp", "etc/acpi/tables"
TABLE_LOADER_FILE, TPM_LOG_FILE = "etc/table-loader", "etc/tpm/log"
SMBIOS_ANCHOR_FILE, SMBIOS_TABLES_FILE = "etc/smbios/smbios-anchor", "etc/smbios/smbios-tables"
OPTION_ROM_DIR = "genroms/"         # e.g. "genroms/kvmvapic.bin"

PAGE = 0x1000
CHUNK = 64 * PAGE                   # DMA stores go in pieces of at most this
_ZEROS = bytes(CHUNK)
MASK64 = (1 << 64) - 1
E820_RAM, E820_RESERVED = 1, 2


# -- which port accesses reach the device ------------------------------------------------------
# Under TCG an IN/OUT is one address_space_ld*/st* of its full size (target/i386/tcg/sysemu/
# misc_helper.c): it goes whole to the region the port falls in, never split, and
# memory_region_access_valid refuses it unless the region's accepts() takes it and it is
# aligned; a refused read gives 0 (unassigned_mem_read), a refused write is dropped.
def _comb_accepts(offset: int, size: int, write: bool) -> bool:
    """fw_cfg_comb_valid ("fwcfg", .valid.max 0 = no size check): byte reads and writes,
    16-bit writes."""
    return size == 1 or (write and size == 2)


def _dma_accepts(offset: int, size: int, write: bool) -> bool:
    """fw_cfg_dma_mem_valid ("fwcfg.dma", .valid.max 8): any read; writes of 4 bytes at
    offset 0 or 4, of 8 bytes at 0."""
    return size <= 8 and (not write or (size == 4 and offset in (0, 4)) or (size == 8 and offset == 0))


def _valid(accepts: Callable[[int, int, bool], bool], offset: int, size: int, write: bool) -> bool:
    return accepts(offset, size, write) and not offset & (size - 1)


def _swap(value: int, size: int) -> int:
    """A DEVICE_BIG_ENDIAN region sees the guest's little-endian value byte-swapped."""
    return int.from_bytes(value.to_bytes(size, "little"), "big")


# -- items --------------------------------------------------------------------------------------
@dataclass(eq=False)                # entries are found by identity (selector lookups)
class _Entry:
    data: bytearray
    writable: bool = False
    on_select: Callable[[], None] | None = None       # QEMU's select_cb
    on_write: Callable[[int, int], None] | None = None    # write_cb(offset, length)
    name: bytes = b""                                  # files only, as in the directory


def _file_name(name: str) -> bytes:
    encoded = name.encode()
    if not encoded or b"\0" in encoded or len(encoded) > NAME_MAX:
        raise ValueError(f"fw_cfg file name {name!r} must be 1 to {NAME_MAX} bytes without NUL")
    return encoded


class FwCfg:
    """The fw_cfg device.  Register it on both port ranges (``register_ports``); guest DMA
    goes through ``memory``: ``read(address, size) -> bytes`` and ``write(address, data)``,
    raising MissingMemory where nothing backs an address; optionally ``read_only(address)``
    (ROM, which QEMU's DMA cannot write either) and ``backed_ranges()`` (what is worth
    trying: DMA then never reaches MMIO devices).  PhysicalMemory has all four."""
    precise = False

    def __init__(self, memory, file_slots: int = FILE_SLOTS):
        self.memory = memory
        self.file_slots = file_slots
        self._items: dict[int, _Entry] = {}       # arch | index -> numbered item
        self._files: list[_Entry] = []            # sorted by name: selector FILE_FIRST + index
        self._key, self._offset, self._dma_address = SIGNATURE, 0, 0
        self._items[FILE_DIR] = _Entry(bytearray(4 + 64 * file_slots))
        self.add_item(SIGNATURE, b"QEMU")
        self.add_item(ID, struct.pack("<I", VERSION_TRADITIONAL | VERSION_DMA))

    def register_ports(self, bus) -> None:
        """Claim 0x510–0x511 and 0x514–0x51B on a port bus (``m.ports``)."""
        bus.register(IO_PORTS, self)
        bus.register(DMA_PORTS, self)

    # -- contents (host side) ------------------------------------------------------------------
    def add_item(self, key: int, data: bytes) -> None:
        """A numbered item (fw_cfg_add_bytes): keys below 0x20, or arch-local (0x8000 | n)
        below 0x8000 + 0x20 + file_slots.  Items are read-only."""
        slot = self._slot(key)
        index = slot & ENTRY_MASK
        if slot == FILE_DIR or index >= FILE_FIRST + self.file_slots or (not slot & ARCH_LOCAL and index >= FILE_FIRST):
            raise ValueError(f"fw_cfg key {key:#x} is not a free numbered item")
        if slot in self._items:
            raise ValueError(f"fw_cfg key {key:#x} is already set")
        self._items[slot] = _Entry(bytearray(data))

    def add_file(self, name: str, data: bytes, writable: bool = False,
                 on_select: Callable[[], None] | None = None,
                 on_write: Callable[[int, int], None] | None = None) -> int:
        """A file (fw_cfg_add_file_callback), placed in name order; the files after it move
        up one selector, as QEMU reassigns them.  ``on_select()`` runs whenever the guest
        selects it, ``on_write(offset, length)`` after each DMA write into it (``writable``).
        Returns its selector now (later additions may move it: see ``selector``)."""
        encoded = _file_name(name)
        if len(self._files) >= self.file_slots:
            raise ValueError(f"fw_cfg has no free file slot for {name!r}")
        if any(f.name == encoded for f in self._files):
            raise ValueError(f"duplicate fw_cfg file name {name!r}")
        # QEMU's insertion: walk back from the end while the new name sorts before (strcmp).
        index = len(self._files)
        while index > 0 and encoded < self._files[index - 1].name:
            index -= 1
        self._files.insert(index, _Entry(bytearray(data), writable, on_select, on_write, encoded))
        self._write_directory()
        return FILE_FIRST + index

    def update_file(self, name: str, data: bytes) -> None:
        """New contents for a file, keeping its flags and hooks (what QEMU's owners of such
        files do in place; unlike fw_cfg_modify_file, which also drops write permission)."""
        self._file(name).data = bytearray(data)
        self._write_directory()

    def selector(self, name: str) -> int:
        return FILE_FIRST + self._files.index(self._file(name))

    def contents(self, item: int | str) -> bytes:
        """The current bytes of a file (by name) or of a numbered item (by key)."""
        entry = self._file(item) if isinstance(item, str) else self._entry(item)
        if entry is None:
            raise KeyError(f"no fw_cfg item {item:#x}")
        return bytes(entry.data)

    def file_names(self) -> list[str]:
        return [f.name.decode() for f in self._files]

    def _file(self, name: str) -> _Entry:
        encoded = name.encode()
        for entry in self._files:
            if entry.name == encoded:
                return entry
        raise KeyError(f"no fw_cfg file {name!r}")

    def _write_directory(self) -> None:
        """Item 0x19: be32 count, then per file be32 size, be16 select, be16 0, name[56]."""
        directory = self._items[FILE_DIR].data
        directory[:] = bytes(len(directory))
        struct.pack_into(">I", directory, 0, len(self._files))
        for index, entry in enumerate(self._files):
            struct.pack_into(">IHH56s", directory, 4 + 64 * index, len(entry.data), FILE_FIRST + index, 0, entry.name)

    @staticmethod
    def _slot(key: int) -> int:
        return key & (ARCH_LOCAL | ENTRY_MASK)      # the write-channel bit names the same item

    def _entry(self, key: int) -> _Entry | None:
        if key == INVALID:
            return None
        slot = self._slot(key)
        index = slot - FILE_FIRST
        if not slot & ARCH_LOCAL and 0 <= index < len(self._files):
            return self._files[index]
        return self._items.get(slot)

    # -- guest side: select and data -----------------------------------------------------------
    def reset(self) -> None:
        """Device reset (fw_cfg_reset): the signature is selected; the DMA address stays."""
        self.select(SIGNATURE)

    def select(self, key: int) -> None:
        """fw_cfg_select: offset 0; a key past the last slot selects nothing (reads 0)."""
        key &= 0xFFFF
        self._offset = 0
        if key & ENTRY_MASK >= FILE_FIRST + self.file_slots:
            self._key = INVALID
            return
        self._key = key
        entry = self._entry(key)
        if entry is not None and entry.on_select is not None:
            entry.on_select()

    def _next_byte(self) -> int:
        entry = self._entry(self._key)
        if entry is None or self._offset >= len(entry.data):
            return 0
        self._offset += 1
        return entry.data[self._offset - 1]

    # -- the port interface --------------------------------------------------------------------
    def read(self, port: int, size: int) -> int:
        if port in IO_PORTS:
            # Only a byte read is valid: the next data byte, at either port.
            return self._next_byte() if _valid(_comb_accepts, port - IO_PORT, size, False) else 0
        offset = port - DMA_PORT
        if offset not in range(8) or not _valid(_dma_accepts, offset, size, False):
            return 0
        # fw_cfg_dma_mem_read, then the big-endian swap: the signature's bytes in port order.
        return int.from_bytes(DMA_SIGNATURE[offset:offset + size], "little")

    def write(self, port: int, size: int, value: int) -> None:
        if port in IO_PORTS:
            # A 16-bit write at 0x510 selects; one at 0x511 is unaligned, refused.  Byte
            # writes are accepted and do nothing (write support went in QEMU 2.4).
            if size == 2 and _valid(_comb_accepts, port - IO_PORT, size, True):
                self.select(value)
            return
        offset = port - DMA_PORT
        if offset not in range(8) or not _valid(_dma_accepts, offset, size, True):
            return
        value = _swap(value & ((1 << (8 * size)) - 1), size)
        if size == 8:
            self._dma_address = value
        elif offset == 0:
            self._dma_address = value << 32         # the high half; the low half becomes 0
            return
        else:
            self._dma_address |= value
        self._transfer()

    # -- DMA (fw_cfg_dma_transfer) -------------------------------------------------------------
    def _transfer(self) -> None:
        at, self._dma_address = self._dma_address, 0
        raw, ok = self._load(at, 16)
        if not ok:
            self._store(at, 4, struct.pack(">I", DMA_ERROR))
            return
        control, length, address = struct.unpack(">IIQ", raw)
        if control & DMA_SELECT:
            self.select(control >> 16)
        # READ wins over WRITE, WRITE over SKIP; with none of them nothing moves.
        operation = next((bit for bit in (DMA_READ, DMA_WRITE, DMA_SKIP) if control & bit), 0)
        status = 0
        while length and operation and not status & DMA_ERROR:
            count, status = self._transfer_step(operation, address, length)
            address, length = (address + count) & MASK64, length - count
        self._store(at, 4, struct.pack(">I", status))

    def _transfer_step(self, operation: int, address: int, length: int) -> tuple[int, int]:
        """One pass of QEMU's loop: (bytes consumed, status)."""
        entry = self._entry(self._key)
        if entry is None or self._offset >= len(entry.data):
            # Past the end: a READ fills zeros, a WRITE fails, a SKIP does nothing.
            if operation == DMA_READ:
                return length, 0 if self._store(address, length) else DMA_ERROR
            return length, DMA_ERROR if operation == DMA_WRITE else 0
        count = min(length, len(entry.data) - self._offset)
        start, status = self._offset, 0
        self._offset += count
        if operation == DMA_READ:
            status = 0 if self._store(address, count, entry.data[start:start + count]) else DMA_ERROR
        elif operation == DMA_WRITE:
            status = self._write_entry(entry, start, address, count, length)
        return count, status

    def _write_entry(self, entry: _Entry, start: int, address: int, count: int, length: int) -> int:
        """A DMA WRITE: only into a writable item, only if the whole length fits."""
        if not entry.writable or count != length:
            return DMA_ERROR
        data, ok = self._load(address, count)
        entry.data[start:start + count] = data     # QEMU copies what it could read even so
        if not ok:
            return DMA_ERROR
        if entry.on_write is not None:
            entry.on_write(start, count)
        return 0

    # -- guest memory: what is backed is accessed, the rest fails (QEMU's partial success) ------
    def _load(self, address: int, size: int) -> tuple[bytes, bool]:
        """dma_memory_read: guest bytes, unbacked ones read as zeros (unassigned_mem_read)."""
        out, ok = bytearray(), True
        for start, count, backed in self._segments(address, size):
            data, read = self._read_pages(start, count) if backed else (bytes(count), False)
            out += data
            ok &= read
        return bytes(out), ok

    def _read_pages(self, address: int, size: int) -> tuple[bytes, bool]:
        """At once when it can, else page by page."""
        try:
            return self.memory.read(address, size), True
        except MissingMemory:
            pass
        out, ok = bytearray(), True
        for start, count in _chunks(address, size, PAGE):
            try:
                out += self.memory.read(start, count)
            except MissingMemory:
                out += bytes(count)
                ok = False
        return bytes(out), ok

    def _store(self, address: int, size: int, data: bytes | None = None) -> bool:
        """dma_memory_write, or dma_memory_set to zeros when ``data`` is None (READ past an
        item's end: up to 4 GiB).  Every backed page that is not ROM is written; False if
        any page is not (QEMU goes on past a failure too)."""
        ok, done = True, 0
        for start, count, backed in self._segments(address, size):
            if not backed:
                ok = False
            for at, piece in _chunks(start, count, CHUNK) if backed else ():
                offset = done + at - start
                ok &= self._write_pages(at, _ZEROS[:piece] if data is None else data[offset:offset + piece])
            done += count
        return ok

    def _write_pages(self, address: int, data: bytes) -> bool:
        """At once when it can, else page by page to write what can be written."""
        if self._write(address, data):
            return True
        ok = True
        for at, count in _chunks(address, len(data), PAGE):
            ok &= self._write(at, data[at - address:at - address + count])
        return ok

    def _write(self, address: int, data: bytes) -> bool:
        read_only = getattr(self.memory, "read_only", None)
        if read_only is not None and any(read_only(at) for at, _ in _chunks(address, len(data), PAGE)):
            return False                            # QEMU's DMA cannot write ROM either
        try:
            self.memory.write(address, data)
        except MissingMemory:
            return False
        return True

    def _segments(self, address: int, size: int):
        """(start, count, maybe backed) over [address, address + size), wrapping at 2**64.
        With ``memory.backed_ranges()`` (RAM and overlays), what lies outside them is not
        tried at all: a READ of 4 GiB past the end of RAM costs nothing."""
        ranges = getattr(self.memory, "backed_ranges", None)
        ranges = sorted(ranges()) if ranges is not None else [(0, 1 << 64)]
        while size:
            count = min(size, (1 << 64) - address)
            at, end = address, address + count
            for low, high in ranges:
                low, high = max(low, at), min(high, end)
                if low < high:
                    if at < low:
                        yield at, low - at, False
                    yield low, high - low, True
                    at = high
            if at < end:
                yield at, end - at, False
            address, size = 0, size - count

    # -- snapshots -----------------------------------------------------------------------------
    def state(self) -> dict:
        return {"key": self._key, "offset": self._offset, "dma_address": self._dma_address,
                "files": {f.name.decode(): bytes(f.data) for f in self._files if f.writable}}

    def restore(self, state: dict) -> None:
        self._key, self._offset, self._dma_address = state["key"], state["offset"], state["dma_address"]
        for name, data in state["files"].items():
            self._file(name).data = bytearray(data)
        self._write_directory()


def _chunks(address: int, size: int, granule: int):
    """(address, count) pieces of [address, address + size) that stay within one
    ``granule``-aligned block."""
    while size:
        count = min(size, granule - (address & (granule - 1)))
        yield address, count
        address, size = address + count, size - count


# -- standard contents ---------------------------------------------------------------------------
def e820_table(entries) -> bytes:
    """etc/e820: packed little-endian (u64 address, u64 length, u32 type) per entry."""
    return b"".join(struct.pack("<QQI", address, length, kind) for address, length, kind in entries)


AMD_HT_HOLE = (0xFD_0000_0000, 0x3_0000_0000, E820_RESERVED)     # 1012 GiB – 1 TiB


def qemu_e820(below_4g: int, above_4g: int, ht_hole: bool = True, high_base: int = 1 << 32) -> list[tuple[int, int, int]]:
    """pc_memory_init's entries, in its order: the HyperTransport hole (AMD vCPU with
    phys-bits ≥ 40, true of TCG's default qemu64), low RAM, RAM above 4 GiB if any."""
    entries = [AMD_HT_HOLE] if ht_hole else []
    entries.append((0, below_4g, E820_RAM))
    if above_4g:
        entries.append((high_base, above_4g, E820_RAM))
    return entries


def qemu_ram_split(ram_size: int, board: str) -> tuple[int, int]:
    """(below 4 GiB, above 4 GiB) as pc_init1 / pc_q35_init split -m (platform.md §1.1)."""
    if board == "pc":
        lowmem = 0xC000_0000 if ram_size >= 0xE000_0000 else 0xE000_0000   # gigabyte_align
    elif board == "q35":
        lowmem = 0x8000_0000 if ram_size >= 0xB000_0000 else 0xB000_0000
    else:
        raise ValueError(f"board must be 'pc' or 'q35', not {board!r}")
    return (lowmem, ram_size - lowmem) if ram_size >= lowmem else (ram_size, 0)


HPET_BASE, HPET_BLOCK_ID = 0xFED0_0000, 0x8086_A201      # the HPET's capabilities, low dword


def hpet_config(blocks=((HPET_BLOCK_ID, HPET_BASE),)) -> bytes:
    """struct hpet_fw_config: u8 count, then 8 × {u32 block id, u64 address, u16 min_tick,
    u8 page_prot} packed (121 bytes); min_tick and page_prot stay 0 under QEMU."""
    entries = [struct.pack("<IQHB", block_id, address, 0, 0) for block_id, address in blocks]
    return bytes([len(blocks)]) + b"".join(entries) + bytes(15 * (8 - len(blocks)))


def numa_config(apic_id_limit: int, node_memory=()) -> bytes:
    """FW_CFG_NUMA: le64 node count, le64 node per APIC ID (all 0 without -numa), le64
    memory per node: 8 × (1 + apic_id_limit + nodes) bytes."""
    words = [len(node_memory), *[0] * apic_id_limit, *node_memory]
    return struct.pack(f"<{len(words)}Q", *words)


SYSTEM_STATES = bytes([0x80, 0x00, 0x00, 0x81, 0x82, 0x80])     # S3 on, S4 on with value 2


def add_qemu_x86_contents(fw: FwCfg, ram_size: int, below_4g: int, above_4g: int, cpus: int = 1,
                          board: str = "q35", ht_hole: bool = True, nographic: bool = True) -> SmiFeatures | None:
    """What QEMU 7.2 puts in fw_cfg for ``-machine <board> -nodefaults -m N`` with ``cpus``
    vCPUs (plain topology: APIC IDs 0..cpus-1) and no -kernel, ACPI, SMBIOS and option
    ROMs aside; ``nographic`` as with ``-nographic`` (ringminus has no display).  Returns q35's SMI feature negotiation (its state is the LPC bridge's)."""
    if board not in ("pc", "q35"):
        raise ValueError(f"board must be 'pc' or 'q35', not {board!r}")
    items = {                       # fw_cfg_common_realize, then fw_cfg_arch_create
        UUID: bytes(16),
        NOGRAPHIC: struct.pack("<H", nographic),     # -nographic: SeaBIOS then adds etc/sercon-port
        BOOT_MENU: struct.pack("<H", 0),
        NB_CPUS: struct.pack("<H", cpus),
        MAX_CPUS: struct.pack("<H", cpus),           # apic_id_limit
        RAM_SIZE: struct.pack("<Q", ram_size),
        ACPI_TABLES: b"",                            # no -acpitable
        IRQ0_OVERRIDE: struct.pack("<I", 1),
        HPET: hpet_config(),
        NUMA: numa_config(cpus),
    }
    # SMBIOS_ENTRIES (legacy mode only) and E820_TABLE (removed in 7.2) are not set: they
    # read as zeros, the same bytes an empty item gives.
    for key, data in items.items():
        fw.add_item(key, data)
    files = {
        "etc/boot-fail-wait": struct.pack("<I", 0xFFFF_FFFF),    # reboot-timeout -1
        "bootorder": b"",                                         # no boot devices
        "bios-geometry": b"",
        "etc/e820": e820_table(qemu_e820(below_4g, above_4g, ht_hole)),
        "etc/system-states": SYSTEM_STATES,
    }
    for name, data in files.items():
        fw.add_file(name, data)
    return SmiFeatures(fw) if board == "q35" else None


def add_option_rom(fw: FwCfg, name: str, data: bytes) -> int:
    """An option ROM SeaBIOS runs (rom_add_option → "genroms/<name>")."""
    return fw.add_file(OPTION_ROM_DIR + name, data)


# -- q35: SMI feature negotiation (hw/isa/lpc_ich9.c) --------------------------------------------
SMI_BROADCAST, SMI_CPU_HOTPLUG, SMI_CPU_HOT_UNPLUG = 0x1, 0x2, 0x4
SMI_REQUESTED, SMI_SUPPORTED, SMI_OK = "etc/smi/requested-features", "etc/smi/supported-features", "etc/smi/features-ok"


class SmiFeatures:
    """ICH9's SMI feature files: the guest writes le64 features to requested-features, then
    selects features-ok, which reads 1 once the request was valid; the negotiation then
    stays locked until reset.  ``negotiated`` is what it settled on (broadcast SMIs)."""

    def __init__(self, fw: FwCfg, supported: int = SMI_BROADCAST | SMI_CPU_HOTPLUG | SMI_CPU_HOT_UNPLUG):
        self.fw, self.supported, self.negotiated = fw, supported, 0
        fw.add_file(SMI_SUPPORTED, struct.pack("<Q", supported))
        fw.add_file(SMI_REQUESTED, bytes(8), writable=True)
        fw.add_file(SMI_OK, b"\0", on_select=self._negotiate)

    @property
    def ok(self) -> bool:
        return self.fw.contents(SMI_OK) != b"\0"

    def _negotiate(self) -> None:
        """smi_features_ok_callback."""
        if self.ok:
            return                                  # locked
        requested = int.from_bytes(self.fw.contents(SMI_REQUESTED), "little")
        hotplug = requested & (SMI_CPU_HOTPLUG | SMI_CPU_HOT_UNPLUG)
        if requested & ~self.supported:
            return                                  # features the host lacks
        if hotplug and not requested & SMI_BROADCAST:
            return                                  # CPU hot(un)plug with SMI needs broadcast
        if hotplug == SMI_CPU_HOT_UNPLUG:
            return                                  # unplug without plug
        self.negotiated = requested
        self.fw.update_file(SMI_OK, b"\1")

    def reset(self) -> None:
        """ich9_lpc_reset: request, result and negotiation cleared."""
        self.fw.update_file(SMI_REQUESTED, bytes(8))
        self.fw.update_file(SMI_OK, b"\0")
        self.negotiated = 0

    def state(self) -> dict:
        return {"requested": self.fw.contents(SMI_REQUESTED), "ok": self.ok, "negotiated": self.negotiated}

    def restore(self, state: dict) -> None:
        self.fw.update_file(SMI_REQUESTED, state["requested"])
        self.fw.update_file(SMI_OK, b"\1" if state["ok"] else b"\0")
        self.negotiated = state["negotiated"]
