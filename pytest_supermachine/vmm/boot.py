"""Getting a guest to its first instruction: ELF loading, page tables, GDT, 64-bit entry.

Everything written into guest memory goes through `GuestMemory`, so a malformed
kernel image (segments past RAM, lying sizes) is refused with a clear error
instead of writing outside the guest.

The direct 64-bit entry used by the microguest is described in
`guest/microguest/bootinfo.h`: long mode, identity map of RAM and of the 32-bit
MMIO hole with 2 MiB pages, our GDT, RDI pointing at the boot info.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import GuestMemoryError, MachineError
from . import layout
from ._native import ffi, lib
from .memory import GuestMemory

# Page-table entry bits.
PTE_PRESENT = 1 << 0
PTE_WRITE = 1 << 1
PTE_USER = 1 << 2
PTE_PWT = 1 << 3
PTE_PCD = 1 << 4
PTE_HUGE = 1 << 7

CR0_PE = 1 << 0
CR0_ET = 1 << 4
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

GDT_ENTRIES = (
    0x0000000000000000,  # null
    0x00AF9B000000FFFF,  # 0x08: 64-bit code, DPL 0
    0x00CF93000000FFFF,  # 0x10: data, DPL 0
    0x00CF9B000000FFFF,  # 0x18: 32-bit code (AP trampolines)
)


def identity_map_top(mem: GuestMemory) -> int:
    """Highest address the boot page tables map: all RAM, and at least the 32-bit hole."""
    top = max(max(r.end for r in mem.regions), layout.HIGH_RAM_START)
    return (top + layout.GiB - 1) // layout.GiB * layout.GiB


def write_page_tables(mem: GuestMemory) -> int:
    """Identity-map [0, identity_map_top) with 2 MiB pages; returns CR3.

    Pages are user-accessible so a test guest can run code at CPL3 without
    building its own tables; the 32-bit MMIO hole is mapped uncached.
    """
    gib = identity_map_top(mem) // layout.GiB
    pml4 = layout.PAGE_TABLES_ADDR
    pdpt = pml4 + layout.PAGE_SIZE
    first_pd = pdpt + layout.PAGE_SIZE
    if first_pd + gib * layout.PAGE_SIZE > layout.CMDLINE_ADDR:
        raise MachineError(
            f"{gib} GiB of address space need more page tables than fit below "
            f"{layout.CMDLINE_ADDR:#x}: use at most {layout.MAX_MEM_MIB} MiB of guest memory"
        )
    table = PTE_PRESENT | PTE_WRITE | PTE_USER
    mem.write(pml4, struct.pack("<Q", pdpt | table) + bytes(layout.PAGE_SIZE - 8))
    mem.write(
        pdpt,
        struct.pack(f"<{gib}Q", *(first_pd + i * layout.PAGE_SIZE | table for i in range(gib)))
        + bytes(layout.PAGE_SIZE - 8 * gib),
    )
    for i in range(gib):
        entries = []
        for j in range(512):
            addr = (i << 30) | (j << 21)
            flags = table | PTE_HUGE
            if layout.RAM_LOW_MAX <= addr < layout.HIGH_RAM_START:
                flags |= PTE_PCD | PTE_PWT
            entries.append(addr | flags)
        mem.write(first_pd + i * layout.PAGE_SIZE, struct.pack("<512Q", *entries))
    return pml4


def write_gdt(mem: GuestMemory) -> tuple[int, int]:
    """Install the boot GDT; returns (base, limit)."""
    mem.write(layout.GDT_ADDR, struct.pack(f"<{len(GDT_ENTRIES)}Q", *GDT_ENTRIES))
    return layout.GDT_ADDR, len(GDT_ENTRIES) * 8 - 1


def _segment(seg: Any, selector: int, *, code: bool) -> None:
    seg.base = 0
    seg.limit = 0xFFFFFFFF
    seg.selector = selector
    seg.type = 0xB if code else 0x3
    seg.present, seg.dpl, seg.s, seg.g, seg.avl, seg.unusable = 1, 0, 1, 1, 0, 0
    seg.l = 1 if code else 0
    seg.db = 0 if code else 1


def setup_long_mode(sregs: Any, cr3: int, gdt: tuple[int, int]) -> None:
    """Fill `struct kvm_sregs` for 64-bit mode with paging at `cr3` and our flat segments."""
    _segment(sregs.cs, layout.SEL_CODE64, code=True)
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        _segment(seg, layout.SEL_DATA, code=False)
    sregs.gdt.base, sregs.gdt.limit = gdt
    sregs.idt.base, sregs.idt.limit = 0, 0
    sregs.cr0 = CR0_PE | CR0_ET | CR0_WP | CR0_PG
    sregs.cr3 = cr3
    sregs.cr4 = CR4_PAE
    sregs.efer = EFER_LME | EFER_LMA


# ----------------------------------------------------------------------------- ELF


@dataclass(frozen=True)
class ElfSegment:
    paddr: int
    offset: int
    filesz: int
    memsz: int


@dataclass(frozen=True)
class ElfNote:
    name: bytes
    type: int
    desc: bytes


@dataclass
class ElfImage:
    """A parsed ELF64 x86-64 executable: what to load where, and its notes (PVH entry)."""

    path: Path
    entry: int
    segments: list[ElfSegment]
    notes: list[ElfNote] = field(default_factory=list)

    @property
    def end(self) -> int:
        """First guest-physical byte after the loaded image."""
        return max(s.paddr + s.memsz for s in self.segments)


_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
PT_LOAD = 1
PT_NOTE = 4


def parse_elf(path: Path) -> ElfImage:
    """Parse and validate an ELF64 x86-64 executable, refusing anything malformed."""
    data = Path(path).read_bytes()

    def bad(why: str) -> MachineError:
        return MachineError(f"{path}: not a loadable x86-64 ELF kernel: {why}")

    if len(data) < _EHDR.size or data[:4] != b"\x7fELF":
        raise bad("no ELF magic")
    ident, etype, machine, _v, entry, phoff, _sh, _fl, _eh, phentsize, phnum, *_ = (
        _EHDR.unpack_from(data)
    )
    if ident[4] != 2 or ident[5] != 1:
        raise bad("not 64-bit little endian")
    if machine != 62:
        raise bad(f"machine {machine} is not x86-64 (62)")
    if etype != 2:
        raise bad(f"type {etype} is not an executable")
    if phentsize != _PHDR.size or phoff + phnum * phentsize > len(data):
        raise bad("program headers out of the file")
    segments: list[ElfSegment] = []
    notes: list[ElfNote] = []
    for i in range(phnum):
        ptype, _flags, offset, _vaddr, paddr, filesz, memsz, _align = _PHDR.unpack_from(
            data, phoff + i * phentsize
        )
        if ptype not in (PT_LOAD, PT_NOTE):
            continue
        if offset + filesz > len(data) or (filesz > memsz and ptype == PT_LOAD):
            raise bad(f"segment {i} extends past the end of the file")
        if ptype == PT_LOAD and memsz:
            segments.append(ElfSegment(paddr, offset, filesz, memsz))
        elif ptype == PT_NOTE:
            notes.extend(_parse_notes(data[offset : offset + filesz]))
    if not segments:
        raise bad("no loadable segments")
    return ElfImage(Path(path), entry, segments, notes)


def _parse_notes(blob: bytes) -> list[ElfNote]:
    notes, pos = [], 0
    while pos + 12 <= len(blob):
        namesz, descsz, ntype = struct.unpack_from("<III", blob, pos)
        pos += 12
        name_end = pos + namesz
        desc_start = pos + (namesz + 3) // 4 * 4
        desc_end = desc_start + descsz
        if desc_end > len(blob):
            break
        notes.append(ElfNote(blob[pos:name_end].rstrip(b"\0"), ntype, blob[desc_start:desc_end]))
        pos = desc_start + (descsz + 3) // 4 * 4
    return notes


def load_elf(mem: GuestMemory, image: ElfImage) -> None:
    """Copy every PT_LOAD segment to its physical address and zero its BSS."""
    data = image.path.read_bytes()
    for seg in image.segments:
        try:
            mem.write(seg.paddr, data[seg.offset : seg.offset + seg.filesz])
            if seg.memsz > seg.filesz:
                mem.view(seg.paddr + seg.filesz, seg.memsz - seg.filesz)[:] = bytes(
                    seg.memsz - seg.filesz
                )
        except GuestMemoryError as e:
            raise MachineError(
                f"{image.path}: segment at {seg.paddr:#x} ({seg.memsz} bytes) does not fit in "
                f"guest RAM of {mem.size >> 20} MiB: give the machine more memory ({e})"
            ) from None


# ----------------------------------------------------------------------------- boot info


@dataclass(frozen=True)
class BootDevice:
    """A device the guest should drive, as listed in the boot info."""

    type: int
    irq: int
    mmio_base: int
    mmio_size: int


def write_boot_info(
    mem: GuestMemory,
    *,
    vcpus: int,
    mode: int,
    arg: int,
    free_start: int,
    devices: list[BootDevice] | tuple[BootDevice, ...] = (),
) -> int:
    """Write `struct sm_boot_info` (bootinfo.h) at BOOT_INFO_ADDR; returns its address."""
    if len(devices) > lib.SM_MAX_BOOT_DEVICES:
        raise MachineError(f"at most {lib.SM_MAX_BOOT_DEVICES} boot devices, got {len(devices)}")
    info = ffi.new("struct sm_boot_info *")
    info.magic = lib.SM_BOOT_INFO_MAGIC
    info.version = lib.SM_BOOT_INFO_VERSION
    info.mem_bytes = mem.size
    info.low_mem_end = mem.regions[0].end
    info.vcpus = vcpus
    info.mode = mode
    info.arg = arg
    info.free_start = free_start
    info.ndevices = len(devices)
    for i, d in enumerate(devices):
        e = info.devices[i]
        e.type, e.irq, e.mmio_base, e.mmio_size = d.type, d.irq, d.mmio_base, d.mmio_size
    mem.write(layout.BOOT_INFO_ADDR, bytes(ffi.buffer(info)))
    return layout.BOOT_INFO_ADDR


# ----------------------------------------------------------------------------- Linux: PVH entry

XEN_ELFNOTE_PHYS32_ENTRY = 18
HVM_START_MAGIC = 0x336EC578
E820_RAM = 1
E820_RESERVED = 2

# Xen's start_info.h: struct hvm_start_info, hvm_modlist_entry, hvm_memmap_table_entry.
PVH_START_INFO = struct.Struct("<IIIIQQQQII")
PVH_MODLIST_ENTRY = struct.Struct("<QQQQ")
PVH_MEMMAP_ENTRY = struct.Struct("<QQII")


def pvh_entry(image: ElfImage) -> int:
    """The 32-bit PVH entry point from the kernel's Xen ELF note, or a clear error."""
    for note in image.notes:
        if note.name == b"Xen" and note.type == XEN_ELFNOTE_PHYS32_ENTRY and len(note.desc) >= 4:
            return (
                int.from_bytes(note.desc[:8] if len(note.desc) >= 8 else note.desc[:4], "little")
                & 0xFFFFFFFF
            )
    raise MachineError(
        f"{image.path} has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): build the kernel "
        "with CONFIG_PVH=y, or boot its bzImage instead"
    )


