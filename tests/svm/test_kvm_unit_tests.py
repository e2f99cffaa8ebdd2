"""kvm-unit-tests' svm.flat and svm_npt.flat (tests/kut, built from the commit in SOURCE.txt) under ringminus,
booted as its runner boots it on QEMU (q35, 4 GiB, -cpu max, multiboot through SeaBIOS), one test at a
time by name: each prints PASS on the serial port and exits through port 0xF4 with QEMU's
isa-debug-exit status, 1 for "all passed"."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ..helpers import run_cli
from ..platform.test_multiboot import needs_firmware

SVM_FLAT = Path(__file__).parents[1] / "kut" / "svm.flat"
SVM_NPT_FLAT = SVM_FLAT.with_name("svm_npt.flat")


def run_kut(capsys, selection: str, kernel: Path = SVM_FLAT) -> tuple[int, str]:
    status, out, _err = run_cli(capsys, "run", "--machine", "q35", "--mem", "4G", "--cpu", "max", "--kernel", kernel,
                                "--append", selection, "--timeout", "120", "--json")
    return status, json.loads(out)["serial"]


@needs_firmware
@pytest.mark.parametrize("name", [
    "ioio",          # L2 edits the IOPM between its port accesses: the map is L1's memory, read live
    "exc_inject",    # the #VMEXIT after an injection clears EVENTINJ.V
    "mode_switch",   # VMMCALL from a real-mode L2 takes L1's intercept (kvm profile too)
    "null", "vmrun", "rsm",
    "pending_event",  # a self-IPI sent with interrupts off exits with INTR at VMRUN
    "virq_inject",    # V_IRQ and its intercept (VINTR) under V_INTR_MASKING
    "host_rflags",    # a single-stepped VMRUN traps after the #VMEXIT
    "tsc_adjust",     # IA32_TSC_ADJUST (max), a TSC write from L2 sets L1's counter
    "svm_lbrv_test1", "svm_lbrv_test3",     # LBR without LBRV: L2's branches reach L1; #VMEXIT is no branch
    "vgif",           # STGI/CLGI in L2 set and clear V_GIF
    "svm_pae_test",   # a legacy-PAE L2: CR3 and PDPTE reserved bits at VMRUN
    "svm_guest_state_test",     # VMRUN's consistency checks: CR4 bits the model lacks, the maps' limit, canonical bases
    "svm_lbrv_nested_test1", "svm_lbrv_nested_test2",     # LBR virtualization
    "vnmi",           # V_NMI delivered, V_NMI_MASK ended by the guest's IRET; the NMI intercept required
    "pause_filter_test",        # the filter count and threshold
    *(f"npt:{name}" for name in ("npt_nx", "npt_np", "npt_us", "npt_rw", "npt_rw_pfwalk", "npt_l1mmio",
                                 "npt_rw_l1mmio")),      # svm_npt.flat: #NPF's EXITINFO1/2, L2 reaching L1's MMIO
])
def test_a_kvm_unit_test_passes(capsys, name):
    kernel, name = (SVM_NPT_FLAT, name[4:]) if name.startswith("npt:") else (SVM_FLAT, name)
    status, serial = run_kut(capsys, name, kernel)
    # (a "v2" test reports its checks but no line of its own name; some report only failures)
    assert f"SVM test: {name}" in serial and not re.search(r"^(FAIL|SKIP)", serial, re.M), serial[-2000:]
    assert re.search(r"^SUMMARY: \d+ tests\r?$", serial, re.M) and status == 1      # no unexpected failures


@needs_firmware
@pytest.mark.parametrize("profile, summary, status", [
    ("kvm", "SUMMARY: 138 tests, 3 skipped", 1),
    # QEMU 7.2 TCG's own line (reference/npt.md §4.4, and benchmarks/kvm_unit_tests.py
    # side by side): its #NPF deviations, which the qemu profile reproduces, fail 72 checks.
    ("qemu", "SUMMARY: 138 tests, 72 unexpected failures, 3 skipped", 3),
])
def test_svm_npt_flat_whole_by_profile(capsys, profile, summary, status):
    got, out, _err = run_cli(capsys, "run", "--machine", "q35", "--mem", "4G", "--cpu", "max", "--profile", profile,
                             "--kernel", SVM_NPT_FLAT, "--timeout", "120", "--json")
    serial = json.loads(out)["serial"]
    assert summary in serial and got == status, serial[-1500:]
