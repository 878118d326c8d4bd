"""virtio-vsock device + host muxer, with `tests.vsock_guest.GuestVsock` playing the guest driver.

Everything goes through the real virtio-mmio transport and split virtqueues
over a bytearray guest memory; no KVM.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading

import pytest

from pytest_supermachine.vmm.agent import AGENT_PORT, AgentClient
from pytest_supermachine.vmm.devices.virtio.device import (
    STATUS_DEVICE_NEEDS_RESET,
    VIRTIO_F_EVENT_IDX,
)
from pytest_supermachine.vmm.devices.virtio.mmio import VirtioMmioTransport
from pytest_supermachine.vmm.devices.virtio.queue import VIRTQ_DESC_F_WRITE
from pytest_supermachine.vmm.devices.virtio.vsock import (
    EVENT_TRANSPORT_RESET,
    ConnectionState,
    VirtioVsock,
    VsockConnectionRefused,
    VsockError,
    VsockMuxer,
    VsockTimeout,
    connection,
)
from pytest_supermachine.vmm.devices.virtio.vsock import packet as P
from pytest_supermachine.vmm.memory import GuestMemory
from tests.agent_peer import AgentPeer
from tests.vsock_guest import GuestConn, GuestVsock

pytestmark = pytest.mark.unit


@pytest.fixture
def guest():
    g = GuestVsock()
    yield g
    g.device.close()


def connected(g: GuestVsock, port: int = 5000) -> tuple[socket.socket, GuestConn]:
    """A host socket connected to a guest listener, and the guest's end."""
    g.listen(port)
    pending = g.muxer.connect_nowait(port)
    g.pump()
    sock = pending.result(0)
    return sock, g.accepted[-1]


def readable(sock: socket.socket, timeout: float = 0.0) -> bool:
    return bool(select.select([sock], [], [], timeout)[0])


def ops(pkts: list[P.VsockPacket]) -> list[str]:
    return [P.OP_NAMES.get(p.op, str(p.op)) for p in pkts]


# ----------------------------------------------------------------------------- device basics


def test_device_id_is_19_and_config_holds_the_guest_cid():
    g = GuestVsock(guest_cid=42)
    assert g.driver.read32(0x008) == 19
    assert struct.unpack("<Q", g.driver.read_config(0, 8))[0] == 42
    g.device.close()


def test_three_queues_rx_tx_event():
    assert VirtioVsock().queue_max_sizes == (256, 256, 16)


def test_reserved_cids_are_refused():
    for cid in (0, 1, 2, 0xFFFFFFFF):
        with pytest.raises(ValueError):
            VirtioVsock(cid)


def test_packet_header_is_44_bytes_in_virtio_order():
    pkt = P.VsockPacket(3, 2, 1024, 5253, P.OP_RW, 1, 0, 4096, 7, b"xy")
    assert pkt.encode() == struct.pack("<QQIIIHHIII", 3, 2, 1024, 5253, 2, 1, 5, 0, 4096, 7) + b"xy"
    assert P.VsockPacket.decode(pkt.encode()) == (pkt, 2)


# ----------------------------------------------------------------------------- connecting


def test_host_connect_to_a_guest_listener_sends_request_and_gets_established(guest):
    sock, conn = connected(guest)
    assert ops(guest.received)[0] == "REQUEST"
    assert guest.received[0].src_cid == 2 and guest.received[0].dst_port == 5000
    assert guest.muxer.connections() == [(conn.host_port, 5000, ConnectionState.ESTABLISHED)]
    sock.close()


def test_connect_to_a_port_nobody_listens_on_is_refused(guest):
    pending = guest.muxer.connect_nowait(6000)
    guest.pump()
    with pytest.raises(VsockConnectionRefused, match="port 6000: connection refused"):
        pending.result(0)
    assert guest.muxer.connections() == []


def test_refused_is_also_a_builtin_connection_refused_error(guest):
    pending = guest.muxer.connect_nowait(6000)
    guest.pump()
    with pytest.raises(ConnectionRefusedError):
        pending.result(0)


