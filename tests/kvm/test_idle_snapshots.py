"""A snapshot that machines are reset to holds no pending work, and a reset adds none.

Whatever a snapshot catches in flight — an interrupt waiting in a vCPU's LAPIC — the
guest takes again after every restore and reset: a wake-up for nothing, just as the
next request arrives. `Machine.wait_idle` waits for every vCPU to be halted with no
interrupt waiting; the plugin snapshots its bases and layers only then.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pytest_supermachine.errors import MachineError
from pytest_supermachine.vmm.machine import Machine, MachineState

#: How long a restored guest is watched for exits it makes on its own.
QUIET_WINDOW_S = 0.05


def exits_while_left_alone(machine: Machine) -> int:
    before = machine.stats()["exits"]
    time.sleep(QUIET_WINDOW_S)
    return machine.stats()["exits"] - before


def test_wait_idle_finds_an_agent_guest_between_requests_idle(booted: Machine):
    assert booted.run("true").ok
    assert booted.wait_idle(timeout=5)
    assert booted.state is MachineState.RUNNING  # parked only to look


def test_wait_idle_leaves_a_paused_machine_paused(booted: Machine):
    booted.pause()
    booted.wait_idle(timeout=0.01)
    assert booted.state is MachineState.PAUSED


def test_wait_idle_on_a_stopped_machine_says_it_is_stopped(booted: Machine):
    booted.stop()
    with pytest.raises(MachineError, match="stopped"):
        booted.wait_idle()


def test_an_idle_snapshot_restores_halted_with_no_interrupt_waiting(session_snapshot: Path):
    with Machine.restore(session_snapshot, start=False) as m:
        assert all(vcpu.is_idle() for vcpu in m.vcpus)


def test_a_guest_restored_from_an_idle_snapshot_stays_idle_until_asked(restored: Machine):
    assert exits_while_left_alone(restored) == 0
    assert restored.run("true").ok


def test_a_reset_guest_stays_idle_until_asked(restored: Machine):
    for _ in range(5):
        assert restored.run("true").ok  # the agent connection is open across each reset
        restored.reset()
        assert exits_while_left_alone(restored) == 0
    assert restored.agent_connects == 0
