"""`HostDaxWindow`: the host side of a virtio-fs DAX window (a `DaxWindow` for `FuseServer`).

The window is a stretch of host address space the machine registers as a KVM
memory slot outside RAM (`layout.dax_window`) and the transport announces as
virtio shared-memory region 0. SETUPMAPPING puts a range of a host file there
with ``mmap(MAP_SHARED | MAP_FIXED)``; KVM follows the change through its MMU
notifier, so the guest reads the host's page cache directly.

Guarantees:

* Every page of the window is always mapped to something readable: an unmapped
  range (at creation, after `unmap`, and the part of a mapping past the end of
  its file) is anonymous zero pages, so a guest access never faults in the
  vCPU thread (a file page past EOF would be SIGBUS / -EFAULT from KVM_RUN).
* Read-only windows (`writable=False`, the only kind the machine makes today)
  map file ranges ``PROT_READ``; the KVM slot is ``KVM_MEM_READONLY`` too, so a
  guest write becomes an MMIO exit, never a write to a host file.
* The window is not RAM: snapshots do not store it; the FUSE session's mapping
  table does, and `FuseServer.restore_state` maps it again.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

from .....errors import MachineError

PAGE = mmap.PAGESIZE
_MAP_FAILED = ctypes.c_void_p(-1).value
_MAP_FIXED = 0x10
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def _mmap(addr: int | None, length: int, prot: int, flags: int, fd: int, offset: int) -> int:
    got = _libc.mmap(addr, length, prot, flags, fd, offset)
    if got in (None, _MAP_FAILED):
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return int(got)


class HostDaxWindow:
    """`size` bytes of host address space (a multiple of the page size) for DAX mappings."""

    def __init__(self, size: int, *, writable: bool = False) -> None:
        if size <= 0 or size % PAGE:
            raise ValueError(f"a DAX window is a positive number of pages, got {size} bytes")
        self._size = size
        self.writable = writable
        self.address = _mmap(
            None,
            size,
            mmap.PROT_READ,
            mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE,
            -1,
            0,
        )

    @property
    def size(self) -> int:
        return self._size

    def _zero(self, offset: int, length: int) -> None:
        _mmap(
            self.address + offset,
            length,
            mmap.PROT_READ,
            mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE | _MAP_FIXED,
            -1,
            0,
        )

    def _check(self, offset: int, length: int, *, whole_pages: bool = True) -> None:
        """The one bounds check of the window: ``[offset, +length)`` inside it (and, for
        mapping and unmapping, whole non-empty pages)."""
        if self.address == 0:
            raise MachineError("the DAX window is closed")
        outside = offset < 0 or length < 0 or offset + length > self._size
        if outside or (whole_pages and (length == 0 or (offset | length) % PAGE)):
            raise OSError(errno.EINVAL, f"range {offset:#x}+{length:#x} outside the DAX window")

    def map(self, offset: int, fd: int, file_offset: int, length: int, *, writable: bool) -> None:
        """Map ``[file_offset, +length)`` of `fd` at `offset`; past the file's end: zero pages."""
        self._check(offset, length)
        if writable and not self.writable:
            raise OSError(errno.EROFS, "writable mapping in a read-only DAX window")
        in_file = max(0, os.fstat(fd).st_size - file_offset)
        in_file = min(length, (in_file + PAGE - 1) // PAGE * PAGE)
        if in_file:
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            _mmap(
                self.address + offset, in_file, prot, mmap.MAP_SHARED | _MAP_FIXED, fd, file_offset
            )
        if in_file < length:
            self._zero(offset + in_file, length - in_file)

    def unmap(self, offset: int, length: int) -> None:
        """Make ``[offset, +length)`` zero pages again."""
        self._check(offset, length)
        self._zero(offset, length)

    def read(self, offset: int, length: int) -> bytes:
        """What the guest sees at ``[offset, +length)`` (for tests and diagnostics)."""
        self._check(offset, length, whole_pages=False)
        return ctypes.string_at(self.address + offset, length)

    def close(self) -> None:
        if self.address:
            _libc.munmap(self.address, self._size)
            self.address = 0
