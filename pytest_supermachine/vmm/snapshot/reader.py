"""Reading one snapshot file: validate everything on open, then hand out sections and RAM.

`SnapshotFile.open` checks magic, version, the SHA-256 digest over header and metadata
and every offset and length against the real file size before anything is mapped or
read, so a damaged or lying file gives a `SnapshotError`, never a SIGBUS. The file stays
open: later reads and mappings use the very inode that was validated.
"""

from __future__ import annotations

import itertools
import json
import mmap
import os
import stat
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

from ..layout import PAGE_SIZE, RamRegion
from ..memory import GuestMemory
from .errors import (
    REBUILD_HINT,
    NotASnapshotError,
    SnapshotCorrupt,
    SnapshotError,
    SnapshotTruncated,
    SnapshotVersionError,
)
from .fileio import map_file_private, pread_exact, read_scattered
from .format import (
    DIGESTED_HEADER_BYTES,
    EXTENT_RECORD,
    FLAG_DIFF,
    FORMAT_VERSION,
    HEADER,
    HEADER_SIZE,
    KNOWN_FLAGS,
    MAGIC,
    MAX_METADATA_BYTES,
    MAX_PARENT_HINT_BYTES,
    MAX_PARENT_HINTS,
    MAX_REGIONS,
    NO_PARENT,
    NOT_STORED,
    REGION_RECORD,
    U32,
    MetadataCursor,
    PageExtent,
    align_up,
    check_section_name,
    compute_digest,
    region_problem,
)
from .toc import checked_page_toc


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


