"""Why a machine stopped: the reason the C core reports, and a sentence for people.

`ExitReason` mirrors `enum sm_exit_reason` in _core.h; `MachineExit` adds the vCPU, the
guest's code and, for KVM failures, the raw exit so `describe()` can say what happened.
"""

from __future__ import annotations

import enum
import errno
from dataclasses import dataclass


class ExitReason(enum.IntEnum):
    """Why a machine stopped running (mirrors `enum sm_exit_reason` in _core.h)."""

    NONE = 0
    HALT = 1
    SHUTDOWN = 2
    RESET = 3
    PANIC = 4
    CANCELED = 5
    ERROR = 6


_KVM_EXIT_NAMES = {
    2: "IO",
    5: "HLT",
    6: "MMIO",
    8: "SHUTDOWN",
    9: "FAIL_ENTRY",
    17: "INTERNAL_ERROR",
    24: "SYSTEM_EVENT",
}
_INTERNAL_SUBERRORS = {1: "emulation failure", 2: "simultaneous exception", 3: "delivery event"}


@dataclass(frozen=True)
class MachineExit:
    """How and why a machine stopped; `describe()` says it in words."""

    reason: ExitReason
    vcpu: int
    code: int
    kvm_exit: int
    suberror: int
    detail: tuple[int, ...]

    def describe(self) -> str:
        who = f"vCPU {self.vcpu}" if self.vcpu >= 0 else "the host"
        if self.reason is ExitReason.HALT:
            return f"guest powered off (status {self.code}, {who})"
        if self.reason is ExitReason.SHUTDOWN:
            return f"guest triple-faulted ({who}): KVM_EXIT_SHUTDOWN"
        if self.reason is ExitReason.RESET:
            return f"guest requested a reset ({who})"
        if self.reason is ExitReason.PANIC:
            return f"guest panicked with code {self.code:#x} ({who})"
        if self.reason is ExitReason.CANCELED:
            return "stopped by the host"
        if self.reason is ExitReason.ERROR:
            if self.code < 0:
                return f"KVM_RUN failed on {who}: {errno.errorcode.get(-self.code, -self.code)}"
            name = _KVM_EXIT_NAMES.get(self.kvm_exit, str(self.kvm_exit))
            sub = _INTERNAL_SUBERRORS.get(self.suberror, str(self.suberror))
            data = " ".join(f"{d:#x}" for d in self.detail)
            return f"KVM could not run the guest on {who}: exit {name} ({sub}) data {data}"
        return self.reason.name.lower()
