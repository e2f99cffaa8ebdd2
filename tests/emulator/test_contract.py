"""Issue 11's contract: guest faults end in documented stops or guest events (never a Python
exception), every slice end is classified honestly, --max-insns bounds every run, and Ctrl-C
(or Machine.interrupt from any thread) ends a run with reason ``interrupted``."""
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ringminus import Machine, StopReason
from ringminus.arch.segments import SYS_INT_GATE, pack_gate
from ringminus.intercepts.controls import InterceptControls
from ringminus.arch.exitcodes import ExitCode
from ringminus.smm import layouts as L

from ..helpers import RSM, SMM_ENTRY, SMRAM_BASE, add_smram, asm, set_smram_field



def cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "ringminus", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def smm_machine(cpu_model, profile, code_bits=16):
    """An SMI taken from real mode (the handler is RSM), stopped at the handler's entry."""
    machine = add_smram(Machine(cpu_model=cpu_model, profile=profile))
    machine.write_memory(0x7C00, b"\xf4")
    machine.boot("real", 0x7C00)
    machine.break_at(SMM_ENTRY)
    machine.raise_smi()
    assert machine.run().stop.reason is StopReason.BREAKPOINT
    return machine


# -- A: ringminus's own page walk through memory nothing backs ---------------------------------
def test_a_walk_through_unbacked_memory_reads_not_present(tmp_path):
    # SGDT over PML4[0] points the PDPT at 256 MiB, beyond 16 MiB of RAM; the OUT's site hook
    # walks afresh.  The CPU still holds the code's translation, so the OUT runs: exit 0.
    image = tmp_path / "a.bin"
    image.write_bytes(asm("sgdt [0x10000]; out 0xf4, al; hlt", 64, 0x100000))
    done = cli("run", "--boot", "long", "--mem", "16M", "--json", image)
    assert done.stderr == ""
    assert json.loads(done.stdout)["stop"]["reason"] == "exit"


@pytest.mark.parametrize("exact", [False, True])
def test_a_site_the_tables_no_longer_map_is_still_checked(exact):
    # The guest points PML4[0] beyond RAM (no INVLPG): the CPU runs on from its TLB, and the
    # MOV CR4 after it, which sets LA57 (not on qemu64), still raises #GP: ringminus reads
    # the site's code through QEMU's TLB when its own walk finds nothing (fuzz streams
    # seeds 3138965, 3144994).
    machine = Machine(memory_size=16 << 20, exact_instructions=exact)
    machine.write_memory(0x100000, asm("sgdt [0x10000]; mov eax, 0x1000; mov cr4, rax; hlt", 64, 0x100000))
    machine.boot("long", 0x100000)
    result = machine.run(max_instructions=50)
    assert result.events and result.events[0]["vector"] == 13
    assert result.events[0]["rip"] == 0x100000 + len(asm("sgdt [0x10000]; mov eax, 0x1000", 64, 0x100000))
    assert not result.regs["cr4"] & 0x1000


def test_a_fault_delivery_through_unbacked_tables_is_a_guest_fault():
    # A 32-bit paged guest whose page directory lies beyond RAM: the first fetch faults,
    # and delivering #PF walks through nothing again: a triple fault, as on QEMU.
    machine = Machine(memory_size=16 << 20)
    machine.write_memory(0x100000, asm("mov eax, 0x40000000; mov cr3, eax; mov eax, cr0; "
                                       "or eax, 0x80000000; mov cr0, eax; nop", 32, 0x100000))
    machine.boot("protected", 0x100000)
    result = machine.run(max_instructions=100)
    assert result.stop.reason is StopReason.SHUTDOWN


# -- B: every field of a 32-bit map is masked to its width -------------------------------------
def test_b_io_restart_fields_of_the_32bit_map_take_the_low_half(tmp_path):
    image = tmp_path / "b.bin"
    image.write_bytes(bytes.fromhex("e6b2f4"))        # out 0xb2, al; hlt
    machine = Machine(cpu_model="qemu32", profile="apm", apm_smi=True)
    machine.write_memory(0x7C00, image.read_bytes())
    machine.boot("real", 0x7C00)
    machine["rcx"] = 0x1_2345_6789
    machine.break_at(machine.smm.smbase + L.ENTRY_OFFSET)
    assert machine.run().stop.reason is StopReason.BREAKPOINT
    saved = machine.read_view(machine.smm.smbase + L.offset_of(L.SMRAM_STATE_32, "io_restart_ecx"), 4)
    assert int.from_bytes(saved, "little") == 0x2345_6789
    done = cli("run", "--cpu", "qemu32", "--profile", "apm", "--apm-smi", "--set", "rcx=0x10000000000", image)
    assert "Traceback" not in done.stderr and done.returncode != 1


