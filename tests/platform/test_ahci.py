from ringminus.emulator.pci import PciFunction
from ringminus.platform.ahci import Ahci, plug


def test_reset_values():
    a = Ahci()
    assert a.read(0, 4) == 0xC0141F05 and a.read(4, 4) == 0x8000_0000
    assert a.read(0xC, 4) == 0x3F and a.read(0x10, 4) == 0x10000
    for p in range(6):
        b = 0x100 + 0x80 * p
        assert a.read(b + 0x18, 4) == 6 and a.read(b + 0x20, 4) == 0x7F
        assert a.read(b + 0x24, 4) == 0xFFFFFFFF and a.read(b + 0x28, 4) == 0
    assert a.read(0x400, 4) == 0 and a.read(0x14, 4) == 0


def test_access_rules():
    a = Ahci()
    assert a.read(2, 2) == 0xC014 and a.read(1, 2) == 0      # unaligned: rejected
    assert a.read(0, 8) == 0x8000_0000_C014_1F05
    a.write(0x100, 8, 0x1234_5678_9ABC_DEF0)
    assert a.read(0x100, 4) == 0x9ABCDEF0 and a.read(0x104, 4) == 0x12345678
    a.write(0x101, 1, 0xFF)                                    # mis-aligned write dropped
    assert a.read(0x100, 4) == 0x9ABCDEF0
    a.write(0x100, 1, 0x11)                                    # zero-extended into the register
    assert a.read(0x100, 4) == 0x11
    for off in range(0, 0x1000, 3):
        for size in (1, 2, 4, 8):
            a.read(off, size); a.write(off, size, 0xFFFFFFFFFFFFFFFF)


def test_ghc_and_reset():
    levels = []
    a = Ahci(irq=levels.append)
    a.write(4, 4, 0x3 ^ 1)
    assert a.read(4, 4) == 0x8000_0002
    a.write(0x118, 4, 0x11)                  # ST|FRE
    assert a.read(0x118, 4) == 0x11 | 0xC000      # SUD/POD are writable: cleared
    a.write(4, 4, 1)
    assert a.read(4, 4) == 0x8000_0000 and a.read(0x118, 4) == 6 and a.read(0x124, 4) == 0xFFFFFFFF


def test_cmd_engines_and_d2h():
    written = []
    levels = []
    a = Ahci(irq=levels.append, write_memory=lambda addr, data: written.append((addr, data)))
    a.write(0x108, 4, 0x1000); a.write(0x114, 4, 0xFFFFFFFF)
    assert a.read(0x114, 4) == 0xFDC000FF
    a.write(0x118, 4, 0xF000_0000 | 0x8000 | 1)   # ICC dropped, CR read-only, ST -> CR
    assert a.read(0x118, 4) == 0x8001
    assert not written
    a.write(0x118, 4, 0x10)                        # FRE -> FR, ST off -> CR off, initial D2H FIS
    assert a.read(0x118, 4) == 0x4010
    assert written == [(0x1040, bytes([0x34, 0x40, 0x50, 0, 1, 0xFF, 0xFF, 0xA0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]))]
    assert a.read(0x120, 4) == 0x50 and a.read(0x124, 4) == 0xFFFF0101
    assert a.read(0x110, 4) == 1 and a.read(8, 4) == 1 and levels[-1] is False
    a.write(4, 4, 2)
    assert levels[-1] is True
    a.write(8, 4, 1)                               # still pending in PxIS: IS recomputed
    assert a.read(8, 4) == 1
    a.write(0x110, 4, 1)
    assert a.read(8, 4) == 0 and levels[-1] is False
    a.write(0x118, 4, 0x10)                        # only once
    assert len(written) == 1


def test_port_registers():
    a = Ahci()
    a.write(0x12C, 4, 1); a.write(0x12C, 4, 0)     # COMRESET resets TFD/SIG
    a.write(0x134, 4, 5); a.write(0x134, 4, 2)
    assert a.read(0x134, 4) == 7
    a.write(0x138, 4, 3); a.write(0x138, 4, 0x10)
    assert a.read(0x138, 4) == 0x13
    a.write(0x130, 4, 0xFF)
    assert a.read(0x130, 4) == 0 and a.read(0x128, 4) == 0
    s = a.state()
    b = Ahci(); b.restore(s)
    assert b.state() == s and b.read(0x138, 4) == 0x13


def test_idp():
    a = Ahci()
    a.idp_write(0x10, 4, 0x10F)
    assert a.idp_read(0x10, 4) == 0x10C
    a.idp_write(0x10, 4, 0)
    assert a.idp_read(0x14, 4) == 0xC0141F05


class FakeMemory(list):
    def write(self, address, data):
        self.append((address, data))


class FakeMachine:
    def __init__(self):
        self.regions, self.memory = {}, FakeMemory()
        from ringminus.emulator.ports import PortBus
        self.ports = PortBus()

    def add_mmio(self, base, size, device, name=""):
        self.regions[base] = device
        return base

    def remove_mmio(self, region):
        del self.regions[region]


def test_plug_maps_bars():
    m = FakeMachine()
    f = PciFunction(0x8086, 0x2922, 0x010601)
    f.add_bar(4, 32, True); f.add_bar(5, 0x1000)
    a = plug(m, f)
    f.write(0x24, 4, 0xFEBFF000); f.write(0x20, 4, 0xC041); f.write(4, 2, 3)
    assert m.regions == {0xFEBFF000: a}
    assert m.ports._devices[0xC050].read(0xC050, 4) == 0
    f.write(0x24, 4, 0xFEB00000)
    assert m.regions == {0xFEB00000: a}
    f.write(4, 2, 0)
    assert m.regions == {} and 0xC050 not in m.ports._devices
