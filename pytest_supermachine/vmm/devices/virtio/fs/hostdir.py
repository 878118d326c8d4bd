"""The mounted host directory, and the one place that turns a guest path into a host file.

Confinement is structural: every host access the FUSE server makes starts at
`HostDirectory.open`, which calls ``openat2`` from the root's ``O_PATH`` fd
with ``RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS``. The
kernel then refuses, atomically with the lookup, any ``..`` that would leave
the root, any absolute path, and any symlink on the way (so a symlink inside
the mount that points out, an absolute symlink or a chain of them is never
followed by the host: the guest gets the link itself and resolves it in its
own tree). A trailing symlink is opened as the link (``O_PATH|O_NOFOLLOW``).
Operations on a name (mkdir, unlink, rename, ...) use the ``*at`` calls on a
parent directory fd obtained the same way, with a name that `check_name`
proved to be a single component, and never follow a trailing symlink.

``openat2`` is Linux 5.6+; there is no fallback (the VMM needs a far newer
kernel for its KVM features anyway).
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Final

from .uapi import OPENAT2

SYS_OPENAT2: Final = 437  # x86_64
SYS_RENAMEAT2: Final = 316  # x86_64
NAME_MAX: Final = 255
RESOLVE_CONFINED: Final = (
    OPENAT2.const["RESOLVE_BENEATH"]
    | OPENAT2.const["RESOLVE_NO_MAGICLINKS"]
    | OPENAT2.const["RESOLVE_NO_SYMLINKS"]
)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class FsError(Exception):
    """A request the server answers with ``-errno`` (never a host-side failure)."""

    def __init__(self, code: int, why: str = "") -> None:
        super().__init__(
            f"{errno.errorcode.get(code, code)}: {why}"
            if why
            else errno.errorcode.get(code, str(code))
        )
        self.errno = code


def check_name(name: bytes) -> bytes:
    """`name` if it is one path component the guest may create or look up; else `FsError`."""
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise FsError(errno.EINVAL, f"invalid name {name[:64]!r}")
    if len(name) > NAME_MAX:
        raise FsError(errno.ENAMETOOLONG)
    return name


def join(parent: bytes, name: bytes) -> bytes:
    """The root-relative path of `name` inside the directory at `parent` (``b""`` is the root)."""
    return parent + b"/" + name if parent else name


class HostDirectory:
    """A host directory opened once; every access beneath it goes through `open`."""

    def __init__(self, path: str | os.PathLike[str], *, writable: bool = False) -> None:
        self.path = os.path.realpath(os.fspath(path))
        self.writable = writable
        self.root_fd = os.open(self.path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def close(self) -> None:
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1

    def open(self, rel: bytes, flags: int, mode: int = 0) -> int:
        """An fd for the root-relative path `rel` (``b""`` is the root), confined beneath the root.

        ``O_NOFOLLOW`` and ``O_CLOEXEC`` are always added; raises `OSError`
        (``EXDEV`` for an escape, ``ELOOP`` for a symlink on the way).
        """
        how = OPENAT2.new("open_how")
        how.flags = flags | os.O_NOFOLLOW | os.O_CLOEXEC
        how.mode = mode if flags & os.O_CREAT else 0
        how.resolve = RESOLVE_CONFINED
        fd = _libc.syscall(
            ctypes.c_long(SYS_OPENAT2),
            ctypes.c_int(self.root_fd),
            ctypes.c_char_p(rel or b"."),
            ctypes.c_void_p(int(OPENAT2.ffi.cast("uintptr_t", how))),
            ctypes.c_size_t(OPENAT2.sizeof("open_how")),
        )
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), rel)
        return fd

    def lstat(self, rel: bytes) -> os.stat_result:
        """The attributes of `rel` itself (a symlink is not followed)."""
        fd = self.open(rel, os.O_PATH)
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)

    def open_parent(self, rel: bytes) -> tuple[int, bytes]:
        """``(fd of rel's parent directory, rel's last component)``; the caller closes the fd."""
        if not rel:
            raise FsError(errno.EINVAL, "the mount root has no parent")
        parent, _, name = rel.rpartition(b"/")
        return self.open(parent, os.O_PATH | os.O_DIRECTORY), name

    def renameat2(self, old_dir: int, old: bytes, new_dir: int, new: bytes, flags: int) -> None:
        """``renameat2`` on single-component names below two confined directory fds."""
        r = _libc.syscall(
            ctypes.c_long(SYS_RENAMEAT2),
            ctypes.c_int(old_dir),
            ctypes.c_char_p(old),
            ctypes.c_int(new_dir),
            ctypes.c_char_p(new),
            ctypes.c_uint(flags),
        )
        if r < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
