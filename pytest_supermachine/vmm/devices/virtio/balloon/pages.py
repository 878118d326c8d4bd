"""The host side of the balloon: what happens to guest pages the driver gives back.

The device model (`device.py`) turns queue buffers into page-aligned guest ranges;
a `PageDiscarder` gives the host memory behind them back. The machine's discarder
(`SnapshotOrigin.discard` for a restored machine) also keeps its dirty-page
bookkeeping true: a discarded page of a machine restored MAP_PRIVATE from a snapshot
reads as the snapshot's bytes again, not as what the guest last wrote there.

Why that is allowed: the driver gives a page away only while it holds no data the
guest needs. Inflated pages belong to the device until deflated. Reported free pages
(VIRTIO_BALLOON_F_REPORTING) are free in the guest's allocator; without
VIRTIO_BALLOON_F_PAGE_POISON (which this device does not offer) the spec lets the
device change them (virtio spec, balloon "Device Operation / Free Page Reporting":
"the device MAY modify the contents of any page supplied in a report request before
acknowledging that request", and the driver "MUST treat all reported pages as
uninitialized memory"); inflated pages likewise between the inflate request and its
acknowledgement. Linux's driver, which cannot tell the device a poison value without
that feature, reports only when it neither poisons nor zeroes pages on free
(``init_on_free``): the allocator zeroes what must be zero when it hands a page out.
So the guest never reads a reported page expecting particular bytes, and the
snapshot's bytes will do. Both discards happen before the buffer is used (acknowledged).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from ....layout import PAGE_SIZE
from ....memory import GuestMemory

#: Balloon page frame numbers are in 4 KiB units whatever the guest's page size.
PFN_SHIFT = 12


class PageDiscarder(Protocol):
    """Gives the host memory behind guest ranges back. Ranges are page-aligned guest RAM."""

    def discard(self, ranges: Sequence[tuple[int, int]]) -> None: ...


class MemoryDiscarder:
    """`PageDiscarder` straight onto `GuestMemory.discard` (no dirty tracking to keep)."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory

    def discard(self, ranges: Sequence[tuple[int, int]]) -> None:
        for gpa, length in ranges:
            self.memory.discard(gpa, length)


def page_ranges(pfns: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted, merged ``(gpa, length)`` ranges of whole pages from balloon page frame numbers."""
    out: list[tuple[int, int]] = []
    for pfn in sorted(set(pfns)):
        gpa = pfn << PFN_SHIFT
        if out and out[-1][0] + out[-1][1] == gpa:
            out[-1] = (out[-1][0], out[-1][1] + PAGE_SIZE)
        else:
            out.append((gpa, PAGE_SIZE))
    return out


def whole_pages(gpa: int, length: int) -> tuple[int, int] | None:
    """The whole pages inside ``[gpa, gpa+length)`` as ``(gpa, length)``, or None if none."""
    start = -(-gpa // PAGE_SIZE) * PAGE_SIZE
    end = (gpa + length) // PAGE_SIZE * PAGE_SIZE
    return (start, end - start) if end > start else None
