"""Linux guest benchmark: boot to ready, restore to first exec, exec round trip, reset+exec,
a soak of consecutive commands, and QEMU booting the same kernel and initramfs, in one run.

    python bench/bench_linux.py [--reps 3] [--soak-pooled 500] [--soak-fresh 200] [--no-qemu]

Our VMM: `vmlinux` through its PVH entry with the bundled initramfs (busybox +
our agent as /init); times to the kernel's "Run /init" console line and to the
agent's READY. QEMU (Debian's qemu-system-x86, `-M microvm`, KVM): the same
vmlinux, initramfs and command line, timed to the same console line. Both clocks
start before the kernel is loaded: ours before the machine is created, QEMU's
before its process starts.

Every command's result is checked: a timing is only printed for commands that
succeeded, and a failed one ends the benchmark with its console tail. The soak
runs `true` through the guest's shell on machines handed out like the plugin's
pool does (reset in place before each command) and on fresh restores, and prints
how many failed (issue 11: user processes died with SIGSEGV on nested PVM); the
exit status is 1 when any did. A missing or failing QEMU is an error unless
`--no-qemu` says to leave the baseline out. Prints a table and one JSON line.
Under nested PVM this takes long (the guest kernel is emulated); on hardware KVM,
seconds.
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
from pytest_supermachine.vmm.agent import AgentError, RunResult
from pytest_supermachine.vmm.kvm import is_nested_pvm
from pytest_supermachine.vmm.machine import Machine

INIT_LINE = "Run /init as init process"
QEMU_CPU_PVM = (
    "host,-xsave,-avx,-avx2,-cx16,-smap,-pku,-fsgsbase,-pcid,-invpcid,-rdrand,"
    "-rdseed,-rdpid,-popcnt,+tsc-deadline,-arch-capabilities"
)
QEMU_PACKAGE = "qemu-system-x86"
EXEC_TIMEOUT = 600.0
TRUE_ARGV = ["/bin/busybox", "true"]


class BenchFailure(SystemExit):
    """A measurement could not be taken honestly; the message says why."""

    def __init__(self, message: str) -> None:
        super().__init__(f"bench_linux: {message}")


def verbose_cmdline(image: LinuxImage) -> str:
    """The image's command line with the kernel's info messages on ("Run /init" is one)."""
    return " ".join(
        t for t in image.cmdline().split() if t != "quiet" and not t.startswith("loglevel=")
    )


def describe_failure(m: Machine, what: str, result: RunResult) -> str:
    return (
        f"{what} failed: returncode {result.returncode}, timed_out={result.timed_out}, "
        f"stderr {result.stderr[-300:]!r}\n--- guest console tail ---\n{m.console[-3000:]}"
    )


def timed_exec(m: Machine, what: str) -> float:
    """Seconds for one `busybox true` round trip; a failed command ends the benchmark."""
    t0 = time.monotonic()
    result = m.run(TRUE_ARGV, timeout=EXEC_TIMEOUT)
    elapsed = time.monotonic() - t0
    if not result.ok:
        raise BenchFailure(describe_failure(m, what, result))
    return elapsed


def boot_ours(image: LinuxImage, snapshot: Path) -> tuple[float, float]:
    """(seconds to 'Run /init', seconds to agent READY), both from before the kernel is loaded."""
    kernel, initrd = image.kernel(), image.initramfs()
    t0 = time.monotonic()
    with Machine(mem_mib=image.default_mem_mib) as m:
        m.boot_linux(kernel.vmlinux, cmdline=verbose_cmdline(image), initrd=initrd)
        m.start()
        m.wait_console(re.escape(INIT_LINE), timeout=900)
        to_init = time.monotonic() - t0
        m.wait_ready(1800)
        to_ready = time.monotonic() - t0
        m.snapshot(snapshot)
    return to_init, to_ready


def find_qemu() -> str:
    """The QEMU binary, or a `BenchFailure` saying how to install it."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise BenchFailure(
            f"qemu-system-x86_64 not found: install the baseline with "
            f"`apt-get install {QEMU_PACKAGE}`, or run with --no-qemu to "
            "leave it out"
        )
    return qemu


def boot_qemu(image: LinuxImage, qemu: str, timeout: float = 1800) -> float:
    """Seconds from QEMU's process start (before it loads the kernel) to 'Run /init'."""
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
    finally:
        proc.kill()
        proc.wait()
    raise BenchFailure(
        f"QEMU never printed {INIT_LINE!r} (exit status {proc.returncode}); "
        "its last output:\n" + buf[-2000:].decode(errors="replace")
    )


