"""Where built and snapshotted things are kept: the user cache dir, content-addressed."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

APP = "pytest-supermachine"


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


def cached_artifact(kind: str, key: str, name: str, build: Callable[[Path], None]) -> Path:
    """`cache_dir()/kind/key/name`, made by `build(tmpdir)` on first use.

    `build` writes `name` into the temporary directory it is given; the file is
    then renamed into place, so a reader never sees a half-built artifact and a
    killed builder leaves only a stray temp dir. A `FileLock` next to the entry
    makes concurrent processes (xdist workers) build once while the others wait.
    """
    root = cache_dir() / kind
    entry = root / key
    artifact = entry / name
    if artifact.is_file():
        return artifact
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{key}.lock")):
        if artifact.is_file():  # another process built it while we waited
            return artifact
        tmp = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=root))
        try:
            build(tmp)
            entry.mkdir(exist_ok=True)
            os.replace(tmp / name, artifact)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return artifact
