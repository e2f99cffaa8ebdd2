"""In-guest SVM: the guest itself is the hypervisor (L1).  CPUID and the SVM MSRs it sees
(cpuid.py, msrs.py), the VMRUN/#VMEXIT world switch (world.py) and the other SVM
instructions (instructions.py).  L2 runs under the VMCB's intercepts through the same staged
checker as a host-side guest (intercepts/)."""
from .state import SvmState

__all__ = ["SvmState"]
