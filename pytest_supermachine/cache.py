"""Where built and snapshotted things are kept: the user cache dir, content-addressed.

Everything we build once and reuse (the microguest, the agent, the initramfs, the
guest kernel, ext4 root filesystems) goes through `build_once`, the one helper that
makes a cache entry exactly once across processes and never shows a half-built one.
Snapshots have their own cache with the same guarantees (snapshot_store.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

APP = "pytest-supermachine"
#: Written last into every `build_once` entry: its presence means the entry is complete.
MANIFEST_NAME = "manifest.json"


def cache_dir() -> Path:
    """`$SUPERMACHINE_CACHE_DIR`, else `$XDG_CACHE_HOME/pytest-supermachine`, else ~/.cache/…"""
    explicit = os.environ.get("SUPERMACHINE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / APP


def content_key(*parts: bytes | str) -> str:
    """A short stable hash of the given parts (order matters), for cache entry names."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:24]


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Write `data` as JSON to `path` by temp file + rename (readers never see half a file)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def build_once(
    kind: str,
    key: str,
    fill: Callable[[Path], Mapping[str, object] | None],
    *,
    root: Path | None = None,
    on_wait: Callable[[], None] | None = None,
    keep_failed: bool = False,
) -> Path:
    """The complete cache entry ``<root>/<kind>/<key>/``, made by ``fill(entry)`` if missing.

    ``root`` defaults to `cache_dir()`. ``fill`` writes its files into the empty entry
    directory and returns extra fields for the entry's manifest (``manifest.json``,
    written last, atomically: an entry is complete exactly when it has one, so a
    reader never takes a half-built entry). A `FileLock` next to the entry makes
    concurrent processes (xdist workers) build once while the others wait; a
    complete entry is returned without taking it. ``on_wait`` is called before
    waiting for the lock (the entry was missing: a build may be about to start).

    An incomplete entry (left by a build that failed or was killed) is cleared by
    the next build. If ``fill`` raises, the entry is removed, unless ``keep_failed``
    (then its files stay for inspection until the next attempt).

    With the default ``root``, an entry the installed wheel carries (`bundled_entry`)
    is returned when the user cache has none: the user's own build wins, the bundled
    one saves the build (and the compiler) otherwise.
    """
    base = (root if root is not None else cache_dir()) / kind
    entry = base / key
    if (entry / MANIFEST_NAME).is_file():
        return entry
    if root is None and (bundled := bundled_entry(kind, key)) is not None:
        return bundled
    base.mkdir(parents=True, exist_ok=True)
    if on_wait is not None:
        on_wait()
    from filelock import FileLock  # lazy: loading the plugin must stay cheap

    with FileLock(str(base / f"{key}.lock")):
        if (entry / MANIFEST_NAME).is_file():  # another process built it while we waited
            return entry
        if entry.exists():
            shutil.rmtree(entry)
        entry.mkdir()
        start = time.monotonic()
        try:
            extra = dict(fill(entry) or {})
        except BaseException:
            if not keep_failed:
                shutil.rmtree(entry, ignore_errors=True)
            raise
        write_json_atomic(
            entry / MANIFEST_NAME,
            {"key": key, **extra, "build_seconds": round(time.monotonic() - start, 2)},
        )
    return entry


def bundled_entry(kind: str, key: str) -> Path | None:
    """The complete entry ``kind/key`` among the wheel's prebuilt guests, if it carries one.

    Same layout and completeness rule as a cache entry (a manifest), read-only.
    """
    from .package_data import bundled_dir  # lazy: the report header's cache_dir needs none

    entry = bundled_dir() / kind / key
    return entry if (entry / MANIFEST_NAME).is_file() else None


def cached_artifact(kind: str, key: str, name: str, build: Callable[[Path], None]) -> Path:
    """The file ``<cache>/kind/key/name``, made by ``build(scratch)`` through `build_once`.

    ``build`` writes `name` into the empty scratch directory it is given; only that
    file is kept (by-products such as object files go with the scratch directory).
    """

    def fill(entry: Path) -> None:
        scratch = entry / ".build"
        scratch.mkdir()
        build(scratch)
        os.replace(scratch / name, entry / name)
        shutil.rmtree(scratch)

    return build_once(kind, key, fill) / name
