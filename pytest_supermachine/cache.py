"""Where built and snapshotted things are kept: the user cache dir, content-addressed."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

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
