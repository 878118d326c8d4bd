"""Guest RAM, and the one choke point through which every guest address passes.

A device, the boot code or the snapshot code never indexes a host buffer with
a number that came from the guest: it asks `GuestMemory` for a view of
``[gpa, gpa + length)``, which raises `GuestMemoryError` unless the whole range
lies inside one RAM region. That is the guarantee that nothing a guest writes
into a descriptor can make the host touch memory outside guest RAM.

This module also owns the two other things guest RAM needs:

- **Dirty tracking.** `DeviceMemory` records the pages a device writes from the host
  (KVM's dirty log sees only writes by the guest CPU); `DirtyPages` merges both into one
  bitmap per region, which diff snapshots and in-place resets consume.
  Model: vm-memory's src/bitmap/.
- **The lifetime rule for memory slots.** A KVM memory slot points at a region's host
  buffer by address (`host_address`), and KVM keeps that pointer until the slot is
  deleted or the VM fd is closed. So a `GuestMemory` that backs a VM's slots must stay
  mapped until *after* the VM fd is closed: close the VM first, then this (Machine's
  teardown does it in that order on the reaper thread). Unmapping earlier would let the
  kernel write guest pages into whatever the host maps there next.
  Model: Firecracker's vstate/memory.rs.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..errors import GuestMemoryError
from .layout import PAGE_SIZE, RamRegion, ram_regions

MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
PAGE_SHIFT = PAGE_SIZE.bit_length() - 1
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class GuestMemory:
    """Guest-physical RAM regions backed by host buffers (mmaps or, in tests, bytearrays)."""

    def __init__(self, regions: Sequence[RamRegion], buffers: Sequence[mmap.mmap | bytearray]):
        if len(regions) != len(buffers):
            raise ValueError("one buffer per RAM region")
        for region, buf in zip(regions, buffers, strict=True):
            if len(buf) != region.size:
                raise ValueError(f"buffer of {len(buf)} bytes for a region of {region.size}")
        self.regions: tuple[RamRegion, ...] = tuple(regions)
        self._buffers = list(buffers)
        self._views = [memoryview(b) for b in buffers]
        self._anchors: list[ctypes.Array[ctypes.c_char] | None] = [None] * len(buffers)

    @classmethod
    def anonymous(cls, mem_bytes: int, *, hugepages: bool = True) -> GuestMemory:
        """Fresh zeroed RAM: private anonymous mappings, no swap reservation, THP advised."""
        regions = ram_regions(mem_bytes)
        buffers = []
        for region in regions:
            buf = mmap.mmap(-1, region.size, flags=mmap.MAP_PRIVATE | MAP_NORESERVE)
            if hugepages and hasattr(mmap, "MADV_HUGEPAGE"):
                buf.madvise(mmap.MADV_HUGEPAGE)
            buffers.append(buf)
        return cls(regions, buffers)

    @classmethod
    def from_bytearray(cls, data: bytearray, gpa: int = 0) -> GuestMemory:
        """One region over a bytearray: guest memory for tests that need no KVM."""
        return cls([RamRegion(gpa, len(data))], [data])

    @property
    def size(self) -> int:
        """Total bytes of guest RAM."""
        return sum(r.size for r in self.regions)

    def buffer(self, index: int) -> mmap.mmap | bytearray:
        """The host buffer behind region `index` (snapshot and reset code work on whole regions)."""
        return self._buffers[index]

    def host_address(self, index: int) -> int:
        """Host virtual address of region `index`, for KVM memory slots.

        The buffer must stay mapped until the VM fd using it is closed (see the module
        docstring); `close()` must come after that.
        """
        if self._anchors[index] is None:
            self._anchors[index] = (ctypes.c_char * self.regions[index].size).from_buffer(
                self._buffers[index]
            )
        return ctypes.addressof(self._anchors[index])

    def locate(self, gpa: int, length: int) -> tuple[int, int]:
        """Return (region index, offset) of a range wholly inside one region, or raise."""
        if gpa < 0 or length < 0:
            raise GuestMemoryError(f"negative guest address or length: {gpa:#x}+{length:#x}")
        for i, region in enumerate(self.regions):
            if region.gpa <= gpa and gpa + length <= region.end:
                return i, gpa - region.gpa
        raise GuestMemoryError(
            f"guest range {gpa:#x}..{gpa + length:#x} ({length} bytes) is outside guest RAM "
            f"({', '.join(f'{r.gpa:#x}..{r.end:#x}' for r in self.regions)})"
        )

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of guest RAM; the range is checked first."""
        index, offset = self.locate(gpa, length)
        return self._views[index][offset : offset + length]

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.view(gpa, len(data))[:] = data

    def read_u16(self, gpa: int) -> int:
        return _U16.unpack(self.view(gpa, 2))[0]

    def read_u32(self, gpa: int) -> int:
        return _U32.unpack(self.view(gpa, 4))[0]

    def read_u64(self, gpa: int) -> int:
        return _U64.unpack(self.view(gpa, 8))[0]

    def write_u16(self, gpa: int, value: int) -> None:
        _U16.pack_into(self.view(gpa, 2), 0, value)

    def write_u32(self, gpa: int, value: int) -> None:
        _U32.pack_into(self.view(gpa, 4), 0, value)

    def write_u64(self, gpa: int, value: int) -> None:
        _U64.pack_into(self.view(gpa, 8), 0, value)

    def pages(self) -> int:
        return self.size // PAGE_SIZE

    def discard(self, gpa: int, length: int) -> None:
        """Give the host pages behind ``[gpa, gpa+length)`` back (page-aligned, inside one region).

        An mmap region gets ``MADV_DONTNEED``: its private copies are dropped, and the
        guest's next read sees what the mapping is *of* -- zeros for anonymous RAM, the
        snapshot file's bytes for RAM restored MAP_PRIVATE from one. A bytearray region
        (tests without KVM) is zero-filled, what anonymous RAM reads after the same call.
        Callers that track dirty pages must account for the changed content themselves
        (`SnapshotOrigin.discard`).
        """
        if gpa % PAGE_SIZE or length % PAGE_SIZE:
            raise ValueError(f"discard of {gpa:#x}+{length:#x} is not page-aligned")
        index, offset = self.locate(gpa, length)
        if not length:
            return
        buf = self._buffers[index]
        if isinstance(buf, mmap.mmap):
            buf.madvise(mmap.MADV_DONTNEED, offset, length)
        else:
            self._views[index][offset : offset + length] = bytes(length)

    def host_usage(self) -> MemoryUsage:
        """How much host memory this guest RAM holds now, from ``/proc/self/smaps``.

        Sums every mapping inside the regions' host ranges (bytearray regions count
        nothing: they are not mappings of their own).
        """
        ranges = [
            (self.host_address(i), self.host_address(i) + r.size)
            for i, r in enumerate(self.regions)
            if isinstance(self._buffers[i], mmap.mmap)
        ]
        return MemoryUsage.of_ranges(ranges)

    def close(self) -> None:
        """Unmap every region; views handed out earlier become invalid.

        Only after the VM fd whose memory slots point here is closed (the slot lifetime rule).
        """
        self._anchors = [None] * len(self._buffers)
        for v in self._views:
            v.release()
        self._views = []
        for buf in self._buffers:
            if isinstance(buf, mmap.mmap):
                # A caller still holding a view keeps the mapping alive; it is unmapped
                # when the last view goes (mmap's own finaliser), not leaked.
                with contextlib.suppress(BufferError):
                    buf.close()
        self._buffers = []


