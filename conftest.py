"""The repository's own test configuration: tiers, and why a tier cannot run here.

Tiers (docs/architecture.md): `unit` (no KVM), `kvm` (microguest), `linux` (Linux guest,
slow), `plugin` (pytester), `packaging` (the wheel installed
outside the checkout, no compiler or kernel source reachable). A test's tier is its directory under tests/. A tier
whose requirements are missing is skipped with the reason printed in the
summary, never silently.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["pytester", "tests.image_fixtures"]  # image_fixtures: private_cache, mkfs_runs

TIERS = ("unit", "kvm", "linux", "plugin", "packaging")
_kvm_problem: str | bool | None = False  # False: not checked yet


def kvm_problem() -> str | None:
    """None when /dev/kvm is usable, else the reason (checked once per session)."""
    global _kvm_problem
    if _kvm_problem is False:
        from pytest_supermachine.errors import SupermachineError
        from pytest_supermachine.vmm.kvm import Kvm

        try:
            Kvm().close()
            _kvm_problem = None
        except SupermachineError as e:
            _kvm_problem = str(e)
    return _kvm_problem  # type: ignore[return-value]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = Path(config.rootpath) / "tests"
    for item in items:
        try:
            tier = Path(item.path).relative_to(root).parts[0]
        except ValueError:
            continue
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))


def pytest_runtest_setup(item: pytest.Item) -> None:
    if (
        item.get_closest_marker("kvm")
        or item.get_closest_marker("linux")
        or item.get_closest_marker("plugin")
        or item.get_closest_marker("packaging")
    ):
        problem = kvm_problem()
        if problem:
            if os.environ.get("SUPERMACHINE_REQUIRE_KVM") == "1":  # CI: a missing tier is a failure
                pytest.fail(f"SUPERMACHINE_REQUIRE_KVM=1 but /dev/kvm is unusable: {problem}")
            pytest.skip(f"needs a usable /dev/kvm: {problem}")
