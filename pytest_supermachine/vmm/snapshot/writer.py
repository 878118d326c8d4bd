"""Writing one snapshot file, full or diff, atomically.

A temporary file in the target directory is written, fsynced (unless not `durable`) and
renamed over the final name: a crash leaves at most a stray ``.NAME.*.tmp`` file, never
a half-written snapshot under the final name.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import secrets
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..layout import PAGE_SIZE, RamRegion
from ..memory import GuestMemory
from .errors import SnapshotError, SnapshotParentError
from .fileio import pwrite_all, pwritev_all
from .format import (
    DIGESTED_HEADER_BYTES,
    EXTENT_DATA,
    EXTENT_RECORD,
    EXTENT_ZERO,
    FLAG_DIFF,
    FORMAT_VERSION,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_METADATA_BYTES,
    MAX_REGIONS,
    MAX_SECTION_NAME_BYTES,
    NO_PARENT,
    NOT_STORED,
    REGION_RECORD,
    U16,
    U32,
    U64,
    ZERO_PAGE,
    PageExtent,
    PageSelection,
    align_up,
    check_section_name,
    compute_digest,
    layout_text,
    page_runs,
    region_problem,
    selected_pages,
)
from .reader import SnapshotRef, peek_digest

_SCAN_CHUNK = 64 * PAGE_SIZE  # zero-page scan: compare this much at once first
_ZERO_CHUNK = bytes(_SCAN_CHUNK)


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
        encoded = check_section_name(name)
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
                view, selected_pages(selection, len(view) // PAGE_SIZE, i)
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
    # EXTENT_RECORD.size bytes whatever it says, so the RAM area's start is known up front.
    metadata_length = len(encode([None] * len(regions), [])) + EXTENT_RECORD.size * len(runs)
    ram_offset = align_up(HEADER_SIZE + metadata_length)
    region_offsets, extents, ram_length = build(ram_offset)
    metadata = encode(region_offsets, extents)
    assert len(metadata) == metadata_length
    if len(metadata) > MAX_METADATA_BYTES:
        raise ValueError(f"snapshot metadata of {len(metadata)} bytes exceeds {MAX_METADATA_BYTES}")
    file_size = ram_offset + ram_length
    flags = 0 if parent is None else FLAG_DIFF
    parent_digest = NO_PARENT if parent is None else parent.digest
    prefix = HEADER.pack(
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
        NO_PARENT,
    )[:DIGESTED_HEADER_BYTES]
    digest = compute_digest(prefix, metadata)

    with _AtomicFile(final, durable=durable) as fd:
        if parent is None:
            for e in extents:
                view = region_views[e.region]
                start = e.first_page * PAGE_SIZE
                assert e.file_offset is not None
                pwrite_all(fd, view[start : start + e.page_count * PAGE_SIZE], e.file_offset)
        else:
            data = [
                region_views[e.region][
                    e.first_page * PAGE_SIZE : (e.first_page + e.page_count) * PAGE_SIZE
                ]
                for e in extents
                if e.file_offset is not None
            ]
            pwritev_all(fd, data, ram_offset)
        pwrite_all(fd, prefix + digest + metadata, 0)
        os.ftruncate(fd, file_size)  # the tail of the last region may be a hole
    return SnapshotRef(digest, final)


def _changed_page_runs(view: memoryview, pages: list[int]) -> list[tuple[int, int, bool]]:
    """Split sorted changed pages into runs of (first, count, all_zero): zero pages get no bytes."""
    out: list[tuple[int, int, bool]] = []
    for first, count in page_runs(pages):
        data = view[first * PAGE_SIZE : (first + count) * PAGE_SIZE].tobytes()
        for k in range(count):
            is_zero = data[k * PAGE_SIZE : (k + 1) * PAGE_SIZE] == ZERO_PAGE
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
            table = f.read(HEADER_SIZE + 4 + MAX_REGIONS * REGION_RECORD.size)[HEADER_SIZE:]
    except (SnapshotError, OSError) as exc:
        raise SnapshotParentError(f"cannot take a diff against {parent_path}: {exc}") from exc
    if digest != parent.digest:
        raise SnapshotParentError(
            f"cannot take a diff against {parent_path}: it has digest {digest.hex()[:16]}…, "
            f"but the reference says {parent.digest.hex()[:16]}… (it was rebuilt); "
            "take the diff against the current file (SnapshotRef.of(path))"
        )
    count = U32.unpack_from(table)[0] if len(table) >= 4 else 0
    parent_regions = [
        RamRegion(*REGION_RECORD.unpack_from(table, 4 + i * REGION_RECORD.size)[:2])
        for i in range(min(count, (len(table) - 4) // REGION_RECORD.size))
    ]
    if parent_regions != list(regions):
        raise SnapshotParentError(
            f"cannot take a diff against {parent_path}: its RAM layout "
            f"{layout_text(parent_regions)} differs from this memory's {layout_text(regions)}"
        )


def _check_regions_for_writing(regions: Sequence[RamRegion]) -> None:
    problem = region_problem(regions)
    if problem:
        raise ValueError(f"cannot snapshot this guest memory: {problem}")


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
            if chunk[offset : offset + PAGE_SIZE] != ZERO_PAGE:
                nonzero.append(first + offset // PAGE_SIZE)
    return page_runs(nonzero)


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
    parts: list[bytes] = [U32.pack(len(regions))]
    for region, offset in zip(regions, region_offsets, strict=True):
        parts.append(
            REGION_RECORD.pack(region.gpa, region.size, NOT_STORED if offset is None else offset)
        )
    parts.append(U32.pack(len(sections)))
    for name, data in sections:
        parts += [U16.pack(len(name)), name, U64.pack(len(data)), data]
    parts += [U32.pack(len(host_facts_json)), host_facts_json]
    parts.append(U16.pack(len(parent_hints)))
    for hint in parent_hints:
        encoded = hint.encode("utf-8")
        parts += [U32.pack(len(encoded)), encoded]
    parts += [snapshot_id, U64.pack(created_ns), U64.pack(len(extents))]
    pack = EXTENT_RECORD.pack
    for e in extents:
        kind = EXTENT_ZERO if e.file_offset is None else EXTENT_DATA
        parts.append(pack(e.region, kind, e.first_page, e.page_count, e.file_offset or 0))
    return b"".join(parts)


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
