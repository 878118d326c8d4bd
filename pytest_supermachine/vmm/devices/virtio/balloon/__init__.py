"""virtio-balloon: inflate/deflate on request and free page reporting (device model, page sink)."""

from .device import (
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_REPORTING,
    VIRTIO_ID_BALLOON,
    BalloonStats,
    VirtioBalloon,
    reporting_order,
    reporting_order_cmdline,
)
from .pages import MemoryDiscarder, PageDiscarder

__all__ = [
    "VIRTIO_BALLOON_F_DEFLATE_ON_OOM",
    "VIRTIO_BALLOON_F_REPORTING",
    "VIRTIO_ID_BALLOON",
    "BalloonStats",
    "MemoryDiscarder",
    "PageDiscarder",
    "VirtioBalloon",
    "reporting_order",
    "reporting_order_cmdline",
]
