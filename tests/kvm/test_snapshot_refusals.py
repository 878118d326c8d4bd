"""A snapshot file chooses nothing on the host and breaks nothing later: restore refuses it.

Each hostile snapshot here has a valid digest (re-signed after the change), so it gets
past the checksum; `Machine.restore` must refuse it with `SnapshotInvalid` naming the
file and the section, before the guest runs (issue 10).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_supermachine.guest.microguest import GuestMode
from pytest_supermachine.vmm.layout import MMIO_BASE, MiB, RamRegion
from pytest_supermachine.vmm.machine import ExitReason, Machine
from pytest_supermachine.vmm.snapshot import SnapshotInvalid
from tests.snapshot_mutation import (
    Sections,
    edit_device,
    edit_machine,
    resign,
    snapshot_agent_guest,
)

VSOCK = "device/0-vsock"
DISK = "device/1-disk"


@pytest.fixture(scope="module")
def agent_snapshot(microguest_elf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An AGENT microguest with vsock and a disk image, snapshotted once it is ready."""
    return snapshot_agent_guest(microguest_elf, tmp_path_factory.mktemp("agent-snapshot"))


@pytest.fixture
def craft(agent_snapshot: Path) -> Iterator[Callable[..., Path]]:
    """craft(mutate, regions=None): a re-signed copy of the agent snapshot beside it."""
    made: list[Path] = []

    def make(mutate: Callable[[Sections], None], **kwargs: Any) -> Path:
        target = agent_snapshot.parent / f"crafted-{len(made)}.snap"
        made.append(resign(agent_snapshot, target, mutate, **kwargs))
        return target

    yield make
    for path in made:
        path.unlink(missing_ok=True)


def refused(path: Path, section: str) -> SnapshotInvalid:
    with pytest.raises(SnapshotInvalid) as info:
        Machine.restore(path, start=False)
    assert info.value.section == section
    assert str(path) in str(info.value)
    return info.value


def test_the_agent_snapshot_restores_and_answers(agent_snapshot: Path) -> None:
    with Machine.restore(agent_snapshot) as m:
        assert m.run(["echo", "hi"], timeout=30).stdout == b"hi\n"


def test_a_used_ring_over_the_available_ring_is_refused(craft: Callable[..., Path]) -> None:
    def crafted_loop(state: dict[str, Any]) -> None:
        tx = state["queues"][1]
        tx["used_addr"] = tx["avail_addr"]
        tx["next_used"] = (tx["next_avail"] + 1) & 0xFFFF

    refused(craft(edit_device(VSOCK, crafted_loop)), VSOCK)


def test_an_event_queue_index_far_from_the_driver_is_refused(craft: Callable[..., Path]) -> None:
    def off(state: dict[str, Any]) -> None:
        event = state["queues"][2]
        event["next_avail"] = (event["next_avail"] + 1000) & 0xFFFF
        event["next_used"] = event["next_avail"]

    refused(craft(edit_device(VSOCK, off)), VSOCK)


def test_a_disk_path_naming_a_host_file_is_refused(craft: Callable[..., Path]) -> None:
    def host_file(meta: dict[str, Any]) -> None:
        meta["devices"][1]["path"] = "/etc/hostname"

    error = refused(craft(edit_machine(host_file)), "machine")
    assert "plain file name" in error.problem


def test_a_disk_image_deleted_after_the_snapshot_is_refused(
    agent_snapshot: Path, craft: Callable[..., Path]
) -> None:
    def other_image(meta: dict[str, Any]) -> None:
        meta["devices"][1]["path"] = "gone.disk"

    error = refused(craft(edit_machine(other_image)), "machine")
    assert "cannot be read" in error.problem


def test_a_disk_image_with_other_content_is_refused(craft: Callable[..., Path]) -> None:
    def other_digest(meta: dict[str, Any]) -> None:
        meta["devices"][1]["sha256"] = "0" * 64

    error = refused(craft(edit_machine(other_digest)), "machine")
    assert "changed since" in error.problem


