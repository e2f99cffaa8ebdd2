"""fw_cfg (platform/fwcfg.py) against QEMU 7.2's hw/nvram/fw_cfg.c and platform.md §5: the
byte interface and its wrong-size accesses, the file directory and its selectors, the DMA
interface (errors, SKIP, SELECT, WRITE), the standard x86 contents, q35's SMI negotiation,
snapshots, and a real guest reading the signature and DMAing the directory into RAM."""
import random
import struct

import pytest

from ringminus import Machine, StopReason
from ringminus.emulator.memory import UnbackedMemory
from ringminus.platform import fwcfg as F
from ringminus.platform import tables
from ringminus.platform.fwcfg import FwCfg

from ..helpers import asm

PAGE = 0x1000
STRUCT = 0x100          # where the tests put the DMA access structure


class FakeMemory:
    """``size`` bytes of RAM from 0; pages in ``rom`` are read-only; the rest is unbacked.
    With ``hint``, it says what it backs (``backed_ranges``, as PhysicalMemory does)."""

    def __init__(self, size=0x10000, rom=(), hint=False):
        self.ram, self.rom = bytearray(size), set(rom)
        if hint:
            self.backed_ranges = lambda: [(0, len(self.ram))]

    def read(self, address, size):
        if address + size > len(self.ram):
            raise UnbackedMemory(address)
        return bytes(self.ram[address:address + size])

    def write(self, address, data):
        if address + len(data) > len(self.ram):
            raise UnbackedMemory(address)
        self.ram[address:address + len(data)] = data

    def read_only(self, address):
        return address // PAGE in self.rom


def be32(value):
    return struct.unpack("<I", struct.pack(">I", value))[0]     # what the guest puts in EAX


def device(**memory_args):
    memory = FakeMemory(**memory_args)
    return FwCfg(memory), memory


def select(fw, key):
    fw.write(0x510, 2, key)


def read_bytes(fw, count, port=0x511):
    return bytes(fw.read(port, 1) for _ in range(count))


def dma(fw, memory, control, length=0, address=0, at=STRUCT):
    """Run one DMA transfer through the ports; the control word QEMU wrote back."""
    memory.ram[at:at + 16] = struct.pack(">IIQ", control, length, address)
    fw.write(0x518, 4, be32(at))
    return struct.unpack(">I", memory.ram[at:at + 4])[0]


# -- the byte interface -------------------------------------------------------------------------
def test_signature_and_id_by_byte_reads_at_either_port():
    fw, _ = device()
    assert bytes([fw.read(0x510, 1), fw.read(0x511, 1), fw.read(0x510, 1), fw.read(0x511, 1)]) == b"QEMU"
    assert fw.read(0x510, 1) == 0                          # past the end
    select(fw, F.ID)
    assert read_bytes(fw, 4) == struct.pack("<I", 3)       # traditional + DMA


def test_selecting_resets_the_offset_and_reset_selects_the_signature():
    fw, _ = device()
    select(fw, F.ID)
    fw.read(0x510, 1)
    select(fw, F.SIGNATURE)
    assert read_bytes(fw, 2) == b"QE"
    select(fw, F.ID)
    fw.reset()
    assert read_bytes(fw, 4) == b"QEMU"


@pytest.mark.parametrize("key", [0x06, 0x1F, 0x3F, 0x40, 0x3FFF, 0xFFFF, 0x8019])
def test_absent_and_invalid_keys_read_zeros(key):
    fw, _ = device()
    select(fw, key)
    assert read_bytes(fw, 4) == bytes(4)


def test_the_write_channel_bit_names_the_same_item():
    fw, _ = device()
    select(fw, F.WRITE_CHANNEL | F.SIGNATURE)
    assert read_bytes(fw, 4) == b"QEMU"


def test_wrong_size_accesses_are_refused_whole():
    # Under TCG an IN/OUT reaches the region whole; what .valid refuses reads 0 / is dropped.
    fw, _ = device()
    select(fw, F.ID)
    fw.write(0x511, 2, F.SIGNATURE)        # 16-bit at 0x511: unaligned, refused
    fw.write(0x510, 1, 0)                  # byte writes are accepted and do nothing
    fw.write(0x511, 1, 0)
    fw.write(0x510, 4, F.SIGNATURE)        # 32-bit: refused
    for port, size in ((0x510, 2), (0x510, 4), (0x511, 2), (0x511, 4)):
        assert fw.read(port, size) == 0    # refused reads give 0 and consume nothing
    assert read_bytes(fw, 4) == struct.pack("<I", 3)


