"""Helpers for the plugin tier (imported by conftest.py and the tests): pytester runs of the plugin against the microguest image.

Each test writes a small test project with `pytester` and runs pytest on it, in
process (fast: no interpreter start) unless it needs xdist or a separate process.
Runs share one snapshot cache per session unless a test asks for a cold one
(`Project.cold_cache`), so most runs find the base snapshot already built. The
snapshot cache is given on the command line (``--supermachine-cache-dir``), and
``SUPERMACHINE_CACHE_DIR`` keeps pointing at the outer run's user cache (pytester
moves HOME), so the microguest ELF is compiled once, not once per test.

Builds are counted through the plugin's own hook: the project's conftest appends
one line per built snapshot to ``builds.log`` (from every xdist worker too).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

from pytest_supermachine.cache import cache_dir

REPO = Path(__file__).resolve().parents[2]
#: The user cache of the outer run, before pytester points HOME elsewhere.
USER_CACHE = cache_dir()

BUILD_COUNTER = """
import fcntl, os

def pytest_supermachine_snapshot_built(config, snapshot, seconds):
    # one line per snapshot this process built: "<kind> <name> <key>"
    with open(os.environ["SM_BUILD_LOG"], "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(f"{snapshot.kind} {snapshot.label} {snapshot.key}\\n")
"""


#: Plugins the inner runs do without: hypothesis imports itself at the terminal summary
#: (seconds here), and the cache provider would write .pytest_cache into the projects.
QUIET_PLUGINS = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest")


class Project:
    """A pytester project with its own cache dir, capsule dir and build log."""

    def __init__(self, pytester: pytest.Pytester, cache: Path, monkeypatch: pytest.MonkeyPatch):
        self.pytester = pytester
        self.path = Path(pytester.path)
        self.cache = cache
        self.monkeypatch = monkeypatch
        self.build_log = self.path / "builds.log"
        monkeypatch.setenv("SM_BUILD_LOG", str(self.build_log))
        monkeypatch.setenv("SUPERMACHINE_CACHE_DIR", str(USER_CACHE))
        # Import the package from this checkout in subprocesses too.
        monkeypatch.setenv(
            "PYTHONPATH",
            os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
        )
        for name in list(os.environ):  # the outer run's settings must not leak in
            if name.startswith("SUPERMACHINE_") and name not in (
                "SUPERMACHINE_CACHE_DIR",
                "SUPERMACHINE_KVM_DEVICE",
            ):
                monkeypatch.delenv(name)
        self.conftest("")
        self.ini("")

    def ini(self, *lines: str) -> None:
        """The project's pytest.ini: ``[pytest]`` and `lines`.

        The plugin tier runs on the microguest (milliseconds per VM) unless a test sets
        ``supermachine_image`` itself: the product's default image is the Linux guest,
        whose own tier is tests/linux.
        """
        if not any(line.strip().startswith("supermachine_image") for line in lines):
            lines = ("supermachine_image = microguest", *lines)
        (self.path / "pytest.ini").write_text("\n".join(["[pytest]", *lines]) + "\n")

    def cold_cache(self) -> Path:
        """Switch this project to an empty snapshot cache of its own."""
        self.cache = self.path / "cold-cache"
        return self.cache

    def args(self, args: tuple[str, ...]) -> list[str]:
        cache = (
            []
            if any(a.startswith("--supermachine-cache-dir") for a in args)
            else [f"--supermachine-cache-dir={self.cache}"]
        )
        return [*QUIET_PLUGINS, *cache, *args]

    def conftest(self, source: str) -> None:
        """The project's conftest.py: the build counter plus `source`."""
        self.pytester.makeconftest(BUILD_COUNTER + source)

    def write(self, name: str, source: str) -> Path:
        path = self.path / name
        path.write_text(source)
        return path

    def run(self, *args: str) -> pytest.RunResult:
        """pytest in this process (the plugin's state lives in the run's config)."""
        return self.pytester.runpytest_inprocess(*self.args(args))

    def run_subprocess(self, *args: str, timeout: float = 300) -> pytest.RunResult:
        return self.pytester.runpytest_subprocess(*self.args(args), timeout=timeout)

    def builds(self) -> list[str]:
        """What was built since the log was last cleared: "<kind> <label> <key>" lines."""
        if not self.build_log.exists():
            return []
        return self.build_log.read_text().splitlines()

    def clear_builds(self) -> None:
        self.build_log.unlink(missing_ok=True)

    def cli(self, *args: str, stdin: str | None = None, timeout: float = 300) -> pytest.RunResult:
        """The `supermachine` command in a subprocess."""
        return self.pytester.run(
            sys.executable,
            "-m",
            "pytest_supermachine",
            *args,
            stdin=stdin if stdin is None else stdin.encode(),
            timeout=timeout,
        )

    def capsules(self) -> list[Path]:
        root = self.path / ".supermachine" / "failures"
        return (
            sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
            if root.is_dir()
            else []
        )

    def manifest(self, capsule: Path) -> dict:
        return json.loads((capsule / "manifest.json").read_text())


def summary_numbers(result: pytest.RunResult) -> dict[str, int]:
    """The counts of the plugin's terminal summary section."""
    text = "\n".join(result.outlines)
    out: dict[str, int] = {}
    m = re.search(r"VMs handed out: (\d+) \((\d+) reset in place, (\d+) restored", text)
    if m:
        out.update(handouts=int(m[1]), reset=int(m[2]), restored=int(m[3]))
    m = re.search(r"snapshots: (\d+) built(?: in [\d.]+ s)?, (\d+) reused", text)
    if m:
        out.update(built=int(m[1]), reused=int(m[2]))
    m = re.search(r"failure capsules written: (\d+)", text)
    if m:
        out["capsules"] = int(m[1])
    return out
