"""Device benchmark on the microguest: exec round trip, stdout throughput, vsock, virtio-blk.

    python bench/bench_devices.py [--reps 50]

One run, one machine (128 MiB, vsock + a 64 MiB disk over a sparse base file):
- exec round trip of `true` through the agent (EXEC → EXIT over virtio-vsock);
- agent PING round trip (one frame each way: the vsock round trip);
- stdout throughput: `emit 10000000` (10 MB streamed as STDOUT frames);
- virtio-blk: a 4 KiB read and a 4 KiB write at a random 4 KiB boundary
  (`blk-read` / `blk-write`, whose data is a hex argument); each includes its
  exec round trip, which the `true` row measures alone;
- baseline in the same run: the same exec round trip to the Python reference
  agent over a host socketpair (no VM), i.e. what the VM path adds.
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import random
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import emit_json, print_table, summarize

from pytest_supermachine.guest.microguest import GuestMode, build_microguest
from pytest_supermachine.vmm.agent import AgentClient
from pytest_supermachine.vmm.devices.hub import DiskSpec
from pytest_supermachine.vmm.machine import Machine

DISK_BYTES = 64 << 20


def timed(fn, reps: int) -> dict[str, float]:
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return summarize(samples)


def socketpair_baseline(reps: int) -> dict[str, float]:
    from tests.agent_peer import AgentPeer  # the Python reference agent (tests-only)

    host, guest = socket.socketpair()
    peer = AgentPeer(guest).start()
    client = AgentClient(host)
    client.run("true")
    result = timed(lambda: client.run("true"), reps)
    client.close()
    peer.close()
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    elf = build_microguest()
    rng = random.Random(1)
    with tempfile.TemporaryDirectory(prefix="sm-bench-") as d:
        disk = Path(d) / "disk.img"
        with open(disk, "wb") as f:
            f.truncate(DISK_BYTES)
        with Machine(mem_mib=128, disks=(DiskSpec(str(disk)),)) as m:
            m.boot_direct64(elf, mode=GuestMode.AGENT)
            m.start()
            ready = m.wait_ready(60)
            m.run("true")
            exec_rt = timed(lambda: m.run("true", check=True), args.reps)
            ping_rt = summarize([m.agent().ping() * 1e3 for _ in range(args.reps)])
            t0 = time.perf_counter()
            out = m.run("emit 10000000", timeout=300).stdout
            emit_s = time.perf_counter() - t0
            assert len(out) == 10_000_000
            sectors = DISK_BYTES // 512

            def blk_read() -> None:
                r = m.run(f"blk-read {rng.randrange(0, sectors - 8) // 8 * 8} 8", check=True)
                assert len(r.stdout) == 4096

            def blk_write() -> None:
                m.run(
                    f"blk-write {rng.randrange(0, sectors - 8) // 8 * 8} {'ab' * 4096}", check=True
                )

            blk_r = timed(blk_read, args.reps)
            blk_w = timed(blk_write, args.reps)
    base = socketpair_baseline(args.reps)
    mbps = 10 / emit_s
    print_table(
        "microguest devices (128 MiB, vsock + 64 MiB virtio-blk)",
        [
            ("agent ready after start()", ready * 1e3, "ms"),
            ("exec round trip: run('true')", exec_rt, "ms"),
            ("  baseline: same over a host socketpair, Python agent", base, "ms"),
            ("agent PING round trip (vsock, one frame each way)", ping_rt, "ms"),
            ("stdout: emit 10 MB", mbps, "MB/s"),
            ("blk 4 KiB random read via exec (incl. exec RTT)", blk_r, "ms"),
            ("blk 4 KiB random write via exec (incl. exec RTT)", blk_w, "ms"),
            ("  blk 4 KiB reads per second (1/median)", 1000 / blk_r["median"], "IOPS"),
            ("  blk 4 KiB writes per second (1/median)", 1000 / blk_w["median"], "IOPS"),
        ],
    )
    emit_json(
        "devices",
        {
            "ready_ms": round(ready * 1e3, 2),
            "exec_true_ms": round(exec_rt["median"], 3),
            "exec_true_socketpair_ms": round(base["median"], 3),
            "ping_ms": round(ping_rt["median"], 3),
            "stdout_mb_s": round(mbps, 2),
            "blk_read_4k_ms": round(blk_r["median"], 3),
            "blk_write_4k_ms": round(blk_w["median"], 3),
        },
    )


if __name__ == "__main__":
    main()
