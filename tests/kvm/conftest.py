"""Fixtures for the microguest tier: the built guest, and machines that are always stopped."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_supermachine.vmm.machine import Machine


@pytest.fixture(scope="session")
def microguest_elf() -> Path:
    from pytest_supermachine.guest.microguest import build_microguest

    return build_microguest()


@pytest.fixture
def make_machine(microguest_elf: Path) -> Iterator[Callable[..., Machine]]:
    """Build microguest machines: make_machine(mode, arg=0, vcpus=1, mem_mib=64)."""
    machines: list[Machine] = []

    def make(
        mode: int, arg: int = 0, *, vcpus: int = 1, mem_mib: int = 64, **cfg: object
    ) -> Machine:
        m = Machine(vcpus=vcpus, mem_mib=mem_mib, **cfg)
        machines.append(m)
        m.boot_direct64(microguest_elf, mode=mode, arg=arg)
        return m

    yield make
    for m in machines:
        m.stop()