@dataclass(frozen=True)
class MemoryUsage:
    """Host memory behind some mappings, in bytes (``/proc/self/smaps`` fields).

    `rss`: resident pages, shared page-cache pages of a snapshot file included.
    `anonymous`: private pages (a guest's copy-on-write copies, or anonymous RAM it
    touched): what this VM costs the host beyond the page cache that VMs restored from
    one file share.
    """

    rss: int
    anonymous: int

    @classmethod
    def of_ranges(cls, ranges: Sequence[tuple[int, int]]) -> MemoryUsage:
        rss = anon = 0
        inside = False
        with open("/proc/self/smaps", encoding="ascii", errors="replace") as f:
            for line in f:
                head = line.split(None, 1)[0]
                if "-" in head and not head.endswith(":"):
                    lo, hi = (int(x, 16) for x in head.split("-"))
                    inside = any(start <= lo and hi <= end for start, end in ranges)
                elif inside and head == "Rss:":
                    rss += int(line.split()[1]) * 1024
                elif inside and head == "Anonymous:":
                    anon += int(line.split()[1]) * 1024
        return cls(rss, anon)


class PageWriter(Protocol):
    """Something that writes guest RAM from the host, which KVM's dirty log cannot see."""

    def written_pages(self) -> set[int]: ...  # guest page frame numbers (gpa // PAGE_SIZE)

    def clear_written_pages(self) -> None: ...


