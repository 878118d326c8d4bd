"""TCP_CONNECT and expose, with the real Linux agent run as a host process.

The agent (``--listen unix:PATH``, see tests/unit/test_linux_agent.py) connects
to 127.0.0.1 of the machine it runs on, here the host, so a plain TCP server
in this process stands in for a guest server; `open_tcp_stream` and
`PortForward` are the very code ``Machine.connect_tcp`` and ``expose`` use.
"""

from __future__ import annotations

import errno
import shutil
import socket
import ssl
import threading
from collections.abc import Callable, Iterator

import pytest

from pytest_supermachine.guest.agent import build as agent_build
from pytest_supermachine.vmm.agent import AgentRemoteError
from pytest_supermachine.vmm.agent.tcp import open_tcp_stream
from pytest_supermachine.vmm.expose import PortForward
from pytest_supermachine.vmm.tls import session_certificates
from tests.unit.test_linux_agent import AgentProcess

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build the agent")


@pytest.fixture(scope="module")
def tcp_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    a = AgentProcess(agent_build.build_agent(), tmp_path_factory.mktemp("tcp-agent"))
    yield a
    a.stop()


class Server:
    """A TCP server on 127.0.0.1 that runs `handler(conn)` for each connection."""

    def __init__(self, handler: Callable[[socket.socket], None]) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.handler = handler
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            self.handler(conn)


def echo_until_eof(conn: socket.socket) -> None:
    """Echo everything, then answer EOF with a last word: checks the half-close both ways."""
    while data := conn.recv(65536):
        conn.sendall(data)
    conn.sendall(b"<bye>")


@pytest.fixture
def echo_server() -> Iterator[Server]:
    s = Server(echo_until_eof)
    yield s
    s.sock.close()


def recv_all(sock: socket.socket) -> bytes:
    out = bytearray()
    while chunk := sock.recv(65536):
        out += chunk
    return bytes(out)


def test_a_tcp_stream_carries_bytes_both_ways_and_passes_eof_on(tcp_agent, echo_server):
    with open_tcp_stream(tcp_agent.raw_socket(), echo_server.port, 10) as s:
        s.sendall(b"hello")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"hello<bye>"


def test_a_tcp_stream_carries_a_megabytes_transfer_unchanged(tcp_agent, echo_server):
    payload = bytes(range(256)) * 16384  # 4 MiB
    with open_tcp_stream(tcp_agent.raw_socket(), echo_server.port, 10) as s:
        sender = threading.Thread(target=lambda: (s.sendall(payload), s.shutdown(socket.SHUT_WR)))
        sender.start()
        received = recv_all(s)
        sender.join()
    assert received == payload + b"<bye>"


def test_a_port_nobody_listens_on_is_econnrefused(tcp_agent):
    with socket.create_server(("127.0.0.1", 0)) as probe:
        closed_port = probe.getsockname()[1]
    with pytest.raises(AgentRemoteError) as info:
        open_tcp_stream(tcp_agent.raw_socket(), closed_port, 10)
    assert info.value.errno == errno.ECONNREFUSED


def test_the_agent_keeps_serving_commands_while_streams_are_open(tcp_agent, echo_server):
    with open_tcp_stream(tcp_agent.raw_socket(), echo_server.port, 10) as s:
        with tcp_agent.connect() as client:
            assert client.run(["echo", "still here"]).stdout == b"still here\n"
        s.sendall(b"x")
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == b"x<bye>"


def test_an_exposed_port_forwards_each_connection(tcp_agent, echo_server):
    forward = PortForward(
        echo_server.port, lambda p: open_tcp_stream(tcp_agent.raw_socket(), p, 10)
    )
    try:
        for word in (b"one", b"two"):
            with socket.create_connection(forward.address) as c:
                c.sendall(word)
                c.shutdown(socket.SHUT_WR)
                assert recv_all(c) == word + b"<bye>"
    finally:
        forward.close()


def test_an_exposed_tls_port_verifies_against_the_session_ca(tcp_agent):
    def answer(conn: socket.socket) -> None:
        request = conn.recv(65536)
        conn.sendall(b"plaintext in the guest: " + request)

    server = Server(answer)
    certs = session_certificates()
    forward = PortForward(
        server.port,
        lambda p: open_tcp_stream(tcp_agent.raw_socket(), p, 10),
        tls=certs.server_context(),
    )
    try:
        context = ssl.create_default_context(cafile=str(certs.ca))
        with (
            socket.create_connection(forward.address) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as c,
        ):
            c.sendall(b"ping")
            assert recv_all(c) == b"plaintext in the guest: ping"
    finally:
        forward.close()
        server.sock.close()


def test_a_tls_client_that_does_not_trust_the_ca_is_refused(tcp_agent, echo_server):
    forward = PortForward(
        echo_server.port,
        lambda p: open_tcp_stream(tcp_agent.raw_socket(), p, 10),
        tls=session_certificates().server_context(),
    )
    try:
        with (
            socket.create_connection(forward.address) as raw,
            pytest.raises(ssl.SSLCertVerificationError),
        ):
            ssl.create_default_context().wrap_socket(raw, server_hostname="127.0.0.1")
    finally:
        forward.close()
