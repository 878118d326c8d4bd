"""Stage the prebuilt guests into a directory a wheel carries (``scripts/build-wheel.sh``).

Each guest is built (or taken from the user cache) by the same functions a test run
uses, and its cache entry is copied as is to ``<dest>/<kind>/<key>/``: at run time
`cache.build_once` finds an entry there by the same content key when the user cache
has none, and `images.kernel.bundled_kernel` finds the kernel by variant and recipe
(the installing machine may have no kernel source to compute the full key from).

The kernel of the host's variant is built if the cache lacks it (minutes); the other
variant is bundled only if the cache has it (build it with
``SUPERMACHINE_KERNEL_VARIANT=kvm supermachine image build linux``).

Usage: ``python -m pytest_supermachine.bundle DEST``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from .cache import MANIFEST_NAME, cache_dir, write_json_atomic
from .guest.agent.build import build_agent
from .guest.agent.initramfs import build_initramfs
from .guest.microguest.build import build_microguest
from .images.kernel import (
    KernelVariant,
    build_kernel,
    detect_variant,
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


def bundle(dest: Path) -> list[Path]:
    """Copy the microguest, agent, initramfs and kernel(s) entries into ``dest``; return them."""
    staged = [
        _copy_entry(build_microguest().parent, dest, "microguest"),
        _copy_entry(build_agent().parent, dest, "agent"),
        _copy_entry(build_initramfs().parent, dest, "initramfs"),
    ]
    source = find_kernel_source().path
    host = detect_variant()
    for variant in KernelVariant:
        entry = cache_dir() / "kernel" / kernel_cache_key(variant, source=source)
        if variant is host and not (entry / MANIFEST_NAME).is_file():
            build_kernel(variant, source=source)
        if (entry / MANIFEST_NAME).is_file():
            target = _copy_entry(entry, dest, "kernel")
            (target / "bzImage").unlink(missing_ok=True)  # vmlinux boots; halve the wheel
            manifest = json.loads((target / MANIFEST_NAME).read_text())
            write_json_atomic(target / MANIFEST_NAME, {**manifest, "recipe": recipe_key(variant)})
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