def test_reading_the_dma_ports_gives_the_signature_in_port_order():
    fw, _ = device()
    assert fw.read(0x514, 4).to_bytes(4, "little") == b"QEMU"
    assert fw.read(0x518, 4).to_bytes(4, "little") == b" CFG"
    assert bytes(fw.read(port, 1) for port in F.DMA_PORTS) == b"QEMU CFG"
    assert fw.read(0x516, 2).to_bytes(2, "little") == b"MU"
    assert fw.read(0x51A, 2).to_bytes(2, "little") == b"FG"
    assert fw.read(0x516, 4) == fw.read(0x515, 2) == fw.read(0x51A, 4) == 0    # unaligned


# -- the file directory -------------------------------------------------------------------------
def directory(fw):
    select(fw, F.FILE_DIR)
    raw = read_bytes(fw, 4 + 64 * F.FILE_SLOTS)
    count = struct.unpack(">I", raw[:4])[0]
    entries = [struct.unpack(">IHH56s", raw[4 + 64 * i:68 + 64 * i]) for i in range(count)]
    return [(size, sel, reserved, name.rstrip(b"\0").decode()) for size, sel, reserved, name in entries], raw


def test_files_are_sorted_by_name_and_selectors_reassigned():
    fw, _ = device()
    assert fw.add_file("etc/zeta", b"zz") == 0x20
    assert fw.add_file("bootorder", b"") == 0x20           # goes first: etc/zeta moves up
    assert fw.add_file("etc/alpha", b"a" * 5) == 0x21
    entries, raw = directory(fw)
    assert entries == [(0, 0x20, 0, "bootorder"), (5, 0x21, 0, "etc/alpha"), (2, 0x22, 0, "etc/zeta")]
    assert len(fw.contents(F.FILE_DIR)) == 2052 and raw[4 + 64 * 3:] == bytes(64 * 29)
    select(fw, 0x22)
    assert read_bytes(fw, 3) == b"zz\0"
    assert fw.selector("etc/zeta") == 0x22 and fw.file_names() == ["bootorder", "etc/alpha", "etc/zeta"]


def test_a_select_hook_moves_with_its_file():
    fw, _ = device()
    seen = []
    fw.add_file("m", b"m", on_select=lambda: seen.append("m"))
    fw.add_file("a", b"a")
    select(fw, 0x20)
    assert seen == []
    select(fw, 0x21)
    assert seen == ["m"] and read_bytes(fw, 1) == b"m"


def test_bad_host_calls_are_refused():
    fw, _ = device()
    fw.add_file("x", b"")
    for call in (lambda: fw.add_file("x", b""), lambda: fw.add_file("n" * 56, b""),
                 lambda: fw.add_item(F.SIGNATURE, b""), lambda: fw.add_item(F.FILE_DIR, b""),
                 lambda: fw.add_item(0x20, b"")):
        with pytest.raises(ValueError):
            call()
    for index in range(F.FILE_SLOTS - 1):
        fw.add_file(f"f{index:02}", b"")
    with pytest.raises(ValueError):
        fw.add_file("one-too-many", b"")


# -- the standard contents ----------------------------------------------------------------------
def test_e820_for_128_mib():
    raw = F.e820_table(F.qemu_e820(128 << 20, 0))
    assert raw == bytes.fromhex("00000000fd000000" "0000000003000000" "02000000"
                                "0000000000000000" "0000000800000000" "01000000")
    assert raw == struct.pack("<QQIQQI", 0xFD_0000_0000, 0x3_0000_0000, 2, 0, 0x800_0000, 1)


def test_e820_above_4g_and_the_ram_split():
    assert F.qemu_ram_split(4 << 30, "q35") == (2 << 30, 2 << 30)
    assert F.qemu_ram_split(4 << 30, "pc") == (3 << 30, 1 << 30)
    assert F.qemu_ram_split(2816 << 20, "pc") == (2816 << 20, 0)
    entries = F.qemu_e820(*F.qemu_ram_split(4 << 30, "pc"))
    assert entries[1:] == [(0, 0xC000_0000, 1), (1 << 32, 1 << 30, 1)]