class PageSource(NamedTuple):
    """Where the bytes of one guest page live: a file and an offset (None: the page is zero)."""

    snapshot: SnapshotFile
    file_offset: int | None


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
        head = pread_exact(fd, HEADER_SIZE, 0)
        if len(head) < len(MAGIC) or head[: len(MAGIC)] != MAGIC:
            raise NotASnapshotError(
                f"{path} is not a supermachine snapshot (it does not start with {MAGIC!r}); "
                "pass a file written by write_snapshot"
            )
        if len(head) < HEADER_SIZE:
            version = U32.unpack(head[8:12])[0] if len(head) >= 12 else None
            if version is not None and version != FORMAT_VERSION:
                raise self._version_error(version)
            raise SnapshotTruncated(
                f"snapshot {path} is truncated: {actual_size} bytes, shorter than its "
                f"{HEADER_SIZE}-byte header; {REBUILD_HINT}"
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
        ) = HEADER.unpack(head)
        if version != FORMAT_VERSION:
            raise self._version_error(version)
        if flags & ~KNOWN_FLAGS:
            raise SnapshotVersionError(
                f"snapshot {path} uses format features {flags & ~KNOWN_FLAGS:#x} this reader does "
                f"not know (flags {flags:#x}); it was written by a newer pytest-supermachine: "
                f"upgrade, or {REBUILD_HINT}"
            )
        metadata_end = metadata_offset + metadata_length
        if (
            header_size != HEADER_SIZE
            or metadata_offset != HEADER_SIZE
            or metadata_length > MAX_METADATA_BYTES
        ):
            raise SnapshotCorrupt(
                f"snapshot {path} is corrupt: impossible header (header size {header_size}, "
                f"metadata at {metadata_offset}+{metadata_length}); {REBUILD_HINT}"
            )
        if metadata_end > actual_size:
            raise SnapshotTruncated(
                f"snapshot {path} is truncated or its header is corrupt: the file is {actual_size} "
                f"bytes but its metadata is said to span bytes {metadata_offset}..{metadata_end}; "
                f"{REBUILD_HINT}"
            )
        metadata = pread_exact(fd, metadata_length, metadata_offset)
        if len(metadata) != metadata_length:
            raise SnapshotTruncated(f"snapshot {path} shrank while it was read; {REBUILD_HINT}")
        if compute_digest(head[:DIGESTED_HEADER_BYTES], metadata) != digest:
            raise SnapshotCorrupt(
                f"snapshot {path} is corrupt: the SHA-256 checksum over its header and metadata "
                f"does not match (damaged on disk or in transfer); {REBUILD_HINT}"
            )
        # From here on the header and metadata are what some writer wrote; still check
        # every number before trusting it.
        if page_size != PAGE_SIZE:
            raise SnapshotCorrupt(
                f"snapshot {path} has page size {page_size}, not {PAGE_SIZE}; {REBUILD_HINT}"
            )
        if file_size != actual_size:
            if actual_size < file_size:
                raise SnapshotTruncated(
                    f"snapshot {path} is truncated: it is {actual_size} bytes but was written as "
                    f"{file_size} (an interrupted copy?); {REBUILD_HINT}"
                )
            raise SnapshotCorrupt(
                f"snapshot {path} has {actual_size - file_size} unexpected bytes after its end "
                f"({actual_size} bytes, written as {file_size}); {REBUILD_HINT}"
            )
        if ram_offset != align_up(metadata_end) or ram_offset + ram_length != file_size:
            raise SnapshotCorrupt(
                f"snapshot {path} is corrupt: RAM area {ram_offset}+{ram_length} does not follow "
                f"the metadata (ends at {metadata_end}) or does not end the {file_size}-byte file; "
                f"{REBUILD_HINT}"
            )
        padding = pread_exact(fd, ram_offset - metadata_end, metadata_end)
        if padding.count(0) != ram_offset - metadata_end:
            raise SnapshotCorrupt(
                f"snapshot {path} is corrupt: non-zero bytes between metadata and RAM; {REBUILD_HINT}"
            )
        is_diff = bool(flags & FLAG_DIFF)
        if is_diff != (parent_digest != NO_PARENT):
            raise SnapshotCorrupt(
                f"snapshot {path} is corrupt: its diff flag and parent digest disagree; {REBUILD_HINT}"
            )
        self.format_version = version
        self.digest = digest
        self.parent_digest = parent_digest if is_diff else None
        self.file_size = file_size
        self._parse_metadata(memoryview(metadata), is_diff, ram_offset, ram_length)

    def _version_error(self, version: int) -> SnapshotVersionError:
        return SnapshotVersionError(
            f"snapshot {self.path} has format version {version}, but this pytest-supermachine "
            f"reads version {FORMAT_VERSION} only; {REBUILD_HINT} with this version"
        )

    def _parse_metadata(
        self, data: memoryview, is_diff: bool, ram_offset: int, ram_length: int
    ) -> None:
        cur = MetadataCursor(data, self.path)
        region_count = cur.u32("region count")
        if not 1 <= region_count <= MAX_REGIONS:
            raise cur.fail(f"{region_count} RAM regions")
        regions: list[RamRegion] = []
        offsets: list[int | None] = []
        for i in range(region_count):
            gpa, size, offset = REGION_RECORD.unpack(cur.take(REGION_RECORD.size, f"region {i}"))
            regions.append(RamRegion(gpa, size))
            offsets.append(None if offset == NOT_STORED else offset)
        problem = region_problem(regions)
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
            if check_section_name(name) is None or name in sections:
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
        if extent_count * EXTENT_RECORD.size != len(data) - cur.pos:
            raise cur.fail(f"{extent_count} page extents do not fill the rest of the metadata")
        toc = checked_page_toc(
            cur,
            cur.take(extent_count * EXTENT_RECORD.size, "page extents"),
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
                f"it was written by an older or foreign writer; {REBUILD_HINT}"
            ) from None

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
                buffers.append(map_file_private(self._fd_checked(), offset, region.size, self.path))
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
                buffers.append(
                    map_file_private(
                        self._fd_checked(), offset, region.size, self.path, readonly=True
                    )
                )
        except BaseException:
            for buf in buffers:
                buf.close()
            raise
        return buffers

    def read_pages(self, reads: list[tuple[int, memoryview]]) -> None:
        """Fill target views from file offsets of this file (batched scatter reads)."""
        read_scattered(self._fd_checked(), reads, self.path)

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
        raise SnapshotTruncated(f"snapshot {path} is truncated inside its header; {REBUILD_HINT}")
    version = U32.unpack(head[8:12])[0]
    if version != FORMAT_VERSION:
        raise SnapshotVersionError(
            f"snapshot {path} has format version {version}; this reader knows {FORMAT_VERSION}"
        )
    return head[DIGESTED_HEADER_BYTES:HEADER_SIZE]
