"""The guest seeds: one session seed, and from it one seed per VM handed to a test.

Why: a test that fails on a random value inside its guest must fail again on
replay, and two tests must never share random state. So every handout (a pooled
VM reset, a fresh restore) gets ``seed = BLAKE2b(session seed, node id, handout
number)`` and the host's wall clock, which the image gives the guest before the
test runs anything (`Image.seed_guest`); a failure capsule records them, and
``supermachine replay`` gives each run the recorded seed and clock again.

The session seed, in order: ``--supermachine-seed`` (env ``SUPERMACHINE_SEED``,
ini ``supermachine_seed``); pytest-randomly's seed when that plugin is active
(``-p randomly``), so one number reproduces both the test order and the guests;
else one derived from the session id, which every xdist worker shares. In a
replay the capsule's session seed and per-handout clocks are used.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

import pytest

SEED_BYTES = 32


class HandoutSeed(NamedTuple):
    """What one handout gives its guest, as the capsule records it.

    A named tuple, not a frozen dataclass: the same immutable record, made at a tenth of
    the cost when every pytest session imports this module (issue 13).
    """

    session_seed: int
    index: int  # 1 for a test's first VM, 2 for its second, ...
    seed: bytes
    wall_ns: int

    def record(self, applied: str) -> dict[str, Any]:
        return {
            "session_seed": self.session_seed,
            "handout": self.index,
            "seed": self.seed.hex(),
            "wall_ns": self.wall_ns,
            "applied": applied,
        }


def handout_seed(session_seed: int, nodeid: str, index: int) -> bytes:
    """The seed of a test's `index`-th VM: a function of the session seed, node id and index only."""
    text = f"{session_seed}\n{nodeid}\n{index}".encode("utf-8", "surrogateescape")
    return hashlib.blake2b(text, digest_size=SEED_BYTES, person=b"sm-guest-seed").digest()


class GuestSeeds:
    """The session seed (resolved on first use) and the seeds of each handout."""

    def __init__(
        self,
        config: pytest.Config | None,
        *,
        option: int | None,
        option_source: str = "",
        session_id: str = "",
        replay: Mapping[str, Any] | None = None,
    ) -> None:
        self._config = config
        self._option = option
        self._option_source = option_source
        self._session_id = session_id
        self._replay = replay
        self._resolved: tuple[int, str] | None = None

    def _resolve(self) -> tuple[int, str]:
        if self._replay is not None:
            recorded = self._replay.get("seeds", {}).get("supermachine_seed")
            if isinstance(recorded, int):
                return recorded, "the failure capsule"
        if self._option is not None:
            return self._option, self._option_source or "--supermachine-seed"
        randomly = self._randomly_seed()
        if randomly is not None:
            return randomly, "pytest-randomly (-p randomly)"
        digest = hashlib.blake2b(self._session_id.encode(), digest_size=4).digest()
        return int.from_bytes(digest, "big"), "random (this session)"

    def _randomly_seed(self) -> int | None:
        config = self._config
        if config is None or not config.pluginmanager.hasplugin("randomly"):
            return None
        value = getattr(config.option, "randomly_seed", None)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def session_seed(self) -> int:
        if self._resolved is None:
            self._resolved = self._resolve()
        return self._resolved[0]

    @property
    def source(self) -> str:
        if self._resolved is None:
            self._resolved = self._resolve()
        return self._resolved[1]

    def for_handout(self, nodeid: str, index: int) -> HandoutSeed:
        """The seed and clock of `nodeid`'s `index`-th VM (in a replay: the recorded clock)."""
        wall_ns = self._recorded_wall_ns(index)
        if wall_ns is None:
            wall_ns = time.time_ns()
        return HandoutSeed(
            self.session_seed, index, handout_seed(self.session_seed, nodeid, index), wall_ns
        )

    def _recorded_wall_ns(self, index: int) -> int | None:
        if self._replay is None:
            return None
        for vm in self._replay.get("vms", []):
            record = vm.get("seed") or {}
            if record.get("handout") == index and isinstance(record.get("wall_ns"), int):
                return int(record["wall_ns"])
        return None
