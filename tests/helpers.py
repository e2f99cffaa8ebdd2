"""Plain helpers the test files share (pytest fixtures and hooks live in conftest.py): keystone,
the CLI run in-process, and the machines that more than one test file builds."""
from __future__ import annotations

from keystone import KS_ARCH_X86, KS_MODE_16, KS_MODE_32, KS_MODE_64, Ks

from ringminus import Machine
from ringminus.entry import main
from ringminus.smm import layouts as L

LOAD = {"real": 0x7C00, "protected": 0x100000, "long": 0x100000}     # default load address per boot state
BITS = {"real": 16, "protected": 32, "long": 64}
_KS = {16: Ks(KS_ARCH_X86, KS_MODE_16), 32: Ks(KS_ARCH_X86, KS_MODE_32), 64: Ks(KS_ARCH_X86, KS_MODE_64)}

SMRAM_BASE = 0x30000                        # the reset SMBASE
SMM_ENTRY = SMRAM_BASE + L.ENTRY_OFFSET     # where the SMI handler starts
RSM = bytes.fromhex("0faa")                 # keystone does not know RSM


# -- assembling and the command line ------------------------------------------------------------
def asm(source: str, bits: int = 64, address: int = 0) -> bytes:
    """``source`` assembled by keystone for ``bits``-bit code at ``address``."""
    encoding, _ = _KS[bits].asm(source, address)
    return bytes(encoding or b"")


def run_cli(capsys, *args):
    """Run the CLI's ``main()`` in-process on ``str()`` of each argument: (status, stdout, stderr)."""
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def guest_image(tmp_path, source: str, bits: int = 64, address: int = 0x100000):
    """``source`` assembled at ``address``, written to tmp_path/guest.bin; its path."""
    path = tmp_path / "guest.bin"
    path.write_bytes(asm(source, bits, address))
    return path


def vectors_file(tmp_path, text: str):
    """``text`` (TOML vectors) written to tmp_path/v.toml; its path."""
    path = tmp_path / "v.toml"
    path.write_text(text)
    return path


# -- machines -----------------------------------------------------------------------------------
def boot_guest(code: str | bytes, boot: str = "real", cpl: int = 0, address: int | None = None,
               **machine_args) -> Machine:
    """A ``Machine(**machine_args)`` with ``code`` (assembly, or bytes taken as they are) at
    ``address`` (LOAD[boot] unless given), booted into ``boot`` at CPL ``cpl``."""
    machine = Machine(**machine_args)
    if address is None:
        address = LOAD[boot]
    if isinstance(code, str):
        code = asm(code, BITS[boot], address)
    machine.write_memory(address, code)
    machine.boot(boot, address, cpl)
    return machine


def run_guest(source: str, boot: str = "real", cpl: int = 0, setup=None, **run_args):
    """Assemble ``source`` for ``boot``, load it at the default address, run it."""
    machine = boot_guest(source, boot, cpl)
    if setup:
        setup(machine)
    return machine, machine.run(**run_args)


def add_smram(machine: Machine, handler: bytes = RSM) -> Machine:
    """Private SMRAM at SMRAM_BASE (64 KiB) holding ``handler`` at the SMI entry."""
    machine.smram.add_range(SMRAM_BASE, 0x10000)
    machine.load_smram(SMM_ENTRY, handler)
    return machine


def smram_field(machine: Machine, field: str, size: int = 8, layout=L.SMRAM_STATE_64) -> int:
    """A field of the SMM save map at the current SMBASE."""
    return int.from_bytes(machine.read_view(machine.smm.smbase + L.offset_of(layout, field), size), "little")


def set_smram_field(machine: Machine, field: str, value: int, size: int = 8, layout=L.SMRAM_STATE_64) -> None:
    machine.memory.write(machine.smm.smbase + L.offset_of(layout, field), value.to_bytes(size, "little"))
