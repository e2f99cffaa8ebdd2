"""Image loaders: flat binaries, ELF32/ELF64 (program headers), and ``-bios`` ROM images."""
from __future__ import annotations

import struct
from dataclasses import dataclass

ELF_MAGIC = b"\x7fELF"
EM_386, EM_X86_64 = 3, 62
PT_LOAD = 1
ISA_BIOS_WINDOW = 128 * 1024      # QEMU shows the last 128 KiB of -bios below 1 MiB
FOUR_GIB = 1 << 32


class ImageError(ValueError):
    """An image ringminus cannot load; the message is meant for the user."""


@dataclass(frozen=True)
class Segment:
    address: int
    data: bytes
    memory_size: int


@dataclass(frozen=True)
class Image:
    segments: tuple[Segment, ...]
    entry: int
    bits: int | None = None          # 32 or 64 for ELF, None for a flat binary


def is_elf(data: bytes) -> bool:
    return data[:4] == ELF_MAGIC


def parse_flat(data: bytes, address: int) -> Image:
    return Image((Segment(address, data, len(data)),), address)


def parse_elf(data: bytes) -> Image:
    if len(data) < 52 or not is_elf(data):
        raise ImageError("not an ELF file")
    elf_class, endian = data[4], data[5]
    if elf_class not in (1, 2) or endian != 1:
        raise ImageError("ELF must be little-endian ELF32 or ELF64")
    wide = elf_class == 2
    header = "<HHIQQQIHHHHHH" if wide else "<HHIIIIIHHHHHH"
    try:
        (_type, machine, _version, entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum,
         *_rest) = struct.unpack_from(header, data, 16)
    except struct.error:
        raise ImageError("truncated ELF header") from None
    if machine != (EM_X86_64 if wide else EM_386):
        raise ImageError(f"ELF is for another architecture (e_machine {machine}), not x86")
    segments = []
    program_header = "<IIQQQQQQ" if wide else "<IIIIIIII"
    for i in range(phnum):
        try:
            fields = struct.unpack_from(program_header, data, phoff + i * phentsize)
        except struct.error:
            raise ImageError("truncated ELF program headers") from None
        if wide:
            p_type, _flags, offset, _vaddr, paddr, filesz, memsz, _align = fields
        else:
            p_type, offset, _vaddr, paddr, filesz, memsz, _flags, _align = fields
        if p_type != PT_LOAD:
            continue
        if offset + filesz > len(data) or filesz > memsz:
            raise ImageError("ELF segment extends beyond the file")
        segments.append(Segment(paddr, data[offset:offset + filesz], memsz))
    if not segments:
        raise ImageError("ELF has no loadable segments")
    return Image(tuple(segments), entry, 64 if wide else 32)


def check_bios(data: bytes) -> None:
    """QEMU's rule for -bios images: a non-empty whole number of 64 KiB."""
    if not data or len(data) % 0x10000:
        raise ImageError(f"a -bios image must be a multiple of 64 KiB, not {len(data)} bytes")
    if len(data) > 16 << 20:
        raise ImageError("a -bios image may be at most 16 MiB")


def bios_windows(size: int) -> list[tuple[int, int, int]]:
    """(guest address, offset in the image, length): the whole image ending at 4 GiB, and its
    last min(size, 128 KiB) ending at 1 MiB, as QEMU's pc/q35 machines map it."""
    isa = min(size, ISA_BIOS_WINDOW)
    return [(FOUR_GIB - size, 0, size), (0x100000 - isa, size - isa, isa)]
