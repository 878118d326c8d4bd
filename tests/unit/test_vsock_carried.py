"""Carried vsock connections: part of the device state, continued after restore and reset.

`tests.vsock_guest.GuestVsock` plays the guest; its connections stand for the guest RAM a
restore brings back, so restoring the state just taken is a reset to "now". No KVM.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import pytest

from pytest_supermachine.vmm.devices.virtio.device import DeviceStateError
from pytest_supermachine.vmm.devices.virtio.vsock import VirtioVsock, VsockMuxer
from pytest_supermachine.vmm.devices.virtio.vsock import packet as P
from pytest_supermachine.vmm.devices.virtio.vsock.device import carried_connections
from tests.vsock_guest import GuestConn, GuestVsock

pytestmark = pytest.mark.unit


@pytest.fixture
def guest() -> Iterator[GuestVsock]:
    """The guest's driver over a fresh device, closed after the test."""
    with contextlib.closing(GuestVsock()) as g:
        yield g


def carried_connection(
    g: GuestVsock, owner: dict | None = None, port: int = 5253
) -> tuple[socket.socket, GuestConn, int]:
    """A host connection to a guest listener that snapshots carry; its host port."""
    g.listen(port)
    pending = g.muxer.connect_nowait(port)
    g.pump()
    sock = pending.result(0)
    state = {"session": 1} if owner is None else owner
    g.device.carry(pending.host_port, port, lambda: state)
    return sock, g.accepted[-1], pending.host_port


def exchange(g: GuestVsock, sock: socket.socket, conn: GuestConn, data: bytes) -> None:
    """Data both ways over one connection, checked at the other end."""
    sock.sendall(data)
    g.pump()
    assert g.recv(conn) == data
    assert g.send(conn, data[::-1]) == len(data)
    g.pump()
    assert sock.recv(len(data)) == data[::-1]


def test_a_quiet_carried_connection_is_recorded_with_its_owners_state(guest):
    sock, conn, host_port = carried_connection(guest, {"next_id": 7})
    exchange(guest, sock, conn, b"hello")
    (recorded,) = guest.transport.state()["device"]["carried"]
    assert (recorded["host_port"], recorded["guest_port"]) == (host_port, 5253)
    assert recorded["tx_cnt"] == recorded["rx_cnt"] == 5
    assert recorded["owner"] == {"next_id": 7}


def test_after_restore_the_connection_continues_without_request_or_transport_reset(guest):
    sock, conn, host_port = carried_connection(guest)
    exchange(guest, sock, conn, b"before the snapshot")
    guest.transport.restore_state(guest.transport.state())
    assert sock.recv(10) == b""  # the old host socket is gone
    (revived,) = guest.device.take_carried()
    assert (revived.host_port, revived.guest_port, revived.owner) == (
        host_port,
        5253,
        {"session": 1},
    )
    before = len(guest.received)
    exchange(guest, revived.socket, conn, b"after the restore, same counters")
    assert guest.events == []
    assert {P.OP_NAMES[p.op] for p in guest.received[before:]} <= {"RW", "CREDIT_UPDATE"}
    assert not conn.reset and guest.muxer.stats["credit_violations"] == 0


def test_a_restore_in_a_fresh_device_continues_the_connection(guest):
    """A new process restoring the snapshot: a new muxer, the guest's side as recorded."""
    sock, conn, host_port = carried_connection(guest)
    exchange(guest, sock, conn, b"x" * 3000)
    state = guest.transport.state()
    fresh = VirtioVsock(3, backend=VsockMuxer(3))
    try:
        fresh.restore_state(state["device"])
        (revived,) = fresh.take_carried()
        assert revived.host_port == host_port
        assert fresh.backend.connections()[0][:2] == (host_port, 5253)
        revived.socket.close()
    finally:
        fresh.close()


def test_connections_nobody_carries_are_reset_with_rst_on_restore(guest):
    guest.listen(5000)
    pending = guest.muxer.connect_nowait(5000)
    guest.pump()
    pending.result(0)
    other = guest.accepted[-1]
    state = guest.transport.state()
    assert state["device"]["carried"] == [] and len(state["device"]["stale"]) == 1
    guest.transport.restore_state(state)
    guest.pump()
    assert other.reset and guest.events == []


def test_a_connection_with_host_bytes_not_yet_sent_is_not_carried(guest):
    sock, _conn, _port = carried_connection(guest)
    sock.sendall(b"written, not yet read by the muxer")
    device_state = guest.transport.state()["device"]
    assert device_state["carried"] == [] and len(device_state["stale"]) == 1


def test_a_connection_whose_owner_is_mid_exchange_is_not_carried(guest):
    guest.listen(5253)
    pending = guest.muxer.connect_nowait(5253)
    guest.pump()
    pending.result(0)
    guest.device.carry(pending.host_port, 5253, lambda: None)
    assert guest.transport.state()["device"]["carried"] == []


def test_reset_in_place_returns_to_the_recorded_connection_each_time(guest):
    """What `DeviceHub.reset` does: the recorded state again, after every test."""
    _sock, conn, _port = carried_connection(guest)
    recorded = guest.transport.state()["device"]
    for round_ in range(3):
        guest.device.rewind_connections(carried_connections(recorded))
        (revived,) = guest.device.take_carried()
        exchange(guest, revived.socket, conn, f"round {round_}".encode())
        # the guest's side goes back with its RAM (nothing had flowed at the snapshot)
        conn.tx_cnt = conn.rx_cnt = conn.fwd_cnt = conn.peer_fwd_cnt = 0
    assert guest.muxer.stats["credit_violations"] == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("host_port", -1),
        ("guest_port", 1 << 32),
        ("buf_alloc", 0),
        ("tx_cnt", "many"),
        ("fwd_cnt", 10**6),  # more forwarded than received
        ("ctrl", [[P.OP_RST, 0]]),
        ("ctrl", [[P.OP_CREDIT_UPDATE, 0]] * 9),
        ("credit_requested", 1),
        ("owner", "not a mapping"),
    ],
)
def test_a_recorded_connection_no_capture_could_write_is_refused(guest, field, value):
    carried_connection(guest)
    state = guest.transport.state()
    state["device"]["carried"][0][field] = value
    with pytest.raises(DeviceStateError, match="vsock connection"):
        guest.transport.restore_state(state)


def test_a_connection_recorded_twice_is_refused(guest):
    carried_connection(guest)
    state = guest.transport.state()
    recorded = state["device"]["carried"][0]
    state["device"]["stale"] = [[recorded["host_port"], recorded["guest_port"]]]
    with pytest.raises(DeviceStateError, match="twice"):
        guest.transport.restore_state(state)