def test_connect_without_an_answer_times_out_and_withdraws(guest):
    guest.conns.clear()
    pending = guest.muxer.connect_nowait(7000)
    guest.host_kicks()  # REQUEST goes out, the "guest" never answers
    with pytest.raises(VsockTimeout):
        pending.result(0.01)
    guest.host_kicks()
    assert ops(guest.take_rx()) == ["REQUEST", "RST"]
    assert guest.muxer.connections() == []


def test_blocking_connect_works_with_an_event_thread(guest):
    guest.listen(5000)
    stop = threading.Event()

    def event_loop():
        while not stop.is_set():
            select.select([guest.device.fileno()], [], [], 0.01)
            guest.pump()

    t = threading.Thread(target=event_loop)
    t.start()
    try:
        sock = guest.device.connect(5000, timeout=5)
        sock.close()
    finally:
        stop.set()
        t.join()


def test_guest_connect_to_a_host_listener_is_accepted(guest):
    listener = guest.muxer.listen(5254)
    conn = guest.connect(5254)
    guest.pump()
    assert conn.state == "established"
    sock, guest_port = listener.accept(timeout=0)
    assert guest_port == conn.local_port
    guest.send(conn, b"READY")
    guest.pump()
    assert sock.recv(100) == b"READY"
    sock.close()


def test_guest_connect_to_a_port_without_listener_gets_rst(guest):
    conn = guest.connect(4444)
    guest.pump()
    assert conn.reset and ops(guest.received) == ["RST"]


def test_guest_connects_beyond_the_backlog_get_rst(guest):
    guest.muxer.listen(5254, backlog=1)
    first, second = guest.connect(5254), guest.connect(5254)
    guest.pump()
    assert first.state == "established" and second.reset


def test_a_closed_listener_refuses_new_connections(guest):
    listener = guest.muxer.listen(5254)
    listener.close()
    conn = guest.connect(5254)
    guest.pump()
    assert conn.reset


def test_accept_times_out_when_nobody_connects(guest):
    with pytest.raises(VsockTimeout):
        guest.muxer.listen(5254).accept(timeout=0.01)


def test_service_consumes_readiness_even_before_the_driver_is_up():
    device = VirtioVsock()
    transport = VirtioMmioTransport(device, GuestMemory.from_bytearray(bytearray(1 << 16)))
    device.connect_nowait(5000)
    assert select.select([device.fileno()], [], [], 0)[0]
    device.service(transport)
    assert not select.select([device.fileno()], [], [], 0)[0]  # an event loop would not spin
    device.close()


def test_fileno_is_readable_after_a_connect_call(guest):
    assert not readable(guest.device, 0)  # type: ignore[arg-type]
    guest.muxer.connect_nowait(5000)
    assert select.select([guest.device.fileno()], [], [], 0)[0]


# ----------------------------------------------------------------------------- data


def test_data_flows_host_to_guest(guest):
    sock, conn = connected(guest)
    sock.sendall(b"ping")
    guest.pump()
    assert guest.recv(conn) == b"ping"


def test_data_flows_guest_to_host(guest):
    sock, conn = connected(guest)
    assert guest.send(conn, b"pong") == 4
    guest.pump()
    assert sock.recv(100) == b"pong"


def test_rw_packets_never_exceed_the_rx_buffer(guest):
    sock, _conn = connected(guest)
    sock.sendall(b"x" * 10000)
    guest.pump()
    rws = [p for p in guest.received if p.op == P.OP_RW]
    assert sum(len(p.data) for p in rws) == 10000
    assert max(len(p.data) for p in rws) <= 4096 - 44


def test_every_host_packet_advertises_buffer_and_forwarded_count(guest):
    sock, conn = connected(guest)
    guest.send(conn, b"abc")
    guest.pump()
    sock.recv(10)
    sock.sendall(b"z")
    guest.pump()
    last = guest.received[-1]
    assert (last.op, last.buf_alloc, last.fwd_cnt) == (P.OP_RW, guest.muxer.buf_alloc, 3)


