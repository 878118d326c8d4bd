"""GuestMemory is the one choke point: every range is checked against guest RAM, and the
pages changed in it (by the guest or by devices) are tracked in one place."""

import pytest

from pytest_supermachine.errors import GuestMemoryError
from pytest_supermachine.vmm.layout import PAGE_SIZE, GiB, MiB, RamRegion
from pytest_supermachine.vmm.memory import DeviceMemory, DirtyPages, GuestMemory


@pytest.fixture
def mem():
    m = GuestMemory.from_bytearray(bytearray(64 * 1024), gpa=0x1000)
    yield m
    m.close()


def test_read_back_what_was_written(mem):
    mem.write(0x2000, b"hello")
    assert mem.read(0x2000, 5) == b"hello"


def test_integers_are_little_endian(mem):
    mem.write_u32(0x1000, 0x11223344)
    assert mem.read(0x1000, 4) == b"\x44\x33\x22\x11"
    assert mem.read_u32(0x1000) == 0x11223344


@pytest.mark.parametrize(
    ("gpa", "length"),
    [
        (0x0, 1),
        (0xFFF, 2),
        (0x1000 + 64 * 1024 - 1, 2),
        (0x1000, 64 * 1024 + 1),
        (-1, 1),
        (0x2000, -1),
        (2**64 - 1, 2),
        (0x1000 + 64 * 1024, 0x7FFF_FFFF_FFFF_FFFF),
    ],
)
def test_ranges_outside_ram_are_refused(mem, gpa, length):
    with pytest.raises(GuestMemoryError, match="outside guest RAM|negative"):
        mem.view(gpa, length)


def test_range_ending_exactly_at_the_end_is_allowed(mem):
    assert len(mem.view(0x1000 + 64 * 1024 - 8, 8)) == 8


def test_anonymous_memory_is_split_around_the_hole_and_zeroed():
    m = GuestMemory.anonymous(3 * GiB + 2 * MiB)
    try:
        assert [r.gpa for r in m.regions] == [0, 4 * GiB]
        assert m.read(4 * GiB + 4096, 16) == bytes(16)
        with pytest.raises(GuestMemoryError):
            m.read(3 * GiB, 1)  # the MMIO hole is not RAM
    finally:
        m.close()


TWO_REGIONS = [RamRegion(0, 16 * PAGE_SIZE), RamRegion(0x100000, 80 * PAGE_SIZE)]


def test_dirty_pages_merge_the_kvm_log_with_device_page_frames():
    dirty = DirtyPages(TWO_REGIONS)
    dirty.add_bitmap(0, bytes([0b101, 0]))  # guest wrote pages 0 and 2 of region 0
    dirty.add_pages([2, 0x100000 // PAGE_SIZE + 9])  # a device wrote page 2 again, and one high
    assert dirty.bitmap(0) == bytes([0b101, 0])
    assert dirty.bitmap(1) == (1 << 9).to_bytes(10, "little")
    assert dirty.count() == 3


def test_device_pages_outside_ram_are_not_dirty_pages():
    dirty = DirtyPages(TWO_REGIONS)
    dirty.add_pages([16, 0x100000 // PAGE_SIZE + 80])  # just past each region
    assert dirty.count() == 0
    assert not dirty.any(0) and not dirty.any(1)


def test_word_aligned_bitmaps_are_padded_to_whole_u64():
    dirty = DirtyPages(TWO_REGIONS)
    dirty.add_pages([0x100000 // PAGE_SIZE + 79])
    assert len(dirty.bitmap(1)) == 10
    assert len(dirty.bitmap(1, word_aligned=True)) == 16
    assert int.from_bytes(dirty.bitmap(1, word_aligned=True), "little") == 1 << 79


def test_clear_forgets_every_dirty_page():
    dirty = DirtyPages(TWO_REGIONS)
    dirty.add_bitmap(1, b"\xff")
    dirty.clear()
    assert dirty.count() == 0


def test_device_writes_are_recorded_by_page_frame(mem):
    device = DeviceMemory(mem)
    device.write(0x1FFE, b"abcd")  # straddles pages 1 and 2
    device.write_u16(0x4000, 7)
    assert device.written_pages() == {1, 2, 4}
    device.clear_written_pages()
    assert device.written_pages() == set()