@pytest.mark.parametrize("board", ["pc", "q35"])
def test_qemu_x86_contents(board):
    fw, _ = device()
    smi = F.add_qemu_x86_contents(fw, 128 << 20, 128 << 20, 0, cpus=1, board=board)
    assert (smi is not None) == (board == "q35")
    expect = {F.UUID: bytes(16), F.RAM_SIZE: struct.pack("<Q", 0x8000000), F.NOGRAPHIC: b"\1\0",
              F.NB_CPUS: b"\1\0", F.NUMA: bytes(16), F.BOOT_MENU: b"\0\0", F.MAX_CPUS: b"\1\0",
              F.ACPI_TABLES: b"", F.IRQ0_OVERRIDE: b"\1\0\0\0"}
    for key, data in expect.items():
        assert fw.contents(key) == data, hex(key)
    hpet = fw.contents(F.HPET)
    assert len(hpet) == 121 and hpet[:16] == bytes([1]) + struct.pack("<IQHB", 0x8086A201, 0xFED00000, 0, 0)
    assert hpet[16:] == bytes(105)
    assert fw.contents("etc/boot-fail-wait") == b"\xff" * 4
    assert fw.contents("etc/system-states") == bytes.fromhex("800000818280")
    assert len(fw.contents("etc/e820")) == 40
    # With the files other modules add, the selectors are those QEMU shows (platform.md §5.5).
    for name in (F.ACPI_RSDP_FILE, F.ACPI_TABLES_FILE, F.SMBIOS_ANCHOR_FILE, F.SMBIOS_TABLES_FILE,
                 F.TABLE_LOADER_FILE, F.TPM_LOG_FILE):
        fw.add_file(name, b"")
    F.add_option_rom(fw, "kvmvapic.bin", b"")
    names = ["bios-geometry", "bootorder", "etc/acpi/rsdp", "etc/acpi/tables", "etc/boot-fail-wait",
             "etc/e820", "etc/smbios/smbios-anchor", "etc/smbios/smbios-tables"]
    if board == "q35":
        names += ["etc/smi/features-ok", "etc/smi/requested-features", "etc/smi/supported-features"]
    names += ["etc/system-states", "etc/table-loader", "etc/tpm/log", "genroms/kvmvapic.bin"]
    assert fw.file_names() == names
    assert fw.selector("genroms/kvmvapic.bin") == (0x2E if board == "q35" else 0x2B)


# -- DMA ----------------------------------------------------------------------------------------
def test_dma_select_and_read_in_one_transfer():
    fw, memory = device()
    control = F.DMA_SELECT | F.DMA_READ | F.SIGNATURE << 16
    assert dma(fw, memory, control | F.ID << 16, 4, 0x2000) == 0
    assert memory.ram[0x2000:0x2004] == struct.pack("<I", 3)


def test_dma_read_past_the_end_fills_zeros_without_error():
    fw, memory = device()
    memory.ram[0x2000:0x2010] = b"\xAA" * 16
    assert dma(fw, memory, F.DMA_SELECT | F.DMA_READ, 10, 0x2000) == 0
    assert memory.ram[0x2000:0x2010] == b"QEMU" + bytes(6) + b"\xAA" * 6


def test_dma_skip_then_read_and_the_high_half_of_the_address():
    fw, memory = device()
    assert dma(fw, memory, F.DMA_SELECT | F.DMA_SKIP, 2) == 0
    fw.write(0x514, 4, be32(0))            # the high half (0), then the low half starts
    memory.ram[STRUCT:STRUCT + 16] = struct.pack(">IIQ", F.DMA_READ, 2, 0x2000)
    fw.write(0x518, 4, be32(STRUCT))
    assert memory.ram[STRUCT:STRUCT + 4] == bytes(4) and memory.ram[0x2000:0x2002] == b"MU"


def test_a_high_half_alone_does_nothing_and_the_next_low_half_uses_it():
    fw, memory = device()
    fw.write(0x514, 4, be32(1))            # structure at 1 << 32: unbacked
    memory.ram[STRUCT:STRUCT + 4] = b"\xEE" * 4
    fw.write(0x518, 4, be32(STRUCT))
    assert memory.ram[STRUCT:STRUCT + 4] == b"\xEE" * 4          # the ERROR went nowhere
    assert dma(fw, memory, F.DMA_SELECT | F.DMA_READ, 4, 0x2000) == 0   # the address was reset


