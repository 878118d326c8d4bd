"""setuptools shim: pyproject.toml holds the metadata; this wires what it cannot declare.

- The cffi extension (``pytest_supermachine.vmm._core``).
- The guests a wheel carries: after ``build_py``, the package's own builders
  (``python -m pytest_supermachine.bundle``) build or take from the user cache the
  microguest, the Linux agent, the initramfs and the guest kernel of both variants, and
  stage them under ``build/lib/pytest_supermachine/bundled/``. So ``python -m build``,
  ``pip wheel .`` and ``pip install .`` give a wheel whose installs need no compiler and
  no kernel source. An editable install (``pip install -e``) skips this: a checkout
  builds its guests on first use. ``SUPERMACHINE_WHEEL_GUESTS=none`` skips it too (a
  wheel that builds its guests where it is installed).

The sdist carries the sources and the kernel recipe, never built guests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
GUESTS_ENV = "SUPERMACHINE_WHEEL_GUESTS"


class BuildPyWithGuests(build_py):
    """``build_py``, then the prebuilt guests staged into the build tree (not for editables)."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        if os.environ.get(GUESTS_ENV, "").strip().lower() == "none":
            print(f"{GUESTS_ENV}=none: the wheel carries no prebuilt guests", file=sys.stderr)
            return
        dest = Path(self.build_lib) / "pytest_supermachine" / "bundled"
        shutil.rmtree(dest, ignore_errors=True)  # no stale entry from an earlier build
        # A subprocess, from the tree being built: setup.py itself must not import the
        # package (its run-time dependencies need not be in the build environment).
        subprocess.run(
            [sys.executable, "-m", "pytest_supermachine.bundle", str(dest)], cwd=HERE, check=True
        )


setup(
    cffi_modules=["pytest_supermachine/vmm/_build.py:ffibuilder"],
    cmdclass={"build_py": BuildPyWithGuests},
    # The C core uses only the stable ABI (cffi builds _core.abi3.so): one wheel serves
    # every CPython >= 3.10.
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
