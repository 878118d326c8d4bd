"""A host-side virtio driver for tests: plays the guest against a device, no KVM needed.

It does what a guest's virtio-mmio driver does, byte for byte, over a
`GuestMemory` (usually ``GuestMemory.from_bytearray(bytearray(1 << 20))``):
register reads and writes through `VirtioMmioTransport.read`/`write`,
descriptor tables and avail/used rings laid out in guest memory, kicks via
the QueueNotify register (or `transport.notify`, the ioeventfd path).

Device-agnostic on purpose: the blk tests and the vsock tests both use it.
Raw helpers (`DriverQueue.write_desc`, `publish`, `set_avail_idx`, ...) let
hostile tests put the rings in states no real driver would.

Typical use::

    mem = GuestMemory.from_bytearray(bytearray(1 << 20))
    transport = VirtioMmioTransport(device, mem)
    drv = VirtioMmioDriver(transport, mem)
    drv.init()                       # reset, ACK, DRIVER, features, FEATURES_OK
    q = drv.setup_queue(0)
    drv.driver_ok()
    req = q.submit([header], [512, 1])   # readable bytes, writable lengths
    q.kick()
    (head, length), = q.used()
    data = req.written()
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from pytest_supermachine.vmm.devices.virtio.device import (
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VIRTIO_F_VERSION_1,
)
from pytest_supermachine.vmm.devices.virtio.mmio import (
    CONFIG_SPACE,
    REG_DEVICE_FEATURES,
    REG_DEVICE_FEATURES_SEL,
    REG_DRIVER_FEATURES,
    REG_DRIVER_FEATURES_SEL,
    REG_INTERRUPT_ACK,
    REG_INTERRUPT_STATUS,
    REG_QUEUE_DESC_HIGH,
    REG_QUEUE_DESC_LOW,
    REG_QUEUE_DEVICE_HIGH,
    REG_QUEUE_DEVICE_LOW,
    REG_QUEUE_DRIVER_HIGH,
    REG_QUEUE_DRIVER_LOW,
    REG_QUEUE_NOTIFY,
    REG_QUEUE_NUM,
    REG_QUEUE_NUM_MAX,
    REG_QUEUE_READY,
    REG_QUEUE_SEL,
    REG_STATUS,
    VirtioMmioTransport,
)
from pytest_supermachine.vmm.devices.virtio.queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)
from pytest_supermachine.vmm.memory import GuestMemory

_DESC = struct.Struct("<QIHH")
_USED = struct.Struct("<II")

__all__ = ["DriverQueue", "GuestAllocator", "Request", "VirtioMmioDriver"]


class GuestAllocator:
    """Bump allocator over a range of guest memory (rings, tables, data buffers)."""

    def __init__(self, start: int, end: int) -> None:
        self.start, self.end, self.next = start, end, start

    def alloc(self, size: int, align: int = 16) -> int:
        gpa = -(-self.next // align) * align
        if gpa + size > self.end:
            raise MemoryError(f"test guest heap exhausted ({size} bytes at {gpa:#x})")
        self.next = gpa + size
        return gpa

    def checkpoint(self) -> int:
        return self.next

    def rewind(self, checkpoint: int) -> None:
        self.next = checkpoint


@dataclass
class Request:
    """One chain the driver made available: where its buffers are in guest memory."""

    head: int
    readable: list[tuple[int, int]]
    writable: list[tuple[int, int]]
    memory: GuestMemory = field(repr=False)
    descriptors: list[int] = field(default_factory=list)

    def written(self) -> bytes:
        """The device-writable buffers' current content, concatenated."""
        return b"".join(self.memory.read(gpa, n) for gpa, n in self.writable)


