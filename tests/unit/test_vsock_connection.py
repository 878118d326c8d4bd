"""One vsock connection on its own: its state machine and its credit, without muxer or device.

The connection is driven with the packets a guest would send and a real host
socket pair; what it decides (state, packets to send, RST on kill) is read
back directly. `test_vsock.py` covers the same rules end to end.
"""

from __future__ import annotations

import inspect
import socket
from collections.abc import Iterator

import pytest

from pytest_supermachine.vmm.devices.virtio.vsock import (
    ConnectionState,
    PendingConnection,
    VsockBackend,
    VsockConnection,
    VsockMuxer,
)
from pytest_supermachine.vmm.devices.virtio.vsock import packet as P

pytestmark = pytest.mark.unit

HOST_PORT, GUEST_PORT = 49152, 5000


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, user = socket.socketpair()
    ours.setblocking(False)
    yield ours, user
    ours.close()
    user.close()


def connection(
    sock: socket.socket, state: ConnectionState, *, buf_alloc: int = 4096
) -> VsockConnection:
    return VsockConnection(HOST_PORT, GUEST_PORT, sock, state, guest_cid=3, buf_alloc=buf_alloc)


def from_guest(
    op: int, *, flags: int = 0, data: bytes = b"", buf_alloc: int = 4096
) -> P.VsockPacket:
    return P.VsockPacket(
        3, P.HOST_CID, GUEST_PORT, HOST_PORT, op, P.VSOCK_TYPE_STREAM, flags, buf_alloc, 0, data
    )


def test_response_establishes_a_host_connection_and_completes_its_connect(pair):
    ours, user = pair
    conn = connection(ours, ConnectionState.CONNECTING)
    conn.pending = PendingConnection(
        user, guest_cid=3, guest_port=GUEST_PORT, host_port=HOST_PORT, cancel=lambda: None
    )
    conn.from_guest(from_guest(P.OP_RESPONSE))
    assert conn.state is ConnectionState.ESTABLISHED
    assert conn.pending.result(0) is user


def test_anything_but_response_to_a_sent_request_kills_the_connection_with_rst(pair):
    conn = connection(pair[0], ConnectionState.CONNECTING)
    conn.from_guest(from_guest(P.OP_RW, data=b"x"))
    assert conn.state is ConnectionState.KILLED
    assert conn.rst is not None
    assert (conn.rst.op, conn.rst.src_port, conn.rst.dst_port) == (P.OP_RST, HOST_PORT, GUEST_PORT)
    assert "expected RESPONSE" in str(conn.error)


def test_a_connection_killed_before_its_request_left_has_no_rst(pair):
    conn = connection(pair[0], ConnectionState.CONNECTING)
    conn.queue_control(P.OP_REQUEST)
    conn.kill("connect timed out")
    assert conn.state is ConnectionState.KILLED and conn.rst is None


def test_guest_data_is_written_to_the_host_socket_and_counted_as_forwarded(pair):
    ours, user = pair
    conn = connection(ours, ConnectionState.ESTABLISHED)
    conn.from_guest(from_guest(P.OP_RW, data=b"abc"))
    assert user.recv(10) == b"abc"
    assert (conn.rx_cnt, conn.fwd_cnt) == (3, 3)


def test_guest_data_beyond_the_advertised_buffer_kills_the_connection(pair):
    conn = connection(pair[0], ConnectionState.ESTABLISHED, buf_alloc=8)
    conn.from_guest(from_guest(P.OP_RW, data=b"123456789"))
    assert conn.state is ConnectionState.KILLED and conn.credit_violated
    assert conn.fwd_cnt == 0  # nothing reached the host socket


def test_forwarding_a_quarter_of_the_buffer_queues_one_credit_update(pair):
    conn = connection(pair[0], ConnectionState.ESTABLISHED, buf_alloc=8)
    conn.from_guest(from_guest(P.OP_RW, data=b"12"))
    conn.from_guest(from_guest(P.OP_RW, data=b"34"))
    assert list(conn.ctrl) == [(P.OP_CREDIT_UPDATE, 0)]
    update = conn.next_packet(4096, rx_starved=False)
    assert update is not None and (update.op, update.fwd_cnt) == (P.OP_CREDIT_UPDATE, 4)


def test_host_data_goes_out_within_the_guests_credit_then_credit_is_requested_once(pair):
    ours, user = pair
    conn = connection(ours, ConnectionState.ESTABLISHED)
    conn.learn_peer_credit(from_guest(P.OP_CREDIT_UPDATE, buf_alloc=2))
    user.sendall(b"hello")
    conn.host_readable()
    sent = conn.next_packet(4096, rx_starved=False)
    assert sent is not None and (sent.op, sent.data) == (P.OP_RW, b"he")
    request = conn.next_packet(4096, rx_starved=False)
    assert request is not None and request.op == P.OP_CREDIT_REQUEST
    assert conn.next_packet(4096, rx_starved=False) is None


def test_a_host_close_puts_the_connection_in_closing_and_the_guests_shutdown_ends_it(pair):
    ours, user = pair
    conn = connection(ours, ConnectionState.ESTABLISHED)
    conn.learn_peer_credit(from_guest(P.OP_CREDIT_UPDATE))
    user.close()
    conn.host_hung_up()
    shutdown = conn.next_packet(4096, rx_starved=False)
    assert shutdown is not None and shutdown.op == P.OP_SHUTDOWN
    assert shutdown.flags == P.SHUTDOWN_RCV | P.SHUTDOWN_SEND
    assert conn.state is ConnectionState.CLOSING
    conn.from_guest(from_guest(P.OP_SHUTDOWN, flags=P.SHUTDOWN_RCV | P.SHUTDOWN_SEND))
    assert conn.state is ConnectionState.KILLED and conn.rst is not None


def test_the_muxer_has_every_method_of_the_backend_contract_with_its_signature():
    for name, member in vars(VsockBackend).items():
        if inspect.isfunction(member) and not name.startswith("_"):
            assert inspect.signature(getattr(VsockMuxer, name)) == inspect.signature(member), name
    assert "guest_cid" in VsockBackend.__annotations__
    assert isinstance(VsockMuxer.guest_cid, property)
