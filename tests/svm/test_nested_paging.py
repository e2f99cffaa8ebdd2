"""Nested paging (APM §15.25): the guest hypervisor's tables at N_CR3 translate every
guest-physical address of its L2 — the guest's own page-table accesses and its final
addresses — and a refusal is #NPF (exit 0x400) with EXITINFO1 = the nested page fault's
error code plus bit 32 (final address) or bit 33 (guest page-table access), EXITINFO2 = the
guest-physical address.  Expected values are the APM's as kvm-unit-tests' svm_npt.flat checks
them (npt_np, npt_us, npt_rw, npt_nx, npt_rw_pfwalk, svm_npt_rsvd_bits_test) and KVM's
reserved bits (mmu.c __reset_rsvds_bits_mask: AMD reserves bit 8 in PML4Es).

L1 is tests/l1.py on the ``max`` model (the one that advertises NP); its nested tables map
guest-physical = host-physical, 4 KiB pages below 4 MiB and 2 MiB pages above, P|RW|US at
every level, unless a test changes an entry."""
from __future__ import annotations

import struct

import pytest

from ringminus import Machine, StopReason

from ..l1 import HLT, L2_CODE, L2_DATA, VMCB, GuestHypervisor, addresses, read_vmcb

NPF = 0x400
PF_EXIT = 0x40 + 14
NPT = 0x400000                          # PML4, PDPT, PD, then the 4 KiB tables of 0-2 and 2-4 MiB
PML4, PDPT, PD, PT = NPT, NPT + 0x1000, NPT + 0x2000, NPT + 0x3000
FINAL, TABLE = 1 << 32, 1 << 33
P, W, U, RSV, ID = 1, 2, 4, 8, 16
ACCESSED, DIRTY, NX = 0x20, 0x40, 1 << 63
L1_TABLES = 0x10000                     # the long boot state's PML4 (then PDPT, PDs)
ELSEWHERE = 0x3F0000                    # a host page the tests map other guest pages to


def pte_address(gpa: int) -> int:
    """Where the nested PTE of a page below 4 MiB is."""
    return PT + 8 * (gpa >> 12)


def nested_tables(machine: Machine) -> None:
    machine.write_memory(PML4, struct.pack("<Q", PDPT | 7).ljust(0x1000, b"\0"))
    machine.write_memory(PDPT, struct.pack("<Q", PD | 7).ljust(0x1000, b"\0"))
    directory = [PT | 7, (PT + 0x1000) | 7] + [(i << 21) | 0x87 for i in range(2, 512)]
    machine.write_memory(PD, struct.pack("<512Q", *directory))
    machine.write_memory(PT, struct.pack("<1024Q", *[(i << 12) | 7 for i in range(1024)]))


def qword(machine: Machine, address: int) -> int:
    return struct.unpack("<Q", machine.read_memory(address, 8))[0]


def set_qword(machine: Machine, address: int, value: int) -> None:
    machine.write_memory(address, struct.pack("<Q", value & (1 << 64) - 1))


def npt_guest(l2: str, *, setup: str = "", intercepts=(HLT,), mode: str = "long", l2_bits: int = 64,
              **args) -> GuestHypervisor:
    hv = GuestHypervisor(l2=l2, setup=setup, intercepts=intercepts, mode=mode, l2_bits=l2_bits,
                         cpu_model="max", **args)
    hv.control["nested_control"] = 1
    hv.control["n_cr3"] = NPT
    machine = hv.build()
    nested_tables(machine)
    return hv


def run_exits(hv: GuestHypervisor):
    result = hv.run()
    assert result.stop.reason is StopReason.HLT, result.stop
    return hv.exits()


HOST_NX = """
    mov ecx, 0xC0000080
    rdmsr
    or eax, 0x800
    wrmsr
"""


