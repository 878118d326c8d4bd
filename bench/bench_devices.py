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
  agent over a host socketpair (no VM), i.e. what the VM path adds;
- output flood: `emit 2000000000` (2 GB on stdout) with the default output
  limit: the host process's resident memory (RSS, sampled every 5 ms) before
  and at its peak during the flood, which the limit must keep near the limit
  (not near 2 GB).
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import emit_json, print_table, summarize

from pytest_supermachine.guest.microguest import GuestMode, build_microguest
from pytest_supermachine.vmm.agent import DEFAULT_OUTPUT_LIMIT, AgentClient
from pytest_supermachine.vmm.devices.hub import DiskSpec
from pytest_supermachine.vmm.machine import Machine

DISK_BYTES = 64 << 20
FLOOD_BYTES = 2_000_000_000


def timed(fn, reps: int) -> dict[str, float]:
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return summarize(samples)


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


def flood_peak_rss(m: Machine, nbytes: int) -> tuple[float, float, float]:
    """(RSS before, peak RSS during, seconds) of `emit nbytes` with the default output limit."""
    before = rss_mib()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], rss_mib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    result = m.run(f"emit {nbytes}", timeout=600)
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    assert len(result.stdout) == DEFAULT_OUTPUT_LIMIT and result.stdout_truncated
    return before, max(peak[0], rss_mib()), seconds


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
            rss_before, rss_peak, flood_s = flood_peak_rss(m, FLOOD_BYTES)
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
            ("2 GB stdout flood, default limit: host RSS before", rss_before, "MiB"),
            ("  host RSS peak during the flood", rss_peak, "MiB"),
            (f"  flood throughput ({DEFAULT_OUTPUT_LIMIT >> 20} MiB kept)", 2000 / flood_s, "MB/s"),
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
            "flood_2gb_rss_before_mib": round(rss_before, 1),
            "flood_2gb_rss_peak_mib": round(rss_peak, 1),
            "flood_2gb_s": round(flood_s, 2),
        },
    )


if __name__ == "__main__":
    main()
