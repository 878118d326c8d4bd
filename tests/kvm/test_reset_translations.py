"""A reset on nested PVM makes KVM drop the translations it built from the guest's page tables.

kvm_pvm shadows the guest's page tables and does not see the host put pages back, so
`Machine.reset` deletes and re-adds the RAM slots there (hardware KVM walks the guest's
tables itself and skips it). A guest that never rewrites its page tables (the microguest)
may keep them: `Machine.guest_writes_page_tables`, set by `MicroguestImage.prepare`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_supermachine.guest.microguest import GuestMode
from pytest_supermachine.images.microguest import MicroguestImage
from pytest_supermachine.vmm.machine import Machine


@pytest.fixture
def restored(make_machine, tmp_path: Path) -> Iterator[Machine]:
    booted = make_machine(GuestMode.AGENT)
    booted.start()
    booted.wait_ready(60)
    assert booted.run("true").ok
    booted.snapshot(tmp_path / "agent.snap")
    with Machine.restore(tmp_path / "agent.snap") as m:
        yield m


def count_slot_reregistrations(machine: Machine, monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    calls: list[bool] = []
    register = machine._register_ram

    def spy(*, again: bool = False) -> None:
        calls.append(again)
        register(again=again)

    monkeypatch.setattr(machine, "_register_ram", spy)
    return calls


def test_a_reset_re_registers_the_ram_slots_exactly_on_nested_pvm(restored, monkeypatch):
    calls = count_slot_reregistrations(restored, monkeypatch)
    restored.reset()
    assert calls == ([True] if restored.kvm.pvm else [])
    assert restored.run("true").ok


def test_a_prepared_microguest_keeps_kvms_translations_and_runs_after_resets(restored, monkeypatch):
    MicroguestImage().prepare(restored)
    calls = count_slot_reregistrations(restored, monkeypatch)
    for _ in range(20):
        restored.reset()
        assert restored.run("true").ok
    assert calls == []
