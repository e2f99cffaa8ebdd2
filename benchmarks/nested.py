"""Nested world switches: an in-guest L1 hypervisor VMRUNs an L2 whose every iteration exits
on CPUID; L1 moves save.rip to NEXT_RIP and VMRUNs again, N times.  The full-entry variant
wraps each VMRUN as real hypervisors (and kvm-unit-tests' harness) do: CLGI; VMLOAD; VMRUN;
VMSAVE; STGI (target: at least 0.8 of the bare-VMRUN rate).

One round trip = VMRUN (host state to the HSAVE page, guest state from the VMCB, intercepts
armed) + L2 runs to its CPUID + #VMEXIT (guest state and EXITCODE/NEXT_RIP into the VMCB in
guest memory, host state back) + L1's few instructions.  Target: >= 20,000 exits/s.

Baselines, on the same guest image in the same process (DESIGN.md §3 rule 5):

* **bare Unicorn + minimal Python switch**: the same L1 and L2 bytes on a bare Unicorn, where
  VMRUN arrives through Unicorn's #UD hook and the L2 CPUID through a one-address code hook
  (the same two mechanisms ringminus uses), and Python does the least a switch can do: RIP,
  RSP and RAX each way, EXITCODE and NEXT_RIP into the VMCB.  It is a floor for any Python
  world switch, not an emulator: no checks, no segment/CR/EFER state, no intercept vector.
* **bare Unicorn, native loop**: L1's loop alone with VMRUN replaced by a 3-byte NOP (no L2,
  no Python): what the guest instructions themselves cost.

Nested paging (the ``max`` model): the same loop with NP_ENABLE and an identity map at N_CR3
(4 KiB pages below 4 MiB, 2 MiB above), its L2 storing to one page every iteration (a warm
working set) or to a fresh page every iteration — against the same two L2s without nested
paging.  With nested paging ringminus fills Unicorn's TLB itself (a Python walk of both
stages per miss), and every VMRUN and #VMEXIT flushes it, as KVM's nested transitions do.

Each figure is the best of ``--repeat`` runs (exit rates on a shared machine vary by 2x).
Timing is never asserted in tests.

    python benchmarks/nested.py [--json FILE] [--exits N] [--repeat R]
"""
import struct
import sys
from time import perf_counter

from unicorn import UC_HOOK_CODE, UC_HOOK_INSN_INVALID, Uc
from unicorn import x86_const as X

# common before ringminus: it puts the repository root on sys.path.
from common import (UNICORN_VERSION, add_repeat, assemble, banner, bare_uc, fastest, make_parser,
                    write_json)
from ringminus import Machine, StopReason
from ringminus.intercepts.profiles import PROFILES
from ringminus.intercepts.vmcb import VMCB_SIZE, vmcb_view

L1_CODE, L2_CODE, L2_STACK = 0x100000, 0x200000, 0x380000
VMCB, HSAVE = 0x300000, 0x301000
IOPM, MSRPM = 0x304000, 0x308000
EXIT_CPUID, INTERCEPT_VMRUN, INTERCEPT_HLT = 0x72, 0x80, 0x78
VMRUN = bytes.fromhex("0f01d8")
EXITCODE, NRIP, SAVE_RIP, SAVE_RSP, SAVE_RAX = 0x70, 0xC8, 0x578, 0x5D8, 0x5F8

# L1: EFER.SVME and VM_HSAVE_PA, then VMRUN / check the exit / RIP := NEXT_RIP, N times.
# R12 (the count) and RBX (the VMCB) survive: L2 never writes them and VMRUN/#VMEXIT leave
# every GPR but RAX and RSP alone.
L1 = """
    mov ecx, 0xC0000080
    rdmsr
    or eax, 0x1000
    wrmsr
    mov ecx, 0xC0010117
    mov eax, {hsave}
    xor edx, edx
    wrmsr
    mov r12, {n}
    mov rbx, {vmcb}
again:
    mov rax, rbx
vmrun_here:
    {entry}
    cmp qword ptr [rbx + {exitcode}], {cpuid}
    jne wrong_exit
    mov rdx, [rbx + {nrip}]
    mov [rbx + {save_rip}], rdx
    dec r12
    jnz again
    hlt
wrong_exit:
    mov al, 1
    out 0xf4, al
"""
# L2: a CPUID per iteration, each one exits.
L2 = "l: mov eax, 0\ncpuid\njmp l"
# L2s that store to memory first: one page over and over, or the next page each time (RSI
# starts at FRESH_BASE; L1 never writes RSI, so it survives the exits).
L2_WARM = "l: mov eax, 0\nmov [0x390000], eax\ncpuid\njmp l"
L2_FRESH = "l: mov eax, 0\nmov [rsi], eax\nadd rsi, 0x1000\ncpuid\njmp l"
FRESH_BASE = 0x1000000
NPT_TABLES = 0x3C0000                   # PML4, PDPT, PD, two page tables


