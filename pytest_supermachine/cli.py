"""The `supermachine` command (also `python -m pytest_supermachine`).

Subcommands: ``doctor``, ``demo``, ``image list|build``, ``cache list|prune``,
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


def _image_list(args: argparse.Namespace) -> int:
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
    return 0


def _image_build(args: argparse.Namespace) -> int:
    """Build the image and its base snapshot (so the first test run finds it cached)."""
    from .fixtures.factory import MicrovmFactory
    from .session.settings import Settings

    settings = Settings(
        image=args.name,
        vcpus=args.vcpus,
        mem_mib=args.mem_mib,
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


def _cache_prune(args: argparse.Namespace) -> int:
    store = _store(args)
    removed = store.prune(everything=args.all, unused_days=args.unused_days, dry_run=args.dry_run)
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
    p = isub.add_parser("list", help="the images tests can use")
    p.set_defaults(func=_image_list)
    p = isub.add_parser("build", help="build an image and its base snapshot into the cache")
    p.add_argument("name", nargs="?", default="default")
    p.add_argument("--vcpus", type=int, default=None)
    p.add_argument("--mem-mib", type=int, default=None)
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