def soak(snap: Path, commands: int, *, pooled: bool) -> list[str]:
    """Run `true` through the shell `commands` times; return a description of each failure.

    pooled: one machine, reset in place before every command (a pool's handout);
    otherwise a fresh restore per command.
    """
    failures: list[str] = []

    def one(m: Machine, i: int) -> None:
        try:
            result = m.run("true", timeout=EXEC_TIMEOUT)
        except AgentError as e:  # counted like a failed command, with what the guest said
            tail = " | ".join(m.console.splitlines()[-5:]) or "(nothing)"
            failures.append(f"#{i}: {type(e).__name__}: {str(e)[:200]}; console tail: {tail}")
            return
        if not result.ok:
            lines = [ln for ln in m.console.splitlines() if "segfault" in ln]
            failures.append(
                f"#{i}: returncode {result.returncode}; console: "
                + (" | ".join(lines[-3:]) or "(nothing)")
            )

    if pooled:
        with Machine.restore(snap) as m:
            for i in range(commands):
                m.reset()
                one(m, i)
    else:
        for i in range(commands):
            with Machine.restore(snap) as m:
                one(m, i)
    return failures


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--soak-pooled",
        type=int,
        default=500,
        help="commands on one machine reset in place before each (0: skip)",
    )
    ap.add_argument(
        "--soak-fresh", type=int, default=200, help="commands on a fresh restore each (0: skip)"
    )
    ap.add_argument("--no-qemu", action="store_true", help="leave the QEMU baseline out")
    args = ap.parse_args()
    qemu_bin = None if args.no_qemu else find_qemu()  # before the long part, not after it
    image = LinuxImage()
    image.build()
    with tempfile.TemporaryDirectory(prefix="sm-bench-") as d:
        snap = Path(d) / "linux.snap"
        to_init, to_ready = boot_ours(image, snap)
        restore_exec, exec_rt, reset_exec = [], [], []
        for _ in range(args.reps):
            t0 = time.monotonic()
            with Machine.restore(snap) as m:
                timed_exec(m, "first exec after restore")
                restore_exec.append(time.monotonic() - t0)
                for _ in range(args.reps):
                    exec_rt.append(timed_exec(m, "exec"))
                t2 = time.monotonic()
                m.reset()
                timed_exec(m, "first exec after reset")
                reset_exec.append(time.monotonic() - t2)
        soak_pooled = soak(snap, args.soak_pooled, pooled=True)
        soak_fresh = soak(snap, args.soak_fresh, pooled=False)
    qemu = None if qemu_bin is None else boot_qemu(image, qemu_bin)
    rows: list[tuple[str, dict[str, float] | float, str]] = [
        ("our VMM: kernel load -> 'Run /init'", to_init, "s"),
        ("our VMM: kernel load -> agent READY", to_ready, "s"),
        ("restore -> first exec done (busybox true)", summarize(restore_exec), "s"),
        ("exec round trip (busybox true)", summarize(exec_rt), "s"),
        ("reset + exec", summarize(reset_exec), "s"),
        (f"soak: failed of {args.soak_pooled} reset + `true`", len(soak_pooled), "cmds"),
        (f"soak: failed of {args.soak_fresh} restore + `true`", len(soak_fresh), "cmds"),
    ]
    results: dict[str, object] = {
        "boot_to_init_s": round(to_init, 2),
        "boot_to_ready_s": round(to_ready, 2),
        "restore_to_first_exec_s": round(summarize(restore_exec)["median"], 3),
        "exec_s": round(summarize(exec_rt)["median"], 3),
        "reset_exec_s": round(summarize(reset_exec)["median"], 3),
        "soak_pooled": {"commands": args.soak_pooled, "failed": len(soak_pooled)},
        "soak_fresh": {"commands": args.soak_fresh, "failed": len(soak_fresh)},
    }
    if qemu is not None:
        rows += [
            ("QEMU microvm: process start -> 'Run /init' (baseline)", qemu, "s"),
            ("  our boot to /init relative to QEMU's", to_init / qemu, "x"),
        ]
        results["qemu_boot_to_init_s"] = round(qemu, 2)
    print_table(f"Linux guest ({'nested PVM' if is_nested_pvm() else 'hardware KVM'})", rows)
    for failure in soak_pooled + soak_fresh:
        print(f"soak failure {failure}")
    emit_json("linux", results)
    if soak_pooled or soak_fresh:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
