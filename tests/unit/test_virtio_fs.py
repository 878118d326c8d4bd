"""virtio-fs serving a host directory over FUSE: content, read-only, writable, confinement, snapshots.

No KVM: `tests.fuse_guest` plays Linux's virtio_fs driver through the real
virtio-mmio transport and virtqueues against a real directory tree.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_supermachine.vmm.devices.virtio.fs import VIRTIO_ID_FS, VirtioFs
from pytest_supermachine.vmm.devices.virtio.fs.device import SHM_CACHE
from pytest_supermachine.vmm.devices.virtio.fs.server import NO_FH, FuseServer
from pytest_supermachine.vmm.devices.virtio.fs.uapi import FUSE, OPCODES
from pytest_supermachine.vmm.devices.virtio.mmio import REG_DEVICE_ID
from tests.fuse_guest import ROOT, FuseGuest, fds_under

pytestmark = pytest.mark.unit

C = FUSE.const
SECRET = b"CANARY-7f3a9c-outside-the-mount"


def make_tree(base: Path) -> Path:
    """A mount root with files, a subtree and symlinks of every kind, next to a canary outside it."""
    outside = base / "outside"
    outside.mkdir()
    (outside / "canary").write_bytes(SECRET)
    root = base / "mount"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "hello.txt").write_bytes(b"hello, guest\n")
    (root / "empty").write_bytes(b"")
    (root / "big.bin").write_bytes(os.urandom(300 * 1024 + 17))
    (root / "sub" / "deeper" / "data.json").write_bytes(b'{"k": [1, 2, 3]}')
    (root / "sub" / "notes.md").write_bytes(b"# notes\n" * 100)
    (root / "link_rel").symlink_to("hello.txt")
    (root / "link_abs").symlink_to(outside / "canary")
    (root / "link_out").symlink_to("../outside/canary")
    (root / "link_dir_out").symlink_to("../outside")
    (root / "link_dir_abs").symlink_to(outside)
    (root / "chain2").symlink_to("link_out")
    (root / "chain1").symlink_to("chain2")
    return root


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path)


@pytest.fixture
def ro(tree: Path) -> Iterator[FuseGuest]:
    dev = VirtioFs(tree, "src")
    yield FuseGuest(dev)
    dev.close()


@pytest.fixture
def rw(tree: Path) -> Iterator[FuseGuest]:
    dev = VirtioFs(tree, "out", writable=True)
    yield FuseGuest(dev)
    dev.close()


def host_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())


# -- the device ---------------------------------------------------------------------------------
def test_device_id_is_virtio_fs_and_config_carries_tag_and_queue_count(tree):
    dev = VirtioFs(tree, "src", num_request_queues=2)
    guest = FuseGuest(dev)
    assert guest.driver.read32(REG_DEVICE_ID) == VIRTIO_ID_FS == 26
    assert b"".join(guest.driver.read_config(i, 4) for i in range(0, 36, 4)) == b"src".ljust(
        36, b"\0"
    )
    assert int.from_bytes(guest.driver.read_config(36, 4), "little") == 2
    assert len(guest.queues) == 3
    dev.close()


def test_tag_longer_than_36_bytes_is_refused(tree):
    with pytest.raises(ValueError, match="tag"):
        VirtioFs(tree, "x" * 37)


def test_without_a_dax_window_no_shared_memory_and_no_map_alignment(ro):
    assert ro.device.shm_regions() == {}
    assert not ro.init_out.flags & C["FUSE_MAP_ALIGNMENT"]
    assert ro.init_out.map_alignment == 0


def test_init_negotiates_protocol_7_and_a_cache_policy_that_survives_snapshots(ro):
    out = ro.init_out
    assert out.major == 7 and out.minor == C["FUSE_KERNEL_MINOR_VERSION"]
    assert out.flags & C["FUSE_AUTO_INVAL_DATA"]
    assert not out.flags & (C["FUSE_WRITEBACK_CACHE"] | C["FUSE_CACHE_SYMLINKS"])


def test_init_with_a_newer_major_answers_with_ours_so_the_guest_retries(ro):
    body = FUSE.build("fuse_init_in", major=8, minor=0)
    err, out = ro.call("FUSE_INIT", 0, body, "fuse_init_out")
    assert err == 0 and out.major == 7


# -- serving a tree -----------------------------------------------------------------------------
def test_every_file_reads_back_byte_identical_to_the_host(ro, tree):
    for path in host_files(tree):
        rel = path.relative_to(tree).as_posix()
        node = ro.walk(rel)
        err, attr = ro.getattr(node)
        assert err == 0
        assert attr.attr.size == path.stat().st_size
        assert stat.S_ISREG(attr.attr.mode)
        err, fh = ro.open(node)
        assert err == 0
        assert ro.read_all(node, fh) == path.read_bytes(), rel
        assert ro.release(node, fh) == 0


def test_lookup_and_attr_timeouts_are_zero(ro):
    err, entry = ro.lookup(ROOT, b"hello.txt")
    assert err == 0
    assert (entry.entry_valid, entry.entry_valid_nsec, entry.attr_valid, entry.attr_valid_nsec) == (
        0,
        0,
        0,
        0,
    )
    err, attr = ro.getattr(int(entry.nodeid))
    assert (attr.attr_valid, attr.attr_valid_nsec) == (0, 0)


def test_open_never_asks_the_guest_to_keep_its_page_cache(ro):
    node = ro.walk("hello.txt")
    err, out = ro.call("FUSE_OPEN", node, FUSE.build("fuse_open_in"), "fuse_open_out")
    assert err == 0 and not out.open_flags & C["FOPEN_KEEP_CACHE"]


def test_times_before_1970_travel_as_twos_complement(rw, tree):
    os.utime(tree / "empty", ns=(0, -5 * 10**9))
    err, attr = rw.getattr(rw.walk("empty"))
    assert err == 0 and attr.attr.mtime == 2**64 - 5
    node = rw.walk("hello.txt")
    body = FUSE.build("fuse_setattr_in", valid=C["FATTR_MTIME"], mtime=2**64 - 7)
    assert rw.call("FUSE_SETATTR", node, body)[0] == 0
    assert (tree / "hello.txt").stat().st_mtime_ns == -7 * 10**9


def test_the_same_path_looked_up_twice_is_the_same_node(ro):
    assert ro.walk("sub/notes.md") == ro.walk("sub/notes.md")


def test_readdir_lists_the_directory_with_dot_entries(ro, tree):
    err, fh = ro.opendir(ROOT)
    assert err == 0
    names = [n for n, _, _ in ro.readdir(ROOT, fh, size=200)]
    assert names == [b".", b"..", *sorted(os.fsencode(p.name) for p in tree.iterdir())]
    assert ro.release(ROOT, fh, directory=True) == 0


def test_readdirplus_entries_carry_usable_node_ids(ro, tree):
    sub = ro.walk("sub")
    err, fh = ro.opendir(sub)
    entries = {n: (t, e) for n, t, e in ro.readdir(sub, fh, plus=True)}
    assert set(entries) == {b".", b"..", b"deeper", b"notes.md"}
    dtype, entry = entries[b"notes.md"]
    assert dtype == stat.S_IFREG >> 12
    err, fh2 = ro.open(int(entry.nodeid))
    assert err == 0
    assert ro.read_all(int(entry.nodeid), fh2) == (tree / "sub" / "notes.md").read_bytes()


def test_symlinks_are_returned_as_symlinks_with_their_target_text(ro, tree):
    for name, target in [
        ("link_rel", b"hello.txt"),
        ("link_out", b"../outside/canary"),
        ("link_abs", os.fsencode(tree.parent / "outside" / "canary")),
    ]:
        node = ro.walk(name)
        err, attr = ro.getattr(node)
        assert err == 0 and stat.S_ISLNK(attr.attr.mode)
        assert ro.readlink(node) == (0, target)


def test_statfs_reports_the_host_filesystem(ro, tree):
    err, out = ro.call("FUSE_STATFS", ROOT, b"", "fuse_statfs_out")
    s = os.statvfs(tree)
    assert err == 0
    assert (out.st.bsize, out.st.blocks, out.st.namelen) == (s.f_bsize, s.f_blocks, s.f_namemax)


def test_lseek_finds_data_and_holes(ro):
    node = ro.walk("big.bin")
    _, fh = ro.open(node)
    body = FUSE.build("fuse_lseek_in", fh=fh, offset=0, whence=os.SEEK_HOLE)
    err, out = ro.call("FUSE_LSEEK", node, body, "fuse_lseek_out")
    assert err == 0 and out.offset == 300 * 1024 + 17


def test_access_checks_existence_and_refuses_write_on_a_read_only_mount(ro):
    node = ro.walk("hello.txt")
    assert ro.call("FUSE_ACCESS", node, FUSE.build("fuse_access_in", mask=os.R_OK))[0] == 0
    assert (
        ro.call("FUSE_ACCESS", node, FUSE.build("fuse_access_in", mask=os.W_OK))[0] == errno.EROFS
    )


def test_xattrs_are_not_supported(ro):
    node = ro.walk("hello.txt")
    assert (
        ro.call("FUSE_GETXATTR", node, FUSE.build("fuse_getxattr_in", size=64) + b"user.x\0")[0]
        == errno.ENOSYS
    )
    assert (
        ro.call("FUSE_LISTXATTR", node, FUSE.build("fuse_getxattr_in", size=64))[0] == errno.ENOSYS
    )


def test_unknown_opcodes_answer_enosys(ro):
    for opcode in (7, 19, 1000, 0xFFFF_FFFF, OPCODES["FUSE_IOCTL"]):
        hdr = FUSE.build("fuse_in_header", len=40, opcode=opcode, unique=5, nodeid=1)
        reply = ro.raw(hdr)
        assert reply is not None and reply.errno == errno.ENOSYS and reply.unique == 5


def test_forget_gets_no_reply_and_drops_the_node_after_its_last_lookup(ro):
    node = ro.walk("hello.txt")
    ro.walk("hello.txt")
    assert ro.request("FUSE_FORGET", node, FUSE.build("fuse_forget_in", nlookup=1)) is None
    assert ro.getattr(node)[0] == 0
    assert ro.request("FUSE_FORGET", node, FUSE.build("fuse_forget_in", nlookup=1)) is None
    assert ro.getattr(node)[0] == errno.ESTALE


def test_batch_forget_drops_every_listed_node(ro):
    a, b = ro.walk("hello.txt"), ro.walk("empty")
    body = FUSE.build("fuse_batch_forget_in", count=2) + b"".join(
        FUSE.build("fuse_forget_one", nodeid=n, nlookup=1) for n in (a, b)
    )
    assert ro.request("FUSE_BATCH_FORGET", 0, body) is None
    assert ro.getattr(a)[0] == ro.getattr(b)[0] == errno.ESTALE


def test_destroy_ends_the_session_and_closes_handles(ro):
    node = ro.walk("hello.txt")
    assert ro.open(node)[0] == 0
    assert ro.call("FUSE_DESTROY", 0)[0] == 0
    assert ro.device.server.handles == {}
    assert ro.getattr(node)[0] == errno.ESTALE


# -- read-only mounts -----------------------------------------------------------------------------
def mutating_requests(guest: FuseGuest) -> dict[str, tuple[str, int, bytes]]:
    """One request per mutating operation, each of which would change the host tree."""
    file_node, sub = guest.walk("hello.txt"), guest.walk("sub")
    return {
        "setattr": (
            "FUSE_SETATTR",
            file_node,
            FUSE.build("fuse_setattr_in", valid=C["FATTR_SIZE"], size=0),
        ),
        "symlink": ("FUSE_SYMLINK", ROOT, b"new_link\0target\0"),
        "mknod": ("FUSE_MKNOD", ROOT, FUSE.build("fuse_mknod_in", mode=0o100644) + b"node\0"),
        "mkdir": ("FUSE_MKDIR", ROOT, FUSE.build("fuse_mkdir_in", mode=0o755) + b"newdir\0"),
        "unlink": ("FUSE_UNLINK", ROOT, b"hello.txt\0"),
        "rmdir": ("FUSE_RMDIR", sub, b"deeper\0"),
        "rename": (
            "FUSE_RENAME",
            ROOT,
            FUSE.build("fuse_rename_in", newdir=sub) + b"hello.txt\0moved\0",
        ),
        "rename2": (
            "FUSE_RENAME2",
            ROOT,
            FUSE.build("fuse_rename2_in", newdir=ROOT) + b"empty\0e2\0",
        ),
        "link": ("FUSE_LINK", ROOT, FUSE.build("fuse_link_in", oldnodeid=file_node) + b"hard\0"),
        "create": (
            "FUSE_CREATE",
            ROOT,
            FUSE.build("fuse_create_in", flags=os.O_WRONLY, mode=0o100644) + b"c\0",
        ),
        "write": ("FUSE_WRITE", file_node, FUSE.build("fuse_write_in", fh=1, size=3) + b"abc"),
        "open_for_write": ("FUSE_OPEN", file_node, FUSE.build("fuse_open_in", flags=os.O_WRONLY)),
        "open_truncating": (
            "FUSE_OPEN",
            file_node,
            FUSE.build("fuse_open_in", flags=os.O_RDONLY | os.O_TRUNC),
        ),
        "setxattr": (
            "FUSE_SETXATTR",
            file_node,
            FUSE.build("fuse_setxattr_in", size=1) + b"user.a\0x",
        ),
        "fallocate": (
            "FUSE_FALLOCATE",
            file_node,
            FUSE.build("fuse_fallocate_in", fh=1, length=4096),
        ),
    }


MUTATING = [
    "setattr",
    "symlink",
    "mknod",
    "mkdir",
    "unlink",
    "rmdir",
    "rename",
    "rename2",
    "link",
    "create",
    "write",
    "open_for_write",
    "open_truncating",
    "setxattr",
    "fallocate",
]


def snapshot_tree(root: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(root)): (
            p.lstat().st_mode,
            os.readlink(p).encode() if p.is_symlink() else p.read_bytes() if p.is_file() else b"",
        )
        for p in sorted(root.rglob("*"))
    }


@pytest.mark.parametrize("op", MUTATING)
def test_every_mutating_operation_on_a_read_only_mount_is_erofs(ro, tree, op):
    before = snapshot_tree(tree)
    opcode, node, body = mutating_requests(ro)[op]
    assert ro.call(opcode, node, body)[0] == errno.EROFS
    assert snapshot_tree(tree) == before


# -- writable mounts ------------------------------------------------------------------------------
def test_create_and_write_appear_on_the_host(rw, tree):
    err, entry, fh = rw.create(ROOT, b"made.txt")
    assert err == 0
    node = int(entry.nodeid)
    err, out = rw.write(node, fh, b"written by the guest", 0)
    assert err == 0 and out.size == 20
    assert rw.release(node, fh) == 0
    assert (tree / "made.txt").read_bytes() == b"written by the guest"


def test_rename_moves_the_host_file_and_the_node_follows(rw, tree):
    node = rw.walk("hello.txt")
    sub = rw.walk("sub")
    body = FUSE.build("fuse_rename_in", newdir=sub) + b"hello.txt\0moved.txt\0"
    assert rw.call("FUSE_RENAME", ROOT, body)[0] == 0
    assert not (tree / "hello.txt").exists()
    assert (tree / "sub" / "moved.txt").read_bytes() == b"hello, guest\n"
    _, fh = rw.open(node)
    assert rw.read_all(node, fh) == b"hello, guest\n"


def test_renaming_a_directory_repaths_the_nodes_beneath_it(rw, tree):
    data = rw.walk("sub/deeper/data.json")
    assert (
        rw.call("FUSE_RENAME", ROOT, FUSE.build("fuse_rename_in", newdir=ROOT) + b"sub\0renamed\0")[
            0
        ]
        == 0
    )
    err, attr = rw.getattr(data)
    assert err == 0 and attr.attr.size == (tree / "renamed" / "deeper" / "data.json").stat().st_size


def test_rename_noreplace_refuses_an_existing_target(rw, tree):
    body = FUSE.build("fuse_rename2_in", newdir=ROOT, flags=1) + b"hello.txt\0empty\0"
    assert rw.call("FUSE_RENAME2", ROOT, body)[0] == errno.EEXIST
    assert (tree / "hello.txt").exists()


def test_unlink_removes_the_host_file_and_its_node_goes_stale(rw, tree):
    node = rw.walk("hello.txt")
    assert rw.call("FUSE_UNLINK", ROOT, b"hello.txt\0")[0] == 0
    assert not (tree / "hello.txt").exists()
    assert rw.getattr(node)[0] == errno.ESTALE


def test_mkdir_symlink_link_and_rmdir_reach_the_host(rw, tree):
    assert rw.call("FUSE_MKDIR", ROOT, FUSE.build("fuse_mkdir_in", mode=0o750) + b"d\0")[0] == 0
    assert (tree / "d").is_dir()
    assert rw.call("FUSE_SYMLINK", ROOT, b"s\0/anywhere/at/all\0")[0] == 0
    assert os.readlink(tree / "s") == "/anywhere/at/all"
    node = rw.walk("hello.txt")
    assert (
        rw.call("FUSE_LINK", ROOT, FUSE.build("fuse_link_in", oldnodeid=node) + b"hard\0")[0] == 0
    )
    assert (tree / "hard").stat().st_ino == (tree / "hello.txt").stat().st_ino
    assert rw.call("FUSE_RMDIR", ROOT, b"d\0")[0] == 0
    assert not (tree / "d").exists()


def test_setattr_truncates_and_chmods_on_the_host(rw, tree):
    node = rw.walk("sub/notes.md")
    body = FUSE.build(
        "fuse_setattr_in", valid=C["FATTR_SIZE"] | C["FATTR_MODE"], size=4, mode=0o600
    )
    err, out = rw.call("FUSE_SETATTR", node, body, "fuse_attr_out")
    assert err == 0 and out.attr.size == 4
    assert (tree / "sub" / "notes.md").read_bytes() == b"# no"
    assert stat.S_IMODE((tree / "sub" / "notes.md").stat().st_mode) == 0o600


def test_setattr_on_a_symlink_never_changes_its_target(rw, tree):
    node = rw.walk("link_out")
    body = FUSE.build("fuse_setattr_in", valid=C["FATTR_MODE"], mode=0o777)
    assert rw.call("FUSE_SETATTR", node, body)[0] == errno.EOPNOTSUPP
    assert stat.S_IMODE((tree.parent / "outside" / "canary").stat().st_mode) != 0o777


# -- confinement --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [b"..", b".", b"../outside", b"sub/../..", b"/etc", b"a/b", b""])
def test_names_that_are_not_one_component_are_refused(ro, name):
    err, _ = ro.call("FUSE_LOOKUP", ROOT, name + b"\0", "fuse_entry_out")
    assert err == errno.EINVAL


def test_a_name_ends_at_its_first_nul(ro):
    err, entry = ro.call(
        "FUSE_LOOKUP", ROOT, b"hello.txt\0/../../outside/canary\0", "fuse_entry_out"
    )
    assert err == 0 and entry.attr.size == len(b"hello, guest\n")


@pytest.mark.parametrize("link", ["link_abs", "link_out", "link_dir_out", "chain1"])
def test_opening_a_symlink_never_follows_it_on_the_host(ro, link):
    node = ro.walk(link)
    err, _ = ro.open(node)
    assert err == errno.ELOOP


@pytest.mark.parametrize("link", ["link_dir_out", "link_dir_abs", "link_abs", "chain1"])
def test_looking_up_through_a_symlink_never_follows_it_on_the_host(ro, link):
    node = ro.walk(link)
    err, _ = ro.lookup(node, b"canary")
    assert err in (errno.ELOOP, errno.ENOTDIR)
    err, _ = ro.opendir(node)
    assert err in (errno.ELOOP, errno.ENOTDIR)


def test_writable_mount_cannot_create_through_a_symlink_pointing_out(rw, tree):
    node = rw.walk("link_dir_out")
    err, _, _ = rw.create(node, b"planted")
    assert err in (errno.ELOOP, errno.ENOTDIR)
    assert sorted(p.name for p in (tree.parent / "outside").iterdir()) == ["canary"]


def test_a_node_id_never_issued_is_estale(ro):
    for node in (0, 2, 999, 2**63, 2**64 - 1):
        assert ro.getattr(node)[0] == errno.ESTALE
        assert ro.lookup(node, b"hello.txt")[0] == errno.ESTALE


def test_a_file_handle_never_issued_or_released_is_ebadf(ro):
    node = ro.walk("hello.txt")
    assert ro.read(node, 12345, 10)[0] == errno.EBADF
    _, fh = ro.open(node)
    assert ro.release(node, fh) == 0
    assert ro.read(node, fh, 10)[0] == errno.EBADF
    err, dfh = ro.opendir(ROOT)
    assert err == 0
    assert ro.read(node, dfh, 10)[0] == errno.EBADF  # a directory handle is not a file handle


# -- malformed requests ------------------------------------------------------------------------------
def test_a_request_shorter_than_its_header_gets_einval(ro):
    reply = ro.raw(b"\x01\x02\x03")
    assert reply is not None and reply.errno == errno.EINVAL


def test_a_header_claiming_more_bytes_than_sent_gets_einval(ro):
    hdr = FUSE.build("fuse_in_header", len=4096, opcode=OPCODES["FUSE_GETATTR"], unique=9, nodeid=1)
    reply = ro.raw(hdr)
    assert reply is not None and reply.errno == errno.EINVAL and reply.unique == 9


def test_short_arguments_get_einval(ro):
    node = ro.walk("hello.txt")
    assert ro.call("FUSE_READ", node, b"\x00" * 8)[0] == errno.EINVAL


def test_a_write_claiming_more_data_than_sent_gets_einval(rw, tree):
    node = rw.walk("hello.txt")
    _, fh = rw.open(node, os.O_WRONLY)
    body = FUSE.build("fuse_write_in", fh=fh, size=100) + b"abc"
    assert rw.call("FUSE_WRITE", node, body)[0] == errno.EINVAL
    assert (tree / "hello.txt").read_bytes() == b"hello, guest\n"


def test_a_read_never_overflows_the_reply_buffer(ro):
    node = ro.walk("big.bin")
    _, fh = ro.open(node)
    body = FUSE.build("fuse_read_in", fh=fh, size=1 << 20)
    reply = ro.request("FUSE_READ", node, body, room=1000)
    assert reply is not None and reply.used == 1000 and reply.length == 1000


def test_a_request_without_room_for_a_reply_is_completed_with_nothing(ro):
    hdr = FUSE.build("fuse_in_header", len=40, opcode=OPCODES["FUSE_GETATTR"], unique=1, nodeid=1)
    assert ro.raw(hdr, room=0) is None


# -- snapshots ------------------------------------------------------------------------------------
def test_state_round_trip_rebinds_nodes_and_open_handles_in_a_new_device(tree):
    first = VirtioFs(tree, "src")
    guest = FuseGuest(first)
    node = guest.walk("sub/deeper/data.json")
    _, fh = guest.open(node)
    dir_node = guest.walk("sub")
    _, dfh = guest.opendir(dir_node)
    lookups = first.server.nodes[node].lookups
    second = VirtioFs(tree, "src")
    guest.restore_into(second)
    first.close()
    assert guest.read(node, fh, 100) == (0, b'{"k": [1, 2, 3]}')
    assert [n for n, _, _ in guest.readdir(dir_node, dfh)] == [b".", b"..", b"deeper", b"notes.md"]
    assert second.server.nodes[node].lookups == lookups
    second.close()


def test_state_carries_node_paths_generations_lookup_counts_and_handles(ro):
    node = ro.walk("sub/notes.md")
    ro.walk("sub/notes.md")
    _, fh = ro.open(node)
    st = ro.device.state()["fuse"]
    assert [node, b"sub/notes.md", True, 0, 2] in st["nodes"]
    assert [fh, node, os.O_RDONLY, False] in st["handles"]


def restored(tree: Path, state: dict) -> FuseServer:
    server = FuseServer(tree)
    server.restore_state(state)
    return server


def request(server: FuseServer, opcode: str, nodeid: int, body: bytes = b"") -> tuple[int, bytes]:
    hdr = FUSE.build(
        "fuse_in_header", len=40 + len(body), opcode=OPCODES[opcode], unique=1, nodeid=nodeid
    )
    reply = server.handle(hdr + body)
    assert reply is not None
    out = FUSE.parse("fuse_out_header", reply)
    return -out.error, reply[16:]


def test_a_file_that_vanished_before_restore_is_estale_for_node_and_handle(ro, tree):
    node = ro.walk("hello.txt")
    _, fh = ro.open(node)
    state = ro.device.server.state()
    (tree / "hello.txt").unlink()
    server = restored(tree, state)
    assert request(server, "FUSE_GETATTR", node, FUSE.build("fuse_getattr_in"))[0] == errno.ESTALE
    assert (
        request(server, "FUSE_READ", node, FUSE.build("fuse_read_in", fh=fh, size=10))[0]
        == errno.ESTALE
    )
    assert request(server, "FUSE_OPEN", node, FUSE.build("fuse_open_in"))[0] == errno.ESTALE
    server.close()


def test_after_restore_the_guest_reads_the_current_host_content(ro, tree):
    node = ro.walk("hello.txt")
    state = ro.device.server.state()
    (tree / "hello.txt").write_bytes(b"changed since the snapshot")
    server = restored(tree, state)
    err, out = request(server, "FUSE_OPEN", node, FUSE.build("fuse_open_in"))
    assert err == 0
    fh = FUSE.parse("fuse_open_out", out).fh
    body = FUSE.build("fuse_read_in", fh=fh, size=100)
    assert request(server, "FUSE_READ", node, body) == (0, b"changed since the snapshot")
    server.close()


# -- DAX seam -------------------------------------------------------------------------------------
class MmapWindow:
    """A DAX window made of real ``MAP_SHARED`` mappings of the host fds, read by offset."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.maps: dict[int, tuple[mmap.mmap, int]] = {}

    def map(self, offset: int, fd: int, file_offset: int, length: int, *, writable: bool) -> None:
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        self.maps[offset] = (
            mmap.mmap(fd, length, mmap.MAP_SHARED, prot, offset=file_offset),
            length,
        )

    def unmap(self, offset: int, length: int) -> None:
        for start in [
            s for s, (_, n) in self.maps.items() if s < offset + length and offset < s + n
        ]:
            self.maps.pop(start)[0].close()

    def read(self, offset: int, length: int) -> bytes:
        m, _ = self.maps[offset]
        return m[:length]