def test_a_64_bit_write_starts_a_transfer_and_other_writes_are_refused():
    fw, memory = device()
    memory.ram[STRUCT:STRUCT + 16] = struct.pack(">IIQ", F.DMA_SELECT | F.DMA_READ, 4, 0x2000)
    for port, size in ((0x514, 1), (0x514, 2), (0x516, 4), (0x519, 1), (0x51A, 2), (0x518, 8)):
        fw.write(port, size, 0xFFFF_FFFF)
    fw.write(0x518, 4, be32(STRUCT))
    assert memory.ram[0x2000:0x2004] == b"QEMU"
    memory.ram[0x2000:0x2004] = bytes(4)
    memory.ram[STRUCT:STRUCT + 4] = struct.pack(">I", F.DMA_SELECT | F.DMA_READ)     # it was written back
    fw.write(0x514, 8, int.from_bytes(STRUCT.to_bytes(8, "big"), "little"))
    assert memory.ram[0x2000:0x2004] == b"QEMU"


def test_no_operation_bit_moves_nothing():
    fw, memory = device()
    assert dma(fw, memory, F.DMA_SELECT | F.ID << 16, 4, 0x2000) == 0
    assert memory.ram[0x2000:0x2004] == bytes(4) and read_bytes(fw, 1) == b"\3"


@pytest.mark.parametrize("hint", [False, True])
def test_dma_to_unbacked_memory_sets_error_and_writes_what_is_backed(hint):
    fw, memory = device(size=0x4000, hint=hint)
    memory.ram[0x3FFE:0x4000] = b"\xAA\xAA"
    assert dma(fw, memory, F.DMA_SELECT | F.DMA_READ, 4, 0x3FFE) == F.DMA_ERROR
    assert memory.ram[0x3FFE:] == b"QE"
    assert dma(fw, memory, F.DMA_SELECT | F.DMA_READ, 4, 0x1_0000_0000) == F.DMA_ERROR


@pytest.mark.parametrize("hint", [False, True])
def test_a_read_past_the_end_zero_fills_what_is_backed(hint):
    fw, memory = device(size=0x4000, rom={1}, hint=hint)
    memory.ram[0x200:] = b"\xAA" * (0x4000 - 0x200)
    assert dma(fw, memory, F.DMA_SELECT | F.DMA_READ | 0x3F << 16, 0x10000, 0x200) == F.DMA_ERROR
    assert memory.ram[0x200:0x1000] == bytes(0xE00) and memory.ram[0x2000:] == bytes(0x2000)
    assert memory.ram[0x1000:0x2000] == b"\xAA" * 0x1000                # ROM


def test_a_4_gib_zero_fill_on_a_real_machine_is_quick():
    m = Machine()
    fw = FwCfg(m.memory)
    top = m.memory.ram_size
    m.memory.write(top - 16, b"\xAA" * 16)
    m.memory.write(STRUCT, struct.pack(">IIQ", F.DMA_SELECT | F.DMA_READ | 0x3F << 16, 0xFFFF_FFFF, top - 16))
    fw.write(0x518, 4, be32(STRUCT))
    assert m.memory.read(STRUCT, 4) == struct.pack(">I", F.DMA_ERROR)
    assert m.memory.read(top - 16, 16) == bytes(16)


def test_dma_into_rom_fails():
    fw, memory = device(rom={2})
    assert dma(fw, memory, F.DMA_SELECT | F.DMA_READ, 4, 0x2000) == F.DMA_ERROR
    assert memory.ram[0x2000:0x2004] == bytes(4)


def test_a_structure_that_is_partly_unbacked_reports_error():
    fw, memory = device(size=0x4000)
    at = 0x4000 - 8
    memory.ram[at:] = struct.pack(">II", F.DMA_SELECT | F.DMA_READ, 4)
    fw.write(0x518, 4, be32(at))
    assert memory.ram[at:at + 4] == struct.pack(">I", F.DMA_ERROR)


