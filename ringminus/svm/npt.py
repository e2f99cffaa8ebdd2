"""Nested paging (APM §15.25): the guest hypervisor's tables at N_CR3 translate every
guest-physical address its guest (L2) makes — each entry of the guest's own walk, and the
final address — into a host-physical one; the core's second stage (emulator/paging.py).

The nested tables have the host's format: L1's CR4 and EFER at VMRUN decide 4-level, legacy
PAE or 32-bit tables, NX and PSE, as paging were on (KVM's kvm_init_shadow_npt_mmu takes
CR0.PG for granted; QEMU's nested_pg_mode).  Every nested access is a user access, and the
guest's page-table accesses are writes (the CPU may set accessed/dirty bits there): APM
text quoted in KVM's translate_nested_gpa and QEMU's ptw_translate.  Accessed bits are set
in the nested entries, dirty in the leaf of a write.  A refusal is #NPF (exit 0x400):
EXITINFO1 = the page-fault error code of the nested walk (P for a present entry — also for
reserved bits, as KVM and the APM) with bit 32 (the final address) or bit 33 (a guest
page-table access); ID only for a final fetch with the host's EFER.NX or CR4.SMEP
(kvm-unit-tests' svm_npt_rsvd_bits_test); EXITINFO2 = the guest-physical address.  The
qemu profile has QEMU 7.2's ways instead (intercepts/profiles.py: RSV without P, ID with NX
only, bit 8 of a nested PML4E ignored).

gPAT: with nested paging the guest's PAT is the VMCB's G_PAT (the host's is put back at
#VMEXIT, which stores the guest's there)."""
from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, NamedTuple

from ..arch.control import CR4_SMEP, EFER_NXE
from ..arch.exceptions import SecondStageFault
from ..arch.models import max_physical_bits
from ..emulator.memory import PhysicalMemory
from ..intercepts.profiles import Profile
from ..emulator.paging import (PF_I, PF_P, PF_RSVD, PF_U, PF_W, PTE_D, TableFault, paging_format, set_accessed,
                               walk)

if TYPE_CHECKING:
    from ..machine import Machine

_SERIALS = itertools.count()
NPF_FINAL = 1 << 32             # EXITINFO1: translating the guest's final physical address
NPF_TABLE = 1 << 33             # EXITINFO1: translating a guest page-table access


class NestedSetting(NamedTuple):
    """What a VMRUN with NP_ENABLE fixes for the guest's run (kept in SvmState, so that a
    snapshot restored into another machine builds the stage over that machine's memory)."""
    root: int                   # N_CR3
    host_cr4: int
    host_efer: int


class NestedTlb:
    """Nested translations kept from one VMRUN to the next over the same tables: guest-physical
    page -> (host page, writable, executable, dirty).  Each is valid while every nested
    table page it was walked through holds the bytes it held then (accessed and dirty bits
    included), which ``revalidate`` compares at each VMRUN, page by page: a change L1 made
    between runs is seen at the next VMRUN, as KVM's shadow of L1's tables sees it, and an
    unchanged table costs no walk.  Within a run it is the CPU's nested TLB (flushed by
    INVLPGA and TLB_CONTROL through the core's forget_tlb)."""

    LIMIT = 1 << 16                     # translations kept at most (then it starts afresh)

    def __init__(self):
        self.entries: dict[int, tuple[int, bool, bool, bool]] = {}
        self.pages: dict[int, bytes | None] = {}     # host page of a table -> its bytes when walked
        self.serial = next(_SERIALS)                 # (translations cached elsewhere compare
        self.flushes = 0                             # these two)

    def revalidate(self, memory: PhysicalMemory) -> None:
        for page, seen in self.pages.items():
            if memory.read_fast(page, 0x1000) != seen:
                self.flush()
                return

    def flush(self) -> None:
        self.entries.clear()
        self.pages.clear()
        self.flushes += 1


class NestedPaging:
    def __init__(self, memory: PhysicalMemory, setting: NestedSetting, max_phys_bits: int, tlb: NestedTlb,
                 profile: Profile):
        self.memory = memory
        self.root = setting.root
        self.format = paging_format(setting.host_cr4, setting.host_efer, max_phys_bits,
                                    pml4e_bit8_reserved=profile.nested_pml4e_bit8_reserved)
        smep = profile.npf_id_with_smep and setting.host_cr4 & CR4_SMEP
        self._fetch_bit = PF_I if setting.host_efer & EFER_NXE or smep else 0
        self._reserved_bits = PF_RSVD | (PF_P if profile.npf_reserved_sets_present else 0)
        self.tlb = tlb

    def _read(self, address: int, size: int) -> tuple[int, int]:
        raw = self.memory.read_fast(address, size)
        return address, 0 if raw is None else int.from_bytes(raw, "little")      # nothing there: not present

    def translate(self, address: int, write: bool, fetch: bool, table: bool, mark: bool = True) -> int:
        """``address`` through the nested tables; ``mark``: set accessed/dirty bits (and
        keep the translation) — not for a lookup that is no access."""
        hit = self.tlb.entries.get(address >> 12)
        if hit is not None and (hit[3] or not write) and (hit[2] or not fetch):
            return hit[0] | (address & 0xFFF)
        try:
            result = walk(self.format, self.root, address, self._read)
        except TableFault as fault:
            raise self._fault(address, write, fetch, table, fault.present, fault.reserved) from None
        if not (result.user and (result.writable or not write) and (result.executable or not fetch)):
            raise self._fault(address, write, fetch, table, True, False)
        if mark:
            set_accessed(self.memory, result.entries, self.format.entry_size, write)
            self._remember(address >> 12, result, write)
        return result.physical

    def _remember(self, page: int, result, write: bool) -> None:
        tlb = self.tlb
        if len(tlb.entries) >= NestedTlb.LIMIT:
            tlb.flush()
        dirty = result.writable and (write or bool(result.entries[-1][1] & PTE_D))
        tlb.entries[page] = (result.physical & ~0xFFF, result.writable, result.executable, dirty)
        for at, _value in result.entries:               # as they are now, accessed bits set
            table = at & ~0xFFF
            tlb.pages[table] = self.memory.read_fast(table, 0x1000)

    def flush(self) -> None:
        self.tlb.flush()

    @property
    def generation(self) -> tuple:
        """Which translations these are: their TLB (one per tables, format and profile)
        and how often it was flushed — decoding's TLB (paging.py) keys by it."""
        return self.tlb.serial, self.tlb.flushes

    def _fault(self, address: int, write: bool, fetch: bool, table: bool, present: bool,
               reserved: bool) -> SecondStageFault:
        info = PF_U | (PF_W if write else 0) | (self._reserved_bits if reserved else PF_P if present else 0)
        info |= NPF_TABLE if table else NPF_FINAL | (self._fetch_bit if fetch else 0)
        return SecondStageFault(info, address)


def stage_for(machine: "Machine") -> NestedPaging | None:
    """The second stage the running guest's VMRUN set up, over ``machine``'s memory, with the
    nested TLB of the same tables (revalidated: see NestedTlb)."""
    setting = machine.svm.nested
    if setting is None:
        return None
    tlbs = machine.svm_caches.nested_tlbs
    tlb = tlbs.get((setting, machine.profile.name))
    if tlb is None:
        if len(tlbs) >= 16:
            tlbs.clear()
        tlb = tlbs[(setting, machine.profile.name)] = NestedTlb()
    else:
        tlb.revalidate(machine.memory)
    return NestedPaging(machine.memory, setting, max_physical_bits(machine.cpu_model), tlb, machine.profile)