@pytest.fixture
def dax(tree: Path) -> Iterator[tuple[FuseGuest, MmapWindow]]:
    window = MmapWindow(1 << 24)
    dev = VirtioFs(tree, "src", dax=window)
    yield FuseGuest(dev), window
    dev.close()


def setupmapping(
    guest: FuseGuest, node: int, fh: int, moffset: int, length: int, flags: int = 0
) -> int:
    body = FUSE.build(
        "fuse_setupmapping_in", fh=fh, foffset=0, len=length, flags=flags, moffset=moffset
    )
    return guest.call("FUSE_SETUPMAPPING", node, body)[0]


def test_with_a_window_the_device_exposes_it_and_init_agrees_on_page_alignment(dax):
    guest, window = dax
    assert guest.device.shm_regions() == {SHM_CACHE: window.size}
    assert guest.init_out.flags & C["FUSE_MAP_ALIGNMENT"] and guest.init_out.map_alignment == 12


def test_setupmapping_maps_the_host_file_into_the_window(dax, tree):
    guest, window = dax
    node = guest.walk("big.bin")
    _, fh = guest.open(node)
    assert setupmapping(guest, node, fh, 1 << 21, 1 << 16, C["FUSE_SETUPMAPPING_FLAG_READ"]) == 0
    assert window.read(1 << 21, 1 << 16) == (tree / "big.bin").read_bytes()[: 1 << 16]


