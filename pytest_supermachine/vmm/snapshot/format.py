"""The snapshot file format: constants, record layouts and the checks writer and reader share.

docs/snapshot-format.md specifies the bytes; this module is their one definition in code.
What is not re-exported by the package `__init__` is internal to it (the writer, the
reader and the chain code share it).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

from ..layout import MAX_MEM_MIB, PAGE_SIZE, MiB, RamRegion
from .errors import REBUILD_HINT, SnapshotCorrupt

# --------------------------------------------------------------------------- format constants

MAGIC = b"SMSNAP\x1a\n"
"""First 8 bytes of every snapshot. ^Z and \\n catch text-mode mangling, as PNG's magic does."""

FORMAT_VERSION = 1
"""Bumped on every change a v1 reader could misread; readers refuse every version they do not know."""

HEADER = struct.Struct("<8sIIIIQQQQQ32s32s")
HEADER_SIZE = HEADER.size  # 128
DIGESTED_HEADER_BYTES = 96  # header bytes covered by the digest: everything before the digest
DIGEST_SIZE = 32
NO_PARENT = bytes(DIGEST_SIZE)

FLAG_DIFF = 1 << 0
KNOWN_FLAGS = FLAG_DIFF

REGION_RECORD = struct.Struct("<QQQ")  # gpa, size, file_offset (NOT_STORED in diffs)
EXTENT_RECORD = struct.Struct("<IIQQQ")  # region, kind, first_page, page_count, file_offset
U16 = struct.Struct("<H")
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
NOT_STORED = (1 << 64) - 1
EXTENT_DATA = 0
EXTENT_ZERO = 1

MAX_REGIONS = 64
MAX_RAM_BYTES = MAX_MEM_MIB * MiB
MAX_METADATA_BYTES = 1 << 30
MAX_SECTION_NAME_BYTES = 255
MAX_PARENT_HINTS = 16
MAX_PARENT_HINT_BYTES = 4096
MAX_CHAIN_DEPTH = 64
_MAX_GPA = 1 << 52  # architectural limit of x86-64 physical addresses
ZERO_PAGE = bytes(PAGE_SIZE)


class PageExtent(NamedTuple):
    """A run of guest pages of one region recorded in one file.

    `file_offset` is where the first page's bytes are; None means the pages are all-zero
    and nothing is stored (diffs record pages that became zero this way).
    """

    region: int
    first_page: int
    page_count: int
    file_offset: int | None


PageSelection = bytes | bytearray | memoryview | Iterable[int]
"""The changed pages of one region: page indices, or a KVM-style dirty bitmap (bit i = page i)."""

# --------------------------------------------------------------------------- helpers


def align_up(value: int, alignment: int = PAGE_SIZE) -> int:
    return (value + alignment - 1) // alignment * alignment


def page_runs(pages: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted unique page indices -> [(first, count)] of consecutive runs."""
    runs: list[tuple[int, int]] = []
    for page in pages:
        if runs and runs[-1][0] + runs[-1][1] == page:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((page, 1))
    return runs


def selected_pages(selection: PageSelection, page_count: int, region_index: int) -> list[int]:
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


def region_problem(regions: Sequence[RamRegion]) -> str | None:
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


def check_section_name(name: object) -> bytes | None:
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


def compute_digest(header_prefix: bytes, metadata: bytes | memoryview) -> bytes:
    h = hashlib.sha256()
    h.update(header_prefix)
    h.update(metadata)
    return h.digest()


def layout_text(regions: Iterable[RamRegion]) -> str:
    return "[" + ", ".join(f"{r.gpa:#x}+{r.size:#x}" for r in regions) + "]"


class MetadataCursor:
    """Bounded reader over the metadata: running off the end is corruption, not IndexError."""

    def __init__(self, data: memoryview, path: Path) -> None:
        self.data = data
        self.pos = 0
        self.path = path

    def fail(self, what: str) -> SnapshotCorrupt:
        return SnapshotCorrupt(
            f"snapshot {self.path} has a valid checksum but inconsistent metadata ({what}): it was "
            f"written by a buggy or foreign writer; {REBUILD_HINT}"
        )

    def take(self, length: int, what: str) -> memoryview:
        if length < 0 or self.pos + length > len(self.data):
            raise self.fail(f"{what} runs past the end of the metadata")
        view = self.data[self.pos : self.pos + length]
        self.pos += length
        return view

    def u16(self, what: str) -> int:
        return int(U16.unpack(self.take(2, what))[0])

    def u32(self, what: str) -> int:
        return int(U32.unpack(self.take(4, what))[0])

    def u64(self, what: str) -> int:
        return int(U64.unpack(self.take(8, what))[0])
