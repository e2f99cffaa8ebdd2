"""Linear-address access for ringminus's own guest accesses (event delivery, emulated
instructions) and, under a second translation stage (SVM nested paging), for every access
the guest makes: 32-bit, PAE and 4-level paging with the architecture's reserved-bit and
permission checks (SMEP, SMAP), accessed/dirty updates and #PF error codes.

One walker (``walk``) serves both stages: the guest's tables, whose entries live at
guest-physical addresses the second stage translates, and the hypervisor's nested tables
(svm/npt.py).  Reserved bits are KVM's (mmu.c ``__reset_rsvds_bits_mask`` for an AMD CPU
without 1 GiB pages unless the model has them; AMD reserves bit 8 in PML4Es only, KVM commit
5ecad245); 4 MiB pages take address bits 39:32 from bits 20:13 (PSE-40, as QEMU's walker)."""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Protocol

from unicorn import UC_MEM_FETCH, UC_MEM_WRITE, UC_PROT_EXEC, UC_PROT_READ, UC_PROT_WRITE
from unicorn.x86_const import UC_X86_REG_CR0 as X86_CR0, UC_X86_REG_CR3 as X86_CR3

from . import ucinternals
from .cpu import Cpu
from ..arch.control import (CR0_PG, CR0_WP, CR4_PAE, CR4_PSE, CR4_SMAP, CR4_SMEP, EFER_LMA, EFER_NXE,
                            RFLAGS_AC)
from .memory import PhysicalMemory
from ..arch.exceptions import GuestFault, SecondStageFault, Vector

PTE_P, PTE_RW, PTE_US, PTE_A, PTE_D, PTE_PS = 1, 2, 4, 0x20, 0x40, 0x80
PTE_NX = 1 << 63
PF_P, PF_W, PF_U, PF_RSVD, PF_I = 1, 2, 4, 8, 16
ADDRESS_52 = 0x000F_FFFF_FFFF_F000


def _bits(low: int, high: int) -> int:
    """Bits low..high (inclusive) set; none when high < low."""
    return ((1 << (high + 1)) - (1 << low)) if high >= low else 0


class Level(NamedTuple):
    shift: int                  # the address bits this level indexes start here
    index_mask: int
    reserved: int               # bits an entry must not set (a table, or a 4 KiB page)
    large_reserved: int | None  # with PS set: a large page's reserved bits; None: PS is no page size here


class PagingFormat(NamedTuple):
    levels: tuple[Level, ...]   # from the root
    entry_size: int
    root_mask: int              # CR3 (or N_CR3) -> the root table's address
    nx: bool                    # EFER.NXE: bit 63 means no-execute (else it is reserved)
    pae_pdpte: bool             # legacy PAE: the root's entries carry no permissions


@functools.lru_cache(maxsize=64)
def paging_format(cr4: int, efer: int, max_phys_bits: int, gigabyte_pages: bool = False,
                  pml4e_bit8_reserved: bool = True) -> PagingFormat:
    """The tables' format for paging enabled with these CR4 and EFER (and the model's
    MAXPHYADDR and 1 GiB page support; ``pml4e_bit8_reserved``: AMD's rule)."""
    nx = bool(efer & EFER_NXE)
    no_exec_reserved = 0 if nx else PTE_NX
    if efer & EFER_LMA:
        high = no_exec_reserved | _bits(max_phys_bits, 51)
        pdpe_ps = 0 if gigabyte_pages else PTE_PS
        levels = (Level(39, 0x1FF, high | (1 << 8 if pml4e_bit8_reserved else 0) | PTE_PS, None),
                  Level(30, 0x1FF, high | pdpe_ps, high | _bits(13, 29) if gigabyte_pages else None),
                  Level(21, 0x1FF, high, high | _bits(13, 20)),
                  Level(12, 0x1FF, high, None))
        return PagingFormat(levels, 8, ADDRESS_52, nx, False)
    if cr4 & CR4_PAE:
        high = no_exec_reserved | _bits(max_phys_bits, 62)
        levels = (Level(30, 3, PTE_NX | _bits(max_phys_bits, 62) | _bits(5, 8) | _bits(1, 2), None),
                  Level(21, 0x1FF, high, high | _bits(13, 20)),
                  Level(12, 0x1FF, high, None))
        return PagingFormat(levels, 8, 0xFFFF_FFE0, nx, True)
    large = 1 << 21 | _bits(13 + max(max_phys_bits - 32, 0), 20) if cr4 & CR4_PSE else None
    return PagingFormat((Level(22, 0x3FF, 0, large), Level(12, 0x3FF, 0, None)), 4, 0xFFFF_F000, False, False)


