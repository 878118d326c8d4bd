"""Plugin benchmark: what a VM per test costs through pytest.

    python bench/bench_plugin.py [--tests 200] [--reps 3] [--linux-tests 5] [--import-reps 40]

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
   plugin installed (wall time, and the child's CPU time, which load skews less), with
   ``-q``, in the default invocation (whose report header the plugin adds to), and with
   ``-q`` and hypothesis's plugin off in both arms (without bytecode pytest rewrites all of
   hypothesis in every run, a jitter that swamps a few ms). Differences of medians, of
   minima, and the median of the interleaved pairs' differences with its 95% interval.
   The bytecode condition is recorded: with ``PYTHONDONTWRITEBYTECODE`` set, every run
   compiles the plugin's modules from source (and pytest rewrites a wheel-installed
   plugin's modules again each time), so the same code costs more there.

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
import math
import os
import resource
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


IMPORT_PROBE = """
import json, sys, time
import pytest  # loaded by every pytest run before its plugins
t0 = time.perf_counter()
import pytest_supermachine.plugin
t1 = time.perf_counter()
from pytest_supermachine.vmm.kvm_device import kvm_summary  # what the report header calls
kvm_summary()
t2 = time.perf_counter()
# pytest rewrites (re-parses and recompiles) every module of a plugin's distribution when
# the distribution lists them, i.e. a wheel install; an editable install lists none
from importlib.metadata import entry_points
files = entry_points(group="pytest11")["supermachine"].dist.files or []
print(json.dumps({"import_ms": (t1 - t0) * 1e3, "header_probe_ms": (t2 - t1) * 1e3,
                  "dont_write_bytecode": sys.dont_write_bytecode,
                  "pycache_prefix": sys.pycache_prefix,
                  "install": "wheel" if any(f.parts[0] == "pytest_supermachine" for f in files)
                             else "editable"}))
"""

#: The pytest invocations measured, by sample-name prefix: their flags.
INVOCATIONS = {
    "": ("-q",),  # no report header
    "header_": (),  # the default invocation: the plugin's report header lines too
    # hypothesis's plugin off in both arms: without bytecode, pytest rewrites all of
    # hypothesis in every run (~0.5 s here), whose jitter swamps a few ms
    "quiet_": ("-q", "-p", "no:hypothesispytest"),
}


def bytecode_condition(probe: dict[str, Any]) -> dict[str, Any]:
    """Under which bytecode condition the children ran (what the import costs depend on)."""
    return {
        "dont_write_bytecode": probe["dont_write_bytecode"],
        "PYTHONDONTWRITEBYTECODE": os.environ.get("PYTHONDONTWRITEBYTECODE"),
        "pycache_prefix": probe["pycache_prefix"],
        "install": probe["install"],
    }


def median_ci(samples: list[float]) -> tuple[float, float]:
    """A distribution-free 95% confidence interval of the median of `samples` (order statistics)."""
    ordered = sorted(samples)
    k = max(0, int((len(ordered) - 1.96 * math.sqrt(len(ordered))) / 2))
    return ordered[k], ordered[len(ordered) - 1 - k]


def import_cost(reps: int) -> dict[str, Any]:
    """Wall and CPU ms of `pytest` on 20 plain tests, with and without the plugin.

    Each invocation in `INVOCATIONS` ``reps`` times each way, interleaved. CPU is the
    child's user+sys from ``getrusage``.
    """
    samples: dict[str, list[float]] = {
        f"{prefix}{what}_{mode}": []
        for prefix in INVOCATIONS
        for what in ("wall", "cpu")
        for mode in ("with", "without")
    }
    with tempfile.TemporaryDirectory(prefix="bench-plugin-import-") as tmp:
        root = Path(tmp)
        (root / "pytest.ini").write_text("[pytest]\n")
        (root / "test_novm.py").write_text(
            "import pytest\n\n"
            "@pytest.mark.parametrize('i', range(20))\n"
            "def test_novm(i):\n    assert True\n"
        )
        for _ in range(reps):  # interleaved, so drift hits every arm alike
            for prefix, flags in INVOCATIONS.items():
                cmd = [sys.executable, "-m", "pytest", *flags, "-p", "no:cacheprovider"]
                for mode, plugin in (("with", "supermachine"), ("without", "no:supermachine")):
                    before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
                    subprocess.run(
                        [*cmd, "test_novm.py", "-p", plugin],
                        cwd=root,
                        capture_output=True,
                        check=True,
                    )
                    wall = time.perf_counter() - t0
                    after = resource.getrusage(resource.RUSAGE_CHILDREN)
                    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
                    samples[f"{prefix}wall_{mode}"].append(wall * 1e3)
                    samples[f"{prefix}cpu_{mode}"].append(cpu * 1e3)
        # The same cost measured inside one process (precise where a loaded host makes the
        # difference of two whole pytest runs noise): importing the plugin after pytest,
        # and the report header's /dev/kvm probe.
        probes = []
        for _ in range(reps):
            probe = subprocess.run(
                [sys.executable, "-c", IMPORT_PROBE],
                cwd=root,
                capture_output=True,
                text=True,
                check=True,
            )
            probes.append(json.loads(probe.stdout))
        for key in ("import_ms", "header_probe_ms"):
            samples[key] = [p[key] for p in probes]
    out: dict[str, Any] = {k: summarize(v) for k, v in samples.items()}
    for prefix in INVOCATIONS:
        for what in ("wall", "cpu"):
            with_, without = samples[f"{prefix}{what}_with"], samples[f"{prefix}{what}_without"]
            # medians' difference, minima's (the least noisy), and the median of each
            # interleaved pair's difference (drift between pairs cancels)
            out[f"{prefix}{what}_added"] = statistics.median(with_) - statistics.median(without)
            out[f"{prefix}{what}_added_min"] = min(with_) - min(without)
            pairs = [a - b for a, b in zip(with_, without, strict=True)]
            out[f"{prefix}{what}_added_paired"] = statistics.median(pairs)
            out[f"{prefix}{what}_added_paired_ci95"] = median_ci(pairs)
    out["reps"] = reps
    out["condition"] = bytecode_condition(probes[0])
    return out


def bytecode_label(condition: dict[str, Any]) -> str:
    """The bytecode condition in a few words, for the table's title."""
    if condition["dont_write_bytecode"]:
        how = "no bytecode written (PYTHONDONTWRITEBYTECODE): every run compiles from source"
    elif condition["pycache_prefix"]:
        how = f"bytecode cached under {condition['pycache_prefix']}"
    else:
        how = "bytecode cached in __pycache__"
    return f"{how}; {condition['install']} install"


