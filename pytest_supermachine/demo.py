"""`supermachine demo`: boot the bundled microguest a few ways and show console and timings.

It exercises the whole VMM path a test will take (create VM, load guest, run vCPUs,
console, snapshot, restore, reset, stop) and prints what each step cost on this
machine. Every guest here is expected to power off with status 0; any other end
(triple fault, panic, KVM error, non-zero status) is reported and makes the command
exit 1, so the demo never looks fine over a broken guest.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .vmm import reaper
from .vmm.machine import ExitReason, MachineExit


def powered_off_cleanly(exit_: MachineExit) -> bool:
    """Did the guest end the way every demo guest should: power-off with status 0?"""
    return exit_.reason is ExitReason.HALT and exit_.code == 0


def demo_boot(title: str, *, vcpus: int, mode: int, arg: int = 0) -> bool:
    """Boot the microguest in `mode`, print its console, exit and timings; True if it powered off cleanly."""
    from .guest.microguest import build_microguest
    from .vmm.machine import Machine

    elf = build_microguest()
    t0 = time.perf_counter()
    with Machine(vcpus=vcpus, mem_mib=128) as m:
        t1 = time.perf_counter()
        m.boot_direct64(elf, mode=mode, arg=arg)
        t2 = time.perf_counter()
        exit_ = m.run_until_exit(timeout=60, expect=None)  # any end is judged below
        t3 = time.perf_counter()
        print(f"--- {title}: console ---")
        print(m.console.rstrip())
        print(f"--- {title}: {exit_.describe()}")
    t4 = time.perf_counter()
    times = {
        "create_ms": (t1 - t0) * 1e3,
        "load_ms": (t2 - t1) * 1e3,
        "run_ms": (t3 - t2) * 1e3,
        "stop_ms": (t4 - t3) * 1e3,
    }
    print("    " + "  ".join(f"{k}={v:.2f}" for k, v in times.items()))
    return _verdict(title, exit_)


def _verdict(title: str, exit_: MachineExit) -> bool:
    if powered_off_cleanly(exit_):
        return True
    print(
        f"supermachine demo: FAILED: {title}: {exit_.describe()} (expected a power-off with "
        "status 0)",
        file=sys.stderr,
    )
    return False


def run_demo(vcpus: int = 2) -> int:
    from .doctor import kvm_summary
    from .guest.microguest import GuestMode, build_microguest

    print(f"supermachine demo — {kvm_summary()}")
    t0 = time.perf_counter()
    elf = build_microguest()
    print(f"microguest: {elf} (built or cached in {(time.perf_counter() - t0) * 1e3:.0f} ms)")
    ok = [
        demo_boot("boot and halt", vcpus=1, mode=GuestMode.HALT),
        demo_boot(f"SMP bring-up of {vcpus} vCPUs", vcpus=vcpus, mode=GuestMode.SMP),
        demo_boot("dirty 1000 pages at CPL3", vcpus=1, mode=GuestMode.DIRTY, arg=1000),
        _snapshots(elf),
    ]
    reaper.drain()
    return 0 if all(ok) else 1


def _snapshots(elf: Path) -> bool:
    """Snapshot a guest that will dirty 1000 pages, then restore it and reset it in place."""
    import statistics
    import tempfile

    from .guest.microguest import GuestMode
    from .vmm.machine import Machine

    with tempfile.TemporaryDirectory(prefix="sm-demo-") as d:
        path = Path(d) / "dirty.snap"
        with Machine(mem_mib=128) as m:
            m.boot_direct64(elf, mode=GuestMode.DIRTY, arg=1000)
            t0 = time.perf_counter()
            m.snapshot(path, durable=False)
            save_ms = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        with Machine.restore(path) as m:
            restore_ms = (time.perf_counter() - t0) * 1e3
            exits = [m.wait(timeout=60)]
            resets = []
            for _ in range(20):
                t0 = time.perf_counter()
                m.reset(resume=False)
                resets.append((time.perf_counter() - t0) * 1e3)
                m.resume()
                exits.append(m.wait(timeout=60))
            print("--- snapshots: guest that dirties 1000 pages, then powers off ---")
            print(m.console.rstrip())
        print(
            f"    save_ms={save_ms:.2f}  restore_ms={restore_ms:.2f}  "
            f"reset_ms(median of 20, 1000 dirty pages)={statistics.median(resets):.2f}"
        )
    return all(_verdict(f"snapshot run {i}", e) for i, e in enumerate(exits))
