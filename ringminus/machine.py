"""The composition root: ``Machine`` is the core (emulator/) with the features plugged in —
the intercepts, SVM, SMM and the hypercall conduit, each through its ``install`` — and the
public methods that belong to them."""
from __future__ import annotations

from .decode.table import EXECUTED_ROWS
from .emulator.machine import DEFAULT_MEMORY, Core
from .arch.exceptions import gp
from .arch.msrs import EXISTING_MSRS
from .emulator.plugins import Msr, OnExit
from .emulator.ports import DEBUGCON_PORT
from .hypercalls import plugin as hypercalls
from .intercepts import plugin as intercepts
from .intercepts.controls import InterceptControls
from .intercepts.profiles import DEFAULT_PROFILE, profile as profile_named
from .platform import boards
from .smm import plugin as smm_feature
from .smm.world import GuestModeHook
from .svm import plugin as svm, world as svm_world


FEATURES = (intercepts, svm, smm_feature, hypercalls)         # then the platform (boards)

# Every decode-table row Unicorn cannot run has exactly one feature that executes it.
_executed = [row for feature in FEATURES for row in getattr(feature, "EXECUTES", ())]
if sorted(_executed) != sorted(EXECUTED_ROWS):
    raise ImportError(f"rows without an executor, or executed twice: {sorted(set(_executed) ^ EXECUTED_ROWS)}")


def _missing_msr(*_):
    raise gp()


class Machine(Core):
    def __init__(self, memory_size: int = DEFAULT_MEMORY, cpu_model: str = "qemu64",
                 debugcon_port: int = DEBUGCON_PORT, exact_instructions: bool = False,
                 chipset: str = "q35", profile: str = DEFAULT_PROFILE, apm_smi: bool = False,
                 machine: str = "none", clock: str = "virtual"):
        """``machine``: ``none`` (the bare machine, with ``chipset``'s SMRAM control and APM
        port), or QEMU's ``pc`` or ``q35`` board (platform/)."""
        super().__init__(memory_size, cpu_model, debugcon_port, exact_instructions, clock)
        self.profile = profile_named(profile)    # the named choices where KVM, the APM and QEMU differ
        intercepts.install(self)
        svm.install(self)
        smm_feature.install(self)
        # An SMI in guest mode: SVM fills FED8h/FEE0h, leaves guest mode, and RSM returns to it.
        smm_feature.add_guest_mode_hook(self, GuestModeHook(svm_world.smm_fields, svm_world.suspend_for_smm,
                                                            svm_world.resume_after_rsm))
        hypercalls.install(self)
        boards.install(self, machine, chipset, apm_smi)
        # Last: an MSR no one has (arch/msrs.py) faults, where the profile says it does.
        self.add_msr(Msr(lambda msr: self.profile.missing_msr_faults and msr not in EXISTING_MSRS,
                         _missing_msr, _missing_msr))

    def load_bios(self, data: bytes) -> None:
        """Map a ``-bios`` image as QEMU does (read-only, ending at 4 GiB and, through PAM on
        a board, at 1 MiB)."""
        if self.board is None:
            super().load_bios(data)
        else:
            self.board.load_bios(data)

    # -- running as L2 (intercepts/) --------------------------------------------------------
    def enter_guest(self, controls: InterceptControls, profile: str | None = None,
                    on_exit: OnExit | str = OnExit.STOP) -> None:
        """Run the guest as L2 under ``controls``: you play L1 (``on_exit`` stop: the run
        stops at each exit; skip: it goes on after the intercepted instruction), or the guest
        plays it (l1: exits are #VMEXITs into the guest's hypervisor, as after its VMRUN).
        ``profile`` (default: the machine's) also becomes the machine's profile."""
        l1_exit = (lambda exit_, hook: svm_world.vmexit_to_l1(self, exit_, hook)) \
            if OnExit(on_exit) is OnExit.L1 else None
        intercepts.enter_guest(self, controls, profile, on_exit, l1_exit)

    def leave_guest(self) -> None:
        intercepts.leave_guest(self)

    def skip_instruction(self) -> None:
        """After a vmexit stop: resume at the exit's next RIP, as an L1 that emulated it."""
        intercepts.skip_instruction(self)

    @property
    def guest(self):
        """The guest running as L2 (intercepts.Guest), or None."""
        return self.gate

    # -- SVM (svm/) -------------------------------------------------------------------------
    @property
    def gif(self) -> bool:
        """The global interrupt flag (APM §15.17): STGI sets it, CLGI and #VMEXIT clear it."""
        return self.svm.gif

    # -- SMM (smm/) -------------------------------------------------------------------------
    def raise_smi(self) -> None:
        """An SMI: taken at the next instruction boundary, or latched while in SMM."""
        smm_feature.raise_smi(self)

    def set_smm_state(self, smm: bool | None = None, pending: bool | None = None,
                      inside_nmi: bool | None = None, latched_init: bool | None = None) -> None:
        """Like KVM's SET_VCPU_EVENTS with VALID_SMM (semantics.md §C.8): flipping ``smm``
        switches the memory view only — no state is saved or restored."""
        smm_feature.set_smm_state(self, smm, pending, inside_nmi, latched_init)

    def load_smram(self, address: int, data: bytes) -> None:
        """Place bytes straight into SMRAM (whatever the view)."""
        self.smram.load(address, data)

    def set_smbase(self, smbase: int) -> None:
        smm_feature.set_smbase(self, smbase)
