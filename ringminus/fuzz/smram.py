"""Campaign ``smram``: SMRAM isolation against a Python model of what every access must see.

One run fills each SMRAM range (the A-segment 0xA0000-0xBFFFF and TSEG-style ranges, inside
RAM or beyond it) and the RAM behind it with different random bytes, places small callees
(``mov al, MARKER; out 0xe9, al; ret`` — the same bytes mean the same in 16-, 32- and 64-bit
code) with one marker in SMRAM and another in the RAM behind, sets the chipset open, closed
or locked, and runs a guest in protected or long mode through phases

    outside  --out 0xb2-->  SMM handler (RSM)  -->  outside  [--> SMM --> outside]  --> exit

Each phase is a list of steps, generated once and run as guest code: reads and writes of 1,
2, 4 and 8 bytes at addresses that straddle page edges and SMRAM range edges (results go to
slots in plain RAM), calls of the callees (their markers go to the debug console), and
writes and reads of the host bridge's SMRAM register through 0xCF8/0xCFC.  A breakpoint stops
the run between phases, where Python compares the result slots, the console, the view the
API shows (``read_view``) and the SMRAM buffers against the model, and may change the
chipset state through the API.

The model is written from the documented rules (smm/smram.py, README "System Management
Mode"), not from ringminus's code: a range is SMRAM while it exists (the A-segment only while
G_SMRAME is set); SMRAM shows in SMM, or outside it while D_OPEN is set and D_CLS clear;
otherwise the address shows the RAM behind it, or nothing (the run stops with ``memory``).
D_LCK clears D_OPEN and freezes D_OPEN, D_LCK and G_SMRAME until reset.  Any difference is
Finding("isolation").
"""
from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field

from . import Finding
from .streams import MB, RUN_TIMEOUT, check_run
from ..emulator import StopReason
from ..machine import Machine
from ..intercepts.profiles import PROFILES
from ..smm import layouts as L

D_OPEN, D_CLS, D_LCK, G_SMRAME, C_BASE_SEG = 0x40, 0x20, 0x10, 0x08, 0x02
ASEG = (0xA0000, 0xC0000)
SMRAM_REGISTER = {"q35": 0x9D, "pc": 0x72}          # host bridge (00:00.0) config offset
CODE_AT = 0x100000
RESULTS_AT = 0x180000                                # one 8-byte slot per step
CONSTANTS_AT = 0x170000                              # 8-byte values the x87 stores write
SLOT = 8
CALLEE = b"\xb0%c\xe6\xe9\xc3"                      # mov al, MARKER; out 0xe9, al; ret
RSM, APM_OUT, EXIT = b"\x0f\xaa", b"\xe6\xb2", b"\xe6\xf4"
BUDGET = 20000
STATES = {"open": G_SMRAME | D_OPEN, "closed": G_SMRAME, "locked": G_SMRAME | D_LCK}


# -- the model ------------------------------------------------------------------------------------

@dataclass
class Range:
    base: int
    end: int
    gated: bool                                      # the A-segment: SMRAM only while G_SMRAME
    data: bytearray = field(default_factory=bytearray)


class Unbacked(Exception):
    """The model's answer for an access that no memory backs: the run stops with ``memory``."""


