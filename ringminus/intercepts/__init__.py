"""SVM intercepts: what L1 intercepts, profiles, the staged checker, and the guest running as
L2.  (Exit codes are architectural facts: ``ringminus.arch.exitcodes``, re-exported here.)"""
from ..arch.exitcodes import ExitCode, exit_name, parse_exit
from .checker import Complete, Fault, VmExit, check
from .controls import InterceptControls
from .guest import Guest
from .profiles import DEFAULT_PROFILE, PROFILES, Profile

__all__ = ["DEFAULT_PROFILE", "PROFILES", "Complete", "ExitCode", "Fault", "Guest", "InterceptControls",
           "Profile", "VmExit", "check", "exit_name", "parse_exit"]
