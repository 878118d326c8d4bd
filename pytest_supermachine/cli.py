"""The `supermachine` command (also `python -m pytest_supermachine`).

Subcommands: ``doctor``, ``demo``, ``image list|build|pull``, ``cache list|prune``,
``replay CAPSULE [--runs N] [--shell]``. Errors we raise on purpose print as one
line (exit 1); anything else is a bug and keeps its traceback.

Each subcommand imports what it needs when it runs (lazy imports below): pytest,
filelock and the VMM take long to import, and ``supermachine --help`` or
``image list`` need none of them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import SupermachineError

if TYPE_CHECKING:
    from .images.reference import RegistryReference
    from .snapshot_store import SnapshotStore


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(vcpus=args.vcpus)


def _doctor(args: argparse.Namespace) -> int:
    from .doctor import main

    return main()


def _store(args: argparse.Namespace) -> SnapshotStore:
    from .cache import cache_dir
    from .snapshot_store import SnapshotStore

    return SnapshotStore(Path(args.cache_dir) if args.cache_dir else cache_dir())


def _pull_root(args: argparse.Namespace) -> Path | None:
    """The pull cache under ``--cache-dir``, or None for the default (``cache_dir()/oci``)."""
    from .images.distribution import CACHE_KIND

    return Path(args.cache_dir) / CACHE_KIND if getattr(args, "cache_dir", None) else None


def _tagged_name(reference: RegistryReference) -> str:
    """``host/repo:tag`` of a pulled image (its digest is shown in a column of its own)."""
    import dataclasses

    return dataclasses.replace(reference, digest=None).name if reference.tag else reference.name


def _last_use(layout: Path) -> float:
    from .images.distribution import PULL_RECORD

    return (layout.parent / PULL_RECORD).stat().st_mtime


def _image_list(args: argparse.Namespace) -> int:
    from .images.distribution import pulled_images
    from .images.registry import alias_target, canonical_name, get_image, image_names

    for name in image_names():
        if alias_target(name) is not None:
            print(f"{name:<12} -> {canonical_name(name)}")
            continue
        image = get_image(name)
        print(
            f"{name:<12} {image.description} (default {image.default_vcpus} vCPU, "
            f"{image.default_mem_mib} MiB)"
        )
    pulled = pulled_images(_pull_root(args))
    if pulled:
        print("pulled OCI images (use them as oci:REF):")
    for p in pulled:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(_last_use(p.layout)))
        print(
            f"  {_tagged_name(p.reference)}  {p.manifest_digest[:19]}  {_size(p.size)}, "
            f"{p.layers} layers, last used {used}"
        )
    return 0


def _image_pull(args: argparse.Namespace) -> int:
    """Pull an ``oci:`` image into the cache with a progress bar (bytes and layers)."""
    from .images.distribution import PullProgress, pull_image

    def show(p: PullProgress) -> None:
        width = 30
        done = p.bytes_done / p.bytes_total if p.bytes_total else 1.0
        bar = "#" * int(done * width)
        sys.stderr.write(
            f"\r[{bar:<{width}}] {_size(p.bytes_done)} / {_size(p.bytes_total)}, "
            f"layers {p.layers_done}/{p.layers_total}"
        )
        sys.stderr.flush()

    t0 = time.perf_counter()
    pulled = pull_image(
        args.reference, cache_root=_pull_root(args), progress=None if args.quiet else show
    )
    if not args.quiet and not pulled.from_cache:
        sys.stderr.write("\n")
    how = "already cached" if pulled.from_cache else f"pulled in {time.perf_counter() - t0:.1f} s"
    print(
        f"{_tagged_name(pulled.reference)}: {pulled.manifest_digest} ({pulled.platform}, "
        f"{_size(pulled.size)}, {pulled.layers} layers) {how}"
    )
    return 0


def _image_build(args: argparse.Namespace) -> int:
    """Build the image and its base snapshot (so the first test run finds it cached)."""
    from .fixtures.factory import MicrovmFactory
    from .session.settings import Settings

    settings = Settings(
        image=args.name,
        vcpus=args.vcpus,
        mem_mib=args.mem_mib,
        disk_mib=args.disk_mib,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        rebuild=args.rebuild,
    )
    factory = MicrovmFactory(settings, session_start=time.time())
    try:
        image = factory.image()
        t0 = time.perf_counter()
        print(f"{image.name}: {image.build()}")
        info = factory.base()
        what = "built" if info.built else "already cached"
        print(
            f"{image.name}: base snapshot {what} ({info.vcpus} vCPU, {info.mem_mib} MiB) "
            f"in {time.perf_counter() - t0:.2f} s: {info.path}"
        )
    finally:
        factory.close()
    return 0


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _cache_list(args: argparse.Namespace) -> int:
    store = _store(args)
    entries = store.entries()
    print(
        f"snapshot cache: {store.dir} ({len(entries)} entries, "
        f"{_size(sum(e.size for e in entries))} on disk)"
    )
    by_key = {e.key: e for e in entries}
    for e in entries:
        meta = e.meta
        parent = meta.get("parent")
        on = (
            f" on {by_key[parent].name}"
            if parent in by_key
            else (f" on {parent}" if parent else "")
        )
        param = f"[{meta['param']}]" if meta.get("param") else ""
        shape = f"{meta.get('vcpus', '?')} vCPU {meta.get('mem_mib', '?')} MiB"
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
        print(
            f"{e.key}  {e.kind:<5} {e.name}{param}{on}  ({shape}, {_size(e.size)}, "
            f"last used {used})"
        )
    return 0


def _prune_pulled(args: argparse.Namespace) -> list[tuple[Path, str]]:
    """Pulled images to remove (all with ``--all``, else those unused for ``--unused-days``).

    With each goes the root filesystem built from it (`_prune_oci_rootfs`). Each is
    removed under its ``.lock`` (the one `pull_image` holds), lock file included,
    so a concurrent pull of the same image is never cut off.
    """
    import shutil

    from filelock import FileLock

    from .images.distribution import pulled_images

    cutoff = None if args.unused_days is None else time.time() - args.unused_days * 86400
    removed: list[tuple[Path, str]] = []
    built_from: set[str] = set()
    for p in pulled_images(_pull_root(args)):
        entry = p.layout.parent
        if args.all:
            why = "--all"
        elif cutoff is not None and _last_use(p.layout) < cutoff:
            why = f"pulled image {_tagged_name(p.reference)} unused for over {args.unused_days:g} days"
        else:
            continue
        removed.append((entry, why))
        built_from.add(p.manifest_digest)
        if args.dry_run:
            continue
        lock = entry.with_name(entry.name + ".lock")
        with FileLock(str(lock)):
            shutil.rmtree(entry, ignore_errors=True)
        lock.unlink(missing_ok=True)
    return removed + _prune_oci_rootfs(args, built_from)


def _prune_oci_rootfs(args: argparse.Namespace, built_from: set[str]) -> list[tuple[Path, str]]:
    """Root filesystems (ext4) of OCI images: all with ``--all``, else those of pruned pulls.

    Each entry goes under its build lock, lock file included. Root filesystems of other
    kinds (directories, Debian trees) are not OCI images and stay.
    """
    import json
    import shutil

    from filelock import FileLock

    from .cache import MANIFEST_NAME, cache_dir
    from .images.rootfs import CACHE_KIND

    root = (Path(args.cache_dir) if args.cache_dir else cache_dir()) / CACHE_KIND
    removed: list[tuple[Path, str]] = []
    for manifest in sorted(root.glob(f"*/{MANIFEST_NAME}")):
        try:
            record = json.loads(manifest.read_text())
        except (OSError, ValueError):
            continue
        if record.get("kind") != "oci":
            continue
        digest = record.get("content_digest")
        if not args.all and digest not in built_from:
            continue
        entry = manifest.parent
        removed.append((entry, "--all" if args.all else f"root filesystem of pulled {digest}"))
        if args.dry_run:
            continue
        lock = root / f"{entry.name}.lock"
        with FileLock(str(lock)):
            shutil.rmtree(entry, ignore_errors=True)
        lock.unlink(missing_ok=True)
    return removed


def _cache_prune(args: argparse.Namespace) -> int:
    store = _store(args)
    removed = store.prune(everything=args.all, unused_days=args.unused_days, dry_run=args.dry_run)
    removed += _prune_pulled(args)
    verb = "would remove" if args.dry_run else "removed"
    for path, why in removed:
        print(f"{verb} {path.name}: {why}")
    print(f"{verb} {len(removed)} item(s) from {store.dir}")
    return 0


def _replay(args: argparse.Namespace) -> int:
    from .capsules.replay import run_replay, run_shell

    if args.shell:
        return run_shell(Path(args.capsule), fixture=args.vm, timeout=args.timeout)
    return run_replay(Path(args.capsule), args.runs, args.pytest_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="supermachine", description="KVM microVMs for pytest: tools"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("doctor", help="is /dev/kvm usable here; if not, why and how to fix it")
    p.set_defaults(func=_doctor)
    p = sub.add_parser("demo", help="boot the bundled microguest, show its console and timings")
    p.add_argument("--vcpus", type=int, default=2)
    p.set_defaults(func=_demo)

    def cache_dir_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--cache-dir",
            default=None,
            help="the cache directory (default: $SUPERMACHINE_CACHE_DIR, else "
            "$XDG_CACHE_HOME/pytest-supermachine)",
        )

    image = sub.add_parser("image", help="guest images: list them, build one and its base snapshot")
    isub = image.add_subparsers(dest="image_command", required=True)
    p = isub.add_parser("list", help="the images tests can use, and the pulled OCI images")
    cache_dir_option(p)
    p.set_defaults(func=_image_list)
    p = isub.add_parser("pull", help="pull an OCI image (oci:REF) into the cache")
    p.add_argument("reference", help="oci:[HOST[:PORT]/]REPO[:TAG|@sha256:HEX]")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    cache_dir_option(p)
    p.set_defaults(func=_image_pull)
    p = isub.add_parser("build", help="build an image and its base snapshot into the cache")
    p.add_argument(
        "name", nargs="?", default="default", help="an image name or an OCI reference (oci:REF …)"
    )
    p.add_argument("--vcpus", type=int, default=None)
    p.add_argument("--mem-mib", type=int, default=None)
    p.add_argument(
        "--disk-mib",
        type=int,
        default=None,
        help="an OCI image's writable layer in MiB (as the tests' disk_mib; default 256)",
    )
    p.add_argument(
        "--rebuild", action="store_true", help="rebuild the base snapshot even if cached"
    )
    cache_dir_option(p)
    p.set_defaults(func=_image_build)

    cache = sub.add_parser("cache", help="the snapshot cache: list or prune it")
    csub = cache.add_subparsers(dest="cache_command", required=True)
    p = csub.add_parser("list", help="every cached base and layer snapshot")
    cache_dir_option(p)
    p.set_defaults(func=_cache_list)
    p = csub.add_parser(
        "prune", help="remove leftovers, broken chains and (optionally) old entries"
    )
    p.add_argument("--all", action="store_true", help="remove every entry")
    p.add_argument(
        "--unused-days",
        type=float,
        default=None,
        help="also remove entries no test run used for this many days",
    )
    p.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    cache_dir_option(p)
    p.set_defaults(func=_cache_prune)

    p = sub.add_parser(
        "replay",
        help="rerun a failure capsule's test, or open its VM",
        description="Rerun the test of a failure capsule N times from its "
        "pre-test snapshot and report how many runs failed, or (--shell) restore "
        "the VM as it was after the failure and run commands in it. Arguments "
        "after -- go to pytest.",
    )
    p.add_argument("capsule", help="the capsule directory (.supermachine/failures/<test>)")
    p.add_argument("--runs", type=int, default=1, help="how many times to rerun (default 1)")
    p.add_argument(
        "--shell",
        action="store_true",
        help="restore the post-failure VM and read commands to run in it",
    )
    p.add_argument(
        "--vm", default=None, help="with --shell: which fixture's VM (default: the first)"
    )
    p.add_argument("--timeout", type=float, default=60.0, help="with --shell: per-command timeout")
    p.add_argument("pytest_args", nargs="*", help=argparse.SUPPRESS)
    p.set_defaults(func=_replay)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a clean one-line error for users; tracebacks stay for bugs
        if isinstance(e, SupermachineError):
            print(f"supermachine: error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
