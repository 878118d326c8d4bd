"""What talking to a guest agent can raise: every one an `AgentError` (a `SupermachineError`)."""

from __future__ import annotations

import errno as _errno

from ...errors import GuestCrashed, GuestTimeout, SupermachineError
from .result import RunResult


class AgentError(SupermachineError):
    """Talking to the guest agent failed (connection lost, request refused, ...)."""


class AgentProtocolError(AgentError):
    """The peer sent bytes that are not valid protocol: the connection is unusable."""


class AgentRemoteError(AgentError):
    """The agent answered a request with ERROR: carries the guest's errno and message."""

    def __init__(self, what: str, errno: int, guest_message: str) -> None:
        name = _errno.errorcode.get(errno, f"errno {errno}")
        super().__init__(f"{what}: {name}: {guest_message}")
        self.errno = errno
        self.guest_message = guest_message


class AgentFileTooLarge(AgentError):
    """``read_file`` refused a guest file longer than its ``limit``."""


class AgentTimeout(AgentError, GuestTimeout):
    """The agent did not answer in time; carries the console tail when the VMM provides one."""

    def __init__(self, message: str, console_tail: str = "") -> None:
        GuestTimeout.__init__(self, message, console_tail)


class AgentGuestStopped(AgentError, GuestCrashed):
    """The machine stopped (crash, power-off) while the host waited for the agent.

    Carries the console tail in ``console_tail`` (and the message), like `GuestCrashed`.
    """

    def __init__(self, message: str, console_tail: str = "") -> None:
        GuestCrashed.__init__(self, message, console_tail)


class CommandFailed(AgentError):
    """``run(..., check=True)`` saw a command fail; the message carries the output tails."""

    TAIL = 2000

    def __init__(self, command: str, result: RunResult) -> None:
        if result.timed_out:
            how = f"timed out after {result.duration:.3f}s"
        elif result.signal is not None:
            how = f"was killed by signal {result.signal}"
        else:
            how = f"exited with status {result.returncode}"
        parts = [f"guest command {command} {how}"]
        for name, data, truncated in (
            ("stdout", result.stdout, result.stdout_truncated),
            ("stderr", result.stderr, result.stderr_truncated),
        ):
            if data:
                tail = data[-self.TAIL :].decode("utf-8", "replace")
                cut = "...(cut)..." if len(data) > self.TAIL else ""
                limit = " (output past the limit was dropped)" if truncated else ""
                parts.append(f"--- {name} tail{limit} ---\n{cut}{tail}")
        super().__init__("\n".join(parts))
        self.command = command
        self.result = result
