"""Guest-physical address map: the one place that says where things live.

Every guest-physical address the VMM, the boot code and the devices use is
named here, so two pieces can never disagree about where the page tables or a
device window are.

    0x0000_0500  GDT (null, code64, data, code32)
    0x0000_0540  GDT of the Linux 64-bit boot protocol (bzImage entry)
    0x0000_6000  PVH start info, module list (0x6100), e820 map (0x6200) (Linux PVH entry)
    0x0000_7000  boot info page (microguest `struct sm_boot_info` / Linux zero page)
    0x0000_8000  left free: the microguest copies its AP trampoline here
    0x0000_9000  page tables: PML4, PDPT, then page directories (2 MiB pages)
    0x0002_0000  kernel command line (Linux)
    0x0009_fc00  MP table (top KiB of base memory), reserved up to 0xa_0000 (640 KiB)
    0x000f_0000  system BIOS area: reserved in the e820 map
    0x0010_0000  kernel / microguest load address (1 MiB)
    ...          RAM up to min(mem, RAM_LOW_MAX)
    0xd000_0000  virtio-mmio windows, one 4 KiB page per device
    0xfec0_0000  IOAPIC, 0xfee0_0000 LAPIC (in-kernel)
    4 GiB ...    RAM above the 32-bit hole, when mem > RAM_LOW_MAX
    64 GiB       virtio-fs DAX windows (not RAM: host file pages), one 1 GiB stride per
                 device slot, each its own KVM memory slot (DAX_SLOT_BASE + slot index)
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import DeviceLayoutError

PAGE_SIZE = 4096
MiB = 1 << 20
GiB = 1 << 30

GDT_ADDR = 0x500
BZIMAGE_GDT_ADDR = 0x540  # the 64-bit boot protocol wants __BOOT_CS = 0x10, which ours is not
PVH_START_INFO_ADDR = 0x6000  # struct hvm_start_info
PVH_MODLIST_ADDR = 0x6100  # struct hvm_modlist_entry[]: the initrd
PVH_MEMMAP_ADDR = 0x6200  # struct hvm_memmap_table_entry[]: the e820 map
BOOT_INFO_ADDR = 0x7000
ZERO_PAGE_ADDR = BOOT_INFO_ADDR  # Linux struct boot_params, for the bzImage entry
PAGE_TABLES_ADDR = 0x9000
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 4096
MPTABLE_ADDR = 0x9FC00  # top KiB of base memory: where Linux looks for the MP floating pointer
BASE_MEMORY_END = 0xA0000  # 640 KiB: legacy video memory and ROMs above
BIOS_AREA_ADDR = 0xF0000  # system BIOS area, which Linux also scans for the MP table
BIOS_AREA_SIZE = 0x10000
KERNEL_LOAD_ADDR = 0x100000

RAM_LOW_MAX = 3 * GiB  # RAM below the 32-bit MMIO hole
HIGH_RAM_START = 4 * GiB
MAX_MEM_MIB = 16 * 1024  # the identity map between PAGE_TABLES_ADDR and CMDLINE_ADDR covers this
MIN_MEM_MIB = 4

MMIO_BASE = 0xD000_0000
MMIO_WINDOW = 0x1000
IOAPIC_ADDR = 0xFEC0_0000  # the in-kernel IOAPIC's default base
LAPIC_ADDR = 0xFEE0_0000  # the in-kernel LAPIC's default base
MMIO_END = IOAPIC_ADDR  # device windows end where the IOAPIC begins

IOAPIC_PINS = 24
FIRST_DEVICE_IRQ = 5  # 0-2 timer/PIC cascade, 3-4 serial ports

# Port I/O owned by the VMM core (dispatched in C).
COM1_PORT = 0x3F8
COM1_IRQ = 4
I8042_CMD_PORT = 0x64  # writing 0xFE here is the reset line: treated as a clean stop
CONTROL_PORT = 0x510  # supermachine control port, 32-bit writes: see ControlCommand

# Selectors of the GDT the VMM installs.
SEL_CODE64 = 0x08
SEL_DATA = 0x10
SEL_CODE32 = 0x18


@dataclass(frozen=True)
class RamRegion:
    """One contiguous stretch of guest RAM: guest-physical start and size in bytes."""

    gpa: int
    size: int

    @property
    def end(self) -> int:
        return self.gpa + self.size


def ram_regions(mem_bytes: int) -> list[RamRegion]:
    """Split `mem_bytes` of RAM around the 32-bit MMIO hole (low part first)."""
    if mem_bytes % PAGE_SIZE:
        raise ValueError(f"guest memory must be a multiple of {PAGE_SIZE} bytes, got {mem_bytes}")
    low = min(mem_bytes, RAM_LOW_MAX)
    regions = [RamRegion(0, low)]
    if mem_bytes > low:
        regions.append(RamRegion(HIGH_RAM_START, mem_bytes - low))
    return regions


#: virtio-fs DAX windows: above the most RAM a machine can have (4 GiB + MAX_MEM_MIB), so a
#: window never overlaps RAM; device slot i's window starts at DAX_BASE + i * DAX_STRIDE.
DAX_BASE = 64 * GiB
DAX_STRIDE = GiB
DAX_MAX_BYTES = DAX_STRIDE
DAX_SLOT_BASE = 16  # KVM memory slot numbers of the windows (RAM uses 0 and 1)


def dax_window(slot_index: int, size: int) -> RamRegion:
    """Where device slot `slot_index`'s DAX window of `size` bytes lives (guest-physical)."""
    if not 0 < size <= DAX_MAX_BYTES or size % (2 * MiB):
        raise DeviceLayoutError(
            f"a DAX window is 2 MiB..{DAX_MAX_BYTES >> 20} MiB in 2 MiB steps, got {size} bytes"
        )
    return RamRegion(DAX_BASE + slot_index * DAX_STRIDE, size)


@dataclass(frozen=True)
class DeviceSlot:
    """Where one virtio-mmio device lives: its 4 KiB window and its IOAPIC line."""

    index: int
    mmio_base: int
    mmio_size: int
    irq: int


def device_slots(count: int) -> list[DeviceSlot]:
    """Place `count` MMIO devices: consecutive windows from MMIO_BASE, IRQs from 5 up.

    Refuses layouts that would need more IOAPIC lines than exist or would run
    into the IOAPIC window, instead of silently sharing a line or an address.
    """
    if count < 0:
        raise DeviceLayoutError(f"device count must be >= 0, got {count}")
    budget = IOAPIC_PINS - FIRST_DEVICE_IRQ
    if count > budget:
        raise DeviceLayoutError(
            f"{count} MMIO devices need IRQ lines {FIRST_DEVICE_IRQ}..{FIRST_DEVICE_IRQ + count - 1}, "
            f"but the IOAPIC has only {IOAPIC_PINS} lines: at most {budget} devices fit; "
            "attach fewer devices"
        )
    slots = [
        DeviceSlot(i, MMIO_BASE + i * MMIO_WINDOW, MMIO_WINDOW, FIRST_DEVICE_IRQ + i)
        for i in range(count)
    ]
    if slots and slots[-1].mmio_base + MMIO_WINDOW > MMIO_END:
        raise DeviceLayoutError("device MMIO windows would overlap the IOAPIC window")
    return slots
