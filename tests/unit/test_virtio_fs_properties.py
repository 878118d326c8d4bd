"""virtio-fs under hostile FUSE requests: nothing escapes the device, nothing outside the mount is touched.

Each example sends a sequence of requests through the real transport and
queues: well-formed headers with random opcodes (known and unknown), node
ids and file handles drawn from the issued ones and from anywhere, names
built to escape (``..``, ``/``, symlinks pointing out, absolute paths),
arguments of random content and length, and raw garbage with lying length
fields. Afterwards:

- no exception left the device and the transport never needed a reset;
- the server logged no bug (nothing at ERROR);
- the canary next to the mount is untouched: same names, bytes, mtime, and
  atime (set before its mtime, so any read of it would move it under
  ``relatime``), and its secret appears in no reply;
- every host fd the session holds lies beneath the mount root;
- the session's state re-binds in a fresh server with the same guarantees.

Read-only and writable mounts are both exercised (the writable one is where
create/rename/link/symlink could plant something outside).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_supermachine.vmm.devices.virtio.fs import VirtioFs
from pytest_supermachine.vmm.devices.virtio.fs.server import FuseServer
from pytest_supermachine.vmm.devices.virtio.fs.uapi import FUSE, OPCODES
from tests.fuse_guest import FuseGuest, fds_under
from tests.unit.test_virtio_fs import SECRET, make_tree

pytestmark = pytest.mark.unit

FAST = settings(
    max_examples=int(os.environ.get("SUPERMACHINE_FUZZ_EXAMPLES", "100")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

#: The escape search needs more examples than the per-request checks: an escape takes a
#: lookup through a link node with a reply large enough to show what it reached.
ESCAPES = settings(FAST, max_examples=int(os.environ.get("SUPERMACHINE_FUZZ_EXAMPLES", "300")))

#: The argument struct each opcode starts with (names follow where FUSE has them).
ARG_STRUCT = {
    "FUSE_INIT": "fuse_init_in",
    "FUSE_FORGET": "fuse_forget_in",
    "FUSE_BATCH_FORGET": "fuse_batch_forget_in",
    "FUSE_GETATTR": "fuse_getattr_in",
    "FUSE_SETATTR": "fuse_setattr_in",
    "FUSE_MKNOD": "fuse_mknod_in",
    "FUSE_MKDIR": "fuse_mkdir_in",
    "FUSE_RENAME": "fuse_rename_in",
    "FUSE_RENAME2": "fuse_rename2_in",
    "FUSE_LINK": "fuse_link_in",
    "FUSE_OPEN": "fuse_open_in",
    "FUSE_OPENDIR": "fuse_open_in",
    "FUSE_READ": "fuse_read_in",
    "FUSE_READDIR": "fuse_read_in",
    "FUSE_READDIRPLUS": "fuse_read_in",
    "FUSE_WRITE": "fuse_write_in",
    "FUSE_RELEASE": "fuse_release_in",
    "FUSE_RELEASEDIR": "fuse_release_in",
    "FUSE_FSYNC": "fuse_fsync_in",
    "FUSE_FSYNCDIR": "fuse_fsync_in",
    "FUSE_FLUSH": "fuse_flush_in",
    "FUSE_ACCESS": "fuse_access_in",
    "FUSE_CREATE": "fuse_create_in",
    "FUSE_LSEEK": "fuse_lseek_in",
    "FUSE_SETUPMAPPING": "fuse_setupmapping_in",
    "FUSE_REMOVEMAPPING": "fuse_removemapping_in",
    "FUSE_GETXATTR": "fuse_getxattr_in",
    "FUSE_INTERRUPT": "fuse_interrupt_in",
}
#: Fields that name server objects: drawn from issued ids as often as from anywhere.
NODE_FIELDS = ("newdir", "oldnodeid", "nodeid")
FH_FIELDS = ("fh",)

escape_names = st.sampled_from(
    [
        b"..",
        b".",
        b"",
        b"/",
        b"../outside",
        b"../outside/canary",
        b"../../",
        b"link_out",
        b"link_abs",
        b"link_dir_out",
        b"chain1",
        b"hello.txt",
        b"sub",
        b"canary",
        b"outside",
        b"/etc/passwd",
        b"sub/../../outside",
        b"x" * 300,
        b"planted",
    ]
)
names = st.one_of(escape_names, escape_names, escape_names, st.binary(max_size=24))
#: What a guest walking a tree does most, so that multi-step escapes (LOOKUP through a
#: link node, then OPEN and READ what came back) are reached, not just single requests.
COMMON_OPS = [
    "FUSE_LOOKUP",
    "FUSE_GETATTR",
    "FUSE_OPEN",
    "FUSE_READ",
    "FUSE_READLINK",
    "FUSE_OPENDIR",
    "FUSE_READDIRPLUS",
    "FUSE_CREATE",
    "FUSE_MKDIR",
    "FUSE_SYMLINK",
    "FUSE_RENAME",
    "FUSE_LINK",
]
u64 = st.one_of(st.integers(0, 8), st.integers(0, 2**64 - 1))


@st.composite
def hostile_request(
    draw: st.DrawFn, issued_nodes: list[int], issued_fhs: list[int], link_nodes: list[int]
) -> bytes:
    """One request: a plausible header with a hostile body, an escape attempt through a
    symlink node, or raw garbage."""
    kind = draw(st.sampled_from(["structured", "structured", "escape", "garbage", "short"]))
    if kind == "garbage":
        return draw(st.binary(min_size=1, max_size=200))
    if kind == "escape":
        return escape_attempt(draw, link_nodes)
    opname = draw(st.one_of(st.sampled_from(COMMON_OPS), st.sampled_from(sorted(OPCODES))))
    opcode = draw(st.one_of(st.just(OPCODES[opname]), st.integers(0, 2**32 - 1)))
    nodeid = draw(st.one_of(st.sampled_from(issued_nodes), st.sampled_from(issued_nodes), u64))
    body = b""
    struct = ARG_STRUCT.get(opname)
    if struct:
        arg = FUSE.new(struct)
        raw = draw(st.binary(min_size=FUSE.sizeof(struct), max_size=FUSE.sizeof(struct)))
        FUSE.ffi.memmove(arg, raw, len(raw))
        for field in NODE_FIELDS:
            if hasattr(arg, field) and draw(st.booleans()):
                setattr(arg, field, draw(st.sampled_from(issued_nodes)))
        for field in FH_FIELDS:
            if hasattr(arg, field) and issued_fhs and draw(st.booleans()):
                setattr(arg, field, draw(st.sampled_from(issued_fhs)))
        if hasattr(arg, "size") and draw(st.booleans()):
            arg.size = draw(st.integers(0, 1 << 17))
        body = FUSE.bytes_of(arg)
    body += b"".join(n + b"\0" for n in draw(st.lists(names, max_size=2)))
    body += draw(st.binary(max_size=16))
    if kind == "short":
        body = body[: draw(st.integers(0, len(body)))]
    length = 40 + len(body)
    if draw(st.integers(0, 9)) == 0:
        length = draw(st.integers(0, 2**32 - 1))
    header = FUSE.build(
        "fuse_in_header",
        len=length,
        opcode=opcode,
        unique=draw(u64),
        nodeid=nodeid,
        total_extlen=draw(st.sampled_from([0, 0, 0, 1, 0xFFFF])),
    )
    return header + body


ESCAPE_OPS = {
    "FUSE_LOOKUP": None,
    "FUSE_OPENDIR": "fuse_open_in",
    "FUSE_CREATE": "fuse_create_in",
    "FUSE_MKDIR": "fuse_mkdir_in",
    "FUSE_MKNOD": "fuse_mknod_in",
    "FUSE_SYMLINK": None,
    "FUSE_UNLINK": None,
    "FUSE_READDIRPLUS": "fuse_read_in",
}
LINKS = ("link_out", "link_abs", "link_dir_out", "link_dir_abs", "chain1")


def escape_attempt(draw: st.DrawFn, link_nodes: list[int]) -> bytes:
    """A request on a symlink node that, were the link followed on the host, would reach
    the canary's directory: a LOOKUP of ``canary`` in ``link_dir_out`` and the like."""
    opname = draw(st.sampled_from(sorted(ESCAPE_OPS)))
    struct = ESCAPE_OPS[opname]
    body = b""
    if struct:
        arg = FUSE.new(struct)
        if struct == "fuse_read_in":
            arg.size = 4096
        elif struct in ("fuse_create_in", "fuse_mknod_in"):
            arg.mode = 0o100644
        elif struct == "fuse_mkdir_in":
            arg.mode = 0o755
        body = FUSE.bytes_of(arg)
    name = draw(st.sampled_from([b"canary", b"planted", b"..", b"outside"]))
    body += name + b"\0" + (b"target\0" if opname == "FUSE_SYMLINK" else b"")
    header = FUSE.build(
        "fuse_in_header",
        len=40 + len(body),
        opcode=OPCODES[opname],
        unique=1,
        nodeid=draw(st.sampled_from(link_nodes)),
    )
    return header + body


