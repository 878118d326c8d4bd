"""virtio-fs benchmark: host directories in the Linux guest against a virtio-blk ext4 image.

    python bench/bench_fs.py [--reps 3] [--no-boot-cost] [--dax | --no-dax]

One guest boots with the same host tree three ways: a virtio-fs mount (/fs), a
virtio-fs mount with a DAX window (/dax), and an ext4 image of the tree on a
read-only virtio-blk disk (/blk, mounted by the benchmark). The tree is a 64 MiB
file and 1,000 small files. Measured by the guest agent (spawn to exit on the
guest's clock, minus the same for an empty script, so neither the agent's round
trip nor the shell's start is in the numbers), each rep on a fresh restore of the booted
snapshot, so the guest's page cache starts as the snapshot left it (without the
file):

* sequential read of the 64 MiB file (``dd bs=1M``), first read and second read, MB/s;
* ``stat`` of each of the 1,000 files (the shell's ``[ -e ]``), per second;
* open + close of each of them (the shell's ``: <file``), per second.

DAX is measured by default (also under nested PVM, where it works since
SETUPMAPPING honours Linux's ``fh = -1``; docs/fs.md); ``--no-dax`` leaves it out
and then still probes it: a boot with one DAX mount gets ``--dax-probe`` seconds
(default 600) to reach READY, and the table says whether it did, against the
non-DAX boot. ``--only fs,dax,blk`` reads from a subset (a PVM run takes tens of
minutes). With ``--boot-cost`` left on (the default), the boot to READY is also timed
without mounts, with one mount, and with one DAX mount (what DAX costs the boot:
the guest builds struct pages for the window). Prints a table and one JSON line.
Under nested PVM every guest system call is emulated: expect minutes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit_json, print_table, summarize

from pytest_supermachine.errors import GuestTimeout
from pytest_supermachine.images.linux import LinuxImage
from pytest_supermachine.images.rootfs import make_ext4
from pytest_supermachine.mounts import Mount
from pytest_supermachine.vmm.devices.hub import DiskSpec
from pytest_supermachine.vmm.fsmounts import mount_specs
from pytest_supermachine.vmm.kvm import is_nested_pvm
from pytest_supermachine.vmm.machine import Machine

BIG_MIB = 64
SMALL_FILES = 1000
T = 1800.0


def make_tree(root: Path) -> None:
    root.mkdir()
    with open(root / "big.bin", "wb") as f:
        for _ in range(BIG_MIB):
            f.write(os.urandom(1 << 20))
    (root / "tree").mkdir()
    for i in range(SMALL_FILES):
        (root / "tree" / f"f{i:04}").write_bytes(b"x" * (i % 512))


def agent_seconds(m: Machine, script: str) -> float:
    """The agent's own measure of `script` (spawn to exit, guest clock); failure ends the benchmark."""
    r = m.run(f"{script} >/dev/null", timeout=T)
    if not r.ok:
        raise SystemExit(f"bench_fs: {script!r} failed: {r.stderr[-300:]!r}\n{m.console[-2000:]}")
    return r.duration


def guest_seconds(m: Machine, script: str) -> float:
    """Seconds `script` took in the guest, the shell's own start and exit taken off."""
    overhead = min(agent_seconds(m, ":") for _ in range(2))
    return max(agent_seconds(m, script) - overhead, 1e-6)


def record(samples: dict[str, list[float]], name: str, value: float) -> None:
    """Add a sample, and say it at once on stderr (a run takes minutes under nested PVM)."""
    samples.setdefault(name, []).append(value)
    print(f"bench_fs: {name}: {value:.3f}", file=sys.stderr, flush=True)


def boot(
    image: LinuxImage, mounts: dict, disks: tuple = (), timeout: float = T
) -> tuple[Machine, float]:
    kernel, initrd = image.kernel(), image.initramfs()
    t0 = time.monotonic()
    m = Machine(mem_mib=image.default_mem_mib, disks=disks, mounts=mount_specs(mounts))
    try:
        m.boot_linux(kernel.vmlinux, cmdline=image.cmdline(), initrd=initrd)
        m.start()
        m.wait_ready(timeout)
    except BaseException:
        m.stop()
        raise
    return m, time.monotonic() - t0


