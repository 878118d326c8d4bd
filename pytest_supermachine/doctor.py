"""`supermachine doctor`: can this machine run microVMs, and if not, why and how to fix it."""

from __future__ import annotations

import time
from dataclasses import dataclass

from .errors import SupermachineError


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def kvm_summary() -> str:
    """`vmm.kvm_device.kvm_summary`: one line about /dev/kvm; never raises, never creates a VM.

    The plugin's report header calls that probe directly (loading this module would add
    to every session's start-up, issue 13).
    """
    from .vmm.kvm_device import kvm_summary as summary

    return summary()


def run_checks(*, boot_guest: bool = True) -> list[Check]:
    """Every check in order; stops at the first failure that makes the rest meaningless."""
    from .vmm.kvm import Kvm, kvm_device_path  # lazy: the VMM is loaded only to run VMs

    checks: list[Check] = []
    path = kvm_device_path()
    try:
        kvm = Kvm(path)
    except SupermachineError as e:
        checks.append(Check(f"open {path}", False, str(e)))
        return checks
    checks.append(Check(f"open {path}", True, f"KVM API version {kvm.api_version}"))
    if kvm.pvm:
        checks.append(
            Check(
                "virtualization",
                True,
                "nested PVM (kvm_pvm): guest user code runs natively, guest kernel "
                "code is emulated (~1000x slower); CPUID masked for the emulator",
            )
        )
    else:
        checks.append(Check("virtualization", True, "hardware KVM (VT-x/AMD-V)"))
    cpuid = kvm.supported_cpuid()
    family, model, stepping = cpuid.signature()
    checks.append(
        Check(
            "host CPU", True, f"{cpuid.vendor()} family {family} model {model} stepping {stepping}"
        )
    )
    try:
        from .vmm.machine import Machine  # lazy: the VMM is loaded only to run VMs

        t0 = time.perf_counter()
        with Machine(vcpus=1, mem_mib=64, kvm=kvm) as m:
            created = time.perf_counter() - t0
            checks.append(Check("create a VM", True, f"64 MiB, 1 vCPU in {created * 1e3:.1f} ms"))
            if boot_guest:
                from .guest.microguest import GuestMode, build_microguest  # lazy

                elf = build_microguest()
                m.boot_direct64(elf, mode=GuestMode.HALT)
                t1 = time.perf_counter()
                m.run_until_exit(timeout=30)
                checks.append(
                    Check(
                        "boot the microguest",
                        True,
                        f"banner to power-off in {(time.perf_counter() - t1) * 1e3:.1f} ms",
                    )
                )
    except SupermachineError as e:
        checks.append(Check("create and boot a VM", False, str(e)))
    finally:
        kvm.close()
    return checks


def main() -> int:
    checks = run_checks()
    for c in checks:
        print(f"[{'ok' if c.ok else 'FAIL'}] {c.name}: {c.detail}")
    ok = all(c.ok for c in checks)
    print("KVM is usable." if ok else "KVM is NOT usable: see the FAIL line above for the fix.")
    return 0 if ok else 1
