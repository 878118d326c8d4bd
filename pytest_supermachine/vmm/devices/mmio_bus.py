"""Address-space buses: which device answers an MMIO or port-I/O access.

The C run loop looks an access up in its region table (kept in step with these
buses) and calls back into Python only for regions owned by Python devices.
Regions never overlap: registering one that does raises `DeviceLayoutError`.
An exception in a device stops the machine with an error (it is a VMM bug, not
something to hide), and the machine re-raises it from `wait()`.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ...errors import DeviceLayoutError
from .._native import ffi, lib


class BusDevice(Protocol):
    """What a device on a bus implements: accesses at offsets inside its region."""

    def read(self, offset: int, size: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...


@dataclass(frozen=True)
class BusRegion:
    base: int
    size: int
    device: BusDevice
    token: int

    @property
    def end(self) -> int:
        return self.base + self.size


class MmioBus:
    """Non-overlapping regions of one address space (MMIO or port I/O)."""

    def __init__(
        self,
        name: str,
        on_add: Callable[[int, int, int], None] | None = None,
        on_remove: Callable[[int], None] | None = None,
    ):
        self.name = name
        self._regions: list[BusRegion] = []
        self._by_token: dict[int, BusRegion] = {}
        self._next_token = 1
        self._on_add = on_add
        self._on_remove = on_remove

    def register(self, base: int, size: int, device: BusDevice) -> BusRegion:
        if size <= 0 or base < 0:
            raise DeviceLayoutError(f"{self.name}: bad region {base:#x}+{size:#x}")
        i = bisect.bisect_left([r.base for r in self._regions], base)
        for neighbour in self._regions[max(i - 1, 0) : i + 1]:
            if base < neighbour.end and neighbour.base < base + size:
                raise DeviceLayoutError(
                    f"{self.name}: {type(device).__name__} at {base:#x}..{base + size:#x} overlaps "
                    f"{type(neighbour.device).__name__} at {neighbour.base:#x}..{neighbour.end:#x}"
                )
        region = BusRegion(base, size, device, self._next_token)
        self._next_token += 1
        if self._on_add:
            self._on_add(base, size, region.token)
        self._regions.insert(i, region)
        self._by_token[region.token] = region
        return region

    def unregister(self, base: int) -> None:
        for i, r in enumerate(self._regions):
            if r.base == base:
                if self._on_remove:
                    self._on_remove(base)
                del self._regions[i]
                del self._by_token[r.token]
                return
        raise DeviceLayoutError(f"{self.name}: no region at {base:#x}")

    def find(self, addr: int) -> BusRegion | None:
        i = bisect.bisect_right([r.base for r in self._regions], addr) - 1
        if i >= 0 and addr < self._regions[i].end:
            return self._regions[i]
        return None

    def region(self, token: int) -> BusRegion:
        return self._by_token[token]

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(self._regions))


class DeviceBuses:
    """The MMIO and port-I/O buses of one machine, and the C→Python dispatch for them."""

    def __init__(self) -> None:
        self._vm: Any = ffi.NULL
        self.mmio = MmioBus(
            "mmio", self._adder(lib.SM_SPACE_MMIO), self._remover(lib.SM_SPACE_MMIO)
        )
        self.pio = MmioBus("pio", self._adder(lib.SM_SPACE_PIO), self._remover(lib.SM_SPACE_PIO))
        self.error: BaseException | None = None
        self.handle = ffi.new_handle(self)

    def attach(self, core_vm: Any) -> None:
        """Bind to the C machine whose region table these buses keep (before any register)."""
        self._vm = core_vm

    def _adder(self, space: int) -> Callable[[int, int, int], None]:
        def add(base: int, size: int, token: int) -> None:
            rc = lib.sm_vm_add_io_region(self._vm, space, base, size, token)
            if rc < 0:
                raise DeviceLayoutError(f"C core refused region {base:#x}+{size:#x} (errno {-rc})")

        return add

    def _remover(self, space: int) -> Callable[[int], None]:
        def remove(base: int) -> None:
            lib.sm_vm_remove_io_region(self._vm, space, base)

        return remove

    def dispatch(
        self, token: int, space: int, offset: int, data: Any, length: int, is_write: int
    ) -> int:
        bus = self.mmio if space == lib.SM_SPACE_MMIO else self.pio
        device = bus.region(token).device
        if is_write:
            device.write(offset, bytes(ffi.buffer(data, length)))
        else:
            value = device.read(offset, length)
            if len(value) != length:
                raise ValueError(
                    f"{type(device).__name__}.read returned {len(value)} bytes, not {length}"
                )
            ffi.memmove(data, value, length)
        return 0


@ffi.def_extern()
def sm_py_io(
    handle: Any, token: int, space: int, addr: int, data: Any, length: int, is_write: int
) -> int:
    buses: DeviceBuses = ffi.from_handle(handle)
    try:
        return buses.dispatch(token, space, addr, data, length, is_write)
    except BaseException as e:  # a device bug: stop the machine, re-raise from wait()
        if buses.error is None:
            buses.error = e
        return -1
