"""The warm pool with stand-in machines: exclusive handout, reset on reuse, limits, discards."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_supermachine.errors import MachineError
from pytest_supermachine.fixtures.pool import MachinePool
from pytest_supermachine.vmm.machine import MachineState
from pytest_supermachine.vmm.reset_cost import ResetChoice


class FakeMachine:
    def __init__(self, path: Path):
        self.path = path
        self.state = MachineState.RUNNING
        self.resets = 0
        self.fail_reset = False
        self.cheapest = ResetChoice.COPY

    def reset_choice(self) -> ResetChoice:
        return self.cheapest

    def reset(self) -> None:
        if self.fail_reset:
            raise MachineError("reset failed")
        self.resets += 1
        self.state = MachineState.RUNNING

    def pause(self) -> None:
        self.state = MachineState.PAUSED


@pytest.fixture
def made():
    return {"restored": [], "discarded": []}


@pytest.fixture
def pool(made):
    def restore(path):
        m = FakeMachine(path)
        made["restored"].append(m)
        return m

    return MachinePool(2, restore=restore, discard=made["discarded"].append)


def test_first_handout_restores_then_reuse_resets(pool, made):
    first = pool.acquire("k", Path("k.snap"))
    assert first.how == "restore" and first.machine.resets == 0
    pool.release(first.machine)
    assert first.machine.state is MachineState.PAUSED  # parked: burns no CPU
    second = pool.acquire("k", Path("k.snap"))
    assert second.how == "reset" and second.machine is first.machine
    assert second.machine.resets == 1


def test_a_machine_is_never_handed_out_twice_at_once(pool):
    a = pool.acquire("k", Path("k.snap")).machine
    b = pool.acquire("k", Path("k.snap")).machine
    assert a is not b
    pool.release(a)
    with pytest.raises(MachineError, match="not handed out"):
        pool.release(a)


def test_keys_do_not_mix(pool):
    a = pool.acquire("k1", Path("1.snap")).machine
    pool.release(a)
    assert pool.acquire("k2", Path("2.snap")).machine is not a


def test_idle_limit_discards_the_least_recently_released(pool, made):
    machines = [pool.acquire(f"k{i}", Path(f"{i}.snap")).machine for i in range(3)]
    for m in machines:
        pool.release(m)
    assert made["discarded"] == [machines[0]]
    assert pool.idle() == 2


def test_size_zero_keeps_nothing(made):
    pool = MachinePool(0, restore=FakeMachine, discard=made["discarded"].append)
    m = pool.acquire("k", Path("k.snap")).machine
    pool.release(m)
    assert made["discarded"] == [m]
    assert pool.acquire("k", Path("k.snap")).how == "restore"


def test_failed_reset_is_replaced_by_a_fresh_restore(pool, made):
    m = pool.acquire("k", Path("k.snap")).machine
    pool.release(m)
    m.fail_reset = True
    again = pool.acquire("k", Path("k.snap"))
    assert again.how == "restore" and again.machine is not m
    assert made["discarded"] == [m]


def test_stopped_machines_are_not_kept(pool, made):
    m = pool.acquire("k", Path("k.snap")).machine
    m.state = MachineState.STOPPED
    pool.release(m)
    assert made["discarded"] == [m] and pool.idle() == 0


def test_close_discards_idle_machines_and_refuses_more(pool, made):
    m = pool.acquire("k", Path("k.snap")).machine
    pool.release(m)
    pool.close()
    assert made["discarded"] == [m]
    with pytest.raises(MachineError, match="closed"):
        pool.acquire("k", Path("k.snap"))


def test_a_machine_that_costs_more_to_reset_than_to_restore_is_replaced(pool, made, tmp_path):
    first = pool.acquire("k", tmp_path)
    pool.release(first.machine)
    first.machine.cheapest = ResetChoice.RESTORE
    second = pool.acquire("k", tmp_path)
    assert second.how == "restore" and second.machine is not first.machine
    assert made["discarded"] == [first.machine]
    assert first.machine.resets == 0
