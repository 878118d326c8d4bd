"""The guest address map: RAM split around the MMIO hole, fixed boot regions, device placement."""

import itertools

import pytest

from pytest_supermachine.errors import DeviceLayoutError
from pytest_supermachine.guest import microguest
from pytest_supermachine.vmm import boot, layout


def test_small_memory_is_one_low_region():
    assert layout.ram_regions(256 * layout.MiB) == [layout.RamRegion(0, 256 * layout.MiB)]


def test_memory_above_three_gib_continues_at_four_gib():
    regions = layout.ram_regions(4 * layout.GiB)
    assert regions == [
        layout.RamRegion(0, 3 * layout.GiB),
        layout.RamRegion(4 * layout.GiB, 1 * layout.GiB),
    ]


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


def test_fixed_low_memory_regions_are_disjoint_and_below_the_kernel():
    largest = layout.ram_regions(layout.MAX_MEM_MIB * layout.MiB)
    directories = -(-largest[-1].end // layout.GiB)  # one page directory per GiB mapped
    max_e820 = 3 + len(largest)  # base memory, MP table, BIOS area, then the RAM regions
    regions = sorted(
        [
            (layout.GDT_ADDR, 8 * len(boot.GDT_ENTRIES), "GDT"),
            (layout.BZIMAGE_GDT_ADDR, 8 * len(boot.BZIMAGE_GDT), "bzImage GDT"),
            (layout.PVH_START_INFO_ADDR, boot.PVH_START_INFO.size, "PVH start info"),
            (layout.PVH_MODLIST_ADDR, boot.PVH_MODLIST_ENTRY.size, "PVH module list"),
            (layout.PVH_MEMMAP_ADDR, max_e820 * boot.PVH_MEMMAP_ENTRY.size, "PVH e820 map"),
            (layout.BOOT_INFO_ADDR, layout.PAGE_SIZE, "boot info / zero page"),
            (microguest.TRAMPOLINE_ADDR, layout.PAGE_SIZE, "microguest AP trampoline"),
            (layout.PAGE_TABLES_ADDR, (2 + directories) * layout.PAGE_SIZE, "page tables"),
            (layout.CMDLINE_ADDR, layout.CMDLINE_MAX, "command line"),
            (layout.MPTABLE_ADDR, layout.BASE_MEMORY_END - layout.MPTABLE_ADDR, "MP table"),
            (layout.BIOS_AREA_ADDR, layout.BIOS_AREA_SIZE, "BIOS area"),
        ]
    )
    for (start, size, name), (next_start, _size, next_name) in itertools.pairwise(regions):
        assert start + size <= next_start, f"{name} runs into {next_name}"
    start, size, name = regions[-1]
    assert start + size <= layout.KERNEL_LOAD_ADDR, f"{name} runs into the kernel"


def test_device_windows_end_below_the_ioapic_and_lapic():
    assert layout.RAM_LOW_MAX <= layout.MMIO_BASE < layout.MMIO_END
    assert layout.MMIO_END <= layout.IOAPIC_ADDR < layout.LAPIC_ADDR < layout.HIGH_RAM_START
