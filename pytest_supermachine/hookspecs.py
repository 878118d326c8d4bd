"""Hooks other plugins and conftest files may implement (``pytest_supermachine_*``).

Registered through ``pytest_addhooks``, so they exist in every session that loads
the plugin, with or without xdist. None of them runs at collection time: they are
called when a test first needs a VM.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .fixtures.factory import SnapshotInfo
    from .images.image import Image


@pytest.hookspec(firstresult=True)
def pytest_supermachine_image(config: pytest.Config, name: str) -> Image | None:
    """Return the `Image` to use for image name `name`, or None to leave it to others.

    Lets a plugin or conftest provide its own guest image (or replace a bundled one).
    The first non-None result wins. The plugin's own implementation runs last
    (``trylast``) and answers with the images added by `register_image` and the
    bundled ones (``microguest``, ``linux``, ``default``); no answer at all is an
    unknown image.
    """


def pytest_supermachine_cache_key(
    config: pytest.Config, kind: str, name: str, parts: Mapping[str, bytes | str]
) -> Mapping[str, Any] | None:
    """Return extra parts for the cache key of a snapshot, or None.

    `kind` is ``"base"`` (`name` is the image) or ``"layer"`` (`name` is the layer);
    `parts` are the parts already in the key (read-only). Anything the guest's state
    depends on and the plugin cannot see (a file the image or a layer reads, an
    environment variable) belongs here: a change in a returned value gives a new key,
    so the snapshot and everything stacked on it is rebuilt. Values that are not
    bytes or str are keyed by their ``repr``.
    """


def pytest_supermachine_snapshot_built(
    config: pytest.Config, snapshot: SnapshotInfo, seconds: float
) -> None:
    """Called after this process built a base or layer snapshot (not on cache hits)."""


def pytest_supermachine_capsule_written(
    item: pytest.Item, path: Any, manifest: Mapping[str, Any]
) -> None:
    """Called after a failure capsule of `item` was written to directory `path`."""
