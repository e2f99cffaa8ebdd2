from ringminus.emulator.pci import PciFunction
from ringminus.emulator.ports import PortBus
from ringminus.platform.ide import LegacyIde, plug


def test_no_drive_reads():
    ide = LegacyIde()
    for base, ctl in ((0x1F0, 0x3F6), (0x170, 0x376)):
        assert ide.read(base, 1) == 0xFF and ide.read(base, 2) == 0 and ide.read(base, 4) == 0
        for off in range(1, 8):
            assert ide.read(base + off, 1) == 0
        assert ide.read(base + 2, 2) == 0 and ide.read(base + 7, 2) == 0xFF00
        assert ide.read(base + 4, 4) == 0xFFFFFFFF
        assert ide.read(ctl, 1) == 0 and ide.read(ctl, 2) == 0xFF00 and ide.read(ctl, 4) == 0xFFFFFFFF
    for port in range(0x10000):
        for size in (1, 2, 4, 8):
            ide.read(port, size); ide.write(port, size, 0xFF)


def test_command_irq():
    l14, l15 = [], []
    ide = LegacyIde((l14.append, l15.append))
    ide.write(0x1F7, 1, 0xEC)
    assert l14[-1] is True and ide.bm_read(2, 1) == 4
    ide.read(0x3F6, 1)
    assert l14[-1] is True
    ide.read(0x1F7, 1)
    assert l14[-1] is False
    ide.write(0x1F6, 1, 0xB0)                  # drive 1: absent, ignored
    ide.write(0x1F7, 1, 0xEC)
    assert l14[-1] is False
    ide.write(0x176, 1, 0xA0); ide.write(0x376, 1, 2); ide.write(0x177, 1, 0xEC)   # nIEN
    assert l15[-1] is False
    ide.write(0x376, 1, 0x04)                  # SRST edge -> diagnostic irq
    assert l15[-1] is True


def test_bmdma():
    ide = LegacyIde()
    assert ide.bm_read(0, 1) == 0 and ide.bm_read(1, 1) == 0xFF and ide.bm_read(0, 2) == 0xFFFF
    ide.bm_write(8, 1, 0xFF)
    assert ide.bm_read(8, 1) == 0x09 and ide.bm_read(10, 1) == 1
    ide.bm_write(10, 1, 0x66)
    assert ide.bm_read(10, 1) == 0x61
    ide.bm_write(8, 1, 0)
    assert ide.bm_read(10, 1) == 0x60
    ide.bm_write(4, 4, 0x12345677)
    assert ide.bm_read(4, 4) == 0x12345674 and ide.bm_read(6, 2) == 0x1234 and ide.bm_read(5, 2) == 0
    ide.bm_write(5, 1, 0xAB)
    assert ide.bm_read(4, 4) == 0x1234AB74
    s = ide.state(); other = LegacyIde(); other.restore(s)
    assert other.state() == s


class FakeMachine:
    def __init__(self):
        self.ports = PortBus()


def test_plug():
    m = FakeMachine()
    f = PciFunction(0x8086, 0x7010, 0x010180)
    f.add_bar(4, 16, True)
    ide = plug(m, f)
    assert m.ports._devices[0x1F7] is ide and m.ports._devices[0x376] is ide
    f.write(0x20, 4, 0xC001); f.write(4, 2, 1)
    assert m.ports._devices[0xC000].read(0xC001, 1) == 0xFF
    f.write(4, 2, 0)
    assert 0xC000 not in m.ports._devices