def probe_dax_boot(image: LinuxImage, src: Path, timeout: float) -> tuple[float, str]:
    """Seconds a boot with one DAX mount took to READY (inf if not within `timeout`),
    and the last lines of its console."""
    try:
        vm, seconds = boot(image, {"/dax": Mount(src, dax=True)}, timeout=timeout)
    except GuestTimeout as e:
        return float("inf"), "\n".join(str(e.console_tail or "").splitlines()[-6:])
    try:
        return seconds, "\n".join(vm.console.splitlines()[-3:])
    finally:
        vm.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-boot-cost", action="store_true")
    ap.add_argument("--dax", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument(
        "--only", default="", help="comma-separated subset of fs,dax,blk to read from (default all)"
    )
    ap.add_argument(
        "--dax-probe",
        type=float,
        default=600.0,
        help="without --dax: seconds a boot with a DAX mount gets to reach READY (0: no probe)",
    )
    args = ap.parse_args()
    booted = ("fs", "dax", "blk") if args.dax else ("fs", "blk")
    kinds = tuple(k for k in booted if k in args.only.split(",")) if args.only else booted
    image = LinuxImage()
    image.build()
    with tempfile.TemporaryDirectory(prefix="bench-fs-") as tmp:
        work = Path(tmp)
        src = work / "src"
        make_tree(src)
        disk = make_ext4(src, work / "tree.ext4", seed="bench-fs", label="bench")
        mounts = {"/fs": Mount(src), **({"/dax": Mount(src, dax=True)} if args.dax else {})}
        m, boot_all = boot(image, mounts, (DiskSpec(path=str(disk), read_only=True),))
        snap = work / "fs.snap"
        try:
            m.run("mkdir -p /blk && mount -t ext4 -o ro /dev/vda /blk", timeout=T, check=True)
            m.snapshot(snap)
        finally:
            m.stop()

        samples: dict[str, list[float]] = {}
        dax_probe: tuple[float, str] | None = None
        for _ in range(args.reps):
            for where in kinds:
                with Machine.restore(snap) as vm:
                    dd = f"dd if=/{where}/big.bin of=/dev/null bs=1M"
                    record(samples, f"{where} read 1st", BIG_MIB / guest_seconds(vm, dd))
                    record(samples, f"{where} read 2nd", BIG_MIB / guest_seconds(vm, dd))
                    loop = f"for f in /{where}/tree/*; do [ -e $f ]; done"
                    record(samples, f"{where} stat", SMALL_FILES / guest_seconds(vm, loop))
                    loop = f"for f in /{where}/tree/*; do : <$f; done"
                    record(samples, f"{where} open+close", SMALL_FILES / guest_seconds(vm, loop))

        boots: dict[str, float] = {f"boot, {' + '.join(booted)}": boot_all}
        if not args.no_boot_cost:
            variants: list[tuple[str, dict]] = [
                ("boot, no mounts", {}),
                ("boot, 1 mount", {"/fs": Mount(src)}),
            ]
            if args.dax:
                variants.append(("boot, 1 DAX mount", {"/dax": Mount(src, dax=True)}))
            for name, ms in variants:
                vm, seconds = boot(image, ms)
                vm.stop()
                boots[name] = seconds
        if not args.dax and args.dax_probe > 0:
            dax_probe = probe_dax_boot(image, src, args.dax_probe)

    stats = {k: summarize(v) for k, v in samples.items()}
    rows: list[tuple[str, dict[str, float] | float, str]] = []
    for kind, unit in (
        ("read 1st", "MB/s"),
        ("read 2nd", "MB/s"),
        ("stat", "1/s"),
        ("open+close", "1/s"),
    ):
        for where in kinds:
            rows.append(
                (
                    f"{kind} {BIG_MIB} MiB / {SMALL_FILES} files: {where}",
                    stats[f"{where} {kind}"],
                    unit,
                )
            )
    rows += [(name, seconds, "s") for name, seconds in boots.items()]
    if dax_probe is not None:
        rows.append(("boot, 1 DAX mount (probe; inf: not READY in time)", dax_probe[0], "s"))
    print_table("virtio-fs vs virtio-blk ext4 (guest clock; fresh restore per rep)", rows)
    if dax_probe is not None:
        seconds, console = dax_probe
        verdict = (
            f"reached READY in {seconds:.1f} s"
            if seconds != float("inf")
            else f"was not READY after {args.dax_probe:g} s"
        )
        print(
            f"\nDAX left out of the reads (nested PVM: {is_nested_pvm()}): a boot with one DAX "
            f"mount {verdict}; a boot with all non-DAX devices took {boot_all:.1f} s. "
            f"Its console ended with:\n{console}"
        )
    emit_json(
        "fs",
        {
            "reps": args.reps,
            **{k.replace(" ", "_"): round(v["median"], 1) for k, v in stats.items()},
            **{k.replace(" ", "_").replace(",", ""): round(v, 1) for k, v in boots.items()},
            **(
                {
                    "dax_probe_timeout_s": args.dax_probe,
                    "dax_probe_boot_s": None
                    if dax_probe[0] == float("inf")
                    else round(dax_probe[0], 1),
                }
                if dax_probe is not None
                else {}
            ),
        },
    )


if __name__ == "__main__":
    main()
