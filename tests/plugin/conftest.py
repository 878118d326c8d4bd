"""Fixtures of the plugin tier; the helpers themselves are in smhelpers.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from smhelpers import Project


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("supermachine-cache")


@pytest.fixture
def project(
    pytester: pytest.Pytester, shared_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Project]:
    yield Project(pytester, shared_cache, monkeypatch)