def test_l2_runs_through_the_nested_tables_and_sets_their_accessed_and_dirty_bits():
    hv = npt_guest(f"mov rax, [{L2_DATA:#x}]\nadd rax, 5\nmov [{L2_DATA + 8:#x}], rax\nhlt")
    set_qword(hv.machine, L2_DATA, 0x1234)
    exits = run_exits(hv)
    assert [e.exitcode for e in exits] == [HLT]
    assert qword(hv.machine, L2_DATA + 8) == 0x1239
    m = hv.machine
    assert qword(m, pte_address(L2_DATA)) & (ACCESSED | DIRTY) == ACCESSED | DIRTY
    assert qword(m, pte_address(L2_CODE)) & (ACCESSED | DIRTY) == ACCESSED        # fetched, not written
    # The guest's own table walks are writes to the nested tables (APM): its PML4 page is dirty.
    assert qword(m, pte_address(L1_TABLES)) & (ACCESSED | DIRTY) == ACCESSED | DIRTY
    assert qword(m, PML4) & ACCESSED and qword(m, PD + 8) & ACCESSED
    assert m.svm.nested is None and m.linear.stage2 is None                       # L1 runs unnested


def test_a_guest_physical_page_maps_to_another_host_page():
    hv = npt_guest(f"mov rax, [{L2_DATA:#x}]\nmov qword ptr [{L2_DATA + 8:#x}], 0x55\nhlt")
    m = hv.machine
    set_qword(m, L2_DATA, 0x1111)
    set_qword(m, ELSEWHERE, 0x2222)
    set_qword(m, pte_address(L2_DATA), ELSEWHERE | 7)
    exits = run_exits(hv)
    assert exits[-1].rax == 0x2222                          # L2 read the host page it maps to
    assert qword(m, ELSEWHERE + 8) == 0x55 and qword(m, L2_DATA + 8) == 0


@pytest.mark.parametrize("access, entry, info1", [
    ("load", 0, FINAL | U),                             # npt_np
    ("load", L2_DATA | P | W, FINAL | U | P),          # npt_us: U clear
    ("store", L2_DATA | P | U, FINAL | U | W | P),     # npt_rw: RW clear
    ("store", 0, FINAL | U | W),
    ("load", L2_DATA | 7 | 1 << 51, FINAL | U | RSV | P),   # above MAXPHYADDR (40)
], ids=["not-present", "supervisor", "read-only", "store-not-present", "reserved"])
def test_a_refused_final_access_is_npf(access, entry, info1):
    load, store = f"mov rax, [{L2_DATA + 0x18:#x}]", f"mov qword ptr [{L2_DATA + 0x18:#x}], 1"
    lines = ["mov rbx, 7", load if access == "load" else store, "hlt"]
    at = addresses(lines)
    hv = npt_guest("\n".join(lines))
    set_qword(hv.machine, pte_address(L2_DATA), entry)
    exits = run_exits(hv)
    assert [e.exitcode for e in exits] == [NPF]
    npf = exits[0]
    assert (npf.exitinfo1, npf.exitinfo2, npf.rip) == (info1, L2_DATA + 0x18, at[1])
    assert npf.rbx == 7 and npf.exitintinfo == 0


def test_fetch_from_a_no_execute_page_with_host_nx_is_npf_with_id():
    """npt_nx: the host's EFER.NX governs the nested tables (the guest's has it clear)."""
    hv = npt_guest("hlt", setup=HOST_NX)
    set_qword(hv.machine, pte_address(L2_CODE), L2_CODE | 7 | NX)
    exits = run_exits(hv)
    assert [(e.exitcode, e.exitinfo1, e.exitinfo2, e.rip) for e in exits] == [(NPF, FINAL | ID | U | P, L2_CODE, L2_CODE)]


def test_nx_without_host_nx_is_a_reserved_bit_and_the_fetch_has_no_id():
    hv = npt_guest("hlt")
    set_qword(hv.machine, pte_address(L2_CODE), L2_CODE | 7 | NX)
    exits = run_exits(hv)
    assert [(e.exitcode, e.exitinfo1) for e in exits] == [(NPF, FINAL | U | RSV | P)]


