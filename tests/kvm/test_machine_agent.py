"""Machine-level behaviour of the agent connection: stops, resets and restores."""

from __future__ import annotations

import time

import pytest

from pytest_supermachine.errors import GuestCrashed
from pytest_supermachine.guest.microguest import GuestMode


@pytest.fixture
def agent_machine(make_machine):
    m = make_machine(GuestMode.AGENT)
    m.start()
    m.wait_ready(60)
    return m


def test_a_guest_that_crashes_during_run_raises_guest_crashed_at_once(agent_machine):
    t0 = time.monotonic()
    with pytest.raises(GuestCrashed, match=r"(?s)panicked.*console tail.*exception 6"):
        agent_machine.run("crash", timeout=60)
    assert time.monotonic() - t0 < 10  # not the 60 s command timeout
