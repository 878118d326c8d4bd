"""`supermachine demo` reports a guest that did not power off cleanly, and fails for it."""

from __future__ import annotations

import pytest

from pytest_supermachine.demo import demo_boot
from pytest_supermachine.guest.microguest import GuestMode


def test_a_guest_that_powers_off_cleanly_passes() -> None:
    assert demo_boot("boot and halt", vcpus=1, mode=GuestMode.HALT) is True


def test_a_guest_that_triple_faults_fails_with_the_reason(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert demo_boot("triple fault", vcpus=1, mode=GuestMode.TRIPLE_FAULT) is False
    assert (
        "supermachine demo: FAILED: triple fault: guest triple-faulted (vCPU 0): "
        "KVM_EXIT_SHUTDOWN (expected a power-off with status 0)"
    ) in capsys.readouterr().err
