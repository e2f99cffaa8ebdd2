"""SVM exit codes (APM Vol. 2 Appendix C; semantics.md §B.1) — the one home for them.

Names are the APM's without ``VMEXIT_``; files and the CLI use them lower-cased
(``cr0_read``, ``excp13``, ``cr0_sel_write``), and Linux's ``SVM_EXIT_*`` spellings
(``read_cr0``, ``write_cr0``, ``excp_13``, ``err``) are accepted as aliases.  For every code
0x000–0x0A6 the intercept bit number equals the exit code (§A.9); 0x000 is a valid code, so
"no intercept" is never spelled 0 (§F.17).
"""
from __future__ import annotations

from enum import IntEnum

_MEMBERS: dict[str, int] = {}
for _n in range(16):
    _MEMBERS[f"CR{_n}_READ"] = 0x000 + _n
    _MEMBERS[f"CR{_n}_WRITE"] = 0x010 + _n
    _MEMBERS[f"DR{_n}_READ"] = 0x020 + _n
    _MEMBERS[f"DR{_n}_WRITE"] = 0x030 + _n
for _v in range(32):
    _MEMBERS[f"EXCP{_v}"] = 0x040 + _v
_MEMBERS.update({
    "INTR": 0x060, "NMI": 0x061, "SMI": 0x062, "INIT": 0x063, "VINTR": 0x064,
    "CR0_SEL_WRITE": 0x065, "IDTR_READ": 0x066, "GDTR_READ": 0x067, "LDTR_READ": 0x068,
    "TR_READ": 0x069, "IDTR_WRITE": 0x06A, "GDTR_WRITE": 0x06B, "LDTR_WRITE": 0x06C,
    "TR_WRITE": 0x06D, "RDTSC": 0x06E, "RDPMC": 0x06F, "PUSHF": 0x070, "POPF": 0x071,
    "CPUID": 0x072, "RSM": 0x073, "IRET": 0x074, "SWINT": 0x075, "INVD": 0x076,
    "PAUSE": 0x077, "HLT": 0x078, "INVLPG": 0x079, "INVLPGA": 0x07A, "IOIO": 0x07B,
    "MSR": 0x07C, "TASK_SWITCH": 0x07D, "FERR_FREEZE": 0x07E, "SHUTDOWN": 0x07F,
    "VMRUN": 0x080, "VMMCALL": 0x081, "VMLOAD": 0x082, "VMSAVE": 0x083, "STGI": 0x084,
    "CLGI": 0x085, "SKINIT": 0x086, "RDTSCP": 0x087, "ICEBP": 0x088, "WBINVD": 0x089,
    "MONITOR": 0x08A, "MWAIT": 0x08B, "MWAIT_CONDITIONAL": 0x08C, "XSETBV": 0x08D,
    "RDPRU": 0x08E, "EFER_WRITE_TRAP": 0x08F,
    **{f"CR{_n}_WRITE_TRAP": 0x090 + _n for _n in range(16)},
    "INVLPGB": 0x0A0, "INVLPGB_ILLEGAL": 0x0A1, "INVPCID": 0x0A2, "MCOMMIT": 0x0A3,
    "TLBSYNC": 0x0A4, "BUSLOCK": 0x0A5, "IDLE_HLT": 0x0A6,
    "NPF": 0x400, "AVIC_INCOMPLETE_IPI": 0x401, "AVIC_NOACCEL": 0x402, "VMGEXIT": 0x403,
    "INVALID": -1,
})

ExitCode = IntEnum("ExitCode", _MEMBERS)
ExitCode.__doc__ = "An SVM exit code; the intercept bit of codes 0x000-0x0A6 is the code itself."

# Linux (asm/svm.h SVM_EXIT_*) spellings that differ from the APM's.
_LINUX_ALIASES = {
    **{f"read_cr{n}": f"cr{n}_read" for n in range(16)},
    **{f"write_cr{n}": f"cr{n}_write" for n in range(16)},
    **{f"read_dr{n}": f"dr{n}_read" for n in range(16)},
    **{f"write_dr{n}": f"dr{n}_write" for n in range(16)},
    **{f"excp_{v}": f"excp{v}" for v in range(32)},
    **{f"cr{n}_wtrap": f"cr{n}_write_trap" for n in range(16)},
    "cr0_sel_write": "cr0_sel_write", "exception_base": "excp0", "read_idtr": "idtr_read",
    "read_gdtr": "gdtr_read", "read_ldtr": "ldtr_read", "read_tr": "tr_read",
    "write_idtr": "idtr_write", "write_gdtr": "gdtr_write", "write_ldtr": "ldtr_write",
    "write_tr": "tr_write", "efer_wtrap": "efer_write_trap", "npf": "npf", "err": "invalid",
    "vmexit_invalid": "invalid", "mwait_cond": "mwait_conditional", "invlpgb_illegal": "invlpgb_illegal",
    "avic_unaccelerated_access": "avic_noaccel",
}


_NAMES = {int(code): code.name.lower() for code in ExitCode}


def exit_name(code: int) -> str:
    """The lower-case APM name of an exit code (``excp14``, ``cr0_sel_write``)."""
    return _NAMES[int(code)]


def parse_exit(text: str) -> ExitCode:
    """An exit code from its name (APM or Linux spelling, any case, optional ``vmexit_`` /
    ``svm_exit_`` prefix) or its number; ValueError with the reason otherwise."""
    word = text.strip().lower()
    for prefix in ("svm_exit_", "vmexit_"):
        if word.startswith(prefix) and word != "vmexit_invalid":
            word = word[len(prefix):]
    word = _LINUX_ALIASES.get(word, word)
    try:
        return ExitCode[word.upper()]
    except KeyError:
        pass
    try:
        return ExitCode(int(word, 0))
    except ValueError:
        raise ValueError(f"unknown exit code {text!r}") from None