def test_setupmapping_without_a_handle_maps_the_nodes_file_as_linux_asks(dax, tree):
    guest, window = dax
    node = guest.walk("big.bin")  # Linux's DAX maps per inode: fh = -1, the file is the node
    assert setupmapping(guest, node, NO_FH, 1 << 21, 1 << 16, C["FUSE_SETUPMAPPING_FLAG_READ"]) == 0
    assert window.read(1 << 21, 1 << 16) == (tree / "big.bin").read_bytes()[: 1 << 16]
    state = guest.device.server.state()
    restored = MmapWindow(1 << 24)
    server = FuseServer(tree, dax=restored)
    server.restore_state(state)
    assert restored.read(1 << 21, 1 << 16) == (tree / "big.bin").read_bytes()[: 1 << 16]
    server.close()


def test_removemapping_unmaps_the_range(dax):
    guest, window = dax
    node = guest.walk("big.bin")
    _, fh = guest.open(node)
    setupmapping(guest, node, fh, 0, 4096)
    body = FUSE.build("fuse_removemapping_in", count=1) + FUSE.build(
        "fuse_removemapping_one", moffset=0, len=4096
    )
    assert guest.call("FUSE_REMOVEMAPPING", node, body)[0] == 0
    assert window.maps == {} and guest.device.server.mappings == []