def e820_map(mem: GuestMemory) -> list[tuple[int, int, int]]:
    """(addr, size, type) entries: base memory below the MP table, RAM from 1 MiB, high RAM."""
    entries = [
        (0, layout.MPTABLE_ADDR, E820_RAM),
        (layout.MPTABLE_ADDR, layout.BASE_MEMORY_END - layout.MPTABLE_ADDR, E820_RESERVED),
        (layout.BIOS_AREA_ADDR, layout.BIOS_AREA_SIZE, E820_RESERVED),
    ]
    low = mem.regions[0]
    entries.append((layout.KERNEL_LOAD_ADDR, low.end - layout.KERNEL_LOAD_ADDR, E820_RAM))
    entries += [(r.gpa, r.size, E820_RAM) for r in mem.regions[1:]]
    return entries


def _checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def write_mptable(mem: GuestMemory, vcpus: int, irqs: int = layout.IOAPIC_PINS) -> None:
    """An Intel MP table (spec 1.4) so a guest without ACPI finds every CPU and the IOAPIC.

    CPUs have APIC ids 0..vcpus-1 (vCPU 0 the BSP), the IOAPIC id is `vcpus`, and
    every IOAPIC pin 0..irqs-1 is wired to the same ISA IRQ number (edge, active high),
    which is what the devices' irqfds and the virtio_mmio.device= tokens assume.
    """
    entries = []
    for cpu in range(vcpus):
        flags = 1 | (2 if cpu == 0 else 0)  # enabled, BSP
        entries.append(struct.pack("<BBBBIIQ", 0, cpu, 0x14, flags, 0x600, 0x201, 0))
    entries.append(struct.pack("<BB6s", 1, 0, b"ISA   "))
    ioapic_id = vcpus
    entries.append(struct.pack("<BBBBI", 2, ioapic_id, 0x11, 1, layout.IOAPIC_ADDR))
    for irq in range(irqs):
        entries.append(struct.pack("<BBHBBBB", 3, 0, 0, 0, irq, ioapic_id, irq))
    entries.append(struct.pack("<BBHBBBB", 4, 3, 0, 0, 0, 0, 0))  # ExtINT -> LINT0
    entries.append(struct.pack("<BBHBBBB", 4, 1, 0, 0, 0, 0xFF, 1))  # NMI -> LINT1
    body = b"".join(entries)
    table_addr = layout.MPTABLE_ADDR + 16
    header = bytearray(
        struct.pack(
            "<4sHBB8s12sIHHIHBB",
            b"PCMP",
            44 + len(body),
            4,
            0,
            b"SUPERMCH",
            b"MICROVM     ",
            0,
            0,
            len(entries),
            layout.LAPIC_ADDR,
            0,
            0,
            0,
        )
    )
    header[7] = _checksum(bytes(header) + body)
    if table_addr + len(header) + len(body) > layout.BASE_MEMORY_END:
        raise MachineError(f"MP table for {vcpus} vCPUs does not fit below 640 KiB")
    floating = bytearray(struct.pack("<4sIBBB5s", b"_MP_", table_addr, 1, 4, 0, bytes(5)))
    floating[10] = _checksum(bytes(floating))
    mem.write(layout.MPTABLE_ADDR, bytes(floating))
    mem.write(table_addr, bytes(header) + body)