def test_host_stops_at_the_guests_credit_and_resumes_on_credit_update():
    g = GuestVsock(auto_credit=False)
    sock, conn = connected(g)
    sock.sendall(b"d" * 100_000)  # guest buf_alloc is 64 KiB
    g.pump()
    assert len(conn.inbox) == conn.buf_alloc
    assert ops(g.received)[-1] == "CREDIT_REQUEST"  # the host asks once, then waits
    g.pump()
    assert ops(g.received).count("CREDIT_REQUEST") == 1
    g.recv(conn)
    g.send_packet(g.packet(conn, P.OP_CREDIT_UPDATE))
    g.pump()
    assert len(conn.inbox) == 100_000 - conn.buf_alloc
    g.device.close()


def test_guest_credit_request_is_answered_with_credit_update(guest):
    _sock, conn = connected(guest)
    guest.send_packet(guest.packet(conn, P.OP_CREDIT_REQUEST))
    guest.pump()
    assert ops(guest.received)[-1] == "CREDIT_UPDATE"


def test_host_returns_credit_as_the_host_socket_consumes(guest):
    _sock, conn = connected(guest)
    chunk = b"c" * 4000
    for _ in range(20):  # 80 KB: more than a quarter of the host's 256 KiB buffer
        guest.send(conn, chunk)
        guest.pump()
    assert "CREDIT_UPDATE" in ops(guest.received)
    assert conn.peer_fwd_cnt > 0


def test_guest_stalls_when_the_host_socket_is_full_and_resumes_when_it_drains(guest):
    sock, conn = connected(guest)
    data = bytes(range(256)) * 4096  # 1 MiB
    sent = 0
    while guest.send(conn, data[sent:]):
        sent = conn.tx_cnt
        guest.pump()
    assert sent < len(data)  # stalled: the host's credit ran out
    got = bytearray()
    sock.setblocking(False)
    while len(got) < len(data):
        with contextlib.suppress(BlockingIOError):
            got += sock.recv(1 << 20)
        guest.host_kicks()
        guest.pump()
        if conn.tx_cnt < len(data):
            guest.send(conn, data[conn.tx_cnt :])
    assert got == data


def test_guest_overrunning_its_credit_gets_rst(guest):
    _sock, conn = connected(guest)
    conn.peer_buf_alloc = 1 << 30  # a guest that ignores what the host advertised
    for _ in range(600):  # 2.4 MB into a host socket nobody reads
        guest.send_packet(guest.packet(conn, P.OP_RW, 0, b"o" * 4096))
    guest.pump()
    assert conn.reset
    assert guest.muxer.stats["credit_violations"] == 1


def test_round_robin_between_connections(guest):
    a, _ca = connected(guest, 5000)
    b, _cb = connected(guest, 5001)
    a.sendall(b"A" * 20000)
    b.sendall(b"B" * 20000)
    guest.host_kicks()
    first = [p.dst_port for p in guest.take_rx() if p.op == P.OP_RW][:4]
    assert set(first) == {5000, 5001}


# ----------------------------------------------------------------------------- shutdown, rst


def test_host_close_sends_full_shutdown_and_the_guests_rst_completes_it(guest):
    sock, conn = connected(guest)
    sock.close()
    guest.pump()
    shut = [p for p in guest.received if p.op == P.OP_SHUTDOWN][-1]
    assert shut.flags == P.SHUTDOWN_RCV | P.SHUTDOWN_SEND
    assert conn.state == "closed"  # the guest answered RST
    assert guest.muxer.connections() == []


def test_host_half_close_sends_shutdown_send_only(guest):
    sock, conn = connected(guest)
    sock.sendall(b"last words")
    sock.shutdown(socket.SHUT_WR)
    guest.pump()
    assert guest.recv(conn) == b"last words"
    assert conn.peer_shut == P.SHUTDOWN_SEND
    guest.send(conn, b"reply")  # the other direction still works
    guest.pump()
    assert sock.recv(100) == b"reply"


def test_guest_shutdown_send_gives_the_host_eof_after_the_data(guest):
    sock, conn = connected(guest)
    guest.send(conn, b"bye")
    guest.shutdown(conn, P.SHUTDOWN_SEND)
    guest.pump()
    assert sock.recv(100) == b"bye"
    assert sock.recv(100) == b""


