"""What a guest command did, as the client returns it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RunResult:
    """What a guest command did. ``returncode`` is ``-signal`` when a signal ended it."""

    returncode: int
    stdout: bytes
    stderr: bytes
    duration: float  # seconds, measured by the agent
    timed_out: bool = False
    signal: int | None = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


#: What `AgentClient.run` accepts: a command line (str or bytes) or an argv.
Command = str | bytes | Sequence[str | bytes | os.PathLike[str]]
