"""Networking on the Linux guest: guest ports reached from the host, egress through the NIC.

Two base snapshots, both from the plugin's snapshot store (content-addressed,
built once and cached across sessions, like the plugin builds them): the
hermetic Linux guest (no NIC) and the same guest booted with a NIC. Each
egress test restores the NIC snapshot with its own policy (`Machine.restore`'s
``network=``: the policy is host-side, the guest state the same). Every
address is a loopback address of this machine.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pytest_supermachine.fixtures.factory import MicrovmFactory
from pytest_supermachine.session.settings import Settings
from pytest_supermachine.vmm.agent import AgentRemoteError
from pytest_supermachine.vmm.machine import Machine
from pytest_supermachine.vmm.origin import ResetStrategy
from tests.host_http import HOST_PAGE, host_http_server

PAGE = b"hello from the guest\n"
#: httpx's own default (5 s for each of connect, read, write) is a timed assertion
#: here: the guest kernel is emulated on nested PVM, where the first TCP connection
#: of a restored guest alone took 3.4 s quiet and over 5 s under load (ReadTimeout).
HTTP_TIMEOUT = httpx.Timeout(120.0)
GUEST_HTTPD = (
    "mkdir -p /www && printf 'hello from the guest\\n' > /www/index.html && httpd -p 8080 -h /www"
)


@pytest.fixture(scope="module")
def factory() -> Iterator[MicrovmFactory]:
    f = MicrovmFactory(Settings(image="linux", ready_timeout=1500.0))
    yield f
    f.close()


@pytest.fixture(scope="module")
def hermetic_snapshot(factory: MicrovmFactory) -> Path:
    return factory.base("linux", network=False).path


@pytest.fixture(scope="module")
def nic_snapshot(factory: MicrovmFactory) -> Path:
    return factory.base("linux", network=True).path


@pytest.fixture
def hermetic(hermetic_snapshot: Path) -> Iterator[Machine]:
    with Machine.restore(hermetic_snapshot) as m:
        yield m


@pytest.fixture
def httpd_guest(hermetic: Machine) -> Machine:
    """A hermetic guest serving PAGE with busybox httpd on its port 8080."""
    hermetic.run(GUEST_HTTPD, check=True)
    return hermetic


@pytest.fixture
def host_server() -> Iterator[int]:
    """An HTTP server on the host's 127.0.0.1 serving HOST_PAGE; yields its port."""
    with host_http_server() as port:
        yield port


def http_get(sock: socket.socket) -> bytes:
    sock.sendall(b"GET / HTTP/1.0\r\nHost: guest\r\n\r\n")
    out = bytearray()
    while chunk := sock.recv(65536):
        out += chunk
    return bytes(out)


def guest_fetch(m: Machine, url: str) -> tuple[int, str]:
    # No -T: Debian's busybox-static is built without FEATURE_WGET_TIMEOUT, yet its
    # getopt32 still accepts -T and stores the value through a NULL pointer (SIGSEGV,
    # on the host too). The run's timeout bounds a hang instead.
    r = m.run(f"wget -q -O - {url} 2>&1", timeout=120)
    return r.returncode, r.stdout.decode(errors="replace")


# ------------------------------------------------------------------ guest ports from the host


def test_connect_tcp_reaches_a_guest_server_without_a_nic(httpd_guest):
    with httpd_guest.connect_tcp(8080) as sock:
        response = http_get(sock)
    assert response.startswith(b"HTTP/1.") and b" 200 " in response.split(b"\r\n")[0]
    assert response.endswith(PAGE)


def test_connect_tcp_to_a_port_nobody_listens_on_is_refused(hermetic):
    with pytest.raises(AgentRemoteError, match="ECONNREFUSED"):
        hermetic.connect_tcp(8081)


