"""Snapshot files: a versioned, checksummed header and metadata, then page-aligned sparse RAM.

This module is the file layer only. It knows nothing of KVM: the VMM captures vCPU,
irqchip and device state as *named sections of opaque bytes* ("vcpu/0", "pit", ...)
and hands them to `write_snapshot` together with `GuestMemory`; on restore it gets the
same bytes back from `SnapshotFile.sections` and RAM from `SnapshotChain.map_ram()`.
The byte layout is specified in docs/snapshot-format.md; the short version:

    [header 128 B][metadata: regions, sections, host facts, parent, page TOC][pad to 4 KiB]
    [RAM: full = every region contiguous, zero pages left as file holes
          diff = only the given pages, packed]

Guarantees:

- `SnapshotFile.open` validates *everything* before it returns: magic, version, the
  SHA-256 digest over header and metadata, and every offset and length against the real
  file size. Nothing is mmapped or read from RAM before that, so a damaged or lying file
  gives a `SnapshotError`, never a SIGBUS or a read past the end.
- `write_snapshot` is atomic: it writes a temporary file in the target directory,
  fsyncs it and renames it over the final name. A crash leaves at most a stray
  ``.NAME.*.tmp`` file, never a half-written file under the final name.
- A diff names its parent by the parent's digest. A chain whose parent is missing or was
  rebuilt since the diff was taken is refused (`SnapshotParentError`), never silently
  mixed with the wrong base.

Snapshot files are immutable once written: replace them (atomic rename), never edit them
in place, because restored VMs map their RAM straight from the file.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import itertools
import json
import mmap
import operator
import os
import secrets
import stat
import struct
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

from ..errors import SupermachineError
from .layout import MAX_MEM_MIB, PAGE_SIZE, MiB, RamRegion
from .memory import MAP_NORESERVE, GuestMemory

# --------------------------------------------------------------------------- format constants

MAGIC = b"SMSNAP\x1a\n"
"""First 8 bytes of every snapshot. ^Z and \\n catch text-mode mangling, as PNG's magic does."""

FORMAT_VERSION = 1
"""Bumped on every change a v1 reader could misread; readers refuse every version they do not know."""

_HEADER = struct.Struct("<8sIIIIQQQQQ32s32s")
HEADER_SIZE = _HEADER.size  # 128
_DIGESTED_HEADER_BYTES = 96  # header bytes covered by the digest: everything before the digest
_DIGEST_SIZE = 32
_NO_PARENT = bytes(_DIGEST_SIZE)

FLAG_DIFF = 1 << 0
_KNOWN_FLAGS = FLAG_DIFF

_REGION = struct.Struct("<QQQ")  # gpa, size, file_offset (NOT_STORED in diffs)
_EXTENT = struct.Struct("<IIQQQ")  # region, kind, first_page, page_count, file_offset
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_NOT_STORED = (1 << 64) - 1
_EXTENT_DATA = 0
_EXTENT_ZERO = 1

MAX_REGIONS = 64
MAX_RAM_BYTES = MAX_MEM_MIB * MiB
MAX_METADATA_BYTES = 1 << 30
MAX_SECTION_NAME_BYTES = 255
MAX_PARENT_HINTS = 16
MAX_PARENT_HINT_BYTES = 4096
MAX_CHAIN_DEPTH = 64
_MAX_GPA = 1 << 52  # architectural limit of x86-64 physical addresses
_IOV_MAX = 1024  # Linux UIO_MAXIOV
_SCAN_CHUNK = 64 * PAGE_SIZE
_ZERO_PAGE = bytes(PAGE_SIZE)
_ZERO_CHUNK = bytes(_SCAN_CHUNK)

# --------------------------------------------------------------------------- errors


class SnapshotError(SupermachineError):
    """A snapshot file cannot be used; the message says which file, why, and what to do."""


class NotASnapshotError(SnapshotError):
    """The file does not start with the snapshot magic (or is not a regular file)."""


class SnapshotVersionError(SnapshotError):
    """The file is a snapshot, but of a format version or feature this reader does not know."""


class SnapshotCorrupt(SnapshotError):
    """The checksum does not match, or the checksummed metadata contradicts itself."""


class SnapshotTruncated(SnapshotCorrupt):
    """The file is shorter than its header says: an interrupted copy or a damaged header."""


class SnapshotHostMismatch(SnapshotError):
    """The snapshot was taken on a host this one cannot stand in for (CPU model, KVM ABI, CPUID)."""


class SnapshotParentError(SnapshotError):
    """A diff's parent is missing, was rebuilt since the diff was taken, or does not fit."""


_REBUILD_HINT = "delete it (or run `supermachine cache prune`) so it is rebuilt"

# --------------------------------------------------------------------------- small public types


@dataclass(frozen=True)
class SnapshotRef:
    """How a diff names its parent: the parent's digest (identity) and where to look for it."""

    digest: bytes
    path: Path

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> SnapshotRef:
        """Open and validate the snapshot at `path` and return a reference to it."""
        with SnapshotFile.open(path) as snap:
            return snap.ref()

    @property
    def hexdigest(self) -> str:
        return self.digest.hex()


class PageExtent(NamedTuple):
    """A run of guest pages of one region recorded in one file.

    `file_offset` is where the first page's bytes are; None means the pages are all-zero
    and nothing is stored (diffs record pages that became zero this way).
    """

    region: int
    first_page: int
    page_count: int
    file_offset: int | None


class PageSource(NamedTuple):
    """Where the bytes of one guest page live: a file and an offset (None: the page is zero)."""

    snapshot: SnapshotFile
    file_offset: int | None


PageSelection = bytes | bytearray | memoryview | Iterable[int]
"""The changed pages of one region: page indices, or a KVM-style dirty bitmap (bit i = page i)."""

# --------------------------------------------------------------------------- helpers


def _align_up(value: int, alignment: int = PAGE_SIZE) -> int:
    return (value + alignment - 1) // alignment * alignment


def _pwrite_all(fd: int, data: memoryview | bytes, offset: int) -> None:
    """os.pwrite until every byte is written (one call writes at most ~2 GiB)."""
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _pwritev_all(fd: int, views: list[memoryview], offset: int) -> None:
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
                f"truncated after it was opened; {_REBUILD_HINT}"
            )
        offset += got
        while pending and got >= len(pending[0]):
            got -= len(pending[0])
            pending.pop(0)
        if got:
            pending[0] = pending[0][got:]


def _read_scattered(fd: int, reads: list[tuple[int, memoryview]], path: Path) -> None:
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