def outside_markers(outside: Path) -> list[bytes]:
    """Bytes that appear in a reply only if the server touched something outside the mount:
    the canary's secret, and the inode numbers of the canary and its directory (a LOOKUP or
    GETATTR that reached them would carry one)."""
    inos = [(outside / "canary").stat().st_ino, outside.stat().st_ino]
    return [SECRET, *(ino.to_bytes(8, "little") for ino in inos)]


def assert_nothing_from_outside(reply: bytes, outside: Path) -> None:
    for marker in outside_markers(outside):
        assert marker not in reply, f"a reply carries {marker!r} from outside the mount"


def read_noatime(path: Path) -> bytes:
    """The file's bytes, read without moving its atime (the check must not disturb the canary)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOATIME)
    try:
        return os.read(fd, 1 << 16)
    finally:
        os.close(fd)


def outside_state(outside: Path) -> dict[str, tuple[bytes, int, int, int]]:
    return {
        p.name: (read_noatime(p), p.stat().st_mtime_ns, p.stat().st_atime_ns, p.stat().st_mode)
        for p in sorted(outside.iterdir())
    }


def held_fds(server: FuseServer) -> list[int]:
    return [h.fd for h in server.handles.values() if h.fd >= 0]


def assert_confined(server: FuseServer, root: Path) -> None:
    for fd in held_fds(server):
        target = os.readlink(f"/proc/self/fd/{fd}")
        assert target == str(root) or target.startswith(f"{root}/"), target


@contextlib.contextmanager
def fresh_session(
    writable: bool,
) -> Iterator[tuple[FuseGuest, Path, Path, dict, list[int]]]:
    """A new tree, canary and FUSE session per example (examples must not share state)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = make_tree(Path(tmp))
        outside = Path(tmp) / "outside"
        canary = outside / "canary"
        os.utime(canary, ns=(0, canary.stat().st_mtime_ns))  # atime < mtime: a read moves it
        dev = VirtioFs(root, "fuzz", writable=writable)
        try:
            guest = FuseGuest(dev)
            guest.walk("sub/deeper/data.json")
            links = [guest.walk(link) for link in LINKS]
            guest.open(guest.walk("big.bin"))
            before = outside_state(outside)
            assert before["canary"][2] == 0, "the canary's atime must start before its mtime"
            yield guest, root, outside, before, links
        finally:
            dev.close()
        assert fds_under(tmp) == [], "host fds of the mounted tree outlived the device"