#: How the table names each invocation of `INVOCATIONS`.
INVOCATION_NAMES = {"": "-q", "header_": "default (header)", "quiet_": "-q, no hypothesis"}


def print_import_cost(imports: dict[str, Any]) -> None:
    rows: list[tuple[str, dict[str, float] | float, str]] = [
        ("pytest -q -p supermachine, wall", imports["wall_with"], "ms"),
        ("pytest -q -p no:supermachine, wall", imports["wall_without"], "ms"),
    ]
    for prefix, name in INVOCATION_NAMES.items():
        rows += [
            (f"{name}: added, wall (medians)", imports[f"{prefix}wall_added"], "ms"),
            (f"{name}: added, wall (minima)", imports[f"{prefix}wall_added_min"], "ms"),
            (f"{name}: added, wall (median of pairs)", imports[f"{prefix}wall_added_paired"], "ms"),
            (f"{name}: added, CPU user+sys (medians)", imports[f"{prefix}cpu_added"], "ms"),
            (f"{name}: added, CPU (median of pairs)", imports[f"{prefix}cpu_added_paired"], "ms"),
        ]
    rows += [
        ("in process: import the plugin after pytest", imports["import_ms"], "ms"),
        ("in process: the header's /dev/kvm probe", imports["header_probe_ms"], "ms"),
    ]
    print_table(
        f"plugin start-up on 20 tests without VMs ({imports['reps']} interleaved runs of each; "
        f"{bytecode_label(imports['condition'])})",
        rows,
    )
    for prefix, name in INVOCATION_NAMES.items():
        lo, hi = imports[f"{prefix}wall_added_paired_ci95"]
        print(f"{name}: wall added, median of pairs, 95% CI [{lo:.1f}, {hi:.1f}] ms")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tests", type=int, default=200)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--linux-tests", type=int, default=5)
    ap.add_argument("--import-reps", type=int, default=40)
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
        print_import_cost(imports)
    print_table("microguest sessions and throughput (median of runs)", session_rows)
    sys.stdout.flush()  # the Linux row may take minutes (a first Linux boot): show these now
    linux = linux_per_test_ms(args.linux_tests) if args.linux_tests > 0 else None
    if linux is not None:
        print_table(
            f"linux image: microvm test (pooled VM, reset), {args.linux_tests} tests, 1 run",
            [("linux: microvm test (reset)", linux, "ms")],
        )
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
