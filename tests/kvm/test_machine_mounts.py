"""Mounts on a real machine: one virtio-fs device per mount, kept by snapshots, restore and reset.

No guest runs here (the microguest has no FUSE client): the FUSE session is
driven from the host side of the device, as the guest's requests would drive it,
to check what the machine does with it (the Linux tier runs the real client).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_supermachine.errors import MachineError
from pytest_supermachine.mounts import Mount
from pytest_supermachine.vmm import layout
from pytest_supermachine.vmm.devices.hub import FsSpec
from pytest_supermachine.vmm.devices.virtio.fs import VirtioFs
from pytest_supermachine.vmm.devices.virtio.fs.uapi import FUSE, OPCODES
from pytest_supermachine.vmm.devices.virtio.mmio import (
    REG_SHM_BASE_HIGH,
    REG_SHM_BASE_LOW,
    REG_SHM_LEN_HIGH,
    REG_SHM_LEN_LOW,
    REG_SHM_SEL,
)
from pytest_supermachine.vmm.fsmounts import DAX_WINDOW_MIB
from pytest_supermachine.vmm.machine import Machine
from pytest_supermachine.vmm.snapshot import SnapshotInvalid

OUT_HEADER = FUSE.sizeof("fuse_out_header")


def fuse(fs: VirtioFs, opcode: str, nodeid: int, body: bytes) -> tuple[int, bytes]:
    """One request to the device's FUSE server, as the guest would queue it: (errno, payload)."""
    head = FUSE.build(
        "fuse_in_header",
        len=FUSE.sizeof("fuse_in_header") + len(body),
        opcode=OPCODES[opcode],
        unique=7,
        nodeid=nodeid,
    )
    reply = fs.server.handle(head + body)
    assert reply is not None
    return -int(FUSE.parse("fuse_out_header", reply).error), reply[OUT_HEADER:]


def open_file(fs: VirtioFs, name: bytes) -> tuple[int, int]:
    """(node id, file handle) of `name` in the mount root, opened read-only."""
    err, entry = fuse(fs, "FUSE_LOOKUP", 1, name + b"\0")
    assert err == 0, os.strerror(err)
    nodeid = int(FUSE.parse("fuse_entry_out", entry).nodeid)
    err, opened = fuse(fs, "FUSE_OPEN", nodeid, FUSE.build("fuse_open_in", flags=os.O_RDONLY))
    assert err == 0, os.strerror(err)
    return nodeid, int(FUSE.parse("fuse_open_out", opened).fh)


def read(fs: VirtioFs, nodeid: int, fh: int) -> tuple[int, bytes]:
    return fuse(fs, "FUSE_READ", nodeid, FUSE.build("fuse_read_in", fh=fh, size=4096))


def release(fs: VirtioFs, nodeid: int, fh: int) -> int:
    return fuse(fs, "FUSE_RELEASE", nodeid, FUSE.build("fuse_release_in", fh=fh))[0]


def fs_devices(m: Machine) -> list[VirtioFs]:
    return [d.transport.device for d in m.devices.devices if isinstance(d.spec, FsSpec)]  # type: ignore[misc]


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "file.txt").write_bytes(b"first\n")
    return a, b


@pytest.fixture
def machines() -> Callable[..., Machine]:
    made: list[Machine] = []

    def make(m: Machine) -> Machine:
        made.append(m)
        return m

    yield make
    for m in made:
        m.stop()


def test_each_mount_is_one_fs_device_tagged_in_guest_path_order(dirs, machines):
    a, b = dirs
    m = machines(Machine(mem_mib=16, mounts={"/z": b, "/a": Mount(a, writable=True)}))
    specs = [d.spec for d in m.devices.devices if isinstance(d.spec, FsSpec)]
    assert specs == [
        FsSpec("smfs0", str(a), "/a", writable=True),
        FsSpec("smfs1", str(b), "/z", writable=False),
    ]
    assert [(fs.tag, fs.server.writable) for fs in fs_devices(m)] == [
        ("smfs0", True),
        ("smfs1", False),
    ]


def test_a_mount_of_a_missing_directory_fails_before_the_machine_exists(tmp_path):
    with pytest.raises(MachineError, match="nope"):
        Machine(mem_mib=16, mounts={"/src": tmp_path / "nope"})


def test_the_microguest_refuses_mounts_with_a_clear_error(dirs, machines, microguest_elf):
    m = machines(Machine(mem_mib=16, mounts={"/src": dirs[0]}))
    with pytest.raises(MachineError, match="mounts need a Linux guest"):
        m.boot_direct64(microguest_elf)


@pytest.fixture
def held(dirs, machines, tmp_path) -> tuple[Path, int, int]:
    """A snapshot of a machine mounting dirs[0] at /src with file.txt open: (path, node, fh)."""
    m = machines(Machine(mem_mib=16, mounts={"/src": dirs[0]}))
    nodeid, fh = open_file(fs_devices(m)[0], b"file.txt")
    m.snapshot(tmp_path / "s.snap")
    return tmp_path / "s.snap", nodeid, fh