@dataclass(frozen=True)
class LinuxBoot:
    """Where the PVH boot put things: the entry point and the start-info address (EBX)."""

    entry: int
    start_info: int


def load_linux_pvh(
    mem: GuestMemory, kernel: Path | ElfImage, *, cmdline: str, initrd: bytes | None, vcpus: int
) -> LinuxBoot:
    """Load a vmlinux for its PVH entry: ELF segments, cmdline, initrd, e820, MP table.

    The entry state the caller must set: 32-bit protected mode, paging off, flat
    segments, EBX = start_info (see `setup_protected_mode`).
    """
    image = kernel if isinstance(kernel, ElfImage) else parse_elf(Path(kernel))
    entry = pvh_entry(image)
    load_elf(mem, image)
    encoded = cmdline.encode() + b"\0"
    if len(encoded) > layout.CMDLINE_MAX:
        raise MachineError(
            f"kernel command line is {len(encoded)} bytes; at most {layout.CMDLINE_MAX} fit"
        )
    mem.write(layout.CMDLINE_ADDR, encoded)
    nr_modules, modlist = 0, 0
    if initrd:
        low_end = mem.regions[0].end
        addr = (low_end - len(initrd)) // layout.PAGE_SIZE * layout.PAGE_SIZE
        if addr < image.end + layout.MiB:
            raise MachineError(
                f"initrd of {len(initrd) >> 20} MiB does not fit above the kernel "
                f"in {low_end >> 20} MiB of RAM: give the machine more memory"
            )
        mem.write(addr, initrd)
        mem.write(layout.PVH_MODLIST_ADDR, PVH_MODLIST_ENTRY.pack(addr, len(initrd), 0, 0))
        nr_modules, modlist = 1, layout.PVH_MODLIST_ADDR
    memmap = e820_map(mem)
    mem.write(
        layout.PVH_MEMMAP_ADDR, b"".join(PVH_MEMMAP_ENTRY.pack(a, s, t, 0) for a, s, t in memmap)
    )
    mem.write(
        layout.PVH_START_INFO_ADDR,
        PVH_START_INFO.pack(
            HVM_START_MAGIC,
            1,
            0,
            nr_modules,
            modlist,
            layout.CMDLINE_ADDR,
            0,
            layout.PVH_MEMMAP_ADDR,
            len(memmap),
            0,
        ),
    )
    write_mptable(mem, vcpus)
    return LinuxBoot(entry, layout.PVH_START_INFO_ADDR)


