"""How a diff's parent hints are followed when they lead nowhere, or back into the chain.

Hints are paths recorded in a file anyone can write: a hint the file system refuses is a
missing parent (`SnapshotParentError`), never an `OSError`; a hint back into the chain is
reported as a loop, not as a rebuilt parent.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_supermachine.vmm.layout import PAGE_SIZE, RamRegion
from pytest_supermachine.vmm.memory import GuestMemory
from pytest_supermachine.vmm.snapshot import (
    SnapshotChain,
    SnapshotParentError,
    SnapshotRef,
    write_snapshot,
)
from pytest_supermachine.vmm.snapshot import writer as snapshot_writer


@pytest.fixture(autouse=True)
def crafted_hints(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the writer record any parent path: these files play a crafted snapshot's part."""
    monkeypatch.setattr(snapshot_writer, "_check_parent_for_writing", lambda *args: None)


def memory() -> GuestMemory:
    return GuestMemory([RamRegion(0, 4 * PAGE_SIZE)], [bytearray(4 * PAGE_SIZE)])


def diff(path: Path, parent: SnapshotRef) -> SnapshotRef:
    return write_snapshot(
        path, sections={}, host_facts={}, memory=memory(), pages=[[0]], parent=parent
    )


def test_a_hint_with_a_name_too_long_for_the_file_system_is_a_missing_parent(
    tmp_path: Path,
) -> None:
    base = write_snapshot(tmp_path / "base", sections={}, host_facts={}, memory=memory())
    diff(tmp_path / "diff", SnapshotRef(base.digest, tmp_path / ("p" * 300)))
    with pytest.raises(SnapshotParentError, match="missing: looked at"):
        SnapshotChain.open(tmp_path / "diff")


def test_a_hint_at_a_file_that_cannot_be_read_is_a_missing_parent(tmp_path: Path) -> None:
    base = write_snapshot(tmp_path / "base", sections={}, host_facts={}, memory=memory())
    diff(tmp_path / "diff", SnapshotRef(base.digest, Path("/proc/self/mem")))
    with pytest.raises(SnapshotParentError, match="missing|unusable"):
        SnapshotChain.open(tmp_path / "diff")


def test_a_diff_naming_itself_as_parent_is_reported_as_a_loop(tmp_path: Path) -> None:
    base = write_snapshot(tmp_path / "base", sections={}, host_facts={}, memory=memory())
    diff(tmp_path / "diff", SnapshotRef(base.digest, tmp_path / "diff"))
    with pytest.raises(SnapshotParentError, match="names itself as its parent: the chain loops"):
        SnapshotChain.open(tmp_path / "diff")


def test_two_diffs_naming_each_other_are_reported_as_a_loop(tmp_path: Path) -> None:
    base = write_snapshot(tmp_path / "base", sections={}, host_facts={}, memory=memory())
    first = diff(tmp_path / "a", SnapshotRef(base.digest, tmp_path / "b"))
    diff(tmp_path / "b", first)
    with pytest.raises(SnapshotParentError, match="a file it descends from.*the chain loops"):
        SnapshotChain.open(tmp_path / "b")
