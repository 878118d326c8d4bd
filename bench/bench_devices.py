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
  (not near 2 GB);
- idle VM host overhead beyond guest-touched pages (Firecracker gates on 5 MiB):
  the process's RSS growth for N idle VMs (agent up, one exec done) minus the
  resident pages of their guest RAM mappings, per VM; microguest booted and
  restored, and (with the Linux part) Linux restored.
Linux part (`--no-linux` skips it; boots two 256 MiB Linux guests, minutes here):
- host memory of a *parked pooled VM* (`MachinePool`, vCPUs paused) after a test
  that wrote a 100 MiB file to the guest's tmpfs and removed it, against a fresh
  restore's after one exec: the private (anonymous) pages of its guest RAM,
  with free page reporting and with a balloon without it. With reporting the
  bench waits (bounded) until the guest reported the freed memory; without, it
  waits as long before parking.
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
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import emit_json, print_table, summarize

from pytest_supermachine.fixtures.pool import MachinePool
from pytest_supermachine.guest.microguest import GuestMode, build_microguest
from pytest_supermachine.images.linux import LinuxImage
from pytest_supermachine.vmm import reaper
from pytest_supermachine.vmm.agent import DEFAULT_OUTPUT_LIMIT, AgentClient
from pytest_supermachine.vmm.devices.hub import BalloonSpec, DiskSpec
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


IDLE_VMS = 4
ALLOC_MIB = 100
LINUX_MEM_MIB = 256


def idle_overhead_mib(make: Callable[[], Machine], count: int) -> float:
    """Per VM: process RSS growth for `count` idle VMs minus their guest RAM's resident pages."""
    reaper.drain()
    before = rss_mib()
    machines = [make() for _ in range(count)]
    try:
        for m in machines:
            m.run("true", timeout=300, check=True)
        grown = rss_mib() - before
        guest = sum(m.memory.host_usage().rss for m in machines) / (1 << 20)
    finally:
        for m in machines:
            m.stop()
        reaper.drain()
    return (grown - guest) / count


class _NoReportingLinux(LinuxImage):
    """The Linux image with a balloon that does not offer free page reporting."""

    def balloon(self) -> BalloonSpec:
        return BalloonSpec(reporting=False)


def parked_after_alloc_free(snap: Path, wait_s: float | None) -> tuple[float, float, float]:
    """(fresh restore's private MiB, parked pooled VM's private MiB, seconds waited).

    `wait_s` None: wait until the VM is back within 10 MiB of the fresh restore (at
    most 300 s); a number: wait that long (the run without reporting).
    """
    pool = MachinePool(1)
    try:
        fresh = pool.acquire("k", snap).machine
        fresh.run("true", timeout=300, check=True)
        baseline = fresh.memory.host_usage().anonymous / (1 << 20)
        fresh.run(
            f"/bin/busybox dd if=/dev/zero of=/tmp/big bs=1048576 count={ALLOC_MIB} 2>/dev/null"
            " && /bin/busybox rm /tmp/big",
            timeout=900,
            check=True,
        )
        t0 = time.monotonic()
        while True:  # the guest reports freed memory a couple of seconds after the free
            held = fresh.memory.host_usage().anonymous / (1 << 20)
            waited = time.monotonic() - t0
            if wait_s is None and (held - baseline <= 10 or waited > 300):
                break
            if wait_s is not None and waited >= wait_s:
                break
            time.sleep(0.2)
        pool.release(fresh)  # parked: vCPUs paused, pages as the test left them
        parked = fresh.memory.host_usage().anonymous / (1 << 20)
    finally:
        pool.close()
        reaper.drain()
    return baseline, parked, waited


def linux_part(tmp: Path) -> tuple[list, dict[str, object]]:
    snaps = {}
    for name, image in (("reporting", LinuxImage()), ("no_reporting", _NoReportingLinux())):
        m = image.boot(1, LINUX_MEM_MIB, timeout=900)
        snaps[name] = tmp / f"linux-{name}.snap"
        try:
            m.snapshot(snaps[name])
        finally:
            m.stop()
    base_r, parked_r, waited = parked_after_alloc_free(snaps["reporting"], None)
    base_n, parked_n, _ = parked_after_alloc_free(snaps["no_reporting"], waited)
    overhead = idle_overhead_mib(lambda: Machine.restore(snaps["reporting"]), 2)
    rows = [
        (f"Linux {LINUX_MEM_MIB} MiB, fresh restore + 1 exec: private guest RAM", base_r, "MiB"),
        (f"  parked pooled VM after a {ALLOC_MIB} MiB alloc/free, reporting", parked_r, "MiB"),
        ("    above the fresh restore (target: <= 10 MiB)", parked_r - base_r, "MiB"),
        ("    seconds until the guest had reported it", waited, "s"),
        ("  same, balloon without reporting: fresh restore", base_n, "MiB"),
        ("    parked pooled VM after the same test", parked_n, "MiB"),
        ("    above the fresh restore", parked_n - base_n, "MiB"),
        ("idle Linux VM (restored) host overhead beyond guest pages", overhead, "MiB"),
    ]
    results: dict[str, object] = {
        "linux_fresh_private_mib": round(base_r, 1),
        "linux_parked_after_alloc_free_reporting_mib": round(parked_r, 1),
        "linux_parked_above_fresh_reporting_mib": round(parked_r - base_r, 1),
        "linux_reporting_wait_s": round(waited, 1),
        "linux_parked_after_alloc_free_no_reporting_mib": round(parked_n, 1),
        "linux_parked_above_fresh_no_reporting_mib": round(parked_n - base_n, 1),
        "linux_idle_overhead_mib": round(overhead, 2),
    }
    return rows, results


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
    ap.add_argument("--no-linux", action="store_true", help="skip the Linux balloon part")
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
        agent_snap = Path(d) / "agent.snap"
        with Machine(mem_mib=128) as m:
            m.boot_direct64(elf, mode=GuestMode.AGENT)
            m.start()
            m.wait_ready(60)
            m.snapshot(agent_snap, durable=False)

        def booted() -> Machine:
            m = Machine(mem_mib=128)
            m.boot_direct64(elf, mode=GuestMode.AGENT)
            m.start()
            m.wait_ready(60)
            return m

        idle_booted = idle_overhead_mib(booted, IDLE_VMS)
        idle_restored = idle_overhead_mib(lambda: Machine.restore(agent_snap), IDLE_VMS)
        linux_rows, linux_results = ([], {}) if args.no_linux else linux_part(Path(d))
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
            ("idle microguest VM (booted) host overhead beyond guest pages", idle_booted, "MiB"),
            (
                "idle microguest VM (restored) host overhead beyond guest pages",
                idle_restored,
                "MiB",
            ),
            *linux_rows,
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
            "idle_overhead_booted_mib": round(idle_booted, 2),
            "idle_overhead_restored_mib": round(idle_restored, 2),
            **linux_results,
        },
    )


if __name__ == "__main__":
    main()
