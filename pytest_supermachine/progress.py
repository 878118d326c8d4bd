"""Progress of long work (a kernel build, an image build, a boot) on the user's terminal.

A first run builds the guest kernel for minutes; silence looks like a hang. Work that
takes long calls `report` with its phase and elapsed time; where it goes is the
installed `ProgressSink`: in a pytest session the plugin's, which writes through the
terminal reporter with the capture suspended (as pytest-xdist and pytest-benchmark
reach the terminal), so the lines are seen live and never resurface in some test's
"Captured stderr"; otherwise (the `supermachine` command, a script) stderr.
A phase change is always shown, a running phase at most every `INTERVAL_S`.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

#: How often a running phase repeats its line: often enough that a wait never looks like
#: a hang (a line at least every 10 s), rarely enough that a 10-minute build stays readable.
INTERVAL_S = 8.0

#: ``sink(line)``: show one line of progress to the user.
ProgressSink = Callable[[str], None]


def stderr_sink(line: str) -> None:
    """Where progress goes outside pytest (the `supermachine` command, scripts)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


class Progress:
    """Where progress goes, what was last shown per piece of work, what finished."""

    def __init__(self, sink: ProgressSink | None = None) -> None:
        self.sink: ProgressSink = sink or stderr_sink
        self._lock = threading.Lock()
        self._last: dict[str, tuple[str, float]] = {}  # work -> (phase, when shown)
        self._finished: dict[str, float] = {}  # work -> seconds spent

    def report(self, work: str, phase: str, elapsed: float, detail: str = "") -> None:
        """``work`` is in ``phase`` since the work began ``elapsed`` seconds ago.

        Phase ``"done"`` ends the work: shown once, and its time is kept for `finished`;
        a ``"done"`` with no phase before it (a cache hit) is silent.
        """
        now = time.monotonic()
        with self._lock:
            shown = self._last.get(work)
            if phase == "done" and shown is None:
                return
            if shown is not None and shown[0] == phase and now - shown[1] < INTERVAL_S:
                return
            self._last[work] = (phase, now)
            if phase == "done":
                del self._last[work]
                self._finished[work] = self._finished.get(work, 0.0) + elapsed
            sink = self.sink
        extra = f", {detail}" if detail else ""
        sink(f"supermachine: {work}: {phase} ({elapsed:.0f} s{extra})")

    def finished(self) -> dict[str, float]:
        """Seconds spent per finished piece of work (for the session summary)."""
        with self._lock:
            return dict(self._finished)


#: The process's progress (one terminal per process).
PROGRESS = Progress()


def install_sink(sink: ProgressSink | None) -> None:
    """Route the process's progress to ``sink`` (None: back to stderr)."""
    PROGRESS.sink = sink or stderr_sink


def report(work: str, phase: str, elapsed: float, detail: str = "") -> None:
    """`Progress.report` of the process's `PROGRESS`."""
    PROGRESS.report(work, phase, elapsed, detail)


def finished() -> dict[str, float]:
    """`Progress.finished` of the process's `PROGRESS`."""
    return PROGRESS.finished()
