"""The facts about a host that a snapshot depends on, and the check that a host can restore one.

A snapshot records the CPU (vendor, family, model), the KVM ABI, whether KVM is nested
PVM, the page size, and the CPUID the guest was given (`host_facts(kvm, guest_cpuid)`).
A restore compares them with this host's (`host_facts(kvm)`, which carries the CPUID
this host's KVM can give instead) and refuses a mismatch with a message listing every
difference (`check_host`, `check_snapshot`). The snapshot files only carry the facts;
what they mean is decided here.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Mapping, Sequence
from typing import Any

from .cpuid import CpuidTable, missing_features, parse_rows
from .kvm import Kvm
from .snapshot import (
    REBUILD_HINT,
    SnapshotCorrupt,
    SnapshotFile,
    SnapshotHostMismatch,
)

COMPARED_HOST_FACTS = (
    "cpu_vendor",
    "cpu_family",
    "cpu_model",
    "kvm_api_version",
    "pvm",
    "page_size",
)
"""Facts that must be equal for a restore. Others (stepping, model name, ...) are informational."""


def host_facts(kvm: Kvm, guest_cpuid: CpuidTable | None = None) -> dict[str, Any]:
    """What a snapshot must record about this host, and what a restore compares it with.

    `guest_cpuid` (recorded in snapshots) is what the guest was given; `supported_cpuid`
    (current facts only) is what this host's KVM can give; see check_host.
    """
    facts = host_cpu_facts()
    # for_vcpu(0, 1): KVM reports the APIC id of whichever host CPU answered; a fact must not
    # change from one process to the next.
    facts.update(
        kvm_api_version=kvm.api_version,
        pvm=kvm.pvm,
        supported_cpuid=kvm.supported_cpuid().for_vcpu(0, 1).rows(),
    )
    if guest_cpuid is not None:
        facts["guest_cpuid"] = guest_cpuid.rows()
        del facts["supported_cpuid"]
    return facts


def check_snapshot(files: Sequence[SnapshotFile], current: Mapping[str, Any]) -> None:
    """check_host for every file of a snapshot chain (they may come from different hosts).

    Newest first, so a mismatch names the file that was taken on the other host.
    """
    for snap in reversed(files):
        check_host(snap.host_facts, current, snapshot=snap.path)


def check_host(
    recorded: Mapping[str, Any],
    current: Mapping[str, Any],
    *,
    snapshot: str | os.PathLike[str] | None = None,
) -> None:
    """Raise SnapshotHostMismatch unless a snapshot taken with `recorded` facts can run here.

    Compares COMPARED_HOST_FACTS for equality (each key the snapshot recorded), and when the
    snapshot recorded `guest_cpuid`, requires every feature bit the guest saw to be in this
    host's `supported_cpuid` (KVM_GET_SUPPORTED_CPUID). Both CPUID lists are
    [[function, index, eax, ebx, ecx, edx], ...]. The message lists every difference.
    """
    lines = []
    for key in COMPARED_HOST_FACTS:
        if key not in recorded:
            continue
        if key not in current:
            lines.append(f"{key}: snapshot has {recorded[key]!r}, this host did not report it")
        elif recorded[key] != current[key]:
            lines.append(f"{key}: snapshot has {recorded[key]!r}, this host has {current[key]!r}")
    if "guest_cpuid" in recorded:
        guest = parse_rows(recorded["guest_cpuid"])
        if guest is None:
            raise SnapshotCorrupt(
                f"snapshot {snapshot or ''} records a malformed guest_cpuid host fact; {REBUILD_HINT}"
            )
        if "supported_cpuid" not in current:
            raise ValueError(
                "current host facts need `supported_cpuid` to check the snapshot's guest CPUID"
            )
        supported = parse_rows(current["supported_cpuid"])
        if supported is None:
            raise ValueError(
                "current host fact `supported_cpuid` must be [[fn, index, eax, ebx, ecx, edx], ...]"
            )
        lines += missing_features(guest, supported)
    if lines:
        where = f"snapshot {snapshot}" if snapshot else "the snapshot"
        raise SnapshotHostMismatch(
            f"{where} was taken on a host this one cannot stand in for:\n  "
            + "\n  ".join(lines)
            + "\nSnapshots only restore on the same CPU model and KVM ABI: rebuild it on this host "
            "(delete it, or run `supermachine cache prune` for cached ones)."
        )


def host_cpu_facts(cpuinfo: str | os.PathLike[str] = "/proc/cpuinfo") -> dict[str, Any]:
    """CPU vendor/family/model/stepping/name of this host and its page size (no KVM needed).

    The VMM adds `kvm_api_version`, `pvm`, `guest_cpuid` (recorded) and `supported_cpuid`
    (current, for check_host) to this.
    """
    facts: dict[str, Any] = {"page_size": mmap.PAGESIZE}
    keys = {
        "vendor_id": ("cpu_vendor", str),
        "cpu family": ("cpu_family", int),
        "model": ("cpu_model", int),
        "stepping": ("cpu_stepping", int),
        "model name": ("cpu_model_name", str),
    }
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    break  # first processor only
                key, _, value = line.partition(":")
                target = keys.get(key.strip())
                if target:
                    try:
                        facts[target[0]] = target[1](value.strip())
                    except ValueError:
                        facts[target[0]] = value.strip()
    except OSError:
        pass
    return facts