def setup_protected_mode(sregs: Any, gdt: tuple[int, int]) -> None:
    """Fill `struct kvm_sregs` for 32-bit protected mode, paging off, flat segments (PVH)."""
    _segment(sregs.cs, layout.SEL_CODE32, code=True)
    sregs.cs.l, sregs.cs.db = 0, 1
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        _segment(seg, layout.SEL_DATA, code=False)
    sregs.gdt.base, sregs.gdt.limit = gdt
    sregs.idt.base, sregs.idt.limit = 0, 0
    sregs.cr0 = CR0_PE | CR0_ET
    sregs.cr3 = 0
    sregs.cr4 = 0
    sregs.efer = 0


def virtio_mmio_cmdline(devices: Sequence[BootDevice]) -> str:
    """`virtio_mmio.device=<size>@<base>:<irq>` tokens for Linux, one per device."""
    return " ".join(
        f"virtio_mmio.device={d.mmio_size >> 10}K@{d.mmio_base:#x}:{d.irq}" for d in devices
    )


# ----------------------------------------------------------------------------- Linux: bzImage

SETUP_HEADER_OFFSET = 0x1F1
BOOT_FLAG_MAGIC = 0xAA55
HDRS_MAGIC = b"HdrS"
MIN_BOOT_PROTOCOL = 0x020C  # 2.12: 64-bit entry (xloadflags) and 64-bit initrd fields
XLF_KERNEL_64 = 1 << 0
LOADED_HIGH = 1 << 0
CAN_USE_HEAP = 1 << 7
E820_TABLE_OFFSET = 0x2D0
E820_ENTRIES_OFFSET = 0x1E8
E820_MAX_ENTRIES = 128
BZIMAGE_64BIT_ENTRY_OFFSET = 0x200  # startup_64, from the protected-mode kernel's load address