def test_a_write_protected_guest_page_table_is_npf_on_the_walk():
    """npt_rw_pfwalk: the guest's walk writes (accessed bits) — EXITINFO2 = the entry's GPA,
    here the guest's PML4 entry 0 = its CR3."""
    hv = npt_guest("hlt")
    set_qword(hv.machine, pte_address(L1_TABLES), L1_TABLES | P | U)
    exits = run_exits(hv)
    assert [(e.exitcode, e.exitinfo1, e.exitinfo2, e.rip) for e in exits] == \
        [(NPF, TABLE | U | W | P, L1_TABLES, L2_CODE)]


@pytest.mark.parametrize("where, bits", [(PML4, 1 << 8), (PML4, 1 << 7), (PDPT, 1 << 7)],
                         ids=["pml4e-bit8", "pml4e-ps", "pdpe-ps-without-1g-pages"])
def test_reserved_bits_in_upper_nested_levels_fault_on_the_guest_walk(where, bits):
    """svm_npt_rsvd_bits_test: the guest's tables blow up first (EXITINFO1 0x2_0000_000F)."""
    hv = npt_guest("hlt")
    set_qword(hv.machine, where, qword(hv.machine, where) | bits)
    exits = run_exits(hv)
    assert [(e.exitcode, e.exitinfo1, e.exitinfo2) for e in exits] == [(NPF, TABLE | U | W | RSV | P, L1_TABLES)]


def test_a_large_nested_page_with_reserved_bits_faults_on_the_final_fetch():
    """svm_npt_rsvd_bits_test's PDE case: a 2 MiB nested page with bits 20:13 set."""
    hv = npt_guest("hlt", setup=HOST_NX)
    set_qword(hv.machine, PD + 8, (1 << 21) | 0x87 | 1 << 15)        # maps L2's code, not the tables
    exits = run_exits(hv)
    assert [(e.exitcode, e.exitinfo1, e.exitinfo2) for e in exits] == [(NPF, FINAL | ID | U | RSV | P, L2_CODE)]


def test_l2_without_paging_goes_through_the_nested_tables():
    hv = npt_guest(f"mov eax, [{L2_DATA:#x}]\nhlt", mode="protected", l2_bits=32)
    set_qword(hv.machine, pte_address(L2_DATA), 0)
    exits = run_exits(hv)
    assert [(e.exitcode, e.exitinfo1, e.exitinfo2) for e in exits] == [(NPF, FINAL | U, L2_DATA)]


def test_the_guests_own_page_fault_is_its_own_and_l1_may_intercept_it():
    """A guest #PF under nested paging comes from the guest's tables alone: the address has no
    mapping in L1's (= L2's) tables, which cover the first GiB."""
    unmapped = 0x40_0000_0000
    hv = npt_guest(f"mov rax, [{unmapped:#x}]\nhlt", intercepts=(HLT, PF_EXIT))
    exits = run_exits(hv)
    assert [(e.exitcode, e.exitinfo1, e.exitinfo2) for e in exits] == [(PF_EXIT, 0, unmapped)]


def test_guest_pat_is_g_pat_and_l1_gets_its_own_back():
    lines = ["mov ecx, 0x277", "rdmsr", "mov rbx, rax", "mov eax, 0x06060606", "mov edx, 0x06060606", "wrmsr", "hlt"]
    hv = npt_guest("\n".join(lines), done="mov ecx, 0x277\nrdmsr\nmov [rbx + 0x3400], eax\nmov [rbx + 0x3404], edx")
    hv.machine.write_memory(VMCB + 0x668, struct.pack("<Q", 0x0000_0001_0000_0001))     # G_PAT
    exits = run_exits(hv)
    assert exits[-1].rbx == 0x0000_0001                                      # L2 read G_PAT (low half)
    assert int(read_vmcb(hv.machine)["save"]["g_pat"]) == 0x0606_0606_0606_0606
    assert hv.result(0) == 0x0007_0406_0007_0406                           # L1's power-on PAT


