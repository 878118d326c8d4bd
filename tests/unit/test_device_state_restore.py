"""Transport state through `restore_state`: what this VMM can write restores, the rest is refused."""

from __future__ import annotations

import pytest

from pytest_supermachine.vmm.devices.virtio.blk import VirtioBlock
from pytest_supermachine.vmm.devices.virtio.device import DeviceStateError
from pytest_supermachine.vmm.devices.virtio.mmio import (
    REG_QUEUE_NUM,
    REG_QUEUE_SEL,
    VirtioMmioTransport,
)
from pytest_supermachine.vmm.memory import GuestMemory
from tests.virtio_driver import VirtioMmioDriver


def transport() -> tuple[VirtioMmioTransport, VirtioMmioDriver]:
    memory = GuestMemory.from_bytearray(bytearray(1 << 20))
    t = VirtioMmioTransport(VirtioBlock(None, size=4096), memory)
    return t, VirtioMmioDriver(t, memory)


def test_a_state_captured_while_the_driver_sets_an_odd_queue_size_restores() -> None:
    t, driver = transport()
    driver.init()
    driver.write32(REG_QUEUE_SEL, 0)
    driver.write32(REG_QUEUE_NUM, 3)  # a driver may write anything before DRIVER_OK
    state = t.state()
    t.restore_state(state)
    assert t.state() == state


def live_transport() -> VirtioMmioTransport:
    """A transport whose driver set up queue 0 (8 entries) and is running."""
    t, driver = transport()
    driver.init()
    driver.setup_queue(0, 8)
    driver.driver_ok()
    return t


def test_the_used_ring_on_the_available_ring_is_refused() -> None:
    t = live_transport()
    state = t.state()
    queue = state["queues"][0]
    queue["used_addr"] = queue["avail_addr"]
    with pytest.raises(DeviceStateError, match="overlaps the available ring"):
        t.restore_state(state)


def test_more_chains_in_flight_than_the_queue_holds_is_refused() -> None:
    t = live_transport()
    state = t.state()
    state["queues"][0]["next_used"] = 1  # one ahead of next_avail 0: 65535 in flight
    with pytest.raises(DeviceStateError, match="in flight"):
        t.restore_state(state)