def test_a_disk_image_rewritten_after_a_restore_is_refused(agent_snapshot: Path) -> None:
    Machine.restore(agent_snapshot, start=False).stop()  # this process knows its digest now
    (disk,) = agent_snapshot.parent.glob("*.disk")
    original = disk.read_bytes()
    before = disk.stat()
    try:  # same size, same mtime, other bytes: only the content (and ctime) tell
        disk.write_bytes(bytes(b ^ 0xFF for b in original[:512]) + original[512:])
        os.utime(disk, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert "changed since" in refused(agent_snapshot, "machine").problem
    finally:
        disk.write_bytes(original)


@pytest.mark.parametrize(
    ("edit", "section"),
    [
        pytest.param(lambda m: m.update(vcpus=65), "machine", id="vcpus=65"),
        pytest.param(lambda m: m.update(vcpus=2**70), "machine", id="vcpus=2**70"),
        pytest.param(lambda m: m.update(vcpus=2), "vcpu/1/cpuid", id="vcpus=2-without-state"),
        pytest.param(lambda m: m.update(mem_bytes=3), "machine", id="mem_bytes=3"),
        pytest.param(lambda m: m["devices"][0].update(guest_cid=0), "machine", id="cid=0"),
        pytest.param(lambda m: m["devices"][0].update(guest_cid=2), "machine", id="cid=2"),
        pytest.param(lambda m: m["devices"][0].update(guest_cid=-5), "machine", id="cid=-5"),
        pytest.param(lambda m: m["devices"][0].update(guest_cid=2**70), "machine", id="cid=2**70"),
        pytest.param(lambda m: m["devices"][0].update(color="red"), "machine", id="unknown-key"),
        pytest.param(lambda m: m["devices"][1].update(size=1504), "machine", id="disk-size-1504"),
        pytest.param(lambda m: m["devices"][1].update(serial="s" * 21), "machine", id="serial-21"),
        pytest.param(lambda m: m["devices"].append({"kind": "gpu"}), "machine", id="unknown-kind"),
    ],
)
def test_a_machine_section_out_of_range_is_refused(
    craft: Callable[..., Path], edit: Callable[[dict[str, Any]], None], section: str
) -> None:
    refused(craft(edit_machine(edit)), section)


@pytest.mark.parametrize(
    ("edit", "section"),
    [
        pytest.param(
            lambda s: s.update({VSOCK: s[VSOCK].replace(b'"queues"', b'"queuez"')}),
            VSOCK,
            id="no-queues",
        ),
        pytest.param(lambda s: s.update(serial=s["serial"][:3]), "serial", id="short-serial"),
        pytest.param(
            lambda s: s.update({"vcpu/0/xsave": s["vcpu/0/xsave"][:100]}),
            "vcpu/0/xsave",
            id="short-xsave",
        ),
        pytest.param(lambda s: s.pop("vcpu/0/regs"), "vcpu/0/regs", id="no-regs"),
        pytest.param(lambda s: s.pop(VSOCK), VSOCK, id="no-device-section"),
    ],
)
def test_a_state_section_of_the_wrong_shape_is_refused(
    craft: Callable[..., Path], edit: Callable[[Sections], None], section: str
) -> None:
    refused(craft(edit), section)


@pytest.mark.parametrize(
    "queue_edit",
    [
        pytest.param({}, id="empty-queue-dict"),
        pytest.param({"max_size": 1024}, id="max-size-mismatch"),
        pytest.param({"size": 3}, id="size-not-a-power-of-two"),
        pytest.param({"desc_addr": 64 * MiB}, id="descriptors-outside-ram"),
        pytest.param({"avail_addr": 1}, id="misaligned-avail-ring"),
        pytest.param({"next_avail": 70000}, id="index-over-16-bits"),
    ],
)
def test_a_queue_state_no_device_could_have_is_refused(
    craft: Callable[..., Path], queue_edit: dict[str, Any]
) -> None:
    def edit(state: dict[str, Any]) -> None:
        if queue_edit:
            state["queues"][0].update(queue_edit)
        else:
            state["queues"][0] = {}

    refused(craft(edit_device(VSOCK, edit)), VSOCK)


def test_ram_over_the_32_bit_mmio_hole_is_refused(craft: Callable[..., Path]) -> None:
    straddling = [RamRegion(MMIO_BASE - 32 * MiB, 64 * MiB)]
    error = refused(craft(lambda s: None, regions=straddling), "machine")
    assert "MMIO hole" in error.problem


def test_a_crashed_guest_is_snapshotted_at_the_first_call(
    make_machine: Callable[..., Machine], tmp_path: Path
) -> None:
    m = make_machine(GuestMode.TRIPLE_FAULT)
    m.start()
    deadline = time.monotonic() + 30
    while m.exit_info().reason is ExitReason.NONE:  # crashed, but nobody called wait()
        assert time.monotonic() < deadline, "the guest did not crash"
        time.sleep(0.01)
    ref = m.snapshot(tmp_path / "crashed.snap")
    assert ref.path == tmp_path / "crashed.snap"
