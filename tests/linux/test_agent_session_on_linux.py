"""On the Linux guest the agent session survives reset: no vsock connect, no handshake.

Reconnecting is what made a Linux reset + exec cost ~2.6 s more than an exec (the
guest kernel accepting a new connection, the agent's handshake); a snapshot taken with
the agent connected carries the connection, so `Machine.agent_connects` stays 0.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_supermachine.vmm.machine import Machine


@pytest.fixture(scope="module")
def session_snapshot(linux_snapshot: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tier's snapshot with the agent connected and idle (a diff on top of it)."""
    path = tmp_path_factory.mktemp("session") / "session.snap"
    with Machine.restore(linux_snapshot) as m:
        assert m.run("true", timeout=300).ok
        m.snapshot(path)
    return path


def test_reset_and_run_on_linux_need_no_reconnect(session_snapshot: Path):
    with Machine.restore(session_snapshot) as m:
        for i in range(3):
            r = m.run(f"echo {i}; echo written > /tmp/by-test", timeout=300)
            assert r.stdout == f"{i}\n".encode()
            m.reset()
        assert m.run("cat /tmp/by-test", timeout=300).returncode != 0  # the reset undid it
        assert m.agent_connects == 0


def test_on_linux_a_session_closed_by_the_host_falls_back_to_reconnecting(session_snapshot: Path):
    with Machine.restore(session_snapshot) as m:
        m.agent().close()
        assert m.run("echo again", timeout=300).stdout == b"again\n"
        assert m.agent_connects == 1
