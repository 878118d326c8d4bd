"""The Linux guest's balloon driver against our virtio-balloon: free page reporting, inflate.

The image boots with a balloon with free page reporting (`LinuxImage.balloon`). What
the host holds for a guest is the private (anonymous) part of its RAM mapping: pages
the guest wrote since the restore; the snapshot's pages are shared page cache.
"""

from __future__ import annotations

import re
import time

from pytest_supermachine.vmm.machine import Machine

MiB = 1 << 20


def meminfo(m: Machine) -> dict[str, int]:
    """/proc/meminfo of the guest, in KiB."""
    text = m.run(["/bin/busybox", "cat", "/proc/meminfo"], timeout=300, check=True).stdout
    return {k: int(v) for k, v in re.findall(r"^(\w+):\s+(\d+) kB", text.decode(), re.M)}


def wait_for(condition, timeout: float, what: str) -> None:
    """Poll `condition` until it holds; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout:g} s"
        time.sleep(0.2)


def test_memory_a_test_allocated_and_freed_goes_back_to_the_host(linux):
    linux.run("true", timeout=300, check=True)
    free_mib = meminfo(linux)["MemFree"] // 1024
    size = min(100, free_mib - 24)  # 100 MiB where it fits; the guest keeps some room
    assert size >= 32, f"the guest has only {free_mib} MiB free"
    held_before = linux.memory.host_usage().anonymous
    # a tmpfs of its own: /tmp's default size (half of RAM) is smaller than the file
    linux.run(
        "/bin/busybox mkdir -p /run/big && /bin/busybox mount -t tmpfs -o size=100% tmpfs /run/big"
        f" && /bin/busybox dd if=/dev/zero of=/run/big/file bs=1048576 count={size} 2>/dev/null",
        timeout=600,
        check=True,
    )
    held_full = linux.memory.host_usage().anonymous
    assert held_full - held_before >= (size - 8) * MiB  # the file's pages are the guest's now
    linux.run("/bin/busybox rm /run/big/file", timeout=300, check=True)

    wait_for(
        lambda: linux.memory.host_usage().anonymous - held_before <= 10 * MiB,
        timeout=120,
        what=f"the guest's freed {size} MiB did not go back to the host",
    )
    assert linux.balloon_stats().reported_pages * 4096 >= (size - 10) * MiB


def test_inflating_the_balloon_shrinks_the_guest_and_deflating_gives_it_back(linux):
    before = meminfo(linux)
    stats = linux.balloon(32, timeout=600)
    assert stats.actual_pages == stats.target_pages == 32 * 256
    inflated = meminfo(linux)
    assert before["MemTotal"] - inflated["MemTotal"] >= 32 * 1024
    assert before["MemFree"] - inflated["MemFree"] >= 24 * 1024
    linux.balloon(0, timeout=600)
    assert meminfo(linux)["MemTotal"] == before["MemTotal"]


def test_a_reset_returns_the_balloon_to_the_snapshots(linux):
    snapshotted = meminfo(linux)["MemTotal"]
    linux.balloon(16, timeout=600)
    linux.reset()
    assert linux.balloon_stats().target_pages == 0
    assert meminfo(linux)["MemTotal"] == snapshotted
