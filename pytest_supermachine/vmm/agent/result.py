"""What a guest command did, as the client returns it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RunResult:
    """What a guest command did. ``returncode`` is ``-signal`` when a signal ended it.

    ``stdout``/``stderr`` hold at most the call's output limit each: what the
    command wrote beyond it was dropped, and ``stdout_truncated`` /
    ``stderr_truncated`` say so. A stream sent to a file or callback (``run(...,
    stdout=sink)``) is empty here and never truncated.
    """

    returncode: int
    stdout: bytes
    stderr: bytes
    duration: float  # seconds, measured by the agent
    timed_out: bool = False
    signal: int | None = None
    stdout_truncated: bool = False
    stderr_truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out

    @property
    def truncated(self) -> bool:
        """Output beyond the limit was dropped from stdout or stderr."""
        return self.stdout_truncated or self.stderr_truncated


#: What `AgentClient.run` accepts: a command line (str or bytes) or an argv.
Command = str | bytes | Sequence[str | bytes | os.PathLike[str]]