# The 64-bit boot protocol wants __BOOT_CS = 0x10 (64-bit code) and __BOOT_DS = 0x18 (data),
# which is not the layout of our own GDT: the bzImage entry gets this one.
BZIMAGE_GDT = (0, 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF)
BOOT_CS, BOOT_DS = 0x10, 0x18


def setup_bzimage_long_mode(mem: GuestMemory, sregs: Any) -> None:
    """Long mode as the 64-bit boot protocol asks: identity paging, __BOOT_CS/__BOOT_DS."""
    mem.write(layout.BZIMAGE_GDT_ADDR, struct.pack("<4Q", *BZIMAGE_GDT))
    setup_long_mode(sregs, write_page_tables(mem), (layout.BZIMAGE_GDT_ADDR, 4 * 8 - 1))
    sregs.cs.selector = BOOT_CS
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        seg.selector = BOOT_DS


def load_linux_bzimage(
    mem: GuestMemory, bzimage: Path, *, cmdline: str, initrd: bytes | None
) -> LinuxBoot:
    """Load a bzImage for the Linux x86 64-bit boot protocol (Documentation/x86/boot.rst).

    The zero page gets the image's setup header, the e820 map, the command line and
    the initrd; the protected-mode kernel goes to 1 MiB; the entry is its 64-bit
    entry point (load address + 0x200), to be entered in long mode with identity
    paging and RSI = the zero page (`setup_bzimage_long_mode`; `LinuxBoot.start_info`
    here is that zero page).
    """
    data = Path(bzimage).read_bytes()

    def bad(why: str) -> MachineError:
        return MachineError(f"{bzimage}: not a bootable bzImage: {why}")

    if len(data) < 0x1000:
        raise bad("shorter than its setup header")
    if (
        struct.unpack_from("<H", data, 0x1FE)[0] != BOOT_FLAG_MAGIC
        or data[0x202:0x206] != HDRS_MAGIC
    ):
        raise bad("no boot sector / HdrS signature")
    version = struct.unpack_from("<H", data, 0x206)[0]
    if version < MIN_BOOT_PROTOCOL:
        raise bad(f"boot protocol {version >> 8}.{version & 0xFF} is older than 2.12")
    xloadflags = struct.unpack_from("<H", data, 0x236)[0]
    if not xloadflags & XLF_KERNEL_64:
        raise bad("it has no 64-bit entry point (XLF_KERNEL_64)")
    setup_sects = data[0x1F1] or 4
    kernel = data[(setup_sects + 1) * 512 :]
    header_end = 0x202 + data[0x201]  # the header's own length byte (jump offset) bounds it
    zero_page = bytearray(layout.PAGE_SIZE)
    zero_page[SETUP_HEADER_OFFSET:header_end] = data[SETUP_HEADER_OFFSET:header_end]
    encoded = cmdline.encode() + b"\0"
    if len(encoded) > layout.CMDLINE_MAX:
        raise MachineError(
            f"kernel command line is {len(encoded)} bytes; at most {layout.CMDLINE_MAX} fit"
        )
    mem.write(layout.CMDLINE_ADDR, encoded)
    struct.pack_into("<B", zero_page, 0x210, 0xFF)  # type_of_loader: undefined
    loadflags = data[0x211] | LOADED_HIGH | CAN_USE_HEAP
    struct.pack_into("<B", zero_page, 0x211, loadflags)
    struct.pack_into("<H", zero_page, 0x224, 0xDE00)  # heap_end_ptr
    struct.pack_into("<I", zero_page, 0x228, layout.CMDLINE_ADDR)  # cmd_line_ptr
    try:
        mem.write(layout.KERNEL_LOAD_ADDR, kernel)
    except GuestMemoryError:
        raise MachineError(
            f"{bzimage}: kernel of {len(kernel) >> 20} MiB does not fit in guest "
            f"RAM of {mem.size >> 20} MiB: give the machine more memory"
        ) from None
    if initrd:
        low_end = mem.regions[0].end
        addr = (low_end - len(initrd)) // layout.PAGE_SIZE * layout.PAGE_SIZE
        init_size = struct.unpack_from("<I", data, 0x260)[0]  # memory the kernel needs at 1 MiB
        if addr < layout.KERNEL_LOAD_ADDR + max(init_size, len(kernel)) + layout.MiB:
            raise MachineError(
                f"initrd of {len(initrd) >> 20} MiB does not fit above the kernel "
                f"in {low_end >> 20} MiB of RAM: give the machine more memory"
            )
        mem.write(addr, initrd)
        struct.pack_into("<II", zero_page, 0x218, addr, len(initrd))  # ramdisk_image, _size
    memmap = e820_map(mem)[:E820_MAX_ENTRIES]
    struct.pack_into("<B", zero_page, E820_ENTRIES_OFFSET, len(memmap))
    for i, (addr, size, kind) in enumerate(memmap):
        struct.pack_into("<QQI", zero_page, E820_TABLE_OFFSET + 20 * i, addr, size, kind)
    mem.write(layout.ZERO_PAGE_ADDR, bytes(zero_page))
    return LinuxBoot(layout.KERNEL_LOAD_ADDR + BZIMAGE_64BIT_ENTRY_OFFSET, layout.ZERO_PAGE_ADDR)