class TableFault(Exception):
    """A walk stopped at an entry: not present, or present with reserved bits set."""

    def __init__(self, present: bool, reserved: bool):
        super().__init__("reserved bits" if reserved else "not present")
        self.present = present
        self.reserved = reserved


class Walk(NamedTuple):
    physical: int               # the address the tables give
    entries: list               # (where the entry is, its value) for each level with permissions
    user: bool                  # every level allows user accesses
    writable: bool              # every level allows writes
    executable: bool            # no level forbids execution


def walk(fmt: PagingFormat, root: int, address: int, read_entry: Callable[[int, int], tuple[int, int]]) -> Walk:
    """Walk ``fmt``'s tables from ``root`` for ``address``.  ``read_entry(address, size)``
    gives where an entry is (the second stage may move it) and its value.  No side effects:
    the caller checks permissions, then sets accessed/dirty bits."""
    size = fmt.entry_size
    table = root & fmt.root_mask
    user = writable = executable = True
    entries = []
    last = len(fmt.levels) - 1
    for depth, level in enumerate(fmt.levels):
        at, entry = read_entry(table + ((address >> level.shift) & level.index_mask) * size, size)
        if not entry & PTE_P:
            raise TableFault(False, False)
        large = level.large_reserved is not None and bool(entry & PTE_PS)
        if entry & (level.large_reserved if large else level.reserved):
            raise TableFault(True, True)
        if not (fmt.pae_pdpte and depth == 0):
            user &= bool(entry & PTE_US)
            writable &= bool(entry & PTE_RW)
            executable &= not (fmt.nx and entry & PTE_NX)
            entries.append((at, entry))
        if depth == last or large:
            page_mask = (1 << level.shift) - 1
            if size == 4 and large:
                frame = (entry & 0xFFC0_0000) | ((entry >> 13) & 0xFF) << 32         # PSE-40
            else:
                frame = entry & ADDRESS_52 & ~page_mask
            return Walk(frame | (address & page_mask), entries, user, writable, executable)
        table = entry & (ADDRESS_52 if size == 8 else 0xFFFF_F000)
    raise AssertionError("unreachable")


def set_accessed(phys: PhysicalMemory, entries: list, size: int, dirty: bool) -> None:
    """Accessed in every entry of a walk, dirty in its leaf for a write."""
    for i, (at, value) in enumerate(entries):
        updated = value | PTE_A | (PTE_D if dirty and i == len(entries) - 1 else 0)
        if updated != value:
            phys.write_u(at, size, updated)


class SecondStage(Protocol):
    """Guest-physical to host-physical (svm/npt.NestedPaging): ``translate`` raises
    SecondStageFault; ``table`` marks the guest's own page-table accesses."""

    def translate(self, address: int, write: bool, fetch: bool, table: bool, mark: bool = True) -> int: ...

    def flush(self) -> None: ...                 # drop cached translations (a TLB flush)

    @property
    def generation(self) -> tuple: ...          # changes whenever its translations may have


def pae_pdpte_problem(phys: PhysicalMemory, cr3: int, max_phys_bits: int) -> str | None:
    """Why loading PAE paging's four PDPTEs from ``cr3`` fails, or None: they are loaded
    when PAE paging is turned on, as KVM's load_pdptrs does for MOV CR0/CR3/CR4, RSM and
    VMRUN — not in memory, or a present entry with reserved bits (1-2, 5-8, MAXPHYADDR-63)."""
    table = cr3 & 0xFFFF_FFE0
    raw = phys.read_fast(table, 32)
    if raw is None:
        return f"PAE PDPTEs at {table:#x} are not in memory"
    reserved = ((1 << 64) - (1 << max_phys_bits)) | 0x1E6
    for index in range(4):
        entry = int.from_bytes(raw[8 * index:8 * index + 8], "little")
        if entry & PTE_P and entry & reserved:
            return f"PAE PDPTE {index} ({entry:#x}) has reserved bits set"
    return None


