"""The mounts of a machine: a ``mounts=`` mapping as virtio-fs devices, and how the guest learns them.

``Machine(mounts={"/src": ".", "/out": Mount("build/out", writable=True)})``
attaches one virtio-fs device (`FsSpec`) per mount. Guarantees:

* **Order and tags are deterministic**: mounts are sorted by guest path (so a
  parent is mounted before a mount inside it) and mount *i* gets the tag
  ``smfs<i>``; the same mapping always gives the same devices, slots and
  command line, which is what lets a snapshot key name a mount set.
* **Host paths are absolute and resolved** (`Mount.resolved`: symlinks followed,
  relative paths against `root`, default the current directory); a missing
  directory is an error before any VM exists.
* **Guest paths are plain**: absolute, normalised, not ``/``, not under ``/proc``,
  ``/sys``, ``/dev`` or ``/.supermachine``, and without whitespace, ``,``, ``:``,
  quotes or backslashes (they travel on the kernel command line).
* **The guest is told on its command line**: `cmdline_token` gives
  ``sm.mounts=<tag>:<ro|rw>[+dax]:<guest path>[,...]``, which the Linux agent's init
  (guest/agent/init.c) reads at boot to ``mount -t virtiofs <tag> <guest path>``
  (``ro`` mounts with ``MS_RDONLY``, so writes fail with EROFS in the guest
  before they reach the host, where the server refuses them again). Only a Linux
  guest reads it: the microguest has no FUSE, and `Machine.boot_direct64`
  refuses a machine with mounts.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable, Mapping
from typing import TypeAlias

from ..errors import MachineError
from ..mounts import Mount
from .devices.hub import FsSpec

#: What ``mounts=`` accepts: guest path -> Mount or host path; or specs already made.
MountsArg: TypeAlias = "Mapping[str, Mount | str | os.PathLike[str]] | Iterable[FsSpec]"

TAG_PREFIX = "smfs"
#: The DAX window of a ``Mount(..., dax=True)``: Linux maps files in 2 MiB ranges and
#: reclaims them when the window is full, so this bounds the mapped working set, not
#: the file sizes. Each window costs the guest struct pages (16 KiB per 2 MiB) at boot.
DAX_WINDOW_MIB = 256
CMDLINE_KEY = "sm.mounts"
RESERVED_GUEST_DIRS = ("/proc", "/sys", "/dev", "/.supermachine")
_FORBIDDEN_CHARS = frozenset(" \t\n\r\v\f,:\"'\\\0")


def check_guest_path(path: str) -> str:
    """`path` if the guest may mount something there (see the module docstring); else ValueError."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise ValueError(f"a guest mount path must be absolute, got {path!r}")
    if path == "/" or posixpath.normpath(path) != path or path.startswith("//"):
        raise ValueError(f"a guest mount path must be normalised and not '/', got {path!r}")
    bad = sorted(set(path) & _FORBIDDEN_CHARS)
    if bad:
        raise ValueError(f"a guest mount path must not contain {bad!r}, got {path!r}")
    for reserved in RESERVED_GUEST_DIRS:
        if path == reserved or path.startswith(reserved + "/"):
            raise ValueError(f"the guest needs {reserved} for itself; cannot mount at {path!r}")
    return path


def mount_specs(
    mounts: MountsArg, root: str | os.PathLike[str] | None = None
) -> tuple[FsSpec, ...]:
    """The virtio-fs devices for `mounts`, in slot order; `MachineError` for a bad mount.

    `mounts` maps guest paths to a `Mount` or a host path (a read-only mount);
    relative host paths resolve against `root` (default: the current directory).
    Specs (`FsSpec`, e.g. from a snapshot) are taken as they are.
    """
    if not isinstance(mounts, Mapping):
        specs = tuple(mounts)
        if not all(isinstance(s, FsSpec) for s in specs):
            raise MachineError(
                f"mounts must be a mapping of guest path to host path, got {mounts!r}"
            )
        return specs  # type: ignore[return-value]
    base = os.fspath(root) if root is not None else os.getcwd()
    resolved: list[tuple[str, Mount]] = []
    for guest_path, value in mounts.items():
        try:
            check_guest_path(guest_path)
            mount = Mount.of(value).resolved(base)
        except (ValueError, TypeError, OSError) as e:
            raise MachineError(f"mount {guest_path!r}: {e}") from None
        resolved.append((guest_path, mount))
    resolved.sort()
    return tuple(
        FsSpec(
            f"{TAG_PREFIX}{i}",
            mount.host_path,
            guest_path,
            mount.writable,
            DAX_WINDOW_MIB if mount.dax else 0,
        )
        for i, (guest_path, mount) in enumerate(resolved)
    )


def cmdline_token(specs: Iterable[FsSpec]) -> str:
    """The ``sm.mounts=`` token telling the Linux guest what to mount where ("" for none)."""
    entries = [
        f"{s.tag}:{'rw' if s.writable else 'ro'}{'+dax' if s.dax_mib else ''}:{s.guest_path}"
        for s in specs
    ]
    return f"{CMDLINE_KEY}={','.join(entries)}" if entries else ""


def key_of(specs: Iterable[FsSpec]) -> str:
    """What a snapshot key records of a mount set: guest path, host path, mode; never contents."""
    return ",".join(
        f"{s.guest_path}={Mount(s.host_path, s.writable, dax=bool(s.dax_mib)).key()}" for s in specs
    )