# -- C: RSM into PAE paging whose PDPTEs are not in memory -------------------------------------
@pytest.mark.parametrize("profile", ["kvm", "apm"])
def test_c_rsm_into_pae_with_pdptes_outside_ram_shuts_down(profile):
    machine = smm_machine("qemu32", profile)
    for field, value in (("cr0", 0x8000_0011), ("cr4", 0x20), ("cr3", 0x8785_D000)):
        set_smram_field(machine, field, value, 4, L.SMRAM_STATE_32)
    result = machine.run(max_instructions=100)
    assert result.stop.reason is StopReason.SHUTDOWN
    assert "PDPTEs at 0x8785d000 are not in memory" in result.stop.detail


def test_c_rsm_into_pae_with_reserved_pdpte_bits_shuts_down():
    machine = smm_machine("qemu32", "kvm")
    machine.write_memory(0x9000, (0x5000 | 1 | 2).to_bytes(8, "little"))    # RW is reserved in a PDPTE
    for field, value in (("cr0", 0x8000_0011), ("cr4", 0x20), ("cr3", 0x9000)):
        set_smram_field(machine, field, value, 4, L.SMRAM_STATE_32)
    result = machine.run(max_instructions=100)
    assert result.stop.reason is StopReason.SHUTDOWN and "reserved bits" in result.stop.detail


def test_c_qemu_profile_walks_and_triple_faults():
    # QEMU loads no PDPTEs at RSM: the first fetch walks through nothing (zeros), #PF, and its
    # delivery faults the same way: shutdown.
    machine = smm_machine("qemu32", "qemu")
    for field, value in (("cr0", 0x8000_0011), ("cr4", 0x20), ("cr3", 0x8785_D000)):
        set_smram_field(machine, field, value, 4, L.SMRAM_STATE_32)
    result = machine.run(max_instructions=100)
    assert result.stop.reason is StopReason.SHUTDOWN and "triple fault" in result.stop.detail


# -- D: RSM back to guest mode under a VMCB that is not in memory ------------------------------
@pytest.mark.parametrize("profile", ["kvm", "apm", "qemu"])
def test_d_rsm_to_guest_mode_with_vmcb_beyond_ram_shuts_down(profile):
    machine = smm_machine("qemu64", profile)
    set_smram_field(machine, "svm_guest", 1)
    set_smram_field(machine, "svm_guest_vmcb", 0x7_0000_0000)
    result = machine.run(max_instructions=100)
    if profile == "qemu":       # QEMU's RSM never reads FED8h/FEE0h: the host state comes back
        assert result.stop.reason is StopReason.HLT and result.svm["guest_mode"] is False
    else:
        assert result.stop.reason is StopReason.SHUTDOWN and result.stop.detail.startswith("RSM: guest-mode state")


# -- honest stops --------------------------------------------------------------------------
def test_an_outside_emu_stop_is_not_a_halt():
    machine = Machine()
    machine.write_memory(0x7C00, asm("jmp 0x7c00", 16, 0x7C00))
    machine.boot("real", 0x7C00)
    threading.Timer(0.2, machine.uc.emu_stop).start()
    result = machine.run(timeout=5)
    assert result.stop.reason is StopReason.ENDED and "emu_stop" in result.stop.detail


def test_a_halt_is_still_a_halt():
    machine = Machine()
    machine.write_memory(0x7C00, asm("nop; hlt", 16, 0x7C00))
    machine.boot("real", 0x7C00)
    result = machine.run()
    assert result.stop.reason is StopReason.HLT and result.stop.rip == 0x7C02


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, 0, "1"])
def test_run_rejects_a_timeout_that_is_not_a_positive_number(bad):
    machine = Machine()
    with pytest.raises(ValueError, match="timeout"):
        machine.run(timeout=bad)


