"""The firmware tables QEMU 7.2 hands SeaBIOS through fw_cfg on a board: the ACPI tables with
the table-loader script that links them (etc/acpi/*, etc/table-loader, etc/tpm/log) and the
SMBIOS entry point and structures (etc/smbios/*).  QEMU generates them (hw/i386/acpi-build.c,
hw/smbios/smbios.c); ringminus serves them as QEMU built them for the board, recorded with
tools/capture-fwcfg.sh into data/ — a dump of fw_cfg's file directory and files, of which
only these are kept.  They depend on the RAM size (the PCI hole in the DSDT, the SMBIOS memory
devices): a board whose RAM size has no recording gets none, and SeaBIOS then builds its own
ACPI tables, as it does on machines without a table-loader."""
from __future__ import annotations

import gzip
import struct
from importlib import resources

SERVED = ("etc/acpi/rsdp", "etc/acpi/tables", "etc/table-loader", "etc/tpm/log",
          "etc/smbios/smbios-anchor", "etc/smbios/smbios-tables")
DIRECTORY = 4 + 64 * 0x20               # fw_cfg item 0x19 with 32 file slots


def parse_dump(dump: bytes) -> dict[str, bytes]:
    """name -> contents, from a dump: the file directory, then each file in its order."""
    count = struct.unpack_from(">I", dump)[0]
    files, at = {}, DIRECTORY
    for index in range(count):
        size = struct.unpack_from(">I", dump, 4 + 64 * index)[0]
        name = dump[4 + 64 * index + 8:4 + 64 * index + 64].split(b"\0")[0].decode()
        files[name] = dump[at:at + size]
        at += size
    return files


def recorded(board: str, ram_size: int) -> dict[str, bytes]:
    """The tables QEMU 7.2 built for ``board`` with ``ram_size`` of RAM, or {} (none recorded)."""
    name = f"qemu-7.2-{board}-{ram_size >> 20}M-fwcfg.bin.gz"
    data = resources.files(__package__).joinpath("data", name)
    if not data.is_file():
        return {}
    files = parse_dump(gzip.decompress(data.read_bytes()))
    return {name: contents for name, contents in files.items() if name in SERVED}
