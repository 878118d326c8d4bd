"""Which way back to the snapshot costs least: copy the pages back, drop them, or restore afresh.

A machine that ran a test has `d` pages that differ from its snapshot. Three ways return
it to the snapshot, and each has a price now and a price the *next* run pays:

========  ==========================================  ==========================================
choice    now                                         the next run
========  ==========================================  ==========================================
COPY      park + state: `IN_PLACE_S`, plus            nothing extra: the pages stay resident
          `COPY_PAGE_S` per page copied back          and writable
DISCARD   `IN_PLACE_S`, plus `DISCARD_PAGE_S` per     a copy-on-write fault (`REFAULT_PAGE_S`)
          page dropped (MADV_DONTNEED)                for each dropped page it writes again
RESTORE   a fresh `Machine.restore`: `RESTORE_S`      the same re-faults, plus `REWARM_S`: a new
          (the old one's teardown is off the path)    VM maps even the pages it only reads anew
========  ==========================================  ==========================================

The whole cost of a choice is the sum, with "pages written again" estimated as
`retouch * d`: the share of the pages a run dirtied that the following run dirtied again,
measured per machine at every reset (`RetouchEstimate`: the previous run's dirty set
against this one's, smoothed). Tests of one fixture resemble each other (the same agent
exec path, the same fixture work), so a machine with no history assumes 1.0.

The constants are bench/bench_snapshot.py's medians on this project's reference machine,
quiet (nested PVM, 256 MiB microguest dirtying N pages: COPY of 50,000 pages 34 ms, a
fresh restore 13 ms, the next run 255 ms after COPY and 942 ms after a fresh restore).
The bench fits the same constants from its own run and prints them with the crossovers
they imply, so they can be re-measured elsewhere and set on `ResetCostModel`. The ratio
is what decides, and it held under load too (everything ~4x slower): a re-fault costs
~20 page copies. So COPY wins whenever the next run writes more than ~5 % of the pages
again; below that DISCARD wins up to ~`RESTORE_S / DISCARD_PAGE_S` (~43,000) pages and
RESTORE beyond. `REWARM_S` is 0: the microguest reads next to nothing, so a new VM
re-warms in no measurable time; a Linux guest reads more, which only makes RESTORE rarer.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

#: Park the vCPUs, re-apply vCPU, irqchip and device state, resume (microguest, 0 pages).
IN_PLACE_S = 0.3e-3
#: Copying one dirty page back from the snapshot's page cache.
COPY_PAGE_S = 0.67e-6
#: MADV_DONTNEED of one dirty page (the page goes back to the host).
DISCARD_PAGE_S = 0.30e-6
#: A fresh `Machine.restore` of the same snapshot (the old machine torn down off the path).
RESTORE_S = 13.0e-3
#: The next run's copy-on-write fault of a page that was dropped (or never copied).
REFAULT_PAGE_S = 13.7e-6
#: The next run after a fresh restore: faulting in the pages it only reads (see above).
REWARM_S = 0.0


class ResetChoice(enum.Enum):
    """How a machine goes back to its snapshot (see the module docstring)."""

    COPY = "copy"
    DISCARD = "discard"
    RESTORE = "restore"


@dataclass(frozen=True)
class ResetCostModel:
    """Whole cost (now + the next run) of each `ResetChoice`, from measured constants."""

    in_place_s: float = IN_PLACE_S
    copy_page_s: float = COPY_PAGE_S
    discard_page_s: float = DISCARD_PAGE_S
    restore_s: float = RESTORE_S
    refault_page_s: float = REFAULT_PAGE_S
    rewarm_s: float = REWARM_S

    def cost(self, choice: ResetChoice, dirty: int, retouch: float = 1.0) -> float:
        """Seconds `choice` costs for `dirty` pages of which a share `retouch` is written again."""
        refaults = self.refault_page_s * retouch * dirty
        if choice is ResetChoice.COPY:
            return self.in_place_s + self.copy_page_s * dirty
        if choice is ResetChoice.DISCARD:
            return self.in_place_s + self.discard_page_s * dirty + refaults
        return self.restore_s + self.rewarm_s + refaults

    def choose(self, dirty: int, retouch: float = 1.0, *, restore: bool = True) -> ResetChoice:
        """The cheapest choice (COPY on a tie); `restore=False` for an in-place reset only."""
        choices = [ResetChoice.COPY, ResetChoice.DISCARD]
        if restore:
            choices.append(ResetChoice.RESTORE)
        return min(choices, key=lambda c: self.cost(c, dirty, retouch))

    def crossover(self, choice: ResetChoice, retouch: float) -> int | None:
        """Fewest dirty pages at which `choice` costs less than COPY, or None if it never does."""
        slope = {
            ResetChoice.DISCARD: self.discard_page_s + self.refault_page_s * retouch,
            ResetChoice.RESTORE: self.refault_page_s * retouch,
        }[choice] - self.copy_page_s
        fixed = {
            ResetChoice.DISCARD: self.in_place_s,
            ResetChoice.RESTORE: self.restore_s + self.rewarm_s,
        }[choice] - self.in_place_s
        if slope >= 0:
            return None  # COPY's cost grows no faster: it stays ahead
        return int(fixed / -slope) + 1


class RetouchEstimate:
    """The share of a run's dirty pages that the next run dirties again, learnt per machine.

    `observe(dirty)` is called at every reset with the pages (one bitmap int per RAM
    region) that the ending run changed; it compares them with the previous run's.
    Smoothed (`weight` for the newest observation) so one odd test does not flip the
    choice for the ones after it.
    """

    def __init__(self, initial: float = 1.0, weight: float = 0.5) -> None:
        self.value = initial
        self.weight = weight
        self._previous: list[int] | None = None

    def observe(self, dirty: list[int]) -> float:
        previous, self._previous = self._previous, list(dirty)
        if previous is not None:
            before = sum(bits.bit_count() for bits in previous)
            if before:
                again = sum((a & b).bit_count() for a, b in zip(previous, dirty, strict=True))
                self.value += self.weight * (again / before - self.value)
        return self.value