WRITABLE = pytest.mark.parametrize("writable", [False, True], ids=["read-only", "writable"])


@WRITABLE
@ESCAPES
@given(data=st.data())
def test_hostile_requests_never_escape_the_device_or_the_mount(writable, data, caplog):
    caplog.set_level(logging.ERROR, logger="pytest_supermachine.vmm.devices.virtio.fs")
    caplog.clear()
    with fresh_session(writable) as (guest, root, outside, before, link_nodes):
        check_hostile_session(guest, root, outside, before, link_nodes, data, caplog)


def check_hostile_session(guest, root, outside, before, link_nodes, data, caplog) -> None:
    server = guest.device.server
    for _ in range(data.draw(st.integers(1, 12))):
        request = data.draw(
            hostile_request(list(server.nodes) or [1], list(server.handles), link_nodes)
        )
        room = data.draw(st.one_of(st.just(1 << 17), st.sampled_from([0, 1, 15, 16, 64, 4096])))
        queue = data.draw(st.sampled_from([0, 1]))
        reply = guest.raw(request, room, queue=queue)  # asserts the device completed it
        if reply is not None:
            assert_nothing_from_outside(reply.payload, outside)
        assert not guest.transport.needs_reset
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert outside_state(outside) == before
    assert_confined(server, root)

    rebound = FuseServer(root, writable=server.writable)
    rebound.restore_state(server.state())
    try:
        assert_confined(rebound, root)
    finally:
        rebound.close()
    assert outside_state(outside) == before


@WRITABLE
@FAST
@given(request=st.binary(max_size=300), room=st.integers(0, 1 << 16))
def test_any_bytes_get_a_well_formed_reply_or_none(writable, request, room):
    with fresh_session(writable) as (guest, _root, outside, before, _links):
        reply = guest.device.server.handle(request, room)
        if reply is not None:
            header = FUSE.parse("fuse_out_header", reply)
            assert header is not None and header.len == len(reply) <= max(room, 16)
            assert header.error <= 0
            assert_nothing_from_outside(reply, outside)
        assert outside_state(outside) == before