BARE_ENTRY = ".byte 0x0f, 0x01, 0xd8"                  # VMRUN
FULL_ENTRY = "\n".join(f".byte 0x0f, 0x01, {b:#x}" for b in (0xdd, 0xda, 0xd8, 0xdb, 0xdc))   # CLGI VMLOAD VMRUN VMSAVE STGI


def l1_code(exits: int, entry: str = BARE_ENTRY) -> bytes:
    return assemble(L1.format(hsave=HSAVE, n=exits, vmcb=VMCB, exitcode=EXITCODE, cpuid=EXIT_CPUID,
                              nrip=NRIP, save_rip=SAVE_RIP, entry=entry), L1_CODE)


def vmcb_bytes() -> bytes:
    """A 64-bit CPL-0 L2 on L1's GDT and page tables; VMRUN, HLT and CPUID intercepted."""
    buffer = bytearray(VMCB_SIZE)
    v = vmcb_view(buffer)
    control, save = v["control"], v["save"]
    control["intercepts"][3] = 1 << (EXIT_CPUID - 0x60) | 1 << (INTERCEPT_HLT - 0x60)
    control["intercepts"][4] = 1 << (INTERCEPT_VMRUN - 0x80)
    control["guest_asid"] = 1
    control["iopm_base_pa"], control["msrpm_base_pa"] = IOPM, MSRPM
    for name, selector, attrib in (("cs", 0x28, 0xA9B), ("ds", 0x10, 0xC93), ("es", 0x10, 0xC93), ("ss", 0x10, 0xC93)):
        save[name]["selector"], save[name]["attrib"], save[name]["limit"] = selector, attrib, 0xFFFF_FFFF
    save["gdtr"]["base"], save["gdtr"]["limit"] = 0x1000, 0x47
    save["idtr"]["base"], save["idtr"]["limit"] = 0x4000, 0xFFF
    save["efer"], save["cr0"], save["cr3"], save["cr4"] = 0x1500, 0x8000_0011, 0x10000, 0x20
    save["dr6"], save["dr7"], save["rflags"] = 0xFFFF_0FF0, 0x400, 0x2
    save["rip"], save["rsp"] = L2_CODE, L2_STACK
    return bytes(buffer)


def nested_tables() -> bytes:
    """An identity map for N_CR3 = NPT_TABLES: 4 KiB pages below 4 MiB, 2 MiB pages to 1 GiB."""
    pml4, pdpt, pd, pt = (NPT_TABLES + i * 0x1000 for i in range(4))
    directory = [pt | 7, (pt + 0x1000) | 7] + [(i << 21) | 0x87 for i in range(2, 512)]
    return b"".join((struct.pack("<Q", pdpt | 7).ljust(0x1000, b"\0"), struct.pack("<Q", pd | 7).ljust(0x1000, b"\0"),
                     struct.pack("<512Q", *directory), struct.pack("<1024Q", *[(i << 12) | 7 for i in range(1024)])))


def ringminus_run(exits: int, profile: str = "kvm", entry: str = BARE_ENTRY, l2: str = L2, npt: bool = False) -> dict:
    machine = Machine(profile=profile, cpu_model="max" if npt else "qemu64",
                      memory_size=(FRESH_BASE >> 20) + (exits >> 8) + 2 << 20 if l2 is L2_FRESH else 64 << 20)
    machine.write_memory(L1_CODE, l1_code(exits, entry))
    machine.write_memory(L2_CODE, assemble(l2, L2_CODE))
    vmcb = bytearray(vmcb_bytes())
    if npt:
        control = vmcb_view(vmcb)["control"]
        control["nested_control"], control["n_cr3"] = 1, NPT_TABLES
        machine.write_memory(NPT_TABLES, nested_tables())
    machine.write_memory(VMCB, bytes(vmcb))
    machine.boot("long", L1_CODE)
    machine["rsi"] = FRESH_BASE
    t = perf_counter()
    result = machine.run()
    elapsed = perf_counter() - t
    taken = result.stats.get("vmexits", 0)
    if result.stop.reason is not StopReason.HLT or taken != exits or result.regs["r12"] != 0:
        raise RuntimeError(f"ringminus: stopped with {result.stop}, {taken} exits, r12 = {result.regs['r12']}")
    code = struct.unpack("<q", machine.read_memory(VMCB + EXITCODE, 8))[0]
    if code != EXIT_CPUID:
        raise RuntimeError(f"ringminus: last EXITCODE {code:#x}, not CPUID")
    return {"exits": taken, "seconds": elapsed}


