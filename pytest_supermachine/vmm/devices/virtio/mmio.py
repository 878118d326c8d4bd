"""virtio-mmio transport, version 2 ("modern"; virtio 1.x, section 4.2).

The VMM's MMIO bus calls `VirtioMmioTransport.read` / `write` with offsets
inside the device's 4 KiB window; an ioeventfd reader on the QueueNotify
register calls `notify`; the transport calls the VMM's interrupt callback
(wired to an irqfd or ``KVM_IRQ_LINE``) whenever it raises InterruptStatus.

What the transport guarantees:

* Feature negotiation follows the spec handshake and refuses FEATURES_OK
  unless the driver accepted ``VIRTIO_F_VERSION_1`` and nothing the device
  did not offer (the driver sees FEATURES_OK unset and gives up).
* Queues are validated against guest RAM when the driver sets DRIVER_OK;
  any `VirtQueueError` or `GuestMemoryError` raised while activating or
  serving the device sets ``DEVICE_NEEDS_RESET`` and raises a configuration
  change interrupt. The device is then silent until the driver writes 0 to
  Status. No guest input makes `read`, `write` or `notify` raise.
* All access is serialised by `lock` (vCPU threads, the ioeventfd thread and
  device backend threads may all call in).
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable
from typing import Any

from ....errors import GuestMemoryError
from ...memory import DeviceMemory, GuestMemory
from .device import (
    STATUS_ACKNOWLEDGE,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FAILED,
    STATUS_FEATURES_OK,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    DeviceStateError,
    VirtioDevice,
    state_int,
)
from .queue import VirtQueue, VirtQueueError

log = logging.getLogger(__name__)

MMIO_MAGIC = 0x74726976  # "virt"
MMIO_VERSION = 2
#: "SMVM" little endian: our vendor id (drivers do not care about it).
VENDOR_ID = 0x4D564D53

# Register offsets.
REG_MAGIC_VALUE = 0x000
REG_VERSION = 0x004
REG_DEVICE_ID = 0x008
REG_VENDOR_ID = 0x00C
REG_DEVICE_FEATURES = 0x010
REG_DEVICE_FEATURES_SEL = 0x014
REG_DRIVER_FEATURES = 0x020
REG_DRIVER_FEATURES_SEL = 0x024
REG_QUEUE_SEL = 0x030
REG_QUEUE_NUM_MAX = 0x034
REG_QUEUE_NUM = 0x038
REG_QUEUE_READY = 0x044
REG_QUEUE_NOTIFY = 0x050
REG_INTERRUPT_STATUS = 0x060
REG_INTERRUPT_ACK = 0x064
REG_STATUS = 0x070
REG_QUEUE_DESC_LOW = 0x080
REG_QUEUE_DESC_HIGH = 0x084
REG_QUEUE_DRIVER_LOW = 0x090
REG_QUEUE_DRIVER_HIGH = 0x094
REG_QUEUE_DEVICE_LOW = 0x0A0
REG_QUEUE_DEVICE_HIGH = 0x0A4
REG_SHM_SEL = 0x0AC
REG_SHM_LEN_LOW = 0x0B0
REG_SHM_LEN_HIGH = 0x0B4
REG_SHM_BASE_LOW = 0x0B8
REG_SHM_BASE_HIGH = 0x0BC
REG_CONFIG_GENERATION = 0x0FC
CONFIG_SPACE = 0x100
WINDOW_SIZE = 0x1000

#: InterruptStatus bits.
INT_USED_RING = 0x1
INT_CONFIG = 0x2

_U32 = struct.Struct("<I")
_LOW32 = 0xFFFF_FFFF
_STATUS_ORDER = (
    # bit, bit it requires
    (STATUS_ACKNOWLEDGE, 0),
    (STATUS_DRIVER, STATUS_ACKNOWLEDGE),
    (STATUS_FEATURES_OK, STATUS_DRIVER),
    (STATUS_DRIVER_OK, STATUS_FEATURES_OK),
)


class _TransportInterrupt:
    """The `Interrupt` a device gets: sets InterruptStatus bits and fires the VMM callback."""

    __slots__ = ("_transport",)

    def __init__(self, transport: VirtioMmioTransport) -> None:
        self._transport = transport

    def signal_used_queue(self) -> None:
        self._transport._raise_interrupt(INT_USED_RING)

    def signal_config(self) -> None:
        t = self._transport
        t.config_generation = (t.config_generation + 1) & _LOW32
        t._raise_interrupt(INT_CONFIG)


class VirtioMmioTransport:
    """One virtio-mmio v2 register window in front of one `VirtioDevice`.

    `memory` is the VM's `GuestMemory`; the transport wraps it once in a
    `DeviceMemory` so every byte this device writes into guest RAM is
    recorded (`written_pages`). `interrupt` is called with no arguments each
    time InterruptStatus gains a bit; it may also be set later
    (`set_interrupt`) once the VMM has created the irqfd.
    """

    def __init__(
        self,
        device: VirtioDevice,
        memory: GuestMemory,
        interrupt: Callable[[], None] | None = None,
        *,
        vendor_id: int = VENDOR_ID,
    ) -> None:
        self.device = device
        self.memory = DeviceMemory(memory)
        self.vendor_id = vendor_id
        self.lock = threading.RLock()
        self._interrupt_cb: Callable[[], None] = interrupt or (lambda: None)
        self._irq = _TransportInterrupt(self)
        self._device_features = device.device_features() | (1 << VIRTIO_F_VERSION_1)
        #: Guest-physical base of each shared-memory region the device has (id -> address),
        #: set by whoever placed the region (the device hub, for a DAX window).
        self.shm_bases: dict[int, int] = {}
        self.queues = [VirtQueue(n) for n in device.queue_max_sizes]
        #: Why the device last went to DEVICE_NEEDS_RESET (for logs and failure capsules).
        self.last_error: str | None = None
        self._reset_registers()

    def _reset_registers(self) -> None:
        self.status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.interrupt_status = 0
        self.config_generation = 0
        self.shm_sel = 0
        for q in self.queues:
            q.reset()

    # -- wiring -------------------------------------------------------------------
    def set_interrupt(self, interrupt: Callable[[], None]) -> None:
        """Replace the callback fired when InterruptStatus gains a bit."""
        self._interrupt_cb = interrupt

    def written_pages(self) -> set[int]:
        """Guest page frame numbers this device wrote since the last clear (for diff snapshots)."""
        with self.lock:
            return self.memory.written_pages()

    def clear_written_pages(self) -> None:
        with self.lock:
            self.memory.clear_written_pages()

    @property
    def needs_reset(self) -> bool:
        return bool(self.status & STATUS_DEVICE_NEEDS_RESET)

    @property
    def device_active(self) -> bool:
        return self.device.active

    # -- MMIO entry points -----------------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        """A guest read of `size` bytes at `offset` in the window. Never raises for guest input."""
        with self.lock:
            if offset >= CONFIG_SPACE:
                if size not in (1, 2, 4, 8) or offset + size > WINDOW_SIZE:
                    return bytes(max(size, 0))
                return self.device.read_config(offset - CONFIG_SPACE, size)
            if size != 4 or offset % 4:
                log.debug("virtio-mmio: %d-byte read at %#x ignored", size, offset)
                return bytes(max(size, 0))
            return _U32.pack(self._read_register(offset) & _LOW32)

    def write(self, offset: int, data: bytes) -> None:
        """A guest write at `offset` in the window. Never raises for guest input."""
        with self.lock:
            if offset >= CONFIG_SPACE:
                if len(data) in (1, 2, 4, 8) and offset + len(data) <= WINDOW_SIZE:
                    self.device.write_config(offset - CONFIG_SPACE, bytes(data))
                return
            if len(data) != 4 or offset % 4:
                log.debug("virtio-mmio: %d-byte write at %#x ignored", len(data), offset)
                return
            self._write_register(offset, _U32.unpack(data)[0])

    def notify(self, queue_index: int) -> bool:
        """The driver kicked queue `queue_index` (QueueNotify write or ioeventfd).

        Serves at most one queue's worth of chains (`VirtioDevice.process_queue`) and
        returns True when more are waiting: the caller kicks again once other work had
        its turn, so no queue state holds the lock (and reset, snapshot) for ever.
        """
        with self.lock:
            if not self.device.active or self.status & STATUS_DEVICE_NEEDS_RESET:
                return False
            if not 0 <= queue_index < len(self.queues) or not self.queues[queue_index].active:
                log.debug("virtio-mmio: notify of unusable queue %d ignored", queue_index)
                return False
            try:
                return bool(self.device.process_queue(queue_index))
            except (VirtQueueError, GuestMemoryError) as e:
                self._fail(f"queue {queue_index}: {e}")
                return False

    def process_device(self, action: Callable[[], None]) -> None:
        """Run `action` (a device backend's work, e.g. host data arriving) under the lock,
        with the same error handling as `notify`."""
        with self.lock:
            if not self.device.active or self.status & STATUS_DEVICE_NEEDS_RESET:
                return
            try:
                action()
            except (VirtQueueError, GuestMemoryError) as e:
                self._fail(str(e))

    # -- registers -------------------------------------------------------------------
    def _selected_queue(self) -> VirtQueue | None:
        if 0 <= self.queue_sel < len(self.queues):
            return self.queues[self.queue_sel]
        return None

    def _read_register(self, offset: int) -> int:
        q = self._selected_queue()
        if offset == REG_MAGIC_VALUE:
            return MMIO_MAGIC
        if offset == REG_VERSION:
            return MMIO_VERSION
        if offset == REG_DEVICE_ID:
            return self.device.device_type
        if offset == REG_VENDOR_ID:
            return self.vendor_id
        if offset == REG_DEVICE_FEATURES:
            if self.device_features_sel > 1:
                return 0
            return self._device_features >> (32 * self.device_features_sel)
        if offset == REG_QUEUE_NUM_MAX:
            return q.max_size if q else 0
        if offset == REG_QUEUE_READY:
            return int(q.ready) if q else 0
        if offset == REG_INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == REG_STATUS:
            return self.status
        if offset in (REG_SHM_LEN_LOW, REG_SHM_LEN_HIGH, REG_SHM_BASE_LOW, REG_SHM_BASE_HIGH):
            return self._shm_register(offset)
        if offset == REG_CONFIG_GENERATION:
            return self.config_generation
        if q is not None and offset in _QUEUE_ADDR_REGS:
            attr, high = _QUEUE_ADDR_REGS[offset]
            return getattr(q, attr) >> (32 * high)
        return 0

    def _shm_register(self, offset: int) -> int:
        """SHMLen/SHMBase of the region `shm_sel` names; all ones when there is no such region
        (virtio 1.2, 4.2.2: what a driver reads for a region id the device lacks)."""
        length = getattr(self.device, "shm_regions", dict)().get(self.shm_sel)
        base = self.shm_bases.get(self.shm_sel)
        if length is None or base is None:
            return _LOW32
        value = length if offset in (REG_SHM_LEN_LOW, REG_SHM_LEN_HIGH) else base
        return (value >> 32 if offset in (REG_SHM_LEN_HIGH, REG_SHM_BASE_HIGH) else value) & _LOW32

    def _write_register(self, offset: int, value: int) -> None:
        if offset == REG_DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == REG_DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == REG_DRIVER_FEATURES:
            self._write_driver_features(value)
        elif offset == REG_QUEUE_SEL:
            self.queue_sel = value
        elif offset == REG_QUEUE_NOTIFY:
            self.notify(value)
        elif offset == REG_INTERRUPT_ACK:
            self.interrupt_status &= ~value
        elif offset == REG_STATUS:
            self._write_status(value & 0xFF)
        elif offset == REG_SHM_SEL:
            self.shm_sel = value
        elif offset in (REG_QUEUE_NUM, REG_QUEUE_READY) or offset in _QUEUE_ADDR_REGS:
            self._write_queue_register(offset, value)
        else:
            log.debug("virtio-mmio: write of %#x to read-only/unknown register %#x", value, offset)

    def _write_driver_features(self, value: int) -> None:
        status = self.status
        if not status & STATUS_DRIVER or status & STATUS_FEATURES_OK:
            log.debug("virtio-mmio: DriverFeatures written in status %#x, ignored", status)
            return
        if self.driver_features_sel > 1:
            return
        shift = 32 * self.driver_features_sel
        self.driver_features = (self.driver_features & ~(_LOW32 << shift)) | (value << shift)

    def _write_queue_register(self, offset: int, value: int) -> None:
        q = self._selected_queue()
        # Queues are configured after FEATURES_OK and before DRIVER_OK (4.2.3.2).
        status = self.status
        if (
            q is None
            or not status & STATUS_FEATURES_OK
            or status & (STATUS_DRIVER_OK | STATUS_FAILED)
        ):
            log.debug(
                "virtio-mmio: queue register %#x written in status %#x, ignored", offset, status
            )
            return
        if offset == REG_QUEUE_NUM:
            q.size = value
        elif offset == REG_QUEUE_READY:
            q.ready = bool(value & 1)
        else:
            attr, high = _QUEUE_ADDR_REGS[offset]
            old = getattr(q, attr)
            new = (old & _LOW32) | (value << 32) if high else (old & ~_LOW32) | value
            setattr(q, attr, new)

    def _write_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        old = self.status
        if old & ~value & ~STATUS_DEVICE_NEEDS_RESET:
            log.debug("virtio-mmio: status %#x -> %#x clears bits, ignored", old, value)
            return
        new = value & ~old & ~STATUS_DEVICE_NEEDS_RESET
        accepted = old
        if new & STATUS_FAILED:
            accepted |= STATUS_FAILED
        for bit, requires in _STATUS_ORDER:
            if not new & bit:
                continue
            if accepted & STATUS_FAILED:
                break
            if requires and not accepted & requires:
                log.debug("virtio-mmio: status bit %#x without %#x, ignored", bit, requires)
                break
            if bit == STATUS_FEATURES_OK and not self._features_ok():
                break
            accepted |= bit
            if bit == STATUS_DRIVER_OK:
                self.status = accepted
                self._activate()
                return
        self.status = accepted

    def _features_ok(self) -> bool:
        feats = self.driver_features
        if feats & ~self._device_features:
            log.debug(
                "virtio-mmio: driver accepted unoffered features %#x",
                feats & ~self._device_features,
            )
            return False
        if not feats >> VIRTIO_F_VERSION_1 & 1:
            log.debug("virtio-mmio: legacy driver (no VIRTIO_F_VERSION_1) refused")
            return False
        self.device.ack_features(feats)
        return True

    def _activate(self) -> None:
        event_idx = bool(self.driver_features >> VIRTIO_F_EVENT_IDX & 1)
        indirect = bool(self.driver_features >> VIRTIO_F_INDIRECT_DESC & 1)
        try:
            for q in self.queues:
                if q.ready:
                    q.activate(self.memory, event_idx=event_idx, indirect=indirect)
            self.device.activate(self.queues, self.memory, self._irq)
        except (VirtQueueError, GuestMemoryError) as e:
            for q in self.queues:
                q.deactivate()
            self._fail(f"activation: {e}")

    # -- reset, failure, interrupts ---------------------------------------------------------
    def reset(self) -> None:
        """Device reset (the driver wrote 0 to Status): back to power-on state, disk content kept."""
        with self.lock:
            self.device.reset()
            self._reset_registers()
            self.last_error = None

    def _fail(self, reason: str) -> None:
        log.warning("virtio-mmio %s device needs reset: %s", type(self.device).__name__, reason)
        self.last_error = reason
        if self.status & STATUS_DEVICE_NEEDS_RESET:
            return
        self.status |= STATUS_DEVICE_NEEDS_RESET
        if self.status & STATUS_DRIVER_OK:
            self._irq.signal_config()

    def _raise_interrupt(self, bits: int) -> None:
        self.interrupt_status |= bits
        self._interrupt_cb()

    # -- snapshots -------------------------------------------------------------------------
    def state(self, *, include_device: bool = True) -> dict[str, Any]:
        """Registers, every queue's `QueueState` and (by default) the device's own `state()`.

        Values are ints, bools, None, str, lists and dicts (plus whatever the
        device puts under ``"device"``); the snapshot code serialises them.
        """
        with self.lock:
            st: dict[str, Any] = {
                "device_type": self.device.device_type,
                "status": self.status,
                "device_features_sel": self.device_features_sel,
                "driver_features_sel": self.driver_features_sel,
                "driver_features": self.driver_features,
                "queue_sel": self.queue_sel,
                "interrupt_status": self.interrupt_status,
                "config_generation": self.config_generation,
                "shm_sel": self.shm_sel,
                "last_error": self.last_error,
                "queues": [q.state().to_dict() for q in self.queues],
            }
            if include_device:
                st["device"] = self.device.state()
            return st

    def restore_state(self, state: dict[str, Any]) -> None:
        """Load `state()`: reset the device, restore its state if present, re-activate if it was.

        Leave out the ``"device"`` key to keep the device's current content
        (e.g. an in-place reset that rolls a disk back with `discard_to`).

        The state is checked before any of it is used: every register in its range,
        every queue against the spec and this device (`VirtQueue.restore_state`), and the
        rings of an active queue inside guest RAM. Anything else raises `DeviceStateError`
        (a snapshot is refused rather than accepted and broken at the next kick or reset).
        Whether the state agrees with the RAM it is restored with is
        `check_driver_indices`, once the last state of a chain is loaded.
        """
        if not isinstance(state, dict):
            raise DeviceStateError(f"transport state is a {type(state).__name__}, not a mapping")
        with self.lock:
            device_type = state.get("device_type")
            if device_type != self.device.device_type:
                raise DeviceStateError(
                    f"state of device type {device_type!r} for a {self.device.device_type}"
                )
            registers = {
                name: state_int(state, name, limit, default)
                for name, limit, default in _STATE_REGISTERS
            }
            last_error = state.get("last_error")
            if last_error is not None and not isinstance(last_error, str):
                raise DeviceStateError(f"last_error={last_error!r} is not a string")
            queues = state.get("queues")
            if not isinstance(queues, list) or len(queues) != len(self.queues):
                raise DeviceStateError(f"state has not the device's {len(self.queues)} queues")
            device_state = state.get("device")
            if device_state is not None and not isinstance(device_state, dict):
                raise DeviceStateError("device state is not a mapping")
            self.device.reset()
            try:
                for index, (q, qs) in enumerate(zip(self.queues, queues, strict=True)):
                    try:
                        q.restore_state(qs)
                    except VirtQueueError as e:
                        raise DeviceStateError(f"queue {index}: {e}") from None
                for name, value in registers.items():
                    setattr(self, name, value)
                self.last_error = last_error
                if device_state is not None:
                    self.device.restore_state(device_state)
                if self.status & STATUS_FEATURES_OK:
                    self.device.ack_features(self.driver_features)
                if self.status & STATUS_DRIVER_OK and not self.status & STATUS_DEVICE_NEEDS_RESET:
                    for index, q in enumerate(self.queues):
                        if q.ready:
                            try:
                                q.bind(self.memory)
                            except (VirtQueueError, GuestMemoryError) as e:
                                raise DeviceStateError(f"queue {index}: {e}") from None
                    self.device.activate(self.queues, self.memory, self._irq)
            except BaseException:
                self.device.reset()
                self._reset_registers()
                raise

    def check_driver_indices(self) -> None:
        """Raise `DeviceStateError` unless every live queue's avail index in guest RAM is
        at most a queue's worth ahead of the device's: the restored state and the restored
        RAM belong together (otherwise the next kick or vsock reset event would fail)."""
        with self.lock:
            if not self.device.active:
                return
            for index, q in enumerate(self.queues):
                if q.active:
                    try:
                        q.pending()
                    except (VirtQueueError, GuestMemoryError) as e:
                        raise DeviceStateError(f"queue {index}: {e}") from None


_STATE_REGISTERS: tuple[tuple[str, int, int | None], ...] = (
    ("status", 0xFF, None),
    ("device_features_sel", _LOW32, None),
    ("driver_features_sel", _LOW32, None),
    ("driver_features", (1 << 64) - 1, None),
    ("queue_sel", _LOW32, None),
    ("interrupt_status", 0x3, None),
    ("config_generation", _LOW32, None),
    ("shm_sel", _LOW32, 0),
)
"""The transport registers a state holds: (name, largest value, default if absent)."""


_QUEUE_ADDR_REGS: dict[int, tuple[str, int]] = {
    REG_QUEUE_DESC_LOW: ("desc_addr", 0),
    REG_QUEUE_DESC_HIGH: ("desc_addr", 1),
    REG_QUEUE_DRIVER_LOW: ("avail_addr", 0),
    REG_QUEUE_DRIVER_HIGH: ("avail_addr", 1),
    REG_QUEUE_DEVICE_LOW: ("used_addr", 0),
    REG_QUEUE_DEVICE_HIGH: ("used_addr", 1),
}
