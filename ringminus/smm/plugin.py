"""SMM as a feature of the machine: the SMI (an event source between INIT and NMI), RSM (an
executor, in the hook when it can) and SMRAM's private views (a memory-miss handler); SMM's
parts of snapshots and results.  The chipset that opens SMRAM and raises SMIs is the
platform's (platform/chipset.py)."""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from ..arch.exceptions import Vector
from ..arch.exitcodes import ExitCode
from ..emulator.delivery import Event, EventKind
from ..emulator.plugins import Part, Source
from ..emulator.result import Section
from .smram import Smram
from .world import GuestModeHook, SmmState, enter_smm, leave_smm

if TYPE_CHECKING:
    from ..decode.decoder import Instruction
    from ..emulator.plugins import HookContext
    from ..machine import Machine


EXECUTES = ("rsm",)                     # the decode-table rows this feature executes


def install(machine: "Machine") -> None:
    machine.smm = SmmState()
    machine.smm_guest_mode_hooks = ()        # add_guest_mode_hook
    machine.smm_codecs = {}                  # (64-bit map, profile) -> MapCodec (world.codec_for)
    machine.smram = Smram(machine.memory)
    machine.add_event_source(Source(
        20, "smi", _smi_pending, _smi_pending, ExitCode.SMI, _take_smi, _consume_smi,
        lambda m: int(m.profile.smi_exitinfo), take_in_hook=_take_smi))          # F.8
    machine.add_event_hold(lambda: machine.smm.in_smm, init_only=True)     # INIT waits for RSM
    machine.add_executor("rsm", lambda insn: _rsm(machine, insn), in_hook=lambda insn, hook: _rsm_in_hook(machine, hook))
    machine.add_miss_handler(machine.smram.hidden_at, machine.smram.reveal)
    machine.add_reported_stat("smram_swaps", lambda: machine.smram.swaps)
    machine.add_snapshot_part(Part(11, "smram", _take_smram, _put_smram,
                                   shape=lambda m: tuple((r.base, r.size) for r in m.smram.ranges)))
    machine.add_snapshot_part(Part(20, "smm", lambda m: copy.copy(m.smm), lambda m, smm: setattr(m, "smm", copy.copy(smm))))
    machine.add_snapshot_part(Part(100, "views", _take_views, _put_views_part))
    machine.add_result_section(lambda stop: Section(
        "smm", machine.smm.as_dict(machine.smram.state, machine.init_pending)))


def add_guest_mode_hook(machine: "Machine", hook: GuestModeHook) -> None:
    """What the feature that runs guests does when an SMI arrives in guest mode and RSM returns."""
    machine.smm_guest_mode_hooks += (hook,)


def raise_smi(machine: "Machine") -> None:
    """An SMI: taken at the next instruction boundary, or latched while in SMM.  Raised by an
    I/O instruction (the APM port), it records that instruction (APM §10.3.5)."""
    smm = machine.smm
    if not smm.pending:
        smm.io_instruction = machine.io_access
    smm.pending = True


def _smi_pending(machine: "Machine") -> bool:
    return machine.smm.pending and not machine.smm.in_smm


def _take_smi(machine: "Machine", hook: "HookContext | None" = None) -> None:
    """From the run loop, or inside a ``hook`` that just finished an instruction."""
    machine.smm.pending = False
    enter_smm(machine, hook)                # an SMI also ends a halt


def _consume_smi(machine: "Machine") -> None:
    machine.smm.pending = False


def _rsm(machine: "Machine", insn: "Instruction") -> None:
    """RSM, from the run loop."""
    if not machine.smm.in_smm:
        machine.deliver(Event(Vector.UD, EventKind.EXCEPTION, insn.address))
        return
    machine.retire(1)
    leave_smm(machine)


def _rsm_in_hook(machine: "Machine", hook: "HookContext") -> bool:
    """RSM inside the #UD hook, as SMM handlers end: the world switch without a slice end."""
    if not machine.smm.in_smm:
        return False
    machine.retire(1)
    leave_smm(machine, hook)
    machine.continue_in_hook()
    return True


def set_smm_state(machine: "Machine", smm: bool | None = None, pending: bool | None = None,
                  inside_nmi: bool | None = None, latched_init: bool | None = None) -> None:
    """Like KVM's SET_VCPU_EVENTS with VALID_SMM (semantics.md §C.8): flipping ``smm``
    switches the memory view only — no state is saved or restored."""
    state = machine.smm
    if smm is not None and smm != state.in_smm:
        state.in_smm = smm
        machine.smram.set_smm(smm)
        if not smm:
            state.inside_nmi = False
    if pending is not None:
        state.pending = pending
    if inside_nmi is not None and state.in_smm:
        state.inside_nmi = inside_nmi
    if latched_init is not None:
        machine.init_pending = latched_init


def set_smbase(machine: "Machine", smbase: int) -> None:
    if not 0 <= smbase < 1 << 32:
        raise ValueError(f"SMBASE {smbase:#x} must lie below 4 GiB")
    machine.smm.smbase = smbase


# -- snapshot parts ------------------------------------------------------------------------------

def _take_smram(machine: "Machine") -> tuple:
    return tuple(r.data.copy() for r in machine.smram.ranges)


def _put_smram(machine: "Machine", state: tuple) -> None:
    for smram_range, data in zip(machine.smram.ranges, state):
        smram_range.data[:] = data


def _take_views(machine: "Machine") -> tuple:
    smram = machine.smram
    return smram.register, tuple(r.hidden for r in smram.ranges), smram.swaps


def _put_views_part(machine: "Machine", state: tuple) -> None:
    register, hidden, swaps = state
    _put_views(machine.smram, register, machine.smm.in_smm, hidden)
    machine.smram.swaps = swaps


def _put_views(smram, register: int, in_smm: bool, hidden: tuple[bool, ...]) -> None:
    """Map the SMRAM ranges as the snapshot had them.  A mapped range always shows its right
    view (smram.py), so the mapping is one flag per range: first hide every range (each
    range's view changes in one of two flips of visibility — every range visible, then none),
    then reveal those the snapshot had mapped."""
    for everything_visible in (True, False):
        smram.register = 0xFF if everything_visible else 0      # (G_SMRAME | D_OPEN) or nothing
        smram.in_smm = everything_visible
        smram.update()
    smram.register = register
    smram.set_smm(in_smm)
    for smram_range, was_hidden in zip(smram.ranges, hidden):
        if not was_hidden:
            smram.reveal(smram_range.base)