class DriverQueue:
    """The driver's side of one split virtqueue laid out in guest memory."""

    def __init__(
        self,
        memory: GuestMemory,
        alloc: GuestAllocator,
        index: int,
        size: int,
        driver: VirtioMmioDriver | None = None,
    ) -> None:
        """Allocate the rings; `driver` (for `kick`) may be None when a test drives a
        `VirtQueue` directly."""
        self.driver = driver
        self.memory = memory
        self.alloc = alloc
        self.index = index
        self.size = size
        self.desc = self.alloc.alloc(16 * size, 16)
        self.avail = self.alloc.alloc(6 + 2 * size, 2)
        self.used_addr = self.alloc.alloc(6 + 8 * size, 4)
        self.avail_idx = 0  # driver's next avail idx (free-running u16)
        self.last_used = 0  # next used idx the driver will consume
        self.free = list(range(size))
        self.outstanding: dict[int, Request] = {}

    # -- raw ring access (hostile tests use these directly) ------------------------------
    def write_desc(
        self,
        i: int,
        addr: int,
        length: int,
        flags: int = 0,
        next_: int = 0,
        *,
        table: int | None = None,
    ) -> None:
        base = self.desc if table is None else table
        self.memory.write(base + 16 * i, _DESC.pack(addr, length, flags, next_))

    def publish(self, head: int) -> None:
        """Put `head` in the avail ring and bump avail idx (what a driver does per chain)."""
        self.memory.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.set_avail_idx(self.avail_idx + 1)

    def set_avail_idx(self, value: int) -> None:
        self.avail_idx = value & 0xFFFF
        self.memory.write_u16(self.avail + 2, self.avail_idx)

    def set_avail_flags(self, flags: int) -> None:
        self.memory.write_u16(self.avail, flags)

    def set_used_event(self, value: int) -> None:
        """``used_event`` (event idx): interrupt me when the used idx passes `value`."""
        self.memory.write_u16(self.avail + 4 + 2 * self.size, value & 0xFFFF)

    def avail_event(self) -> int:
        """``avail_event`` as published by the device."""
        return self.memory.read_u16(self.used_addr + 4 + 8 * self.size)

    def used_idx(self) -> int:
        return self.memory.read_u16(self.used_addr + 2)

    def used_flags(self) -> int:
        return self.memory.read_u16(self.used_addr)

    # -- high level ----------------------------------------------------------------------
    def submit(
        self,
        readable: Sequence[bytes],
        writable: Sequence[int],
        *,
        indirect: bool = False,
        publish: bool = True,
    ) -> Request:
        """Lay out one chain (readable buffers with content, then writable buffers of
        the given lengths, pre-filled with 0xAA), optionally through an indirect table,
        and make it available."""
        mem = self.memory
        bufs: list[tuple[int, int, int]] = []
        readable_b: list[tuple[int, int]] = []
        writable_b: list[tuple[int, int]] = []
        for data in readable:
            gpa = self.alloc.alloc(max(len(data), 1))
            mem.write(gpa, data)
            bufs.append((gpa, len(data), 0))
            readable_b.append((gpa, len(data)))
        for n in writable:
            gpa = self.alloc.alloc(max(n, 1))
            mem.write(gpa, b"\xaa" * n)
            bufs.append((gpa, n, VIRTQ_DESC_F_WRITE))
            writable_b.append((gpa, n))
        if indirect:
            table = self.alloc.alloc(16 * len(bufs), 16)
            for i, (gpa, n, flags) in enumerate(bufs):
                last = i == len(bufs) - 1
                self.write_desc(
                    i, gpa, n, flags | (0 if last else VIRTQ_DESC_F_NEXT), i + 1, table=table
                )
            head = self._take(1)[0]
            self.write_desc(head, table, 16 * len(bufs), VIRTQ_DESC_F_INDIRECT)
            descs = [head]
        else:
            descs = self._take(len(bufs))
            for i, (gpa, n, flags) in enumerate(bufs):
                last = i == len(bufs) - 1
                nxt = 0 if last else descs[i + 1]
                self.write_desc(descs[i], gpa, n, flags | (0 if last else VIRTQ_DESC_F_NEXT), nxt)
            head = descs[0]
        req = Request(head, readable_b, writable_b, mem, descs)
        self.outstanding[head] = req
        if publish:
            self.publish(head)
        return req

    def _take(self, n: int) -> list[int]:
        if n > len(self.free):
            raise RuntimeError(f"queue {self.index}: {n} descriptors wanted, {len(self.free)} free")
        taken, self.free = self.free[:n], self.free[n:]
        return taken

    def kick(self, *, via_ioeventfd: bool = False) -> None:
        """Notify the device: a QueueNotify register write, or the ioeventfd path."""
        if self.driver is None:
            raise RuntimeError("this queue has no driver/transport to kick")
        if via_ioeventfd:
            self.driver.transport.notify(self.index)
        else:
            self.driver.write32(REG_QUEUE_NOTIFY, self.index)

    def used(self) -> list[tuple[int, int]]:
        """Consume the used elements the device added since the last call; free their descriptors."""
        out = []
        idx = self.used_idx()
        while self.last_used != idx:
            slot = self.used_addr + 4 + 8 * (self.last_used % self.size)
            head, length = _USED.unpack(self.memory.read(slot, 8))
            out.append((head, length))
            req = self.outstanding.pop(head, None)
            if req is not None:
                self.free.extend(req.descriptors)
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out


