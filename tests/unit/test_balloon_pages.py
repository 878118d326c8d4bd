"""Giving guest pages back to the host: what the guest reads afterwards, what the host holds.

`GuestMemory.discard` is what a balloon does with inflated and reported pages; its
effect differs by what the RAM is a mapping of, and the balloon's correctness argument
(pages.py) rests on exactly these two behaviours. `host_usage` is how tests and
benchmarks see the host memory a guest holds.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import pytest

from pytest_supermachine.vmm.devices.virtio.balloon.pages import page_ranges, whole_pages
from pytest_supermachine.vmm.layout import RamRegion
from pytest_supermachine.vmm.memory import GuestMemory

pytestmark = pytest.mark.unit

SIZE = 8 << 20
GPA = 0x100000


def anonymous_ram() -> GuestMemory:
    buf = mmap.mmap(-1, SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return GuestMemory([RamRegion(GPA, SIZE)], [buf])


def test_discarded_anonymous_ram_reads_zero_and_leaves_the_host():
    memory = anonymous_ram()
    try:
        memory.write(GPA, b"\x77" * SIZE)
        before = memory.host_usage()
        memory.discard(GPA, SIZE // 2)
        after = memory.host_usage()
        assert memory.read(GPA, 4096) == bytes(4096)
        assert memory.read(GPA + SIZE // 2, 4096) == b"\x77" * 4096
        assert before.anonymous >= SIZE
        assert before.anonymous - after.anonymous >= SIZE // 2
    finally:
        memory.close()


def test_discarded_snapshot_ram_reads_the_file_again_and_leaves_no_private_copy(
    tmp_path: Path,
):
    path = tmp_path / "ram"
    path.write_bytes(b"\x11" * SIZE)
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), SIZE, flags=mmap.MAP_PRIVATE)
    memory = GuestMemory([RamRegion(GPA, SIZE)], [buf])
    try:
        memory.write(GPA, b"\x99" * SIZE)  # every page now a private copy
        before = memory.host_usage()
        memory.discard(GPA, SIZE)
        assert memory.read(GPA + 4096, 4) == b"\x11" * 4
        assert before.anonymous >= SIZE
        assert memory.host_usage().anonymous < 64 << 10
    finally:
        memory.close()


def test_discarded_test_ram_reads_zero():
    memory = GuestMemory([RamRegion(GPA, 0x3000)], [bytearray(b"\x33" * 0x3000)])
    memory.discard(GPA + 0x1000, 0x1000)
    assert memory.read(GPA, 0x3000) == b"\x33" * 0x1000 + bytes(0x1000) + b"\x33" * 0x1000


@pytest.mark.parametrize("gpa, length", [(GPA + 1, 4096), (GPA, 100)])
def test_a_discard_that_is_not_whole_pages_is_refused(gpa: int, length: int):
    memory = GuestMemory([RamRegion(GPA, 0x3000)], [bytearray(0x3000)])
    with pytest.raises(ValueError, match="page-aligned"):
        memory.discard(gpa, length)


def test_balloon_pfns_become_merged_page_ranges():
    assert page_ranges([5, 3, 4, 9, 4]) == [(0x3000, 0x3000), (0x9000, 0x1000)]


@pytest.mark.parametrize(
    "gpa, length, expected",
    [
        (0x1000, 0x2000, (0x1000, 0x2000)),
        (0x1800, 0x2000, (0x2000, 0x1000)),
        (0x1800, 0x1000, None),
    ],
)
def test_only_whole_pages_of_a_range_count(gpa: int, length: int, expected: tuple | None):
    assert whole_pages(gpa, length) == expected
