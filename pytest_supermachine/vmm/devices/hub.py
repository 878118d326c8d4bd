"""The virtio devices of one machine, and the thread that serves them.

`DeviceHub` is where devices meet the machine, so that neither the devices nor
`Machine` need to know about the other's plumbing:

* placement: each device gets a 4 KiB MMIO window and an IOAPIC line from
  `layout.device_slots` (the one layout function), registered on the MMIO bus
  (register accesses reach the transport through the C core's Python path);
* doorbells: one `ioeventfd` per queue on QueueNotify (datamatch = queue index),
  so a guest kick is a cheap in-kernel signal, not an MMIO exit into Python;
* interrupts: one `irqfd` per device on its IOAPIC line;
* one event thread (`selectors`) reading the doorbells, the vsock muxer's
  host-side readiness and the NIC's frames-from-the-network fd, and calling
  the transports (the NIC's network, libslirp, polls its sockets in a thread
  of its own: see `devices/virtio/net/slirp.py`);
* state: device sections for snapshots, restore (chains applied in order so a
  disk's overlay is rebuilt base first), and in-place reset;
* `quiesced()`: holds the event thread still while the machine is captured or
  reset, so no device writes guest RAM behind the pause barrier's back.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import struct
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ...errors import MachineError
from .. import layout
from ..boot import BootDevice
from ..memory import GuestMemory
from ..snapshot.errors import SnapshotInvalid
from .mmio_bus import MmioBus
from .virtio.balloon import PageDiscarder, VirtioBalloon
from .virtio.blk import VirtioBlock
from .virtio.device import DeviceStateError
from .virtio.mmio import REG_QUEUE_NOTIFY, VirtioMmioTransport
from .virtio.net import VirtioNet
from .virtio.net.wiring import DEFAULT_MAC, build_nic
from .virtio.vsock import VirtioVsock
from .virtio.vsock.device import carried_connections

if TYPE_CHECKING:
    from ..kvm import Vm


@dataclass(frozen=True)
class VsockSpec:
    """A virtio-vsock device; the guest's CID (the host is always CID 2)."""

    guest_cid: int = 3


@dataclass(frozen=True)
class DiskSpec:
    """A virtio-blk disk over a read-only base image with a per-VM copy-on-write overlay.

    `path` is never written (None: an empty disk of `size` bytes). `read_only`
    makes the guest see a read-only device (writes fail with an I/O error).
    """

    path: str | None
    size: int | None = None
    read_only: bool = False
    serial: str = ""
    sha256: str | None = None
    """The image's content digest: snapshots record it and find the image by it."""


@dataclass(frozen=True)
class BalloonSpec:
    """A virtio-balloon device: `Machine.balloon` sizes it; `reporting` offers free page
    reporting (the guest hands freed memory back to the host); `deflate_on_oom` lets a
    guest under memory pressure take ballooned pages back (else it shrinks for real)."""

    reporting: bool = True
    deflate_on_oom: bool = False


@dataclass(frozen=True)
class NetSpec:
    """A virtio-net card behind a libslirp network (no root, no tap), egress filtered on the host.

    `allow` is the egress allow-list (``host:port`` / ``cidr:port`` patterns,
    see `virtio.net.policy`); None lets the guest reach anything the host
    reaches. The policy is part of the machine's snapshot: a restored machine
    gets exactly the egress its snapshot was made with.
    """

    allow: tuple[str, ...] | None = None
    mac: str = DEFAULT_MAC

    @classmethod
    def from_setting(cls, network: bool | Sequence[str] | NetSpec | None) -> NetSpec | None:
        """``network=`` as a user writes it: False/None (no NIC), True (anything), a list."""
        if isinstance(network, NetSpec):
            return network
        if network is None or network is False:
            return None
        if network is True:
            return cls()
        if isinstance(network, (str, bytes)) or not isinstance(network, Sequence):
            raise MachineError(
                f"network= must be False, True or a list of 'host:port' patterns, got {network!r}"
            )
        return cls(allow=tuple(network))


DeviceSpec = VsockSpec | DiskSpec | BalloonSpec | NetSpec

_KINDS: tuple[tuple[type, str], ...] = (
    (VsockSpec, "vsock"),
    (DiskSpec, "disk"),
    (BalloonSpec, "balloon"),
    (NetSpec, "net"),
)


def spec_kind(spec: DeviceSpec) -> str:
    """The device kind as snapshots name it."""
    return next(kind for cls, kind in _KINDS if isinstance(spec, cls))