def test_guest_full_shutdown_is_answered_with_rst(guest):
    sock, conn = connected(guest)
    guest.shutdown(conn)
    guest.pump()
    assert ops(guest.received)[-1] == "RST"
    assert sock.recv(100) == b""
    assert guest.muxer.connections() == []


def test_guest_rst_closes_the_host_socket(guest):
    sock, conn = connected(guest)
    guest.rst(conn)
    guest.pump()
    assert sock.recv(100) == b""
    assert guest.muxer.connections() == []


def test_a_closing_connection_is_reset_if_the_guest_never_answers(guest, monkeypatch):
    monkeypatch.setattr(connection, "CLOSE_TIMEOUT", 0.0)
    sock, _conn = connected(guest)
    guest._handle = lambda pkt: None  # a guest that ignores everything
    sock.close()
    guest.pump()
    guest.pump()
    assert ops(guest.received)[-2:] == ["SHUTDOWN", "RST"]
    assert guest.muxer.connections() == []


# ----------------------------------------------------------------------------- hostile guests


def test_rw_on_an_unknown_connection_gets_rst(guest):
    guest.send_packet(P.VsockPacket(3, 2, 1111, 2222, P.OP_RW, data=b"?"))
    guest.pump()
    (rst,) = guest.received
    assert (rst.op, rst.src_port, rst.dst_port) == (P.OP_RST, 2222, 1111)


def test_an_unknown_op_resets_the_connection(guest):
    sock, conn = connected(guest)
    guest.send_packet(guest.packet(conn, 99))
    guest.pump()
    assert conn.reset and sock.recv(10) == b""


def test_an_unknown_socket_type_gets_rst(guest):
    pkt = P.VsockPacket(3, 2, 1111, 2222, P.OP_REQUEST, type=P.VSOCK_TYPE_SEQPACKET)
    guest.muxer.listen(2222)
    guest.send_packet(pkt)
    guest.pump()
    assert ops(guest.received) == ["RST"]


@pytest.mark.parametrize("src_cid,dst_cid", [(4, 2), (3, 3), (3, 1), (2, 2)])
def test_packets_with_a_wrong_cid_are_dropped_silently(guest, src_cid, dst_cid):
    guest.muxer.listen(2222)
    guest.send_packet(P.VsockPacket(src_cid, dst_cid, 1111, 2222, P.OP_REQUEST))
    guest.pump()
    assert guest.received == [] and guest.muxer.connections() == []
    assert guest.muxer.stats["dropped"] == 1


def test_a_chain_shorter_than_a_header_is_dropped(guest):
    guest.send_raw([b"\x03" * 20])
    guest.pump()
    assert guest.received == [] and guest.device.dropped_packets == 1
    assert not guest.transport.status & STATUS_DEVICE_NEEDS_RESET


def test_a_len_field_larger_than_the_chain_gets_rst(guest):
    sock, conn = connected(guest)
    header = bytearray(guest.packet(conn, P.OP_RW, 0, b"abc").encode())
    struct.pack_into("<I", header, 24, 1000)  # len says 1000, 3 bytes follow
    guest.send_raw([bytes(header)])
    guest.pump()
    assert conn.reset and sock.recv(10) == b""


def test_a_len_field_beyond_the_maximum_packet_gets_rst(guest):
    _sock, conn = connected(guest)
    header = bytearray(guest.packet(conn, P.OP_RW).encode())
    struct.pack_into("<I", header, 24, 0xFFFFFFFF)
    guest.send_raw([bytes(header)])
    guest.pump()
    assert conn.reset


def test_header_and_payload_may_span_descriptors(guest):
    sock, conn = connected(guest)
    raw = guest.packet(conn, P.OP_RW, 0, b"split payload").encode()
    guest.send_raw([raw[:10], raw[10:44], raw[44:50], raw[50:]])
    conn.tx_cnt += 13
    guest.pump()
    assert sock.recv(100) == b"split payload"


