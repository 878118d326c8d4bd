"""Creating and stopping machines many times leaks nothing: fds, threads, memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import psutil

from pytest_supermachine.guest.microguest import GuestMode
from pytest_supermachine.vmm import reaper
from pytest_supermachine.vmm.machine import ExitReason, Machine


def snapshot_resources() -> tuple[int, int, int, int]:
    reaper.drain()
    return (
        len(os.listdir("/proc/self/fd")),
        threading.active_count(),
        len(os.listdir("/proc/self/task")),
        psutil.Process().memory_info().rss,
    )


#: Run in a process of its own: in the suite's process, machines of earlier tests still being
#: torn down and other threads' malloc arenas move RSS by megabytes, which is not this test's.
CYCLES_IN_A_FRESH_PROCESS = """
import json, os, sys, threading, psutil
from pytest_supermachine.guest.microguest import GuestMode
from pytest_supermachine.vmm import reaper
from pytest_supermachine.vmm.machine import ExitReason, Machine

def resources():
    reaper.drain()
    return (len(os.listdir("/proc/self/fd")), threading.active_count(),
            len(os.listdir("/proc/self/task")), psutil.Process().memory_info().rss)

def cycle():
    with Machine(vcpus=2, mem_mib=32) as m:
        m.boot_direct64(sys.argv[1], mode=GuestMode.HALT)
        assert m.run_until_exit(timeout=30).reason is ExitReason.HALT

for _ in range(20):  # warm up allocator pools and caches before measuring
    cycle()
before = resources()
for _ in range(200):
    cycle()
print(json.dumps({"before": before, "after": resources()}))
"""


def test_200_create_boot_stop_cycles_leave_fds_threads_and_rss_flat(microguest_elf):
    out = subprocess.run(
        [sys.executable, "-c", CYCLES_IN_A_FRESH_PROCESS, str(microguest_elf)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    measured = json.loads(out.splitlines()[-1])
    (fds, threads, tasks, rss), (fds2, threads2, tasks2, rss2) = (
        measured["before"],
        measured["after"],
    )
    assert (fds2, threads2, tasks2) == (fds, threads, tasks)
    assert rss2 - rss < 8 << 20, f"RSS grew by {(rss2 - rss) >> 10} KiB over 200 machines"


def test_stopping_running_multi_vcpu_guests_never_hangs_or_loses_a_kick(microguest_elf):
    # start/stop at random points of the vCPUs' lives: before they enter KVM_RUN, inside it,
    # while handling console exits. A lost kick would hang stop() (its join times out).
    for i in range(60):
        with Machine(vcpus=3, mem_mib=32) as m:
            m.boot_direct64(microguest_elf, mode=GuestMode.SPIN if i % 2 else GuestMode.COUNT)
            m.start()
            m.stop()
            assert m.exit_info().reason in (ExitReason.CANCELED, ExitReason.HALT)


def test_machines_stopped_without_start_release_everything(microguest_elf):
    before = snapshot_resources()
    for _ in range(50):
        m = Machine(vcpus=2, mem_mib=32)
        m.boot_direct64(microguest_elf, mode=GuestMode.HALT)
        m.stop()
    after = snapshot_resources()
    assert after[:3] == before[:3]
