"""Linux guest benchmark: our VMM next to QEMU on the same kernel and initramfs, and a soak.

    python bench/bench_linux.py [--reps 5] [--soak-pooled 500] [--soak-fresh 200] [--no-qemu]

Measured on both, with the product's command line (quiet):

* boot to ready: from before the kernel is loaded (ours: before the machine is created;
  QEMU: before its process starts) to the agent's ready (ours: its control-port write;
  QEMU: its "listening" console line, written just before that port write);
* the guest clock at the kernel's "Run /init" (from dmesg: where the kernel's own time goes);
* exec round trip: `busybox true` through the agent protocol (ours over virtio-vsock; QEMU
  over TCP through its user-mode network, this host has no vhost-vsock);
* restore + exec: a new machine from the ready snapshot, then `busybox true` (ours:
  `Machine.restore`; QEMU: a new process with `-loadvm`, a connection and HELLO);
* reset + exec: back to the ready snapshot in place, then `busybox true` (ours: `reset()`;
  QEMU: `loadvm`, a new connection and HELLO; on hardware KVM only, as QEMU's loadvm in
  place breaks a kvm_pvm guest: bench/_qemu_peer.py says why, and so does the output).

The targets of issue 11 are printed next to them. The soak runs `true` through the guest's
shell on machines handed out like the plugin's pool does (reset in place before each
command) and on fresh restores, and prints how many failed (issue 11: user processes died
with SIGSEGV on nested PVM); the exit status is 1 when any did. Every timed command is
checked: a failed one ends the benchmark with its console tail.

QEMU (Debian's qemu-system-x86, `-M microvm`, KVM) is installed with apt-get when missing
(bench/_qemu_peer.py); when it cannot be, the benchmark stops saying how, unless
`--no-qemu` leaves the baseline out. A missing baseline is never printed as a number.
Prints a table and one JSON line. Under nested PVM this takes long (the guest kernel is
emulated; other VMs on the machine slow it further: the JSON line has the load average
at the end, and `boot_loadavg_1m` the one when each boot started, ours and QEMU's).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit_json, print_table, summarize
from _qemu_peer import (
    NO_LOADVM_IN_PLACE,
    QEMU_CPU_PVM,
    PeerUnavailable,
    QemuGuest,
    ensure_qemu,
)

from pytest_supermachine.images.linux import LinuxImage
from pytest_supermachine.vmm.agent import AgentClient, AgentError, RunResult
from pytest_supermachine.vmm.kvm import is_nested_pvm
from pytest_supermachine.vmm.machine import Machine

INIT_LINE = re.compile(r"^\[\s*(\d+\.\d+)\] Run /init as init process", re.MULTILINE)
EXEC_TIMEOUT = 600.0
READY_TIMEOUT = 1800.0
TRUE_ARGV = ["/bin/busybox", "true"]
#: Issue 11's targets on this machine (seconds).
TARGETS = {"boot_to_ready_s": 25.0, "exec_s": 0.7, "reset_exec_s": 1.0}


class BenchFailure(SystemExit):
    """A measurement could not be taken honestly; the message says why."""

    def __init__(self, message: str) -> None:
        super().__init__(f"bench_linux: {message}")


def describe_failure(console: str, what: str, result: RunResult) -> str:
    return (
        f"{what} failed: returncode {result.returncode}, timed_out={result.timed_out}, "
        f"stderr {result.stderr[-300:]!r}\n--- guest console tail ---\n{console[-3000:]}"
    )


def checked(result: RunResult, console: str, what: str) -> RunResult:
    if not result.ok:
        raise BenchFailure(describe_failure(console, what, result))
    return result


def init_clock(dmesg: bytes) -> float:
    """The guest clock (s) at the kernel's "Run /init" line of its log."""
    m = INIT_LINE.search(dmesg.decode(errors="replace"))
    if m is None:
        raise BenchFailure("no 'Run /init' line in the guest's dmesg")
    return float(m.group(1))


def measure_ours(image: LinuxImage, snap: Path, reps: int) -> dict[str, object]:
    """Boot to ready (then snapshot), restore -> first exec, exec round trips, reset + exec."""
    load = os.getloadavg()[0]
    t0 = time.monotonic()
    m = image.boot(1, image.default_mem_mib, timeout=READY_TIMEOUT)
    try:
        to_ready = time.monotonic() - t0
        dmesg = checked(m.run(["/bin/busybox", "dmesg"]), m.console, "dmesg").stdout
        m.snapshot(snap)
    finally:
        m.stop()

    def timed(m: Machine, what: str) -> float:
        t = time.monotonic()
        checked(m.run(TRUE_ARGV, timeout=EXEC_TIMEOUT), m.console, what)
        return time.monotonic() - t

    restore_exec, exec_rt, reset_exec = [], [], []
    for _ in range(reps):
        t = time.monotonic()
        with Machine.restore(snap) as m:
            timed(m, "first exec after restore")
            restore_exec.append(time.monotonic() - t)
            exec_rt += [timed(m, "exec") for _ in range(reps)]
            t = time.monotonic()
            m.reset()
            timed(m, "first exec after reset")
            reset_exec.append(time.monotonic() - t)
    return {
        "boot_to_ready_s": to_ready,
        "boot_loadavg_1m": load,
        "init_clock_s": init_clock(dmesg),
        "restore_exec_s": summarize(restore_exec),
        "exec_s": summarize(exec_rt),
        "reset_exec_s": summarize(reset_exec),
    }


