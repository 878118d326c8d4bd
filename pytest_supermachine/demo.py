"""`supermachine demo`: boot the bundled microguest a few ways and show console and timings.

This is the README's main command until the pytest fixtures land: it exercises
the whole VMM path a test will take (create VM, load guest, run vCPUs, console,
stop) and prints what each step cost on this machine.
"""

from __future__ import annotations

import time
from pathlib import Path

from .vmm import reaper


def _run(title: str, *, vcpus: int, mode: int, arg: int = 0) -> dict[str, float]:
    from .guest.microguest import build_microguest
    from .vmm.machine import Machine

    elf = build_microguest()
    t0 = time.perf_counter()
    with Machine(vcpus=vcpus, mem_mib=128) as m:
        t1 = time.perf_counter()
        m.boot_direct64(elf, mode=mode, arg=arg)
        t2 = time.perf_counter()
        exit_ = m.run_until_exit(timeout=60)
        t3 = time.perf_counter()
        print(f"--- {title}: console ---")
        print(m.console.rstrip())
        print(f"--- {title}: {exit_.describe()}")
    t4 = time.perf_counter()
    times = {"create_ms": (t1 - t0) * 1e3, "load_ms": (t2 - t1) * 1e3,
             "run_ms": (t3 - t2) * 1e3, "stop_ms": (t4 - t3) * 1e3}
    print("    " + "  ".join(f"{k}={v:.2f}" for k, v in times.items()))
    return times


def run_demo(vcpus: int = 2) -> int:
    from .doctor import kvm_summary
    from .guest.microguest import GuestMode, build_microguest

    print(f"supermachine demo — {kvm_summary()}")
    t0 = time.perf_counter()
    elf = build_microguest()
    print(f"microguest: {elf} (built or cached in {(time.perf_counter() - t0) * 1e3:.0f} ms)")
    _run("boot and halt", vcpus=1, mode=GuestMode.HALT)
    _run(f"SMP bring-up of {vcpus} vCPUs", vcpus=vcpus, mode=GuestMode.SMP)
    _run("dirty 1000 pages at CPL3", vcpus=1, mode=GuestMode.DIRTY, arg=1000)
    _snapshots(elf)
    reaper.drain()
    return 0


def _snapshots(elf: Path) -> None:
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
            m.wait(timeout=60)
            resets = []
            for _ in range(20):
                t0 = time.perf_counter()
                m.reset(resume=False)
                resets.append((time.perf_counter() - t0) * 1e3)
                m.resume()
                m.wait(timeout=60)
            print("--- snapshots: guest that dirties 1000 pages, then powers off ---")
            print(m.console.rstrip())
        print(f"    save_ms={save_ms:.2f}  restore_ms={restore_ms:.2f}  "
              f"reset_ms(median of 20, 1000 dirty pages)={statistics.median(resets):.2f}")
