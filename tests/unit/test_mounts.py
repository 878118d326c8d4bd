"""`Mount`: the value users write in ``mounts=``; host path plus read-only/writable mode."""

from __future__ import annotations

import pytest

from pytest_supermachine.mounts import Mount

pytestmark = pytest.mark.unit


def test_mounts_are_read_only_unless_asked():
    assert Mount("build/out").writable is False
    assert Mount("build/out", writable=True).writable is True


def test_a_bare_path_becomes_a_read_only_mount():
    assert Mount.of("src") == Mount("src")
    m = Mount("x", writable=True)
    assert Mount.of(m) is m


def test_path_like_values_are_stored_as_strings(tmp_path):
    assert Mount(tmp_path).host_path == str(tmp_path)


@pytest.mark.parametrize("bad", ["", "a\0b"])
def test_empty_or_nul_paths_are_refused(bad):
    with pytest.raises(ValueError, match="host directory"):
        Mount(bad)


def test_resolved_is_absolute_against_the_root(tmp_path):
    (tmp_path / "build" / "out").mkdir(parents=True)
    assert Mount("build/out", writable=True).resolved(tmp_path) == Mount(
        tmp_path / "build" / "out", True
    )


def test_resolving_a_missing_directory_fails_clearly(tmp_path):
    with pytest.raises(NotADirectoryError, match="nope"):
        Mount("nope").resolved(tmp_path)


def test_the_key_names_path_and_mode_not_content():
    assert Mount("/a").key() == "/a:ro"
    assert Mount("/a", writable=True).key() == "/a:rw"


def test_mounts_are_hashable_values():
    assert len({Mount("/a"), Mount("/a"), Mount("/a", writable=True)}) == 2


def test_dax_is_for_read_only_mounts():
    assert Mount("x", dax=True).dax is True
    with pytest.raises(ValueError, match="read-only"):
        Mount("x", writable=True, dax=True)
    assert Mount("/a", dax=True).key() == "/a:ro:dax"
