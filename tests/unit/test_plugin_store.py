"""The snapshot cache without KVM: keys, one build under concurrency, atomicity, rebuild, prune.

Snapshots here are written straight from bytearray memory with `write_snapshot`, so
the store's validation (it opens each entry as a chain) runs on real files.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from pytest_supermachine.snapshot_store import (
    CacheError,
    SnapshotStore,
    snapshot_key,
)
from pytest_supermachine.vmm.layout import PAGE_SIZE, RamRegion
from pytest_supermachine.vmm.memory import GuestMemory
from pytest_supermachine.vmm.snapshot import SnapshotRef, write_snapshot

FACTS = {
    "cpu_vendor": "X",
    "cpu_family": 1,
    "cpu_model": 1,
    "kvm_api_version": 12,
    "pvm": False,
    "page_size": PAGE_SIZE,
}


def memory(fill: int = 1) -> GuestMemory:
    mem = GuestMemory([RamRegion(0, 8 * PAGE_SIZE)], [bytearray(8 * PAGE_SIZE)])
    mem.write(0, bytes([fill]) * 100)
    return mem


def write_full(path: Path, fill: int = 1) -> SnapshotRef:
    return write_snapshot(
        path, sections={"s": b"x"}, host_facts=FACTS, memory=memory(fill), durable=False
    )


def write_diff(path: Path, parent: Path) -> SnapshotRef:
    return write_snapshot(
        path,
        sections={"s": b"y"},
        host_facts=FACTS,
        memory=memory(2),
        pages=[[0]],
        parent=SnapshotRef.of(parent),
        durable=False,
    )


def test_key_changes_exactly_when_a_part_does():
    parts = {"a": "1", "b": b"2"}
    assert snapshot_key("base", parts) == snapshot_key("base", dict(reversed(parts.items())))
    assert snapshot_key("base", parts) != snapshot_key("base", {**parts, "b": b"3"})
    assert snapshot_key("base", parts) != snapshot_key("layer", parts)
    # length-prefixed: moving a byte between parts is a different key
    assert snapshot_key("base", {"a": "12", "b": ""}) != snapshot_key("base", {"a": "1", "b": "2"})


def test_builds_once_then_reuses(tmp_path):
    store = SnapshotStore(tmp_path)
    calls = []

    def build(path: Path) -> None:
        calls.append(path)
        write_full(path)

    first = store.get_or_build("k1", build, {"kind": "base", "name": "img"})
    second = store.get_or_build("k1", build, {"kind": "base", "name": "img"})
    assert (first.built, second.built) == (True, False)
    assert first.path == second.path == tmp_path / "snapshots" / "k1.snap"
    assert len(calls) == 1
    [entry] = store.entries()
    assert entry.key == "k1" and entry.kind == "base" and entry.name == "img"


def test_failed_build_leaves_no_entry(tmp_path):
    store = SnapshotStore(tmp_path)

    def build(path: Path) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        store.get_or_build("k", build, {})
    assert store.lookup("k") is None
    assert store.entries() == []


def test_build_that_writes_nothing_is_an_error(tmp_path):
    with pytest.raises(CacheError, match="wrote nothing"):
        SnapshotStore(tmp_path).get_or_build("k", lambda path: None, {})


def test_damaged_entry_is_rebuilt(tmp_path):
    store = SnapshotStore(tmp_path)
    store.get_or_build("k", write_full, {})
    path = store.path("k")
    data = bytearray(path.read_bytes())
    data[200] ^= 0xFF  # inside the digested metadata
    path.write_bytes(bytes(data))
    assert "unusable" in store.problem("k")
    assert store.get_or_build("k", write_full, {}).built


def test_diff_whose_parent_was_rebuilt_is_rebuilt(tmp_path):
    store = SnapshotStore(tmp_path)
    store.get_or_build("base", write_full, {})
    store.get_or_build("layer", lambda p: write_diff(p, store.path("base")), {})
    assert store.problem("layer") is None
    write_full(store.path("base"), fill=9)  # a different base under the same name
    assert "unusable" in store.problem("layer")


def test_rebuild_since_rebuilds_older_entries_once(tmp_path):
    SnapshotStore(tmp_path).get_or_build("k", write_full, {})
    os.utime(SnapshotStore(tmp_path).path("k"), (time.time() - 100, time.time() - 100))
    session = SnapshotStore(tmp_path, rebuild_since=time.time() - 10)
    assert session.get_or_build("k", write_full, {}).built
    other_worker = SnapshotStore(tmp_path, rebuild_since=session.rebuild_since)
    assert not other_worker.get_or_build("k", write_full, {}).built


def _build_in_child(root: str, key: str, log: str, delay: float) -> None:
    def build(path: Path) -> None:
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(delay)
        write_full(path)

    SnapshotStore(Path(root)).get_or_build(key, build, {})


def test_concurrent_processes_build_once(tmp_path):
    log = tmp_path / "builds.log"
    ctx = multiprocessing.get_context("fork")
    procs = [
        ctx.Process(target=_build_in_child, args=(str(tmp_path), "k", str(log), 0.3))
        for _ in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert len(log.read_text().splitlines()) == 1
    assert SnapshotStore(tmp_path).lookup("k") is not None


def _die_while_building(root: str, key: str, ready: str) -> None:
    def build(path: Path) -> None:
        # half a snapshot in a temporary file, as write_snapshot leaves it mid-write
        tmp = path.with_name(f".{path.name}.12345.tmp")
        tmp.write_bytes(b"SMSNAP\x1a\n" + bytes(100))
        Path(ready).touch()
        time.sleep(60)

    SnapshotStore(Path(root)).get_or_build(key, build, {})


def test_builder_killed_mid_write_leaves_no_entry_and_a_free_lock(tmp_path):
    ready = tmp_path / "ready"
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=_die_while_building, args=(str(tmp_path), "k", str(ready)))
    p.start()
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    store = SnapshotStore(tmp_path, lock_timeout=5)
    assert store.lookup("k") is None
    assert store.get_or_build("k", write_full, {}).built  # the lock was released by the kernel
    stale = list((tmp_path / "snapshots").glob(".*.tmp"))
    assert len(stale) == 1
    old = time.time() - 3600
    os.utime(stale[0], (old, old))
    removed = store.prune()
    assert [path for path, _why in removed] == stale
    assert store.lookup("k") is not None


def test_lock_timeout_is_a_clear_error(tmp_path):
    store = SnapshotStore(tmp_path, lock_timeout=0.1)
    store.dir.mkdir(parents=True)
    with store.lock("k"), pytest.raises(CacheError, match="waited 0.1 s for another process"):
        SnapshotStore(tmp_path, lock_timeout=0.1).get_or_build("k", write_full, {})


def test_prune_removes_broken_chains_and_their_children(tmp_path):
    store = SnapshotStore(tmp_path)
    store.get_or_build("base", write_full, {})
    store.get_or_build("mid", lambda p: write_diff(p, store.path("base")), {})
    store.get_or_build("leaf", lambda p: write_diff(p, store.path("mid")), {})
    store.get_or_build("other", lambda p: write_full(p, 5), {})
    store.path("base").unlink()
    removed = sorted(path.stem for path, _why in store.prune())
    assert removed == ["leaf", "mid"]
    assert [e.key for e in store.entries()] == ["other"]


def test_prune_by_age_and_everything(tmp_path):
    store = SnapshotStore(tmp_path)
    store.get_or_build("old", write_full, {})
    store.get_or_build("new", lambda p: write_full(p, 3), {})
    past = time.time() - 10 * 86400
    os.utime(store.meta_path("old"), (past, past))
    assert [p.stem for p, _w in store.prune(unused_days=5, dry_run=True)] == ["old"]
    assert len(store.entries()) == 2  # dry run
    assert [p.stem for p, _w in store.prune(unused_days=5)] == ["old"]
    assert [p.stem for p, _w in store.prune(everything=True)] == ["new"]
    assert store.entries() == []
