"""Linux guest benchmark: boot to ready, restore to first exec, exec round trip, reset+exec,
and QEMU booting the same kernel and initramfs, in one run.

    python bench/bench_linux.py [--reps 3] [--no-qemu]

Our VMM: `vmlinux` through its PVH entry with the bundled initramfs (busybox +
our agent as /init); times to the kernel's "Run /init" console line and to the
agent's READY. QEMU (Debian's qemu-system-x86, `-M microvm`, KVM): the same
vmlinux, initramfs and command line, timed to the same console line. Prints a
table and one JSON line. Under nested PVM this takes minutes (the guest kernel
is emulated); on hardware KVM, seconds.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit_json, print_table, summarize

from pytest_supermachine.images.linux import LinuxImage
from pytest_supermachine.vmm.kvm import is_nested_pvm
from pytest_supermachine.vmm.machine import Machine

INIT_LINE = "Run /init as init process"
QEMU_CPU_PVM = (
    "host,-xsave,-avx,-avx2,-cx16,-smap,-pku,-fsgsbase,-pcid,-invpcid,-rdrand,"
    "-rdseed,-rdpid,-popcnt,+tsc-deadline,-arch-capabilities"
)


def verbose_cmdline(image: LinuxImage) -> str:
    """The image's command line with the kernel's info messages on ("Run /init" is one)."""
    return " ".join(
        t for t in image.cmdline().split() if t != "quiet" and not t.startswith("loglevel=")
    )


def boot_ours(image: LinuxImage, snapshot: Path) -> tuple[float, float]:
    """(seconds to 'Run /init', seconds to agent READY) from start()."""
    kernel, initrd = image.kernel(), image.initramfs()
    with Machine(mem_mib=image.default_mem_mib) as m:
        m.boot_linux(kernel.vmlinux, cmdline=verbose_cmdline(image), initrd=initrd)
        t0 = time.monotonic()
        m.start()
        m.wait_console(re.escape(INIT_LINE), timeout=900)
        to_init = time.monotonic() - t0
        m.wait_ready(1800)
        to_ready = time.monotonic() - t0
        m.snapshot(snapshot)
    return to_init, to_ready


def boot_qemu(image: LinuxImage, timeout: float = 1800) -> float | None:
    """Seconds until QEMU's guest prints 'Run /init', or None when QEMU is not installed."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        print("qemu-system-x86_64 not found (apt-get install qemu-system-x86): no QEMU baseline")
        return None
    kernel, initrd = image.kernel(), image.initramfs()
    cpu = QEMU_CPU_PVM if is_nested_pvm() else "host"
    argv = [
        qemu,
        "-M",
        "microvm,x-option-roms=off,rtc=off",
        "-accel",
        "kvm",
        "-cpu",
        cpu,
        "-m",
        str(image.default_mem_mib),
        "-kernel",
        str(kernel.vmlinux),
        "-initrd",
        str(initrd),
        "-append",
        f"{verbose_cmdline(image)} console=ttyS0",
        "-nographic",
        "-no-reboot",
        "-nodefaults",
        "-serial",
        "stdio",
    ]
    t0 = time.monotonic()
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    assert proc.stdout is not None
    try:
        buf = b""
        while time.monotonic() - t0 < timeout:
            chunk = proc.stdout.read1(4096)
            if not chunk:
                break
            buf = (buf + chunk)[-8192:]
            if INIT_LINE.encode() in buf:
                return time.monotonic() - t0
        print(
            f"QEMU never printed {INIT_LINE!r}; its last output:\n"
            + buf[-2000:].decode(errors="replace")
        )
        return None
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-qemu", action="store_true")
    args = ap.parse_args()
    image = LinuxImage()
    image.build()
    with tempfile.TemporaryDirectory(prefix="sm-bench-") as d:
        snap = Path(d) / "linux.snap"
        to_init, to_ready = boot_ours(image, snap)
        restore_exec, exec_rt, reset_exec = [], [], []
        for _ in range(args.reps):
            t0 = time.monotonic()
            with Machine.restore(snap) as m:
                m.run(["/bin/busybox", "true"], timeout=600)
                restore_exec.append(time.monotonic() - t0)
                for _ in range(args.reps):
                    t1 = time.monotonic()
                    m.run(["/bin/busybox", "true"], timeout=600)
                    exec_rt.append(time.monotonic() - t1)
                t2 = time.monotonic()
                m.reset()
                m.run(["/bin/busybox", "true"], timeout=600)
                reset_exec.append(time.monotonic() - t2)
    qemu = None if args.no_qemu else boot_qemu(image)
    rows: list[tuple[str, dict[str, float] | float, str]] = [
        ("our VMM: start -> 'Run /init'", to_init, "s"),
        ("our VMM: start -> agent READY", to_ready, "s"),
        ("restore -> first exec done (busybox true)", summarize(restore_exec), "s"),
        ("exec round trip (busybox true)", summarize(exec_rt), "s"),
        ("reset + exec", summarize(reset_exec), "s"),
    ]
    if qemu is not None:
        rows += [
            ("QEMU microvm: process start -> 'Run /init' (baseline)", qemu, "s"),
            ("  our boot to /init relative to QEMU's", to_init / qemu, "x"),
        ]
    print_table(f"Linux guest ({'nested PVM' if is_nested_pvm() else 'hardware KVM'})", rows)
    emit_json(
        "linux",
        {
            "boot_to_init_s": round(to_init, 2),
            "boot_to_ready_s": round(to_ready, 2),
            "restore_to_first_exec_s": round(summarize(restore_exec)["median"], 3),
            "exec_s": round(summarize(exec_rt)["median"], 3),
            "reset_exec_s": round(summarize(reset_exec)["median"], 3),
            "qemu_boot_to_init_s": None if qemu is None else round(qemu, 2),
        },
    )


if __name__ == "__main__":
    main()