class DirtyPages:
    """The pages of each RAM region changed since the last `clear()`: by the guest or the host.

    Guest writes come from KVM's dirty log (`add_bitmap`, one bitmap per memory slot, which
    is one per region), host writes from the devices (`add_pages`, page frame numbers).
    One bitmap per region, bit i = page i, held as a Python int: OR-ing a KVM bitmap into
    it is one C loop whatever the RAM size, and counting is `int.bit_count`.
    """

    def __init__(self, regions: Sequence[RamRegion]) -> None:
        self.regions = tuple(regions)
        self._bits = [0] * len(self.regions)

    def add_bitmap(self, region: int, bitmap: bytes) -> None:
        """OR in a little-endian bitmap of region `region` (KVM_GET_DIRTY_LOG's layout)."""
        self._bits[region] |= int.from_bytes(bitmap, "little")

    def add_pages(self, pfns: Iterable[int]) -> None:
        """Mark guest page frame numbers (gpa // PAGE_SIZE); ones outside RAM are ignored."""
        for pfn in pfns:
            gpa = pfn << PAGE_SHIFT
            for index, region in enumerate(self.regions):
                if region.gpa <= gpa < region.end:
                    self._bits[index] |= 1 << ((gpa - region.gpa) >> PAGE_SHIFT)
                    break

    def any(self, region: int) -> bool:
        return self._bits[region] != 0

    def set_range(self, region: int, first: int, count: int, marked: int = 0) -> None:
        """Make pages ``first .. first+count-1`` of `region` marked exactly where `marked`
        (a bitmap like this one's, bit i = page i) is set; other pages are left alone."""
        mask = ((1 << count) - 1) << first
        self._bits[region] = self._bits[region] & ~mask | marked & mask

    def bits(self) -> list[int]:
        """Per region, the marked pages as an int (bit i = page i): a copy."""
        return list(self._bits)

    def count(self) -> int:
        """How many pages are marked, over every region."""
        return sum(bits.bit_count() for bits in self._bits)

    def bitmap(self, region: int, *, word_aligned: bool = False) -> bytes:
        """Region `region`'s bitmap as bytes: one bit per page, or padded to whole u64 words
        (what the C core's bitmap walkers read) with `word_aligned`."""
        pages = self.regions[region].size // PAGE_SIZE
        length = (pages + 63) // 64 * 8 if word_aligned else (pages + 7) // 8
        return self._bits[region].to_bytes(length, "little")

    def clear(self) -> None:
        self._bits = [0] * len(self.regions)


class DeviceMemory:
    """Guest memory as a device sees it: bounds-checked and write-tracked.

    Wraps the one `GuestMemory` choke point and adds the set of guest page
    frame numbers the device has written, which a diff snapshot must include
    because KVM's dirty log cannot see host-side writes. One instance per
    transport; it outlives device resets so no write is ever forgotten before
    the VMM collects it with `written_pages` / `clear_written_pages`.

    `resolve` is the fast path the queue uses: it bounds-checks a range once
    (through `GuestMemory.locate`) and returns the region's host buffer and
    offset, which the caller may then index only *within that range*.
    """

    __slots__ = ("_buffers", "guest", "written")

    def __init__(self, guest: GuestMemory) -> None:
        self.guest = guest
        self._buffers = tuple(guest.buffer(i) for i in range(len(guest.regions)))
        #: Page frame numbers written since the last clear. The virtqueue's used-ring
        #: hot path adds to it directly (one set.add, no call); everyone else marks ranges.
        self.written: set[int] = set()

    # -- dirty page tracking -------------------------------------------------
    def mark_written(self, gpa: int, length: int) -> None:
        """Record that the device wrote ``[gpa, gpa+length)`` by other means than this class."""
        if length <= 0:
            return
        first = gpa >> PAGE_SHIFT
        last = (gpa + length - 1) >> PAGE_SHIFT
        if first == last:
            self.written.add(first)
        else:
            self.written.update(range(first, last + 1))

    def written_pages(self) -> set[int]:
        """Guest page frame numbers (gpa // 4096) written by the device since the last clear."""
        return set(self.written)

    def clear_written_pages(self) -> None:
        """Forget the recorded pages (the VMM calls this once a diff snapshot captured them)."""
        self.written.clear()

    # -- access ----------------------------------------------------------------
    def resolve(self, gpa: int, length: int) -> tuple[mmap.mmap | bytearray, int]:
        """(host buffer, offset) of a range inside one RAM region; `GuestMemoryError` if not."""
        index, offset = self.guest.locate(gpa, length)
        return self._buffers[index], offset

    def check(self, gpa: int, length: int) -> None:
        """Raise `GuestMemoryError` unless ``[gpa, gpa+length)`` is guest RAM."""
        self.guest.locate(gpa, length)

    def read(self, gpa: int, length: int) -> bytes:
        return self.guest.read(gpa, length)

    def read_view(self, gpa: int, length: int) -> memoryview:
        """A view to read from; do not write through it (use `write_view` for that)."""
        return self.guest.view(gpa, length)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.guest.write(gpa, data)
        self.mark_written(gpa, len(data))

    def write_view(self, gpa: int, length: int) -> memoryview:
        """A view the device will write into; the pages are recorded as written now."""
        view = self.guest.view(gpa, length)
        self.mark_written(gpa, length)
        return view

    def read_u16(self, gpa: int) -> int:
        return self.guest.read_u16(gpa)

    def write_u16(self, gpa: int, value: int) -> None:
        self.guest.write_u16(gpa, value)
        self.mark_written(gpa, 2)