class LinearMemory:
    def __init__(self, cpu: Cpu, phys: PhysicalMemory, max_phys_bits: int = 40):
        self.cpu = cpu
        self.phys = phys
        self.max_phys_bits = max_phys_bits           # (no model has 1 GiB pages: paging_format's default)
        # A feature's second stage (svm/npt.py), while a guest runs under it: every address
        # the guest's paging gives, and every guest page-table entry, is guest-physical.
        self.stage2: SecondStage | None = None
        self._marking = True                # walks set accessed/dirty bits (not Unicorn's own lookups)
        # Instruction fetches for decoding reuse translations, as a CPU's TLB does: keyed by
        # CR3, page and the second stage's translations (its ``generation``), dropped by
        # flush() (each run, and whenever ringminus writes memory).
        # Each entry keeps its leaf entry's bytes, compared with a fresh read on every hit, so
        # a remapped page (a PTE rewritten, even without INVLPG or across a world switch) is
        # walked afresh.  Entries: (frame, leaf address, leaf size, leaf bytes).
        self._code_tlb: dict[tuple[int, int], tuple[int, int, int, bytes]] = {}
        self._cpu_tlb = ucinternals.FetchTranslator(cpu.uc)

    def flush(self) -> None:
        """Drop every cached translation: the decoding TLB's and the second stage's."""
        self._code_tlb.clear()
        if self.stage2 is not None:
            self.stage2.flush()

    def fetch(self, linear: int, size: int, cr0: int | None = None, cr3: int | None = None) -> bytes | None:
        """Up to ``size`` instruction bytes at ``linear`` (fewer at an unmapped page), or None
        when the first byte is unmapped.  No permission checks: the CPU is executing there.
        Callers that hold CR0/CR3 already pass them."""
        paged = (self.cpu.fast.read(X86_CR0) if cr0 is None else cr0) & CR0_PG
        if (linear & 0xFFF) + size <= 0x1000 and self.stage2 is None:       # the common case: one page
            if not paged:
                return self.phys.read_fast(linear & 0xFFFF_FFFF, size)
            frame = self._code_frame(self.cpu.fast.read(X86_CR3) if cr3 is None else cr3, linear)
            return None if frame is None else self.phys.read_fast(frame | (linear & 0xFFF), size)
        cr3 = (self.cpu.fast.read(X86_CR3) if cr3 is None else cr3) if paged else 0
        out = b""
        for page_linear, count in self._chunks(linear, size):
            if paged:
                frame = self._code_frame(cr3, page_linear)
                if frame is None:
                    break
                physical = frame | (page_linear & 0xFFF)
            else:                                   # no paging: no long mode either
                physical = (page_linear & 0xFFFF_FFFF if self.stage2 is None
                            else self.physical_as_executed(page_linear & 0xFFFF_FFFF))
                if physical is None:
                    break
            chunk = self.phys.read_fast(physical, count)
            if chunk is None:
                break
            out += chunk
        return out or None

    def fetch_as_executed(self, linear: int, size: int) -> tuple[bytes | None, bool]:
        """Up to ``size`` instruction bytes at ``linear`` as the CPU fetched them: through
        QEMU's TLB, which may still hold a translation the guest's tables no longer give
        (rewritten without INVLPG), where ``fetch`` walks them afresh.  Also whether QEMU had
        to walk them too and failed: its #PF for this fetch is then pending.  (Under a second
        stage ringminus fills QEMU's TLB itself: what ``fetch`` cannot reach, it never ran.)"""
        if self.stage2 is not None:
            return self.fetch(linear, size), False
        out = b""
        for page_linear, count in self._chunks(linear, size):
            physical = self._cpu_tlb(page_linear)
            if physical is None:
                return out or None, True
            chunk = self.phys.read_fast(physical, count)
            if chunk is None:
                break
            out += chunk
        return out or None, False

    def physical_as_executed(self, linear: int) -> int | None:
        """Where the CPU fetched ``linear`` from: QEMU's TLB entry (uc_vmem_translate), or
        under a second stage ringminus's walk (a probe of QEMU's TLB would call the fill hook
        outside any access)."""
        if self.stage2 is None:
            return self._cpu_tlb(linear)
        try:
            return self.translate(linear, fetch=True, check=False)
        except (GuestFault, SecondStageFault):
            return None

    def _code_frame(self, cr3: int, linear: int) -> int | None:
        key = (cr3, linear >> 12, None if self.stage2 is None else self.stage2.generation)
        cached = self._code_tlb.get(key)
        if cached is not None:
            frame, leaf_address, leaf_size, leaf = cached
            if self.phys.read_fast(leaf_address, leaf_size) == leaf:
                return frame
        state = self.cpu.paging_state()
        try:
            walked = []
            frame = self.translate(linear, walked=walked, check=False, state=state) & ~0xFFF
        except (GuestFault, SecondStageFault):
            return None
        (leaf_address, leaf), leaf_size = walked[-1], 8 if state[2] & CR4_PAE or state[3] & EFER_LMA else 4
        self._code_tlb[key] = (frame, leaf_address, leaf_size, (leaf | PTE_A).to_bytes(leaf_size, "little"))
        return frame

    def _read_entry(self, address: int, size: int) -> tuple[int, int]:
        """A guest page-table entry: the second stage translates its address as a write
        (the CPU may set accessed/dirty bits there: APM §15.25.5, QEMU's ptw_translate)."""
        if self.stage2 is not None:
            address = self.stage2.translate(address, True, False, True, self._marking)
        raw = self.phys.read_fast(address, size)
        # A walk through memory nothing backs reads zeros (not present), as QEMU's
        # unassigned reads and Unicorn's own walks do: the guest gets its #PF.
        return address, 0 if raw is None else int.from_bytes(raw, "little")

    def translate(self, linear: int, write: bool = False, user: bool = False, fetch: bool = False,
                  walked: list | None = None, check: bool = True, state: tuple | None = None) -> int:
        """The host-physical address of an access to ``linear``: #PF (GuestFault) as the
        guest's paging refuses it, SecondStageFault as the second stage does.  ``check``
        False: no permission checks and no dirty bit (a fetch for decoding: the CPU runs
        there already)."""
        cr0, cr3, cr4, efer, _cpl = self.cpu.paging_state() if state is None else state
        if not efer & EFER_LMA:
            linear &= 0xFFFF_FFFF
        if not cr0 & CR0_PG:
            return linear if self.stage2 is None else self.stage2.translate(linear, write, fetch, False, self._marking)
        fmt = paging_format(cr4, efer, self.max_phys_bits)
        smep = bool(cr4 & CR4_SMEP)
        error = (PF_W if write else 0) | (PF_U if user else 0) | (PF_I if fetch and (fmt.nx or smep) else 0)
        try:
            result = walk(fmt, cr3, linear, self._read_entry)
        except TableFault as fault:
            raise GuestFault(Vector.PF, error | (PF_P if fault.present else 0) | (PF_RSVD if fault.reserved else 0),
                             cr2=linear) from None
        if walked is not None:
            walked.extend(result.entries)
        if check and not self._permitted(result, write, user, fetch, cr0, cr4):
            raise GuestFault(Vector.PF, error | PF_P, cr2=linear)
        physical = result.physical
        if self.stage2 is not None:
            physical = self.stage2.translate(physical, write, fetch, False, self._marking)
        if self._marking:
            set_accessed(self.phys, result.entries, fmt.entry_size, write and check)
        return physical

    def _permitted(self, result: Walk, write: bool, user: bool, fetch: bool, cr0: int, cr4: int) -> bool:
        if user:
            return result.user and (result.writable or not write) and (result.executable or not fetch)
        if write and not result.writable and cr0 & CR0_WP:
            return False
        if fetch:
            return result.executable and not (result.user and cr4 & CR4_SMEP)
        # SMAP: a supervisor data access to a user page, unless RFLAGS.AC allows it.
        return not (result.user and cr4 & CR4_SMAP and not self.cpu["rflags"] & RFLAGS_AC)

    def fill(self, page: int, access: int) -> tuple[int, int]:
        """Unicorn's TLB miss at linear ``page`` under a second stage (UC_HOOK_TLB_FILL):
        the host page and what the entry allows — the access asked for (a write also reads),
        so that a later write comes back here to set the dirty bits.  CPL 3 makes a user
        access (the hook is not told of QEMU's implicit supervisor accesses)."""
        write, fetch = access == UC_MEM_WRITE, access == UC_MEM_FETCH
        state = self.cpu.paging_state()
        physical = self.translate(page, write, state[4] == 3, fetch, state=state)
        return physical, UC_PROT_READ | UC_PROT_WRITE if write else UC_PROT_EXEC if fetch else UC_PROT_READ

    def look_up(self, page: int, access: int) -> tuple[int, int]:
        """``fill`` for a lookup Unicorn makes outside any access (dropping the translations
        of an address: hook_del, ctl_remove_cache): the same walk, but it marks nothing as
        accessed and its refusal (GuestFault, SecondStageFault) is no fault."""
        self._marking = False
        try:
            return self.fill(page, access)
        finally:
            self._marking = True

    def _chunks(self, linear: int, size: int):
        while size:
            step = min(size, 0x1000 - (linear & 0xFFF))
            yield linear, step
            linear += step
            size -= step

    def read(self, linear: int, size: int, user: bool = False) -> bytes:
        return b"".join(self.phys.read(self.translate(a, user=user), n) for a, n in self._chunks(linear, size))

    def write(self, linear: int, data: bytes, user: bool = False) -> None:
        # Translate every page first: a fault on the second page must leave the first untouched.
        targets = [(self.translate(a, write=True, user=user), n) for a, n in self._chunks(linear, len(data))]
        offset = 0
        for physical, n in targets:
            self.phys.write(physical, data[offset:offset + n])
            offset += n

    def read_u(self, linear: int, size: int, user: bool = False) -> int:
        return int.from_bytes(self.read(linear, size, user), "little")
