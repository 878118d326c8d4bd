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

DAX is measured by default on hardware KVM and left out under nested PVM, where
the guest's DAX window setup did not finish within minutes (docs/fs.md); ``--dax``
forces it. With ``--boot-cost`` left on (the default), the boot to READY is also timed
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


def boot(image: LinuxImage, mounts: dict, disks: tuple = ()) -> tuple[Machine, float]:
    kernel, initrd = image.kernel(), image.initramfs()
    t0 = time.monotonic()
    m = Machine(mem_mib=image.default_mem_mib, disks=disks, mounts=mount_specs(mounts))
    try:
        m.boot_linux(kernel.vmlinux, cmdline=image.cmdline(), initrd=initrd)
        m.start()
        m.wait_ready(T)
    except BaseException:
        m.stop()
        raise
    return m, time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-boot-cost", action="store_true")
    ap.add_argument("--dax", action=argparse.BooleanOptionalAction, default=not is_nested_pvm())
    args = ap.parse_args()
    kinds = ("fs", "dax", "blk") if args.dax else ("fs", "blk")
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
        for _ in range(args.reps):
            for where in kinds:
                with Machine.restore(snap) as vm:
                    dd = f"dd if=/{where}/big.bin of=/dev/null bs=1M"
                    samples.setdefault(f"{where} read 1st", []).append(
                        BIG_MIB / guest_seconds(vm, dd)
                    )
                    samples.setdefault(f"{where} read 2nd", []).append(
                        BIG_MIB / guest_seconds(vm, dd)
                    )
                    loop = f"for f in /{where}/tree/*; do [ -e $f ]; done"
                    samples.setdefault(f"{where} stat", []).append(
                        SMALL_FILES / guest_seconds(vm, loop)
                    )
                    loop = f"for f in /{where}/tree/*; do : <$f; done"
                    samples.setdefault(f"{where} open+close", []).append(
                        SMALL_FILES / guest_seconds(vm, loop)
                    )

        boots: dict[str, float] = {f"boot, {' + '.join(kinds)}": boot_all}
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
    print_table("virtio-fs vs virtio-blk ext4 (guest clock; fresh restore per rep)", rows)
    emit_json(
        "fs",
        {
            "reps": args.reps,
            **{k.replace(" ", "_"): round(v["median"], 1) for k, v in stats.items()},
            **{k.replace(" ", "_").replace(",", ""): round(v, 1) for k, v in boots.items()},
        },
    )


if __name__ == "__main__":
    main()
