"""Split virtqueues (virtio 1.x, section 2.7) and the device side of guest memory access.

A virtqueue is three guest-memory areas the driver owns: the descriptor table,
the available ring and the used ring. Everything in them is hostile input.
This module guarantees:

* Every guest address and length goes through `GuestMemory` (via
  `DeviceMemory`), which bounds-checks it against guest RAM; the queue never
  indexes a host buffer with a guest number.
* A malformed queue (descriptor loop, chain longer than the queue, indirect
  table inside an indirect table, next index out of range, zero length,
  buffer outside RAM, avail index that jumps by more than the queue size, a
  misaligned or out-of-RAM ring) raises `VirtQueueError`, which the transport
  turns into ``DEVICE_NEEDS_RESET``. Nothing else is raised for guest input.
* Every byte the device writes into guest memory (used ring, ``avail_event``,
  request data) is recorded by page frame number, because the KVM dirty log
  only sees writes made by the guest CPU and diff snapshots need both.

Layout of the rings (all little endian)::

    descriptor i  @ desc + 16*i:   u64 addr, u32 len, u16 flags, u16 next
    avail         @ driver:        u16 flags, u16 idx, u16 ring[size], u16 used_event
    used          @ device:        u16 flags, u16 idx, {u32 id, u32 len}[size], u16 avail_event
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from ....errors import GuestMemoryError, SupermachineError
from ...layout import PAGE_SIZE
from ...memory import GuestMemory

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

VIRTQ_DESC_SIZE = 16
VIRTQ_USED_ELEM_SIZE = 8
#: Largest queue the transport will let a device advertise (virtio limit for split rings).
VIRTQ_MAX_SIZE = 32768

_PAGE_SHIFT = PAGE_SIZE.bit_length() - 1
_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")
_U16 = struct.Struct("<H")
_U32_MAX = 0xFFFF_FFFF


class VirtQueueError(SupermachineError):
    """The driver put the queue in a state no correct driver produces.

    The transport answers it by setting ``DEVICE_NEEDS_RESET`` and raising a
    configuration-change interrupt; the device stops using the queue until the
    driver resets it.
    """


class DeviceMemory:
    """Guest memory as a device sees it: bounds-checked and write-tracked.

    Wraps the one `GuestMemory` choke point and adds the set of guest page
    frame numbers the device has written, which a diff snapshot must include
    because KVM's dirty log cannot see host-side writes. One instance per
    transport; it outlives device resets so no write is ever forgotten before
    the VMM collects it with `written_pages` / `clear_written_pages`.
    """

    __slots__ = ("_written", "guest")

    def __init__(self, guest: GuestMemory) -> None:
        self.guest = guest
        self._written: set[int] = set()

    # -- dirty page tracking -------------------------------------------------
    def _record(self, gpa: int, length: int) -> None:
        if length <= 0:
            return
        first = gpa >> _PAGE_SHIFT
        last = (gpa + length - 1) >> _PAGE_SHIFT
        if first == last:
            self._written.add(first)
        else:
            self._written.update(range(first, last + 1))

    def written_pages(self) -> set[int]:
        """Guest page frame numbers (gpa // 4096) written by the device since the last clear."""
        return set(self._written)

    def clear_written_pages(self) -> None:
        """Forget the recorded pages (the VMM calls this once a diff snapshot captured them)."""
        self._written.clear()

    # -- access ----------------------------------------------------------------
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
        self._record(gpa, len(data))

    def write_view(self, gpa: int, length: int) -> memoryview:
        """A view the device will write into; the pages are recorded as written now."""
        view = self.guest.view(gpa, length)
        self._record(gpa, length)
        return view

    def read_u16(self, gpa: int) -> int:
        return self.guest.read_u16(gpa)

    def write_u16(self, gpa: int, value: int) -> None:
        self.guest.write_u16(gpa, value)
        self._record(gpa, 2)


class DescriptorChain:
    """One request popped from the available ring, as guest buffers.

    `readable` are the device-readable ``(gpa, len)`` buffers, in order,
    followed by the device-writable ones in `writable` (the virtio spec
    requires readable before writable). Every buffer was checked to lie in
    guest RAM when the chain was popped; the byte helpers below still go
    through `DeviceMemory`, so a write can never land outside RAM even if
    guest memory was re-laid out meanwhile.
    """

    __slots__ = ("head", "memory", "readable", "readable_len", "writable", "writable_len")

    def __init__(
        self,
        head: int,
        memory: DeviceMemory,
        readable: list[tuple[int, int]],
        writable: list[tuple[int, int]],
    ) -> None:
        self.head = head
        self.memory = memory
        self.readable = readable
        self.writable = writable
        self.readable_len = sum(n for _, n in readable)
        self.writable_len = sum(n for _, n in writable)

    def __repr__(self) -> str:
        return (
            f"DescriptorChain(head={self.head}, readable={self.readable}, writable={self.writable})"
        )

    def read(self, offset: int = 0, length: int | None = None) -> bytes:
        """Bytes ``[offset, offset+length)`` of the readable stream (clipped to its end)."""
        if length is None:
            length = self.readable_len - offset
        return b"".join(bytes(v) for v in self._slices(self.readable, offset, length, write=False))

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Write `data` at `offset` of the writable stream; returns bytes written (clipped)."""
        src = memoryview(data).cast("B")
        done = 0
        for view in self._slices(self.writable, offset, len(src), write=True):
            n = len(view)
            view[:] = src[done : done + n]
            done += n
        return done

    def writable_views(self, offset: int, length: int) -> list[memoryview]:
        """Views over ``[offset, offset+length)`` of the writable stream, recorded as written.

        For zero-copy fills (``os.preadv``); clipped to the writable stream.
        """
        return list(self._slices(self.writable, offset, length, write=True))

    def _slices(
        self, buffers: list[tuple[int, int]], offset: int, length: int, *, write: bool
    ) -> Iterable[memoryview]:
        if offset < 0 or length <= 0:
            return
        mem = self.memory
        for gpa, size in buffers:
            if offset >= size:
                offset -= size
                continue
            n = min(size - offset, length)
            yield mem.write_view(gpa + offset, n) if write else mem.read_view(gpa + offset, n)
            length -= n
            offset = 0
            if length == 0:
                return


@dataclass
class QueueState:
    """Everything a virtqueue remembers, for snapshots. The rings themselves live in guest RAM."""

    max_size: int
    size: int
    ready: bool
    desc_addr: int
    avail_addr: int
    used_addr: int
    next_avail: int
    next_used: int
    event_idx: bool
    indirect: bool
    signalled_used: int | None

    #: Not a field (no annotation): the fixed binary layout of `to_bytes`.
    _FORMAT = struct.Struct("<HHBQQQHHBBBH")

    def to_dict(self) -> dict[str, int | bool | None]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> QueueState:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})

    def to_bytes(self) -> bytes:
        """A fixed 38-byte little-endian record (format version is the snapshot's job)."""
        return self._FORMAT.pack(
            self.max_size,
            self.size,
            int(self.ready),
            self.desc_addr,
            self.avail_addr,
            self.used_addr,
            self.next_avail,
            self.next_used,
            int(self.event_idx),
            int(self.indirect),
            int(self.signalled_used is not None),
            self.signalled_used or 0,
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> QueueState:
        if len(data) != cls._FORMAT.size:
            raise ValueError(f"queue state is {cls._FORMAT.size} bytes, got {len(data)}")
        (mx, size, ready, desc, avail, used, na, nu, ev, ind, has_sig, sig) = cls._FORMAT.unpack(
            data
        )
        return cls(
            max_size=mx,
            size=size,
            ready=bool(ready),
            desc_addr=desc,
            avail_addr=avail,
            used_addr=used,
            next_avail=na,
            next_used=nu,
            event_idx=bool(ev),
            indirect=bool(ind),
            signalled_used=sig if has_sig else None,
        )


class VirtQueue:
    """The device side of one split virtqueue.

    Lifecycle: the transport sets `size` and the three addresses from the
    driver's register writes, sets `ready`, and at ``DRIVER_OK`` calls
    `activate` (validates the rings against guest RAM and binds the memory).
    The device then loops ``pop()`` → do the work → ``add_used()`` and finally
    asks `needs_notification` whether to interrupt the driver.

    `next_avail` and `next_used` are free-running 16-bit counters, as in the
    spec; all index arithmetic is modulo 2**16.
    """

    __slots__ = (
        "_avail_event_addr",
        "_avail_idx_addr",
        "_avail_ring",
        "_desc",
        "_memory",
        "_used_event_addr",
        "_used_idx_addr",
        "_used_ring",
        "avail_addr",
        "desc_addr",
        "event_idx",
        "indirect",
        "max_size",
        "next_avail",
        "next_used",
        "ready",
        "signalled_used",
        "size",
        "used_addr",
    )

    def __init__(self, max_size: int) -> None:
        if not 1 <= max_size <= VIRTQ_MAX_SIZE or max_size & (max_size - 1):
            raise ValueError(f"queue max size must be a power of two in 1..{VIRTQ_MAX_SIZE}")
        self.max_size = max_size
        self._memory: DeviceMemory | None = None
        self.reset()

    # -- configuration (driven by the transport) ------------------------------
    def reset(self) -> None:
        """Back to the state after device reset: not ready, no addresses, size = max."""
        self.size = self.max_size
        self.ready = False
        self.desc_addr = 0
        self.avail_addr = 0
        self.used_addr = 0
        self.next_avail = 0
        self.next_used = 0
        self.event_idx = False
        self.indirect = False
        self.signalled_used: int | None = None
        self._memory = None

    def validate(self, memory: GuestMemory | DeviceMemory) -> None:
        """Check size, alignment and that all three areas are guest RAM; raise `VirtQueueError`."""
        size = self.size
        if not 1 <= size <= self.max_size or size & (size - 1):
            raise VirtQueueError(f"queue size {size} is not a power of two in 1..{self.max_size}")
        guest = memory.guest if isinstance(memory, DeviceMemory) else memory
        for name, addr, align, length in (
            ("descriptor table", self.desc_addr, 16, VIRTQ_DESC_SIZE * size),
            ("available ring", self.avail_addr, 2, 6 + 2 * size),
            ("used ring", self.used_addr, 4, 6 + VIRTQ_USED_ELEM_SIZE * size),
        ):
            if addr % align:
                raise VirtQueueError(f"{name} at {addr:#x} is not {align}-byte aligned")
            try:
                guest.locate(addr, length)
            except GuestMemoryError as e:
                raise VirtQueueError(f"{name} is not in guest RAM: {e}") from None

    def activate(self, memory: DeviceMemory, *, event_idx: bool, indirect: bool) -> None:
        """Validate the rings and bind guest memory; `event_idx`/`indirect` are negotiated features."""
        self.event_idx = event_idx
        self.indirect = indirect
        self.bind(memory)

    def bind(self, memory: DeviceMemory) -> None:
        """Validate the rings (`VirtQueueError` if bad) and start using `memory`."""
        self.validate(memory)
        self._bind(memory)

    def deactivate(self) -> None:
        """Stop using guest memory; configuration and indices are kept (for `state`)."""
        self._memory = None

    def _bind(self, memory: DeviceMemory) -> None:
        size = self.size
        self._memory = memory
        self._desc = self.desc_addr
        self._avail_idx_addr = self.avail_addr + 2
        self._avail_ring = self.avail_addr + 4
        self._used_event_addr = self.avail_addr + 4 + 2 * size
        self._used_idx_addr = self.used_addr + 2
        self._used_ring = self.used_addr + 4
        self._avail_event_addr = self.used_addr + 4 + VIRTQ_USED_ELEM_SIZE * size

    @property
    def active(self) -> bool:
        return self._memory is not None

    # -- snapshot --------------------------------------------------------------
    def state(self) -> QueueState:
        return QueueState(
            max_size=self.max_size,
            size=self.size,
            ready=self.ready,
            desc_addr=self.desc_addr,
            avail_addr=self.avail_addr,
            used_addr=self.used_addr,
            next_avail=self.next_avail,
            next_used=self.next_used,
            event_idx=self.event_idx,
            indirect=self.indirect,
            signalled_used=self.signalled_used,
        )

    def restore_state(self, state: QueueState | dict, memory: DeviceMemory | None = None) -> None:
        """Load a `state()`; with `memory`, re-bind (and re-validate) an active queue."""
        if isinstance(state, dict):
            state = QueueState.from_dict(state)
        if state.max_size != self.max_size:
            raise ValueError(
                f"queue max size {state.max_size} in state, device has {self.max_size}"
            )
        self.size = state.size
        self.ready = state.ready
        self.desc_addr = state.desc_addr
        self.avail_addr = state.avail_addr
        self.used_addr = state.used_addr
        self.next_avail = state.next_avail & 0xFFFF
        self.next_used = state.next_used & 0xFFFF
        self.event_idx = state.event_idx
        self.indirect = state.indirect
        self.signalled_used = state.signalled_used
        self._memory = None
        if memory is not None:
            self.bind(memory)

    # -- the data path ---------------------------------------------------------
    def _mem(self) -> DeviceMemory:
        mem = self._memory
        if mem is None:
            raise VirtQueueError("queue used before it was activated")
        return mem

    def pending(self) -> int:
        """Number of chains the driver has made available and the device not yet popped."""
        mem = self._mem()
        try:
            avail_idx = mem.read_u16(self._avail_idx_addr)
        except GuestMemoryError as e:  # pragma: no cover - validated at activation
            raise VirtQueueError(str(e)) from None
        pending = (avail_idx - self.next_avail) & 0xFFFF
        if pending > self.size:
            raise VirtQueueError(
                f"avail idx {avail_idx} is {pending} ahead of the device's {self.next_avail}, "
                f"more than the queue size {self.size}"
            )
        return pending

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None when the ring is empty.

        With ``VIRTIO_F_EVENT_IDX``, an empty ring publishes ``avail_event =
        next_avail`` (ask for a kick on the next buffer) and then looks once
        more, so a buffer made available in between is never missed.
        """
        if self.pending() == 0:
            if not self.event_idx:
                return None
            mem = self._mem()
            mem.write_u16(self._avail_event_addr, self.next_avail)
            if self.pending() == 0:
                return None
        mem = self._mem()
        slot = self._avail_ring + 2 * (self.next_avail % self.size)
        head = mem.read_u16(slot)
        chain = self._parse_chain(head)
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        return chain

    def undo_pop(self) -> None:
        """Give the last popped chain back (a device that could not take it yet, e.g. no rx room)."""
        self.next_avail = (self.next_avail - 1) & 0xFFFF

    def _parse_chain(self, head: int) -> DescriptorChain:
        size = self.size
        if head >= size:
            raise VirtQueueError(f"available ring names descriptor {head}, queue size is {size}")
        mem = self._mem()
        guest = mem.guest
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        total = 0
        table = self._desc
        table_len = size
        index = head
        count = 0
        in_indirect = False
        unpack = _DESC.unpack
        while True:
            count += 1
            if count > table_len:
                raise VirtQueueError(
                    f"descriptor chain from head {head} is longer than its table ({table_len}) "
                    "or loops"
                )
            try:
                addr, length, flags, nxt = unpack(guest.view(table + VIRTQ_DESC_SIZE * index, 16))
            except GuestMemoryError as e:
                raise VirtQueueError(f"descriptor table outside guest RAM: {e}") from None
            if flags & VIRTQ_DESC_F_INDIRECT:
                if in_indirect:
                    raise VirtQueueError("indirect descriptor inside an indirect table")
                if not self.indirect:
                    raise VirtQueueError(
                        "indirect descriptor but VIRTIO_F_INDIRECT_DESC not negotiated"
                    )
                if flags & VIRTQ_DESC_F_NEXT:
                    raise VirtQueueError("descriptor has both INDIRECT and NEXT")
                if count != 1:
                    raise VirtQueueError("indirect descriptor that is not the head of its chain")
                if length == 0 or length % VIRTQ_DESC_SIZE:
                    raise VirtQueueError(f"indirect table length {length} is not a multiple of 16")
                n = length // VIRTQ_DESC_SIZE
                if n > size:
                    raise VirtQueueError(
                        f"indirect table of {n} descriptors exceeds queue size {size}"
                    )
                try:
                    guest.locate(addr, length)
                except GuestMemoryError as e:
                    raise VirtQueueError(f"indirect table outside guest RAM: {e}") from None
                in_indirect = True
                table, table_len, index, count = addr, n, 0, 0
                continue
            if length == 0:
                raise VirtQueueError(f"zero-length descriptor in chain from head {head}")
            try:
                guest.locate(addr, length)
            except GuestMemoryError as e:
                raise VirtQueueError(f"descriptor buffer outside guest RAM: {e}") from None
            total += length
            if total > _U32_MAX:
                raise VirtQueueError("descriptor chain covers more than 4 GiB")
            if flags & VIRTQ_DESC_F_WRITE:
                writable.append((addr, length))
            elif writable:
                raise VirtQueueError("device-readable descriptor after a device-writable one")
            else:
                readable.append((addr, length))
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            if nxt >= table_len:
                raise VirtQueueError(f"descriptor next index {nxt} out of range 0..{table_len - 1}")
            index = nxt
        return DescriptorChain(head, mem, readable, writable)

    def add_used(self, head: int, length: int) -> None:
        """Return chain `head` to the driver, `length` bytes written into its writable buffers."""
        mem = self._mem()
        slot = self._used_ring + VIRTQ_USED_ELEM_SIZE * (self.next_used % self.size)
        mem.write(slot, _USED_ELEM.pack(head, length))
        self.next_used = (self.next_used + 1) & 0xFFFF
        # The element must be visible before the index: on x86 stores are not
        # reordered with other stores, and this is program order.
        mem.write_u16(self._used_idx_addr, self.next_used)

    def needs_notification(self) -> bool:
        """Should the device interrupt the driver for the used buffers added so far?

        Without event idx: unless the driver set ``VRING_AVAIL_F_NO_INTERRUPT``.
        With event idx: iff ``used_event`` lies in the used entries added since
        the last time this returned (the ``vring_need_event`` rule).
        """
        mem = self._mem()
        if not self.event_idx:
            return not mem.read_u16(self.avail_addr) & VIRTQ_AVAIL_F_NO_INTERRUPT
        new = self.next_used
        old = self.signalled_used
        self.signalled_used = new
        if old is None:
            return True
        used_event = mem.read_u16(self._used_event_addr)
        return ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
