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
  request data) is recorded by page frame number (`DeviceMemory`, in memory.py),
  because the KVM dirty log only sees writes made by the guest CPU and diff
  snapshots need both.

Layout of the rings (all little endian)::

    descriptor i  @ desc + 16*i:   u64 addr, u32 len, u16 flags, u16 next
    avail         @ driver:        u16 flags, u16 idx, u16 ring[size], u16 used_event
    used          @ device:        u16 flags, u16 idx, {u32 id, u32 len}[size], u16 avail_event
"""

from __future__ import annotations

import mmap
import struct
import threading
from dataclasses import asdict, dataclass

from ....errors import GuestMemoryError, SupermachineError
from ...memory import PAGE_SHIFT, DeviceMemory, GuestMemory

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

VIRTQ_DESC_SIZE = 16
VIRTQ_USED_ELEM_SIZE = 8
#: Largest queue the transport will let a device advertise (virtio limit for split rings).
VIRTQ_MAX_SIZE = 32768

_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")
_U16 = struct.Struct("<H")
_U32_MAX = 0xFFFF_FFFF
_U64_MAX = 0xFFFF_FFFF_FFFF_FFFF

_STATE_INT_LIMITS = {
    "max_size": VIRTQ_MAX_SIZE,
    "size": _U32_MAX,  # what the driver wrote to QueueNum; checked when the queue goes live
    "desc_addr": _U64_MAX,
    "avail_addr": _U64_MAX,
    "used_addr": _U64_MAX,
    "next_avail": 0xFFFF,
    "next_used": 0xFFFF,
    "signalled_used": 0xFFFF,
}
"""The integer fields of `QueueState` and their largest value (the register or index width)."""


class VirtQueueError(SupermachineError):
    """The driver put the queue in a state no correct driver produces.

    The transport answers it by setting ``DEVICE_NEEDS_RESET`` and raising a
    configuration-change interrupt; the device stops using the queue until the
    driver resets it.
    """


#: One segment of a chain: (host buffer, offset in it, length, guest-physical address).
_Segment = tuple["mmap.mmap | bytearray", int, int, int]


class DescriptorChain:
    """One request popped from the available ring, as guest buffers.

    `readable` are the device-readable ``(gpa, len)`` buffers, in order,
    followed by the device-writable ones in `writable` (the virtio spec
    requires readable before writable). Every buffer was bounds-checked
    through `GuestMemory.locate` when the chain was popped and is accessed
    only within that checked range; writes are recorded as written pages.
    """

    __slots__ = ("_rsegs", "_wsegs", "head", "memory", "readable_len", "writable_len")

    def __init__(
        self,
        head: int,
        memory: DeviceMemory,
        readable: list[tuple[int, int]] | list[_Segment],
        writable: list[tuple[int, int]] | list[_Segment],
    ) -> None:
        """`readable`/`writable`: ``(gpa, len)`` pairs (checked here) or resolved segments."""
        self.head = head
        self.memory = memory
        self._rsegs = [s if len(s) == 4 else (*memory.resolve(*s), s[1], s[0]) for s in readable]
        self._wsegs = [s if len(s) == 4 else (*memory.resolve(*s), s[1], s[0]) for s in writable]
        self.readable_len = sum(s[2] for s in self._rsegs)
        self.writable_len = sum(s[2] for s in self._wsegs)

    @property
    def readable(self) -> list[tuple[int, int]]:
        return [(gpa, n) for _, _, n, gpa in self._rsegs]

    @property
    def writable(self) -> list[tuple[int, int]]:
        return [(gpa, n) for _, _, n, gpa in self._wsegs]

    def __repr__(self) -> str:
        return (
            f"DescriptorChain(head={self.head}, readable={self.readable}, writable={self.writable})"
        )

    def read(self, offset: int = 0, length: int | None = None) -> bytes:
        """Bytes ``[offset, offset+length)`` of the readable stream (clipped to its end)."""
        if length is None:
            length = self.readable_len - offset
        if offset < 0 or length <= 0:
            return b""
        out = []
        for buf, off, n, _ in self._rsegs:
            if offset >= n:
                offset -= n
                continue
            k = min(n - offset, length)
            out.append(buf[off + offset : off + offset + k])
            length -= k
            offset = 0
            if not length:
                break
        return bytes(out[0]) if len(out) == 1 else b"".join(out)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Write `data` at `offset` of the writable stream; returns bytes written (clipped)."""
        src: bytes | bytearray | memoryview = data
        if isinstance(src, memoryview) and (src.ndim != 1 or src.format not in ("B", "b", "c")):
            src = src.cast("B")
        total = len(src)
        if offset < 0 or not total:
            return 0
        done = 0
        record = self.memory.mark_written
        for buf, off, n, gpa in self._wsegs:
            if offset >= n:
                offset -= n
                continue
            k = min(n - offset, total - done)
            if done or k != total:
                if not isinstance(src, memoryview):
                    src = memoryview(src)
                buf[off + offset : off + offset + k] = src[done : done + k]
            else:
                buf[off + offset : off + offset + k] = src
            record(gpa + offset, k)
            done += k
            offset = 0
            if done == total:
                break
        return done

    def writable_views(self, offset: int, length: int) -> list[memoryview]:
        """Views over ``[offset, offset+length)`` of the writable stream, recorded as written.

        For zero-copy fills (``os.preadv``); clipped to the writable stream.
        """
        views = []
        if offset < 0 or length <= 0:
            return views
        for buf, off, n, gpa in self._wsegs:
            if offset >= n:
                offset -= n
                continue
            k = min(n - offset, length)
            views.append(memoryview(buf)[off + offset : off + offset + k])
            self.memory.mark_written(gpa + offset, k)
            length -= k
            offset = 0
            if not length:
                break
        return views