def test_dma_write_to_a_writable_file_and_its_hook():
    fw, memory = device()
    writes = []
    fw.add_file("etc/rw", bytes(8), writable=True, on_write=lambda offset, length: writes.append((offset, length)))
    memory.ram[0x2000:0x2008] = b"abcdefgh"
    selector = fw.selector("etc/rw")
    assert dma(fw, memory, F.DMA_SELECT | F.DMA_SKIP | selector << 16, 2) == 0
    assert dma(fw, memory, F.DMA_WRITE, 4, 0x2000) == 0
    assert fw.contents("etc/rw") == b"\0\0abcd\0\0" and writes == [(2, 4)]
    assert dma(fw, memory, F.DMA_WRITE, 4, 0x2000) == F.DMA_ERROR      # only 2 bytes left
    assert dma(fw, memory, F.DMA_WRITE, 1, 0x2000) == F.DMA_ERROR      # offset is past the end
    assert fw.contents("etc/rw") == b"\0\0abcd\0\0" and writes == [(2, 4)]


def test_a_dma_write_from_partly_unbacked_memory_copies_what_it_read():
    fw, memory = device(size=0x4000)
    writes = []
    fw.add_file("etc/rw", b"\xEE" * 8, writable=True, on_write=lambda *a: writes.append(a))
    memory.ram[0x3FFC:] = b"abcd"
    control = F.DMA_SELECT | F.DMA_WRITE | fw.selector("etc/rw") << 16
    assert dma(fw, memory, control, 8, 0x3FFC) == F.DMA_ERROR
    assert fw.contents("etc/rw") == b"abcd" + bytes(4) and writes == []     # as QEMU: zeros read


def test_dma_write_to_a_read_only_item_is_refused():
    fw, memory = device()
    fw.add_file("etc/ro", b"12345678")
    memory.ram[0x2000:0x2008] = b"abcdefgh"
    for key in (fw.selector("etc/ro"), F.SIGNATURE, 0x3F, 0xFFFF):
        assert dma(fw, memory, F.DMA_SELECT | F.DMA_WRITE | key << 16, 4, 0x2000) == F.DMA_ERROR
    assert fw.contents("etc/ro") == b"12345678" and fw.contents(F.SIGNATURE) == b"QEMU"


def test_read_wins_over_write():
    fw, memory = device()
    fw.add_file("etc/rw", b"wxyz", writable=True)
    control = F.DMA_SELECT | F.DMA_READ | F.DMA_WRITE | fw.selector("etc/rw") << 16
    assert dma(fw, memory, control, 4, 0x2000) == 0
    assert memory.ram[0x2000:0x2004] == b"wxyz"


# -- q35's SMI feature negotiation --------------------------------------------------------------
@pytest.mark.parametrize("requested, ok", [(0, True), (1, True), (3, True), (7, True), (8, False),
                                           (2, False), (4, False), (5, False), (6, False)])
def test_smi_feature_negotiation(requested, ok):
    fw, memory = device()
    smi = F.SmiFeatures(fw)
    assert fw.contents(F.SMI_SUPPORTED) == struct.pack("<Q", 7)
    memory.ram[0x2000:0x2008] = struct.pack("<Q", requested)
    control = F.DMA_SELECT | F.DMA_WRITE | fw.selector(F.SMI_REQUESTED) << 16
    assert dma(fw, memory, control, 8, 0x2000) == 0
    assert dma(fw, memory, F.DMA_SELECT | F.DMA_READ | fw.selector(F.SMI_OK) << 16, 1, 0x3000) == 0
    assert memory.ram[0x3000] == ok and smi.negotiated == (requested if ok else 0)
    # Once negotiated, it is locked until reset.
    memory.ram[0x2000:0x2008] = struct.pack("<Q", 8)
    dma(fw, memory, control, 8, 0x2000)
    select(fw, fw.selector(F.SMI_OK))
    assert read_bytes(fw, 1) == bytes([ok])
    smi.reset()
    assert not smi.ok and smi.negotiated == 0 and fw.contents(F.SMI_REQUESTED) == bytes(8)


