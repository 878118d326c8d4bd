"""VMM core benchmark: machine lifecycle cost and the vCPU exit round trip.

    python bench/bench_core.py [--cycles 30] [--exits 20000]

1. create + load + run-to-halt + stop of a 1-vCPU, 64 MiB microguest machine,
   and the full teardown the reaper does off the caller's path;
2. the exit round trip: the microguest does `out` to the control port in a
   loop at CPL0; measured between its two MARKs through our C run loop and,
   in the same run as the baseline, through a pure-Python `fcntl.ioctl(KVM_RUN)`
   loop that dispatches the same exits in Python.
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import fcntl
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit_json, print_table, summarize

from pytest_supermachine.guest.microguest import GuestMode, build_microguest
from pytest_supermachine.vmm import reaper
from pytest_supermachine.vmm._native import ffi, lib
from pytest_supermachine.vmm.machine import Machine

KVM_EXIT_IO = 2
IO_EXIT = struct.Struct("<BBHIQ")


def lifecycle(elf: Path, cycles: int) -> dict[str, dict[str, float]]:
    phases: dict[str, list[float]] = {
        k: [] for k in ("create", "load", "run", "stop", "total", "teardown")
    }
    for _ in range(cycles):
        t0 = time.perf_counter()
        m = Machine(vcpus=1, mem_mib=64)
        t1 = time.perf_counter()
        m.boot_direct64(elf, mode=GuestMode.HALT)
        t2 = time.perf_counter()
        m.run_until_exit(timeout=30)
        t3 = time.perf_counter()
        m.stop()
        t4 = time.perf_counter()
        reaper.drain()
        t5 = time.perf_counter()
        for k, v in zip(
            phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0, t5 - t4), strict=False
        ):
            phases[k].append(v * 1e3)
    return {k: summarize(v) for k, v in phases.items()}


def exits_through_c(elf: Path, n: int) -> float:
    with Machine(vcpus=1, mem_mib=64) as m:
        m.boot_direct64(elf, mode=GuestMode.OUT_LOOP, arg=n)
        m.run_until_exit(timeout=600)
        (_, t_start), (_, t_end) = m.marks()[:2]
        return (t_end - t_start) / n * 1e6


def exits_through_python(elf: Path, n: int) -> float:
    """The same guest, driven by a Python loop around fcntl.ioctl(KVM_RUN)."""
    with Machine(vcpus=1, mem_mib=64) as m:
        m.boot_direct64(elf, mode=GuestMode.OUT_LOOP, arg=n)
        vcpu = m.vcpus[0]
        run = vcpu.run
        raw = ffi.cast("uint8_t *", run)
        marks: list[float] = []
        console = bytearray()
        while True:
            fcntl.ioctl(vcpu.fd, lib.KVM_RUN, 0)
            if run.exit_reason != KVM_EXIT_IO:
                raise RuntimeError(f"unexpected exit {run.exit_reason}")
            # struct kvm_run.io sits at offset 32: direction u8, size u8, port u16, count u32,
            # data_offset u64 (the same layout the C loop reads through <linux/kvm.h>)
            direction, _size, port, _count, data_offset = IO_EXIT.unpack_from(
                ffi.buffer(raw + 32, IO_EXIT.size)
            )
            if port == lib.SM_CONTROL_PORT:
                value = ffi.cast("uint32_t *", raw + data_offset)[0]
                cmd = value & 0xFF
                if cmd == lib.SM_CTL_MARK:
                    marks.append(time.perf_counter())
                elif cmd == lib.SM_CTL_POWEROFF:
                    break
            elif 0x3F8 <= port < 0x400 and direction == 1:
                if port == 0x3F8:
                    console.append(raw[data_offset])
            elif direction == 0:
                raw[data_offset] = 0x60 if port == 0x3FD else 0  # LSR: THR empty
        return (marks[1] - marks[0]) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cycles", type=int, default=30)
    ap.add_argument("--exits", type=int, default=20000)
    args = ap.parse_args()
    elf = build_microguest()
    lifecycle(elf, 3)  # warm-up
    life = lifecycle(elf, args.cycles)
    c_us = [exits_through_c(elf, args.exits) for _ in range(3)]
    py_us = [exits_through_python(elf, args.exits) for _ in range(3)]
    c, py = summarize(c_us), summarize(py_us)
    print_table(
        "machine lifecycle (1 vCPU, 64 MiB microguest)",
        [
            ("create VM (irqchip, PIT, RAM slot, vCPU, C state)", life["create"], "ms"),
            ("load microguest (ELF, page tables, boot info, regs)", life["load"], "ms"),
            ("start -> guest power-off", life["run"], "ms"),
            ("stop (caller-visible)", life["stop"], "ms"),
            ("create+load+run+stop", life["total"], "ms"),
            ("teardown on the reaper thread (off the path)", life["teardown"], "ms"),
        ],
    )
    print_table(
        f"exit round trip ({args.exits} PIO exits at CPL0)",
        [
            ("C run loop (ours)", c, "us/exit"),
            ("pure-Python fcntl.ioctl loop (baseline)", py, "us/exit"),
            ("speed-up of the C loop", py["median"] / c["median"], "x"),
        ],
    )
    emit_json(
        "core",
        {
            "lifecycle_ms_median": {k: round(v["median"], 3) for k, v in life.items()},
            "exit_us_c": round(c["median"], 3),
            "exit_us_python": round(py["median"], 3),
            "exit_speedup": round(py["median"] / c["median"], 3),
        },
    )


if __name__ == "__main__":
    main()
