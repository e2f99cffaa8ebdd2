"""Shared helpers: guests are assembled here with keystone."""
from __future__ import annotations

import pytest
from keystone import KS_ARCH_X86, KS_MODE_16, KS_MODE_32, KS_MODE_64, Ks

from ringminus import Machine

_MODES = {16: KS_MODE_16, 32: KS_MODE_32, 64: KS_MODE_64}
LOAD = {"real": 0x7C00, "protected": 0x100000, "long": 0x100000}
BITS = {"real": 16, "protected": 32, "long": 64}


def asm(source: str, bits: int, address: int = 0) -> bytes:
    encoding, _ = Ks(KS_ARCH_X86, _MODES[bits]).asm(source, address)
    return bytes(encoding)


def run_guest(source: str, boot: str = "real", cpl: int = 0, setup=None, **run_args):
    """Assemble ``source`` for ``boot``, load it at the default address, run it."""
    machine = Machine()
    address = LOAD[boot]
    machine.write_memory(address, asm(source, BITS[boot], address))
    machine.boot(boot, address, cpl)
    if setup:
        setup(machine)
    return machine, machine.run(**run_args)


@pytest.fixture
def assemble():
    return asm