def test_expose_serves_a_guest_port_on_the_hosts_loopback(httpd_guest):
    host, port = httpd_guest.expose(8080)
    assert host == "127.0.0.1"
    assert httpx.get(f"http://{host}:{port}/", timeout=HTTP_TIMEOUT).content == PAGE


def test_tls_expose_is_verified_against_the_session_ca(httpd_guest):
    host, port = httpd_guest.expose(8080, tls=True)
    context = ssl.create_default_context(cafile=str(httpd_guest.tls_ca))
    assert (
        httpx.get(f"https://{host}:{port}/", verify=context, timeout=HTTP_TIMEOUT).content == PAGE
    )


def test_an_exposed_port_keeps_working_after_reset(hermetic):
    # A restored machine can reset; the listener outlives the reset, the guest server does not.
    hermetic.run(GUEST_HTTPD, check=True)
    host, port = hermetic.expose(8080)
    assert httpx.get(f"http://{host}:{port}/", timeout=HTTP_TIMEOUT).content == PAGE
    hermetic.reset()
    hermetic.run(GUEST_HTTPD, check=True)
    assert httpx.get(f"http://{host}:{port}/", timeout=HTTP_TIMEOUT).content == PAGE


@pytest.mark.parametrize("strategy", [ResetStrategy.COPY, ResetStrategy.DISCARD])
def test_the_agent_survives_a_reset_after_it_relayed_a_connection(httpd_guest, strategy):
    # The agent forks a relay per connect_tcp: its own pages are copy-on-write from then
    # on, so a reset that leaves stale guest translations behind (KVM's shadow page
    # tables on nested PVM) sends it to its post-fork copies.
    with httpd_guest.connect_tcp(8080) as sock:
        assert http_get(sock).endswith(PAGE)
    httpd_guest.reset(strategy=strategy)
    assert httpd_guest.run("echo alive", timeout=120).stdout == b"alive\n"


# ------------------------------------------------------------------ egress


def test_a_hermetic_guest_cannot_reach_the_host(hermetic, host_server):
    code, output = guest_fetch(hermetic, f"http://10.0.2.2:{host_server}/")
    assert code != 0
    assert "unreachable" in output.lower()


def test_an_allowed_host_endpoint_is_reachable(nic_snapshot, host_server):
    with Machine.restore(nic_snapshot, network=[f"127.0.0.1:{host_server}"]) as m:
        assert guest_fetch(m, f"http://10.0.2.2:{host_server}/") == (0, HOST_PAGE.decode())


def test_an_endpoint_not_listed_is_refused_and_logged(nic_snapshot, host_server):
    with Machine.restore(nic_snapshot, network=["127.0.0.1:1"]) as m:
        code, output = guest_fetch(m, f"http://10.0.2.2:{host_server}/")
        assert code != 0
        assert "refused" in output.lower()
        assert any(f":{host_server} (not in the allow-list)" in line for line in m.host_log)


def test_dns_answers_only_allowed_names(nic_snapshot, host_server):
    with Machine.restore(nic_snapshot, network=[f"localhost:{host_server}"]) as m:
        allowed = m.run("nslookup localhost 10.0.2.3", timeout=60)
        assert "10.0.2.2" in allowed.stdout.decode()
        other = m.run("nslookup example.com 10.0.2.3", timeout=60)
        assert "10.0.2.2" not in other.stdout.decode()
        assert any("refused DNS lookup of 'example.com'" in line for line in m.host_log)


def test_two_vms_cannot_reach_each_other(nic_snapshot):
    with (
        Machine.restore(nic_snapshot, network=True) as a,
        Machine.restore(nic_snapshot, network=True) as b,
    ):
        a.run(GUEST_HTTPD, check=True)
        assert guest_fetch(a, "http://10.0.2.15:8080/") == (0, PAGE.decode())
        # Each VM is alone on its own 10.0.2.0/24: b's 10.0.2.15 is b itself.
        code, output = guest_fetch(b, "http://10.0.2.15:8080/")
        assert code != 0
        assert "refused" in output.lower()
