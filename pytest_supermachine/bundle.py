"""Stage the prebuilt guests into a directory a wheel carries (setup.py's ``build_py``).

Each guest is built (or taken from the user cache) by the same functions a test run
uses, and its cache entry is copied as is to ``<dest>/<kind>/<key>/``: at run time
`cache.build_once` finds an entry there by the same content key when the user cache
has none, and `images.kernel.bundled_kernel` finds the kernel by variant and recipe
(the installing machine may have no kernel source to compute the full key from).

The kernel of both variants (``pvm`` for kvm_pvm hosts, ``kvm`` for hardware KVM) is
built if the user cache lacks it: minutes each, with a progress line at least every
10 s on stderr. Only ``vmlinux`` is carried (it boots; ``bzImage`` would double the size).

Usage: ``python -m pytest_supermachine.bundle DEST``.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from .cache import MANIFEST_NAME, cache_dir, write_json_atomic
from .guest.agent.build import build_agent
from .guest.agent.initramfs import build_initramfs
from .guest.agent.initramfs import recipe_key as initramfs_recipe_key
from .guest.microguest.build import build_microguest
from .images.kernel import (
    KernelVariant,
    build_kernel,
    find_kernel_source,
    kernel_cache_key,
    recipe_key,
)


def _copy_entry(entry: Path, dest: Path, kind: str) -> Path:
    target = dest / kind / entry.name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(entry, target, ignore=shutil.ignore_patterns("work", "*.lock", "build.log"))
    return target


def _add_recipe(entry: Path, recipe: str) -> None:
    """Record in a staged entry's manifest the key a machine lacking some input matches it by."""
    manifest = json.loads((entry / MANIFEST_NAME).read_text())
    write_json_atomic(entry / MANIFEST_NAME, {**manifest, "recipe": recipe})


class _Progress:
    """A kernel build's phase on stderr at most every ``every`` seconds (and at its end)."""

    def __init__(self, variant: KernelVariant, every: float = 10.0) -> None:
        self.variant = variant
        self.every = every
        self.last = float("-inf")

    def __call__(self, phase: str, elapsed: float, lines: int) -> None:
        now = time.monotonic()
        if phase == "done" or now - self.last >= self.every:
            self.last = now
            print(
                f"bundle: {self.variant.value} kernel: {phase} ({elapsed:.0f} s)",
                file=sys.stderr,
                flush=True,
            )


def bundle(dest: Path) -> list[Path]:
    """Copy the microguest, agent, initramfs and both kernels' entries into ``dest``."""
    agent = build_agent()
    initramfs = _copy_entry(build_initramfs().parent, dest, "initramfs")
    _add_recipe(initramfs, initramfs_recipe_key(agent.read_bytes()))
    staged = [
        _copy_entry(build_microguest().parent, dest, "microguest"),
        _copy_entry(agent.parent, dest, "agent"),
        initramfs,
    ]
    source = find_kernel_source().path
    for variant in KernelVariant:
        entry = cache_dir() / "kernel" / kernel_cache_key(variant, source=source)
        if not (entry / MANIFEST_NAME).is_file():
            build_kernel(variant, source=source, progress=_Progress(variant))
        target = _copy_entry(entry, dest, "kernel")
        (target / "bzImage").unlink(missing_ok=True)  # vmlinux boots; halve the wheel
        _add_recipe(target, recipe_key(variant))
        staged.append(target)
    return staged


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m pytest_supermachine.bundle DEST", file=sys.stderr)
        return 2
    for path in bundle(Path(argv[0])):
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        print(f"bundled {path} ({size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
