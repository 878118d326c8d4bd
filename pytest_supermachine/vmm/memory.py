"""Guest RAM, and the one choke point through which every guest address passes.

A device, the boot code or the snapshot code never indexes a host buffer with
a number that came from the guest: it asks `GuestMemory` for a view of
``[gpa, gpa + length)``, which raises `GuestMemoryError` unless the whole range
lies inside one RAM region. That is the guarantee that nothing a guest writes
into a descriptor can make the host touch memory outside guest RAM.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import struct
from collections.abc import Sequence

from ..errors import GuestMemoryError
from .layout import PAGE_SIZE, RamRegion, ram_regions

MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
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
        """Host virtual address of region `index`, for KVM memory slots."""
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

    def close(self) -> None:
        """Unmap every region; views handed out earlier become invalid."""
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