def test_writable_mapping_on_a_read_only_mount_is_erofs(dax):
    guest, window = dax
    node = guest.walk("big.bin")
    _, fh = guest.open(node)
    assert setupmapping(guest, node, fh, 0, 4096, C["FUSE_SETUPMAPPING_FLAG_WRITE"]) == errno.EROFS
    assert window.maps == {}


@pytest.mark.parametrize(
    ("moffset", "length"), [(1 << 24, 4096), ((1 << 24) - 4096, 8192), (100, 4096), (0, 0)]
)
def test_mappings_outside_the_window_or_unaligned_are_einval(dax, moffset, length):
    guest, window = dax
    node = guest.walk("big.bin")
    _, fh = guest.open(node)
    assert setupmapping(guest, node, fh, moffset, length) == errno.EINVAL
    assert window.maps == {}


def test_restore_reestablishes_the_mappings(dax, tree):
    guest, _ = dax
    node = guest.walk("big.bin")
    _, fh = guest.open(node)
    setupmapping(guest, node, fh, 8192, 4096)
    state = guest.device.server.state()
    window = MmapWindow(1 << 24)
    server = FuseServer(tree, dax=window)
    server.restore_state(state)
    assert window.read(8192, 4096) == (tree / "big.bin").read_bytes()[:4096]
    server.close()