class Model:
    """What the CPU must see at each physical address (module docstring)."""

    def __init__(self, ram: bytearray, ranges: list[Range]):
        self.ram, self.ranges = ram, ranges
        self.register = C_BASE_SEG                   # reset: SMRAM disabled (as QEMU)
        self.unknown: set[tuple[str, int]] = set()   # ("ram"|range index, address) the model cannot know

    # the control register, by its documented rules
    def write_register(self, value: int) -> None:
        value = (value & (D_OPEN | D_CLS | D_LCK | G_SMRAME)) | C_BASE_SEG
        if self.register & D_LCK:
            value = (value & D_CLS) | (self.register & (D_LCK | G_SMRAME)) | C_BASE_SEG
        if value & D_LCK:
            value &= ~D_OPEN
        self.register = value

    def set_state(self, state: str) -> bool:
        """The API's set_state; False where the rules refuse it (locked until reset)."""
        if self.register & D_LCK and state != "locked":
            return False
        self.write_register(STATES[state])
        return True

    def _smram_shows(self, smram: Range, in_smm: bool) -> bool:
        if smram.gated and not self.register & G_SMRAME:
            return False
        return in_smm or bool(self.register & D_OPEN and not self.register & D_CLS)

    def where(self, address: int, in_smm: bool) -> tuple[object, int]:
        """(buffer key, index) of the byte the CPU sees at ``address``."""
        for number, smram in enumerate(self.ranges):
            if smram.base <= address < smram.end and self._smram_shows(smram, in_smm):
                return number, address - smram.base
        if address < len(self.ram):
            return "ram", address
        raise Unbacked(address)

    def buffer(self, key):
        return self.ram if key == "ram" else self.ranges[key].data

    def read(self, address: int, size: int, in_smm: bool) -> int | None:
        """The value a read sees; None where some byte is unknown."""
        places = [self.where(address + i, in_smm) for i in range(size)]
        if any((key, at) in self.unknown for key, at in places):
            return None
        return int.from_bytes(bytes(self.buffer(key)[at] for key, at in places), "little")

    def write(self, address: int, size: int, value: int, in_smm: bool) -> None:
        places = [self.where(address + i, in_smm) for i in range(size)]
        for i, (key, at) in enumerate(places):
            self.buffer(key)[at] = (value >> (8 * i)) & 0xFF
            self.unknown.discard((key, at))

    def forget(self, address: int, size: int, in_smm: bool) -> None:
        """The bytes at ``address`` as the CPU sees them now become unknown (the SMI's map)."""
        for i in range(size):
            try:
                self.unknown.add(self.where(address + i, in_smm))
            except Unbacked:
                pass


# -- steps and their code ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Step:
    kind: str                 # read, write, call, pci_write, pci_read
    address: int = 0
    size: int = 0
    value: int = 0
    slot: int = -1            # result slot (read, pci_read)


def _operand_prefix(bits: int, size: int) -> bytes:
    if size == 2:
        return b"" if bits == 16 else b"\x66"
    if size == 4:
        return b"\x66" if bits == 16 else b""
    return b"\x48" if size == 8 else b""


def _moffs(bits: int, opcode: int, size: int, address: int) -> bytes:
    """mov acc, [moffs] (A0/A1) or mov [moffs], acc (A2/A3) — every mode, no ModRM."""
    prefix = _operand_prefix(bits, size)
    opcode += 0 if size == 1 else 1
    if bits == 64:
        return prefix + bytes([opcode]) + struct.pack("<Q", address)
    return (b"\x67" if bits == 16 else b"") + prefix + bytes([opcode]) + struct.pack("<I", address)


def _mov_acc(bits: int, size: int, value: int) -> bytes:
    if size == 1:
        return bytes([0xB0, value & 0xFF])
    prefix = _operand_prefix(bits, size)
    width = {2: "<H", 4: "<I", 8: "<Q"}[size]
    return prefix + b"\xb8" + struct.pack(width, value & ((1 << 8 * size) - 1))


def _x87(bits: int, reg_field: int, address: int) -> bytes:
    """fild/fistp qword [disp32] (DF /5, DF /7): one 8-byte access outside 64-bit mode."""
    return (b"\x67" if bits == 16 else b"") + bytes([0xDF, (reg_field << 3) | 5]) + struct.pack("<I", address)


def _mov_dx(bits: int, port: int) -> bytes:
    return (b"" if bits == 16 else b"\x66") + b"\xba" + struct.pack("<H", port)


