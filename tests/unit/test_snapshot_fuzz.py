"""Fuzz tier: hostile queue and transport state through `restore_state` (no KVM).

A snapshot's device sections are input anyone can write. Starting from the state of a
real virtio-blk device with requests waiting, hypothesis changes queue and register
fields (and includes the issue-10 loop: used ring on the avail ring, next_used one
ahead). Each state must be refused with `DeviceStateError`, or accepted and then
served by a kick that returns (at most a queue's worth of chains) with the transport
still usable. Anything else is counted as "other", which must stay 0. Prints the counts.
"""

from __future__ import annotations

import copy
import threading
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pytest_supermachine.vmm.devices.virtio.blk import VIRTIO_BLK_T_IN, VirtioBlock
from pytest_supermachine.vmm.devices.virtio.device import DeviceStateError
from pytest_supermachine.vmm.devices.virtio.mmio import VirtioMmioTransport
from pytest_supermachine.vmm.memory import GuestMemory
from tests.virtio_driver import VirtioMmioDriver

MEM = 1 << 20
KICK_SECONDS = 10.0  # a kick that has not returned by then counts as a hang

QUEUE_FIELDS = ("size", "desc_addr", "avail_addr", "used_addr", "next_avail", "next_used")
REGISTERS = ("status", "driver_features", "queue_sel", "interrupt_status")


class Rig:
    """A virtio-blk device with four read requests made available and not yet kicked."""

    def __init__(self) -> None:
        self.mem = GuestMemory.from_bytearray(bytearray(MEM))
        self.dev = VirtioBlock(None, size=64 * 1024)
        self.t = VirtioMmioTransport(self.dev, self.mem)
        drv = VirtioMmioDriver(self.t, self.mem)
        drv.init()
        queue = drv.setup_queue(0, 16)
        drv.driver_ok()
        for sector in range(4):
            queue.submit([VIRTIO_BLK_T_IN.to_bytes(4, "little") + bytes(12)], [512, 1])
            del sector
        self.state = self.t.state()


@pytest.fixture(scope="module")
def rig() -> Rig:
    return Rig()


interesting = st.one_of(
    st.integers(0, 0xFFFF),
    st.integers(0, MEM + 0x10000),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, 2, 3, 4, 16, 0x7FFF, 0x8000, 0xFFFF, 0x10000, MEM - 1, MEM, 2**64]),
    st.none(),
    st.booleans(),
    st.text(max_size=3),
)


@st.composite
def hostile_states(draw: st.DrawFn, base: dict[str, Any]) -> dict[str, Any]:
    state = copy.deepcopy(base)
    queue = state["queues"][0]
    for name in draw(st.lists(st.sampled_from(QUEUE_FIELDS), max_size=4)):
        queue[name] = draw(interesting)
    if draw(st.booleans()):
        queue["used_addr"] = queue["avail_addr"]  # the issue-10 loop, and variants of it
        queue["next_used"] = draw(st.sampled_from([queue["next_avail"], 0, 1, 0xFFFF]))
    for name in draw(st.lists(st.sampled_from(REGISTERS), max_size=2)):
        state[name] = draw(interesting)
    if draw(st.integers(0, 20)) == 0:
        del queue[draw(st.sampled_from(sorted(queue)))]
    return state


def kick_returns(t: VirtioMmioTransport) -> bool:
    done = threading.Event()

    def kick() -> None:
        t.notify(0)
        done.set()

    thread = threading.Thread(target=kick, daemon=True)
    thread.start()
    return done.wait(KICK_SECONDS)


def outcome(rig: Rig, state: dict[str, Any]) -> str:
    try:
        rig.t.restore_state(state)
    except DeviceStateError:
        return "refused cleanly"
    except Exception as e:
        return f"other: {type(e).__name__}: {e}"
    if not kick_returns(rig.t):
        return "other: the kick did not return"
    try:
        rig.t.state()
        rig.t.restore_state(rig.state)  # the transport is still usable
    except Exception as e:
        return f"other after running: {type(e).__name__}: {e}"
    return "accepted and ran"


def test_hostile_queue_state_is_refused_or_served_boundedly(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    counts: Counter[str] = Counter()
    crafted = copy.deepcopy(rig.state)
    q = crafted["queues"][0]
    q["used_addr"], q["next_used"] = q["avail_addr"], (q["next_avail"] + 1) & 0xFFFF

    @settings(
        max_examples=1500,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(hostile_states(rig.state))
    @example(crafted)
    @example(rig.state)
    def one(state: dict[str, Any]) -> None:
        counts[outcome(rig, state)] += 1

    one()
    with capsys.disabled():
        print(f"\nqueue-state fuzz: {sum(counts.values())} states tried: {dict(counts)}")
    others = {k: v for k, v in counts.items() if k.startswith("other")}
    assert not others
    assert counts["refused cleanly"] and counts["accepted and ran"]