def test_a_huge_timeout_still_runs_and_stops():
    machine = Machine()
    machine.write_memory(0x7C00, asm("nop; hlt", 16, 0x7C00))
    machine.boot("real", 0x7C00)
    assert machine.run(timeout=1e300).stop.reason is StopReason.HLT


# -- --max-insns bounds runs in which nothing retires --------------------------------------------
def test_a_fault_loop_ends_at_the_limit():
    machine = Machine()
    machine.write_memory(0x7C00, bytes.fromhex("0f0b"))             # ud2, its own #UD handler
    machine.write_memory(6 * 4, (0x7C00).to_bytes(2, "little") + b"\0\0")
    machine.boot("real", 0x7C00)
    result = machine.run(max_instructions=500, timeout=30)
    assert result.stop.reason is StopReason.LIMIT
    assert result.instructions == 0 and result.stats["exceptions_delivered"] == 501


def test_hlt_at_cpl3_with_a_bare_iret_handler_ends_at_the_limit():
    # Protected mode, CPL 3: HLT raises #GP(0); the handler is a bare IRET, which pops the
    # error code as EIP and faults again: nothing retires in the loop.
    machine = Machine()
    machine.write_memory(0x100000, b"\xf4")                  # hlt
    machine.write_memory(0x100100, b"\xcf")                  # iret
    machine.boot("protected", 0x100000, cpl=3)
    machine.write_memory(0x4000 + 13 * 8, pack_gate(0x100100, 0x08, SYS_INT_GATE))
    result = machine.run(max_instructions=1000, timeout=30)
    assert result.stop.reason is StopReason.LIMIT and result.stop.exit_status == 10
    assert result.stats["exceptions_delivered"] > 500


def test_on_exit_skip_exception_loop_ends_at_the_limit():
    # #UD intercepted and skipped by the caller's L1: each exit moves on to a jump back.
    machine = Machine()
    machine.write_memory(0x7C00, asm("ud2; jmp 0x7c00", 16, 0x7C00))
    machine.boot("real", 0x7C00)
    controls = InterceptControls()
    controls.set(ExitCode.EXCP6)
    machine.enter_guest(controls, on_exit="skip")
    result = machine.run(max_instructions=300, timeout=30)
    assert result.stop.reason is StopReason.LIMIT
    assert result.stats["vmexits"] + result.instructions >= 300


# -- Ctrl-C ----------------------------------------------------------------------------------
def test_interrupt_from_another_thread_ends_a_tight_loop():
    machine = Machine()
    machine.write_memory(0x7C00, asm("jmp 0x7c00", 16, 0x7C00))
    machine.boot("real", 0x7C00)
    threading.Timer(0.2, machine.interrupt).start()
    result = machine.run(timeout=20)
    assert result.stop.reason is StopReason.INTERRUPTED and result.stop.exit_status == 130
    # The request is consumed: the next run goes on until its own stop.
    assert machine.run(timeout=0.3).stop.reason is StopReason.TIMEOUT


def test_interrupt_while_hooks_fire_constantly():
    machine = Machine()
    machine.write_memory(0x7C00, asm("cpuid; jmp 0x7c00", 16, 0x7C00))
    machine.boot("real", 0x7C00)
    controls = InterceptControls()
    controls.set(ExitCode.CPUID)
    machine.enter_guest(controls, on_exit="skip")
    threading.Timer(0.2, machine.interrupt).start()
    assert machine.run(timeout=20).stop.reason is StopReason.INTERRUPTED


def test_an_interrupt_between_runs_ends_the_next_run():
    machine = Machine()
    machine.write_memory(0x7C00, asm("nop; hlt", 16, 0x7C00))
    machine.boot("real", 0x7C00)
    machine.interrupt()
    assert machine.run().stop.reason is StopReason.INTERRUPTED


def _thread_names(pid):
    names = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            names.append((task / "comm").read_text().strip())
    except OSError:                    # a thread (or the process) ended while being listed
        pass
    return names


