"""Register names and orders."""

# The general-purpose registers by number: ModRM/REX encoding, the order of QEMU's regs[]
# and of the state-save maps.
GPRS_BY_NUMBER = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", *(f"r{n}" for n in range(8, 16)))
# The same registers in the order people list them (RunResult, --json, the CLI's summary).
GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", *(f"r{n}" for n in range(8, 16)))
LEGACY_GPRS = GPRS[:8]                     # those a 32-bit CPU has (as eax, ebx, …)
SEGMENT_REGISTERS = ("cs", "ds", "es", "fs", "gs", "ss")
SEGMENTS_BY_NUMBER = ("es", "cs", "ss", "ds", "fs", "gs")      # Sreg encoding, QEMU's segs[], the maps
SYSTEM_SEGMENTS = ("ldtr", "tr")
CONTROL = ("cr0", "cr2", "cr3", "cr4")