def test_an_rx_buffer_too_small_for_a_header_needs_reset(guest):
    sock, _conn = connected(guest)
    q = guest.rxq
    while guest.rxq.used():
        pass
    # replace the next rx buffer the device will use with a 10-byte one
    head = q.memory.read_u16(q.avail + 4 + 2 * (guest.device.queues[0].next_avail % q.size))
    q.write_desc(head, guest._rx_bufs[head], 10, VIRTQ_DESC_F_WRITE)
    sock.sendall(b"x")
    guest.host_kicks()
    assert guest.transport.status & STATUS_DEVICE_NEEDS_RESET


def test_rst_is_never_answered_with_rst(guest):
    guest.send_packet(P.VsockPacket(3, 2, 1111, 2222, P.OP_RST))
    guest.pump()
    assert guest.received == []


def test_no_rx_buffers_means_host_sockets_are_not_read_until_the_guest_posts_some():
    g = GuestVsock(rx_buffers=2)
    sock, _conn = connected(g)
    sock.sendall(b"y" * 30000)
    g.host_kicks()
    assert len(g.rxq.used()) == 2  # both buffers filled, then the device waits
    g.host_kicks()
    assert g.rxq.used() == []
    g.rxq.publish(0)
    g.rxq.publish(1)
    g.rxq.kick()
    assert len(g.rxq.used()) == 2
    g.device.close()


# ----------------------------------------------------------------------------- reset, state


def test_driver_reset_drops_connections_but_keeps_listeners(guest):
    listener = guest.muxer.listen(5254)
    sock, _conn = connected(guest)
    guest.driver.write32(0x070, 0)  # Status = 0
    assert sock.recv(10) == b""
    assert guest.muxer.connections() == []
    assert guest.muxer._listeners[5254] is listener


def test_reset_fails_pending_connects(guest):
    pending = guest.muxer.connect_nowait(5000)
    guest.transport.reset()
    with pytest.raises(VsockError, match="reset"):
        pending.result(0)


def test_state_is_queue_state_and_guest_cid(guest):
    st = guest.transport.state()
    assert st["device"]["guest_cid"] == 3
    assert len(st["queues"]) == 3


def test_restore_of_a_state_without_connection_records_sends_transport_reset(guest):
    """Snapshots from before connections were recorded (device state format 2)."""
    sock, _conn = connected(guest)
    state = guest.transport.state()
    del state["device"]["carried"], state["device"]["stale"]
    guest.transport.restore_state(state)
    assert sock.recv(10) == b""
    guest.pump()
    assert guest.events == [EVENT_TRANSPORT_RESET]
    # and the host simply connects again
    guest.conns.clear()
    again, _ = connected(guest)
    again.sendall(b"hi again")
    guest.pump()
    assert guest.recv(guest.accepted[-1]) == b"hi again"


def test_a_transport_reset_asks_for_the_kick_that_acknowledges_it(guest):
    """Linux keeps several event buffers posted and, with EVENT_IDX, kicks only when the
    device asked; the re-post after handling the reset must be heard, or packets for new
    connections wait out RESET_ACK_TIMEOUT."""
    assert guest.driver.has_feature(VIRTIO_F_EVENT_IDX)
    for slot in (1, 2, 3):  # more buffers, as Linux posts: the ring is not empty after a pop
        gpa = guest.driver.alloc.alloc(4)
        guest.evq.write_desc(slot, gpa, 4, VIRTQ_DESC_F_WRITE)
        guest.evq.publish(slot)
    guest.evq.kick()
    guest.device.transport_reset()
    guest.host_kicks()
    ((head, _length),) = guest.evq.used()
    assert guest.device.reset_unacknowledged
    # Linux's vring_need_event: kick iff avail_event is in [old idx, new idx) of the re-post.
    old = guest.evq.avail_idx
    guest.evq.publish(head)
    assert (guest.evq.avail_idx - guest.evq.avail_event() - 1) & 0xFFFF < (
        guest.evq.avail_idx - old
    ) & 0xFFFF
    guest.evq.kick()
    assert not guest.device.reset_unacknowledged


def test_a_restored_device_never_reuses_a_host_port_of_the_snapshot(guest):
    """The restored guest still holds the snapshot's connections until it handles the
    transport reset; a REQUEST from a port it holds would be answered with RST."""
    _sock, conn = connected(guest)
    state = guest.transport.state()["device"]
    fresh = VirtioVsock(3, backend=VsockMuxer(3))  # a new process restoring the snapshot
    try:
        fresh.restore_state(state)
        assert fresh.backend.next_host_port > conn.host_port
    finally:
        fresh.close()


