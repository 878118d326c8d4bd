"""Network benchmark: the guest's TCP through the NIC (libslirp) and through connect_tcp (vsock).

    python bench/bench_net.py [--reps 10] [--mib 2] [--transfers 3]

One Linux guest restored from the NIC base snapshot (the plugin's store: built
once, cached), allowed to reach one host sink. Side by side, in the same run:

* connect + HTTP GET round trip from the host to busybox httpd in the guest:
  through the NIC (a libslirp port forward: host socket → slirp → virtio-net →
  guest TCP) and through ``connect_tcp`` (vsock → agent → guest loopback TCP);
* guest → host bulk TCP throughput: ``dd | nc`` in the guest to a host sink on
  127.0.0.1 through the NIC, and ``dd | nc -l`` in the guest read by the host
  through ``connect_tcp``.

Timings are taken on the host (from connect to the last byte). Every transfer
is checked for its full length. Prints a table and one JSON line. Under nested
PVM the guest kernel (both TCP stacks run in it) is emulated: expect numbers a
thousand times below hardware KVM's (measured here: 0.04 MiB/s through the NIC,
0.07 through connect_tcp, the guest's vCPU busy in its TCP/skb code throughout;
hence 2 MiB per transfer by default: 16 MiB took over 6 minutes per transfer).
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit_json, print_table, summarize

from pytest_supermachine.fixtures.factory import MicrovmFactory
from pytest_supermachine.session.settings import Settings
from pytest_supermachine.vmm.agent import AgentRemoteError
from pytest_supermachine.vmm.machine import Machine

HTTPD = "mkdir -p /www && printf 'hello\\n' > /www/index.html && httpd -p 8080 -h /www"
GET = b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n"


def http_round_trip(connect: Callable[[], socket.socket]) -> float:
    t0 = time.perf_counter()
    with connect() as s:
        s.sendall(GET)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    if not data.endswith(b"hello\n"):
        raise SystemExit(f"bad HTTP answer from the guest: {data[:200]!r}")
    return time.perf_counter() - t0


class Sink:
    """A host TCP server on 127.0.0.1 that reads `expected` bytes per connection and times them."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.results: list[tuple[int, float]] = []
        self.done = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            t0 = time.perf_counter()
            got = 0
            with conn:
                while got < self.expected and (chunk := conn.recv(1 << 20)):
                    got += len(chunk)
            self.results.append((got, time.perf_counter() - t0))
            self.done.set()


def nic_throughput(m: Machine, sink: Sink, mib: int) -> float:
    sink.done.clear()
    m.run(
        f"dd if=/dev/zero bs=64k count={mib * 16} 2>/dev/null | nc 10.0.2.2 {sink.port}",
        timeout=900,
    )
    if not sink.done.wait(60):
        raise SystemExit("the host sink saw no connection from the guest")
    got, seconds = sink.results[-1]
    if got != mib << 20:
        raise SystemExit(f"the sink got {got} bytes through the NIC, expected {mib << 20}")
    return seconds


def vsock_throughput(m: Machine, mib: int) -> float:
    m.run(
        f"(dd if=/dev/zero bs=64k count={mib * 16} 2>/dev/null | nc -l -p 9000) >/dev/null 2>&1 &"
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            t0 = time.perf_counter()
            s = m.connect_tcp(9000, timeout=60)
            break
        except AgentRemoteError:  # the listener is not up yet
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    got = 0
    with s:  # nc may not close at its stdin's EOF: stop at the expected length
        while got < mib << 20 and (chunk := s.recv(1 << 20)):
            got += len(chunk)
    seconds = time.perf_counter() - t0
    if got != mib << 20:
        raise SystemExit(f"connect_tcp read {got} bytes, expected {mib << 20}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=10, help="HTTP round trips per path")
    ap.add_argument("--mib", type=int, default=2, help="MiB per throughput transfer")
    ap.add_argument("--transfers", type=int, default=3, help="throughput transfers per path")
    args = ap.parse_args()

    factory = MicrovmFactory(Settings(image="linux", ready_timeout=1500.0))
    t0 = time.monotonic()
    snapshot = factory.base("linux", network=True)
    base_seconds = time.monotonic() - t0
    sink = Sink(args.mib << 20)
    try:
        with Machine.restore(snapshot.path, network=[f"127.0.0.1:{sink.port}"]) as m:
            m.run(HTTPD, check=True, timeout=300)
            host, port = m.devices.nic().backend.expose(8080)  # libslirp's own port forward
            nic_rtt = [
                http_round_trip(lambda: socket.create_connection((host, port)))
                for _ in range(args.reps)
            ]
            vsock_rtt = [http_round_trip(lambda: m.connect_tcp(8080)) for _ in range(args.reps)]
            mib = args.mib
            nic_tp = [mib / nic_throughput(m, sink, mib) for _ in range(args.transfers)]
            vsock_tp = [mib / vsock_throughput(m, mib) for _ in range(args.transfers)]
    finally:
        sink.sock.close()
        factory.close()

    rows = [
        (
            "connect + HTTP GET, NIC (slirp port forward)",
            summarize([x * 1e3 for x in nic_rtt]),
            "ms",
        ),
        ("connect + HTTP GET, connect_tcp (vsock)", summarize([x * 1e3 for x in vsock_rtt]), "ms"),
        (f"guest->host {args.mib} MiB, NIC (dd | nc)", summarize(nic_tp), "MiB/s"),
        (f"guest->host {args.mib} MiB, connect_tcp (nc -l)", summarize(vsock_tp), "MiB/s"),
    ]
    print_table("guest TCP: NIC vs connect_tcp (vsock)", rows)
    emit_json(
        "net",
        {
            "base_snapshot_seconds": round(base_seconds, 3),
            "http_rtt_ms_nic": summarize([x * 1e3 for x in nic_rtt]),
            "http_rtt_ms_vsock": summarize([x * 1e3 for x in vsock_rtt]),
            "throughput_mib_s_nic": summarize(nic_tp),
            "throughput_mib_s_vsock": summarize(vsock_tp),
            "mib_per_transfer": args.mib,
        },
    )


if __name__ == "__main__":
    main()
