"""Loads the compiled C core, rebuilding it in a development checkout whose sources changed.

An installed package always has a current `_core` (built at install time, and an
installed file's mtime says nothing about its sources: no rebuild there, the user
may have no compiler). In an editable checkout (the package directory sits next to
``pyproject.toml``) the C sources can change after `pip install -e .`; a stale
extension would silently run old code, so when the sources are newer than the
built module we rebuild it in place before importing.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

from ..package_data import package_path

HERE = package_path("pytest_supermachine.vmm")
#: Present only in a source checkout (an editable install), never in an installed wheel.
CHECKOUT_MARKER = HERE.parents[1] / "pyproject.toml"
_SOURCES = [
    HERE / "_core.c",
    HERE / "_core.h",
    HERE / "_build.py",
    HERE.parent / "guest" / "microguest" / "bootinfo.h",
]


def _built_module() -> Path | None:
    found = sorted(HERE.glob("_core*.so"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def _stale() -> bool:
    built = _built_module()
    if built is None:
        return True
    sources = [p for p in _SOURCES if p.exists()]
    return bool(sources) and max(p.stat().st_mtime for p in sources) > built.stat().st_mtime


def _rebuild() -> None:
    import sys
    import tempfile

    sys.path.insert(0, str(HERE))
    try:
        spec = importlib.util.spec_from_file_location("_sm_build", HERE / "_build.py")
        assert spec and spec.loader
        build: Any = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(build)
    finally:
        sys.path.remove(str(HERE))
    with tempfile.TemporaryDirectory(prefix="sm-core-") as tmp:
        out = Path(build.ffibuilder.compile(tmpdir=tmp))
        for old in HERE.glob("_core*.so"):
            old.unlink()
        target = HERE / out.name
        tmp_target = target.with_suffix(".so.tmp")
        tmp_target.write_bytes(out.read_bytes())
        tmp_target.replace(target)


def load() -> ModuleType:
    """Import `pytest_supermachine.vmm._core`, rebuilding first if a checkout's sources changed."""
    if CHECKOUT_MARKER.is_file() and _stale():
        from filelock import FileLock

        with FileLock(str(HERE / ".core-build.lock")):  # xdist workers rebuild once
            if _stale():
                _rebuild()
    return importlib.import_module("pytest_supermachine.vmm._core")


_core = load()
ffi: Any = _core.ffi
lib: Any = _core.lib
