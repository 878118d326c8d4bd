"""The agent session is part of the machine's state: it survives reset and restore.

A snapshot taken while the agent connection is idle records it (the vsock connection's
ports and credit counters, the client's protocol state); the guest's side is in the
snapshot's RAM. A machine restored from it, or reset to it, runs its next command
without a vsock connect and without a handshake: `Machine.agent_connects` counts the
connections a machine opened. Where the guest's side is gone, the machine reconnects.
"""

from __future__ import annotations

import pytest

from pytest_supermachine.errors import GuestCrashed
from pytest_supermachine.vmm.agent import AgentError
from pytest_supermachine.vmm.machine import Machine


def test_a_machine_restored_from_a_session_snapshot_runs_without_connecting(restored):
    assert restored.run("echo carried").stdout == b"carried\n"
    assert restored.agent_connects == 0


def test_reset_brings_the_session_back_with_the_guest(restored):
    for i in range(5):
        assert restored.run(f"echo {i}").stdout == f"{i}\n".encode()
        restored.write_file("/f", b"x" * 5000)
        assert restored.run("cat /f", input=b"").stdout == b"x" * 5000
        restored.reset()
    assert restored.run("cat /f").returncode != 0  # the file went with the reset
    assert restored.agent_connects == 0
    assert restored.stats()["agent_connects"] == 0


def test_reset_after_the_guest_crashed_needs_no_reconnect(restored):
    with pytest.raises(GuestCrashed):
        restored.run("crash", timeout=60)
    restored.reset()
    assert restored.run("echo back").stdout == b"back\n"
    assert restored.agent_connects == 0


def test_a_session_the_host_closed_is_replaced_by_a_new_connection(restored):
    restored.agent().close()
    assert restored.run("echo again").stdout == b"again\n"
    assert restored.agent_connects == 1
    restored.reset()  # back to the snapshot's session, not the new one
    assert restored.run("echo reset").stdout == b"reset\n"
    assert restored.agent_connects == 1


def test_when_the_guest_forgets_the_connection_the_next_run_reconnects(restored):
    """A TRANSPORT_RESET makes the guest drop every connection (the host drops its side)."""
    transport = restored.devices.devices[0].transport
    transport.process_device(transport.device.transport_reset)
    with pytest.raises(AgentError):
        restored.agent().ping()  # the carried connection is gone on both sides
    assert restored.run("echo reconnected").stdout == b"reconnected\n"
    assert restored.agent_connects == 1


def test_a_snapshot_without_a_connection_falls_back_to_connecting(booted, tmp_path):
    booted.snapshot(tmp_path / "no-session.snap")
    with Machine.restore(tmp_path / "no-session.snap") as m:
        assert m.run("echo one").stdout == b"one\n"
        m.reset()
        assert m.run("echo two").stdout == b"two\n"
        assert m.agent_connects == 2


def test_a_snapshot_taken_during_a_command_carries_no_session(booted, tmp_path):
    """Mid-exchange the client's state is not worth carrying: the restored guest's side of
    the connection is reset and the machine connects anew."""
    path = tmp_path / "busy.snap"

    def snapshot_once(chunk: bytes) -> None:
        if not path.exists():
            booted.snapshot(path)

    booted.run("emit 200000", stdout=snapshot_once)
    with Machine.restore(path) as m:
        assert m.run("echo fresh").stdout == b"fresh\n"
        assert m.agent_connects == 1


def test_a_diff_snapshot_carries_the_session_of_its_own_moment(restored, tmp_path):
    restored.run("write /layer", input=b"layer")
    restored.snapshot(tmp_path / "layer.snap")
    with Machine.restore(tmp_path / "layer.snap") as m:
        assert m.run("cat /layer").stdout == b"layer"
        m.reset()
        assert m.run("cat /layer").stdout == b"layer"
        assert m.agent_connects == 0