def spec_to_dict(spec: DeviceSpec) -> dict[str, Any]:
    return {"kind": spec_kind(spec), **asdict(spec)}


def device_section(index: int, spec: DeviceSpec) -> str:
    """The snapshot section holding the state of the device in slot `index`."""
    return f"device/{index}-{spec_kind(spec)}"


def spec_from_dict(data: Mapping[str, Any]) -> DeviceSpec:
    fields = {k: v for k, v in data.items() if k != "kind"}
    if data.get("kind") == "vsock":
        return VsockSpec(**fields)
    if data.get("kind") == "disk":
        return DiskSpec(**fields)
    if data.get("kind") == "balloon":
        return BalloonSpec(**fields)
    if data.get("kind") == "net":
        allow = fields.get("allow")
        return NetSpec(**{**fields, "allow": None if allow is None else tuple(allow)})
    raise MachineError(f"snapshot names an unknown device kind {data.get('kind')!r}")


# ----------------------------------------------------------------------------- state encoding

#: What devices put in a snapshot and expect back; snapshot keys cover it, so a change in
#: what restore relies on rebuilds cached snapshots. 2: vsock carries its next host port.
#: 3: vsock records its connections (the agent's carried across restore and reset).
DEVICE_STATE_FORMAT = 3

_BLOB_HEADER = struct.Struct("<I")


