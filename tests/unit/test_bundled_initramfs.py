"""A machine without busybox runs the Linux guest from the initramfs an installed wheel carries.

The wheel's initramfs is matched by its recipe (format, agent, extra files), not by the
full key, which hashes the host's busybox. These tests stage a bundle directory the way
``pytest_supermachine.bundle`` does and point the package's bundle lookup at it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytest_supermachine.errors import GuestBuildError
from pytest_supermachine.guest.agent import initramfs as irf
from pytest_supermachine.guest.agent.build import build_agent

pytestmark = pytest.mark.unit


@pytest.fixture
def no_busybox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The busybox this host would use is absent; returns the (empty) bundle directory."""
    monkeypatch.setenv(irf.BUSYBOX_ENV, str(tmp_path / "no-busybox"))
    bundle = tmp_path / "bundled"
    bundle.mkdir()
    monkeypatch.setattr(irf, "bundled_dir", lambda: bundle)
    return bundle


def stage(bundle: Path, recipe: str) -> Path:
    entry = bundle / "initramfs" / "0123456789abcdef"
    entry.mkdir(parents=True)
    (entry / irf.ARCHIVE_NAME).write_bytes(b"070701")
    (entry / "manifest.json").write_text(json.dumps({"key": entry.name, "recipe": recipe}))
    return entry / irf.ARCHIVE_NAME


def test_without_busybox_or_bundle_the_error_names_the_package(no_busybox: Path) -> None:
    with pytest.raises(GuestBuildError, match="apt-get install busybox-static"):
        irf.build_initramfs()


def test_without_busybox_the_bundled_initramfs_of_this_agent_is_used(no_busybox: Path) -> None:
    archive = stage(no_busybox, irf.recipe_key(build_agent().read_bytes()))
    assert irf.build_initramfs() == archive


def test_a_bundled_initramfs_of_another_agent_is_not_used(no_busybox: Path) -> None:
    stage(no_busybox, irf.recipe_key(b"another agent"))
    with pytest.raises(GuestBuildError, match="static busybox"):
        irf.build_initramfs()


def test_recipe_depends_on_extra_files() -> None:
    assert irf.recipe_key(b"a") != irf.recipe_key(b"a", {"/etc/x": b"1"})
    assert irf.recipe_key(b"a", {"/etc/x": b"1"}) != irf.recipe_key(b"a", {"/etc/x": b"2"})


def test_busybox_env_names_the_busybox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another distribution's path works; a dynamic binary is refused with the reason."""
    if not irf.BUSYBOX.is_file():
        pytest.skip(f"needs {irf.BUSYBOX}: apt-get install {irf.BUSYBOX_PACKAGE}")
    elsewhere = tmp_path / "busybox"
    elsewhere.write_bytes(irf.BUSYBOX.read_bytes())
    monkeypatch.setenv(irf.BUSYBOX_ENV, str(elsewhere))
    assert irf.find_busybox() == elsewhere
    monkeypatch.setenv(irf.BUSYBOX_ENV, "/bin/sh")
    with pytest.raises(GuestBuildError, match="dynamically linked"):
        irf.find_busybox()
