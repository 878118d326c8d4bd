"""Fuzz tier: mutated snapshots through the public `Machine.restore`.

From a valid snapshot of the agent microguest (vsock and a disk), hypothesis changes
one or a few things — a field of the machine section, a register or queue field of a
device section, the bytes or the length of a vCPU/VM section, a missing section — and
re-signs the file, so it passes the checksum and reaches validation. Each snapshot must
either be refused with a `SnapshotError`, or restore, run, reset, snapshot and stop
without error or hang. Anything else is "other", which must stay 0. Prints the counts.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_supermachine.vmm.machine import Machine
from pytest_supermachine.vmm.snapshot import SnapshotChain, SnapshotError
from tests.snapshot_mutation import (
    Sections,
    edit_device,
    edit_machine,
    resign,
    snapshot_agent_guest,
)

LIFECYCLE_SECONDS = 60.0  # restore + reset + snapshot + stop slower than this is a hang
VALUES = st.one_of(
    st.integers(-5, 70),
    st.integers(0, 2**64),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, 2, 3, 0xFFFF, 0x10000, 0xFFFFFFFF, 64 << 20, 3 << 30]),
    st.none(),
    st.booleans(),
    st.sampled_from(["", "/etc/hostname", "../agent.snap", "x" * 300]),
    st.just([]),
    st.just({}),
)
MACHINE_KEYS = ("vcpus", "mem_bytes", "format", "devices")
DEVICE_SPEC_KEYS = ("guest_cid", "path", "size", "read_only", "serial", "sha256", "kind", "extra")
REGISTER_KEYS = ("status", "driver_features", "queue_sel", "interrupt_status", "device_type")
QUEUE_KEYS = (
    "max_size",
    "size",
    "ready",
    "desc_addr",
    "avail_addr",
    "used_addr",
    "next_avail",
    "next_used",
    "signalled_used",
)


@pytest.fixture(scope="module")
def agent_snapshot(microguest_elf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return snapshot_agent_guest(microguest_elf, tmp_path_factory.mktemp("fuzz"))


@st.composite
def mutations(draw: st.DrawFn, sections: Sections) -> Callable[[Sections], None]:
    kind = draw(st.sampled_from(["machine", "device spec", "register", "queue", "bytes", "drop"]))
    if kind == "machine":
        key, value = draw(st.sampled_from(MACHINE_KEYS)), draw(VALUES)
        return edit_machine(lambda m: m.__setitem__(key, value))
    if kind == "device spec":
        index, key, value = (
            draw(st.integers(0, 1)),
            draw(st.sampled_from(DEVICE_SPEC_KEYS)),
            draw(VALUES),
        )
        return edit_machine(lambda m: m["devices"][index].__setitem__(key, value))
    device = draw(st.sampled_from(["device/0-vsock", "device/1-disk"]))
    if kind == "register":
        key, value = draw(st.sampled_from(REGISTER_KEYS)), draw(VALUES)
        return edit_device(device, lambda s: s.__setitem__(key, value))
    if kind == "queue":
        edits = draw(
            st.lists(st.tuples(st.integers(0, 2), st.sampled_from(QUEUE_KEYS), VALUES), max_size=3)
        )

        def edit(state: dict[str, Any]) -> None:
            for index, key, value in edits:
                queues = state["queues"]
                queues[index % len(queues)][key] = value

        return edit_device(device, edit)
    name = draw(st.sampled_from(sorted(sections)))
    if kind == "drop":
        return lambda s: s.pop(name)
    data = bytearray(sections[name])
    how = draw(st.sampled_from(["flip", "truncate", "extend"]))
    if how == "flip" and data:
        at = draw(st.integers(0, len(data) - 1))
        data[at] ^= draw(st.integers(1, 255))
    elif how == "truncate":
        del data[draw(st.integers(0, len(data))) :]
    else:
        data += bytes(draw(st.integers(1, 64)))
    return lambda s: s.__setitem__(name, bytes(data))


def lifecycle(path: Path, scratch: Path) -> str:
    """Restore, run, reset, snapshot, stop: the outcome class (or 'other: ...')."""
    try:
        m = Machine.restore(path)
    except SnapshotError:
        return "refused cleanly"
    except Exception as e:
        return f"other: restore raised {type(e).__name__}: {e}"
    try:
        m.reset()
        m.snapshot(scratch)
        return "accepted and ran"
    except Exception as e:
        return f"other: after restore {type(e).__name__}: {e}"
    finally:
        m.stop()


def bounded(path: Path, scratch: Path) -> str:
    result: list[str] = []
    thread = threading.Thread(target=lambda: result.append(lifecycle(path, scratch)), daemon=True)
    thread.start()
    thread.join(LIFECYCLE_SECONDS)
    return result[0] if result else "other: hung"


def test_mutated_snapshots_are_refused_or_run(
    agent_snapshot: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with SnapshotChain.open(agent_snapshot) as chain:
        sections = dict(chain.sections)
    counts: Counter[str] = Counter()
    target = agent_snapshot.parent / "mutated.snap"
    scratch = agent_snapshot.parent / "after.snap"

    @settings(
        max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(mutations(sections))
    def one(mutate: Callable[[Sections], None]) -> None:
        try:
            resign(agent_snapshot, target, mutate)
        except (KeyError, IndexError, TypeError, AttributeError):
            counts["not applicable"] += 1  # the mutation did not fit this snapshot's shape
            return
        counts[bounded(target, scratch)] += 1

    one()
    with capsys.disabled():
        print(f"\nsnapshot fuzz: {sum(counts.values())} snapshots tried: {dict(counts)}")
    assert not {k: v for k, v in counts.items() if k.startswith("other")}
    assert counts["refused cleanly"] and counts["accepted and ran"]
