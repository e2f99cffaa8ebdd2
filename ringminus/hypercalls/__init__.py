"""Hypercalls: VMMCALL/VMCALL outside guest mode, with ringminus as the host hypervisor —
KVM x86's ABI (conduit.py) behind KVM arm64's filter model (filter.py)."""
from .conduit import (BUILTIN_RESULTS, KVM_ENOSYS, KVM_EPERM, Hypercall, HypercallHandlerError,
                      KvmHypercall)
from .filter import (HypercallAction, HypercallFilter, HypercallFilterBusyError, HypercallFilterError,
                     HypercallRange, InvalidHypercallRangeError, OverlappingHypercallRangeError)

__all__ = ["BUILTIN_RESULTS", "Hypercall", "HypercallAction", "HypercallFilter", "HypercallFilterBusyError",
           "HypercallFilterError", "HypercallHandlerError", "HypercallRange", "InvalidHypercallRangeError",
           "KVM_ENOSYS", "KVM_EPERM", "KvmHypercall", "OverlappingHypercallRangeError"]
