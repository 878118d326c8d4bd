"""The guest address map: RAM split around the MMIO hole, device placement refusals."""

import pytest

from pytest_supermachine.errors import DeviceLayoutError
from pytest_supermachine.vmm import layout


def test_small_memory_is_one_low_region():
    assert layout.ram_regions(256 * layout.MiB) == [layout.RamRegion(0, 256 * layout.MiB)]


def test_memory_above_three_gib_continues_at_four_gib():
    regions = layout.ram_regions(4 * layout.GiB)
    assert regions == [layout.RamRegion(0, 3 * layout.GiB),
                       layout.RamRegion(4 * layout.GiB, 1 * layout.GiB)]


def test_memory_must_be_page_granular():
    with pytest.raises(ValueError, match="multiple of 4096"):
        layout.ram_regions(4097)


def test_devices_get_distinct_windows_and_irqs_from_five():
    slots = layout.device_slots(3)
    assert [s.irq for s in slots] == [5, 6, 7]
    assert [s.mmio_base for s in slots] == [0xD0000000, 0xD0001000, 0xD0002000]


def test_more_devices_than_ioapic_lines_are_refused_with_the_limit_named():
    with pytest.raises(DeviceLayoutError, match="at most 19 devices"):
        layout.device_slots(20)
