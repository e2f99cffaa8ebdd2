"""The intercepts as a feature of the machine: a guest running as L2 under what its L1
intercepts (``enter_guest``), the exit that stopped a run, and its place in results and
snapshots."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..decode.table import site_opcodes
from ..emulator.plugins import OnExit, Part
from ..emulator.result import Section, StopReason
from .checker import VmExit
from .controls import InterceptControls
from .guest import Guest
from .profiles import profile as profile_named

if TYPE_CHECKING:
    from ..machine import Machine


def install(machine: "Machine") -> None:
    machine.last_exit = None                 # the VmExit L1 took last (skip_instruction skips it)
    machine.checker_caches = {}              # profile -> the checker's shareable outcomes (checker.py)
    machine.outside_guest_checks = None      # l1_checks
    machine.add_stat_keys("vmexits")
    machine.add_run_hook(lambda: setattr(machine, "last_exit", None))
    machine.add_snapshot_part(Part(55, "last exit", lambda m: m.last_exit, lambda m, exit_: setattr(m, "last_exit", exit_)))
    machine.add_result_section(lambda stop: Section(
        "vmexit", machine.last_exit if stop.reason is StopReason.VMEXIT else None, VmExit.as_dict, raw_name="exit"))


def enter_guest(machine: "Machine", controls: InterceptControls, profile: str | None = None,
                on_exit: OnExit | str = OnExit.STOP, l1_exit=None, arm: bool = True) -> None:
    """Run the guest as L2 under ``controls``: the caller plays L1 (``on_exit`` stop or skip),
    or the guest's own VMRUN does (l1, with ``l1_exit`` its #VMEXIT).  Only the intercepts
    that are set are armed (sites stay armed afterwards: an armed site only costs a callback
    where it runs).  ``profile`` (default: the machine's) also becomes the machine's profile.
    ``arm=False``: the sites are armed already (a snapshot being restored)."""
    if profile is not None:
        machine.profile = profile_named(profile)
    name = machine.profile.name
    machine.gate = Guest(machine, controls, name, on_exit, machine.checker_caches.setdefault(name, {}), l1_exit)
    if arm:
        machine.arm_opcodes(site_opcodes(controls.vector))


def leave_guest(machine: "Machine") -> None:
    machine.gate = None


def skip_instruction(machine: "Machine") -> None:
    """After a vmexit stop: resume at the exit's next RIP, as an L1 that emulated it."""
    exit_ = machine.last_exit
    if exit_ is None:
        raise ValueError("no vmexit to skip")
    machine.cpu.rip = exit_.next_rip or exit_.rip + machine.instruction_length_at(exit_.rip)


def l1_checks(machine: "Machine") -> Guest:
    """The staged checker's view of code outside guest mode: no intercepts, only the #UD/#GP
    checks (in the profile's order)."""
    view = machine.outside_guest_checks
    if view is None or view.profile is not machine.profile:
        view = machine.outside_guest_checks = Guest(machine, InterceptControls(), machine.profile.name)
    return view
