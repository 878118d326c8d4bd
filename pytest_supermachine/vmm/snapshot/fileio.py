"""Whole-buffer file I/O for snapshots: pwrite/pwritev/preadv loops and checked mappings.

Each helper either moves every byte or raises; a file that shrank under a reader gives a
`SnapshotTruncated`, never a short read, and a mapping is checked against the file's
size first, so it never reaches past EOF (where a touch would be a SIGBUS).
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

from ..memory import MAP_NORESERVE
from .errors import REBUILD_HINT, SnapshotTruncated

_IOV_MAX = 1024  # Linux UIO_MAXIOV


def pwrite_all(fd: int, data: memoryview | bytes, offset: int) -> None:
    """os.pwrite until every byte is written (one call writes at most ~2 GiB)."""
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def pwritev_all(fd: int, views: list[memoryview], offset: int) -> None:
    """Gather-write `views` back to back at `offset`, in batches of at most IOV_MAX."""
    pending = [v for v in views if len(v)]
    while pending:
        batch = pending[:_IOV_MAX]
        written = os.pwritev(fd, batch, offset)
        offset += written
        consumed = 0
        while consumed < len(batch) and written >= len(batch[consumed]):
            written -= len(batch[consumed])
            consumed += 1
        rest = pending[consumed:]
        if written and rest:
            rest[0] = rest[0][written:]
        pending = rest


def _preadv_all(fd: int, views: list[memoryview], offset: int, path: Path) -> None:
    """Scatter-read into `views` from `offset`; a short read means the file shrank."""
    pending = [v for v in views if len(v)]
    while pending:
        got = os.preadv(fd, pending, offset)
        if got == 0:
            raise SnapshotTruncated(
                f"snapshot {path} ended at byte {offset} while reading RAM pages: the file was "
                f"truncated after it was opened; {REBUILD_HINT}"
            )
        offset += got
        while pending and got >= len(pending[0]):
            got -= len(pending[0])
            pending.pop(0)
        if got:
            pending[0] = pending[0][got:]


def read_scattered(fd: int, reads: list[tuple[int, memoryview]], path: Path) -> None:
    """Fill each target view from its file offset, one preadv per file-contiguous batch."""
    reads.sort(key=lambda item: item[0])
    i = 0
    while i < len(reads):
        start, view = reads[i]
        views = [view]
        end = start + len(view)
        i += 1
        while i < len(reads) and len(views) < _IOV_MAX and reads[i][0] == end:
            views.append(reads[i][1])
            end += len(reads[i][1])
            i += 1
        _preadv_all(fd, views, start, path)


def pread_exact(fd: int, length: int, offset: int) -> bytes:
    chunks = []
    while length:
        chunk = os.pread(fd, length, offset)
        if not chunk:
            break
        chunks.append(chunk)
        length -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def map_file_private(
    fd: int, offset: int, length: int, path: Path, *, readonly: bool = False
) -> mmap.mmap:
    """MAP_PRIVATE read/write mapping of [offset, offset+length) of the file
    (with `readonly`, a MAP_SHARED read-only view of the page cache instead).

    Checks the range against the file's size right now (fstat), so a mapping never
    extends past EOF, where touching it would raise SIGBUS.
    """
    size = os.fstat(fd).st_size
    if offset < 0 or length <= 0 or offset + length > size or offset % mmap.ALLOCATIONGRANULARITY:
        raise SnapshotTruncated(
            f"snapshot {path}: RAM at bytes {offset}..{offset + length} does not fit in the "
            f"{size}-byte file (it changed after it was opened?); {REBUILD_HINT}"
        )
    if readonly:
        return mmap.mmap(fd, length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ, offset=offset)
    return mmap.mmap(
        fd,
        length,
        flags=mmap.MAP_PRIVATE | MAP_NORESERVE,
        prot=mmap.PROT_READ | mmap.PROT_WRITE,
        offset=offset,
    )
