"""virtio-fs: host directories in the guest (device model, FUSE server, confinement, DAX seam)."""

from .device import VIRTIO_ID_FS, VirtioFs
from .server import DaxWindow, FuseServer

__all__ = ["VIRTIO_ID_FS", "DaxWindow", "FuseServer", "VirtioFs"]
