"""The page table of contents of one snapshot file: where each recorded guest page lives.

Validated column-wise on open (every extent inside its region, sorted, non-overlapping,
its bytes exactly where the layout puts them); afterwards a page is found by bisection.
"""

from __future__ import annotations

import bisect
import itertools
import operator
from collections.abc import Iterator, Sequence

from ..layout import PAGE_SIZE, RamRegion
from .format import EXTENT_DATA, EXTENT_RECORD, EXTENT_ZERO, MetadataCursor


class PageToc:
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


def checked_page_toc(
    cur: MetadataCursor,
    raw: memoryview,
    regions: Sequence[RamRegion],
    region_offsets: Sequence[int | None],
    is_diff: bool,
    ram_offset: int,
    ram_length: int,
) -> PageToc:
    """Validate the page TOC: every extent inside its region, sorted, non-overlapping, and its
    bytes exactly where the layout puts them (full: the page's place in its region; diff:
    packed back to back from the RAM area's start, filling it exactly).

    Column-wise (map/zip over lists) because a full snapshot of a busy guest has tens of
    thousands of extents and this runs on every restore.
    """
    rows = list(EXTENT_RECORD.iter_unpack(raw))
    if not rows:
        if is_diff and ram_length:
            raise cur.fail("diff RAM area holds bytes but no page extent points at them")
        return PageToc([], [], [], [], len(regions))
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
    allowed = {EXTENT_DATA, EXTENT_ZERO} if is_diff else {EXTENT_DATA}
    unknown = set(kind_col) - allowed
    if unknown:
        raise cur.fail(
            f"page extent kind {min(unknown)} in a {'diff' if is_diff else 'full'} snapshot"
        )
    is_data = [k == EXTENT_DATA for k in kind_col]
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
    return PageToc(region_col, first_col, count_col, offsets, len(regions))
