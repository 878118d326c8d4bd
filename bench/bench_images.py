"""OCI image benchmark on the Debian test image (tests/debian_image.py), from a registry on loopback.

    python bench/bench_images.py [--reps 3]

Measures, in one run: pulling from a local docker-registry (MB/s, cold cache),
pull + unpack + ext4 build (into a cold cache; the kernel is the user cache's), first boot to the agent's READY, restore -> first exec,
reset + exec, and a cache-hit resolution (reference -> image with its rootfs,
nothing to download or build). Prints a table and one JSON line. Needs
docker-registry, skopeo and mmdebstrap (scripts/bootstrap.sh); the Debian image
is built once per machine. Under nested PVM the boot takes minutes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: the Debian image

from _common import emit_json, print_table, summarize

from tests.debian_image import debian_python_layout
from tests.registry_fixtures import start_registry


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    layout = debian_python_layout()
    with tempfile.TemporaryDirectory(prefix="bench-images-") as tmp:
        from pytest_supermachine.images.distribution import pull_image
        from pytest_supermachine.images.oci_image import OciImage
        from pytest_supermachine.vmm.machine import Machine

        registry = start_registry(Path(tmp) / "registry")
        try:
            ref = registry.push(layout, "bench/debian", "python").ref
            pulls = []
            for n in range(args.reps):
                t0 = time.perf_counter()
                pulled = pull_image(ref, cache_root=Path(tmp) / f"pull{n}")
                pulls.append(pulled.size / (time.perf_counter() - t0) / 1e6)

            image = OciImage(ref)
            # pull, unpack and ext4 build into a cold cache; the kernel stays in the user cache
            user_cache = os.environ.get("SUPERMACHINE_CACHE_DIR")
            os.environ["SUPERMACHINE_CACHE_DIR"] = str(Path(tmp) / "cold-cache")
            try:
                t0 = time.perf_counter()
                image.rootfs()
                build_s = time.perf_counter() - t0
            finally:
                if user_cache is None:
                    del os.environ["SUPERMACHINE_CACHE_DIR"]
                else:
                    os.environ["SUPERMACHINE_CACHE_DIR"] = user_cache

            t0 = time.perf_counter()
            machine = image.boot(1, image.default_mem_mib, timeout=1800)
            boot_s = time.perf_counter() - t0
            snapshot = Path(tmp) / "base.snap"
            try:
                machine.snapshot(snapshot)
            finally:
                machine.stop()

            # Where a python3 run's time goes: the restore, the first exec of anything,
            # python3 with a cold page cache (its files read through virtio-blk) and warm.
            python = "python3 -c 'print(6*7)'"
            restore_s, first_true, first_exec, warm_exec, reset_exec = [], [], [], [], []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                with Machine.restore(snapshot) as m:
                    restore_s.append(time.perf_counter() - t0)
                    t1 = time.perf_counter()
                    m.run("true", timeout=600, check=True)
                    first_true.append(time.perf_counter() - t1)
                    m.run(python, timeout=600, check=True)
                    first_exec.append(time.perf_counter() - t0)
                    t1 = time.perf_counter()
                    m.run(python, timeout=600, check=True)
                    warm_exec.append(time.perf_counter() - t1)
                    t0 = time.perf_counter()
                    m.reset()
                    m.run(python, timeout=600, check=True)
                    reset_exec.append(time.perf_counter() - t0)

            # cache hits: the same cache the build above filled (a first resolution in
            # another cache would pull and build again and be timed as a "hit")
            hits = []
            os.environ["SUPERMACHINE_CACHE_DIR"] = str(Path(tmp) / "cold-cache")
            try:
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    OciImage(ref).rootfs()  # one HEAD for the tag, then cache hits
                    hits.append((time.perf_counter() - t0) * 1e3)
            finally:
                if user_cache is None:
                    del os.environ["SUPERMACHINE_CACHE_DIR"]
                else:
                    os.environ["SUPERMACHINE_CACHE_DIR"] = user_cache
        finally:
            registry.stop()

    rows = [
        ("pull from loopback registry (cold)", summarize(pulls), "MB/s"),
        ("pull + unpack + ext4 build", build_s, "s"),
        ("first boot to agent ready", boot_s, "s"),
        ("restore (Machine.restore)", summarize(restore_s), "s"),
        ("first exec after restore (true)", summarize(first_true), "s"),
        ("restore -> first exec (python3)", summarize(first_exec), "s"),
        ("python3 again (warm page cache)", summarize(warm_exec), "s"),
        ("reset + exec (python3)", summarize(reset_exec), "s"),
        ("cache-hit resolution (tag -> rootfs)", summarize(hits), "ms"),
    ]
    print_table(f"OCI image {ref} ({pulled.size / 1e6:.0f} MB compressed)", rows)
    emit_json(
        "images",
        {
            "pull_mb_s": summarize(pulls),
            "build_s": build_s,
            "boot_s": boot_s,
            "restore_s": summarize(restore_s),
            "first_true_s": summarize(first_true),
            "restore_first_exec_s": summarize(first_exec),
            "warm_exec_s": summarize(warm_exec),
            "reset_exec_s": summarize(reset_exec),
            "cache_hit_ms": summarize(hits),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