def test_restore_into_a_fresh_device_keeps_the_guest_cid():
    a = GuestVsock(guest_cid=7)
    state = a.transport.state()
    b = GuestVsock(guest_cid=3)
    b.transport.restore_state(state)
    assert b.device.guest_cid == 7 and b.muxer.guest_cid == 7
    a.device.close()
    b.device.close()


# ----------------------------------------------------------------------------- end to end


class VmLoop:
    """The VMM event thread plus a guest whose agent is the Python reference agent."""

    def __init__(self) -> None:
        self.g = GuestVsock(rx_buffers=48)
        self.g.listen(AGENT_PORT)
        self.bridges: dict[int, tuple[GuestConn, socket.socket, AgentPeer]] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        g = self.g
        while not self.stop.is_set():
            fds = [g.device.fileno()] + [s for _, s, _ in self.bridges.values()]
            select.select(fds, [], [], 0.002)
            g.pump()
            for conn in g.accepted:
                if id(conn) not in self.bridges:
                    ours, theirs = socket.socketpair()
                    ours.setblocking(False)
                    self.bridges[id(conn)] = (conn, ours, AgentPeer(theirs).start())
            for conn, ours, _ in self.bridges.values():
                if conn.inbox:
                    ours.sendall(g.recv(conn))
                if conn.peer_credit() > 0:
                    try:
                        data = ours.recv(conn.peer_credit())
                    except BlockingIOError:
                        data = b""
                    if data:
                        assert g.send(conn, data) == len(data)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        for _, ours, peer in self.bridges.values():
            peer.close()
            ours.close()
        self.g.device.close()


def test_agent_client_over_vsock_end_to_end():
    vm = VmLoop()
    try:
        client = AgentClient(vm.g.device.connect(AGENT_PORT, timeout=5), timeout=5)
        assert client.run("echo over vsock").stdout == b"over vsock\n"
        data = bytes(range(256)) * 2000
        assert client.run("cat", input=data).stdout == data
        client.write_file("/f", b"file")
        assert client.read_file("/f") == b"file"
        client.close()
    finally:
        vm.close()


# ----------------------------------------------------------------------------- properties

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=120), min_size=1, max_size=6))
def test_random_tx_chains_never_crash_or_break_the_device(chunks):
    g = GuestVsock(mem_size=1 << 20)
    try:
        g.muxer.listen(2222)
        g.send_raw([c or b"\0" for c in chunks])
        g.pump()
        assert not g.transport.status & STATUS_DEVICE_NEEDS_RESET
    finally:
        g.device.close()


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.builds(
            P.VsockPacket,
            st.sampled_from([3, 3, 3, 2, 4]),
            st.sampled_from([2, 2, 2, 3]),
            st.sampled_from([1111, 1112]),
            st.sampled_from([2222, 3333]),
            st.integers(0, 9),
            st.sampled_from([1, 1, 1, 2, 0]),
            st.integers(0, 7),
            st.integers(0, 0xFFFFFFFF),
            st.integers(0, 0xFFFFFFFF),
            st.binary(max_size=64),
        ),
        max_size=12,
    )
)
def test_random_packet_sequences_give_rst_or_drop_and_host_sockets_stay_sane(pkts):
    g = GuestVsock(mem_size=1 << 20)
    try:
        listener = g.muxer.listen(2222)
        for pkt in pkts:
            g.send_packet(pkt)
            g.pump()
        assert not g.transport.status & STATUS_DEVICE_NEEDS_RESET
        for p in g.received:  # everything the host sent is well-addressed stream traffic
            assert (p.src_cid, p.dst_cid, p.type) == (2, 3, P.VSOCK_TYPE_STREAM)
        for host_port, guest_port, _ in g.muxer.connections():
            assert host_port == 2222 and guest_port in (1111, 1112)
        while listener.pending():
            listener.accept(0)[0].close()
    finally:
        g.device.close()