def test_npt_state_survives_a_snapshot_into_another_machine():
    lines = ["mov rbx, 1", f"mov rax, [{L2_DATA:#x}]", "hlt"]
    at = addresses(lines)
    hv = npt_guest("\n".join(lines))
    set_qword(hv.machine, pte_address(L2_DATA), 0)
    hv.machine.break_at(at[1])
    assert hv.run().stop.reason is StopReason.BREAKPOINT
    snapshot = hv.machine.snapshot()
    other = Machine(profile="kvm", cpu_model="max")
    other.restore(snapshot)
    assert other.run(timeout=30).stop.reason is StopReason.HLT
    exits = hv.exits(other)
    assert [(e.exitcode, e.exitinfo1, e.exitinfo2, e.rip) for e in exits] == [(NPF, FINAL | U, L2_DATA, at[1])]


def test_np_is_advertised_on_max_only_and_refused_elsewhere():
    from ringminus.svm.cpuid import cpuid_table, LEAF_SVM
    from ringminus.arch.models import MODELS
    from ringminus.intercepts.profiles import profile
    assert cpuid_table(MODELS["max"], profile("kvm"))[LEAF_SVM][3] & 1
    assert not cpuid_table(MODELS["qemu64"], profile("kvm"))[LEAF_SVM][3] & 1
    hv = GuestHypervisor(l2="hlt")
    hv.control["nested_control"], hv.control["n_cr3"] = 1, NPT
    exits = run_exits(hv)
    assert [e.exitcode for e in exits] == [-1]


def test_a_data_page_dirty_bit_is_set_by_the_first_write_after_a_read():
    hv = npt_guest(f"mov rax, [{L2_DATA:#x}]\nmov [{ELSEWHERE - 0x1000:#x}], rax\nmov [{L2_DATA:#x}], rax\nhlt")
    exits = run_exits(hv)
    assert [e.exitcode for e in exits] == [HLT]
    assert qword(hv.machine, pte_address(L2_DATA)) & DIRTY


@pytest.mark.parametrize("profile, info1", [("kvm", TABLE | U | W | RSV | P), ("apm", TABLE | U | W | RSV | P),
                                            ("qemu", TABLE | U | W | RSV)])
def test_a_reserved_bit_sets_p_except_under_qemu(profile, info1):
    hv = npt_guest("hlt", profile=profile)
    set_qword(hv.machine, PDPT, qword(hv.machine, PDPT) | 1 << 7)          # PS without 1 GiB pages
    assert [(e.exitcode, e.exitinfo1) for e in run_exits(hv)] == [(NPF, info1)]


def test_qemu_ignores_bit_8_of_a_nested_pml4e():
    hv = npt_guest("hlt", profile="qemu")
    set_qword(hv.machine, PML4, qword(hv.machine, PML4) | 1 << 8)
    assert [e.exitcode for e in run_exits(hv)] == [HLT]


HOST_SMEP = """
    mov rax, cr4
    or eax, 0x100000
    mov cr4, rax
"""


@pytest.mark.parametrize("profile, id_bit", [("kvm", ID), ("qemu", 0)])
def test_the_host_smep_alone_sets_id_except_under_qemu(profile, id_bit):
    hv = npt_guest("hlt", setup=HOST_SMEP, profile=profile)
    set_qword(hv.machine, L1_TABLES, qword(hv.machine, L1_TABLES) & ~U)     # supervisor pages: SMEP lets L1 run
    set_qword(hv.machine, pte_address(L2_CODE), 0)
    assert [(e.exitcode, e.exitinfo1) for e in run_exits(hv)] == [(NPF, FINAL | id_bit | U)]
