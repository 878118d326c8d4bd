"""A FUSE server for one host directory: request bytes in, reply bytes out.

`FuseServer.handle` takes one request exactly as the guest's FUSE driver
queues it (``fuse_in_header`` + arguments) and returns the reply
(``fuse_out_header`` + payload), or None for the requests FUSE answers with
nothing (FORGET, BATCH_FORGET, INTERRUPT). It never raises for anything in a
request: malformed headers, wrong lengths, unknown opcodes, node ids or file
handles never issued all become ``-errno`` replies; a bug in an operation is
logged at ERROR and answered with EIO.

**Nodes** are root-relative byte paths (`Node.path`); ids are never reused,
so a forged or stale id matches nothing (ESTALE). Every host access resolves
the path afresh through `HostDirectory` (confined ``openat2``), which is what
makes a node *re-bindable*: after `restore_state` (another process, or the
host tree changed since the snapshot) the same path names the current host
file, and a path that vanished answers ESTALE, never a host exception.
**Handles** (fh) hold a host fd and the open flags; `restore_state` reopens
them by path (without ``O_CREAT``/``O_TRUNC``), a vanished one becomes ESTALE.

**Read-only** mounts (the default) answer every mutating request (SETATTR,
SYMLINK, MKNOD, MKDIR, UNLINK, RMDIR, RENAME/RENAME2, LINK, WRITE, CREATE,
SETXATTR, REMOVEXATTR, FALLOCATE, COPY_FILE_RANGE, TMPFILE, an OPEN for
writing or with O_TRUNC, a writable DAX mapping) with EROFS before looking at
anything else. A writable mount writes through to the host: those writes are
not part of the VM's state and a reset does not undo them.

**Caching policy, chosen for snapshots**: a snapshot freezes the guest's page
and dentry caches, and a test restored from it must see the host content of
*now*. So every ``entry_valid``/``attr_valid`` timeout is 0 (each path walk
and stat goes to the server), OPEN never sets ``FOPEN_KEEP_CACHE`` (the
kernel drops a file's cached pages on every open), INIT offers
``FUSE_AUTO_INVAL_DATA`` (a file kept open across a restore drops its pages
when the server reports a new mtime/size) and never ``FUSE_WRITEBACK_CACHE``
or ``FUSE_CACHE_SYMLINKS``. With DAX the guest maps the host page cache
itself, so mapped ranges are current by construction.

**DAX** is a seam: with a `DaxWindow` (the machine's shared-memory slot) INIT
offers ``FUSE_MAP_ALIGNMENT`` and SETUPMAPPING/REMOVEMAPPING map ranges of an
open handle's host fd (or, as Linux asks with ``fh = -1``, the node's file) into
the window; the mappings are part of the state and re-established by `restore_state`. Without a window both answer ENOSYS.

GETXATTR/LISTXATTR/SETXATTR/REMOVEXATTR answer ENOSYS (the guest kernel then
stops asking); so does every opcode without an ``_op_<name>`` method.

Why this module is longer than ~600 lines: it holds one handler per FUSE opcode (about
forty), found by name from one list; each is short, and they share the node and handle
tables that snapshots carry. Host access is in hostdir.py, the struct layouts in uapi.py.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from .hostdir import FsError, HostDirectory, check_name, join
from .uapi import FUSE, OPCODES

log = logging.getLogger(__name__)

C = FUSE.const
FUSE_ROOT_ID = C["FUSE_ROOT_ID"]
KERNEL_MAJOR = C["FUSE_KERNEL_VERSION"]
KERNEL_MINOR = C["FUSE_KERNEL_MINOR_VERSION"]
IN_HEADER = FUSE.sizeof("fuse_in_header")
OUT_HEADER = FUSE.sizeof("fuse_out_header")
DIRENT = FUSE.sizeof("fuse_dirent")
ENTRY_OUT = FUSE.sizeof("fuse_entry_out")
#: Largest WRITE (and READ) payload the server accepts, announced in INIT.
MAX_WRITE = 1 << 20
MAX_PAGES = MAX_WRITE // 4096
#: log2 of the DAX mapping alignment (pages).
DAX_ALIGNMENT_SHIFT = 12
#: INIT flags offered (the guest's flags are intersected with these).
INIT_FLAGS = (
    C["FUSE_ASYNC_READ"]
    | C["FUSE_ATOMIC_O_TRUNC"]
    | C["FUSE_BIG_WRITES"]
    | C["FUSE_AUTO_INVAL_DATA"]
    | C["FUSE_DO_READDIRPLUS"]
    | C["FUSE_READDIRPLUS_AUTO"]
    | C["FUSE_PARALLEL_DIROPS"]
    | C["FUSE_MAX_PAGES"]
    | C["FUSE_INIT_EXT"]
)
#: Open flags a handle keeps (creation flags are the server's business, access mode the guest's).
_OPEN_FLAGS_KEPT = os.O_ACCMODE | os.O_APPEND | os.O_TRUNC | os.O_NONBLOCK | os.O_SYNC
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

_MUTATING = frozenset(
    OPCODES[name]
    for name in (
        "FUSE_SETATTR",
        "FUSE_SYMLINK",
        "FUSE_MKNOD",
        "FUSE_MKDIR",
        "FUSE_UNLINK",
        "FUSE_RMDIR",
        "FUSE_RENAME",
        "FUSE_RENAME2",
        "FUSE_LINK",
        "FUSE_WRITE",
        "FUSE_CREATE",
        "FUSE_SETXATTR",
        "FUSE_REMOVEXATTR",
        "FUSE_FALLOCATE",
        "FUSE_COPY_FILE_RANGE",
        "FUSE_TMPFILE",
    )
)
_NO_REPLY = frozenset(OPCODES[n] for n in ("FUSE_FORGET", "FUSE_BATCH_FORGET", "FUSE_INTERRUPT"))


class DaxWindow(Protocol):
    """The machine's shared-memory window (virtio shm region 0) that DAX maps host files into.

    Offsets are relative to the window's start; the machine guarantees that
    `map` of a range replaces whatever was mapped there, and that `unmap`
    leaves the range mapped to nothing the guest can read host data through.

    Linux maps whole ``FUSE_DAX_SZ`` (2 MiB) ranges, so a range may extend
    past the end of the file: the window must back that tail with zero pages
    (a guest access past EOF must never become a SIGBUS in a vCPU thread).
    The server has checked that ranges are page-aligned and inside `size`,
    and that `writable` is only ever asked for on a writable mount.
    """

    @property
    def size(self) -> int:
        """Window length in bytes."""

    def map(self, offset: int, fd: int, file_offset: int, length: int, *, writable: bool) -> None:
        """Map ``[file_offset, +length)`` of host `fd` (``MAP_SHARED``) at `offset` of the window."""

    def unmap(self, offset: int, length: int) -> None:
        """Drop whatever is mapped at ``[offset, +length)`` of the window."""


@dataclass
class Node:
    """One guest inode: a root-relative path; `path` None once unlinked or replaced."""

    nodeid: int
    path: bytes | None
    generation: int = 0
    lookups: int = 0


@dataclass
class Handle:
    """One open file or directory; `fd` is -1 when it could not be re-bound (ESTALE)."""

    fh: int
    nodeid: int
    flags: int
    is_dir: bool
    fd: int = -1


#: The fh of a SETUPMAPPING that names its file by node, not by handle: Linux always
#: sends it (fs/fuse/dax.c, ``inarg.fh = -1``; its mappings belong to the inode).
NO_FH = (1 << 64) - 1


@dataclass
class DaxMapping:
    """One SETUPMAPPING in force: window range, source (handle `fh`, or node `nodeid`
    when `fh` is `NO_FH`) and file offset."""

    moffset: int
    length: int
    fh: int
    foffset: int
    writable: bool
    nodeid: int = 0


class FuseServer:
    """Serves one host directory to one guest FUSE session."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        writable: bool = False,
        dax: DaxWindow | None = None,
    ) -> None:
        self.host = HostDirectory(root, writable=writable)
        self.dax = dax
        self.minor = 0
        self.nodes: dict[int, Node] = {FUSE_ROOT_ID: Node(FUSE_ROOT_ID, b"", 0, 1)}
        self._by_path: dict[bytes, int] = {b"": FUSE_ROOT_ID}
        self.handles: dict[int, Handle] = {}
        self.mappings: list[DaxMapping] = []
        self._next_nodeid = FUSE_ROOT_ID + 1
        self._next_fh = 1
        #: opcode -> handler: every ``_op_<name>`` method serves ``FUSE_<NAME>``.
        self._ops = {
            OPCODES["FUSE_" + attr[4:].upper()]: getattr(self, attr)
            for attr in dir(type(self))
            if attr.startswith("_op_")
        }

    @property
    def writable(self) -> bool:
        return self.host.writable

    def close(self) -> None:
        """Close every host fd (handles and the root); the server is unusable afterwards."""
        self._drop_handles()
        self.host.close()

    # -- dispatch ---------------------------------------------------------------------------
    def handle(self, request: bytes, room: int = MAX_WRITE + OUT_HEADER) -> bytes | None:
        """The reply to `request` (at most `room` bytes), or None when FUSE expects none."""
        hdr = FUSE.parse("fuse_in_header", request)
        if hdr is None:
            return self._reply(0, -errno.EINVAL)
        unique, opcode = int(hdr.unique), int(hdr.opcode)
        if not IN_HEADER <= hdr.len <= len(request):
            return None if opcode in _NO_REPLY else self._reply(unique, -errno.EINVAL)
        end = hdr.len - 8 * hdr.total_extlen
        body = memoryview(request)[IN_HEADER : max(end, IN_HEADER)]
        op = self._ops.get(opcode)
        try:
            if opcode in _MUTATING and not self.writable:
                raise FsError(errno.EROFS)
            if op is None:
                raise FsError(errno.ENOSYS)
            payload = op(int(hdr.nodeid), body, max(0, room - OUT_HEADER))
        except FsError as e:
            payload = -e.errno
        except OSError as e:
            payload = -(e.errno or errno.EIO)
        except (OverflowError, ValueError):  # a field out of the host call's range
            payload = -errno.EINVAL
        except Exception:  # a server bug must not take the VMM down; the guest sees EIO
            log.exception("virtio-fs: opcode %d failed", opcode)
            payload = -errno.EIO
        if opcode in _NO_REPLY:
            return None
        if isinstance(payload, int):
            return self._reply(unique, payload)
        return self._reply(unique, 0, payload[: max(0, room - OUT_HEADER)])

    @staticmethod
    def _reply(unique: int, error: int, payload: bytes = b"") -> bytes:
        n = OUT_HEADER + len(payload)
        return FUSE.build("fuse_out_header", len=n, error=error, unique=unique) + payload

    # -- argument helpers -------------------------------------------------------------------
    @staticmethod
    def _arg(struct: str, body: memoryview) -> Any:
        arg = FUSE.parse(struct, body)
        if arg is None:
            raise FsError(errno.EINVAL, f"short {struct}")
        return arg

    @staticmethod
    def _names(body: memoryview, offset: int, count: int) -> list[bytes]:
        """`count` NUL-terminated strings starting at `offset` of the body."""
        data = bytes(body[offset:])
        parts = data.split(b"\0")
        if len(parts) <= count:
            raise FsError(errno.EINVAL, "name not NUL-terminated")
        return parts[:count]

    def _node(self, nodeid: int) -> Node:
        node = self.nodes.get(nodeid)
        if node is None:
            raise FsError(errno.ESTALE, f"node {nodeid} was never issued or was forgotten")
        if node.path is None:
            raise FsError(errno.ESTALE, f"node {nodeid} was unlinked")
        return node

    def _path(self, nodeid: int) -> bytes:
        path = self._node(nodeid).path
        assert path is not None
        return path

    def _open(self, rel: bytes, flags: int, mode: int = 0) -> int:
        """`HostDirectory.open` where a missing path of a known node means ESTALE."""
        try:
            return self.host.open(rel, flags, mode)
        except FileNotFoundError:
            raise FsError(errno.ESTALE, f"{rel!r} vanished on the host") from None

    def _open_file(self, rel: bytes, flags: int, mode: int = 0) -> int:
        """An fd of the regular file at `rel`; anything else (a FIFO that would block the
        VMM, a device node, a directory) is refused before it is used."""
        fd = self._open(rel, flags | os.O_NONBLOCK, mode)
        try:
            kind = stat.S_IFMT(os.fstat(fd).st_mode)
            if kind != stat.S_IFREG:
                raise FsError(errno.EISDIR if kind == stat.S_IFDIR else errno.EACCES)
            if not flags & os.O_NONBLOCK:
                os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _lstat(self, rel: bytes) -> os.stat_result:
        """`HostDirectory.lstat` where a missing path of a known node means ESTALE."""
        try:
            return self.host.lstat(rel)
        except FileNotFoundError:
            raise FsError(errno.ESTALE, f"{rel!r} vanished on the host") from None

    def _parent_fd(self, nodeid: int) -> int:
        """An ``O_PATH`` fd of directory node `nodeid` (ENOTDIR if it is not one)."""
        return self._open(self._path(nodeid), os.O_PATH | os.O_DIRECTORY)

    def _handle(self, fh: int, *, is_dir: bool) -> Handle:
        h = self.handles.get(fh)
        if h is None or h.is_dir != is_dir:
            raise FsError(errno.EBADF, f"fh {fh} was never issued or was released")
        if h.fd < 0:
            raise FsError(errno.ESTALE, f"fh {fh} could not be re-bound after a restore")
        return h

    # -- replies ----------------------------------------------------------------------------
    @staticmethod
    def _attr(st: os.stat_result) -> dict[str, int]:
        return {
            "ino": st.st_ino,
            "size": st.st_size,
            "blocks": st.st_blocks,
            "atime": _u64(st.st_atime_ns // 10**9),
            "atimensec": st.st_atime_ns % 10**9,
            "mtime": _u64(st.st_mtime_ns // 10**9),
            "mtimensec": st.st_mtime_ns % 10**9,
            "ctime": _u64(st.st_ctime_ns // 10**9),
            "ctimensec": st.st_ctime_ns % 10**9,
            "mode": st.st_mode,
            "nlink": st.st_nlink,
            "uid": st.st_uid,
            "gid": st.st_gid,
            "rdev": st.st_rdev & 0xFFFF_FFFF,
            "blksize": st.st_blksize,
        }

    def _attr_out(self, st: os.stat_result) -> bytes:
        return FUSE.build("fuse_attr_out", attr_valid=0, attr_valid_nsec=0, attr=self._attr(st))

    def _entry(self, path: bytes, st: os.stat_result) -> bytes:
        """A ``fuse_entry_out`` for `path`, counting one more lookup of its node."""
        nodeid = self._by_path.get(path)
        if nodeid is None:
            nodeid = self._next_nodeid
            self._next_nodeid += 1
            self.nodes[nodeid] = Node(nodeid, path)
            self._by_path[path] = nodeid
        node = self.nodes[nodeid]
        node.lookups += 1
        return FUSE.build(
            "fuse_entry_out",
            nodeid=nodeid,
            generation=node.generation,
            entry_valid=0,
            attr_valid=0,
            attr=self._attr(st),
        )

    def _lookup_path(self, path: bytes) -> bytes:
        return self._entry(path, self.host.lstat(path))

    # -- session ----------------------------------------------------------------------------
    def _op_init(self, nodeid: int, body: memoryview, room: int) -> bytes:
        data = bytes(body) + bytes(max(0, FUSE.sizeof("fuse_init_in") - len(body)))
        arg = FUSE.parse("fuse_init_in", data)
        if len(body) < 16 or arg.major < KERNEL_MAJOR:
            raise FsError(errno.EPROTO, "FUSE major version below 7")
        if arg.major > KERNEL_MAJOR:  # the kernel retries with ours
            return FUSE.build("fuse_init_out", major=KERNEL_MAJOR, minor=KERNEL_MINOR)
        self._end_session()  # a new mount (after a guest reboot) starts from nothing
        flags = arg.flags | (arg.flags2 << 32 if arg.flags & C["FUSE_INIT_EXT"] else 0)
        offered = INIT_FLAGS | (C["FUSE_MAP_ALIGNMENT"] if self.dax is not None else 0)
        agreed = flags & offered
        self.minor = min(int(arg.minor), KERNEL_MINOR)
        return FUSE.build(
            "fuse_init_out",
            major=KERNEL_MAJOR,
            minor=self.minor,
            max_readahead=arg.max_readahead,
            flags=agreed & 0xFFFF_FFFF,
            flags2=agreed >> 32,
            max_background=16,
            congestion_threshold=12,
            max_write=MAX_WRITE,
            time_gran=1,
            max_pages=MAX_PAGES,
            map_alignment=DAX_ALIGNMENT_SHIFT if agreed & C["FUSE_MAP_ALIGNMENT"] else 0,
        )

    def _op_destroy(self, nodeid: int, body: memoryview, room: int) -> bytes:
        self._end_session()
        return b""

    def _end_session(self) -> None:
        """Close every handle and forget every node but the root (ids are still never reused)."""
        self._drop_handles()
        self.nodes = {FUSE_ROOT_ID: Node(FUSE_ROOT_ID, b"", 0, 1)}
        self._by_path = {b"": FUSE_ROOT_ID}

    def _op_interrupt(self, nodeid: int, body: memoryview, room: int) -> bytes:
        return b""  # requests are served synchronously: nothing is ever in flight

    # -- names and nodes --------------------------------------------------------------------
    def _op_lookup(self, nodeid: int, body: memoryview, room: int) -> bytes:
        (name,) = self._names(body, 0, 1)
        parent = self._path(nodeid)
        return self._lookup_path(join(parent, check_name(name)))

    def _forget(self, nodeid: int, nlookup: int) -> None:
        node = self.nodes.get(nodeid)
        if node is None or nodeid == FUSE_ROOT_ID:
            return
        node.lookups -= nlookup
        if node.lookups <= 0:
            del self.nodes[nodeid]
            if node.path is not None and self._by_path.get(node.path) == nodeid:
                del self._by_path[node.path]

    def _op_forget(self, nodeid: int, body: memoryview, room: int) -> bytes:
        self._forget(nodeid, int(self._arg("fuse_forget_in", body).nlookup))
        return b""

    def _op_batch_forget(self, nodeid: int, body: memoryview, room: int) -> bytes:
        count = int(self._arg("fuse_batch_forget_in", body).count)
        offset, one = FUSE.sizeof("fuse_batch_forget_in"), FUSE.sizeof("fuse_forget_one")
        for i in range(min(count, (len(body) - offset) // one)):
            entry = FUSE.parse("fuse_forget_one", body, offset + i * one)
            self._forget(int(entry.nodeid), int(entry.nlookup))
        return b""

    def _op_getattr(self, nodeid: int, body: memoryview, room: int) -> bytes:
        arg = FUSE.parse("fuse_getattr_in", body)
        if arg is not None and arg.getattr_flags & C["FUSE_GETATTR_FH"]:
            h = self.handles.get(int(arg.fh))
            if h is not None and h.fd >= 0 and h.nodeid == nodeid:
                return self._attr_out(os.fstat(h.fd))
        return self._attr_out(self._lstat(self._path(nodeid)))

    def _op_setattr(self, nodeid: int, body: memoryview, room: int) -> bytes:
        arg = self._arg("fuse_setattr_in", body)
        path, valid = self._path(nodeid), int(arg.valid)
        st = self._lstat(path)
        if stat.S_ISLNK(st.st_mode) and valid & (C["FATTR_MODE"] | C["FATTR_SIZE"]):
            raise FsError(errno.EOPNOTSUPP, "mode or size of a symlink")
        if valid & C["FATTR_SIZE"]:
            h = self.handles.get(int(arg.fh)) if valid & C["FATTR_FH"] else None
            if h is not None and h.fd >= 0 and h.nodeid == nodeid and not h.is_dir:
                os.ftruncate(h.fd, int(arg.size))
            else:
                fd = self._open_file(path, os.O_WRONLY)
                try:
                    os.ftruncate(fd, int(arg.size))
                finally:
                    os.close(fd)
        if not path and valid & (C["FATTR_MODE"] | C["FATTR_UID"] | C["FATTR_GID"]):
            raise FsError(errno.EPERM, "the mount root's attributes are the host's")
        if path:
            pfd, name = self.host.open_parent(path)
            try:
                self._set_attrs_at(pfd, name, arg, valid, st)
            finally:
                os.close(pfd)
        return self._attr_out(self._lstat(path))

    @staticmethod
    def _set_attrs_at(pfd: int, name: bytes, arg: Any, valid: int, st: os.stat_result) -> None:
        """chmod/chown/utimes on `name` in directory `pfd`, never following a symlink."""
        if valid & C["FATTR_MODE"]:
            os.chmod(name, int(arg.mode) & 0o7777, dir_fd=pfd, follow_symlinks=False)
        if valid & (C["FATTR_UID"] | C["FATTR_GID"]):
            uid = int(arg.uid) if valid & C["FATTR_UID"] else -1
            gid = int(arg.gid) if valid & C["FATTR_GID"] else -1
            os.chown(name, uid, gid, dir_fd=pfd, follow_symlinks=False)
        if valid & (C["FATTR_ATIME"] | C["FATTR_MTIME"]):

            def when(flag: int, now: int, sec: int, nsec: int, old: int) -> int:
                if not valid & flag:
                    return old
                if valid & now:
                    return time.time_ns()
                return _s64(sec) * 10**9 + nsec

            atime = when(
                C["FATTR_ATIME"],
                C["FATTR_ATIME_NOW"],
                int(arg.atime),
                int(arg.atimensec),
                st.st_atime_ns,
            )
            mtime = when(
                C["FATTR_MTIME"],
                C["FATTR_MTIME_NOW"],
                int(arg.mtime),
                int(arg.mtimensec),
                st.st_mtime_ns,
            )
            os.utime(name, ns=(atime, mtime), dir_fd=pfd, follow_symlinks=False)

    def _op_readlink(self, nodeid: int, body: memoryview, room: int) -> bytes:
        path = self._path(nodeid)
        if not path:
            raise FsError(errno.EINVAL, "the root is not a symlink")
        pfd, name = self.host.open_parent(path)
        try:
            return os.readlink(name, dir_fd=pfd)
        finally:
            os.close(pfd)

    def _in_dir(
        self, nodeid: int, body: memoryview, offset: int, count: int
    ) -> tuple[bytes, int, list[bytes]]:
        """``(parent path, parent O_PATH fd, names)`` for requests naming entries of a directory."""
        names = [check_name(n) for n in self._names(body, offset, count)]
        parent = self._path(nodeid)
        return parent, self._parent_fd(nodeid), names

    def _make(
        self, nodeid: int, body: memoryview, offset: int, make: Callable[[bytes, int], None]
    ) -> bytes:
        """Create the entry named at `offset` of `body` in directory `nodeid` with
        ``make(name, parent_fd)``; its ``fuse_entry_out``."""
        parent, pfd, (name,) = self._in_dir(nodeid, body, offset, 1)
        try:
            make(name, pfd)
        finally:
            os.close(pfd)
        return self._lookup_path(join(parent, name))

    def _op_symlink(self, nodeid: int, body: memoryview, room: int) -> bytes:
        _, target = self._names(body, 0, 2)
        if not target:
            raise FsError(errno.ENOENT, "empty symlink target")
        return self._make(nodeid, body, 0, lambda name, pfd: os.symlink(target, name, dir_fd=pfd))

    def _op_mknod(self, nodeid: int, body: memoryview, room: int) -> bytes:
        mode = int(self._arg("fuse_mknod_in", body).mode)
        if stat.S_IFMT(mode) not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK):
            raise FsError(errno.EPERM, "device nodes are not created on the host")
        return self._make(
            nodeid,
            body,
            FUSE.sizeof("fuse_mknod_in"),
            lambda name, pfd: os.mknod(name, mode, 0, dir_fd=pfd),
        )

    def _op_mkdir(self, nodeid: int, body: memoryview, room: int) -> bytes:
        mode = int(self._arg("fuse_mkdir_in", body).mode) & 0o7777
        return self._make(
            nodeid,
            body,
            FUSE.sizeof("fuse_mkdir_in"),
            lambda name, pfd: os.mkdir(name, mode, dir_fd=pfd),
        )

    def _detach(self, path: bytes) -> None:
        """The node at `path` (if any) no longer names a host file."""
        nodeid = self._by_path.pop(path, None)
        if nodeid is not None:
            self.nodes[nodeid].path = None

    def _remove(self, nodeid: int, body: memoryview, *, directory: bool) -> bytes:
        parent, pfd, (name,) = self._in_dir(nodeid, body, 0, 1)
        try:
            if directory:
                os.rmdir(name, dir_fd=pfd)
            else:
                os.unlink(name, dir_fd=pfd)
        finally:
            os.close(pfd)
        self._detach(join(parent, name))
        return b""

    def _op_unlink(self, nodeid: int, body: memoryview, room: int) -> bytes:
        return self._remove(nodeid, body, directory=False)

    def _op_rmdir(self, nodeid: int, body: memoryview, room: int) -> bytes:
        return self._remove(nodeid, body, directory=True)

    def _rename(self, olddir: int, newdir: int, body: memoryview, offset: int, flags: int) -> bytes:
        if (
            flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE)
            or flags == RENAME_NOREPLACE | RENAME_EXCHANGE
        ):
            raise FsError(errno.EINVAL, f"rename flags {flags:#x}")
        old_parent, ofd, _ = self._in_dir(olddir, body, offset, 1)
        try:
            oldname, newname = (check_name(n) for n in self._names(body, offset, 2))
            new_parent = self._path(newdir)
            nfd = self._parent_fd(newdir)
            try:
                self.host.renameat2(ofd, oldname, nfd, newname, flags)
            finally:
                os.close(nfd)
        finally:
            os.close(ofd)
        old, new = join(old_parent, oldname), join(new_parent, newname)
        if old == new:
            return b""
        if flags & RENAME_EXCHANGE:
            self._move_paths({old: new, new: old})
        else:
            self._detach(new)
            self._move_paths({old: new})
        return b""

    def _move_paths(self, moves: dict[bytes, bytes]) -> None:
        """Re-path every node at or below each key of `moves` (a rename done on the host)."""
        updates: dict[int, bytes] = {}
        for path, nodeid in self._by_path.items():
            for src, dst in moves.items():
                if path == src or path.startswith(src + b"/"):
                    updates[nodeid] = dst + path[len(src) :]
                    break
        for nodeid in updates:
            del self._by_path[self.nodes[nodeid].path]  # type: ignore[index]
        for nodeid, path in updates.items():
            self.nodes[nodeid].path = path
            self._by_path[path] = nodeid

    def _op_rename(self, nodeid: int, body: memoryview, room: int) -> bytes:
        arg = self._arg("fuse_rename_in", body)
        return self._rename(nodeid, int(arg.newdir), body, FUSE.sizeof("fuse_rename_in"), 0)

    def _op_rename2(self, nodeid: int, body: memoryview, room: int) -> bytes:
        arg = self._arg("fuse_rename2_in", body)
        return self._rename(
            nodeid, int(arg.newdir), body, FUSE.sizeof("fuse_rename2_in"), int(arg.flags)
        )

    def _op_link(self, nodeid: int, body: memoryview, room: int) -> bytes:
        src = self._path(int(self._arg("fuse_link_in", body).oldnodeid))

        def link(name: bytes, pfd: int) -> None:
            sfd, sname = self.host.open_parent(src)
            try:
                os.link(sname, name, src_dir_fd=sfd, dst_dir_fd=pfd, follow_symlinks=False)
            finally:
                os.close(sfd)

        return self._make(nodeid, body, FUSE.sizeof("fuse_link_in"), link)

    # -- files ------------------------------------------------------------------------------
    def _check_open_flags(self, flags: int) -> int:
        if not self.writable and (flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC):
            raise FsError(errno.EROFS)
        return flags & _OPEN_FLAGS_KEPT

    def _new_handle(self, nodeid: int, flags: int, fd: int, *, is_dir: bool) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = Handle(fh, nodeid, flags, is_dir, fd)
        return fh

    def _op_open(self, nodeid: int, body: memoryview, room: int) -> bytes:
        flags = self._check_open_flags(int(self._arg("fuse_open_in", body).flags))
        path = self._path(nodeid)
        fd = self._open_file(path, flags)
        fh = self._new_handle(nodeid, flags & ~os.O_TRUNC, fd, is_dir=False)
        return FUSE.build("fuse_open_out", fh=fh, open_flags=0)

    def _op_create(self, nodeid: int, body: memoryview, room: int) -> bytes:
        arg = self._arg("fuse_create_in", body)
        parent, pfd, (name,) = self._in_dir(nodeid, body, FUSE.sizeof("fuse_create_in"), 1)
        os.close(pfd)
        path = join(parent, name)
        flags = self._check_open_flags(int(arg.flags))
        excl = int(arg.flags) & os.O_EXCL
        try:
            fd = self._open_file(path, flags | os.O_CREAT | excl, int(arg.mode) & 0o7777)
        except FsError as e:
            if e.errno == errno.ESTALE:  # the parent vanished between the two opens
                raise FsError(errno.ENOENT) from None
            raise
        entry = self._entry(path, os.fstat(fd))
        fh = self._new_handle(self._by_path[path], flags & ~os.O_TRUNC, fd, is_dir=False)
        return entry + FUSE.build("fuse_open_out", fh=fh, open_flags=0)

    def _op_read(self, nodeid: int, body: memoryview, room: int) -> bytes:
        arg = self._arg("fuse_read_in", body)
        h = self._handle(int(arg.fh), is_dir=False)
        return os.pread(h.fd, min(int(arg.size), room, MAX_WRITE), int(arg.offset))

    def _op_write(self, nodeid: int, body: memoryview, room: int) -> bytes:
        arg = self._arg("fuse_write_in", body)
        h = self._handle(int(arg.fh), is_dir=False)
        start = FUSE.sizeof("fuse_write_in")
        size = int(arg.size)
        if size > MAX_WRITE or start + size > len(body):
            raise FsError(errno.EINVAL, "WRITE size beyond the request")
        n = os.pwrite(h.fd, body[start : start + size], int(arg.offset))
        return FUSE.build("fuse_write_out", size=n)

    def _op_statfs(self, nodeid: int, body: memoryview, room: int) -> bytes:
        s = os.statvfs(self.host.root_fd)
        return FUSE.build(
            "fuse_statfs_out",
            st={
                "blocks": s.f_blocks,
                "bfree": s.f_bfree,
                "bavail": s.f_bavail,
                "files": s.f_files,
                "ffree": s.f_ffree,
                "bsize": s.f_bsize,
                "namelen": s.f_namemax,
                "frsize": s.f_frsize,
            },
        )

    def _release(self, body: memoryview, *, is_dir: bool) -> bytes:
        fh = int(self._arg("fuse_release_in", body).fh)
        h = self.handles.get(fh)
        if h is None or h.is_dir != is_dir:
            raise FsError(errno.EBADF)
        del self.handles[fh]
        if h.fd >= 0:
            os.close(h.fd)
        return b""

    def _op_release(self, nodeid: int, body: memoryview, room: int) -> bytes:
        return self._release(body, is_dir=False)

    def _op_releasedir(self, nodeid: int, body: memoryview, room: int) -> bytes:
        return self._release(body, is_dir=True)

    def _fsync(self, body: memoryview, *, is_dir: bool) -> bytes:
        arg = self._arg("fuse_fsync_in", body)
        h = self._handle(int(arg.fh), is_dir=is_dir)
        if self.writable:
            (os.fdatasync if arg.fsync_flags & 1 else os.fsync)(h.fd)
        return b""

    def _op_fsync(self, nodeid: int, body: memoryview, room: int) -> bytes:
        return self._fsync(body, is_dir=False)

    def _op_fsyncdir(self, nodeid: int, body: memoryview, room: int) -> bytes:
        return self._fsync(body, is_dir=True)

    def _op_flush(self, nodeid: int, body: memoryview, room: int) -> bytes:
        self._handle(int(self._arg("fuse_flush_in", body).fh), is_dir=False)
        return b""

    def _op_access(self, nodeid: int, body: memoryview, room: int) -> bytes:
        mask = int(self._arg("fuse_access_in", body).mask)
        self._lstat(self._path(nodeid))
        if mask & os.W_OK and not self.writable:
            raise FsError(errno.EROFS)
        return b""

    def _op_lseek(self, nodeid: int, body: memoryview, room: int) -> bytes:
        arg = self._arg("fuse_lseek_in", body)
        h = self._handle(int(arg.fh), is_dir=False)
        whence = int(arg.whence)
        if whence not in (os.SEEK_SET, os.SEEK_CUR, os.SEEK_END, os.SEEK_DATA, os.SEEK_HOLE):
            raise FsError(errno.EINVAL)
        return FUSE.build("fuse_lseek_out", offset=os.lseek(h.fd, int(arg.offset), whence))

    # -- directories ------------------------------------------------------------------------
    def _op_opendir(self, nodeid: int, body: memoryview, room: int) -> bytes:
        fd = self._open(self._path(nodeid), os.O_RDONLY | os.O_DIRECTORY)
        fh = self._new_handle(nodeid, os.O_RDONLY | os.O_DIRECTORY, fd, is_dir=True)
        return FUSE.build("fuse_open_out", fh=fh, open_flags=0)

    def _listing(self, h: Handle) -> list[bytes]:
        """``.``, ``..`` and the directory's names, sorted: offsets are indexes into it."""
        return [b".", b"..", *sorted(os.fsencode(n) for n in os.listdir(h.fd))]

    def _readdir(self, nodeid: int, body: memoryview, room: int, *, plus: bool) -> bytes:
        arg = self._arg("fuse_read_in", body)
        h = self._handle(int(arg.fh), is_dir=True)
        room = min(room, int(arg.size))
        parent = self.nodes[h.nodeid].path if h.nodeid in self.nodes else None
        out = bytearray()
        names = self._listing(h)
        for index in range(int(arg.offset), len(names)):
            name = names[index]
            try:
                st = os.stat(name, dir_fd=h.fd, follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed since the listing
            record = DIRENT + len(name)
            record += -record % 8
            if plus:
                record += ENTRY_OUT
            if len(out) + record > room:
                break
            dirent = (
                FUSE.build(
                    "fuse_dirent",
                    ino=st.st_ino,
                    off=index + 1,
                    namelen=len(name),
                    type=stat.S_IFMT(st.st_mode) >> 12,
                )
                + name
            )
            dirent += bytes(-len(dirent) % 8)
            if plus:
                if name in (b".", b"..") or parent is None:
                    entry = FUSE.build("fuse_entry_out", attr=self._attr(st))
                else:
                    entry = self._entry(join(parent, name), st)
                out += entry
            out += dirent
        return bytes(out)

    def _op_readdir(self, nodeid: int, body: memoryview, room: int) -> bytes:
        return self._readdir(nodeid, body, room, plus=False)

    def _op_readdirplus(self, nodeid: int, body: memoryview, room: int) -> bytes:
        return self._readdir(nodeid, body, room, plus=True)

    # -- DAX --------------------------------------------------------------------------------
    def _op_setupmapping(self, nodeid: int, body: memoryview, room: int) -> bytes:
        if self.dax is None:
            raise FsError(errno.ENOSYS)
        arg = self._arg("fuse_setupmapping_in", body)
        writable = bool(arg.flags & C["FUSE_SETUPMAPPING_FLAG_WRITE"])
        if writable and not self.writable:
            raise FsError(errno.EROFS)
        m = DaxMapping(
            int(arg.moffset), int(arg.len), int(arg.fh), int(arg.foffset), writable, nodeid
        )
        align = (1 << DAX_ALIGNMENT_SHIFT) - 1
        if (
            m.length <= 0
            or (m.moffset | m.foffset | m.length) & align
            or m.moffset + m.length > self.dax.size
        ):
            raise FsError(errno.EINVAL, "mapping outside the window or unaligned")
        self._map(m)
        self._forget_mappings(m.moffset, m.length)
        self.mappings.append(m)
        return b""

    def _map(self, m: DaxMapping) -> None:
        """Map `m` into the window from its handle's fd, or (`NO_FH`) from its node's file
        opened for the call (the mapping keeps the file; the fd is closed)."""
        assert self.dax is not None
        if m.fh != NO_FH:
            h = self._handle(m.fh, is_dir=False)
            if m.writable and h.flags & os.O_ACCMODE == os.O_RDONLY:
                raise FsError(errno.EBADF, "writable mapping of a read-only handle")
            self.dax.map(m.moffset, h.fd, m.foffset, m.length, writable=m.writable)
            return
        fd = self._open_file(self._path(m.nodeid), os.O_RDWR if m.writable else os.O_RDONLY)
        try:
            self.dax.map(m.moffset, fd, m.foffset, m.length, writable=m.writable)
        finally:
            os.close(fd)

    def _op_removemapping(self, nodeid: int, body: memoryview, room: int) -> bytes:
        if self.dax is None:
            raise FsError(errno.ENOSYS)
        count = int(self._arg("fuse_removemapping_in", body).count)
        offset, one = FUSE.sizeof("fuse_removemapping_in"), FUSE.sizeof("fuse_removemapping_one")
        if count * one > len(body) - offset:
            raise FsError(errno.EINVAL, "REMOVEMAPPING count beyond the request")
        for i in range(count):
            entry = FUSE.parse("fuse_removemapping_one", body, offset + i * one)
            moffset, length = int(entry.moffset), int(entry.len)
            if length <= 0 or moffset + length > self.dax.size:
                raise FsError(errno.EINVAL, "unmapping outside the window")
            self.dax.unmap(moffset, length)
            self._forget_mappings(moffset, length)
        return b""

    def _forget_mappings(self, moffset: int, length: int) -> None:
        self.mappings = [
            m
            for m in self.mappings
            if m.moffset + m.length <= moffset or moffset + length <= m.moffset
        ]

    # -- snapshots --------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The session: node table, open handles and DAX mappings (paths, never host fds)."""
        return {
            "minor": self.minor,
            "next_nodeid": self._next_nodeid,
            "next_fh": self._next_fh,
            "nodes": [
                [
                    n.nodeid,
                    n.path if n.path is not None else b"",
                    n.path is not None,
                    n.generation,
                    n.lookups,
                ]
                for n in self.nodes.values()
            ],
            "handles": [[h.fh, h.nodeid, h.flags, h.is_dir] for h in self.handles.values()],
            "mappings": [
                [m.moffset, m.length, m.fh, m.foffset, m.writable, m.nodeid] for m in self.mappings
            ],
        }

    def restore_state(self, state: dict[str, Any]) -> None:
        """Load `state()` and re-bind it against the host directory as it is now.

        A node whose path vanished stays in the table and answers ESTALE; a
        handle that cannot be reopened answers ESTALE; DAX mappings of live
        handles and nodes are mapped into the window again.
        """
        self._drop_handles()
        self.minor = int(state.get("minor", 0))
        self._next_nodeid = int(state["next_nodeid"])
        self._next_fh = int(state["next_fh"])
        self.nodes, self._by_path = {}, {}
        for nodeid, path, bound, generation, lookups in state["nodes"]:
            if not isinstance(path, bytes):
                raise TypeError(f"node {nodeid}: path {path!r} is not bytes")
            node = Node(int(nodeid), bytes(path) if bound else None, int(generation), int(lookups))
            self.nodes[node.nodeid] = node
            if node.path is not None:
                self._by_path[node.path] = node.nodeid
        self.nodes.setdefault(FUSE_ROOT_ID, Node(FUSE_ROOT_ID, b"", 0, 1))
        self._by_path[b""] = FUSE_ROOT_ID
        for fh, nodeid, flags, is_dir in state["handles"]:
            h = Handle(int(fh), int(nodeid), int(flags), bool(is_dir))
            node = self.nodes.get(h.nodeid)
            if node is not None and node.path is not None:
                try:
                    if h.is_dir:
                        h.fd = self.host.open(node.path, h.flags | os.O_DIRECTORY)
                    else:
                        h.fd = self._open_file(node.path, h.flags & ~os.O_TRUNC)
                except (OSError, FsError) as e:
                    log.info(
                        "virtio-fs: handle %d (%r) is stale after restore: %s", h.fh, node.path, e
                    )
            self.handles[h.fh] = h
        self.mappings = []
        for moffset, length, fh, foffset, writable, *nodeid in state.get("mappings", []):
            m = DaxMapping(
                int(moffset), int(length), int(fh), int(foffset), bool(writable), *nodeid[:1]
            )
            if self.dax is None:
                continue
            try:
                self._map(m)
            except (OSError, FsError) as e:  # the guest reads zeros there, and ESTALE elsewhere
                log.info("virtio-fs: DAX mapping at %#x is gone after restore: %s", m.moffset, e)
                continue
            self.mappings.append(m)

    def _drop_handles(self) -> None:
        for h in self.handles.values():
            if h.fd >= 0:
                os.close(h.fd)
        self.handles = {}
        if self.dax is not None:
            for m in self.mappings:
                self.dax.unmap(m.moffset, m.length)
        self.mappings = []


def _u64(seconds: int) -> int:
    """A signed time as the wire's ``uint64_t`` (two's complement: times before 1970)."""
    return seconds & 0xFFFF_FFFF_FFFF_FFFF


def _s64(wire: int) -> int:
    """The wire's ``uint64_t`` seconds as the signed time they encode."""
    return wire - (1 << 64) if wire >= 1 << 63 else wire