def test_without_a_window_dax_requests_are_enosys(ro):
    node = ro.walk("big.bin")
    _, fh = ro.open(node)
    assert setupmapping(ro, node, fh, 0, 4096) == errno.ENOSYS


# -- session edges -------------------------------------------------------------------------------
def test_renaming_a_file_onto_itself_keeps_its_node(rw):
    node = rw.walk("hello.txt")
    body = FUSE.build("fuse_rename_in", newdir=ROOT) + b"hello.txt\0hello.txt\0"
    assert rw.call("FUSE_RENAME", ROOT, body)[0] == 0
    assert rw.getattr(node)[0] == 0


def test_a_second_init_starts_a_new_session(ro):
    node = ro.walk("hello.txt")
    assert ro.open(node)[0] == 0
    assert ro.init()[0] == 0
    assert ro.device.server.handles == {}
    assert ro.getattr(node)[0] == errno.ESTALE
    assert ro.getattr(ROOT)[0] == 0


def test_opening_a_fifo_is_refused_instead_of_blocking_the_vmm(rw, tree):
    body = FUSE.build("fuse_mknod_in", mode=stat.S_IFIFO | 0o644) + b"pipe\0"
    err, entry = rw.call("FUSE_MKNOD", ROOT, body, "fuse_entry_out")
    assert err == 0 and stat.S_ISFIFO((tree / "pipe").lstat().st_mode)
    assert rw.open(int(entry.nodeid))[0] == errno.EACCES
    assert rw.open(int(entry.nodeid), os.O_WRONLY)[0] in (errno.EACCES, errno.ENXIO)


def test_device_nodes_are_not_created_on_the_host(rw, tree):
    body = FUSE.build("fuse_mknod_in", mode=stat.S_IFCHR | 0o666, rdev=0x0103) + b"null\0"
    assert rw.call("FUSE_MKNOD", ROOT, body)[0] == errno.EPERM
    assert not (tree / "null").exists()


def test_closing_the_device_releases_every_host_fd(tree):
    dev = VirtioFs(tree, "src")
    guest = FuseGuest(dev)
    for name in ("hello.txt", "big.bin"):
        assert guest.open(guest.walk(name))[0] == 0
    assert guest.opendir(ROOT)[0] == 0
    dev.close()
    assert fds_under(str(tree)) == []


def test_reading_the_window_outside_it_or_after_close_is_refused():
    from pytest_supermachine.errors import MachineError
    from pytest_supermachine.vmm.devices.virtio.fs.window import HostDaxWindow

    window = HostDaxWindow(1 << 16)
    assert window.read(100, 3) == bytes(3)  # any length inside, pages or not
    with pytest.raises(OSError, match="outside the DAX window"):
        window.read((1 << 16) - 2, 3)
    window.close()
    with pytest.raises(MachineError, match="closed"):
        window.read(0, 1)
