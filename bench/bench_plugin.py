"""Plugin benchmark: what a VM per test costs through pytest.

    python bench/bench_plugin.py [--tests 200] [--reps 3] [--linux-tests 5] [--import-reps 20]

Every run names its image (``--supermachine-image``): the modes below run on the
``microguest``; one more row runs ``--linux-tests`` tests on the ``linux`` image (the
product's default), reset in place, with the user's snapshot cache (where a user's own
runs keep it) so only the first run pays the Linux boot (0 skips the row). One run, a warm snapshot cache
(built first), each mode in its own pytest process:

1. ``plain``: N trivial tests without a VM (the baseline: pytest's own cost per test);
2. ``microvm``: the same N tests taking ``microvm`` (a pooled VM reset in place);
3. ``fresh``: the same N tests each restoring a fresh VM from the snapshot
   (``--supermachine-pool-size=0``: what you would pay without reset);
4. ``microvm -n 2``: mode 2 under pytest-xdist with two workers (throughput).

5. ``import cost``: pytest on a suite of plain tests with the plugin loaded (``-p
   supermachine``) against ``-p no:supermachine``, ``--import-reps`` runs of each,
   interleaved: the start-up a suite that never asks for a VM pays for having the
   plugin installed (wall time, and the child's CPU time, which load skews less).

Each test is ``def test_i(microvm): assert microvm.run("true").ok`` (the ``plain`` tests
just ``assert True``), so every VM is proven usable. Per-test cost is the median over
tests of setup + call + teardown as pytest's reports time them; the overhead of a mode is
its median minus plain's. Session time is from session start to finish (interpreter and
plugin start-up excluded); throughput is tests per second of session time. Prints a
table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit_json, print_table, summarize

REPO = Path(__file__).resolve().parents[1]

RECORDER = """
import json, os, time

_t = {}
_durations = {}

def pytest_sessionstart(session):
    _t["start"] = time.perf_counter()

def pytest_runtest_logstart(nodeid, location):
    _t.setdefault("first", time.perf_counter())

def pytest_runtest_logfinish(nodeid, location):
    _t["last"] = time.perf_counter()

def pytest_runtest_logreport(report):
    _durations[report.nodeid] = _durations.get(report.nodeid, 0.0) + report.duration

def pytest_sessionfinish(session):
    if hasattr(session.config, "workerinput"):
        return
    out = {"session_s": time.perf_counter() - _t["start"], "tests": list(_durations.values()),
           "span_s": _t["last"] - _t["first"], "failed": session.testsfailed}
    with open(os.environ["BENCH_OUT"], "w") as f:
        json.dump(out, f)