def step_code(step: Step, bits: int, smbase: int) -> bytes:
    slot = RESULTS_AT + SLOT * step.slot
    if step.kind == "read":
        if step.size == 8 and bits != 64:
            return _x87(bits, 5, step.address) + _x87(bits, 7, slot)
        return _moffs(bits, 0xA0, step.size, step.address) + _moffs(bits, 0xA2, step.size, slot)
    if step.kind == "write":
        if step.size == 8 and bits != 64:
            return _x87(bits, 5, CONSTANTS_AT + SLOT * step.slot) + _x87(bits, 7, step.address)
        return _mov_acc(bits, step.size, step.value) + _moffs(bits, 0xA2, step.size, step.address)
    if step.kind == "call":
        target = step.address - smbase if bits == 16 else step.address
        return (b"\xb8" + struct.pack("<H", target) if bits == 16 else b"\xb8" + struct.pack("<I", target)) + b"\xff\xd0"
    select = _mov_acc(bits, 4, step.address) + _mov_dx(bits, 0xCF8) + (b"\x66\xef" if bits == 16 else b"\xef")
    if step.kind == "pci_write":
        port = 0xCFC + step.value                    # value: which data port; size: the OUT's width
        out = {1: b"\xee", 2: b"\xef" if bits == 16 else b"\x66\xef", 4: b"\x66\xef" if bits == 16 else b"\xef"}
        return select + _mov_acc(bits, step.size, step.slot) + _mov_dx(bits, port) + out[step.size]
    return select + _mov_dx(bits, 0xCFC + step.value) + b"\xec" + _moffs(bits, 0xA2, 1, slot)   # pci_read


# -- one run ------------------------------------------------------------------------------------------

