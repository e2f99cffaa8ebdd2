"""What the CPU keeps about SVM outside the registers Unicorn holds."""
from __future__ import annotations

from dataclasses import dataclass

from .npt import NestedSetting


@dataclass
class SvmState:
    gif: bool = True              # global interrupt flag (APM §15.17): CLGI/#VMEXIT clear it
    hsave_pa: int = 0             # VM_HSAVE_PA: where VMRUN saves the host state
    vm_cr: int = 0                # VM_CR MSR
    vmcb_pa: int | None = None    # the VMCB whose guest (L2) runs now; None outside guest mode
    asid: int = 0                 # the running guest's ASID (0 = the host)
    host_cr8: int = 0             # L1's TPR while L2 runs with V_INTR_MASKING (CR8 is V_TPR then)
    v_intr_masking: bool = False  # the running guest's int_ctl.V_INTR_MASKING
    host_if: bool = False         # L1's RFLAGS.IF at VMRUN: masks physical INTR with V_INTR_MASKING
    int_ctl: int = 0              # the running guest's V_TPR, V_IRQ, V_INTR_PRIO, V_IGN_TPR …
    host: tuple = ()              # the registers at L1's VMRUN (an ArchState as a tuple): the host state
    v_intr_vector: int = 0
    nested: NestedSetting | None = None   # the running guest's nested paging (svm/npt.py), if enabled
    host_pat: int = 0             # L1's PAT while its guest runs with nested paging on G_PAT
    host_lbr: tuple | None = None # L1's LBR state while its guest runs with LBR virtualization
    host_nmi_blocked: bool | None = None   # L1's NMI blocking while its guest runs with vNMI

    @property
    def guest_mode(self) -> bool:
        return self.vmcb_pa is not None

    def as_dict(self) -> dict:
        return {"gif": self.gif, "hsave_pa": self.hsave_pa, "vm_cr": self.vm_cr,
                "guest_mode": self.guest_mode, "vmcb": self.vmcb_pa, "asid": self.asid,
                "int_ctl": self.int_ctl, "nested_cr3": None if self.nested is None else self.nested.root}