def l1_uc(l1: bytes) -> Uc:
    """L1's flat long-mode world on a bare Unicorn: identity map, 64-bit code segment."""
    return bare_uc(l1, L1_CODE, 4 << 20, rsp=0x80000)


def bare_switch_run(exits: int) -> dict:
    """Bare Unicorn with the least Python world switch (see the module docstring)."""
    l1 = l1_code(exits)
    l2 = assemble(L2, L2_CODE)
    uc = l1_uc(l1)
    uc.mem_write(L2_CODE, l2)
    uc.mem_write(VMCB, vmcb_bytes())
    cpuid_at = L2_CODE + len(assemble("mov eax, 0", L2_CODE))
    host = {}
    count = [0]

    def on_vmrun(uc, _data):                        # VMRUN: host out, guest in
        rip = uc.reg_read(X.UC_X86_REG_RIP)
        if uc.mem_read(rip, 3) != VMRUN:
            return False
        vmcb = uc.reg_read(X.UC_X86_REG_RAX)
        host["rip"], host["rsp"], host["rax"] = rip + 3, uc.reg_read(X.UC_X86_REG_RSP), vmcb
        guest_rip, = struct.unpack("<Q", uc.mem_read(vmcb + SAVE_RIP, 8))
        guest_rsp, = struct.unpack("<Q", uc.mem_read(vmcb + SAVE_RSP, 8))
        guest_rax, = struct.unpack("<Q", uc.mem_read(vmcb + SAVE_RAX, 8))
        uc.reg_write(X.UC_X86_REG_RSP, guest_rsp)
        uc.reg_write(X.UC_X86_REG_RAX, guest_rax)
        uc.reg_write(X.UC_X86_REG_RIP, guest_rip)
        return True

    def on_cpuid(uc, address, _size, _data):        # #VMEXIT(CPUID): guest out, host in
        count[0] += 1
        vmcb = host["rax"]
        uc.mem_write(vmcb + EXITCODE, struct.pack("<q", EXIT_CPUID))
        uc.mem_write(vmcb + NRIP, struct.pack("<Q", address + 2))
        uc.mem_write(vmcb + SAVE_RIP, struct.pack("<Q", address))
        uc.mem_write(vmcb + SAVE_RSP, struct.pack("<Q", uc.reg_read(X.UC_X86_REG_RSP)))
        uc.mem_write(vmcb + SAVE_RAX, struct.pack("<Q", uc.reg_read(X.UC_X86_REG_RAX)))
        uc.reg_write(X.UC_X86_REG_RSP, host["rsp"])
        uc.reg_write(X.UC_X86_REG_RAX, vmcb)
        uc.reg_write(X.UC_X86_REG_RIP, host["rip"])

    uc.hook_add(UC_HOOK_INSN_INVALID, on_vmrun)
    uc.hook_add(UC_HOOK_CODE, on_cpuid, begin=cpuid_at, end=cpuid_at)
    # L1's RDMSR/WRMSR of EFER/VM_HSAVE_PA run natively (Unicorn's Haswell drops SVME).
    t = perf_counter()
    uc.emu_start(L1_CODE, 0xFFFF_FFFF_FFFF_FFFF)
    elapsed = perf_counter() - t
    if count[0] != exits or uc.reg_read(X.UC_X86_REG_R12) != 0:
        raise RuntimeError(f"bare switch: {count[0]} exits, r12 = {uc.reg_read(X.UC_X86_REG_R12)}")
    return {"exits": count[0], "seconds": elapsed}


