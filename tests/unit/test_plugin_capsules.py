"""Capsule names, manifests and retention on plain directories (no VMs)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from pytest_supermachine.capsules.capsule import (
    MANIFEST,
    CapsuleWriter,
    read_manifest,
    report_text,
    safe_nodeid,
)
from pytest_supermachine.errors import SupermachineError


def test_safe_nodeid_is_readable_and_distinct():
    assert safe_nodeid("test_a.py::test_x") == "test_a.py__test_x"
    a = safe_nodeid("tests/test_a.py::test_x[1-2]")
    b = safe_nodeid("tests_test_a.py::test_x[1-2]")
    assert a != b and a.startswith("tests_test_a.py__test_x_1-2")
    long = safe_nodeid("t.py::" + "x" * 500)
    assert len(long) <= 150
    assert "/" not in safe_nodeid("a/../../etc::x") and not safe_nodeid("..").startswith(".")


def fake_capsule(root: Path, nodeid: str, session: str) -> Path:
    path = root / safe_nodeid(nodeid)
    path.mkdir(parents=True)
    (path / MANIFEST).write_text(
        json.dumps({"format": 1, "nodeid": nodeid, "session": session, "vms": []})
    )
    return path


def test_retention_failed_removes_capsules_of_passing_tests(tmp_path):
    fixed = fake_capsule(tmp_path, "t.py::fixed", "s1")
    still = fake_capsule(tmp_path, "t.py::still", "s1")
    writer = CapsuleWriter(tmp_path, session_id="s2", retention="failed", count=3)
    writer.apply_retention({"t.py::fixed": "passed", "t.py::still": "failed"})
    assert not fixed.exists() and still.exists()


def test_retention_all_keeps_them(tmp_path):
    fixed = fake_capsule(tmp_path, "t.py::fixed", "s1")
    CapsuleWriter(tmp_path, session_id="s2", retention="all").apply_retention(
        {"t.py::fixed": "passed"}
    )
    assert fixed.exists()


def test_retention_none_removes_everything(tmp_path):
    old = fake_capsule(tmp_path, "t.py::old", "s1")
    writer = CapsuleWriter(tmp_path, session_id="s2", retention="none")
    assert not writer.enabled
    writer.apply_retention({})
    assert not old.exists()


def test_retention_count_keeps_the_newest_sessions(tmp_path):
    caps = [fake_capsule(tmp_path, f"t.py::t{i}", f"2026010{i}-000000-1") for i in range(5)]
    CapsuleWriter(
        tmp_path, session_id="20260106-000000-1", retention="all", count=3
    ).apply_retention({})
    assert [c.exists() for c in caps] == [False, False, False, True, True]


def test_read_manifest_refuses_what_is_not_a_capsule(tmp_path):
    with pytest.raises(SupermachineError, match="not a failure capsule"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text("{")
    with pytest.raises(SupermachineError, match="not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text('{"format": 99}')
    with pytest.raises(SupermachineError, match="unknown capsule format"):
        read_manifest(tmp_path)


def test_report_text_shows_path_replay_and_console_tail(tmp_path):
    (tmp_path / "microvm.console.log").write_text("\n".join(f"line {i}" for i in range(40)))
    manifest = {
        "vms": [
            {
                "fixture": "microvm",
                "exit": "running",
                "console": "microvm.console.log",
                "chain": [{"kind": "base", "name": "microguest"}, {"kind": "layer", "name": "cfg"}],
            }
        ]
    }
    text = report_text(tmp_path, manifest)
    assert f"capsule: {tmp_path}" in text
    assert f"{sys.executable} -m pytest_supermachine replay {tmp_path} --runs 5" in text
    assert "--- microvm: microguest (base) > cfg; guest running" in text
    assert "line 39" in text and "line 19" not in text  # the last 20 lines