def measure_qemu(
    image: LinuxImage, qemu: str, reps: int
) -> tuple[dict[str, object], dict[str, str]]:
    """The same measurements on QEMU (bench/_qemu_peer.py says how each is taken).

    Returns the numbers and, for each measurement QEMU has none of, why.
    """
    missing: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="sm-bench-qemu-state-") as d:
        state = Path(d) / "vmstate.qcow2"

        def start(loadvm: str | None = None) -> QemuGuest:
            return QemuGuest(
                qemu,
                image.kernel().vmlinux,
                image.initramfs(),
                image.cmdline(),
                mem_mib=image.default_mem_mib,
                cpu=QEMU_CPU_PVM if is_nested_pvm() else "host",
                state=state,
                loadvm=loadvm,
            )

        def timed(guest: QemuGuest, client: AgentClient, what: str) -> float:
            t = time.monotonic()
            checked(client.run(TRUE_ARGV, timeout=EXEC_TIMEOUT), guest.console_tail(), what)
            return time.monotonic() - t

        def connect_exec(guest: QemuGuest, what: str) -> None:
            client = guest.connect()
            try:
                timed(guest, client, what)
            finally:
                client.close()

        load = os.getloadavg()[0]
        with start() as guest:
            to_ready = guest.wait_ready(READY_TIMEOUT)
            try:  # before any connection, so that a restore finds none open
                guest.monitor("savevm ready")
            except PeerUnavailable as e:  # then QEMU has no restore or reset number, and says why
                missing["restore_exec_s"] = missing["reset_exec_s"] = str(e)
            client = guest.connect()
            try:
                dmesg = checked(
                    client.run(["/bin/busybox", "dmesg"]), guest.console_tail(), "dmesg"
                )
                exec_rt = [timed(guest, client, "exec") for _ in range(reps * reps)]
            finally:
                client.close()
            if is_nested_pvm():
                missing.setdefault("reset_exec_s", NO_LOADVM_IN_PLACE)
            reset_exec = []
            for _ in range(0 if "reset_exec_s" in missing else reps):
                t = time.monotonic()
                guest.monitor("loadvm ready")
                connect_exec(guest, "first exec after loadvm")
                reset_exec.append(time.monotonic() - t)
        restore_exec = []
        for _ in range(0 if "restore_exec_s" in missing else reps):
            t = time.monotonic()
            with start(loadvm="ready") as guest:
                connect_exec(guest, "first exec after -loadvm")
                restore_exec.append(time.monotonic() - t)
    result: dict[str, object] = {
        "boot_to_ready_s": to_ready,
        "boot_loadavg_1m": load,
        "init_clock_s": init_clock(dmesg.stdout),
        "exec_s": summarize(exec_rt),
    }
    if restore_exec:
        result["restore_exec_s"] = summarize(restore_exec)
    if reset_exec:
        result["reset_exec_s"] = summarize(reset_exec)
    for key, why in missing.items():
        print(f"bench_linux: no QEMU {key}: {why}", file=sys.stderr)
    return result, missing


SEGFAULT = re.compile(r"\S+\[\d+\]: segfault at [^\n|]*[^\s|]")


def fault_lines(m: Machine) -> list[str]:
    """The kernel's `segfault at` lines since the machine's last reset or restore.

    They are KERN_INFO, below the console's quiet loglevel, so they are read from the
    guest's own log (dmesg) right after the failed command, before the next reset.
    """
    try:
        log = m.run(["/bin/busybox", "dmesg"], timeout=EXEC_TIMEOUT).stdout
    except AgentError as e:
        return [f"(dmesg failed: {type(e).__name__}: {str(e)[:200]})"]
    return SEGFAULT.findall(log.decode(errors="replace"))


def fault_signature(line: str) -> str:
    """A `segfault at` line without its pid and stack pointer (what repeats across faults)."""
    line = re.sub(r"\[\d+\]", "", line)
    return re.sub(r" sp [0-9a-f]+", "", line)


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
            failures.append(
                f"#{i}: returncode {result.returncode}; guest log: "
                + (" | ".join(fault_lines(m)) or "(no 'segfault at' line)")
            )

    kind = "reset + `true`" if pooled else "restore + `true`"

    def progress(i: int) -> None:  # a soak takes long under PVM: say where it is
        if (i + 1) % 50 == 0 or i + 1 == commands:
            print(f"soak {kind}: {i + 1}/{commands}, {len(failures)} failed", file=sys.stderr)

    if pooled:
        with Machine.restore(snap) as m:
            for i in range(commands):
                m.reset()
                one(m, i)
                progress(i)
    else:
        for i in range(commands):
            with Machine.restore(snap) as m:
                one(m, i)
            progress(i)
    return failures


