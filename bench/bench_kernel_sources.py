"""Kernel sources benchmark: build the guest kernel from each Debian ``linux-source-*`` and
boot each to the agent, in one run.

    python bench/bench_kernel_sources.py [SOURCE ...]

SOURCE defaults to every ``/usr/src/linux-source-*.tar.*``. For each, with
``$SUPERMACHINE_KERNEL_SOURCE`` naming it: the host variant's kernel is built (or found
in the cache: then the table shows the build time its manifest recorded), booted with
the Linux image's initramfs and command line to the agent's READY, and ``uname -r``
must name the source's series. Prints a table and one JSON line; exits 1 if a source
failed to build or boot (its error is printed). Under nested PVM each build takes
~10 min on 2 cores and each boot one to two minutes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit_json, print_table

from pytest_supermachine.errors import SupermachineError
from pytest_supermachine.images import kernel
from pytest_supermachine.images.linux import LinuxImage


def measure(source: Path) -> dict[str, object]:
    """Build (or find) and boot the kernel from ``source``; its row of the table."""
    os.environ[kernel.SOURCE_ENV] = str(source)
    image = LinuxImage()
    t0 = time.monotonic()
    built = image.kernel()
    waited = time.monotonic() - t0
    manifest = json.loads((built.vmlinux.parent / "manifest.json").read_text())
    t0 = time.monotonic()
    machine = image.boot(1, image.default_mem_mib, timeout=1800)
    try:
        boot = time.monotonic() - t0
        result = machine.run("uname -r", timeout=300)
    finally:
        machine.stop()
    release = result.stdout.decode().strip()
    if not result.ok or not release.startswith(kernel.source_series(source) + "."):
        raise SupermachineError(f"{source}: `uname -r` gave {result!r}")
    return {
        "source": source.name,
        "version": kernel.source_version(source),
        "variant": built.variant.value,
        "key": built.key,
        "release": release,
        "patches": manifest.get("patches", []),
        "build_s": manifest.get("build_seconds"),
        "built_now": waited > 5,
        "boot_to_ready_s": round(boot, 2),
        "vmlinux_mib": round(built.vmlinux.stat().st_size / 2**20, 1),
    }


def main() -> None:
    sources = [Path(a) for a in sys.argv[1:]] or sorted(
        p for p in kernel.SOURCE_SEARCH_DIR.glob("linux-source-*.tar.*") if p.is_file()
    )
    if not sources:
        raise SystemExit(f"bench_kernel_sources: no source given or in {kernel.SOURCE_SEARCH_DIR}")
    rows: list[dict[str, object]] = []
    failed: dict[str, str] = {}
    table: list[tuple[str, dict[str, float] | float, str]] = []
    for source in sources:
        try:
            row = measure(source)
        except SupermachineError as e:
            failed[source.name] = str(e)
            print(f"{source}: FAILED\n{e}", file=sys.stderr)
            continue
        rows.append(row)
        name = f"{source.name} ({row['release']}, {row['variant']})"
        table.append((f"{name}: kernel build", float(str(row["build_s"] or 0)), "s"))
        table.append((f"{name}: boot to agent ready", float(str(row["boot_to_ready_s"])), "s"))
    print_table("guest kernel per source (build: as recorded when it was built)", table)
    emit_json("kernel_sources", {"sources": rows, "failed": failed})
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