def _pread_exact(fd: int, length: int, offset: int) -> bytes:
    chunks = []
    while length:
        chunk = os.pread(fd, length, offset)
        if not chunk:
            break
        chunks.append(chunk)
        length -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _map_file_private(
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
            f"{size}-byte file (it changed after it was opened?); {_REBUILD_HINT}"
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


def _page_runs(pages: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted unique page indices -> [(first, count)] of consecutive runs."""
    runs: list[tuple[int, int]] = []
    for page in pages:
        if runs and runs[-1][0] + runs[-1][1] == page:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((page, 1))
    return runs


def _nonzero_page_runs(view: memoryview) -> list[tuple[int, int]]:
    """Runs (first page, count) of pages of `view` that are not all-zero.

    Compares 256 KiB chunks first (bytes comparison is memcmp, memoryview comparison is
    not), then the pages of the chunks that are not zero.
    """
    nonzero: list[int] = []
    total = len(view)
    for start in range(0, total, _SCAN_CHUNK):
        chunk = view[start : start + _SCAN_CHUNK].tobytes()
        if chunk == _ZERO_CHUNK[: len(chunk)]:
            continue
        first = start // PAGE_SIZE
        for offset in range(0, len(chunk), PAGE_SIZE):
            if chunk[offset : offset + PAGE_SIZE] != _ZERO_PAGE:
                nonzero.append(first + offset // PAGE_SIZE)
    return _page_runs(nonzero)


def _selected_pages(selection: PageSelection, page_count: int, region_index: int) -> list[int]:
    """Normalise one region's page selection to sorted unique indices, checking the range."""
    if isinstance(selection, (bytes, bytearray, memoryview)):
        bits = int.from_bytes(bytes(selection), "little")
        if bits >> page_count:
            raise ValueError(
                f"dirty bitmap of region {region_index} has bits set beyond its {page_count} pages"
            )
        text = bin(bits)[:1:-1]  # bit 0 first
        pages = []
        index = text.find("1")
        while index >= 0:
            pages.append(index)
            index = text.find("1", index + 1)
        return pages
    pages = sorted(set(selection))
    for page in pages:
        if not isinstance(page, int) or not 0 <= page < page_count:
            raise ValueError(f"page {page!r} is outside region {region_index} ({page_count} pages)")
    return pages


def _check_regions_for_writing(regions: Sequence[RamRegion]) -> None:
    problem = _region_problem(regions)
    if problem:
        raise ValueError(f"cannot snapshot this guest memory: {problem}")


def _region_problem(regions: Sequence[RamRegion]) -> str | None:
    """Why this RAM layout cannot be in a snapshot, or None. Shared by writer and reader."""
    if not 1 <= len(regions) <= MAX_REGIONS:
        return f"{len(regions)} RAM regions (1..{MAX_REGIONS} allowed)"
    previous_end = 0
    total = 0
    for i, region in enumerate(regions):
        if region.gpa % PAGE_SIZE or region.size % PAGE_SIZE or region.size <= 0:
            return f"region {i} ({region.gpa:#x}+{region.size:#x}) is not whole pages"
        if region.gpa < previous_end:
            return f"region {i} at {region.gpa:#x} overlaps or precedes the region before it"
        if region.gpa + region.size > _MAX_GPA:
            return f"region {i} ends at {region.gpa + region.size:#x}, past 2**52"
        previous_end = region.gpa + region.size
        total += region.size
    if total > MAX_RAM_BYTES:
        return f"{total} bytes of RAM, more than the {MAX_RAM_BYTES} supported"
    return None


def _check_section_name(name: object) -> bytes | None:
    """The encoded section name if it is valid (1..255 printable ASCII, no spaces), else None."""
    if not isinstance(name, str):
        return None
    try:
        encoded = name.encode("ascii")
    except UnicodeEncodeError:
        return None
    if not 1 <= len(encoded) <= MAX_SECTION_NAME_BYTES:
        return None
    if any(not 0x21 <= c <= 0x7E for c in encoded):
        return None
    return encoded


def _encode_host_facts(host_facts: Mapping[str, Any]) -> bytes:
    if not isinstance(host_facts, Mapping):
        raise ValueError("host_facts must be a mapping of str to JSON values")
    try:
        text = json.dumps(dict(host_facts), sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"host_facts must be JSON-serialisable: {exc}") from exc
    return text.encode("utf-8")


def _encode_metadata(
    regions: Sequence[RamRegion],
    region_offsets: Sequence[int | None],
    sections: Sequence[tuple[bytes, bytes]],
    host_facts_json: bytes,
    parent_hints: Sequence[str],
    snapshot_id: bytes,
    created_ns: int,
    extents: Sequence[PageExtent],
) -> bytes:
    parts: list[bytes] = [_U32.pack(len(regions))]
    for region, offset in zip(regions, region_offsets, strict=True):
        parts.append(
            _REGION.pack(region.gpa, region.size, _NOT_STORED if offset is None else offset)
        )
    parts.append(_U32.pack(len(sections)))
    for name, data in sections:
        parts += [_U16.pack(len(name)), name, _U64.pack(len(data)), data]
    parts += [_U32.pack(len(host_facts_json)), host_facts_json]
    parts.append(_U16.pack(len(parent_hints)))
    for hint in parent_hints:
        encoded = hint.encode("utf-8")
        parts += [_U32.pack(len(encoded)), encoded]
    parts += [snapshot_id, _U64.pack(created_ns), _U64.pack(len(extents))]
    pack = _EXTENT.pack
    for e in extents:
        kind = _EXTENT_ZERO if e.file_offset is None else _EXTENT_DATA
        parts.append(pack(e.region, kind, e.first_page, e.page_count, e.file_offset or 0))
    return b"".join(parts)


def _digest(header_prefix: bytes, metadata: bytes | memoryview) -> bytes:
    h = hashlib.sha256()
    h.update(header_prefix)
    h.update(metadata)
    return h.digest()


# --------------------------------------------------------------------------- writing


def write_snapshot(
    path: str | os.PathLike[str],
    *,
    sections: Mapping[str, bytes],
    host_facts: Mapping[str, Any],
    memory: GuestMemory,
    pages: Sequence[PageSelection] | None = None,
    parent: SnapshotRef | None = None,
    durable: bool = True,
) -> SnapshotRef:
    """Write a snapshot of `memory` plus opaque `sections` and `host_facts` to `path`, atomically.

    Full snapshot (`pages` and `parent` None): every region is laid out contiguously at a
    page-aligned offset, all-zero pages are skipped and left as holes, so the file is as
    small on disk as the RAM that is in use, and restore is one mmap per region.

    Diff snapshot (`pages` and `parent` given): `pages[i]` lists the pages of region i that
    changed since `parent` (indices or a dirty bitmap); only those are stored, packed, and
    the ones that are now zero are recorded without bytes. The parent must exist with the
    digest in `parent` and the same RAM layout (checked from its header and region table
    only; `SnapshotChain.open` validates it fully).

    Memory must not change while this runs (pause the vCPUs). `durable` fsyncs the file
    and the directory before returning; the rename is atomic either way. Returns a
    reference to the new file, to be used as the `parent` of the next diff.
    """
    final = Path(os.path.abspath(path))
    if (pages is None) != (parent is None):
        raise ValueError("a diff snapshot needs both `pages` and `parent`; a full one neither")
    regions = memory.regions
    _check_regions_for_writing(regions)
    section_items: list[tuple[bytes, bytes]] = []
    for name in sorted(sections):
        encoded = _check_section_name(name)
        if encoded is None:
            raise ValueError(
                f"section name {name!r} must be 1..{MAX_SECTION_NAME_BYTES} printable ASCII "
                "characters without spaces"
            )
        section_items.append((encoded, bytes(sections[name])))
    facts_json = _encode_host_facts(host_facts)
    region_views = [memory.view(r.gpa, r.size) for r in regions]

    # runs: (region, first page, page count, all-zero) in (region, page) order
    parent_hints: list[str] = []
    if parent is None:
        runs = [
            (i, first, count, False)
            for i, view in enumerate(region_views)
            for first, count in _nonzero_page_runs(view)
        ]
    else:
        parent_path = Path(os.path.abspath(parent.path))
        _check_parent_for_writing(parent, parent_path, regions)
        assert pages is not None
        if len(pages) != len(regions):
            raise ValueError(f"`pages` has {len(pages)} entries for {len(regions)} RAM regions")
        parent_hints = [os.path.relpath(parent_path, final.parent), str(parent_path)]
        runs = [
            (i, first, count, is_zero)
            for i, (selection, view) in enumerate(zip(pages, region_views, strict=True))
            for first, count, is_zero in _changed_page_runs(
                view, _selected_pages(selection, len(view) // PAGE_SIZE, i)
            )
        ]

    def build(ram_offset: int) -> tuple[list[int | None], list[PageExtent], int]:
        """Region offsets, extents and RAM length once the RAM area's start is known."""
        if parent is None:  # regions back to back, each page at its own place
            offsets = list(itertools.accumulate((r.size for r in regions), initial=ram_offset))
            extents = [
                PageExtent(i, first, count, offsets[i] + first * PAGE_SIZE)
                for i, first, count, _ in runs
            ]
            return list(offsets[:-1]), extents, offsets[-1] - ram_offset
        extents = []
        cursor = ram_offset  # stored pages packed back to back
        for i, first, count, is_zero in runs:
            extents.append(PageExtent(i, first, count, None if is_zero else cursor))
            cursor += 0 if is_zero else count * PAGE_SIZE
        return [None] * len(regions), extents, cursor - ram_offset

    snapshot_id = secrets.token_bytes(16)
    created_ns = time.time_ns()

    def encode(offsets: Sequence[int | None], extents: Sequence[PageExtent]) -> bytes:
        return _encode_metadata(
            regions,
            offsets,
            section_items,
            facts_json,
            parent_hints,
            snapshot_id,
            created_ns,
            extents,
        )

    # The metadata's length does not depend on the offsets it records: one extent is
    # _EXTENT.size bytes whatever it says, so the RAM area's start is known up front.
    metadata_length = len(encode([None] * len(regions), [])) + _EXTENT.size * len(runs)
    ram_offset = _align_up(HEADER_SIZE + metadata_length)
    region_offsets, extents, ram_length = build(ram_offset)
    metadata = encode(region_offsets, extents)
    assert len(metadata) == metadata_length
    if len(metadata) > MAX_METADATA_BYTES:
        raise ValueError(f"snapshot metadata of {len(metadata)} bytes exceeds {MAX_METADATA_BYTES}")
    file_size = ram_offset + ram_length
    flags = 0 if parent is None else FLAG_DIFF
    parent_digest = _NO_PARENT if parent is None else parent.digest
    prefix = _HEADER.pack(
        MAGIC,
        FORMAT_VERSION,
        HEADER_SIZE,
        flags,
        PAGE_SIZE,
        file_size,
        HEADER_SIZE,
        len(metadata),
        ram_offset,
        ram_length,
        parent_digest,
        _NO_PARENT,
    )[:_DIGESTED_HEADER_BYTES]
    digest = _digest(prefix, metadata)

    with _AtomicFile(final, durable=durable) as fd:
        if parent is None:
            for e in extents:
                view = region_views[e.region]
                start = e.first_page * PAGE_SIZE
                assert e.file_offset is not None
                _pwrite_all(fd, view[start : start + e.page_count * PAGE_SIZE], e.file_offset)
        else:
            data = [
                region_views[e.region][
                    e.first_page * PAGE_SIZE : (e.first_page + e.page_count) * PAGE_SIZE
                ]
                for e in extents
                if e.file_offset is not None
            ]
            _pwritev_all(fd, data, ram_offset)
        _pwrite_all(fd, prefix + digest + metadata, 0)
        os.ftruncate(fd, file_size)  # the tail of the last region may be a hole
    return SnapshotRef(digest, final)


def _changed_page_runs(view: memoryview, pages: list[int]) -> list[tuple[int, int, bool]]:
    """Split sorted changed pages into runs of (first, count, all_zero): zero pages get no bytes."""
    out: list[tuple[int, int, bool]] = []
    for first, count in _page_runs(pages):
        data = view[first * PAGE_SIZE : (first + count) * PAGE_SIZE].tobytes()
        for k in range(count):
            is_zero = data[k * PAGE_SIZE : (k + 1) * PAGE_SIZE] == _ZERO_PAGE
            if out and out[-1][2] == is_zero and out[-1][0] + out[-1][1] == first + k:
                out[-1] = (out[-1][0], out[-1][1] + 1, is_zero)
            else:
                out.append((first + k, 1, is_zero))
    return out


def _check_parent_for_writing(
    parent: SnapshotRef, parent_path: Path, regions: Sequence[RamRegion]
) -> None:
    """Cheap sanity check of a diff's parent: its header digest and its region table.

    Reads one small block instead of validating the whole parent, because the VM is paused
    while a snapshot is written; SnapshotChain.open validates the parent fully later.
    """
    try:
        digest = peek_digest(parent_path)
        with open(parent_path, "rb") as f:
            table = f.read(HEADER_SIZE + 4 + MAX_REGIONS * _REGION.size)[HEADER_SIZE:]
    except (SnapshotError, OSError) as exc:
        raise SnapshotParentError(f"cannot take a diff against {parent_path}: {exc}") from exc
    if digest != parent.digest:
        raise SnapshotParentError(
            f"cannot take a diff against {parent_path}: it has digest {digest.hex()[:16]}…, "
            f"but the reference says {parent.digest.hex()[:16]}… (it was rebuilt); "
            "take the diff against the current file (SnapshotRef.of(path))"
        )
    count = _U32.unpack_from(table)[0] if len(table) >= 4 else 0
    parent_regions = [
        RamRegion(*_REGION.unpack_from(table, 4 + i * _REGION.size)[:2])
        for i in range(min(count, (len(table) - 4) // _REGION.size))
    ]
    if parent_regions != list(regions):
        raise SnapshotParentError(
            f"cannot take a diff against {parent_path}: its RAM layout "
            f"{_layout_text(parent_regions)} differs from this memory's {_layout_text(regions)}"
        )


def _layout_text(regions: Iterable[RamRegion]) -> str:
    return "[" + ", ".join(f"{r.gpa:#x}+{r.size:#x}" for r in regions) + "]"


class _AtomicFile:
    """A temporary file next to `final` that is renamed over it only if the block succeeds."""

    def __init__(self, final: Path, *, durable: bool) -> None:
        self.final = final
        self.durable = durable
        self.temp = final.parent / f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        self.fd = -1

    def __enter__(self) -> int:
        self.fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        return self.fd

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        renamed = False
        try:
            if exc_type is None:
                if self.durable:
                    os.fsync(self.fd)
                os.close(self.fd)
                self.fd = -1
                os.replace(self.temp, self.final)
                renamed = True
                if self.durable:
                    dir_fd = os.open(self.final.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                    try:
                        os.fsync(dir_fd)
                    finally:
                        os.close(dir_fd)
        finally:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
            if not renamed:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.temp)


# --------------------------------------------------------------------------- reading


class _Cursor:
    """Bounded reader over the metadata: running off the end is corruption, not IndexError."""

    def __init__(self, data: memoryview, path: Path) -> None:
        self.data = data
        self.pos = 0
        self.path = path

    def fail(self, what: str) -> SnapshotCorrupt:
        return SnapshotCorrupt(
            f"snapshot {self.path} has a valid checksum but inconsistent metadata ({what}): it was "
            f"written by a buggy or foreign writer; {_REBUILD_HINT}"
        )

    def take(self, length: int, what: str) -> memoryview:
        if length < 0 or self.pos + length > len(self.data):
            raise self.fail(f"{what} runs past the end of the metadata")
        view = self.data[self.pos : self.pos + length]
        self.pos += length
        return view

    def u16(self, what: str) -> int:
        return int(_U16.unpack(self.take(2, what))[0])

    def u32(self, what: str) -> int:
        return int(_U32.unpack(self.take(4, what))[0])

    def u64(self, what: str) -> int:
        return int(_U64.unpack(self.take(8, what))[0])


class _PageToc:
    """The page table of contents of one file, as columns: cheap to validate and to search.

    Extents are sorted by (region, first page) and do not overlap, so the extents of one
    region are a contiguous slice and a page is found by bisection.
    """

    __slots__ = ("bounds", "count", "first", "offset", "region")

    def __init__(
        self,
        region: list[int],
        first: list[int],
        count: list[int],
        offset: list[int | None],
        region_count: int,
    ) -> None:
        self.region, self.first, self.count, self.offset = region, first, count, offset
        self.bounds = [
            (bisect.bisect_left(region, r), bisect.bisect_right(region, r))
            for r in range(region_count)
        ]

    def rows(self) -> Iterator[tuple[int, int, int, int | None]]:
        """(region, first page, page count, file offset or None) per extent, in order."""
        return zip(self.region, self.first, self.count, self.offset, strict=True)

    def find(self, region: int, page: int) -> tuple[bool, int | None]:
        """(recorded, file offset or None for zero) of one page."""
        lo, hi = self.bounds[region]
        i = bisect.bisect_right(self.first, page, lo, hi) - 1
        if i >= lo and page < self.first[i] + self.count[i]:
            base = self.offset[i]
            return True, None if base is None else base + (page - self.first[i]) * PAGE_SIZE
        return False, None


def _checked_page_toc(
    cur: _Cursor,
    raw: memoryview,
    regions: Sequence[RamRegion],
    region_offsets: Sequence[int | None],
    is_diff: bool,
    ram_offset: int,
    ram_length: int,
) -> _PageToc:
    """Validate the page TOC: every extent inside its region, sorted, non-overlapping, and its
    bytes exactly where the layout puts them (full: the page's place in its region; diff:
    packed back to back from the RAM area's start, filling it exactly).

    Column-wise (map/zip over lists) because a full snapshot of a busy guest has tens of
    thousands of extents and this runs on every restore.
    """
    rows = list(_EXTENT.iter_unpack(raw))
    if not rows:
        if is_diff and ram_length:
            raise cur.fail("diff RAM area holds bytes but no page extent points at them")
        return _PageToc([], [], [], [], len(regions))
    region_col, kind_col, first_col, count_col, offset_col = (
        list(c) for c in zip(*rows, strict=True)
    )
    pages = [r.size // PAGE_SIZE for r in regions]
    if max(region_col) >= len(regions):
        raise cur.fail("a page extent names a RAM region that does not exist")
    if min(count_col) < 1:
        raise cur.fail("a page extent has no pages")
    ends = list(map(operator.add, first_col, count_col))
    if not all(map(operator.le, ends, map(pages.__getitem__, region_col))):
        raise cur.fail("a page extent runs past the end of its RAM region")
    shifted = list(map(operator.lshift, region_col, itertools.repeat(64)))
    start_keys = list(map(operator.or_, shifted, first_col))
    end_keys = map(operator.or_, shifted, ends)
    if not all(map(operator.ge, start_keys[1:], end_keys)):
        raise cur.fail("page extents are out of order or overlap")
    allowed = {_EXTENT_DATA, _EXTENT_ZERO} if is_diff else {_EXTENT_DATA}
    unknown = set(kind_col) - allowed
    if unknown:
        raise cur.fail(
            f"page extent kind {min(unknown)} in a {'diff' if is_diff else 'full'} snapshot"
        )
    is_data = [k == _EXTENT_DATA for k in kind_col]
    if any(itertools.compress(offset_col, map(operator.not_, is_data))):
        raise cur.fail("an all-zero page extent claims a file offset")
    if is_diff:
        sizes = map(
            operator.mul, itertools.compress(count_col, is_data), itertools.repeat(PAGE_SIZE)
        )
        expected = list(itertools.accumulate(sizes, initial=ram_offset))
        if expected[:-1] != list(itertools.compress(offset_col, is_data)) or expected[-1] != (
            ram_offset + ram_length
        ):
            raise cur.fail("diff page data is not packed back to back filling the RAM area")
    else:
        bases = [o or 0 for o in region_offsets]
        expected = list(
            map(
                operator.add,
                map(bases.__getitem__, region_col),
                map(operator.mul, first_col, itertools.repeat(PAGE_SIZE)),
            )
        )
        if expected != offset_col:
            raise cur.fail("a page extent's file offset is not its pages' place in the region")
    offsets = [o if d else None for o, d in zip(offset_col, is_data, strict=True)]
    return _PageToc(region_col, first_col, count_col, offsets, len(regions))


class SnapshotFile:
    """One validated snapshot file, kept open (reads and mappings use this very inode).

    Everything is checked in `open`; afterwards the attributes are plain data:
    `sections` (name -> bytes), `host_facts`, `ram_regions`, `extents` (the page table of
    contents), `digest`, `parent_digest`/`parent_hints` for diffs.
    """

    path: Path
    format_version: int
    digest: bytes
    parent_digest: bytes | None
    parent_hints: tuple[str, ...]
    sections: Mapping[str, bytes]
    host_facts: dict[str, Any]
    ram_regions: tuple[RamRegion, ...]
    region_file_offsets: tuple[int | None, ...]
    file_size: int
    snapshot_id: bytes
    created_ns: int

    def __init__(self) -> None:  # use SnapshotFile.open
        self._fd = -1

    @property
    def is_diff(self) -> bool:
        return self.parent_digest is not None

    @property
    def stored_pages(self) -> int:
        """How many pages have bytes in this file (zero pages are not counted)."""
        toc = self._toc
        return sum(c for c, o in zip(toc.count, toc.offset, strict=True) if o is not None)

    @property
    def extents(self) -> tuple[PageExtent, ...]:
        """The page table of contents: which pages this file records, and where."""
        return tuple(itertools.starmap(PageExtent, self._toc.rows()))

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> SnapshotFile:
        """Open `path` and validate header, checksum, metadata and every offset, or raise."""
        snap = cls()
        snap.path = Path(os.path.abspath(path))
        try:
            fd = os.open(snap.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise SnapshotError(f"cannot open snapshot {snap.path}: {exc.strerror}") from exc
        snap._fd = fd
        snap._finalizer = weakref.finalize(snap, os.close, fd)
        try:
            snap._load()
        except BaseException:
            snap.close()
            raise
        return snap

    def _load(self) -> None:
        path, fd = self.path, self._fd
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotASnapshotError(f"{path} is not a supermachine snapshot: not a regular file")
        actual_size = st.st_size
        head = _pread_exact(fd, HEADER_SIZE, 0)
        if len(head) < len(MAGIC) or head[: len(MAGIC)] != MAGIC:
            raise NotASnapshotError(
                f"{path} is not a supermachine snapshot (it does not start with {MAGIC!r}); "
                "pass a file written by write_snapshot"
            )
        if len(head) < HEADER_SIZE:
            version = _U32.unpack(head[8:12])[0] if len(head) >= 12 else None
            if version is not None and version != FORMAT_VERSION:
                raise self._version_error(version)
            raise SnapshotTruncated(
                f"snapshot {path} is truncated: {actual_size} bytes, shorter than its "
                f"{HEADER_SIZE}-byte header; {_REBUILD_HINT}"
            )
        (
            _magic,
            version,
            header_size,
            flags,
            page_size,
            file_size,
            metadata_offset,
            metadata_length,
            ram_offset,
            ram_length,
            parent_digest,
            digest,
        ) = _HEADER.unpack(head)
        if version != FORMAT_VERSION:
            raise self._version_error(version)
        if flags & ~_KNOWN_FLAGS:
            raise SnapshotVersionError(
                f"snapshot {path} uses format features {flags & ~_KNOWN_FLAGS:#x} this reader does "
                f"not know (flags {flags:#x}); it was written by a newer pytest-supermachine: "
                f"upgrade, or {_REBUILD_HINT}"
            )
        metadata_end = metadata_offset + metadata_length
        if (
            header_size != HEADER_SIZE
            or metadata_offset != HEADER_SIZE
            or metadata_length > MAX_METADATA_BYTES
        ):
            raise SnapshotCorrupt(
                f"snapshot {path} is corrupt: impossible header (header size {header_size}, "
                f"metadata at {metadata_offset}+{metadata_length}); {_REBUILD_HINT}"
            )
        if metadata_end > actual_size:
            raise SnapshotTruncated(
                f"snapshot {path} is truncated or its header is corrupt: the file is {actual_size} "
                f"bytes but its metadata is said to span bytes {metadata_offset}..{metadata_end}; "
                f"{_REBUILD_HINT}"
            )
        metadata = _pread_exact(fd, metadata_length, metadata_offset)
        if len(metadata) != metadata_length:
            raise SnapshotTruncated(f"snapshot {path} shrank while it was read; {_REBUILD_HINT}")
        if _digest(head[:_DIGESTED_HEADER_BYTES], metadata) != digest:
            raise SnapshotCorrupt(
                f"snapshot {path} is corrupt: the SHA-256 checksum over its header and metadata "
                f"does not match (damaged on disk or in transfer); {_REBUILD_HINT}"
            )
        # From here on the header and metadata are what some writer wrote; still check
        # every number before trusting it.
        if page_size != PAGE_SIZE:
            raise SnapshotCorrupt(
                f"snapshot {path} has page size {page_size}, not {PAGE_SIZE}; {_REBUILD_HINT}"
            )
        if file_size != actual_size:
            if actual_size < file_size:
                raise SnapshotTruncated(
                    f"snapshot {path} is truncated: it is {actual_size} bytes but was written as "
                    f"{file_size} (an interrupted copy?); {_REBUILD_HINT}"
                )
            raise SnapshotCorrupt(
                f"snapshot {path} has {actual_size - file_size} unexpected bytes after its end "
                f"({actual_size} bytes, written as {file_size}); {_REBUILD_HINT}"
            )
        if ram_offset != _align_up(metadata_end) or ram_offset + ram_length != file_size:
            raise SnapshotCorrupt(
                f"snapshot {path} is corrupt: RAM area {ram_offset}+{ram_length} does not follow "
                f"the metadata (ends at {metadata_end}) or does not end the {file_size}-byte file; "
                f"{_REBUILD_HINT}"
            )
        padding = _pread_exact(fd, ram_offset - metadata_end, metadata_end)
        if padding.count(0) != ram_offset - metadata_end:
            raise SnapshotCorrupt(
                f"snapshot {path} is corrupt: non-zero bytes between metadata and RAM; {_REBUILD_HINT}"
            )
        is_diff = bool(flags & FLAG_DIFF)
        if is_diff != (parent_digest != _NO_PARENT):
            raise SnapshotCorrupt(
                f"snapshot {path} is corrupt: its diff flag and parent digest disagree; {_REBUILD_HINT}"
            )
        self.format_version = version
        self.digest = digest
        self.parent_digest = parent_digest if is_diff else None
        self.file_size = file_size
        self._parse_metadata(memoryview(metadata), is_diff, ram_offset, ram_length)

    def _version_error(self, version: int) -> SnapshotVersionError:
        return SnapshotVersionError(
            f"snapshot {self.path} has format version {version}, but this pytest-supermachine "
            f"reads version {FORMAT_VERSION} only; {_REBUILD_HINT} with this version"
        )

    def _parse_metadata(
        self, data: memoryview, is_diff: bool, ram_offset: int, ram_length: int
    ) -> None:
        cur = _Cursor(data, self.path)
        region_count = cur.u32("region count")
        if not 1 <= region_count <= MAX_REGIONS:
            raise cur.fail(f"{region_count} RAM regions")
        regions: list[RamRegion] = []
        offsets: list[int | None] = []
        for i in range(region_count):
            gpa, size, offset = _REGION.unpack(cur.take(_REGION.size, f"region {i}"))
            regions.append(RamRegion(gpa, size))
            offsets.append(None if offset == _NOT_STORED else offset)
        problem = _region_problem(regions)
        if problem:
            raise cur.fail(problem)
        if is_diff:
            if any(o is not None for o in offsets):
                raise cur.fail("a diff claims a contiguous RAM region")
            if ram_length % PAGE_SIZE:
                raise cur.fail("diff RAM area is not whole pages")
        else:
            cursor = ram_offset
            for i, (region, offset) in enumerate(zip(regions, offsets, strict=True)):
                if offset != cursor:
                    raise cur.fail(f"region {i} is at file offset {offset}, expected {cursor}")
                cursor += region.size
            if cursor != ram_offset + ram_length:
                raise cur.fail("regions do not fill the RAM area exactly")

        section_count = cur.u32("section count")
        sections: dict[str, bytes] = {}
        for i in range(section_count):
            name_bytes = cur.take(
                cur.u16(f"section {i} name length"), f"section {i} name"
            ).tobytes()
            try:
                name = name_bytes.decode("ascii")
            except UnicodeDecodeError:
                raise cur.fail(f"section {i} name is not ASCII") from None
            if _check_section_name(name) is None or name in sections:
                raise cur.fail(f"section name {name!r} is invalid or repeated")
            sections[name] = cur.take(
                cur.u64(f"section {name} length"), f"section {name}"
            ).tobytes()

        facts_bytes = cur.take(cur.u32("host facts length"), "host facts").tobytes()
        try:
            host_facts = json.loads(facts_bytes.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise cur.fail("host facts are not valid UTF-8 JSON") from None
        if not isinstance(host_facts, dict):
            raise cur.fail("host facts are not a JSON object")

        hint_count = cur.u16("parent hint count")
        if hint_count > MAX_PARENT_HINTS or (hint_count == 0) == is_diff:
            raise cur.fail(
                f"{hint_count} parent path hints for a {'diff' if is_diff else 'full'} snapshot"
            )
        hints = []
        for i in range(hint_count):
            length = cur.u32(f"parent hint {i} length")
            if not 1 <= length <= MAX_PARENT_HINT_BYTES:
                raise cur.fail(f"parent hint {i} of {length} bytes")
            try:
                hints.append(cur.take(length, f"parent hint {i}").tobytes().decode("utf-8"))
            except UnicodeDecodeError:
                raise cur.fail(f"parent hint {i} is not UTF-8") from None
            if "\0" in hints[-1]:
                raise cur.fail(f"parent hint {i} contains NUL")

        snapshot_id = cur.take(16, "snapshot id").tobytes()
        created_ns = cur.u64("creation time")
        extent_count = cur.u64("extent count")
        if extent_count * _EXTENT.size != len(data) - cur.pos:
            raise cur.fail(f"{extent_count} page extents do not fill the rest of the metadata")
        toc = _checked_page_toc(
            cur,
            cur.take(extent_count * _EXTENT.size, "page extents"),
            regions,
            offsets,
            is_diff,
            ram_offset,
            ram_length,
        )

        self.ram_regions = tuple(regions)
        self.region_file_offsets = tuple(offsets)
        self.sections = MappingProxyType(sections)
        self.host_facts = host_facts
        self.parent_hints = tuple(hints)
        self.snapshot_id = snapshot_id
        self.created_ns = created_ns
        self._toc = toc

    # ------------------------------------------------------------------ use

    def ref(self) -> SnapshotRef:
        """A reference to this file, to pass as `parent` when writing a diff on top of it."""
        return SnapshotRef(self.digest, self.path)

    def section(self, name: str) -> bytes:
        """The bytes of section `name`, or SnapshotCorrupt naming the missing section."""
        try:
            return self.sections[name]
        except KeyError:
            raise SnapshotCorrupt(
                f"snapshot {self.path} has no section {name!r} (it has {sorted(self.sections)}); "
                f"it was written by an older or foreign writer; {_REBUILD_HINT}"
            ) from None

    def check_host(self, current_facts: Mapping[str, Any]) -> None:
        """Raise SnapshotHostMismatch unless this host can restore the snapshot (see `check_host`)."""
        check_host(self.host_facts, current_facts, snapshot=self.path)

    def page_source(self, region: int, page: int) -> PageSource | None:
        """Where this file holds page `page` of region `region`.

        Full snapshot: always a source (file_offset None for a zero page). Diff: None when
        the page did not change, i.e. its bytes are in an ancestor.
        """
        recorded, offset = self._toc.find(region, page)
        if recorded:
            return PageSource(self, offset)
        return None if self.is_diff else PageSource(self, None)

    def map_ram(self) -> GuestMemory:
        """Guest RAM of a full snapshot, each region mapped MAP_PRIVATE from the file.

        O(1) in the RAM size: pages are read (from the page cache, shared between VMs
        restored from this file) when first touched and copied when first written.
        """
        if self.is_diff:
            raise SnapshotError(
                f"snapshot {self.path} is a diff: it holds only the pages changed since its "
                "parent; open it with SnapshotChain.open(path) and use its map_ram()"
            )
        buffers: list[mmap.mmap] = []
        try:
            for region, offset in zip(self.ram_regions, self.region_file_offsets, strict=True):
                assert offset is not None
                buffers.append(
                    _map_file_private(self._fd_checked(), offset, region.size, self.path)
                )
        except BaseException:
            for buf in buffers:
                buf.close()
            raise
        return GuestMemory(self.ram_regions, buffers)

    def map_ram_readonly(self) -> list[mmap.mmap]:
        """Read-only views of a full snapshot's RAM regions, straight from the page cache.

        In-place reset copies dirtied pages back from these, which keeps the guest's
        private copies resident (no fault on its next write) instead of dropping them.
        """
        if self.is_diff:
            raise SnapshotError(f"snapshot {self.path} is a diff: map its chain's base instead")
        buffers: list[mmap.mmap] = []
        try:
            for region, offset in zip(self.ram_regions, self.region_file_offsets, strict=True):
                assert offset is not None
                buffers.append(_map_file_private(self._fd_checked(), offset, region.size,
                                                 self.path, readonly=True))
        except BaseException:
            for buf in buffers:
                buf.close()
            raise
        return buffers

    def read_pages(self, reads: list[tuple[int, memoryview]]) -> None:
        """Fill target views from file offsets of this file (batched scatter reads)."""
        _read_scattered(self._fd_checked(), reads, self.path)

    def _fd_checked(self) -> int:
        if self._fd < 0:
            raise ValueError(f"snapshot {self.path} is closed")
        return self._fd

    def close(self) -> None:
        """Close the file. Mappings made by map_ram stay valid (they hold their own reference)."""
        if self._fd >= 0:
            # At interpreter exit weakref.finalize may already have closed the fd (its atexit
            # hook runs first); detach() then returns None and the fd number is not ours.
            if self._finalizer.detach() is not None:
                os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SnapshotFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        kind = "diff" if self.is_diff else "full"
        return f"<SnapshotFile {kind} {self.path} digest={self.digest.hex()[:12]}>"


def peek_digest(path: str | os.PathLike[str]) -> bytes:
    """The digest recorded in `path`'s header, without verifying it: cheap identity for caches.

    Checks only magic and version. Use SnapshotFile.open to know the file is intact.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_SIZE)
    except OSError as exc:
        raise SnapshotError(f"cannot open snapshot {path}: {exc.strerror}") from exc
    if head[: len(MAGIC)] != MAGIC:
        raise NotASnapshotError(f"{path} is not a supermachine snapshot (no {MAGIC!r} magic)")
    if len(head) < HEADER_SIZE:
        raise SnapshotTruncated(f"snapshot {path} is truncated inside its header; {_REBUILD_HINT}")
    version = _U32.unpack(head[8:12])[0]
    if version != FORMAT_VERSION:
        raise SnapshotVersionError(
            f"snapshot {path} has format version {version}; this reader knows {FORMAT_VERSION}"
        )
    return head[_DIGESTED_HEADER_BYTES:HEADER_SIZE]


# --------------------------------------------------------------------------- chains


class SnapshotChain:
    """A diff and its ancestors down to a full base: `files[0]` is the base, `files[-1]` the leaf.

    Opening checks every link: each parent is found through the hints the child recorded,
    has exactly the digest the child recorded, and the same RAM layout. The chain's state
    (sections, host facts) is the leaf's; its RAM is the base overlaid with each diff in order.
    """

    def __init__(self, files: Sequence[SnapshotFile]) -> None:
        self.files: tuple[SnapshotFile, ...] = tuple(files)
        self._overrides: list[dict[int, PageSource]] | None = None

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], *, max_depth: int = MAX_CHAIN_DEPTH
    ) -> SnapshotChain:
        """Open the snapshot at `path` and follow its parents to the base, validating each."""
        files: list[SnapshotFile] = []
        try:
            snap = SnapshotFile.open(path)
            files.append(snap)
            seen = {snap.digest}
            while snap.parent_digest is not None:
                if len(files) >= max_depth:
                    raise SnapshotParentError(
                        f"snapshot chain from {files[0].path} is deeper than {max_depth} files; "
                        "flatten it (snapshot.flatten) or raise max_depth"
                    )
                parent = _open_parent(snap)
                if parent.digest in seen:
                    parent.close()
                    raise SnapshotParentError(
                        f"snapshot chain from {files[0].path} loops back to {parent.path}"
                    )
                seen.add(parent.digest)
                files.append(parent)
                snap = parent
        except BaseException:
            for f in files:
                f.close()
            raise
        return cls(list(reversed(files)))

    @property
    def base(self) -> SnapshotFile:
        return self.files[0]

    @property
    def leaf(self) -> SnapshotFile:
        return self.files[-1]

    @property
    def depth(self) -> int:
        return len(self.files)

    @property
    def sections(self) -> Mapping[str, bytes]:
        return self.leaf.sections

    @property
    def host_facts(self) -> dict[str, Any]:
        return self.leaf.host_facts

    @property
    def ram_regions(self) -> tuple[RamRegion, ...]:
        return self.base.ram_regions

    def check_host(self, current_facts: Mapping[str, Any]) -> None:
        """check_host for every file of the chain (they may have been taken on different hosts)."""
        for snap in reversed(self.files):
            snap.check_host(current_facts)

    def diff_page_sources(self) -> list[dict[int, PageSource]]:
        """Per region: page -> newest source, for the pages some diff changed (newest diff wins).

        Pages not listed are read from the base. In-place reset uses this: after
        MADV_DONTNEED a page shows the base file again, so only these need copying back.
        """
        if self._overrides is None:
            overrides: list[dict[int, PageSource]] = [{} for _ in self.ram_regions]
            for snap in self.files[1:]:
                zero = PageSource(snap, None)
                for region, first, count, offset in snap._toc.rows():
                    table = overrides[region]
                    if offset is None:
                        table.update(dict.fromkeys(range(first, first + count), zero))
                    else:
                        for k in range(count):
                            table[first + k] = PageSource(snap, offset + k * PAGE_SIZE)
            self._overrides = overrides
        return self._overrides

    def page_source(self, gpa: int) -> PageSource:
        """Which file and offset hold the newest version of the page containing `gpa`."""
        for index, region in enumerate(self.ram_regions):
            if region.gpa <= gpa < region.end:
                page = (gpa - region.gpa) // PAGE_SIZE
                source = self.diff_page_sources()[index].get(page)
                if source is None:
                    source = self.base.page_source(index, page)
                    assert source is not None
                return source
        raise ValueError(f"guest address {gpa:#x} is outside {_layout_text(self.ram_regions)}")

    def map_ram(self) -> GuestMemory:
        """Guest RAM equal to the chain: the base mapped MAP_PRIVATE, diff pages copied over it."""
        memory = self.base.map_ram()
        try:
            self.overlay_diffs(memory)
        except BaseException:
            # BufferError: views held by the traceback; the mappings go with it.
            with contextlib.suppress(BufferError):
                memory.close()
            raise
        return memory

    def overlay_diffs(
        self, memory: GuestMemory, pages: Sequence[PageSelection] | None = None
    ) -> None:
        """Make `memory`, which shows the base, show the chain: copy diff pages over it.

        `pages` None: every diff's pages, diff by diff from the oldest, so a newer diff
        overwrites an older one (what `map_ram` does after mapping the base).

        `pages` given (per region, like `write_snapshot`'s; e.g. the pages dirtied since the
        last restore): only those, each from its newest diff. Pages whose newest version is
        the base are left alone -- the caller has MADV_DONTNEED'ed them, so they already show
        the base file again. That is the in-place reset.
        """
        regions = self.ram_regions
        if tuple(memory.regions) != regions:
            raise ValueError(
                f"memory layout {_layout_text(memory.regions)} is not the snapshot's "
                f"{_layout_text(regions)}"
            )
        views = [memory.view(r.gpa, r.size) for r in regions]
        if pages is None:
            for snap in self.files[1:]:
                reads: list[tuple[int, memoryview]] = []
                for region, first, count, offset in snap._toc.rows():
                    target = views[region][first * PAGE_SIZE : (first + count) * PAGE_SIZE]
                    if offset is None:
                        target[:] = bytes(len(target))
                    else:
                        reads.append((offset, target))
                snap.read_pages(reads)
            return
        if len(pages) != len(regions):
            raise ValueError(f"`pages` has {len(pages)} entries for {len(regions)} RAM regions")
        overrides = self.diff_page_sources()
        reads_by_file: dict[int, list[tuple[int, memoryview]]] = {}
        for index, region in enumerate(regions):
            table = overrides[index]
            for page in _selected_pages(pages[index], region.size // PAGE_SIZE, index):
                source = table.get(page)
                if source is None:
                    continue
                target = views[index][page * PAGE_SIZE : (page + 1) * PAGE_SIZE]
                if source.file_offset is None:
                    target[:] = _ZERO_PAGE
                else:
                    reads_by_file.setdefault(id(source.snapshot), []).append(
                        (source.file_offset, target)
                    )
        for snap in self.files[1:]:
            if id(snap) in reads_by_file:
                snap.read_pages(reads_by_file[id(snap)])

    def read_ram(self, gpa: int, length: int) -> bytes:
        """Bytes of guest RAM as the chain defines them, read from the files (no mapping)."""
        out = bytearray(length)
        view = memoryview(out)
        position = 0
        while position < length:
            address = gpa + position
            in_page = address % PAGE_SIZE
            take = min(PAGE_SIZE - in_page, length - position)
            source = self.page_source(address)
            if source.file_offset is not None:
                source.snapshot.read_pages(
                    [(source.file_offset + in_page, view[position : position + take])]
                )
            position += take
        return bytes(out)

    def close(self) -> None:
        for snap in self.files:
            snap.close()

    def __enter__(self) -> SnapshotChain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_parent(child: SnapshotFile) -> SnapshotFile:
    """Find the child's parent through its path hints and check digest and layout."""
    assert child.parent_digest is not None
    wanted = child.parent_digest
    tried: list[str] = []
    changed: list[str] = []
    for hint in child.parent_hints:
        candidate = Path(hint) if os.path.isabs(hint) else child.path.parent / hint
        candidate = Path(os.path.normpath(candidate))
        if not candidate.exists():
            tried.append(str(candidate))
            continue
        try:
            parent = SnapshotFile.open(candidate)
        except SnapshotError as exc:
            raise SnapshotParentError(
                f"parent {candidate} of diff snapshot {child.path} is unusable: {exc}"
            ) from exc
        if parent.digest != wanted:
            changed.append(f"{candidate} (digest {parent.digest.hex()[:16]}…)")
            parent.close()
            continue
        if parent.ram_regions != child.ram_regions:
            parent.close()
            raise SnapshotParentError(
                f"parent {candidate} of diff snapshot {child.path} has RAM layout "
                f"{_layout_text(parent.ram_regions)}, the diff {_layout_text(child.ram_regions)}; "
                "rebuild the diff"
            )
        return parent
    if changed:
        raise SnapshotParentError(
            f"diff snapshot {child.path} was taken on top of a parent with digest "
            f"{wanted.hex()[:16]}…, but its parent file changed since: {', '.join(changed)}. "
            "The parent was rebuilt, so this diff no longer applies; rebuild the diff"
        )
    raise SnapshotParentError(
        f"diff snapshot {child.path} needs its parent (digest {wanted.hex()[:16]}…), which is "
        f"missing: looked at {', '.join(tried)}. Restore the parent file next to it, or rebuild the diff"
    )


def flatten(
    chain: SnapshotChain, out_path: str | os.PathLike[str], *, durable: bool = True
) -> SnapshotRef:
    """Write one full snapshot equal to `chain`: the leaf's sections and facts, the chain's RAM."""
    memory = chain.map_ram()
    try:
        return write_snapshot(
            out_path,
            sections=chain.sections,
            host_facts=chain.host_facts,
            memory=memory,
            durable=durable,
        )
    finally:
        memory.close()


# --------------------------------------------------------------------------- host facts

COMPARED_HOST_FACTS = (
    "cpu_vendor",
    "cpu_family",
    "cpu_model",
    "kvm_api_version",
    "pvm",
    "page_size",
)
"""Facts that must be equal for a restore. Others (stepping, model name, ...) are informational."""

_CPUID_FEATURE_REGISTERS: dict[tuple[int, int], tuple[str, ...]] = {
    (0x1, 0): ("ecx", "edx"),
    (0x7, 0): ("ebx", "ecx", "edx"),
    (0x7, 1): ("eax",),
    (0xD, 0): ("eax", "edx"),  # XCR0 state components
    (0xD, 1): ("eax",),
    (0x80000001, 0): ("ecx", "edx"),
    (0x80000008, 0): ("ebx",),
}
"""CPUID registers that are feature bit masks: a guest bit the host lacks cannot be restored."""

_CPUID_DYNAMIC_BITS: dict[tuple[int, int, str], int] = {
    # TSC-deadline (a KVM capability, set by the VMM), OSXSAVE (mirrors CR4), hypervisor
    (0x1, 0, "ecx"): (1 << 24) | (1 << 27) | (1 << 31),
    (0x1, 0, "edx"): 1 << 9,  # APIC: mirrors the APIC enable bit
    (0x7, 0, "ecx"): 1 << 4,  # OSPKE mirrors CR4.PKE
    (0x80000008, 0, "ebx"): 1 << 2,  # XSAVEERPTR: set by the VMM on PVM (kvm.PVM_CPUID_MASK)
}
"""Bits the VMM sets or the CPU reflects at run time; KVM_GET_SUPPORTED_CPUID need not list them."""

_CPUID_BIT_NAMES: dict[tuple[int, int, str], dict[int, str]] = {
    (0x1, 0, "ecx"): {
        0: "sse3",
        1: "pclmulqdq",
        9: "ssse3",
        12: "fma",
        13: "cx16",
        19: "sse4_1",
        20: "sse4_2",
        21: "x2apic",
        22: "movbe",
        23: "popcnt",
        25: "aes",
        26: "xsave",
        28: "avx",
        29: "f16c",
        30: "rdrand",
    },
    (0x1, 0, "edx"): {
        0: "fpu",
        4: "tsc",
        5: "msr",
        8: "cx8",
        15: "cmov",
        19: "clflush",
        23: "mmx",
        24: "fxsr",
        25: "sse",
        26: "sse2",
    },
    (0x7, 0, "ebx"): {
        0: "fsgsbase",
        3: "bmi1",
        4: "hle",
        5: "avx2",
        7: "smep",
        8: "bmi2",
        9: "erms",
        10: "invpcid",
        11: "rtm",
        16: "avx512f",
        18: "rdseed",
        19: "adx",
        20: "smap",
        23: "clflushopt",
        24: "clwb",
        29: "sha",
    },
    (0x7, 0, "ecx"): {
        1: "avx512vbmi",
        2: "umip",
        3: "pku",
        8: "gfni",
        9: "vaes",
        10: "vpclmulqdq",
        22: "rdpid",
    },
    (0x7, 0, "edx"): {
        4: "fsrm",
        10: "md_clear",
        26: "ibrs",
        27: "stibp",
        29: "arch_capabilities",
        31: "ssbd",
    },
    (0xD, 0, "eax"): {
        0: "x87",
        1: "sse",
        2: "avx",
        5: "opmask",
        6: "zmm_hi256",
        7: "hi16_zmm",
        9: "pkru",
    },
    (0xD, 1, "eax"): {0: "xsaveopt", 1: "xsavec", 2: "xgetbv1", 3: "xsaves"},
    (0x80000001, 0, "ecx"): {0: "lahf_lm", 5: "abm", 8: "prefetchw"},
    (0x80000001, 0, "edx"): {11: "syscall", 20: "nx", 26: "pdpe1gb", 27: "rdtscp", 29: "lm"},
}

_REGISTERS = ("eax", "ebx", "ecx", "edx")


def _cpuid_table(
    entries: object, label: str
) -> dict[tuple[int, int], tuple[int, int, int, int]] | None:
    """[[function, index, eax, ebx, ecx, edx], ...] -> {(function, index): regs}, None if malformed."""
    if not isinstance(entries, list):
        return None
    table = {}
    for entry in entries:
        if (
            not isinstance(entry, list)
            or len(entry) != 6
            or not all(
                isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 32 for x in entry
            )
        ):
            return None
        table[(entry[0], entry[1])] = (entry[2], entry[3], entry[4], entry[5])
    return table


def _missing_cpuid_features(guest: dict, supported: dict) -> list[str]:
    lines = []
    for (function, index), registers in _CPUID_FEATURE_REGISTERS.items():
        guest_regs = guest.get((function, index))
        if guest_regs is None:
            continue
        host_regs = supported.get((function, index), (0, 0, 0, 0))
        for reg in registers:
            r = _REGISTERS.index(reg)
            missing = (
                guest_regs[r] & ~host_regs[r] & ~_CPUID_DYNAMIC_BITS.get((function, index, reg), 0)
            )
            if missing:
                names = _CPUID_BIT_NAMES.get((function, index, reg), {})
                bits = [
                    f"{names[b]} (bit {b})" if b in names else f"bit {b}"
                    for b in range(32)
                    if missing >> b & 1
                ]
                lines.append(
                    f"guest CPUID {function:#x}.{index} {reg}: {', '.join(bits)} not offered by this host"
                )
    return lines


def check_host(
    recorded: Mapping[str, Any],
    current: Mapping[str, Any],
    *,
    snapshot: str | os.PathLike[str] | None = None,
) -> None:
    """Raise SnapshotHostMismatch unless a snapshot taken with `recorded` facts can run here.

    Compares COMPARED_HOST_FACTS for equality (each key the snapshot recorded), and when the
    snapshot recorded `guest_cpuid`, requires every feature bit the guest saw to be in this
    host's `supported_cpuid` (KVM_GET_SUPPORTED_CPUID). Both CPUID lists are
    [[function, index, eax, ebx, ecx, edx], ...]. The message lists every difference.
    """
    lines = []
    for key in COMPARED_HOST_FACTS:
        if key not in recorded:
            continue
        if key not in current:
            lines.append(f"{key}: snapshot has {recorded[key]!r}, this host did not report it")
        elif recorded[key] != current[key]:
            lines.append(f"{key}: snapshot has {recorded[key]!r}, this host has {current[key]!r}")
    if "guest_cpuid" in recorded:
        guest = _cpuid_table(recorded["guest_cpuid"], "guest_cpuid")
        if guest is None:
            raise SnapshotCorrupt(
                f"snapshot {snapshot or ''} records a malformed guest_cpuid host fact; {_REBUILD_HINT}"
            )
        if "supported_cpuid" not in current:
            raise ValueError(
                "current host facts need `supported_cpuid` to check the snapshot's guest CPUID"
            )
        supported = _cpuid_table(current["supported_cpuid"], "supported_cpuid")
        if supported is None:
            raise ValueError(
                "current host fact `supported_cpuid` must be [[fn, index, eax, ebx, ecx, edx], ...]"
            )
        lines += _missing_cpuid_features(guest, supported)
    if lines:
        where = f"snapshot {snapshot}" if snapshot else "the snapshot"
        raise SnapshotHostMismatch(
            f"{where} was taken on a host this one cannot stand in for:\n  "
            + "\n  ".join(lines)
            + "\nSnapshots only restore on the same CPU model and KVM ABI: rebuild it on this host "
            "(delete it, or run `supermachine cache prune` for cached ones)."
        )


def host_cpu_facts(cpuinfo: str | os.PathLike[str] = "/proc/cpuinfo") -> dict[str, Any]:
    """CPU vendor/family/model/stepping/name of this host and its page size (no KVM needed).

    The VMM adds `kvm_api_version`, `pvm`, `guest_cpuid` (recorded) and `supported_cpuid`
    (current, for check_host) to this.
    """
    facts: dict[str, Any] = {"page_size": mmap.PAGESIZE}
    keys = {
        "vendor_id": ("cpu_vendor", str),
        "cpu family": ("cpu_family", int),
        "model": ("cpu_model", int),
        "stepping": ("cpu_stepping", int),
        "model name": ("cpu_model_name", str),
    }
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    break  # first processor only
                key, _, value = line.partition(":")
                target = keys.get(key.strip())
                if target:
                    try:
                        facts[target[0]] = target[1](value.strip())
                    except ValueError:
                        facts[target[0]] = value.strip()
    except OSError:
        pass
    return facts