def median(value: object) -> float:
    return value["median"] if isinstance(value, dict) else float(value)  # type: ignore[index]


def print_side_by_side(ours: dict[str, object], qemu: dict[str, object] | None) -> None:
    """Ours, QEMU's and the target per measurement (medians, seconds)."""
    names = [
        ("boot_to_ready_s", "boot to ready"),
        ("init_clock_s", "guest clock at 'Run /init'"),
        ("restore_exec_s", "restore -> first exec done"),
        ("exec_s", "exec round trip (busybox true)"),
        ("reset_exec_s", "reset + exec"),
    ]
    print(f"\n{'median, s':<34} {'ours':>9} {'QEMU':>9} {'target':>8}")
    for key, label in names:
        q = f"{median(qemu[key]):9.3f}" if qemu and key in qemu else f"{'-':>9}"
        t = f"{TARGETS[key]:8.2f}" if key in TARGETS else f"{'':>8}"
        print(f"{label:<34} {median(ours[key]):9.3f} {q} {t}")
    q = f"{qemu['boot_loadavg_1m']:9.2f}" if qemu else f"{'-':>9}"
    print(f"{'(load average at boot, 1 min)':<34} {ours['boot_loadavg_1m']:9.2f} {q}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
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
    try:  # before the long part, not after it
        qemu_bin = None if args.no_qemu else ensure_qemu()
    except PeerUnavailable as e:
        raise BenchFailure(str(e)) from None
    image = LinuxImage()
    image.build()
    with tempfile.TemporaryDirectory(prefix="sm-bench-") as d:
        snap = Path(d) / "linux.snap"
        ours = measure_ours(image, snap, args.reps)
        try:  # the peer before the soak, so that a failing baseline does not wait for it
            qemu, qemu_missing = (
                (None, {}) if qemu_bin is None else measure_qemu(image, qemu_bin, args.reps)
            )
        except PeerUnavailable as e:
            raise BenchFailure(f"the QEMU baseline failed: {e}") from None
        soak_pooled = soak(snap, args.soak_pooled, pooled=True)
        soak_fresh = soak(snap, args.soak_fresh, pooled=False)
    rows: list[tuple[str, dict[str, float] | float, str]] = [
        ("our VMM: kernel load -> agent ready", ours["boot_to_ready_s"], "s"),
        ("our VMM: guest clock at 'Run /init'", ours["init_clock_s"], "s"),
        ("restore -> first exec done (busybox true)", ours["restore_exec_s"], "s"),
        ("exec round trip (busybox true)", ours["exec_s"], "s"),
        ("reset + exec", ours["reset_exec_s"], "s"),
        (f"soak: failed of {args.soak_pooled} reset + `true`", len(soak_pooled), "cmds"),
        (f"soak: failed of {args.soak_fresh} restore + `true`", len(soak_fresh), "cmds"),
    ]
    results: dict[str, object] = {key: round(median(value), 3) for key, value in ours.items()}
    results["soak_pooled"] = {"commands": args.soak_pooled, "failed": len(soak_pooled)}
    results["soak_fresh"] = {"commands": args.soak_fresh, "failed": len(soak_fresh)}
    results["targets"] = TARGETS
    if qemu is not None:
        rows += [
            ("QEMU microvm: process start -> agent listening", qemu["boot_to_ready_s"], "s"),
            ("QEMU microvm: guest clock at 'Run /init'", qemu["init_clock_s"], "s"),
            ("QEMU: exec round trip (agent over TCP)", qemu["exec_s"], "s"),
        ]
        if "restore_exec_s" in qemu:
            rows.append(("QEMU: -loadvm (new process) + exec", qemu["restore_exec_s"], "s"))
        if "reset_exec_s" in qemu:
            rows.append(("QEMU: loadvm + connect + exec", qemu["reset_exec_s"], "s"))
        results["qemu"] = {key: round(median(value), 3) for key, value in qemu.items()}
        results["qemu_missing"] = qemu_missing
    print_table(f"Linux guest ({'nested PVM' if is_nested_pvm() else 'hardware KVM'})", rows)
    print_side_by_side(ours, qemu)
    for failure in soak_pooled + soak_fresh:
        print(f"soak failure {failure}")
    signatures = Counter(
        fault_signature(line)
        for failure in soak_pooled + soak_fresh
        for line in SEGFAULT.findall(failure)
    )
    for signature, count in signatures.most_common():
        print(f"soak: {count} x {signature}")
    emit_json("linux", results)
    if soak_pooled or soak_fresh:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
