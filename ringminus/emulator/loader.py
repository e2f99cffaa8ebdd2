"""Image loaders: flat binaries, ELF32/ELF64 (program headers), and ``-bios`` ROM images."""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

ELF_MAGIC = b"\x7fELF"
EM_386, EM_X86_64 = 3, 62
PT_LOAD = 1
ISA_BIOS_WINDOW = 128 * 1024      # QEMU shows the last 128 KiB of -bios below 1 MiB
FOUR_GIB = 1 << 32


class ImageError(ValueError):
    """An image ringminus cannot load; the message is meant for the user."""


@dataclass(frozen=True)
class ImageSegment:
    address: int
    data: bytes
    memory_size: int


@dataclass(frozen=True)
class Image:
    segments: tuple[ImageSegment, ...]
    entry: int
    bits: int | None = None          # 32 or 64 for ELF, None for a flat binary


def is_elf(data: bytes) -> bool:
    return data[:4] == ELF_MAGIC


def parse_flat(data: bytes, address: int) -> Image:
    return Image((ImageSegment(address, data, len(data)),), address)


class ElfFormat(NamedTuple):
    """One ELF class's layout (System V gABI, "ELF Header" and "Program Header")."""
    bits: int
    machine: int
    header: str                      # e_type … e_shstrndx, from offset 16
    header_size: int                 # the whole ELF header, e_ident included
    program_header: str
    fields: tuple[str, ...]          # the program header's fields, in file order


ELF_FORMATS = {
    1: ElfFormat(32, EM_386, "<HHIIIIIHHHHHH", 52, "<IIIIIIII",
                 ("type", "offset", "vaddr", "paddr", "filesz", "memsz", "flags", "align")),
    2: ElfFormat(64, EM_X86_64, "<HHIQQQIHHHHHH", 64, "<IIQQQQQQ",
                 ("type", "flags", "offset", "vaddr", "paddr", "filesz", "memsz", "align")),
}
PN_XNUM = 0xFFFF                      # e_phnum escape: the count is in section 0 (not supported)


def parse_elf(data: bytes) -> Image:
    """An ELF32/ELF64 x86 executable's PT_LOAD segments at their physical addresses.  Every
    offset, size and count is checked against the file and the address space, so a
    malformed file is an ImageError with the reason, never a struct or overflow error."""
    if not is_elf(data):
        raise ImageError("not an ELF file")
    if len(data) < 6 or data[4] not in ELF_FORMATS or data[5] != 1:
        raise ImageError("ELF must be little-endian ELF32 or ELF64")
    elf = ELF_FORMATS[data[4]]
    if len(data) < elf.header_size:
        raise ImageError(f"truncated ELF header: {len(data)} bytes, ELF{elf.bits} needs {elf.header_size}")
    (_type, machine, _version, entry, phoff, _shoff, _flags, _ehsize, phentsize, phnum,
     *_rest) = struct.unpack_from(elf.header, data, 16)
    if machine != elf.machine:
        raise ImageError(f"ELF is for another architecture (e_machine {machine}), not x86")
    if phnum == PN_XNUM:
        raise ImageError("ELF uses extended program header numbering (e_phnum 0xffff), which ringminus does not read")
    needed = struct.calcsize(elf.program_header)
    if phnum and phentsize < needed:
        raise ImageError(f"ELF program header entries are {phentsize} bytes; ELF{elf.bits} needs {needed}")
    if phoff + phnum * phentsize > len(data):
        raise ImageError(f"ELF program headers ({phnum} at offset {phoff:#x}) extend beyond the "
                         f"file's {len(data)} bytes")
    space = 1 << elf.bits
    segments, loaded = [], []         # loaded: (index, paddr, vaddr, memsz)
    for i in range(phnum):
        h = dict(zip(elf.fields, struct.unpack_from(elf.program_header, data, phoff + i * phentsize)))
        if h["type"] != PT_LOAD or h["memsz"] == 0:
            continue
        if h["offset"] + h["filesz"] > len(data):
            raise ImageError(f"ELF segment {i} (file bytes {h['offset']:#x}+{h['filesz']:#x}) extends beyond the file")
        if h["filesz"] > h["memsz"]:
            raise ImageError(f"ELF segment {i} has more file bytes ({h['filesz']:#x}) than memory ({h['memsz']:#x})")
        for kind in ("paddr", "vaddr"):
            if h[kind] + h["memsz"] > space:
                raise ImageError(f"ELF segment {i} ({kind} {h[kind]:#x}+{h['memsz']:#x}) runs past the end "
                                 f"of the {elf.bits}-bit address space")
        loaded.append((i, h["paddr"], h["vaddr"], h["memsz"]))
        segments.append(ImageSegment(h["paddr"], data[h["offset"]:h["offset"] + h["filesz"]], h["memsz"]))
    if not segments:
        raise ImageError("ELF has no loadable segments")
    by_address = sorted(loaded, key=lambda s: s[1])
    for (first, paddr, _, memsz), (second, next_paddr, _, _) in zip(by_address, by_address[1:]):
        if next_paddr < paddr + memsz:
            raise ImageError(f"ELF segments {first} and {second} overlap at physical {next_paddr:#x}")
    # e_entry is virtual; ringminus starts there with identity paging, so either address counts.
    if not any(base <= entry < base + memsz for _, paddr, vaddr, memsz in loaded for base in (paddr, vaddr)):
        raise ImageError(f"ELF entry point {entry:#x} lies in no loadable segment")
    return Image(tuple(segments), entry, elf.bits)


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
