"""Crafting hostile snapshots for tests: change sections, re-sign, so the checksum passes.

A snapshot's digest proves the file is intact, not that it is honest; these helpers
write what an attacker would (valid digest, lying content) so the tests reach the
restore-time validation behind the checksum.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pytest_supermachine.guest.microguest import GuestMode
from pytest_supermachine.vmm.devices.hub import DiskSpec, pack_state, unpack_state
from pytest_supermachine.vmm.layout import RamRegion
from pytest_supermachine.vmm.machine import Machine
from pytest_supermachine.vmm.memory import GuestMemory
from pytest_supermachine.vmm.snapshot import SnapshotChain, write_snapshot

Sections = dict[str, bytes]


def resign(
    source: Path,
    target: Path,
    mutate: Callable[[Sections], None],
    *,
    regions: list[RamRegion] | None = None,
) -> Path:
    """Write `target`: `source`'s chain flattened, its sections passed through `mutate`.

    `regions`: lay the same RAM bytes out at other guest addresses (sizes must match).
    """
    with SnapshotChain.open(source) as chain:
        sections: Sections = dict(chain.sections)
        mutate(sections)
        memory = chain.map_ram()
        try:
            if regions is not None:
                buffers = [bytearray(memory.read(r.gpa, r.size)) for r in memory.regions]
                crafted = GuestMemory(regions, buffers)
            else:
                crafted = memory
            write_snapshot(
                target,
                sections=sections,
                host_facts=chain.host_facts,
                memory=crafted,
                durable=False,
            )
        finally:
            memory.close()
    return target


def edit_machine(edit: Callable[[dict[str, Any]], None]) -> Callable[[Sections], None]:
    """A `mutate` that edits the 'machine' section's JSON object."""

    def mutate(sections: Sections) -> None:
        meta = json.loads(sections["machine"])
        edit(meta)
        sections["machine"] = json.dumps(meta).encode()

    return mutate


def edit_device(section: str, edit: Callable[[dict[str, Any]], None]) -> Callable[[Sections], None]:
    """A `mutate` that edits one device section's state dict."""

    def mutate(sections: Sections) -> None:
        state = unpack_state(sections[section])
        edit(state)
        sections[section] = pack_state(state)

    return mutate


def device_state(path: Path, section: str) -> Mapping[str, Any]:
    with SnapshotChain.open(path) as chain:
        return unpack_state(chain.sections[section])


def snapshot_agent_guest(microguest_elf: Path, where: Path) -> Path:
    """`where`/agent.snap: an AGENT microguest with vsock and a disk image, once it is ready.

    The image it was built with is deleted afterwards: the snapshot must carry its own.
    """
    image = where / "base.img"
    image.write_bytes(bytes(range(256)) * 256)
    m = Machine(mem_mib=64, disks=(DiskSpec(str(image), serial="d"),))
    try:
        m.boot_direct64(microguest_elf, mode=GuestMode.AGENT)
        m.start()
        m.wait_ready(30)
        path = where / "agent.snap"
        m.snapshot(path)
    finally:
        m.stop()
    image.unlink()
    return path
