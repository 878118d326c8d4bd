"""What a test needs of the host, and what a missing need does: skip here, fail in CI.

A developer's machine may lack root, namespaces or loop devices; there the test is
skipped with the reason in the summary. CI sets ``SUPERMACHINE_REQUIRE_KVM=1`` (as for
the KVM tiers, see conftest.py) and has everything, so there a missing need fails the
test: an environment gap can never keep CI green.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NoReturn, TypeVar

import pytest

Test = TypeVar("Test", bound=Callable[..., object])


def required() -> bool:
    """True where every host requirement must be met (CI)."""
    return os.environ.get("SUPERMACHINE_REQUIRE_KVM") == "1"


def missing(problem: str) -> NoReturn:
    """End the running test because the host lacks something: a skip, or in CI a failure."""
    if required():
        pytest.fail(f"SUPERMACHINE_REQUIRE_KVM=1 but this host cannot run the test: {problem}")
    pytest.skip(problem)


def needs(problem: str | None) -> Callable[[Test], Test]:
    """Decorate a test that cannot run when `problem` (a reason, or None when all is there) is set.

    The test is replaced by one that requests no fixtures (they may need what is missing)
    and ends through `missing`.
    """

    def decorate(test: Test) -> Test:
        if problem is None:
            return test

        def unmet() -> None:
            missing(problem)

        for attr in ("__name__", "__qualname__", "__doc__", "__module__"):
            setattr(unmet, attr, getattr(test, attr))
        unmet.pytestmark = list(getattr(test, "pytestmark", []))  # type: ignore[attr-defined]
        return unmet  # type: ignore[return-value]

    return decorate