def pack_state(state: Mapping[str, Any]) -> bytes:
    """A device state dict (JSON values plus bytes) as one section: JSON, then raw blobs.

    Bytes values become ``{"$blob": i}`` in the JSON and are appended raw, so a
    disk overlay of many MiB is stored as itself, not base64.
    """
    blobs: list[bytes] = []

    def encode(value: Any) -> Any:
        if isinstance(value, (bytes, bytearray, memoryview)):
            blobs.append(bytes(value))
            return {"$blob": len(blobs) - 1}
        if isinstance(value, dict):
            return {str(k): encode(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [encode(v) for v in value]
        return value

    head = json.dumps(encode(dict(state)), sort_keys=True).encode()
    out = [_BLOB_HEADER.pack(len(head)), head]
    for blob in blobs:
        out += [struct.pack("<Q", len(blob)), blob]
    return b"".join(out)


def unpack_state(data: bytes) -> dict[str, Any]:
    """Inverse of `pack_state`; a malformed section raises MachineError."""
    try:
        (head_len,) = _BLOB_HEADER.unpack_from(data)
        if 4 + head_len > len(data):
            raise ValueError("header past the end")
        head = json.loads(data[4 : 4 + head_len])
        blobs, pos = [], 4 + head_len
        while pos < len(data):
            (n,) = struct.unpack_from("<Q", data, pos)
            pos += 8
            if pos + n > len(data):
                raise ValueError("blob past the end")
            blobs.append(data[pos : pos + n])
            pos += n
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise MachineError(f"device state section is malformed: {e}") from None

    def decode(value: Any) -> Any:
        if isinstance(value, dict):
            if set(value) == {"$blob"}:
                return blobs[value["$blob"]]
            return {k: decode(v) for k, v in value.items()}
        if isinstance(value, list):
            return [decode(v) for v in value]
        return value

    try:
        return decode(head)
    except (IndexError, TypeError) as e:
        raise MachineError(f"device state section is malformed: {e}") from None


# ----------------------------------------------------------------------------- the hub


@dataclass
class AttachedDevice:
    """One device as placed in this machine."""

    spec: DeviceSpec
    slot: layout.DeviceSlot
    transport: VirtioMmioTransport
    irqfd: int
    doorbells: list[int]

    @property
    def section(self) -> str:
        return device_section(self.slot.index, self.spec)

    @property
    def boot_device(self) -> BootDevice:
        return BootDevice(
            self.transport.device.device_type,
            self.slot.irq,
            self.slot.mmio_base,
            self.slot.mmio_size,
        )


class DeviceHub:
    """Creates, wires, serves and snapshots the virtio devices of one machine."""

    def __init__(
        self,
        vm: Vm,
        memory: GuestMemory,
        mmio: MmioBus,
        specs: Sequence[DeviceSpec],
        *,
        discarder: PageDiscarder | None = None,
        log: Callable[[str], None] | None = None,
    ):
        """`discarder`: how a balloon gives guest pages back (None: straight onto `memory`);
        `log`: where devices report what the VM's user must see (a refused connection)."""
        self._vm = vm
        self._discarder = discarder
        self._log = log
        self.devices: list[AttachedDevice] = []
        self._activity = threading.RLock()
        self._selector = selectors.DefaultSelector()
        self._wakeup = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self._disk_marks: dict[int, int] = {}
        self._leaf_states: dict[str, dict[str, Any]] = {}
        try:
            for slot, spec in zip(layout.device_slots(len(specs)), specs, strict=True):
                self._attach(slot, spec, memory, mmio)
            self._selector.register(self._wakeup, selectors.EVENT_READ, None)
        except BaseException:
            self.close()
            raise

    def _attach(
        self, slot: layout.DeviceSlot, spec: DeviceSpec, memory: GuestMemory, mmio: MmioBus
    ) -> None:
        device: VirtioVsock | VirtioBlock | VirtioBalloon | VirtioNet
        if isinstance(spec, VsockSpec):
            device = VirtioVsock(guest_cid=spec.guest_cid)
        elif isinstance(spec, BalloonSpec):
            device = VirtioBalloon(
                reporting=spec.reporting,
                deflate_on_oom=spec.deflate_on_oom,
                discarder=self._discarder,
            )
        elif isinstance(spec, NetSpec):
            device = build_nic(spec.allow, mac=spec.mac, on_refusal=self._log)
        else:
            device = VirtioBlock(
                spec.path, size=spec.size, read_only=spec.read_only, serial=spec.serial
            )
        irqfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        transport = VirtioMmioTransport(device, memory, lambda fd=irqfd: os.eventfd_write(fd, 1))
        attached = AttachedDevice(spec, slot, transport, irqfd, [])
        self.devices.append(attached)  # registered first, so close() releases it on failure
        self._vm.irqfd(irqfd, slot.irq)
        for queue in range(len(transport.queues)):
            bell = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            attached.doorbells.append(bell)
            self._vm.ioeventfd(bell, slot.mmio_base + REG_QUEUE_NOTIFY, 4, datamatch=queue)
            self._selector.register(
                bell, selectors.EVENT_READ, (True, lambda t=transport, q=queue: t.notify(q))
            )
        if isinstance(device, (VirtioVsock, VirtioNet)):  # each drains its own wake-up fd
            self._selector.register(
                device.fileno(),
                selectors.EVENT_READ,
                (False, lambda d=device, t=transport: d.service(t)),
            )
        mmio.register(slot.mmio_base, slot.mmio_size, transport)

    # ------------------------------------------------------------------ serving

    def watch(self, fd: int, handler: Callable[[], None]) -> None:
        """Also call `handler` from the event thread whenever eventfd `fd` fires (it is drained)."""
        self._selector.register(fd, selectors.EVENT_READ, (True, handler))

    def unwatch(self, fd: int) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(fd)

    def start(self) -> None:
        """Start the event thread (idempotent)."""
        if self._thread is None and self.devices:
            self._thread = threading.Thread(
                target=self._serve, name="supermachine-devices", daemon=True
            )
            self._thread.start()

    def _serve(self) -> None:
        while not self._stopping:
            events = self._selector.select(timeout=0.5)
            with self._activity:
                for key, _mask in events:
                    if key.data is None:  # close() woke us
                        continue
                    is_doorbell, handler = key.data
                    if is_doorbell:
                        with contextlib.suppress(BlockingIOError):
                            os.eventfd_read(key.fd)
                    try:
                        if handler() is True and is_doorbell:
                            # The kick's budget ran out with chains still waiting: ring
                            # again, so they are served after everything else had a turn.
                            os.eventfd_write(key.fd, 1)
                    except Exception as e:  # a device bug: remember it, keep serving the rest
                        if self.error is None:
                            self.error = e
                for vsock in self.vsocks():
                    transport = self._transport_of(vsock)
                    vsock.service(transport)  # timers (close timeouts) and pending host data

    @contextlib.contextmanager
    def quiesced(self) -> Iterator[None]:
        """Hold the event thread still (between events) for the body."""
        with self._activity:
            yield

    def vsocks(self) -> list[VirtioVsock]:
        return [
            d.transport.device for d in self.devices if isinstance(d.transport.device, VirtioVsock)
        ]

    def vsock(self) -> VirtioVsock:
        found = self.vsocks()
        if not found:
            raise MachineError("this machine has no vsock device (MachineConfig.vsock=False)")
        return found[0]

    def balloon(self) -> tuple[VirtioBalloon, VirtioMmioTransport]:
        """The balloon device and its transport (`MachineError` if the machine has none)."""
        for d in self.devices:
            if isinstance(d.transport.device, VirtioBalloon):
                return d.transport.device, d.transport
        raise MachineError("this machine has no balloon device (MachineConfig.balloon=None)")

    def nic(self) -> VirtioNet:
        """The machine's network card; `MachineError` if it has none (``network=False``)."""
        for d in self.devices:
            if isinstance(d.transport.device, VirtioNet):
                return d.transport.device
        raise MachineError("this machine has no network card (network=False)")

    def _transport_of(self, device: object) -> VirtioMmioTransport:
        for d in self.devices:
            if d.transport.device is device:
                return d.transport
        raise KeyError(device)

    def boot_devices(self) -> list[BootDevice]:
        return [d.boot_device for d in self.devices]

    def specs(self) -> list[dict[str, Any]]:
        return [spec_to_dict(d.spec) for d in self.devices]

    # ------------------------------------------------------------------ dirty pages

    def written_pages(self) -> set[int]:
        pages: set[int] = set()
        for d in self.devices:
            pages |= d.transport.written_pages()
        return pages

    def clear_written_pages(self) -> None:
        for d in self.devices:
            d.transport.clear_written_pages()

    # ------------------------------------------------------------------ snapshots

    def capture(self, *, diff: bool) -> dict[str, bytes]:
        """Device sections; with `diff`, disks store only blocks written since the origin."""
        sections = {}
        with self._activity:
            for d in self.devices:
                state = d.transport.state(include_device=False)
                device = d.transport.device
                if isinstance(device, VirtioBlock):
                    state["device"] = device.state(
                        self._disk_marks.get(d.slot.index) if diff else None
                    )
                else:
                    state["device"] = device.state()
                sections[d.section] = pack_state(state)
        return sections

    def restore(self, chain_sections: Sequence[Mapping[str, bytes]]) -> None:
        """Load device state from a snapshot chain's sections, base first, leaf last.

        Disks apply every file's overlay in order (a diff holds only its own
        blocks); then a mark is taken, so `reset()` can roll the disk back to it.
        A state no such device could have had raises `SnapshotInvalid` (naming the
        section) before the guest runs.
        """
        with self._activity:
            for d in self.devices:
                try:
                    states = [unpack_state(s[d.section]) for s in chain_sections if d.section in s]
                    if not states:
                        raise SnapshotInvalid(d.section, "the section is missing")
                    for state in states:
                        d.transport.restore_state(state)
                    d.transport.check_driver_indices()  # the leaf's state against the chain's RAM
                except (MachineError, DeviceStateError) as e:
                    raise SnapshotInvalid(d.section, str(e)) from None
                device = d.transport.device
                if isinstance(device, VirtioBlock):
                    self._disk_marks[d.slot.index] = device.mark()
                if isinstance(device, VirtioNet):
                    device.reset_connections()  # the network behind it starts afresh
                self._leaf_states[d.section] = states[-1]  # vsock: its connections, for reset

    def reset(self) -> None:
        """Return every device to the state it had at restore (disk blocks written since dropped)."""
        with self._activity:
            for d in self.devices:
                state = dict(self._leaf_states[d.section])
                device = d.transport.device
                # the balloon's state is all state; the NIC's is its MAC and open flows
                if not isinstance(device, (VirtioBalloon, VirtioNet)):
                    state.pop("device", None)  # keep content; roll disks back by mark instead
                if isinstance(device, VirtioBlock):
                    device.discard_to(self._disk_marks[d.slot.index])
                d.transport.restore_state(state)
                if isinstance(device, VirtioVsock):
                    recorded = self._leaf_states[d.section].get("device")
                    device.rewind_connections(
                        carried_connections(recorded) if isinstance(recorded, dict) else None
                    )
                if isinstance(device, VirtioNet):
                    device.reset_connections()

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        """Stop the event thread, unregister eventfds from KVM, close devices and fds."""
        self._stopping = True
        with contextlib.suppress(OSError):
            os.eventfd_write(self._wakeup, 1)
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        for d in self.devices:
            with contextlib.suppress(Exception):
                d.transport.device.close()  # type: ignore[attr-defined]
            fds = [d.irqfd, *d.doorbells]
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.devices = []
        self._selector.close()
        with contextlib.suppress(OSError):
            os.close(self._wakeup)
