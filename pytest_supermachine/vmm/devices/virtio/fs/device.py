"""virtio-fs (virtio 1.x, 5.11): a `VirtioDevice` that carries FUSE requests to a `FuseServer`.

Queue 0 is the high-priority queue (FORGET, BATCH_FORGET, INTERRUPT: no
reply), queues 1.. are request queues; every chain is one FUSE request in its
device-readable buffers and room for the reply in its device-writable ones.
The device never raises for what a request contains (`FuseServer.handle`
answers everything); only a broken queue puts it in DEVICE_NEEDS_RESET.

Configuration space is ``struct virtio_fs_config`` from ``linux/virtio_fs.h``
(``tag[36]``, ``num_request_queues``). With a `DaxWindow` the device has a
shared-memory region, id ``VIRTIO_FS_SHMCAP_ID_CACHE`` (`shm_regions`), that
the transport must expose through its SHM registers; without one it offers
no DAX and the guest falls back to the page cache.

The FUSE session (node table, handles, DAX mappings) is device state:
`state`/`restore_state` carry it and re-bind it against the host directory.
A guest reset (status 0) does not end the session on the host side: the
guest's next INIT starts a new one and DESTROY ends it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ..device import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    DeviceStateError,
    VirtioDevice,
)
from .server import OUT_HEADER, DaxWindow, FuseServer
from .uapi import VIRTIO_FS

log = logging.getLogger(__name__)

#: Device id (virtio 1.x, 5): virtio-fs.
VIRTIO_ID_FS = 26
TAG_BYTES = 36
QUEUE_SIZE = 1024
HIPRIO_QUEUE = 0
SHM_CACHE = VIRTIO_FS.const["VIRTIO_FS_SHMCAP_ID_CACHE"]


class VirtioFs(VirtioDevice):
    """virtio-fs serving one host directory under `tag` (what the guest passes to ``mount -t virtiofs``)."""

    device_type = VIRTIO_ID_FS

    def __init__(
        self,
        root: str | os.PathLike[str],
        tag: str,
        *,
        writable: bool = False,
        dax: DaxWindow | None = None,
        num_request_queues: int = 1,
    ) -> None:
        super().__init__()
        tag_b = tag.encode()
        if not tag_b or len(tag_b) > TAG_BYTES or b"\0" in tag_b:
            raise ValueError(f"virtio-fs tag must be 1..{TAG_BYTES} bytes without NUL, got {tag!r}")
        if num_request_queues < 1:
            raise ValueError("virtio-fs needs at least one request queue")
        self.tag = tag
        self.num_request_queues = num_request_queues
        self.queue_max_sizes = (QUEUE_SIZE,) * (1 + num_request_queues)
        self.server = FuseServer(root, writable=writable, dax=dax)

    @property
    def dax(self) -> DaxWindow | None:
        return self.server.dax

    def close(self) -> None:
        """Close every host fd the FUSE session holds."""
        self.server.close()

    # -- negotiation and config ---------------------------------------------------------------
    def device_features(self) -> int:
        return 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_INDIRECT_DESC | 1 << VIRTIO_F_EVENT_IDX

    def config_space(self) -> bytes:
        return VIRTIO_FS.build(
            "virtio_fs_config",
            tag=list(self.tag.encode().ljust(TAG_BYTES, b"\0")),
            num_request_queues=self.num_request_queues,
        )

    def shm_regions(self) -> dict[int, int]:
        """Shared-memory regions (id -> length) the transport exposes: the DAX window, if any."""
        return {SHM_CACHE: self.dax.size} if self.dax is not None else {}

    # -- requests ---------------------------------------------------------------------------------
    def process_queue(self, index: int) -> None:
        queue = self.queues[index]
        added = False
        while (chain := queue.pop()) is not None:
            written = 0
            if chain.writable_len >= OUT_HEADER or index == HIPRIO_QUEUE:
                reply = self.server.handle(chain.read(), chain.writable_len)
                if reply and chain.writable_len >= OUT_HEADER:
                    written = chain.write(0, reply)
            else:  # no room for even an error header: complete it with nothing written
                log.debug("virtio-fs: request without room for a reply on queue %d", index)
            queue.add_used(chain.head, written)
            added = True
        if added:
            self.signal_used(queue)

    # -- snapshots --------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        st = super().state()
        st["fuse"] = self.server.state()
        return st

    def restore_state(self, state: dict[str, Any]) -> None:
        super().restore_state(state)
        if "fuse" in state:
            try:
                self.server.restore_state(state["fuse"])
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise DeviceStateError(f"virtio-fs session state is malformed: {e!r}") from None
