"""GuestMemory is the one choke point: every range is checked against guest RAM."""

import pytest

from pytest_supermachine.errors import GuestMemoryError
from pytest_supermachine.vmm.layout import GiB, MiB
from pytest_supermachine.vmm.memory import GuestMemory


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
    [(0x0, 1), (0xFFF, 2), (0x1000 + 64 * 1024 - 1, 2), (0x1000, 64 * 1024 + 1), (-1, 1),
     (0x2000, -1), (2**64 - 1, 2), (0x1000 + 64 * 1024, 0x7FFF_FFFF_FFFF_FFFF)],
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
