"""`mounts=` as devices: deterministic tags and order, checked guest paths, the guest's cmdline token."""

from __future__ import annotations

import pytest

from pytest_supermachine.errors import MachineError
from pytest_supermachine.mounts import Mount
from pytest_supermachine.vmm.devices.hub import FsSpec, spec_from_dict, spec_to_dict
from pytest_supermachine.vmm.fsmounts import (
    DAX_WINDOW_MIB,
    check_guest_path,
    cmdline_token,
    key_of,
    mount_specs,
)

pytestmark = pytest.mark.unit


def test_mounts_become_specs_sorted_by_guest_path_with_one_tag_each(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    specs = mount_specs({"/work/b": "b", "/work": Mount("a", writable=True)}, root=tmp_path)
    assert specs == (
        FsSpec("smfs0", str(tmp_path / "a"), "/work", True),
        FsSpec("smfs1", str(tmp_path / "b"), "/work/b", False),
    )


def test_the_guest_learns_tag_mode_and_path_from_one_token(tmp_path):
    specs = mount_specs({"/src": tmp_path, "/out": Mount(tmp_path, writable=True)})
    assert cmdline_token(specs) == "sm.mounts=smfs0:rw:/out,smfs1:ro:/src"
    assert cmdline_token(()) == ""


@pytest.mark.parametrize(
    "bad", ["src", "/", "/a/../b", "/a/", "//a", "/a b", "/a,b", "/a:b", "/proc/x", "/dev", "/sys"]
)
def test_guest_paths_that_cannot_be_mounted_are_refused(bad):
    with pytest.raises(ValueError):
        check_guest_path(bad)


def test_a_missing_host_directory_is_a_machine_error_naming_the_mount(tmp_path):
    with pytest.raises(MachineError, match="'/src'.*nope"):
        mount_specs({"/src": "nope"}, root=tmp_path)


def test_the_key_names_paths_and_modes_not_contents(tmp_path):
    specs = mount_specs({"/src": tmp_path})
    before = key_of(specs)
    (tmp_path / "new").write_bytes(b"x")
    assert key_of(mount_specs({"/src": tmp_path})) == before == f"/src={tmp_path}:ro"
    assert key_of(mount_specs({"/src": Mount(tmp_path, writable=True)})) != before


def test_an_fs_spec_round_trips_through_the_snapshots_device_list(tmp_path):
    spec = FsSpec("smfs0", str(tmp_path), "/src", True)
    assert spec_to_dict(spec)["kind"] == "fs"
    assert spec_from_dict(spec_to_dict(spec)) == spec


def test_a_dax_mount_gets_a_window_and_tells_the_guest(tmp_path):
    [spec] = mount_specs({"/src": Mount(tmp_path, dax=True)})
    assert spec.dax_mib == DAX_WINDOW_MIB and not spec.writable
    assert cmdline_token([spec]) == "sm.mounts=smfs0:ro+dax:/src"
    assert key_of([spec]) == f"/src={tmp_path}:ro:dax"
