"""Shared helpers for the benchmarks: statistics, the table, the JSON line."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from collections.abc import Sequence


def summarize(samples: Sequence[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "n": len(ordered),
        "median": statistics.median(ordered),
        "p90": ordered[min(len(ordered) - 1, int(len(ordered) * 0.9))],
        "min": ordered[0],
    }


def print_table(title: str, rows: Sequence[tuple[str, dict[str, float] | float, str]]) -> None:
    print(f"\n{title}")
    print(f"{'measurement':<52} {'median':>12} {'p90':>12} {'min':>12}  unit")
    for name, value, unit in rows:
        if isinstance(value, dict):
            print(
                f"{name:<52} {value['median']:>12.3f} {value['p90']:>12.3f} {value['min']:>12.3f}  {unit}"
            )
        else:
            print(f"{name:<52} {value:>12.3f} {'':>12} {'':>12}  {unit}")


def emit_json(bench: str, results: dict[str, object]) -> None:
    from pytest_supermachine.vmm.kvm import is_nested_pvm

    line = {
        "bench": bench,
        "host": platform.node(),
        "pvm": is_nested_pvm(),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
        **results,
    }
    print(json.dumps(line, sort_keys=True))
