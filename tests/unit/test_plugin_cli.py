"""The `supermachine` command's new subcommands, without VMs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pytest_supermachine.capsules.replay import replay_command
from pytest_supermachine.cli import build_parser, main


def test_subcommands_parse():
    p = build_parser()
    assert p.parse_args(["replay", "cap", "--runs", "5"]).runs == 5
    assert p.parse_args(["replay", "cap", "--shell"]).shell
    assert p.parse_args(["cache", "prune", "--all"]).all
    assert p.parse_args(["image", "build"]).name == "default"
    with pytest.raises(SystemExit):
        p.parse_args(["cache"])


def test_image_list_names_linux_microguest_and_default(capsys):
    assert main(["image", "list"]) == 0
    out = capsys.readouterr().out
    assert "default      -> linux" in out
    assert "microguest   freestanding test guest" in out


def test_cache_list_and_prune_on_an_empty_cache(tmp_path, capsys):
    assert main(["cache", "list", "--cache-dir", str(tmp_path)]) == 0
    assert "(0 entries" in capsys.readouterr().out
    assert main(["cache", "prune", "--cache-dir", str(tmp_path)]) == 0
    assert "removed 0 item(s)" in capsys.readouterr().out


def test_replay_of_something_that_is_not_a_capsule_is_one_line(tmp_path, capsys):
    assert main(["replay", str(tmp_path)]) == 1
    assert capsys.readouterr().err.startswith("supermachine: error: ")


def test_replay_command_reruns_the_nodeid_with_the_recorded_settings(tmp_path):
    manifest = {
        "nodeid": "t.py::test_x",
        "rootdir": "/proj",
        "replay_args": ["--supermachine-image=microguest"],
    }
    cmd = replay_command(Path("/cap"), manifest, 5, tmp_path / "r.json", ["-x"])
    assert cmd[:5] == [sys.executable, "-m", "pytest", "t.py::test_x", "--rootdir=/proj"]
    # one word per option: a separate value outside the rootdir would hide the project's ini
    assert "--supermachine-replay=/cap" in cmd
    assert "--supermachine-replay-runs=5" in cmd
    assert f"--supermachine-replay-result={tmp_path / 'r.json'}" in cmd
    assert "--supermachine-image=microguest" in cmd and cmd[-1] == "-x"
