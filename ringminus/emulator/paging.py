"""Linear-address access for ringminus's own guest accesses (event delivery, emulated
instructions): 32-bit, PAE and 4-level paging with the architecture's permission checks,
accessed/dirty updates and #PF error codes."""
from __future__ import annotations

from unicorn.x86_const import UC_X86_REG_CR0 as X86_CR0, UC_X86_REG_CR3 as X86_CR3

from . import ucinternals
from .cpu import Cpu
from ..arch.control import CR0_PG, CR0_WP, CR4_PAE, CR4_PSE, EFER_LMA, EFER_NXE
from .memory import PhysicalMemory
from ..arch.exceptions import GuestFault, Vector

PTE_P, PTE_RW, PTE_US, PTE_A, PTE_D, PTE_PS = 1, 2, 4, 0x20, 0x40, 0x80
PTE_NX = 1 << 63
PF_P, PF_W, PF_U, PF_I = 1, 2, 4, 16
ADDRESS_52 = 0x000F_FFFF_FFFF_F000


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
    def __init__(self, cpu: Cpu, phys: PhysicalMemory):
        self.cpu = cpu
        self.phys = phys
        # Instruction fetches for decoding reuse translations, as a CPU's TLB does: keyed by
        # CR3 and page, dropped by flush() (each run, and whenever ringminus writes memory).
        # Each entry keeps its leaf entry's bytes, compared with a fresh read on every hit, so
        # a remapped page (a PTE rewritten, even without INVLPG or across a world switch) is
        # walked afresh.  Entries: (frame, leaf address, leaf size, leaf bytes).
        self._code_tlb: dict[tuple[int, int], tuple[int, int, int, bytes]] = {}
        self._cpu_tlb = ucinternals.FetchTranslator(cpu.uc)

    def flush(self) -> None:
        self._code_tlb.clear()

    def fetch(self, linear: int, size: int, cr0: int | None = None, cr3: int | None = None) -> bytes | None:
        """Up to ``size`` instruction bytes at ``linear`` (fewer at an unmapped page), or None
        when the first byte is unmapped.  No permission checks: the CPU is executing there.
        Callers that hold CR0/CR3 already pass them."""
        paged = (self.cpu.fast.read(X86_CR0) if cr0 is None else cr0) & CR0_PG
        if (linear & 0xFFF) + size <= 0x1000:                     # the common case: one page
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
            else:
                physical = page_linear & 0xFFFF_FFFF        # no paging: no long mode either
            chunk = self.phys.read_fast(physical, count)
            if chunk is None:
                break
            out += chunk
        return out or None

    def fetch_as_executed(self, linear: int, size: int) -> tuple[bytes | None, bool]:
        """Up to ``size`` instruction bytes at ``linear`` as the CPU fetched them: through
        QEMU's TLB, which may still hold a translation the guest's tables no longer give
        (rewritten without INVLPG), where ``fetch`` walks them afresh.  Also whether QEMU had
        to walk them too and failed: its #PF for this fetch is then pending."""
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

    def _code_frame(self, cr3: int, linear: int) -> int | None:
        key = (cr3, linear >> 12)
        cached = self._code_tlb.get(key)
        if cached is not None:
            frame, leaf_address, leaf_size, leaf = cached
            if self.phys.read_fast(leaf_address, leaf_size) == leaf:
                return frame
        try:
            walked = []
            frame = self.translate(linear, walked=walked) & ~0xFFF
        except GuestFault:
            return None
        (leaf_address, leaf), leaf_size = walked[-1], 8 if self.cpu["cr4"] & CR4_PAE or self.cpu["efer"] & EFER_LMA else 4
        self._code_tlb[key] = (frame, leaf_address, leaf_size, (leaf | PTE_A).to_bytes(leaf_size, "little"))
        return frame

    def translate(self, linear: int, write: bool = False, user: bool = False, fetch: bool = False,
                  walked: list | None = None) -> int:
        cr0, cr4, efer = self.cpu["cr0"], self.cpu["cr4"], self.cpu["efer"]
        if not efer & EFER_LMA:
            linear &= 0xFFFF_FFFF
        if not cr0 & CR0_PG:
            return linear
        nx_enabled = bool(efer & EFER_NXE)
        error = (PF_W if write else 0) | (PF_U if user else 0) | (PF_I if fetch and nx_enabled else 0)
        cr3 = self.cpu["cr3"]
        if efer & EFER_LMA:
            levels = [(cr3 & ADDRESS_52, 39), (None, 30), (None, 21), (None, 12)]
            entry_size = 8
        elif cr4 & CR4_PAE:
            levels = [((cr3 & 0xFFFF_FFE0), 30), (None, 21), (None, 12)]
            entry_size = 8
        else:
            levels = [(cr3 & 0xFFFF_F000, 22), (None, 12)]
            entry_size = 4
        table = levels[0][0]
        writable = user_ok = True
        no_exec = False
        walked = [] if walked is None else walked            # (entry address, entry) per level
        pae_pdpte = bool(cr4 & CR4_PAE) and not efer & EFER_LMA
        for depth, (_, shift) in enumerate(levels):
            index_bits = 2 if pae_pdpte and depth == 0 else (10 if entry_size == 4 else 9)
            index = (linear >> shift) & ((1 << index_bits) - 1)
            entry_address = table + index * entry_size
            raw = self.phys.read_fast(entry_address, entry_size)
            # A walk through memory nothing backs reads zeros (not present), as QEMU's
            # unassigned reads and Unicorn's own walks do: the guest gets its #PF.
            entry = 0 if raw is None else int.from_bytes(raw, "little")
            if not entry & PTE_P:
                raise GuestFault(Vector.PF, error, cr2=linear)
            if not (pae_pdpte and depth == 0):      # PAE PDPTEs carry no permissions
                writable &= bool(entry & PTE_RW)
                user_ok &= bool(entry & PTE_US)
                no_exec |= nx_enabled and bool(entry & PTE_NX)
                walked.append((entry_address, entry))
            last = depth == len(levels) - 1
            large = not last and depth > 0 and entry & PTE_PS and (entry_size == 8 or cr4 & CR4_PSE)
            if entry_size == 4 and depth == 0 and entry & PTE_PS and cr4 & CR4_PSE:
                large = True
            if last or large:
                break
            table = entry & (ADDRESS_52 if entry_size == 8 else 0xFFFF_F000)
        page_mask = (1 << shift) - 1
        if entry_size == 4 and shift == 22:
            frame = (entry & 0xFFC0_0000) | ((entry >> 13) & 0xFF) << 32     # PSE-36
        else:
            frame = entry & ADDRESS_52 & ~page_mask
        denied = (user and not user_ok) or (write and not writable and (user or cr0 & CR0_WP)) \
            or (fetch and no_exec)
        if denied:
            raise GuestFault(Vector.PF, error | PF_P, cr2=linear)
        for i, (entry_address, value) in enumerate(walked):
            leaf = i == len(walked) - 1
            updated = value | PTE_A | (PTE_D if leaf and write else 0)
            if updated != value:
                self.phys.write_u(entry_address, entry_size, updated)
        return frame | (linear & page_mask)

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
