"""The `supermachine` command (also `python -m pytest_supermachine`)."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(vcpus=args.vcpus)


def _doctor(args: argparse.Namespace) -> int:
    from .doctor import main

    return main()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="supermachine",
                                     description="KVM microVMs for pytest: tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("doctor", help="is /dev/kvm usable here; if not, why and how to fix it")
    p.set_defaults(func=_doctor)
    p = sub.add_parser("demo", help="boot the bundled microguest, show its console and timings")
    p.add_argument("--vcpus", type=int, default=2)
    p.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # a clean one-line error for users; tracebacks stay for bugs
        from .errors import SupermachineError

        if isinstance(e, SupermachineError):
            print(f"supermachine: error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
