"""virtio-blk (virtio 1.x, 5.2) over a read-only base image and a copy-on-write overlay.

Two pieces, kept apart so either can be tested alone:

`CowDisk` is the disk: a base image file that is only ever opened
``O_RDONLY`` (so every VM can share it, and it stays byte-identical), and an
in-memory overlay of 4 KiB blocks that holds everything the guest wrote.
The overlay is VM state: snapshots capture it, and *marks* (generations)
let the VMM capture only the blocks written since a mark (diff snapshots)
or roll back to a mark (in-place reset).

`VirtioBlock` is the device model: it parses requests from a virtqueue and
answers every malformed one with a status byte (``VIRTIO_BLK_S_IOERR`` or
``VIRTIO_BLK_S_UNSUPP``), never an exception; only a broken *queue* (a
`VirtQueueError`) puts the device in ``DEVICE_NEEDS_RESET``.
"""

from __future__ import annotations

import logging
import os
import struct
import weakref
from typing import Any

from .device import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_BLOCK,
    DeviceStateError,
    VirtioDevice,
)
from .queue import DescriptorChain

log = logging.getLogger(__name__)

SECTOR_SIZE = 512
OVERLAY_BLOCK_SIZE = 4096
_SECTORS_PER_BLOCK = OVERLAY_BLOCK_SIZE // SECTOR_SIZE
ID_BYTES = 20

# Request types.
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_GET_LIFETIME = 10
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13

# Status byte values.
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

# Feature bits.
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9

QUEUE_SIZE = 256
_REQ_HEADER = struct.Struct("<IIQ")
#: capacity, size_max, seg_max, geometry (c,h,s), blk_size
_CONFIG = struct.Struct("<QIIHBBI")


