"""Snapshot benchmark: restore from file, in-place reset vs fresh restore, save cost and size.

    python bench/bench_snapshot.py [--reps 10]

All on the microguest, one run:
1. restore-from-file latency, from a snapshot of a loaded, never-started guest: until
   `Machine.restore` returns (vCPU threads started; the guest may not have run yet),
   until the guest's first output reaches the host (its first serial port write, read
   from the console stream: proof that it executes), and until its first console line;
2. reset latency after the guest dirtied 0 / 1k / 10k / 50k pages (DIRTY mode, then
   power-off), for both reset strategies, versus the baseline of destroying the machine
   and restoring a fresh one; and what each costs the guest's next run (re-faults);
3. the reset cost model (vmm/reset_cost.py) fitted to this run: per-page copy, drop and
   re-fault costs, a fresh restore's, and the crossovers they imply (the dirty count
   above which DISCARD or a fresh restore costs less than COPY, reset + next run, for a
   next run that writes 0 %, 5 %, 50 % and 100 % of the pages again); next to the
   constants the model ships with, and what AUTO picked here (this workload writes the
   same pages every run: 100 %);
4. save time and on-disk size of a full and of a diff snapshot against changed pages.
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit_json, print_table, summarize

from pytest_supermachine.guest.microguest import GuestMode, build_microguest
from pytest_supermachine.vmm import reaper
from pytest_supermachine.vmm.machine import ExitReason, Machine, ResetStrategy
from pytest_supermachine.vmm.reset_cost import ResetChoice, ResetCostModel

MEM_MIB = 256


def loaded_snapshot(elf: Path, tmp: Path, mode: int, arg: int = 0) -> Path:
    path = tmp / f"loaded-{mode}-{arg}.snap"
    with Machine(mem_mib=MEM_MIB) as m:
        m.boot_direct64(elf, mode=mode, arg=arg)
        m.snapshot(path, durable=False)
    return path


def restore_latency(
    path: Path, reps: int
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """(restore returned, first serial output seen by the host, first console line), ms."""
    to_running, to_output, to_console = [], [], []
    for _ in range(reps):
        read_end, write_end = os.pipe()
        try:
            t0 = time.perf_counter()
            m = Machine.restore(path, console_stream=write_end)
            t1 = time.perf_counter()
            assert os.read(read_end, 1)  # blocks until the guest's first port write arrives
            t2 = time.perf_counter()
            m.wait_console("microguest: boot", timeout=30)
            t3 = time.perf_counter()
            m.stop()
        finally:
            os.close(read_end)
            os.close(write_end)
        to_running.append((t1 - t0) * 1e3)
        to_output.append((t2 - t0) * 1e3)
        to_console.append((t3 - t0) * 1e3)
        reaper.drain()
    return summarize(to_running), summarize(to_output), summarize(to_console)


def reset_cycle(
    path: Path, reps: int, strategy: ResetStrategy, picked: list[str] | None = None
) -> tuple[dict[str, float], dict[str, float]]:
    """(reset latency, the guest's next run to power-off) for one reset strategy; with
    `picked`, the strategy each reset used is appended to it (AUTO decides per reset)."""
    resets, reruns = [], []
    m = Machine.restore(path)
    try:
        assert m.wait(timeout=120).reason is ExitReason.HALT
        for _ in range(reps):
            t0 = time.perf_counter()
            m.reset(resume=False, strategy=strategy)
            t1 = time.perf_counter()
            if picked is not None:
                picked.append(m.last_reset.value)  # type: ignore[union-attr]
            m.resume()
            assert m.wait(timeout=120).reason is ExitReason.HALT
            t2 = time.perf_counter()
            resets.append((t1 - t0) * 1e3)
            reruns.append((t2 - t1) * 1e3)
    finally:
        m.stop()
    return summarize(resets), summarize(reruns)


def fit_model(results: dict[str, object], pages: int) -> ResetCostModel:
    """The reset cost model's constants from this run's medians (0 and `pages` dirty pages)."""
    lo, hi = results["pages_0"], results[f"pages_{pages}"]
    assert isinstance(lo, dict) and isinstance(hi, dict)
    ms = 1e-3
    return ResetCostModel(
        in_place_s=lo["reset_copy_ms"] * ms,
        copy_page_s=max(hi["reset_copy_ms"] - lo["reset_copy_ms"], 0) * ms / pages,
        discard_page_s=max(hi["reset_discard_ms"] - lo["reset_discard_ms"], 0) * ms / pages,
        restore_s=lo["fresh_restore_ms"] * ms,
        refault_page_s=max(hi["run_after_discard_ms"] - hi["run_after_copy_ms"], 0) * ms / pages,
        rewarm_s=max(lo["run_after_fresh_ms"] - lo["run_after_copy_ms"], 0) * ms,
    )


RETOUCH = (0.0, 0.05, 0.5, 1.0)


def model_rows(
    name: str, model: ResetCostModel
) -> tuple[list[tuple[str, dict[str, float] | float, str]], dict[str, object]]:
    rows: list[tuple[str, dict[str, float] | float, str]] = [
        (f"{name}: in-place reset, fixed", model.in_place_s * 1e3, "ms"),
        ("    copy back, per page", model.copy_page_s * 1e6, "us"),
        ("    drop (MADV_DONTNEED), per page", model.discard_page_s * 1e6, "us"),
        ("    next run's re-fault, per dropped page", model.refault_page_s * 1e6, "us"),
        ("    fresh restore", model.restore_s * 1e3, "ms"),
        ("    fresh restore's re-warm of read pages", model.rewarm_s * 1e3, "ms"),
    ]
    out: dict[str, object] = {
        "in_place_ms": round(model.in_place_s * 1e3, 3),
        "copy_page_us": round(model.copy_page_s * 1e6, 3),
        "discard_page_us": round(model.discard_page_s * 1e6, 3),
        "refault_page_us": round(model.refault_page_s * 1e6, 3),
        "restore_ms": round(model.restore_s * 1e3, 3),
        "rewarm_ms": round(model.rewarm_s * 1e3, 3),
    }
    for retouch in RETOUCH:
        for choice in (ResetChoice.DISCARD, ResetChoice.RESTORE):
            at = model.crossover(choice, retouch)
            rows.append(
                (
                    f"    {choice.value} beats COPY from, {retouch:.0%} written again",
                    float("nan") if at is None else float(at),
                    "pages (nan: never)",
                )
            )
            out[f"crossover_{choice.value}_retouch_{retouch:g}"] = at
    return rows, out


def fresh_restore(
    path: Path, reps: int
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Baselines: restore a fresh machine (the old one's teardown left to the reaper, off
    the path), the same with the old machine's teardown waited for (destroy + restore),
    and the fresh machine's run to power-off."""
    restores, destroys, runs = [], [], []
    m = Machine.restore(path)
    assert m.wait(timeout=120).reason is ExitReason.HALT
    for _ in range(reps):
        t0 = time.perf_counter()
        m.stop()
        t1 = time.perf_counter()
        reaper.drain()
        t2 = time.perf_counter()
        m = Machine.restore(path, start=False)
        t3 = time.perf_counter()
        m.start()
        assert m.wait(timeout=120).reason is ExitReason.HALT
        t4 = time.perf_counter()
        restores.append((t1 - t0 + t3 - t2) * 1e3)
        destroys.append((t3 - t0) * 1e3)
        runs.append((t4 - t3) * 1e3)
    m.stop()
    reaper.drain()
    return summarize(restores), summarize(destroys), summarize(runs)


def save_costs(path: Path, tmp: Path) -> dict[str, float]:
    with Machine.restore(path) as m:
        m.wait(timeout=120)
        t0 = time.perf_counter()
        m.snapshot(tmp / "diff.snap", durable=False)
        t1 = time.perf_counter()
        m.snapshot(tmp / "full.snap", full=True, durable=False)
        t2 = time.perf_counter()
    size = {name: os.stat(tmp / name).st_blocks * 512 / 1024 for name in ("diff.snap", "full.snap")}
    for name in ("diff.snap", "full.snap"):
        (tmp / name).unlink()
    return {
        "diff_ms": (t1 - t0) * 1e3,
        "full_ms": (t2 - t1) * 1e3,
        "diff_kib": size["diff.snap"],
        "full_kib": size["full.snap"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    elf = build_microguest()
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="sm-bench-") as d:
        tmp = Path(d)
        halt = loaded_snapshot(elf, tmp, GuestMode.HALT)
        restore_latency(halt, 2)  # warm-up
        to_running, to_output, to_console = restore_latency(halt, args.reps)
        rows: list[tuple[str, dict[str, float] | float, str]] = [
            ("restore -> Machine.restore returned (vCPUs started)", to_running, "ms"),
            ("restore -> guest's first serial output on the host", to_output, "ms"),
            ("restore -> first console line", to_console, "ms"),
        ]
        results["restore_returned_ms"] = round(to_running["median"], 3)
        results["restore_to_first_output_ms"] = round(to_output["median"], 3)
        results["restore_to_console_ms"] = round(to_console["median"], 3)
        reset_rows: list[tuple[str, dict[str, float] | float, str]] = []
        save_rows: list[tuple[str, dict[str, float] | float, str]] = []
        for pages in (0, 1000, 10_000, 50_000):
            snap = loaded_snapshot(elf, tmp, GuestMode.DIRTY if pages else GuestMode.HALT, pages)
            fresh, destroy, fresh_run = fresh_restore(snap, args.reps)
            copy, copy_run = reset_cycle(snap, args.reps, ResetStrategy.COPY)
            discard, discard_run = reset_cycle(snap, args.reps, ResetStrategy.DISCARD)
            picked: list[str] = []
            auto, auto_run = reset_cycle(snap, args.reps, ResetStrategy.AUTO, picked)
            whole = {
                "copy": copy["median"] + copy_run["median"],
                "discard": discard["median"] + discard_run["median"],
                "restore": fresh["median"] + fresh_run["median"],
            }
            reset_rows += [
                (f"{pages} dirty pages: reset, COPY back (default)", copy, "ms"),
                ("    reset, DISCARD (MADV_DONTNEED)", discard, "ms"),
                ("    fresh restore, teardown left to the reaper (baseline)", fresh, "ms"),
                ("    destroy (teardown waited for) + fresh restore (baseline)", destroy, "ms"),
                (
                    "    speed-up of reset (COPY) over fresh restore",
                    fresh["median"] / copy["median"],
                    "x",
                ),
                (
                    "    speed-up of reset (COPY) over destroy + restore",
                    destroy["median"] / copy["median"],
                    "x",
                ),
                (
                    "    speed-up of reset (DISCARD) over fresh restore",
                    fresh["median"] / discard["median"],
                    "x",
                ),
                ("    next run to power-off after COPY reset", copy_run, "ms"),
                ("    next run to power-off after DISCARD reset", discard_run, "ms"),
                ("    next run to power-off after fresh restore", fresh_run, "ms"),
                ("    whole cost (reset + next run), COPY", whole["copy"], "ms"),
                ("    whole cost (reset + next run), DISCARD", whole["discard"], "ms"),
                ("    whole cost (restore + next run), fresh restore", whole["restore"], "ms"),
                (
                    f"    reset AUTO (picked {'/'.join(sorted(set(picked)))}) + next run",
                    auto["median"] + auto_run["median"],
                    "ms",
                ),
            ]
            results[f"pages_{pages}"] = {
                "reset_copy_ms": round(copy["median"], 3),
                "reset_discard_ms": round(discard["median"], 3),
                "fresh_restore_ms": round(fresh["median"], 3),
                "destroy_and_restore_ms": round(destroy["median"], 3),
                "speedup_copy_vs_destroy": round(destroy["median"] / copy["median"], 2),
                "speedup_copy": round(fresh["median"] / copy["median"], 2),
                "speedup_discard": round(fresh["median"] / discard["median"], 2),
                "run_after_copy_ms": round(copy_run["median"], 2),
                "run_after_discard_ms": round(discard_run["median"], 2),
                "run_after_fresh_ms": round(fresh_run["median"], 2),
                "reset_auto_ms": round(auto["median"], 3),
                "run_after_auto_ms": round(auto_run["median"], 2),
                "auto_picked": sorted(set(picked)),
                "cheapest_measured": min(whole, key=whole.__getitem__),
            }
            if pages:
                cost = save_costs(snap, tmp)
                save_rows += [
                    (f"save diff, {pages} changed pages", cost["diff_ms"], "ms"),
                    (f"save full, {pages} changed pages", cost["full_ms"], "ms"),
                    (f"  diff on disk, {pages} changed pages", cost["diff_kib"], "KiB"),
                    (f"  full on disk, {pages} changed pages", cost["full_kib"], "KiB"),
                ]
                results[f"save_{pages}"] = {k: round(v, 1) for k, v in cost.items()}
    fitted_rows, fitted = model_rows("fitted to this run", fit_model(results, 50_000))
    shipped_rows, shipped = model_rows("shipped constants", ResetCostModel())
    results["reset_model_fitted"] = fitted
    results["reset_model_shipped"] = shipped
    print_table(f"restore from file ({MEM_MIB} MiB microguest)", rows)
    print_table("in-place reset vs destroy-and-restore", reset_rows)
    print_table("reset cost model and crossovers", fitted_rows + shipped_rows)
    print_table("saving snapshots (single run each)", save_rows)
    emit_json("snapshot", results)


if __name__ == "__main__":
    main()
