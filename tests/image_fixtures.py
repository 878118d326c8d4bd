"""Fixtures shared by the image-builder tests (ext4 and OCI): a private cache, an mkfs counter.

Registered by the root conftest (pytest_plugins); tests/unit/test_rootfs.py and test_oci.py use
`private_cache` for every test (a build must not find another test's entry).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_supermachine.images import rootfs


@pytest.fixture
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("SUPERMACHINE_CACHE_DIR", str(cache))
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    return cache


@pytest.fixture
def mkfs_runs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Path]]:
    """Records every mkfs.ext4 run (its source directory)."""
    runs: list[Path] = []
    real = rootfs._run_mkfs

    def counting(mkfs: str, src: Path, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        runs.append(src)
        return real(mkfs, src, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(rootfs, "_run_mkfs", counting)
    yield runs
