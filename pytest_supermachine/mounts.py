"""`Mount`: a host directory to show inside the VM, and whether the guest may write to it.

A value type, no behaviour beyond normalising and validating what it holds:
``Mount("build/out", writable=True)``. The guest-side path is not part of it
(it is the key of the ``mounts=`` mapping), and neither are the contents: the
mount set enters a snapshot key through `Mount.key`, which names host paths
only, because the VMM serves the directory as it is when the VM reads it.

Read-only is the default. A writable mount writes through to the host: those
writes are not VM state, so neither a reset nor a restore undoes them.

``dax=True`` (read-only mounts only) gives the device a DAX window: the guest
maps file pages of the host's page cache instead of copying them (docs/fs.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Mount:
    """A host directory (`host_path`, relative paths resolve against a root dir) and its mode."""

    host_path: str
    writable: bool = False
    dax: bool = False

    def __init__(
        self, host_path: str | os.PathLike[str], writable: bool = False, *, dax: bool = False
    ) -> None:
        path = os.fspath(host_path)
        if not path or "\0" in path:
            raise ValueError(f"a mount needs a host directory path, got {host_path!r}")
        if dax and writable:
            raise ValueError("DAX is for read-only mounts (Mount(path, dax=True))")
        object.__setattr__(self, "host_path", path)
        object.__setattr__(self, "writable", bool(writable))
        object.__setattr__(self, "dax", bool(dax))

    @classmethod
    def of(cls, value: Mount | str | os.PathLike[str]) -> Mount:
        """`value` as a `Mount` (a bare path is a read-only mount)."""
        return value if isinstance(value, Mount) else cls(value)

    def resolved(self, root: str | os.PathLike[str]) -> Mount:
        """This mount with `host_path` absolute (relative to `root`), symlinks resolved;
        `NotADirectoryError` unless it names an existing directory."""
        path = Path(root, self.host_path).resolve()
        if not path.is_dir():
            raise NotADirectoryError(f"mount source {self.host_path!r} is not a directory ({path})")
        return Mount(path, self.writable, dax=self.dax)

    def key(self) -> str:
        """What a snapshot key records of this mount: the host path and the mode."""
        return f"{self.host_path}:{'rw' if self.writable else 'ro'}{':dax' if self.dax else ''}"