"""


def write_project(root: Path, n: int, image: str) -> None:
    (root / "conftest.py").write_text(RECORDER)
    (root / "pytest.ini").write_text(f"[pytest]\nsupermachine_image = {image}\n")
    (root / "test_plain.py").write_text(
        "import pytest\n\n"
        f"@pytest.mark.parametrize('i', range({n}))\n"
        "def test_plain(i):\n    assert True\n"
    )
    (root / "test_vm.py").write_text(
        "import pytest\n\n"
        f"@pytest.mark.parametrize('i', range({n}))\n"
        "def test_vm(microvm, i):\n    assert microvm.run('true').ok\n"
    )


def run_mode(root: Path, cache: Path, test_file: str, *extra: str) -> dict[str, object]:
    out = root / "result.json"
    out.unlink(missing_ok=True)
    env = {
        **os.environ,
        "BENCH_OUT": str(out),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:hypothesispytest",
        f"--supermachine-cache-dir={cache}",
        test_file,
        *extra,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}")
    data = json.loads(out.read_text())
    data["wall_s"] = wall
    return data


def linux_per_test_ms(n: int) -> dict[str, float]:
    """Per-test cost of `n` microvm tests on the Linux image (pooled VM, reset in place).

    Its snapshot cache is the user's (where a user's own runs keep it), so the base
    snapshot (a Linux boot, a minute or more here) is built by the first run only, and
    outside the timing.
    """
    from pytest_supermachine.cache import cache_dir

    cache = cache_dir()
    with tempfile.TemporaryDirectory(prefix="bench-plugin-linux-") as tmp:
        root = Path(tmp)
        write_project(root, n, "linux")
        run_mode(root, cache, "test_vm.py", "-k", "test_vm[0]")  # the base snapshot, once
        data = run_mode(root, cache, "test_vm.py")
    return summarize([d * 1e3 for d in data["tests"]])  # type: ignore[union-attr]


def import_cost(reps: int) -> dict[str, Any]:
    """Wall and CPU ms of `pytest` on 20 plain tests, with and without the plugin."""
    samples: dict[str, list[float]] = {
        f"{what}_{mode}": [] for what in ("wall", "cpu") for mode in ("with", "without")
    }
    with tempfile.TemporaryDirectory(prefix="bench-plugin-import-") as tmp:
        root = Path(tmp)
        (root / "pytest.ini").write_text("[pytest]\n")
        (root / "test_novm.py").write_text(
            "import pytest\n\n"
            "@pytest.mark.parametrize('i', range(20))\n"
            "def test_novm(i):\n    assert True\n"
        )
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_novm.py"]
        for _ in range(reps):  # interleaved, so drift hits both alike
            for mode, plugin in (("with", "supermachine"), ("without", "no:supermachine")):
                before, t0 = os.times(), time.perf_counter()
                subprocess.run([*cmd, "-p", plugin], cwd=root, capture_output=True, check=True)
                wall, after = time.perf_counter() - t0, os.times()
                cpu = (after.children_user - before.children_user) + (
                    after.children_system - before.children_system
                )
                samples[f"wall_{mode}"].append(wall * 1e3)
                samples[f"cpu_{mode}"].append(cpu * 1e3)
    out: dict[str, Any] = {k: summarize(v) for k, v in samples.items()}
    for what in ("wall", "cpu"):  # medians' difference, and minima's (the least noisy)
        out[f"{what}_added"] = out[f"{what}_with"]["median"] - out[f"{what}_without"]["median"]
        out[f"{what}_added_min"] = out[f"{what}_with"]["min"] - out[f"{what}_without"]["min"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tests", type=int, default=200)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--linux-tests", type=int, default=5)
    ap.add_argument("--import-reps", type=int, default=20)
    args = ap.parse_args()
    imports = import_cost(args.import_reps) if args.import_reps > 0 else None
    n = args.tests
    with tempfile.TemporaryDirectory(prefix="bench-plugin-") as tmp:
        root = Path(tmp)
        cache = root / "cache"
        write_project(root, n, "microguest")
        # Warm the cache (base snapshot) and the microguest build once, outside the timing.
        run_mode(root, cache, "test_vm.py", "-k", "test_vm[0]")
        modes = {
            "plain": ("test_plain.py",),
            "microvm": ("test_vm.py",),
            "fresh": ("test_vm.py", "--supermachine-pool-size=0"),
            "microvm_n2": ("test_vm.py", "-n", "2"),
        }
        runs: dict[str, list[dict[str, object]]] = {m: [] for m in modes}
        for _ in range(args.reps):  # interleaved, so drift hits every mode alike
            for mode, cmd in modes.items():
                runs[mode].append(run_mode(root, cache, *cmd))

    def per_test_ms(mode: str) -> dict[str, float]:
        samples = [d * 1e3 for r in runs[mode] for d in r["tests"]]  # type: ignore[union-attr]
        return summarize(samples)

    def median_of(mode: str, what: str) -> float:
        return statistics.median(float(r[what]) for r in runs[mode])  # type: ignore[arg-type]

    per = {m: per_test_ms(m) for m in ("plain", "microvm", "fresh")}
    sessions = {m: median_of(m, "session_s") for m in modes}
    spans = {m: median_of(m, "span_s") for m in modes}
    throughput = {m: n / spans[m] for m in modes}
    overhead_reset = per["microvm"]["median"] - per["plain"]["median"]
    overhead_fresh = per["fresh"]["median"] - per["plain"]["median"]
    linux = linux_per_test_ms(args.linux_tests) if args.linux_tests > 0 else None
    rows = [
        (f"plain test (no VM), per test, {n} tests", per["plain"], "ms"),
        ("microguest: microvm test (pooled VM, reset)", per["microvm"], "ms"),
        ("microguest: fresh-VM test (restore per test)", per["fresh"], "ms"),
        ("microguest: overhead of microvm over plain", overhead_reset, "ms"),
        ("microguest: overhead of a fresh restore over plain", overhead_fresh, "ms"),
        (
            "microguest: fresh restore / reset overhead",
            overhead_fresh / overhead_reset if overhead_reset > 0 else float("nan"),
            "x",
        ),
    ]
    if linux is not None:
        rows.append((f"linux: microvm test (reset), {args.linux_tests} tests, 1 run", linux, "ms"))
    session_rows = [
        (f"session: {n} plain tests", sessions["plain"], "s"),
        (f"session: {n} microvm tests", sessions["microvm"], "s"),
        (f"session: {n} fresh-VM tests", sessions["fresh"], "s"),
        (
            f"session: {n} microvm tests, -n 2 (worker start-up included)",
            sessions["microvm_n2"],
            "s",
        ),
        ("throughput plain, 1 process", throughput["plain"], "tests/s"),
        ("throughput microvm, 1 process", throughput["microvm"], "tests/s"),
        ("throughput microvm, -n 2", throughput["microvm_n2"], "tests/s"),
        ("throughput fresh VM, 1 process", throughput["fresh"], "tests/s"),
    ]
    print_table(
        f"per-test cost through pytest (microguest: median of {args.reps} runs x {n} tests)", rows
    )
    if imports is not None:
        print_table(
            f"plugin start-up on 20 tests without VMs ({args.import_reps} runs of each)",
            [
                ("pytest -p supermachine, wall", imports["wall_with"], "ms"),
                ("pytest -p no:supermachine, wall", imports["wall_without"], "ms"),
                ("added by the plugin, wall (medians)", imports["wall_added"], "ms"),
                ("added by the plugin, wall (minima)", imports["wall_added_min"], "ms"),
                ("added by the plugin, CPU user+sys (medians)", imports["cpu_added"], "ms"),
                ("added by the plugin, CPU user+sys (minima)", imports["cpu_added_min"], "ms"),
            ],
        )
    print_table("microguest sessions and throughput (median of runs)", session_rows)
    emit_json(
        "plugin",
        {
            "image": "microguest",
            "tests": n,
            "reps": args.reps,
            "linux": None if linux is None else {"tests": args.linux_tests, "per_test_ms": linux},
            "per_test_ms": {m: per[m] for m in per},
            "overhead_ms": {"microvm": overhead_reset, "fresh": overhead_fresh},
            "session_s": sessions,
            "throughput_per_s": throughput,
            "import_cost_ms": imports,
        },
    )


if __name__ == "__main__":
    main()
