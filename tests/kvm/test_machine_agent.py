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


def test_run_after_reset_reconnects_to_the_agent(agent_machine, tmp_path):
    from pytest_supermachine.vmm.machine import Machine

    agent_machine.snapshot(tmp_path / "ready.snap")
    with Machine.restore(tmp_path / "ready.snap") as r:
        assert r.run("echo one").stdout == b"one\n"
        r.reset()
        assert r.run("echo two").stdout == b"two\n"