class VirtioMmioDriver:
    """The guest driver's register-level view of one virtio-mmio device."""

    def __init__(
        self,
        transport: VirtioMmioTransport,
        memory: GuestMemory,
        *,
        heap: tuple[int, int] | None = None,
    ) -> None:
        self.transport = transport
        self.memory = memory
        start, end = heap or (0x1000, memory.regions[0].end)
        self.alloc = GuestAllocator(start, end)
        self.interrupts = 0
        self.queues: dict[int, DriverQueue] = {}
        self.features = 0
        transport.set_interrupt(self._on_interrupt)

    def _on_interrupt(self) -> None:
        self.interrupts += 1

    # -- registers -----------------------------------------------------------------------
    def read32(self, offset: int) -> int:
        return struct.unpack("<I", self.transport.read(offset, 4))[0]

    def write32(self, offset: int, value: int) -> None:
        self.transport.write(offset, struct.pack("<I", value & 0xFFFF_FFFF))

    def read_config(self, offset: int, size: int) -> bytes:
        return self.transport.read(CONFIG_SPACE + offset, size)

    @property
    def status(self) -> int:
        return self.read32(REG_STATUS)

    def set_status(self, bits: int) -> None:
        """OR `bits` into Status, as Linux's ``virtio_add_status`` does."""
        self.write32(REG_STATUS, self.status | bits)

    def device_features(self) -> int:
        self.write32(REG_DEVICE_FEATURES_SEL, 0)
        low = self.read32(REG_DEVICE_FEATURES)
        self.write32(REG_DEVICE_FEATURES_SEL, 1)
        return low | self.read32(REG_DEVICE_FEATURES) << 32

    def write_driver_features(self, features: int) -> None:
        for sel in (0, 1):
            self.write32(REG_DRIVER_FEATURES_SEL, sel)
            self.write32(REG_DRIVER_FEATURES, features >> (32 * sel))

    def interrupt_status(self) -> int:
        return self.read32(REG_INTERRUPT_STATUS)

    def ack_interrupts(self) -> int:
        """Read and acknowledge InterruptStatus, like an interrupt handler; returns the bits."""
        bits = self.interrupt_status()
        if bits:
            self.write32(REG_INTERRUPT_ACK, bits)
        return bits

    # -- initialisation (virtio 1.x, 3.1.1) --------------------------------------------------
    def init(self, features: int | None = None, *, exclude: int = 0) -> int:
        """Reset, ACKNOWLEDGE, DRIVER, accept `features` (default: all offered minus
        `exclude`), FEATURES_OK. Returns the accepted features; raises if the device
        refused them (FEATURES_OK did not stick)."""
        self.write32(REG_STATUS, 0)
        self.queues.clear()
        self.set_status(STATUS_ACKNOWLEDGE)
        self.set_status(STATUS_DRIVER)
        offered = self.device_features()
        if features is None:
            features = offered & ~exclude
        self.write_driver_features(features)
        self.set_status(STATUS_FEATURES_OK)
        if not self.status & STATUS_FEATURES_OK:
            raise RuntimeError(f"device refused features {features:#x} (offered {offered:#x})")
        self.features = features
        return features

    def has_feature(self, bit: int) -> bool:
        return bool(self.features >> bit & 1)

    def setup_queue(self, index: int, size: int | None = None) -> DriverQueue:
        """Select queue `index`, size it (default: QueueNumMax), place its rings, set ready."""
        self.write32(REG_QUEUE_SEL, index)
        max_size = self.read32(REG_QUEUE_NUM_MAX)
        if max_size == 0:
            raise RuntimeError(f"queue {index} does not exist")
        size = size or max_size
        q = DriverQueue(self.memory, self.alloc, index, size, self)
        self.write32(REG_QUEUE_NUM, size)
        self.write_queue_addresses(q.desc, q.avail, q.used_addr)
        self.write32(REG_QUEUE_READY, 1)
        self.queues[index] = q
        return q

    def write_queue_addresses(self, desc: int, avail: int, used: int) -> None:
        """Program the selected queue's three addresses (64-bit, as low/high pairs)."""
        for low, high, value in (
            (REG_QUEUE_DESC_LOW, REG_QUEUE_DESC_HIGH, desc),
            (REG_QUEUE_DRIVER_LOW, REG_QUEUE_DRIVER_HIGH, avail),
            (REG_QUEUE_DEVICE_LOW, REG_QUEUE_DEVICE_HIGH, used),
        ):
            self.write32(low, value)
            self.write32(high, value >> 32)

    def driver_ok(self) -> None:
        self.set_status(STATUS_DRIVER_OK)


def version_1() -> int:
    """Just ``VIRTIO_F_VERSION_1``: the minimum a modern driver must accept."""
    return 1 << VIRTIO_F_VERSION_1