class Run:
    def __init__(self, seed: int):
        rng = self.rng = random.Random(seed)
        self.chipset = rng.choice(("q35", "pc"))
        cpu_model = rng.choice(("qemu64", "qemu32"))
        self.mode = rng.choice(("protected", "long") if cpu_model == "qemu64" else ("protected",))
        self.bits = 64 if self.mode == "long" else 32
        self.ram_size = rng.choice((2 * MB, 4 * MB, 16 * MB))
        self.machine = Machine(memory_size=self.ram_size, cpu_model=cpu_model, chipset=self.chipset,
                               profile=rng.choice(sorted(PROFILES)), apm_smi=True)
        self.ranges = [Range(*ASEG, gated=True)]
        for _ in range(rng.choice((0, 1, 1, 2))):
            self._add_tseg()
        self.slots = 0
        self.deferred: Finding | None = None          # a contract finding that does not stop the checks
        self.console: list[int] = []
        self.callees: list[int] = []

    def _add_tseg(self) -> None:
        rng, ram = self.rng, self.ram_size
        size = rng.choice((0x1000, 0x2000, 0x10000, 0x20000))
        base = rng.choice((ram - size, ram - size - 0x3000, ram, ram + 0x5000, 0x400000 - size, 0x300000))
        if base < 0x200000 or base + size > 1 << 30:     # clear of the code, slots and constants
            return
        if any(base < r.end + 0x1000 and r.base < base + size + 0x1000 for r in self.ranges):
            return
        self.machine.smram.add_range(base, size)
        self.ranges.append(Range(base, base + size, gated=False))

    # -- setting up --------------------------------------------------------------------------
    def _fill(self) -> None:
        """Random bytes in every range and the RAM behind and around it; the callees."""
        rng, machine = self.rng, self.machine
        for number, smram in enumerate(self.ranges):
            smram.data = bytearray(rng.randbytes(smram.end - smram.base))
            for low, high in ((smram.base - 0x1000, smram.base), (smram.base, smram.end), (smram.end, smram.end + 0x1000)):
                low, high = max(low, 0), min(high, self.ram_size)
                if low < high:
                    machine.write_memory(low, rng.randbytes(high - low))
        for _ in range(rng.randint(1, 4)):              # callees: SMRAM and RAM variants, one address
            smram = rng.choice(self.ranges)
            address = rng.choice((smram.base, smram.base + 0x8000, smram.end - 0x10, smram.base + 0xFF0,
                                  smram.base - 0x10)) + rng.randrange(8)
            if address < 0x1000 or any(abs(address - other) < 16 for other in self.callees) \
                    or self._overlaps(address, 5, (self.save_area, self.handler_span)):
                continue
            self.callees.append(address)
            marker = 0x40 + 2 * len(self.callees)
            for number, other in enumerate(self.ranges):
                if other.base <= address and address + 5 <= other.end:
                    other.data[address - other.base:address - other.base + 5] = CALLEE % (marker + 1)
            if address + 5 <= self.ram_size:
                machine.write_memory(address, CALLEE % marker)
        # The map's place starts zeroed in both views: a QEMU-style entry keeps the bytes it
        # does not write, and what RSM makes of stale ones is the savemap campaign's business.
        low, high = self.save_area
        for smram in self.ranges:
            if smram.base <= low < smram.end:
                smram.data[low - smram.base:high - smram.base] = bytes(high - low)
            machine.load_smram(smram.base, bytes(smram.data))
        if high <= self.ram_size:
            machine.write_memory(low, bytes(high - low))

    def _place_handler(self) -> None:
        """SMBASE in plain RAM, in the A-segment or in a TSEG range; the handler goes to both
        views of its address (same bytes), so it runs whatever the chipset shows in SMM."""
        rng = self.rng
        choices = [L.DEFAULT_SMBASE, 0xA0000 - L.ENTRY_OFFSET]
        choices += [r.base for r in self.ranges[1:] if r.end - r.base >= 0x10000]
        self.smbase = rng.choice(choices)
        self.machine.set_smbase(self.smbase)
        self.save_area = (self.smbase + L.SAVE_AREA, self.smbase + L.SAVE_AREA + L.SAVE_AREA_SIZE)

    def _reserved(self, address: int, size: int) -> bool:
        """Bytes the steps must not write: the callees, the handler, the save map."""
        return self._overlaps(address, size, [(c, c + 5) for c in self.callees] + [self.save_area, self.handler_span])

    @staticmethod
    def _overlaps(address: int, size: int, spans) -> bool:
        return any(address < high and low < address + size for low, high in spans)

    def _address(self) -> int:
        rng = self.rng
        smram = rng.choice(self.ranges)
        edge = rng.choice((smram.base, smram.end, smram.base + 0x1000 * rng.randrange(1, 4),
                           smram.end - 0x1000, smram.base + rng.randrange(smram.end - smram.base)))
        return max(0x1000, edge + rng.randrange(-8, 8))

    def _steps(self, in_smm: bool, count: int) -> list[Step]:
        rng, steps = self.rng, []
        sizes = (1, 2, 4, 8)
        for _ in range(count):
            kind = rng.choices(("read", "write", "call", "pci_write", "pci_read"), (8, 5, 2, 1, 1))[0]
            if kind == "call":
                reachable = [c for c in self.callees if not in_smm or 0 <= c - self.smbase <= 0xFFF0]
                if reachable:
                    steps.append(Step("call", rng.choice(reachable)))
                continue
            if kind in ("pci_write", "pci_read"):
                offset = SMRAM_REGISTER[self.chipset]
                size = rng.choice((1, 1, 2, 4)) if kind == "pci_write" else 1
                port = offset & 3 if size == 1 or kind == "pci_read" else (offset & 3) & ~(size - 1)
                value = rng.choice((G_SMRAME, G_SMRAME | D_OPEN, G_SMRAME | D_LCK, G_SMRAME | D_OPEN | D_CLS,
                                    D_OPEN, 0, rng.getrandbits(8)))
                if in_smm and kind == "pci_write" and self.smbase == 0xA0000 - L.ENTRY_OFFSET:
                    continue        # G_SMRAME must stay as the SMI found it: RSM reads the map in that view
                shift = 8 * ((offset & 3) - port)
                wide = (rng.getrandbits(8 * size) & ~(0xFF << shift)) | (value << shift)
                steps.append(Step(kind, 0x8000_0000 | (offset & 0xFC), size, port, self._slot(wide)
                                  if kind == "pci_write" else self._slot()))
                continue
            size = rng.choice(sizes if self.bits == 64 or True else sizes[:3])
            address = self._address()
            if kind == "write" and self._reserved(address, size):
                kind = "read"
            if kind == "read" and (self.save_area[0] - 8 < address < self.save_area[1]):
                continue
            value = rng.getrandbits(8 * size)
            slot = self._slot()
            if kind == "write" and size == 8 and (self.bits != 64 or in_smm):
                self.constants[slot] = value
            steps.append(Step(kind, address, size, value, slot))
        return steps

    def _slot(self, value: int | None = None) -> int:
        """A new result slot (``value``: for a pci_write, the slot holds the value written)."""
        self.slots += 1
        return self.slots - 1 if value is None else value

    # -- the program ------------------------------------------------------------------------
    def build(self) -> None:
        rng, machine = self.rng, self.machine
        self.constants: dict[int, int] = {}
        self._place_handler()
        handler_address = self.smbase + L.ENTRY_OFFSET
        self.handler_span = (handler_address, handler_address + 0x400)
        self._fill()
        smis = rng.choice((1, 1, 2))
        self.outside = [self._steps(False, rng.randint(0, 12)) for _ in range(smis + 1)]
        self.smm = self._steps(True, rng.randint(0, 12))
        handler = b"".join(step_code(s, 16, self.smbase) for s in self.smm) + RSM
        if len(handler) > 0x400:
            raise AssertionError("SMM handler larger than its reserved span")
        code, self.returns = b"", []
        for number, steps in enumerate(self.outside):
            code += b"".join(step_code(s, self.bits, self.smbase) for s in steps)
            if number < smis:
                code += APM_OUT
                self.returns.append(CODE_AT + len(code))
                code += b"\x90"       # the breakpoint's instruction: not the exit OUT (fuzz-findings M2)
        code += EXIT
        machine.write_memory(CODE_AT, code)
        for slot, value in self.constants.items():
            machine.write_memory(CONSTANTS_AT + SLOT * slot, struct.pack("<Q", value))
        machine.write_memory(RESULTS_AT, bytes(SLOT * max(self.slots, 1)))
        # The handler into both views of its address (where there is RAM behind it).
        if handler_address + len(handler) <= self.ram_size:
            machine.write_memory(handler_address, handler)
        for smram in self.ranges:
            if smram.base <= handler_address < smram.end:
                machine.load_smram(handler_address, handler)
                smram.data[handler_address - smram.base:handler_address - smram.base + len(handler)] = handler
        machine.boot(self.mode, CODE_AT, rng.choice((0, 0, 3)))
        ram = bytearray(machine.memory.ram.tobytes())
        self.model = Model(ram, self.ranges)
        start = rng.choice(("reset", "open", "closed", "locked", "locked"))
        if start != "reset":
            machine.smram.set_state(start)
            self.model.set_state(start)
        machine.break_at(handler_address)
        for address in self.returns:
            machine.break_at(address)

    # -- running and checking ---------------------------------------------------------------------
    def simulate(self, steps: list[Step], in_smm: bool) -> int | None:
        """Apply ``steps`` to the model; the index of the step that must stop the run with
        ``memory`` (None: all complete).  Read results are kept for the comparison."""
        model = self.model
        for index, step in enumerate(steps):
            try:
                if step.kind == "read":
                    self.expected_slots[step.slot] = (model.read(step.address, step.size, in_smm), step)
                elif step.kind == "write":
                    model.write(step.address, step.size, step.value, in_smm)
                elif step.kind == "call":
                    code = model.read(step.address, 5, in_smm)
                    if code is None:
                        raise AssertionError("callee bytes unknown")
                    marker = code.to_bytes(5, "little")[1]
                    self.console.append(marker)
                elif step.kind == "pci_write":
                    offset = SMRAM_REGISTER[self.chipset]
                    model.write_register((step.slot >> (8 * ((offset & 3) - step.value))) & 0xFF)
                else:
                    self.expected_slots[step.slot] = (model.register, step)
            except Unbacked:
                return index
        return None

    def compare(self, where: str, in_smm: bool, views: bool = True) -> None:
        """Slots, console and register against the model; with ``views``, also the SMRAM
        buffers and what ``read_view`` shows around every range."""
        machine, model = self.machine, self.model
        results = machine.read_memory(RESULTS_AT, SLOT * max(self.slots, 1))
        for slot, (value, step) in self.expected_slots.items():
            if value is None:
                continue
            size = step.size if step.kind == "read" else 1
            got = int.from_bytes(results[SLOT * slot:SLOT * slot + size], "little")
            if got != value and step.kind == "pci_read":
                # Only observed, never used by the guest: note it, and go on checking isolation.
                self.deferred = self.deferred or Finding(
                    "contract", f"{where}: SMRAM register read saw {got:#x}, the model {value:#x}",
                    key="SMRAM register read differs from the register")
            elif got != value:
                raise Finding("isolation", f"{where}: {size}-byte read at {step.address:#x} "
                              f"({self._describe(step.address, in_smm)}) saw {got:#x}, the model {value:#x} "
                              f"(register {model.register:#04x})", key="guest read differs")
        self.expected_slots.clear()
        console = list(machine.console.output)
        if console != self.console:
            raise Finding("isolation", f"{where}: callees printed {bytes(console).hex()}, the model "
                          f"{bytes(self.console).hex()} (register {model.register:#04x})", key="code view differs")
        if (machine.smram.register | C_BASE_SEG) != model.register:
            raise Finding("isolation", f"{where}: SMRAM register {machine.smram.register:#04x}, the model "
                          f"{model.register:#04x}", key="SMRAM register differs")
        if not views:
            return
        for number, smram in enumerate(self.ranges):      # the SMRAM buffers themselves
            self._same(machine.smram.ranges[number].data.tobytes(), smram.data, number, 0,
                       f"{where}: SMRAM at {{:#x}}", smram.base, "SMRAM contents differ")
        for smram in self.ranges:                         # the view the API shows, page by page
            for page in range(max(smram.base - 0x1000, 0), smram.end + 0x1000, 0x1000):
                try:
                    key, index = model.where(page, in_smm)  # ranges are whole pages: one source per page
                except Unbacked:
                    key, index, expected = None, 0, b"\xff" * 0x1000   # read_view: 0xFF where nothing is mapped
                else:
                    expected = model.buffer(key)[index:index + 0x1000]
                self._same(machine.read_view(page, 0x1000), expected, key, index,
                           f"{where}: read_view({{:#x}}) ({self._describe(page, in_smm)})", page, "read_view differs")

    def _same(self, got: bytes, expected, key, index: int, what: str, base: int, finding_key: str) -> None:
        if got == bytes(expected):
            return
        for at in range(len(got)):
            if got[at] != expected[at] and (key, index + at) not in self.model.unknown:
                raise Finding("isolation", what.format(base + at) + f" is {got[at]:#04x}, the model "
                              f"{expected[at]:#04x} (register {self.model.register:#04x})", key=finding_key)

    def _describe(self, address: int, in_smm: bool) -> str:
        try:
            key, _ = self.model.where(address, in_smm)
        except Unbacked:
            return "unbacked"
        return ("SMM" if in_smm else "outside SMM") + (", RAM" if key == "ram" else f", SMRAM range {key}")

    def run(self) -> None:
        machine, model, rng = self.machine, self.model, self.rng
        self.expected_slots: dict[int, tuple[int | None, Step]] = {}
        for number, steps in enumerate(self.outside):
            stop_at = self.simulate(steps, in_smm=False)
            result = _bounded_run(machine)
            if self._ended(result, stop_at, f"outside phase {number}"):
                return
            if number == len(self.outside) - 1:
                if result.stop.reason is not StopReason.EXIT:
                    raise Finding("isolation", f"the last phase ended with {result.stop.reason.value}, not exit "
                                  f"(detail {result.stop.detail!r})", key=f"unexpected {result.stop.reason.value}")
                self.compare("at the end", in_smm=False)
                return
            self._expect_breakpoint(result, "the SMI handler", in_smm=True)
            model.forget(self.save_area[0], L.SAVE_AREA_SIZE, in_smm=True)   # the SMI wrote its map
            self.compare(f"after outside phase {number} (in SMM)", in_smm=True)
            stop_at = self.simulate(self.smm, in_smm=True)
            result = _bounded_run(machine)
            if self._ended(result, stop_at, "the SMM phase"):
                return
            self._expect_breakpoint(result, "the return from RSM", in_smm=False)
            self.compare(f"after SMM phase {number} (outside SMM)", in_smm=False)
            if rng.random() < 0.4:                        # the API changes the chipset state
                state = rng.choice(tuple(STATES))
                allowed = model.set_state(state)
                try:
                    machine.smram.set_state(state)
                except ValueError:
                    if allowed:
                        raise Finding("isolation", f"set_state({state!r}) refused with register "
                                      f"{model.register:#04x}", key="set_state refused") from None
                else:
                    if not allowed:
                        raise Finding("isolation", f"set_state({state!r}) accepted though SMRAM is locked",
                                      key="lock not held")

    def _expect_breakpoint(self, result, what: str, in_smm: bool) -> None:
        if result.stop.reason is not StopReason.BREAKPOINT or result.smm["smm"] != in_smm:
            raise Finding("isolation", f"expected to reach {what}, the run ended with {result.stop.reason.value} "
                          f"at rip {result.stop.rip:#x} (detail {result.stop.detail!r}, smm {result.smm['smm']})",
                          key=f"{result.stop.reason.value} before {what}")

    def _ended(self, result, stop_at: int | None, phase: str) -> bool:
        """True when the phase had to end with ``memory`` (and did); the slots before it are
        compared then."""
        if stop_at is None:
            if result.stop.reason is StopReason.MEMORY:
                raise Finding("isolation", f"{phase}: the run stopped with memory at {result.stop.value:#x}, "
                              f"the model sees every access backed", key="unexpected memory stop")
            return False
        if result.stop.reason is not StopReason.MEMORY:
            raise Finding("isolation", f"{phase}: step {stop_at} must find no memory (register "
                          f"{self.model.register:#04x}), the run ended with {result.stop.reason.value}",
                          key="unbacked access not stopped")
        self.compare(f"{phase}, stopped by memory", in_smm=self.machine.smm.in_smm, views=False)
        return True


class HostStalled(Exception):
    """A run of a few hundred instructions met its wall-clock timeout: the host stalled (it
    was suspended, say).  Nothing to compare: the seed is inconclusive."""


def _bounded_run(machine: Machine):
    before = (machine.instructions, len(machine.events))
    result = machine.run(max_instructions=BUDGET, timeout=RUN_TIMEOUT)
    if result.stop.reason is StopReason.TIMEOUT and result.instructions is not None \
            and result.instructions - before[0] + len(result.event_log) - before[1] <= BUDGET:
        raise HostStalled(f"timeout at rip {result.stop.rip:#x} before the run's bound")
    check_run(machine, result, before=before, budget=BUDGET)
    return result


def one_run(seed: int) -> None:
    run = Run(seed)
    run.build()
    try:
        run.run()
    except HostStalled:
        return
    if run.deferred is not None:
        raise run.deferred