# -- snapshots ----------------------------------------------------------------------------------
def test_state_and_restore():
    fw, memory = device()
    fw.add_file("etc/rw", bytes(4), writable=True)
    smi = F.SmiFeatures(fw)
    select(fw, F.SIGNATURE)
    fw.read(0x510, 1)
    fw.write(0x514, 4, be32(0x12))
    memory.ram[0x2000:0x2004] = b"wxyz"
    state = fw.state()
    assert state == {"key": 0, "offset": 1, "dma_address": 0x12 << 32,
                     "files": {"etc/rw": bytes(4), F.SMI_REQUESTED: bytes(8)}}
    saved_smi = smi.state()
    fw.write(0x514, 4, 0)                  # the high half back to 0
    dma(fw, memory, F.DMA_SELECT | F.DMA_WRITE | fw.selector("etc/rw") << 16, 4, 0x2000)
    memory.ram[0x2000:0x2008] = struct.pack("<Q", 1)
    dma(fw, memory, F.DMA_SELECT | F.DMA_WRITE | fw.selector(F.SMI_REQUESTED) << 16, 8, 0x2000)
    select(fw, fw.selector(F.SMI_OK))
    assert smi.ok and fw.contents("etc/rw") == b"wxyz"
    fw.restore(state)
    smi.restore(saved_smi)
    assert fw.contents("etc/rw") == bytes(4) and not smi.ok and smi.negotiated == 0
    assert read_bytes(fw, 3) == b"EMU" and fw.state() == {**state, "offset": 4}


# -- no guest input raises ----------------------------------------------------------------------
@pytest.mark.parametrize("hint", [False, True])
def test_random_guest_accesses_never_raise(hint):
    rng = random.Random(7)
    fw, memory = device(size=0x3000, rom={1}, hint=hint)
    fw.add_file("etc/rw", bytes(16), writable=True)
    F.SmiFeatures(fw)
    ports = [*range(0x50E, 0x51E)]
    for _ in range(3000):
        port, size = rng.choice(ports), rng.choice((1, 2, 4, 8))
        if rng.random() < 0.5:
            fw.read(port, size)
            continue
        if rng.random() < 0.3:
            control = rng.getrandbits(32) & (0xFFFF001F if rng.random() < 0.8 else 0xFFFFFFFF)
            length = rng.choice((0, 1, 7, 0x1800, 0x10000, rng.getrandbits(32)))
            address = rng.choice((0, 0x2FF0, 0xFFFF_FFFF_FFFF_FFF8, rng.getrandbits(64)))
            if length > 0x100000 and not hint:
                length &= 0xFFFFF     # without the hint, each unbacked page of a zero fill is tried
            at = rng.choice((STRUCT, 0x2FF8, 0x1000, rng.getrandbits(32)))
            if at + 16 <= len(memory.ram):
                memory.ram[at:at + 16] = struct.pack(">IIQ", control, length, address)
            fw.write(0x518, 4, be32(at))
        else:
            fw.write(port, size, rng.getrandbits(8 * size))


# -- through a real guest -----------------------------------------------------------------------
CODE, SIG_OUT, DMA_STRUCT, DIR_OUT = 0x100000, 0x2000, 0x3000, 0x4000


def test_a_guest_reads_the_signature_and_dmas_the_directory():
    m = Machine()
    fw = FwCfg(m.memory)
    fw.register_ports(m.ports)
    F.add_qemu_x86_contents(fw, m.memory.ram_size, m.memory.ram_size, 0, board="q35")
    control, length = F.DMA_SELECT | F.DMA_READ | F.FILE_DIR << 16, 4 + 64 * F.FILE_SLOTS
    source = f"""
        mov dx, 0x510
        xor eax, eax
        out dx, ax                          /* select the signature */
        mov edi, {SIG_OUT:#x}
        mov ecx, 4
    sig:
        in al, dx                           /* data bytes at 0x510 */
        mov [edi], al
        inc edi
        loop sig
        mov dx, 0x514
        in eax, dx                          /* "QEMU" of "QEMU CFG" */
        mov [{SIG_OUT + 4:#x}], eax
        mov dword ptr [{DMA_STRUCT:#x}], {be32(control):#x}
        mov dword ptr [{DMA_STRUCT + 4:#x}], {be32(length):#x}
        mov dword ptr [{DMA_STRUCT + 8:#x}], 0
        mov dword ptr [{DMA_STRUCT + 12:#x}], {be32(DIR_OUT):#x}
        mov dx, 0x518
        mov eax, {be32(DMA_STRUCT):#x}
        out dx, eax                         /* the transfer runs inside the OUT */
        mov ebx, [{DMA_STRUCT:#x}]          /* the control word it wrote back */
        hlt
    """
    m.write_memory(CODE, asm(source, 32, CODE))
    m.boot("protected", CODE)
    result = m.run()
    assert result.stop.reason is StopReason.HLT
    assert m.read_memory(SIG_OUT, 8) == b"QEMUQEMU"
    assert result.regs["rbx"] == 0
    raw = m.read_memory(DIR_OUT, length)
    assert raw == fw.contents(F.FILE_DIR)
    assert struct.unpack(">I", raw[:4])[0] == 8
    assert raw[4 + 64 * 3:4 + 64 * 4] == struct.pack(">IHH56s", 40, 0x23, 0, b"etc/e820")


