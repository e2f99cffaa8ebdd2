"""The firmware tables QEMU 7.2 hands SeaBIOS through fw_cfg on a board: the ACPI tables with
the table-loader script that links them (etc/acpi/*, etc/table-loader, etc/tpm/log) and the
SMBIOS entry point and structures (etc/smbios/*).  QEMU generates them (hw/i386/acpi-build.c,
hw/smbios/smbios.c); ringminus serves them as QEMU built them for the board, recorded with
tools/capture-fwcfg.sh into data/ — a dump of fw_cfg's file directory and files, of which
only these are kept.  They depend on the RAM size (the PCI hole in the DSDT, the SMBIOS memory
devices): a board whose RAM size has no recording gets none, and SeaBIOS then builds its own
ACPI tables, as it does on machines without a table-loader.

QEMU builds the ACPI tables twice: at power-on, and again when the firmware first selects one
of them after reset (acpi_build_update), from the chipset as the firmware has set it up by
then — the PM block's base in the FADT and, on q35, the MMCONFIG window (an MCFG table, and
the DSDT's resources around it).  Each recording holds one build; the chipset state it was
built in is read back from its own FADT and MCFG (``built_for``), and ``AcpiTables`` serves,
at that first select, the recording built in the state the chipset is in."""
from __future__ import annotations

import gzip
import re
import struct
from importlib import resources
from typing import Callable

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


def recordings(board: str, ram_size: int) -> list[dict[str, bytes]]:
    """The builds QEMU 7.2 made for ``board`` with ``ram_size`` of RAM, power-on first (the
    others in name order), or [] (none recorded)."""
    stem = f"qemu-7.2-{board}-{ram_size >> 20}M-fwcfg"
    folder = resources.files(__package__).joinpath("data")
    names = sorted(entry.name for entry in folder.iterdir()
                   if entry.name.startswith(stem) and entry.name.endswith(".bin.gz"))
    builds = []
    for name in sorted(names, key=lambda name: name != f"{stem}.bin.gz"):
        files = parse_dump(gzip.decompress(folder.joinpath(name).read_bytes()))
        builds.append({name: contents for name, contents in files.items() if name in SERVED})
    return builds


def recorded_sizes(board: str) -> list[int]:
    """The RAM sizes (MiB) ``board`` has recordings for."""
    folder = resources.files(__package__).joinpath("data")
    found = (re.fullmatch(rf"qemu-7\.2-{board}-(\d+)M-fwcfg\.bin\.gz", entry.name) for entry in folder.iterdir())
    return sorted(int(match.group(1)) for match in found if match)


def acpi_tables(blob: bytes) -> dict[str, bytes]:
    """The tables in etc/acpi/tables by signature: QEMU lays them out one after the other
    from offset 0 (FACS first), each with its length at offset 4; zeros pad the rest."""
    tables, at = {}, 0
    while at + 8 <= len(blob) and blob[at:at + 4].isalnum():
        length = struct.unpack_from("<I", blob, at + 4)[0]
        if length < 8:
            break
        tables[blob[at:at + 4].decode()] = blob[at:at + length]
        at += length
    return tables


def built_for(build: dict[str, bytes]) -> tuple[int, int | None]:
    """The chipset state a build was made in: the PM block's base (the FADT's PM1a_EVT_BLK,
    offset 56) and the MMCONFIG base (the MCFG's first allocation, offset 44; None without
    an MCFG table, as QEMU builds one only while the window is enabled)."""
    tables = acpi_tables(build.get("etc/acpi/tables", b""))
    facp, mcfg = tables.get("FACP"), tables.get("MCFG")
    pm_base = struct.unpack_from("<I", facp, 56)[0] if facp is not None and len(facp) >= 60 else 0
    mmconfig = struct.unpack_from("<Q", mcfg, 44)[0] if mcfg is not None and len(mcfg) >= 52 else None
    return pm_base, mmconfig


REBUILT = ("etc/acpi/tables", "etc/acpi/rsdp", "etc/table-loader")     # what acpi_build_update replaces


class AcpiTables:
    """The recorded tables as fw_cfg files, built again at the firmware's first select of one
    of REBUILT after reset: served from the recording made in the chipset's state then
    (``chipset_state`` gives it as ``built_for`` does), or, where none was recorded in that
    state, from the power-on one (``matched`` says which happened)."""

    def __init__(self, fw_cfg, builds: list[dict[str, bytes]], chipset_state: Callable[[], tuple]):
        self.fw_cfg = fw_cfg
        self.builds = builds
        self.chipset_state = chipset_state
        self.built: int | None = None           # the build served since the first select
        self.matched = True
        for name, contents in builds[0].items():
            fw_cfg.add_file(name, contents, on_select=self._build if name in REBUILT else None)

    def _build(self) -> None:
        if self.built is None:
            state = self.chipset_state()
            index = next((i for i, build in enumerate(self.builds) if built_for(build) == state), None)
            self.matched = index is not None
            self._serve(index or 0)

    def _serve(self, index: int | None) -> None:
        self.built = index
        for name in REBUILT:
            contents = self.builds[0 if index is None else index].get(name)
            if contents is not None:
                self.fw_cfg.update_file(name, contents)

    def state(self) -> tuple:
        return self.built, self.matched

    def restore(self, state: tuple) -> None:
        built, self.matched = state
        self._serve(built)