class CowDisk:
    """A read-only base image plus a block-granular copy-on-write overlay.

    `size` is the disk size in bytes (a multiple of 512); by default the base
    image's size rounded up to a sector. Bytes past the end of the base read
    as zero, so ``CowDisk(None, size=n)`` is an empty scratch disk.

    Generations: `mark()` starts a new generation and returns its handle.
    `blocks_written_since(m)` are the blocks written after mark `m`;
    `discard_to(m)` returns the overlay to exactly its content when `m` was
    taken (and `m` stays valid, so a VM can be reset to it again and again).
    To make that possible the first write to a block in a generation keeps the
    block's previous content; `release(m)` drops a mark no longer needed.
    """

    def __init__(self, base: str | os.PathLike[str] | None, *, size: int | None = None) -> None:
        self._fd = -1
        self._closer: weakref.finalize | None = None
        base_size = 0
        if base is not None:
            self._fd = os.open(base, os.O_RDONLY | os.O_CLOEXEC)
            # Close the fd even if nobody calls close() (a dropped device must not leak it).
            self._closer = weakref.finalize(self, os.close, self._fd)
            base_size = os.fstat(self._fd).st_size
        if size is None:
            size = -(-base_size // SECTOR_SIZE) * SECTOR_SIZE
        if size < 0 or size % SECTOR_SIZE:
            self.close()
            raise ValueError(
                f"disk size must be a non-negative multiple of {SECTOR_SIZE}, got {size}"
            )
        self.base_path = os.fspath(base) if base is not None else None
        self.size = size
        self._base_size = min(base_size, size)
        self._blocks: dict[int, bytearray] = {}
        #: block -> generation (mark) of its last write; 0 = before any live mark.
        self._block_gen: dict[int, int] = {}
        #: live marks, ascending; the last one is the current generation
        self._marks: list[int] = []
        #: mark -> {block: (content before the generation's first write, its generation)}
        self._undo: dict[int, dict[int, tuple[bytes | None, int]]] = {}
        self._next_mark = 1

    def close(self) -> None:
        """Close the base image; reads of base blocks fail (IOERR) afterwards."""
        if self._closer is not None:
            self._closer()
        self._fd = -1

    def __enter__(self) -> CowDisk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- data ---------------------------------------------------------------------
    def _read_base(self, offset: int, length: int) -> bytes:
        """Base bytes ``[offset, offset+length)``, zero past the base's end."""
        n = max(0, min(length, self._base_size - offset))
        data = os.pread(self._fd, n, offset) if n else b""
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    def read(self, offset: int, length: int) -> bytes:
        """Disk bytes ``[offset, offset+length)``; the caller checked the range."""
        if length <= 0:
            return b""
        blocks = self._blocks
        first = offset // OVERLAY_BLOCK_SIZE
        last = (offset + length - 1) // OVERLAY_BLOCK_SIZE
        if not blocks or not any(b in blocks for b in range(first, last + 1)):
            return self._read_base(offset, length)
        out = bytearray()
        pos, end = offset, offset + length
        while pos < end:
            block, within = divmod(pos, OVERLAY_BLOCK_SIZE)
            n = min(OVERLAY_BLOCK_SIZE - within, end - pos)
            data = blocks.get(block)
            out += data[within : within + n] if data is not None else self._read_base(pos, n)
            pos += n
        return bytes(out)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write into the overlay (never the base); the caller checked the range."""
        src = memoryview(data).cast("B")
        pos, end, done = offset, offset + len(src), 0
        while pos < end:
            block, within = divmod(pos, OVERLAY_BLOCK_SIZE)
            n = min(OVERLAY_BLOCK_SIZE - within, end - pos)
            buf = self._block_for_write(block)
            buf[within : within + n] = src[done : done + n]
            pos += n
            done += n

    def _block_for_write(self, block: int) -> bytearray:
        gen = self._marks[-1] if self._marks else 0
        buf = self._blocks.get(block)
        old_gen = self._block_gen.get(block)
        if old_gen != gen or buf is None:
            if gen:
                undo = self._undo[gen]
                if block not in undo:
                    undo[block] = (bytes(buf) if buf is not None else None, old_gen or 0)
            self._block_gen[block] = gen
        if buf is None:
            buf = bytearray(self._read_base(block * OVERLAY_BLOCK_SIZE, OVERLAY_BLOCK_SIZE))
            self._blocks[block] = buf
        return buf

    # -- generations -----------------------------------------------------------------
    def overlay_blocks(self) -> set[int]:
        """Every block the overlay holds (written at any time)."""
        return set(self._blocks)

    def mark(self) -> int:
        """Start a new generation; the handle names the overlay's content right now."""
        m = self._next_mark
        self._next_mark += 1
        self._marks.append(m)
        self._undo[m] = {}
        return m

    def _check_mark(self, mark: int) -> None:
        if mark not in self._undo:
            raise ValueError(f"disk mark {mark} is not live (live marks: {self._marks})")

    def blocks_written_since(self, mark: int) -> set[int]:
        """Blocks written after `mark` was taken (what a diff snapshot on top of it must store)."""
        self._check_mark(mark)
        return {b for b, g in self._block_gen.items() if g >= mark}

    def discard_to(self, mark: int) -> None:
        """Return the overlay to its content at `mark`; later marks die, `mark` stays live."""
        self._check_mark(mark)
        while True:
            m = self._marks[-1]
            for block, (content, gen) in self._undo[m].items():
                if content is None:
                    self._blocks.pop(block, None)
                    self._block_gen.pop(block, None)
                else:
                    self._blocks[block] = bytearray(content)
                    self._block_gen[block] = gen
            if m == mark:
                self._undo[m] = {}
                return
            self._marks.pop()
            del self._undo[m]

    def release(self, mark: int) -> None:
        """Forget `mark`: its generation merges into the previous live mark's (or none)."""
        self._check_mark(mark)
        i = self._marks.index(mark)
        undo = self._undo.pop(mark)
        del self._marks[i]
        prev = self._marks[i - 1] if i > 0 else 0
        if prev:
            # What `mark` saved is the content at the end of `prev`'s generation;
            # `prev` only needs it for blocks it had not saved itself.
            prev_undo = self._undo[prev]
            for block, saved in undo.items():
                prev_undo.setdefault(block, saved)
        for block, g in self._block_gen.items():
            if g == mark:
                self._block_gen[block] = prev
        for later in self._marks[i:]:
            later_undo = self._undo[later]
            for block, (content, g) in later_undo.items():
                if g == mark:
                    later_undo[block] = (content, prev)

    # -- snapshots -------------------------------------------------------------------
    def state(self, since: int | None = None) -> dict[str, Any]:
        """The overlay (all of it, or the blocks written since mark `since`).

        ``{"size", "block_size", "since", "blocks": [indices], "data": bytes}``
        with ``data`` the blocks' contents concatenated in index order.
        """
        blocks = sorted(self._blocks if since is None else self.blocks_written_since(since))
        return {
            "size": self.size,
            "block_size": OVERLAY_BLOCK_SIZE,
            "since": since,
            "blocks": blocks,
            "data": b"".join(bytes(self._blocks[b]) for b in blocks),
        }

    def restore_state(self, state: dict[str, Any]) -> None:
        """Load a `state()`: a full one replaces the overlay and drops every mark;
        a diff one (``since`` set) is written on top of the current overlay, which
        must be the one it was taken against."""
        if state["block_size"] != OVERLAY_BLOCK_SIZE or state["size"] != self.size:
            raise ValueError(
                f"overlay of a {state['size']}-byte disk in {state['block_size']}-byte blocks "
                f"does not fit this {self.size}-byte disk"
            )
        blocks, data = state["blocks"], memoryview(state["data"])
        if len(data) != len(blocks) * OVERLAY_BLOCK_SIZE:
            raise ValueError("overlay state data does not match its block list")
        if state["since"] is None:
            self._blocks.clear()
            self._block_gen.clear()
            self._marks.clear()
            self._undo.clear()
        limit = -(-self.size // OVERLAY_BLOCK_SIZE)
        for i, block in enumerate(blocks):
            if not 0 <= block < limit:
                raise ValueError(f"overlay block {block} is past the end of the disk")
            self.write(
                block * OVERLAY_BLOCK_SIZE,
                data[i * OVERLAY_BLOCK_SIZE : (i + 1) * OVERLAY_BLOCK_SIZE],
            )


class VirtioBlock(VirtioDevice):
    """virtio-blk device: one request queue over a `CowDisk`.

    `base` is any file (an image, a raw ext4, ``/dev/null`` with `size`) or
    None for a blank disk; it is never opened for writing. With `read_only`
    the device offers ``VIRTIO_BLK_F_RO`` and fails writes with IOERR. `serial`
    is the GET_ID string (up to 20 bytes).
    """

    device_type = VIRTIO_ID_BLOCK
    queue_max_sizes = (QUEUE_SIZE,)

    def __init__(
        self,
        base: str | os.PathLike[str] | None,
        *,
        size: int | None = None,
        read_only: bool = False,
        serial: str | bytes = b"",
    ) -> None:
        super().__init__()
        serial_b = serial.encode() if isinstance(serial, str) else bytes(serial)
        if len(serial_b) > ID_BYTES:
            raise ValueError(f"virtio-blk serial is at most {ID_BYTES} bytes, got {len(serial_b)}")
        self.disk = CowDisk(base, size=size)
        self.read_only = read_only
        self.serial = serial_b

    def close(self) -> None:
        self.disk.close()

    # -- negotiation and config ----------------------------------------------------------
    def device_features(self) -> int:
        f = (
            1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_F_INDIRECT_DESC
            | 1 << VIRTIO_F_EVENT_IDX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH
        )
        if self.read_only:
            f |= 1 << VIRTIO_BLK_F_RO
        return f

    @property
    def capacity(self) -> int:
        """Disk size in 512-byte sectors (what the guest sees)."""
        return self.disk.size // SECTOR_SIZE

    def config_space(self) -> bytes:
        # seg_max leaves room for the header and status descriptors within one queue's worth.
        return _CONFIG.pack(self.capacity, 0, QUEUE_SIZE - 2, 0, 0, 0, SECTOR_SIZE)

    # -- requests ------------------------------------------------------------------------
    def process_queue(self, index: int) -> bool:
        """Serve at most one queue's worth of requests; True if more are waiting."""
        queue = self.queues[index]
        served = 0
        while served < queue.size and (chain := queue.pop()) is not None:
            queue.add_used(chain.head, self._handle(chain))
            served += 1
        if served:
            self.signal_used(queue)
        return served == queue.size and queue.pending() > 0

    def _handle(self, chain: DescriptorChain) -> int:
        """Serve one request; returns the used length (bytes written to the guest)."""
        if chain.writable_len < 1:
            log.debug("virtio-blk: request without a status byte, completed with nothing written")
            return 0
        data_in = chain.writable_len - 1
        if chain.readable_len < _REQ_HEADER.size:
            return self._finish(chain, VIRTIO_BLK_S_IOERR)
        rtype, _, sector = _REQ_HEADER.unpack(chain.read(0, _REQ_HEADER.size))
        data_out = chain.readable_len - _REQ_HEADER.size
        try:
            if rtype == VIRTIO_BLK_T_IN:
                if not self._range_ok(sector, data_in):
                    return self._finish(chain, VIRTIO_BLK_S_IOERR)
                if data_in:
                    chain.write(0, self.disk.read(sector * SECTOR_SIZE, data_in))
                return self._finish(chain, VIRTIO_BLK_S_OK, data_in)
            if rtype == VIRTIO_BLK_T_OUT:
                if self.read_only or not self._range_ok(sector, data_out):
                    return self._finish(chain, VIRTIO_BLK_S_IOERR)
                if data_out:
                    self.disk.write(sector * SECTOR_SIZE, chain.read(_REQ_HEADER.size, data_out))
                return self._finish(chain, VIRTIO_BLK_S_OK)
            if rtype == VIRTIO_BLK_T_FLUSH:
                # The overlay lives in memory and the base is read-only: nothing to persist.
                return self._finish(chain, VIRTIO_BLK_S_OK)
            if rtype == VIRTIO_BLK_T_GET_ID:
                n = chain.write(0, self.serial.ljust(ID_BYTES, b"\0")[: min(ID_BYTES, data_in)])
                return self._finish(chain, VIRTIO_BLK_S_OK, n)
        except OSError as e:  # the base image went away or failed to read
            log.warning("virtio-blk: I/O error on %s: %s", self.disk.base_path, e)
            return self._finish(chain, VIRTIO_BLK_S_IOERR)
        return self._finish(chain, VIRTIO_BLK_S_UNSUPP)

    def _range_ok(self, sector: int, length: int) -> bool:
        return length % SECTOR_SIZE == 0 and sector * SECTOR_SIZE + length <= self.disk.size

    @staticmethod
    def _finish(chain: DescriptorChain, status: int, data_written: int = 0) -> int:
        chain.write(chain.writable_len - 1, bytes((status,)))
        return data_written + 1

    # -- overlay as VM state ------------------------------------------------------------------
    def mark(self) -> int:
        """Start a new overlay generation (see `CowDisk.mark`)."""
        return self.disk.mark()

    def overlay_blocks_written_since(self, mark: int) -> set[int]:
        """Overlay block numbers (4 KiB units) written since `mark`."""
        return self.disk.blocks_written_since(mark)

    def discard_to(self, mark: int) -> None:
        """Roll the disk back to `mark` (reset); the guest must not have I/O in flight."""
        self.disk.discard_to(mark)

    def state(self, since_mark: int | None = None) -> dict[str, Any]:
        """Acked features plus the overlay (whole, or the blocks written since `since_mark`)."""
        st = super().state()
        st["overlay"] = self.disk.state(since_mark)
        return st

    def restore_state(self, state: dict[str, Any]) -> None:
        super().restore_state(state)
        if "overlay" in state:
            try:
                self.disk.restore_state(state["overlay"])
            except (KeyError, TypeError, ValueError) as e:
                raise DeviceStateError(f"disk overlay: {e!r}") from None
