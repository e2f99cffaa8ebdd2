"""Multiboot v1 direct boot, as QEMU 7.2's ``-kernel`` does it (hw/i386/multiboot.c): the
kernel, its modules and the boot information go into fw_cfg, and the option ROM
``multiboot_dma.bin`` (Debian's qemu-system-data), which SeaBIOS runs first (boot index 0),
copies them into place, completes the information from the BIOS (INT 12h, E820) and enters the
kernel in 32-bit protected mode with EAX = 0x2BADB002 and EBX = the information structure.

QEMU builds one buffer at the kernel's load address: the kernel image (BSS included), page
aligned; then a 16-byte record per module, the command lines (each module's, then the
kernel's: "<kernel path as given> <append>"), the boot loader's name "qemu", page aligned;
then each module, page aligned.  The information structure is served separately, to be
placed at 0x9500, with its memory fields left for the ROM to fill.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from ..emulator.loader import ImageError, is_elf, parse_elf
from .fwcfg import FwCfg, add_option_rom

MAGIC = 0x1BADB002
SEARCH = 8192 - 48                  # the header is 12 dwords within the first 8 KiB
HEADER_HAS_VBE, HEADER_HAS_ADDRESS = 1 << 2, 1 << 16
EM_X86_64 = 62
PAGE = 0x1000
INFO_ADDRESS = 0x9500               # MULTIBOOT_STRUCT_ADDR + 0x500; the E820 copy at 0x9000
MMAP_ADDRESS = 0x9000
INFO_SIZE = 88
MODULE_RECORD = 16
BOOT_LOADER = b"qemu"
INFO_FLAGS = 0x24F                  # memory, boot device, command line, modules, mmap, loader name
BOOT_DEVICE = 0x8000_FFFF
KERNEL_ADDR, KERNEL_SIZE, INITRD_ADDR, INITRD_SIZE = 0x07, 0x08, 0x0A, 0x0B
KERNEL_ENTRY, KERNEL_DATA, INITRD_DATA = 0x10, 0x11, 0x12
ROM_NAME = "multiboot_dma.bin"
BOOT_ORDER = f"/rom@genroms/{ROM_NAME}".encode() + b"\0"


def _page_align(value: int) -> int:
    return (value + PAGE - 1) & ~(PAGE - 1)


@dataclass(frozen=True)
class Multiboot:
    entry: int
    load_address: int
    buffer: bytes                   # fw_cfg KERNEL_DATA: what the ROM copies to load_address
    info: bytes                     # fw_cfg INITRD_DATA: the information structure, for 0x9500

    def install(self, fw: FwCfg, rom: bytes) -> None:
        """The fw_cfg items and the option ROM QEMU gives SeaBIOS, first in the boot order."""
        for key, value in ((KERNEL_ENTRY, self.entry), (KERNEL_ADDR, self.load_address),
                           (KERNEL_SIZE, len(self.buffer)), (INITRD_ADDR, INFO_ADDRESS), (INITRD_SIZE, INFO_SIZE)):
            fw.add_item(key, struct.pack("<I", value))
        fw.add_item(KERNEL_DATA, self.buffer)
        fw.add_item(INITRD_DATA, self.info)
        add_option_rom(fw, ROM_NAME, rom)
        fw.update_file("bootorder", BOOT_ORDER)


def _header(kernel: bytes) -> tuple[int, int]:
    """(offset, flags) of the multiboot header: a 4-byte aligned magic whose checksum holds."""
    for offset in range(0, min(SEARCH, len(kernel) - 11), 4):
        magic, flags, checksum = struct.unpack_from("<III", kernel, offset)
        if magic == MAGIC and (magic + flags + checksum) & 0xFFFF_FFFF == 0:
            return offset, flags
    raise ImageError("no multiboot header (magic 0x1BADB002 with its checksum) in the first 8 KiB")


def _elf_image(kernel: bytes) -> tuple[int, int, bytes]:
    """(entry, load address, image): the PT_LOAD segments from the lowest to the highest
    physical address, zero-filled between and past their file bytes (QEMU's load_elf)."""
    if not is_elf(kernel):
        raise ImageError("a multiboot kernel without the address fields (flags bit 16) must be ELF")
    if len(kernel) >= 20 and struct.unpack_from("<H", kernel, 18)[0] == EM_X86_64:
        raise ImageError("cannot load an x86-64 multiboot kernel: give a 32-bit one (as QEMU says)")
    image = parse_elf(kernel)
    low = min(segment.address for segment in image.segments)
    high = max(segment.address + segment.memory_size for segment in image.segments)
    if high > 1 << 32:
        raise ImageError(f"the multiboot kernel reaches {high:#x}, beyond 4 GiB")
    buffer = bytearray(high - low)
    for segment in image.segments:
        buffer[segment.address - low:segment.address - low + len(segment.data)] = segment.data
    return image.entry, low, bytes(buffer)


def _aout_image(kernel: bytes, offset: int) -> tuple[int, int, bytes]:
    """The a.out kludge: the header's address fields say what to load where."""
    if offset + 32 > len(kernel):
        raise ImageError("the multiboot header's address fields run past the end of the file")
    header_addr, load_addr, load_end, bss_end, entry = struct.unpack_from("<5I", kernel, offset + 12)
    if header_addr < load_addr or header_addr - load_addr > offset:
        raise ImageError(f"invalid multiboot load address {load_addr:#x} for header address {header_addr:#x}")
    text = offset - (header_addr - load_addr)
    if load_end:
        if load_end < load_addr:
            raise ImageError(f"invalid multiboot load end address {load_end:#x}")
        size = load_end - load_addr
    else:
        size = len(kernel) - text
    if text + size > len(kernel):
        raise ImageError(f"the multiboot kernel's {size:#x} bytes at file offset {text:#x} run past the file")
    total = size
    if bss_end:
        if bss_end < load_addr + size:
            raise ImageError(f"invalid multiboot BSS end address {bss_end:#x}")
        total = bss_end - load_addr
    return entry, load_addr, kernel[text:text + size] + bytes(total - size)


def load(kernel: bytes, path: str, append: str = "", modules: list[tuple[str, bytes]] = ()) -> Multiboot:
    """QEMU's load_multiboot: ``path`` is the kernel's name as given (it starts the command
    line); ``modules`` are (string, contents), the string as given to -initrd (file name and
    arguments)."""
    offset, flags = _header(kernel)
    entry, load_address, image = _aout_image(kernel, offset) if flags & HEADER_HAS_ADDRESS else _elf_image(kernel)
    kernel_line = f"{path} {append}".encode() + b"\0"
    strings = [module.encode() + b"\0" for module, _data in modules]
    records_at = _page_align(len(image))
    lines_at = records_at + MODULE_RECORD * len(modules)
    loader_at = lines_at + len(path) + 1 + len(append) + 1 + sum(len(s) for s in strings)
    buffer = bytearray(_page_align(loader_at + len(BOOT_LOADER) + 1))
    buffer[:len(image)] = image
    at = lines_at
    for index, ((_name, data), string) in enumerate(zip(modules, strings)):
        start = len(buffer)
        buffer += data + bytes(_page_align(len(data)) - len(data))
        struct.pack_into("<III", buffer, records_at + MODULE_RECORD * index,
                         load_address + start, load_address + start + len(data), load_address + at)
        buffer[at:at + len(string)] = string
        at += len(string)
    buffer[at:at + len(kernel_line)] = kernel_line
    buffer[loader_at:loader_at + len(BOOT_LOADER)] = BOOT_LOADER
    if load_address + len(buffer) > 1 << 32:
        raise ImageError(f"the multiboot kernel and its modules ({len(buffer):#x} bytes at {load_address:#x}) "
                         "run past 4 GiB")
    info = bytearray(INFO_SIZE)
    struct.pack_into("<IIII", info, 0, INFO_FLAGS, 0, 0, BOOT_DEVICE)
    struct.pack_into("<III", info, 16, load_address + at, len(modules), load_address + records_at)
    struct.pack_into("<I", info, 48, MMAP_ADDRESS)
    struct.pack_into("<I", info, 64, load_address + loader_at)
    return Multiboot(entry, load_address, bytes(buffer), bytes(info))