def check_in_flight(next_avail: int, next_used: int, size: int) -> None:
    """Raise `VirtQueueError` unless the device has at most `size` chains popped and not
    yet used: no correct device holds more than its queue, whatever the driver does."""
    in_flight = (next_avail - next_used) & 0xFFFF
    if in_flight > size:
        raise VirtQueueError(
            f"{in_flight} chains in flight (next_avail {next_avail}, next_used {next_used}), "
            f"more than the queue size {size}"
        )


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

    def to_dict(self) -> dict[str, int | bool | None]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: object) -> QueueState:
        """The state `to_dict` wrote; anything else (missing, extra or mistyped fields,
        values out of their register's range) raises `VirtQueueError`."""
        if not isinstance(d, dict):
            raise VirtQueueError(f"queue state is a {type(d).__name__}, not a mapping")
        fields = cls.__dataclass_fields__
        if set(d) != set(fields):
            missing, extra = sorted(set(fields) - set(d)), sorted(set(d) - set(fields))
            raise VirtQueueError(f"queue state fields: missing {missing}, unknown {extra}")
        for name, limit in _STATE_INT_LIMITS.items():
            value = d[name]
            if name == "signalled_used" and value is None:
                continue
            if type(value) is not int or not 0 <= value <= limit:
                raise VirtQueueError(f"queue state {name}={value!r} is not an integer 0..{limit}")
        for name in ("ready", "event_idx", "indirect"):
            if type(d[name]) is not bool:
                raise VirtQueueError(f"queue state {name}={d[name]!r} is not a boolean")
        return cls(**{k: d[k] for k in fields})

    def check(self, max_size: int) -> None:
        """Raise `VirtQueueError` unless this state is one a correct device and driver produce.

        The queue belongs to a device whose queue holds at most `max_size` entries. The
        size the driver chose and the ring placement are checked when the queue is bound
        (`VirtQueue.validate`): until then a driver may have written anything there, and a
        snapshot taken meanwhile is still one this VMM wrote.
        """
        if self.max_size != max_size:
            raise VirtQueueError(f"queue max size {self.max_size} in state, device has {max_size}")
        check_in_flight(self.next_avail, self.next_used, max_size)


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
        "_avail_buf",
        "_avail_off",
        "_desc_buf",
        "_desc_off",
        "_memory",
        "_used_buf",
        "_used_off",
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
        """Check size, indices, alignment, that all three areas are guest RAM and that the
        used ring overlaps neither of the others; raise `VirtQueueError`."""
        size = self.size
        if not 1 <= size <= self.max_size or size & (size - 1):
            raise VirtQueueError(f"queue size {size} is not a power of two in 1..{self.max_size}")
        check_in_flight(self.next_avail, self.next_used, size)
        guest = memory.guest if isinstance(memory, DeviceMemory) else memory
        areas = (
            ("descriptor table", self.desc_addr, 16, VIRTQ_DESC_SIZE * size),
            ("available ring", self.avail_addr, 2, 6 + 2 * size),
            ("used ring", self.used_addr, 4, 6 + VIRTQ_USED_ELEM_SIZE * size),
        )
        for name, addr, align, length in areas:
            if addr % align:
                raise VirtQueueError(f"{name} at {addr:#x} is not {align}-byte aligned")
            try:
                guest.locate(addr, length)
            except GuestMemoryError as e:
                raise VirtQueueError(f"{name} is not in guest RAM: {e}") from None
        # The device writes the used ring. Over the available ring or the descriptors, its
        # own writes would make new work for it (each used entry bumping the avail index):
        # no correct driver does that, and the device would serve itself forever.
        _, used_addr, _, used_len = areas[2]
        for name, addr, _, length in areas[:2]:
            if addr < used_addr + used_len and used_addr < addr + length:
                raise VirtQueueError(
                    f"used ring [{used_addr:#x}, {used_addr + used_len:#x}) overlaps the "
                    f"{name} [{addr:#x}, {addr + length:#x})"
                )

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
        # Each ring area was bounds-checked as a whole (`validate`); from here on
        # it is indexed only with offsets derived from `size` and indices < size.
        size = self.size
        self._desc_buf, self._desc_off = memory.resolve(self.desc_addr, VIRTQ_DESC_SIZE * size)
        self._avail_buf, self._avail_off = memory.resolve(self.avail_addr, 6 + 2 * size)
        self._used_buf, self._used_off = memory.resolve(
            self.used_addr, 6 + VIRTQ_USED_ELEM_SIZE * size
        )
        self._memory = memory

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
        """Load a `state()`; with `memory`, re-bind (and re-validate) an active queue.

        A state no correct device and driver produce (see `QueueState.from_dict` and
        `QueueState.check`; with `memory`, also `validate`) raises `VirtQueueError`.
        """
        if not isinstance(state, QueueState):
            state = QueueState.from_dict(state)
        state.check(self.max_size)
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
    def _avail_idx(self) -> int:
        if self._memory is None:
            raise VirtQueueError("queue used before it was activated")
        return _U16.unpack_from(self._avail_buf, self._avail_off + 2)[0]

    def pending(self) -> int:
        """Number of chains the driver has made available and the device not yet popped."""
        avail_idx = self._avail_idx()
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
        next_avail`` (ask for a kick on the next buffer), then a full memory
        barrier, then looks once more, so a buffer made available in between
        is never missed (the driver does the mirror image: idx, barrier, event).
        """
        next_avail = self.next_avail
        avail_idx = self._avail_idx()
        if avail_idx == next_avail:
            if not self.event_idx:
                return None
            self._publish_avail_event(next_avail)
            _full_barrier()
            avail_idx = self._avail_idx()
            if avail_idx == next_avail:
                return None
        size = self.size
        if (avail_idx - next_avail) & 0xFFFF > size:
            raise VirtQueueError(
                f"avail idx {avail_idx} is {(avail_idx - next_avail) & 0xFFFF} ahead of the "
                f"device's {next_avail}, more than the queue size {size}"
            )
        slot = self._avail_off + 4 + 2 * (next_avail % size)
        chain = self._parse_chain(_U16.unpack_from(self._avail_buf, slot)[0])
        self.next_avail = (next_avail + 1) & 0xFFFF
        return chain

    def request_kick(self) -> bool:
        """Ask the driver to kick when it makes its next buffer available.

        Without ``VIRTIO_F_EVENT_IDX`` drivers kick anyway (we never set NO_NOTIFY). With
        it, `pop` asks only when it finds the ring empty; a device that must hear of the
        next buffer while others are still available (vsock: the event buffer re-posted
        once the driver handled a reset) asks here: ``avail_event`` = the driver's
        current avail idx. Returns True when a buffer became available while asking,
        which the driver may not kick for.
        """
        if not self.event_idx:
            return False
        seen = self._avail_idx()
        self._publish_avail_event(seen)
        _full_barrier()
        return self._avail_idx() != seen

    def _publish_avail_event(self, value: int) -> None:
        offset = 4 + VIRTQ_USED_ELEM_SIZE * self.size
        _U16.pack_into(self._used_buf, self._used_off + offset, value)
        self._memory.written.add((self.used_addr + offset) >> PAGE_SHIFT)  # type: ignore[union-attr]

    def undo_pop(self) -> None:
        """Give the last popped chain back (a device that could not take it yet, e.g. no rx room)."""
        self.next_avail = (self.next_avail - 1) & 0xFFFF

    def _parse_chain(self, head: int) -> DescriptorChain:
        size = self.size
        if head >= size:
            raise VirtQueueError(f"available ring names descriptor {head}, queue size is {size}")
        mem = self._memory
        assert mem is not None
        locate = mem.guest.locate
        buffers = mem._buffers
        readable: list[_Segment] = []
        writable: list[_Segment] = []
        total = 0
        table_buf, table_off, table_len = self._desc_buf, self._desc_off, size
        index = head
        count = 0
        in_indirect = False
        unpack_from = _DESC.unpack_from
        while True:
            count += 1
            if count > table_len:
                raise VirtQueueError(
                    f"descriptor chain from head {head} is longer than its table ({table_len}) "
                    "or loops"
                )
            # index < table_len always holds here, so this stays inside the checked table.
            addr, length, flags, nxt = unpack_from(table_buf, table_off + VIRTQ_DESC_SIZE * index)
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
                    region, table_off = locate(addr, length)
                except GuestMemoryError as e:
                    raise VirtQueueError(f"indirect table outside guest RAM: {e}") from None
                in_indirect = True
                table_buf, table_len, index, count = buffers[region], n, 0, 0
                continue
            if length == 0:
                raise VirtQueueError(f"zero-length descriptor in chain from head {head}")
            try:
                region, off = locate(addr, length)
            except GuestMemoryError as e:
                raise VirtQueueError(f"descriptor buffer outside guest RAM: {e}") from None
            total += length
            if total > _U32_MAX:
                raise VirtQueueError("descriptor chain covers more than 4 GiB")
            if flags & VIRTQ_DESC_F_WRITE:
                writable.append((buffers[region], off, length, addr))
            elif writable:
                raise VirtQueueError("device-readable descriptor after a device-writable one")
            else:
                readable.append((buffers[region], off, length, addr))
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            if nxt >= table_len:
                raise VirtQueueError(f"descriptor next index {nxt} out of range 0..{table_len - 1}")
            index = nxt
        return DescriptorChain(head, mem, readable, writable)

    def add_used(self, head: int, length: int) -> None:
        """Return chain `head` to the driver, `length` bytes written into its writable buffers."""
        mem = self._memory
        if mem is None:
            raise VirtQueueError("queue used before it was activated")
        slot = VIRTQ_USED_ELEM_SIZE * (self.next_used % self.size)
        _USED_ELEM.pack_into(self._used_buf, self._used_off + 4 + slot, head, length)
        self.next_used = (self.next_used + 1) & 0xFFFF
        # The element must be visible before the index: x86 does not reorder
        # stores with other stores, and this is program order.
        _U16.pack_into(self._used_buf, self._used_off + 2, self.next_used)
        written = mem.written
        written.add((self.used_addr + 4 + slot) >> PAGE_SHIFT)
        written.add((self.used_addr + 2) >> PAGE_SHIFT)

    def needs_notification(self) -> bool:
        """Should the device interrupt the driver for the used buffers added so far?

        Without event idx: unless the driver set ``VRING_AVAIL_F_NO_INTERRUPT``.
        With event idx: iff ``used_event`` lies in the used entries added since
        the last time this returned (the ``vring_need_event`` rule).
        """
        if self._memory is None:
            raise VirtQueueError("queue used before it was activated")
        # Our used idx store must be visible before we read the driver's flags/event.
        _full_barrier()
        if not self.event_idx:
            flags = _U16.unpack_from(self._avail_buf, self._avail_off)[0]
            return not flags & VIRTQ_AVAIL_F_NO_INTERRUPT
        new = self.next_used
        old = self.signalled_used
        self.signalled_used = new
        if old is None:
            return True
        used_event = _U16.unpack_from(self._avail_buf, self._avail_off + 4 + 2 * self.size)[0]
        return ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


_barrier_lock = threading.Lock()


def _full_barrier() -> None:
    """A full memory barrier (store-load ordering against vCPUs on other host CPUs).

    Python has no fence primitive; taking an uncontended lock executes an
    atomic read-modify-write, which is a full barrier on x86 (where this VMM
    runs). The spec requires one between publishing an event index and
    re-reading the other side's index (virtio 1.x, 2.7.7 / 2.7.10).
    """
    _barrier_lock.acquire()
    _barrier_lock.release()
