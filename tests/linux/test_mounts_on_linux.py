"""Host directories in the Linux guest (virtio-fs): content, freshness, confinement, modes, snapshots.

One guest is booted with two mounts, a read-only tree at /src and a writable
directory at /out, and snapshotted; every test restores that snapshot. Before
the snapshot the guest reads /src/changing.txt (so its caches hold the old
content) and starts processes that hold /src files open (so the snapshot carries
open FUSE handles): what a restored or reset guest sees of them is the point.
"""

from __future__ import annotations

import hashlib
import os
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_supermachine.images.linux import LinuxImage
from pytest_supermachine.mounts import Mount
from pytest_supermachine.vmm.fsmounts import mount_specs
from pytest_supermachine.vmm.machine import Machine
from tests.plugin.smhelpers import USER_CACHE, Project
from tests.unit.test_virtio_fs import SECRET, make_tree

T = 300  # seconds per guest command: generous, the guest kernel is emulated here
BOOT_TIMEOUT = 2400  # other guests share these 2 cores: a boot has taken 15 min here


@dataclass(frozen=True)
class Mounted:
    snapshot: Path
    src: Path  # the read-only tree, /src in the guest
    out: Path  # the writable directory, /out in the guest
    outside: Path  # a directory next to the tree, never mounted


def _tree(base: Path) -> tuple[Path, Path]:
    """The device tests' tree (files, symlinks in and out, a canary outside), and more."""
    src = make_tree(base)
    (src / "pkg" / "sub").mkdir(parents=True)
    (src / "tool.py").write_bytes(b"print('hello from the host')\n")
    (src / "blob.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 123))
    (src / "pkg" / "__init__.py").write_bytes(b"")
    for i in range(40):
        (src / "pkg" / "sub" / f"f{i:02}.txt").write_bytes(os.urandom(i * 997))
    (src / "with space.txt").write_bytes(b"spaces are fine\n")
    (src / "changing.txt").write_bytes(b"version 1\n")
    (src / "held.txt").write_bytes(b"held before the snapshot\n")
    (src / "vanishing.txt").write_bytes(b"about to vanish\n")
    return src, base / "outside"


def _hold(vm: Machine, path: str, name: str) -> None:
    """Start a guest process that opens `path` now and, each time /tmp/<name>.go is
    written, copies what it reads from that descriptor (or cat's error) into the FIFO
    /tmp/<name>.back.
    Returns once the file is open (the process says so through /tmp/<name>.ready)."""
    fifo = f"/tmp/{name}"
    script = (
        f"exec 3<{path}; echo open >{fifo}.ready; "
        f"while read x <{fifo}.go; do cat <&3 >{fifo}.back 2>&1; done"
    )
    vm.run(
        f"mkfifo {fifo}.ready {fifo}.go {fifo}.back && "
        f"setsid sh -c {shlex.quote(script)} </dev/null >/dev/null 2>&1 &",
        timeout=T,
        check=True,
    )
    assert vm.run(f"cat {fifo}.ready", timeout=T, check=True).stdout == b"open\n"


def _read_held(vm: Machine, name: str) -> tuple[int, bytes]:
    """Have the holder of `name` read from its descriptor (from offset 0, as the snapshot left it)."""
    r = vm.run(f"echo go >/tmp/{name}.go; cat /tmp/{name}.back", timeout=T)
    return r.returncode, r.stdout


@pytest.fixture(scope="module")
def mounted(linux_image: LinuxImage, tmp_path_factory: pytest.TempPathFactory) -> Mounted:
    base = tmp_path_factory.mktemp("mounts")
    src, outside = _tree(base)
    out = base / "out"
    out.mkdir()
    snapshot = base / "mounted.snap"
    mounts = mount_specs({"/src": Mount(src), "/out": Mount(out, writable=True)})
    machine = linux_image.boot(1, linux_image.default_mem_mib, timeout=BOOT_TIMEOUT, mounts=mounts)
    try:
        assert machine.run("cat /src/changing.txt", timeout=T, check=True).stdout == b"version 1\n"
        _hold(machine, "/src/held.txt", "held")
        _hold(machine, "/src/vanishing.txt", "vanishing")
        machine.snapshot(snapshot)
    finally:
        machine.stop()
    return Mounted(snapshot, src, out, outside)


@pytest.fixture
def vm(mounted: Mounted) -> Iterator[Machine]:
    with Machine.restore(mounted.snapshot) as machine:
        yield machine


def test_every_file_of_the_mounted_tree_has_the_hosts_sha256(vm: Machine, mounted: Mounted):
    r = vm.run("cd /src && find . -type f -exec sha256sum {} +", timeout=T, check=True)
    seen = {}
    for line in r.stdout.decode().splitlines():
        digest, name = line.split("  ", 1)
        seen[name.removeprefix("./")] = digest
    host = {
        str(p.relative_to(mounted.src)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in mounted.src.rglob("*")
        if p.is_file() and not p.is_symlink()
    }
    assert seen == host


def test_a_host_file_changed_since_the_snapshot_is_seen_changed(vm: Machine, mounted: Mounted):
    (mounted.src / "changing.txt").write_bytes(b"version 2, longer\n")
    assert vm.run("cat /src/changing.txt", timeout=T).stdout == b"version 2, longer\n"
    (mounted.src / "changing.txt").write_bytes(b"version 3\n")
    vm.reset()  # as between two tests
    assert vm.run("cat /src/changing.txt", timeout=T).stdout == b"version 3\n"


def test_symlinks_are_resolved_in_the_guest_and_never_reach_outside_the_mount(vm: Machine):
    assert vm.run("readlink /src/link_out", timeout=T).stdout == b"../outside/canary\n"
    assert vm.run("cat /src/link_rel", timeout=T).stdout == b"hello, guest\n"
    for path in ("/src/link_out", "/src/link_abs", "/src/chain1", "/src/../outside/canary"):
        r = vm.run(f"cat {path}", timeout=T)
        assert r.returncode != 0, path
        assert SECRET not in r.stdout


def test_writes_to_a_read_only_mount_fail_with_erofs(vm: Machine, mounted: Mounted):
    for cmd in ("echo x >/src/new.txt", "echo x >>/src/tool.py", "mkdir /src/d", "rm /src/empty"):
        r = vm.run(cmd, timeout=T)
        assert r.returncode != 0, cmd
        assert b"Read-only file system" in r.stderr, (cmd, r.stderr)
    assert not (mounted.src / "new.txt").exists()
    assert (mounted.src / "empty").exists()


def test_a_writable_mounts_writes_appear_on_the_host(vm: Machine, mounted: Mounted):
    vm.run("mkdir -p /out/d && echo from the guest >/out/d/w.txt", timeout=T, check=True)
    assert (mounted.out / "d" / "w.txt").read_bytes() == b"from the guest\n"
    vm.reset()  # a writable mount is not VM state: the reset keeps the host file
    assert (mounted.out / "d" / "w.txt").read_bytes() == b"from the guest\n"
    assert vm.run("cat /out/d/w.txt", timeout=T).stdout == b"from the guest\n"


def test_a_file_held_open_across_restore_and_reset_still_reads(vm: Machine, mounted: Mounted):
    (mounted.src / "held.txt").write_bytes(b"held, rewritten on the host\n")
    assert _read_held(vm, "held") == (0, b"held, rewritten on the host\n")
    vm.reset()
    assert _read_held(vm, "held") == (0, b"held, rewritten on the host\n")


def test_a_held_file_that_vanished_on_the_host_is_stale_in_the_guest(mounted: Mounted):
    (mounted.src / "vanishing.txt").unlink()
    try:
        with Machine.restore(mounted.snapshot) as vm:
            _, out = _read_held(vm, "vanishing")
            assert b"Stale file handle" in out, out
            assert vm.run("cat /src/vanishing.txt", timeout=T).returncode != 0
            assert vm.run("echo alive", timeout=T).stdout == b"alive\n"
    finally:
        (mounted.src / "vanishing.txt").write_bytes(b"about to vanish\n")


MARKED = """
import pytest

@pytest.mark.microvm(mounts={"/data": "data"})
def test_reads_the_mounted_file(microvm):
    assert microvm.run("cat /data/hello.txt").stdout == b"hello from the rootdir\\n"

@pytest.mark.microvm(mounts={"/data": "data"})
def test_cannot_write_it(microvm):
    r = microvm.run("echo x > /data/hello.txt")
    assert r.returncode != 0 and b"Read-only" in r.stderr
"""


def test_the_microvm_marker_mounts_a_directory_relative_to_the_rootdir(
    linux_image: LinuxImage, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = Project(pytester, USER_CACHE, monkeypatch)
    project.ini("supermachine_image = linux")
    (pytester.path / "data").mkdir()
    (pytester.path / "data" / "hello.txt").write_bytes(b"hello from the rootdir\n")
    project.write("test_marked_mounts.py", MARKED)
    result = project.run()
    result.assert_outcomes(passed=2)


def test_a_dax_mount_reads_the_host_page_cache_and_stays_current(
    linux_image: LinuxImage, tmp_path: Path
):
    src = make_tree(tmp_path)
    (src / "blob.bin").write_bytes(os.urandom(5 * 1024 * 1024 + 7))
    mounts = mount_specs({"/dax": Mount(src, dax=True)})
    machine = linux_image.boot(1, linux_image.default_mem_mib, timeout=BOOT_TIMEOUT, mounts=mounts)
    try:
        assert b"dax=always" in machine.run("grep ' /dax ' /proc/mounts", timeout=T).stdout
        machine.snapshot(tmp_path / "dax.snap")
    finally:
        machine.stop()
    (src / "hello.txt").write_bytes(b"changed after the snapshot\n")
    with Machine.restore(tmp_path / "dax.snap") as vm:
        r = vm.run("sha256sum /dax/blob.bin", timeout=T, check=True)
        assert (
            r.stdout.split()[0].decode()
            == hashlib.sha256((src / "blob.bin").read_bytes()).hexdigest()
        )
        assert vm.run("cat /dax/hello.txt", timeout=T).stdout == b"changed after the snapshot\n"
