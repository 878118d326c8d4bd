"""The device model interface, separate from transport and queue (rust-vmm style).

A `VirtioDevice` knows its device type, feature bits, configuration space and
how to serve its queues. It knows nothing about MMIO registers, interrupt
lines or ioeventfds: the transport (`mmio.VirtioMmioTransport`) negotiates
features, builds the `VirtQueue` objects from the driver's register writes,
hands them over in `activate`, and turns any `VirtQueueError` or
`GuestMemoryError` the device raises into ``DEVICE_NEEDS_RESET``.

A device therefore never validates guest addresses itself (the queue and
`DeviceMemory` do) and never raises for bad guest requests that the device
protocol can answer with an error status.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Protocol

from ....errors import SupermachineError
from ...memory import DeviceMemory
from .queue import VirtQueue

# Device status register bits (virtio 1.x, 2.1).
STATUS_ACKNOWLEDGE = 0x01
STATUS_DRIVER = 0x02
STATUS_DRIVER_OK = 0x04
STATUS_FEATURES_OK = 0x08
STATUS_DEVICE_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80

# Reserved (device-independent) feature bits (virtio 1.x, 6).
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32

# Device ids (virtio 1.x, 5): the one definition; the boot info (bootinfo.h SM_DEV_*) mirrors them.
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_VSOCK = 19


class DeviceStateError(SupermachineError, ValueError):
    """A saved device state (from a snapshot) that no device of this kind could have had.

    Raised by `restore_state` before the state is used; the snapshot code names the
    file and section (`SnapshotInvalid`).
    """


def state_int(state: dict[str, Any], key: str, limit: int, default: int | None = None) -> int:
    """`state[key]` as an integer in 0..`limit`, or `DeviceStateError` (`default` if absent)."""
    value = state.get(key, default)
    if type(value) is not int or not 0 <= value <= limit:
        raise DeviceStateError(f"{key}={value!r} is not an integer 0..{limit:#x}")
    return value


class Interrupt(Protocol):
    """What a device may ask of its transport's interrupt line."""

    def signal_used_queue(self) -> None:
        """The device put buffers in a used ring (already filtered by `VirtQueue.needs_notification`)."""

    def signal_config(self) -> None:
        """The device changed its configuration space."""


class VirtioDevice(ABC):
    """Base class of device models: defaults for everything but `process_queue`.

    Subclasses set `device_type` and `queue_max_sizes`, override
    `device_features`, `config_space` (or `read_config`/`write_config`) and
    `process_queue`, and extend `state`/`restore_state` with their own state.

    Guarantees the transport relies on: `activate` is called at most once
    between resets, only with queues that passed validation; `process_queue`
    is called only while active; `reset` returns the device to its pre-
    activation state but keeps what is not driver state (a disk's contents).
    """

    device_type: int = 0
    #: Maximum size of each queue, one entry per queue (powers of two).
    queue_max_sizes: tuple[int, ...] = ()

    def __init__(self) -> None:
        self.acked_features = 0
        self.queues: list[VirtQueue] = []
        self.memory: DeviceMemory | None = None
        self.interrupt: Interrupt | None = None

    # -- negotiation ---------------------------------------------------------
    def device_features(self) -> int:
        """Feature bits offered to the driver; must include `VIRTIO_F_VERSION_1`."""
        return 1 << VIRTIO_F_VERSION_1

    def ack_features(self, features: int) -> None:
        """The driver accepted `features` (a subset of `device_features`) at FEATURES_OK."""
        self.acked_features = features

    def has_feature(self, bit: int) -> bool:
        return bool(self.acked_features >> bit & 1)

    # -- configuration space ----------------------------------------------------
    def config_space(self) -> bytes:
        """The device-specific configuration structure (little endian)."""
        return b""

    def read_config(self, offset: int, size: int) -> bytes:
        """`size` bytes at `offset`; bytes past the structure read as zero."""
        cfg = self.config_space()
        data = cfg[offset : offset + size] if 0 <= offset < len(cfg) else b""
        return data + bytes(size - len(data))

    def write_config(self, offset: int, data: bytes) -> None:  # noqa: B027 - optional hook
        """Driver writes to configuration space; ignored unless a device has writable fields."""

    # -- lifecycle ---------------------------------------------------------------
    @property
    def active(self) -> bool:
        return self.memory is not None

    def activate(self, queues: list[VirtQueue], memory: DeviceMemory, interrupt: Interrupt) -> None:
        """Start serving: the queues are validated and bound to `memory`."""
        self.queues = queues
        self.memory = memory
        self.interrupt = interrupt

    @abstractmethod
    def process_queue(self, index: int) -> bool:
        """The driver kicked queue `index`: serve what it made available, up to `size` chains.

        One kick serves at most one queue's worth of chains, so a driver that keeps the
        ring full (or a state that would make the device's own writes look like new work)
        cannot hold the transport lock forever. Returns True when chains are still
        waiting: the transport then asks to be called again after other work.
        """

    def reset(self) -> None:
        """Driver reset (status 0): forget queues, features and memory; keep device content."""
        self.acked_features = 0
        self.queues = []
        self.memory = None
        self.interrupt = None

    def state(self) -> dict[str, Any]:
        """Device state beyond queues and transport registers (those the transport saves)."""
        return {"acked_features": self.acked_features}

    def restore_state(self, state: dict[str, Any]) -> None:
        """Load `state()`; the transport re-activates the device afterwards if it was active.

        A state this device could not have had raises `DeviceStateError`.
        """
        self.acked_features = state_int(state, "acked_features", (1 << 64) - 1, 0)

    # -- helpers for subclasses -----------------------------------------------------
    def signal_used(self, queue: VirtQueue) -> bool:
        """Interrupt the driver if `queue` asks for it (event idx / NO_INTERRUPT); True if sent."""
        if self.interrupt is not None and queue.needs_notification():
            self.interrupt.signal_used_queue()
            return True
        return False
