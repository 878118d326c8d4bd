"""Bus regions never overlap; lookups find the owning device."""

import pytest

from pytest_supermachine.errors import DeviceLayoutError
from pytest_supermachine.vmm.devices.mmio_bus import MmioBus


class Dev:
    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        pass


def test_find_returns_the_region_containing_the_address():
    bus = MmioBus("mmio")
    a, b = Dev(), Dev()
    bus.register(0x1000, 0x100, a)
    bus.register(0x2000, 0x100, b)
    assert bus.find(0x10FF).device is a
    assert bus.find(0x2000).device is b
    assert bus.find(0x1100) is None


@pytest.mark.parametrize(
    ("base", "size"), [(0x1000, 0x100), (0x10FF, 1), (0xF00, 0x101), (0, 0x10000)]
)
def test_overlapping_region_is_refused_naming_both(base, size):
    bus = MmioBus("mmio")
    bus.register(0x1000, 0x100, Dev())
    with pytest.raises(DeviceLayoutError, match="overlaps Dev at 0x1000"):
        bus.register(base, size, Dev())


def test_adjacent_regions_are_fine():
    bus = MmioBus("mmio")
    bus.register(0x1000, 0x100, Dev())
    bus.register(0x1100, 0x100, Dev())
    bus.register(0xF00, 0x100, Dev())
    assert len(list(bus)) == 3


def test_unregistered_region_can_be_reused():
    bus = MmioBus("mmio")
    bus.register(0x1000, 0x100, Dev())
    bus.unregister(0x1000)
    bus.register(0x1000, 0x100, Dev())
