"""SVM intercepts: exit codes, what L1 intercepts, profiles, the staged checker, and the guest
running as L2.  (Names load lazily: decode/table.py needs exitcodes while this package's
checker needs the table.)"""
from importlib import import_module

_EXPORTS = {
    "ExitCode": "exitcodes", "exit_name": "exitcodes", "parse_exit": "exitcodes",
    "InterceptControls": "controls", "Profile": "profiles", "PROFILES": "profiles",
    "DEFAULT_PROFILE": "profiles", "VmExit": "checker", "Fault": "checker", "Complete": "checker",
    "check": "checker", "Guest": "guest",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(name)
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