# -- QEMU's ACPI tables, built again at the firmware's first select (tables.py) ---------------
def seabios_setup(machine, pm_base=0x600):
    """What SeaBIOS programs before it reads the tables: PMBASE (and its enable), and on q35
    PCIEXBAR at 0xB0000000, 256 MiB, enabled."""
    if machine.board.kind == "q35":
        machine.pci.write_config(0, 0x1F, 0, 0x40, 4, pm_base | 1)
        machine.pci.write_config(0, 0x1F, 0, 0x44, 1, 0x80)
        machine.pci.write_config(0, 0, 0, 0x60, 4, 0xB000_0001)
    else:
        machine.pci.write_config(0, 1, 3, 0x40, 4, pm_base | 1)
        machine.pci.write_config(0, 1, 3, 0x80, 1, 0x01)


@pytest.mark.parametrize("board", ["pc", "q35"])
def test_the_recordings_say_what_state_they_were_built_in(board):
    power_on, seabios = tables.recordings(board, 128 << 20)
    assert tables.built_for(power_on) == (0, None)
    assert tables.built_for(seabios) == (0x600, 0xB000_0000 if board == "q35" else None)
    assert ("MCFG" in tables.acpi_tables(seabios["etc/acpi/tables"])) == (board == "q35")


@pytest.mark.parametrize("board", ["pc", "q35"])
@pytest.mark.parametrize("file", ["etc/table-loader", "etc/acpi/rsdp", "etc/acpi/tables"])
def test_the_first_select_serves_the_tables_built_in_the_chipsets_state(board, file):
    machine = Machine(machine=board, memory_size=128 << 20)
    power_on, seabios = tables.recordings(board, 128 << 20)
    fw = machine.board.fw_cfg
    assert fw.contents("etc/acpi/tables") == power_on["etc/acpi/tables"]
    seabios_setup(machine)
    fw.select(fw.selector(file))
    assert fw.contents("etc/acpi/tables") == seabios["etc/acpi/tables"] and machine.board.acpi.matched
    seabios_setup(machine, pm_base=0xB000)             # once only, as acpi_build_update
    fw.select(fw.selector(file))
    assert fw.contents("etc/acpi/tables") == seabios["etc/acpi/tables"]


def test_a_state_nothing_was_recorded_in_gets_the_power_on_tables():
    machine = Machine(machine="q35", memory_size=128 << 20)
    seabios_setup(machine, pm_base=0xB000)
    fw = machine.board.fw_cfg
    fw.select(fw.selector("etc/acpi/tables"))
    assert fw.contents("etc/acpi/tables") == tables.recordings("q35", 128 << 20)[0]["etc/acpi/tables"]
    assert not machine.board.acpi.matched


def test_a_snapshot_before_the_first_select_brings_the_power_on_tables_back():
    machine = Machine(machine="q35", memory_size=128 << 20)
    power_on, seabios = tables.recordings("q35", 128 << 20)
    before = machine.snapshot()
    seabios_setup(machine)
    fw = machine.board.fw_cfg
    fw.select(fw.selector("etc/acpi/rsdp"))
    after = machine.snapshot()
    assert fw.contents("etc/acpi/rsdp") == seabios["etc/acpi/rsdp"]
    machine.restore(before)
    assert fw.contents("etc/acpi/rsdp") == power_on["etc/acpi/rsdp"] and machine.board.acpi.built is None
    machine.restore(after)
    assert fw.contents("etc/acpi/rsdp") == seabios["etc/acpi/rsdp"]