def test_a_snapshot_carries_the_mounts_and_reopens_open_files_on_restore(dirs, machines, held):
    a, _ = dirs
    snap, nodeid, fh = held
    (a / "file.txt").write_bytes(b"second, from the host\n")

    restored = machines(Machine.restore(snap, start=False))
    [fs2] = fs_devices(restored)
    assert fs2.tag == "smfs0" and fs2.server.host.path == str(a)
    assert read(fs2, nodeid, fh) == (0, b"second, from the host\n")


def test_reset_gives_back_the_open_files_of_the_snapshot(machines, held):
    snap, nodeid, fh = held
    restored = machines(Machine.restore(snap, start=False))
    [fs] = fs_devices(restored)
    assert release(fs, nodeid, fh) == 0
    assert read(fs, nodeid, fh)[0] == errno.EBADF
    restored.reset(resume=False)
    assert read(fs, nodeid, fh) == (0, b"first\n")


def test_a_file_gone_since_the_snapshot_is_stale_not_a_host_error(dirs, machines, held):
    snap, nodeid, fh = held
    (dirs[0] / "file.txt").unlink()
    restored = machines(Machine.restore(snap, start=False))
    assert read(fs_devices(restored)[0], nodeid, fh)[0] == errno.ESTALE


def test_a_snapshot_whose_mounted_directory_is_gone_is_refused(dirs, machines, tmp_path):
    a, _ = dirs
    machines(Machine(mem_mib=16, mounts={"/src": a})).snapshot(tmp_path / "s.snap")
    (a / "file.txt").unlink()
    a.rmdir()
    with pytest.raises(SnapshotInvalid, match="not an existing absolute directory"):
        Machine.restore(tmp_path / "s.snap", start=False)


def shm_register(m: Machine, offset: int, sel: int = 0) -> int:
    [attached] = [d for d in m.devices.devices if isinstance(d.spec, FsSpec)]
    attached.transport.write(REG_SHM_SEL, sel.to_bytes(4, "little"))
    return int.from_bytes(attached.transport.read(offset, 4), "little")


def test_a_dax_mount_offers_its_window_as_shared_memory_region_0(dirs, machines):
    m = machines(Machine(mem_mib=16, mounts={"/src": Mount(dirs[0], dax=True)}))
    window = layout.dax_window(1, DAX_WINDOW_MIB * layout.MiB)  # slot 0 is the vsock
    length = shm_register(m, REG_SHM_LEN_LOW) | shm_register(m, REG_SHM_LEN_HIGH) << 32
    base = shm_register(m, REG_SHM_BASE_LOW) | shm_register(m, REG_SHM_BASE_HIGH) << 32
    assert (base, length) == (window.gpa, window.size)
    assert shm_register(m, REG_SHM_LEN_LOW, sel=1) == 0xFFFF_FFFF  # no region 1


def test_a_mount_without_dax_has_no_shared_memory_region(dirs, machines):
    m = machines(Machine(mem_mib=16, mounts={"/src": dirs[0]}))
    assert shm_register(m, REG_SHM_LEN_LOW) == shm_register(m, REG_SHM_LEN_HIGH) == 0xFFFF_FFFF


def setup_mapping(fs: VirtioFs, nodeid: int, fh: int, moffset: int, length: int) -> int:
    body = FUSE.build(
        "fuse_setupmapping_in", fh=fh, foffset=0, len=length, flags=0, moffset=moffset
    )
    return fuse(fs, "FUSE_SETUPMAPPING", nodeid, body)[0]


def test_dax_mappings_show_the_host_file_and_are_mapped_again_on_restore(dirs, machines, tmp_path):
    a, _ = dirs
    (a / "file.txt").write_bytes(b"mapped\n")
    m = machines(Machine(mem_mib=16, mounts={"/src": Mount(a, dax=True)}))
    [fs] = fs_devices(m)
    nodeid, fh = open_file(fs, b"file.txt")
    assert setup_mapping(fs, nodeid, fh, 2 * layout.MiB, 2 * layout.MiB) == 0
    assert fs.dax.read(2 * layout.MiB, 8) == b"mapped\n\0"  # past EOF: zero pages
    m.snapshot(tmp_path / "s.snap")
    (a / "file.txt").write_bytes(b"changed\n")

    [fs2] = fs_devices(machines(Machine.restore(tmp_path / "s.snap", start=False)))
    assert fs2.dax.read(2 * layout.MiB, 9) == b"changed\n\0"
    assert fs2.dax.read(0, 4) == b"\0\0\0\0"  # never mapped


def test_a_read_only_dax_window_refuses_writable_mappings(dirs, machines):
    m = machines(Machine(mem_mib=16, mounts={"/src": Mount(dirs[0], dax=True)}))
    [fs] = fs_devices(m)
    nodeid, fh = open_file(fs, b"file.txt")
    body = FUSE.build(
        "fuse_setupmapping_in",
        fh=fh,
        foffset=0,
        len=2 * layout.MiB,
        flags=FUSE.const["FUSE_SETUPMAPPING_FLAG_WRITE"],
        moffset=0,
    )
    assert fuse(fs, "FUSE_SETUPMAPPING", nodeid, body)[0] == errno.EROFS
