"""Replay benchmark: does `supermachine replay` reproduce a failure on a guest-random value?

    python bench/bench_replay.py [--runs 5] [--no-linux]

For each source of guest randomness — the microguest's ``rand`` built-in, and on the
Linux image ``/dev/urandom`` and busybox ``$RANDOM`` — a one-test project whose test
fails only when its guest repeats the value an earlier run of it drew (kept in a host
file): the first run records its value and fails, writing a failure capsule, and
``supermachine replay CAPSULE --runs N`` then fails exactly as often as the guest
repeats that value. Target: N/N (issue 13). Linux rows use the user's snapshot cache,
so only the first run pays the Linux boot. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: the failing test

from _common import emit_json

from tests.guest_random import SOURCES, fails_on_a_repeated_value

REPO = Path(__file__).resolve().parents[1]


def replay_source(image: str, command: str, runs: int, work: Path) -> dict[str, object]:
    (work / "pytest.ini").write_text(f"[pytest]\nsupermachine_image = {image}\n")
    (work / "test_random.py").write_text(fails_on_a_repeated_value(command))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    quiet = ["-p", "no:cacheprovider", "-q"]
    first = subprocess.run(
        [sys.executable, "-m", "pytest", *quiet], cwd=work, env=env, capture_output=True, text=True
    )
    capsules = sorted((work / ".supermachine" / "failures").glob("test_random*"))
    if first.returncode != 1 or not capsules:
        return {"error": f"first run did not fail as expected (exit {first.returncode})"}
    t0 = time.perf_counter()
    replay = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest_supermachine",
            "replay",
            str(capsules[0]),
            "--runs",
            str(runs),
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - t0
    found = re.search(r"supermachine replay: (\d+)/(\d+) runs failed \(([^)]*)\)", replay.stdout)
    if found is None:
        return {"error": f"no replay verdict (exit {replay.returncode})"}
    return {
        "failed": int(found[1]),
        "runs": int(found[2]),
        "verdict": found[3],
        "replay_seconds": round(seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-linux", action="store_true", help="microguest row only")
    args = parser.parse_args()
    results: dict[str, object] = {}
    for name, (image, command) in SOURCES.items():
        if args.no_linux and image == "linux":
            continue
        with tempfile.TemporaryDirectory(prefix="bench-replay-") as tmp:
            results[name] = replay_source(image, command, args.runs, Path(tmp))
    print("\nreplay of a test that failed on a guest-random value")
    print(f"{'source':<24} {'replay':>10}  {'verdict':<28} {'seconds':>8}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<24} {'-':>10}  {r['error']}")
        else:
            print(
                f"{name:<24} {str(r['failed']) + '/' + str(r['runs']):>10}  "
                f"{r['verdict']:<28} {r['replay_seconds']:>8.1f}"
            )
    emit_json("replay", {"runs": args.runs, "sources": results})


if __name__ == "__main__":
    main()
