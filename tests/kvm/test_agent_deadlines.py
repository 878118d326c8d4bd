"""Agent calls end in time and report a stopped guest, whatever the guest does (issue 10, items 4, 8, 10).

A guest that never answers, stops, or floods the host must end every agent
call with a clear error (or a truncated result) within the call's own
timeout: never the connect's 30 s default, never never.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_supermachine.guest.microguest import GuestMode
from pytest_supermachine.vmm import agent as P
from pytest_supermachine.vmm.machine import Machine

MIB = 1024 * 1024


@pytest.fixture
def agent_vm(microguest_elf: Path) -> Iterator[Machine]:
    m = Machine(mem_mib=64)
    try:
        m.boot_direct64(microguest_elf, mode=GuestMode.AGENT)
        m.start()
        m.wait_ready(30)
        yield m
    finally:
        m.stop()


@pytest.fixture
def started(make_machine: Callable[..., Machine]) -> Callable[[GuestMode], Machine]:
    def start(mode: GuestMode) -> Machine:
        m = make_machine(mode)
        m.start()
        return m

    return start


def test_run_on_a_guest_that_never_answers_times_out_within_the_callers_timeout(
    started: Callable[[GuestMode], Machine],
) -> None:
    m = started(GuestMode.SPIN)
    with pytest.raises(P.AgentTimeout, match=r"within 1 s") as info:
        m.run("echo hi", timeout=1)
    assert "mode=spin" in info.value.console_tail


@pytest.mark.parametrize("mode", [GuestMode.HALT, GuestMode.TRIPLE_FAULT])
def test_run_on_a_stopped_guest_is_guest_stopped_with_the_console_tail(
    started: Callable[[GuestMode], Machine], mode: GuestMode
) -> None:
    m = started(mode)
    m.wait(timeout=30)
    with pytest.raises(P.AgentGuestStopped) as info:
        m.run("echo hi", timeout=60)
    assert f"mode={mode.banner_name}" in info.value.console_tail


def test_a_guest_crashing_during_a_command_carries_the_console_tail_as_an_attribute(
    agent_vm: Machine,
) -> None:
    with pytest.raises(P.AgentGuestStopped) as info:
        agent_vm.run("crash", timeout=60)
    assert "#UD at cpl 3" in info.value.console_tail


def test_connect_to_a_stopped_guest_is_guest_stopped(
    started: Callable[[GuestMode], Machine],
) -> None:
    m = started(GuestMode.HALT)
    m.wait(timeout=30)
    with pytest.raises(P.AgentGuestStopped):
        m.connect(1234, timeout=60)


def test_run_without_a_timeout_uses_the_machines_run_timeout(agent_vm: Machine) -> None:
    agent_vm.run_timeout = 0.5
    agent_vm.agent().kill_grace = 0.5
    with pytest.raises(P.AgentTimeout) as info:
        agent_vm.run("hang")
    assert "hanging with interrupts off" in info.value.console_tail


def test_run_without_a_timeout_kills_a_long_command_at_the_run_timeout(agent_vm: Machine) -> None:
    agent_vm.run_timeout = 0.5
    result = agent_vm.run("sleep 600000")
    assert result.timed_out


def test_output_beyond_the_limit_is_dropped_and_reported(agent_vm: Machine) -> None:
    result = agent_vm.run("emit 3000000", timeout=60, output_limit=MIB)
    assert result.stdout == (bytes(range(256)) * (MIB // 256))
    assert result.stdout_truncated and not result.stderr_truncated and result.ok


def test_the_machines_output_limit_applies_when_the_call_gives_none(agent_vm: Machine) -> None:
    agent_vm.output_limit = 1000
    result = agent_vm.run("emit 5000", timeout=60)
    assert (len(result.stdout), result.truncated) == (1000, True)


def test_output_within_the_limit_is_not_truncated(agent_vm: Machine) -> None:
    result = agent_vm.run("emit 5000", timeout=60, output_limit=5000)
    assert (len(result.stdout), result.truncated) == (5000, False)


def test_streamed_output_goes_whole_to_a_file_and_not_into_the_result(agent_vm: Machine) -> None:
    sink = io.BytesIO()
    result = agent_vm.run("emit 3000000", timeout=60, stdout=sink, output_limit=1000)
    assert sink.getvalue() == (bytes(range(256)) * 12000)[:3000000]
    assert (result.stdout, result.truncated) == (b"", False)


def test_streamed_output_goes_to_a_callback(agent_vm: Machine) -> None:
    chunks: list[bytes] = []
    agent_vm.run("err oops", timeout=60, stderr=chunks.append)
    assert b"".join(chunks) == b"oops\n"


def test_read_file_refuses_a_file_over_its_limit(agent_vm: Machine) -> None:
    agent_vm.write_file("/big", b"x" * 100_000)
    with pytest.raises(P.AgentFileTooLarge, match="limit=N"):
        agent_vm.read_file("/big", limit=50_000)
    assert agent_vm.read_file("/big", limit=100_000) == b"x" * 100_000


def test_a_call_queued_behind_another_threads_connect_keeps_its_own_deadline(
    started: Callable[[GuestMode], Machine],
) -> None:
    m = started(GuestMode.SPIN)
    errors: list[BaseException] = []

    def slow_connect() -> None:
        try:
            m.agent(timeout=5)
        except P.AgentTimeout as exc:
            errors.append(exc)

    first = threading.Thread(target=slow_connect)
    first.start()
    while not m._agent_lock.locked():  # the first caller is connecting
        time.sleep(0.001)
    with pytest.raises(P.AgentTimeout, match="another thread was still connecting"):
        m.run("echo hi", timeout=0.5)
    first.join()
    assert len(errors) == 1