def _interrupt_cli(args):
    """Start the CLI, wait until its Ctrl-C watcher thread runs (Linux shows thread names in
    /proc), give the guest a moment, then send SIGINT."""
    process = subprocess.Popen([sys.executable, "-m", "ringminus", *map(str, args)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.poll() is None \
            and "ringminus-ctrlc" not in _thread_names(process.pid):
        time.sleep(0.05)
    time.sleep(0.3)
    sent = time.monotonic()
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=30)
    return process.returncode, out, err, time.monotonic() - sent


@pytest.mark.parametrize("extra", [[], ["--guest", "--intercept", "cpuid", "--on-exit", "skip"]])
def test_ctrl_c_ends_a_cli_run_with_its_summary(tmp_path, extra):
    image = tmp_path / "spin.bin"
    image.write_bytes(asm("cpuid; jmp 0x7c00", 16, 0x7C00))
    status, out, err, _ = _interrupt_cli(["run", "--json", *extra, image])
    assert status == 130 and err == ""
    assert json.loads(out)["stop"]["reason"] == "interrupted"


def test_ctrl_c_ends_the_harness_with_a_partial_report(tmp_path):
    spin = "\n".join(f"""
[[vector]]
name = "spin{n}"
mode = "real"
code = "ebfe"                   # jmp $
intercepts = ["cpuid"]
expect = {{ vmexit = "cpuid" }}
""" for n in range(400))          # each spins to the harness's instruction limit
    (tmp_path / "spin.toml").write_text(spin)
    status, out, err, _ = _interrupt_cli(["harness", tmp_path])
    assert status == 130 and "Traceback" not in err and "Exception ignored" not in err
    lines = out.splitlines()
    assert lines[-2].startswith("interrupted after ") and lines[-1].endswith("failed")


# -- found by the project's own fuzz campaigns ------------------------------------------------
def test_qemu_profile_rsm_reads_control_fields_as_32_bits():
    # F.11: QEMU's SMI entry writes the low halves of CR0/CR4/DR6/DR7/RFLAGS only, and its RSM
    # reads 32 bits: stale upper bytes in SMRAM are not state (fuzz savemap seed 53).
    machine = Machine(profile="qemu")
    machine.smram.add_range(SMRAM_BASE, 0x10000)
    machine.load_smram(SMRAM_BASE + L.SAVE_AREA + L.offset_of(L.SMRAM_STATE_64, "cr0") - L.SAVE_AREA + 4,
                       b"\x67\x30\xea\x85")
    machine.load_smram(SMM_ENTRY, RSM)
    machine.write_memory(0x7C00, asm("nop; hlt", 16, 0x7C00))
    machine.boot("real", 0x7C00)
    machine.raise_smi()
    result = machine.run(max_instructions=100)
    assert result.stop.reason is StopReason.HLT and result.regs["cr0"] >> 32 == 0


def test_qemu_profile_rsm_ignores_a_stale_guest_mode_flag():
    # QEMU's RSM never reads FED8h/FEE0h; bytes its entry did not write do not send RSM to L2
    # (fuzz savemap seed 629).
    machine = Machine(profile="qemu")
    machine.smram.add_range(SMRAM_BASE, 0x10000)
    for field, value in (("svm_guest", 1), ("svm_guest_vmcb", 0x7_0000_0000)):
        machine.load_smram(machine.smm.smbase + L.offset_of(L.SMRAM_STATE_64, field), value.to_bytes(8, "little"))
    machine.load_smram(SMM_ENTRY, RSM)
    machine.write_memory(0x7C00, asm("nop; hlt", 16, 0x7C00))
    machine.boot("real", 0x7C00)
    machine.raise_smi()
    assert machine.run(max_instructions=100).stop.reason is StopReason.HLT


@pytest.mark.parametrize("boot,at", [("real", 0x7C00), ("protected", 0x100000), ("long", 0x100000)])
def test_a_breakpoint_on_a_precise_out_stops_before_it(boot, at):
    # The OUT's code site performs the OUT inside its hook; a breakpoint there must win
    # (fuzz savemap seed 69).
    machine = Machine()
    machine.write_memory(at, bytes.fromhex("9090e6f4"))      # nop; nop; out 0xf4, al
    machine.boot(boot, at)
    machine.break_at(at + 1)
    machine.break_at(at + 2)
    assert machine.run().stop.reason is StopReason.BREAKPOINT
    second = machine.run()
    assert second.stop.reason is StopReason.BREAKPOINT and second.stop.rip == at + 2
    assert machine.run().stop.reason is StopReason.EXIT


@pytest.mark.parametrize("chipset,offset", [("q35", 0x9D), ("pc", 0x72)])
def test_the_smram_register_reads_what_set_state_set(chipset, offset):
    # --smram-state / Smram.set_state change the register firmware reads back through 0xCFC
    # (fuzz smram seed 4): a read-modify-write must not clear G_SMRAME.
    machine = Machine(chipset=chipset)
    machine.smram.set_state("open")
    address = 0x8000_0000 | (offset & 0xFC)
    machine.write_memory(0x7C00, asm(f"mov eax, {address:#x}; mov dx, 0xcf8; out dx, eax; "
                                     f"mov dx, {0xCFC + (offset & 3):#x}; in al, dx; hlt", 16, 0x7C00))
    machine.boot("real", 0x7C00)
    result = machine.run()
    assert result.regs["rax"] & 0xFF == machine.smram.register and machine.smram.register & 0x48 == 0x48


@pytest.mark.parametrize("boot,bits,at", [("real", 16, 0x7C00), ("protected", 32, 0x100000), ("long", 64, 0x100000)])
@pytest.mark.parametrize("cr4", [0x1000, 0x8000, 0x80_0000])      # LA57, bit 15, CET: not on these models
def test_mov_to_cr4_with_reserved_bits_raises_gp(boot, bits, at, cr4):
    # Unicorn keeps reserved CR4 bits; a later SMI saved them and RSM refused the state the
    # CPU itself produced (fuzz savemap seed 15492).
    machine = Machine()
    reg = "rax" if bits == 64 else "eax"
    code = f"mov {reg}, cr4; or eax, {cr4:#x}; mov cr4, {reg}; hlt"
    machine.write_memory(at, asm(code, bits, at))
    machine.boot(boot, at)
    result = machine.run(max_instructions=50)
    assert result.events and result.events[0]["vector"] == 13 and result.events[0]["error_code"] == 0
    assert not result.regs["cr4"] & cr4


@pytest.mark.parametrize("boot", ["protected", "long"])
def test_boot_again_after_a_run_that_halted(boot):
    # boot() enters the guest through a counted trampoline; code an earlier run translated
    # (the HLT at the entry) must not be counted into it (it raised RuntimeError).
    machine = Machine()
    machine.write_memory(0x100000, bytes.fromhex("90f4"))
    machine.boot(boot, 0x100000)
    assert machine.run().stop.reason is StopReason.HLT
    machine.boot(boot, 0x100000)
    result = machine.run()
    assert result.stop.reason is StopReason.HLT and result.stop.rip == 0x100002


def test_a_skipped_event_exit_consumes_the_event_and_keeps_rip():
    # A caller-L1 with on_exit "skip" that intercepts SMI handled it: one exit, the SMI is no
    # longer pending, and no instruction was skipped (fuzz replay seed 2117).
    machine = Machine()
    machine.write_memory(0x7C00, asm("inc ax; inc ax; inc ax; hlt", 16, 0x7C00))
    machine.boot("real", 0x7C00)
    controls = InterceptControls()
    controls.set(ExitCode.SMI)
    machine.enter_guest(controls, on_exit="skip")
    machine.at_instruction(1, lambda m: m.raise_smi())
    result = machine.run(max_instructions=100)
    assert result.stop.reason is StopReason.HLT and result.regs["rax"] & 0xFFFF == 3
    assert [e["code"] for e in result.events if e["kind"] == "vmexit"] == [int(ExitCode.SMI)]
    assert result.smm["pending"] is False



@pytest.mark.parametrize("exact", [False, True])
def test_ringminus_own_writes_over_translated_code_drop_it(exact):
    # What ringminus writes as the CPU would (an event's stack frame, a save map) lands in
    # guest RAM behind Unicorn's back: code translated from there must not run again.  (Fuzz
    # streams seed 3311261: a real-mode #GP loop pushed its frames down over its handler's
    # MOV CR4, and Unicorn ran the stale translation, unchecked, where the bytes were gone.)
    machine = Machine(exact_instructions=exact)
    machine.write_memory(0x7C00, asm("mov ax, 0x1111; hlt", 16, 0x7C00))
    machine.boot("real", 0x7C00)
    assert machine.run(timeout=30).regs["rax"] & 0xFFFF == 0x1111
    machine.memory.write(0x7C00, asm("mov ax, 0x2222; hlt", 16, 0x7C00))
    machine["rip"], machine.halted = 0x7C00, False
    assert machine.run(timeout=30).regs["rax"] & 0xFFFF == 0x2222