def bare_native_run(exits: int) -> dict:
    """L1's loop with VMRUN as a 3-byte NOP and the VMCB already holding a CPUID exit."""
    l1 = l1_code(exits).replace(VMRUN, bytes.fromhex("0f1f00"), 1)
    uc = l1_uc(l1)
    uc.mem_write(VMCB, vmcb_bytes())
    uc.mem_write(VMCB + EXITCODE, struct.pack("<q", EXIT_CPUID))
    t = perf_counter()
    uc.emu_start(L1_CODE, 0xFFFF_FFFF_FFFF_FFFF)
    elapsed = perf_counter() - t
    if uc.reg_read(X.UC_X86_REG_R12) != 0:
        raise RuntimeError("bare native: the loop did not finish")
    return {"exits": exits, "seconds": elapsed}


def best(run, exits: int, repeat: int) -> dict:
    fastest_run = fastest(lambda: run(exits), repeat, key=lambda r: r["seconds"])
    return {**fastest_run, "exits_per_s": fastest_run["exits"] / fastest_run["seconds"],
            "us_per_round_trip": fastest_run["seconds"] / fastest_run["exits"] * 1e6}


def main(argv=None) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--exits", type=int, default=20_000, help="round trips per run (default 20,000)")
    add_repeat(parser)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="kvm",
                        help="ringminus's profile (kvm keeps the host state as KVM does; apm and qemu "
                             "write it to the HSAVE page and read it back)")
    args = parser.parse_args(argv)
    if args.exits < 1 or args.repeat < 1 or args.exits >= 2 ** 31:
        parser.error("--exits must be 1 .. 2^31-1 and --repeat at least 1")
    banner(f"{args.exits:,} CPUID round trips per run", f"best of {args.repeat}", f"profile {args.profile}")
    nested = best(lambda exits: ringminus_run(exits, args.profile), args.exits, args.repeat)
    full = best(lambda exits: ringminus_run(exits, args.profile, FULL_ENTRY), args.exits, args.repeat)
    paging = {(name, npt): best(lambda exits, l2=l2, npt=npt: ringminus_run(exits, args.profile, l2=l2, npt=npt),
                                args.exits, args.repeat)
              for name, l2 in (("warm", L2_WARM), ("fresh", L2_FRESH)) for npt in (False, True)}
    switch = best(bare_switch_run, args.exits, args.repeat)
    native = best(bare_native_run, args.exits, args.repeat)
    target = 20_000
    print(f"ringminus, in-guest L1 (VMRUN + CPUID #VMEXIT): {nested['exits_per_s']:>10,.0f} exits/s "
          f"({nested['us_per_round_trip']:.1f} us per round trip; target >= {target:,}/s: "
          f"{'met' if nested['exits_per_s'] >= target else 'NOT met'})")
    full_ratio = full["exits_per_s"] / nested["exits_per_s"]
    print(f"ringminus, CLGI; VMLOAD; VMRUN; VMSAVE; STGI:   {full['exits_per_s']:>10,.0f} exits/s "
          f"({full['us_per_round_trip']:.1f} us; {full_ratio:.2f} of bare VMRUN, target >= 0.8: "
          f"{'met' if full_ratio >= 0.8 else 'NOT met'})")
    print(f"bare Unicorn + minimal Python switch:           {switch['exits_per_s']:>10,.0f} exits/s "
          f"({switch['us_per_round_trip']:.1f} us per round trip)")
    print(f"bare Unicorn, native loop (VMRUN as NOP):       {native['exits_per_s']:>10,.0f} iterations/s "
          f"({native['us_per_round_trip'] * 1000:.0f} ns each)")
    for name, what in (("warm", "one page over and over"), ("fresh", "a fresh page each time ")):
        off, on = paging[(name, False)], paging[(name, True)]
        print(f"L2 stores to {what}: NPT off {off['exits_per_s']:>8,.0f}/s, NPT on {on['exits_per_s']:>8,.0f}/s "
              f"({on['exits_per_s'] / off['exits_per_s']:.2f} of off)")
    ratio = nested["us_per_round_trip"] / switch["us_per_round_trip"]
    print(f"ratio: a ringminus world switch costs {ratio:.1f}x the minimal Python switch")
    write_json(args.json, {"ringminus": nested, "ringminus_full_entry": full, "full_entry_ratio": full_ratio,
                           "bare_minimal_switch": switch, "bare_native_loop": native,
                           "ratio_to_minimal_switch": ratio, "target_exits_per_s": target,
                           "nested_paging": {f"{name}_{'on' if npt else 'off'}": figure
                                             for (name, npt), figure in paging.items()},
                           "unicorn": UNICORN_VERSION, "profile": args.profile})
    return 0


if __name__ == "__main__":
    sys.exit(main())
