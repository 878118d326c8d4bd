"""Host side of the guest agent protocol (``docs/agent-protocol.md``, version 1).

Three layers, each usable alone, each in its own module:

- **Framing** (`protocol`): the wire constants, `Frame`, `encode_frame`,
  `FrameDecoder`. Pure functions over bytes. The decoder accepts any chunking
  of the stream and raises `AgentProtocolError` — never another exception —
  for anything malformed; it checks a frame's length as soon as the header is
  in, so a hostile length never makes it wait for (or allocate) a huge payload.
- **Messages** (`messages`): one small dataclass per message type with
  ``encode_payload()`` and ``decode(payload)``, and `decode_message(frame)`
  dispatching on the type. Also pure; also `AgentProtocolError` for every
  malformed payload.
- **Client** (`client`): `AgentClient` over any connected stream socket (a
  vsock connection from the muxer, or a ``socket.socketpair()`` end in tests).
  It performs the handshake and offers ``run``, ``write_file``, ``read_file``
  and ``ping``; several threads may use one client at once (requests are
  multiplexed by id). `read_ready` reads the READY an agent sends once it
  listens.

`errors` holds what they raise, `result` what a command did (`RunResult`),
`output` how much of a command's output the host keeps (limits and sinks).
This package re-exports every public name, so ``from
pytest_supermachine.vmm.agent import X`` does not depend on the module layout.
The guests' C side of the same wire format is one header,
``pytest_supermachine/guest/include/agent_protocol.h``.
"""

from __future__ import annotations

from .client import (
    DEFAULT_READ_LIMIT,
    DEFAULT_RUN_TIMEOUT,
    AgentClient,
    check_run_timeout,
    read_ready,
)
from .errors import (
    AgentError,
    AgentFileTooLarge,
    AgentGuestStopped,
    AgentProtocolError,
    AgentRemoteError,
    AgentTimeout,
    CommandFailed,
)
from .messages import (
    MESSAGE_CLASSES,
    Error,
    Exec,
    Exit,
    FileData,
    GetFile,
    Hello,
    Kill,
    Message,
    Ok,
    Ping,
    Pong,
    PutFile,
    Ready,
    RunAs,
    Seed,
    Stderr,
    Stdin,
    StdinEof,
    Stdout,
    TcpConnect,
    decode_message,
)
from .output import (
    DEFAULT,
    DEFAULT_OUTPUT_LIMIT,
    DefaultLimit,
    OutputCapture,
    OutputSink,
    check_output_limit,
)
from .protocol import (
    AGENT_PORT,
    CAP_ALL,
    CAP_CWD,
    CAP_ENV,
    CAP_EXEC,
    CAP_FILES,
    CAP_KILL,
    CAP_SEED,
    CAP_SHELL,
    CAP_STDIN,
    CAP_TCP,
    CAP_TIMEOUT,
    CAP_USER,
    EXEC_SHELL,
    EXEC_STDIN,
    EXEC_USER,
    EXIT_SIGNALED,
    EXIT_TIMED_OUT,
    FILE_MORE,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_FRAME,
    MAX_GROUPS,
    MAX_PING,
    MAX_SEED,
    MAX_SOFTWARE,
    MIN_FRAME,
    PROTOCOL_VERSION,
    PUT_APPEND,
    READY_PORT,
    SEED_RESEED,
    SIGKILL,
    TYPE_NAMES,
    Frame,
    FrameDecoder,
    MsgType,
    encode_frame,
    seed_state,
    splitmix64,
)
from .result import Command, RunResult
from .users import ResolvedUser, UserNotFound, resolve_user

__all__ = [
    "AGENT_PORT",
    "CAP_ALL",
    "CAP_CWD",
    "CAP_ENV",
    "CAP_EXEC",
    "CAP_FILES",
    "CAP_KILL",
    "CAP_SEED",
    "CAP_SHELL",
    "CAP_STDIN",
    "CAP_TCP",
    "CAP_TIMEOUT",
    "CAP_USER",
    "DEFAULT",
    "DEFAULT_OUTPUT_LIMIT",
    "DEFAULT_READ_LIMIT",
    "DEFAULT_RUN_TIMEOUT",
    "EXEC_SHELL",
    "EXEC_STDIN",
    "EXEC_USER",
    "EXIT_SIGNALED",
    "EXIT_TIMED_OUT",
    "FILE_MORE",
    "HEADER",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_FRAME",
    "MAX_GROUPS",
    "MAX_PING",
    "MAX_SEED",
    "MAX_SOFTWARE",
    "MESSAGE_CLASSES",
    "MIN_FRAME",
    "PROTOCOL_VERSION",
    "PUT_APPEND",
    "READY_PORT",
    "SEED_RESEED",
    "SIGKILL",
    "TYPE_NAMES",
    "AgentClient",
    "AgentError",
    "AgentFileTooLarge",
    "AgentGuestStopped",
    "AgentProtocolError",
    "AgentRemoteError",
    "AgentTimeout",
    "Command",
    "CommandFailed",
    "DefaultLimit",
    "Error",
    "Exec",
    "Exit",
    "FileData",
    "Frame",
    "FrameDecoder",
    "GetFile",
    "Hello",
    "Kill",
    "Message",
    "MsgType",
    "Ok",
    "OutputCapture",
    "OutputSink",
    "Ping",
    "Pong",
    "PutFile",
    "Ready",
    "ResolvedUser",
    "RunAs",
    "RunResult",
    "Seed",
    "Stderr",
    "Stdin",
    "StdinEof",
    "Stdout",
    "TcpConnect",
    "UserNotFound",
    "check_output_limit",
    "check_run_timeout",
    "decode_message",
    "encode_frame",
    "read_ready",
    "resolve_user",
    "seed_state",
    "splitmix64",
]
