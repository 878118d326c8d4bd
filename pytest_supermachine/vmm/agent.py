"""Host side of the guest agent protocol (``docs/agent-protocol.md``, version 1).

Three layers, each usable alone:

- **Framing**: `Frame`, `encode_frame`, `FrameDecoder`. Pure functions over
  bytes. The decoder accepts any chunking of the stream and raises
  `AgentProtocolError` — never another exception — for anything malformed;
  it checks a frame's length as soon as the header is in, so a hostile length
  never makes it wait for (or allocate) a huge payload.
- **Messages**: one small dataclass per message type with ``encode()`` and
  ``decode(payload)``, and `decode_message(frame)` dispatching on the type.
  Also pure; also `AgentProtocolError` for every malformed payload.
- **Client**: `AgentClient` over any connected stream socket (a vsock
  connection from the muxer, or a ``socket.socketpair()`` end in tests). It
  performs the handshake and offers ``run``, ``write_file``, ``read_file``
  and ``ping``; several threads may use one client at once (requests are
  multiplexed by id). It has no thread of its own: whichever caller is waiting
  reads the socket and hands frames of other requests to their owners, and a
  caller sending stdin keeps draining incoming output so neither side can
  block the other.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import os
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, NoReturn

from ..errors import GuestCrashed, GuestTimeout, SupermachineError

# ----------------------------------------------------------------------------- constants

PROTOCOL_VERSION = 1
MAGIC = 0x47414D53  # b"SMAG" little-endian
AGENT_PORT = 5253
READY_PORT = 5254

HEADER = struct.Struct("<IHHI")  # length, type, flags, request_id
HEADER_SIZE = HEADER.size  # 12
MAX_FRAME = 16 * 1024 * 1024  # hard upper bound on any payload
MIN_FRAME = 4096  # smallest max_frame a peer may announce
MAX_PING = 4096
MAX_SOFTWARE = 256

CAP_EXEC = 1 << 0
CAP_SHELL = 1 << 1
CAP_STDIN = 1 << 2
CAP_ENV = 1 << 3
CAP_CWD = 1 << 4
CAP_FILES = 1 << 5
CAP_KILL = 1 << 6
CAP_TIMEOUT = 1 << 7
CAP_ALL = (1 << 8) - 1

EXEC_STDIN = 1 << 0
EXEC_SHELL = 1 << 1
EXIT_SIGNALED = 1 << 0
EXIT_TIMED_OUT = 1 << 1
PUT_APPEND = 1 << 0
FILE_MORE = 1 << 0

SIGKILL = 9

# ----------------------------------------------------------------------------- errors


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


class AgentTimeout(AgentError, GuestTimeout):
    """The agent did not answer in time; carries the console tail when the VMM provides one."""

    def __init__(self, message: str, console_tail: str = "") -> None:
        GuestTimeout.__init__(self, message, console_tail)


class AgentGuestStopped(AgentError, GuestCrashed):
    """The machine stopped (crash, power-off) while the host waited for the agent."""


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
        for name, data in (("stdout", result.stdout), ("stderr", result.stderr)):
            if data:
                tail = data[-self.TAIL :].decode("utf-8", "replace")
                cut = "...(cut)..." if len(data) > self.TAIL else ""
                parts.append(f"--- {name} tail ---\n{cut}{tail}")
        super().__init__("\n".join(parts))
        self.command = command
        self.result = result


# ----------------------------------------------------------------------------- framing


class MsgType:
    """Message type codes (§4)."""

    HELLO = 0x01
    READY = 0x02
    PING = 0x03
    PONG = 0x04
    OK = 0x05
    ERROR = 0x06
    EXEC = 0x10
    STDIN = 0x11
    STDIN_EOF = 0x12
    STDOUT = 0x13
    STDERR = 0x14
    EXIT = 0x15
    KILL = 0x16
    PUT_FILE = 0x20
    GET_FILE = 0x21
    FILE_DATA = 0x22


TYPE_NAMES = {v: k for k, v in vars(MsgType).items() if not k.startswith("_")}


@dataclass(frozen=True)
class Frame:
    """One frame: message type, request id and the raw payload."""

    type: int
    request_id: int
    payload: bytes = b""

    def encode(self) -> bytes:
        return encode_frame(self.type, self.request_id, self.payload)

    def __repr__(self) -> str:
        name = TYPE_NAMES.get(self.type, hex(self.type))
        return f"Frame({name}, id={self.request_id}, {len(self.payload)} bytes)"


def encode_frame(
    type: int, request_id: int, payload: bytes | bytearray | memoryview = b""
) -> bytes:
    """Header + payload. Raises ValueError (a host bug, not a peer's) on out-of-range fields."""
    if len(payload) > MAX_FRAME:
        raise ValueError(f"payload of {len(payload)} bytes exceeds MAX_FRAME ({MAX_FRAME})")
    return HEADER.pack(len(payload), type, 0, request_id) + bytes(payload)


class FrameDecoder:
    """Incremental frame parser: feed it bytes in any chunking, get whole frames back.

    Guarantees: `feed` returns frames in stream order and raises only
    `AgentProtocolError`; a header announcing more than ``max_frame`` bytes, a
    nonzero flags field or an unknown type is refused as soon as the 12 header
    bytes are in. After an error the decoder stays failed (a byte stream has
    no resynchronisation point). `close` raises if the stream ended inside a
    frame.
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._need: int | None = None  # payload length of the frame being read
        self._hdr: tuple[int, int] = (0, 0)
        self._failed: str | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a returned frame."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        if self._failed is not None:
            raise AgentProtocolError(self._failed)
        frames: list[Frame] = []
        if not self._buf and self._need is None:
            # Fast path: whole frames straight out of `data`, no copy into the buffer.
            view = memoryview(data).cast("B")
            pos, end_of_data = 0, len(view)
            while end_of_data - pos >= HEADER_SIZE:
                length, type_, flags, rid = HEADER.unpack_from(view, pos)
                self._check_header(length, type_, flags)
                end = pos + HEADER_SIZE + length
                if end > end_of_data:
                    break
                frames.append(Frame(type_, rid, bytes(view[pos + HEADER_SIZE : end])))
                pos = end
            if pos == end_of_data:
                return frames
            data = view[pos:]
        self._buf += data
        buf = self._buf
        pos = 0
        try:
            while True:
                if self._need is None:
                    if len(buf) - pos < HEADER_SIZE:
                        break
                    length, type_, flags, rid = HEADER.unpack_from(buf, pos)
                    self._check_header(length, type_, flags)
                    pos += HEADER_SIZE
                    self._need = length
                    self._hdr = (type_, rid)
                if len(buf) - pos < self._need:
                    break
                end = pos + self._need
                frames.append(Frame(self._hdr[0], self._hdr[1], bytes(buf[pos:end])))
                pos = end
                self._need = None
        finally:
            if pos:
                del buf[:pos]
        return frames

    def _check_header(self, length: int, type_: int, flags: int) -> None:
        if length > self.max_frame:
            self._fail(
                f"frame announces a {length}-byte payload, more than the {self.max_frame} allowed"
            )
        if flags:
            self._fail(f"frame header has reserved flags {flags:#x} set")
        if type_ not in TYPE_NAMES:
            self._fail(f"unknown message type {type_:#x}")

    def close(self) -> None:
        """Declare end of stream: raises if it cut a frame in half."""
        if self._failed is not None:
            raise AgentProtocolError(self._failed)
        if self._need is not None or self._buf:
            have = len(self._buf) + (HEADER_SIZE if self._need is not None else 0)
            self._fail(f"stream ended inside a frame ({have} bytes of it received)")

    def _fail(self, message: str) -> NoReturn:
        self._failed = message
        raise AgentProtocolError(message)


# ----------------------------------------------------------------------------- payload codec


class _Reader:
    """Bounds-checked cursor over a payload; every failure is AgentProtocolError."""

    __slots__ = ("_data", "_pos", "_what")

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._pos = 0
        self._what = what

    def _take(self, n: int) -> bytes:
        if n > len(self._data) - self._pos:
            raise AgentProtocolError(
                f"{self._what}: needs {n} more bytes at offset {self._pos}, "
                f"only {len(self._data) - self._pos} left"
            )
        chunk = self._data[self._pos : self._pos + n]
        self._pos += n
        return chunk

    def u32(self) -> int:
        return int.from_bytes(self._take(4), "little")

    def i32(self) -> int:
        return int.from_bytes(self._take(4), "little", signed=True)

    def u64(self) -> int:
        return int.from_bytes(self._take(8), "little")

    def bytes_(self) -> bytes:
        return self._take(self.u32())

    def count(self, name: str) -> int:
        n = self.u32()
        if n * 4 > len(self._data) - self._pos:
            raise AgentProtocolError(f"{self._what}: {name} {n} cannot fit in the payload")
        return n

    def rest(self) -> bytes:
        chunk = self._data[self._pos :]
        self._pos = len(self._data)
        return chunk

    def end(self) -> None:
        if self._pos != len(self._data):
            raise AgentProtocolError(
                f"{self._what}: {len(self._data) - self._pos} trailing bytes after the last field"
            )


def _u32(v: int) -> bytes:
    return v.to_bytes(4, "little")


def _bstr(b: bytes) -> bytes:
    return len(b).to_bytes(4, "little") + b


def _cstring(value: bytes, what: str) -> bytes:
    if b"\0" in value:
        raise AgentProtocolError(f"{what} contains a NUL byte: {value!r}")
    return value


def _env_entry(value: bytes) -> bytes:
    _cstring(value, "env entry")
    if value.find(b"=") < 1:
        raise AgentProtocolError(f"env entry must be NAME=VALUE, got {value!r}")
    return value


class Message:
    """Base of the message dataclasses: each knows its type code and payload layout."""

    TYPE: ClassVar[int]

    def encode_payload(self) -> bytes:
        return b""

    @classmethod
    def decode(cls, payload: bytes) -> Message:
        if payload:
            raise AgentProtocolError(f"{cls.__name__}: expected an empty payload")
        return cls()

    def frame(self, request_id: int) -> bytes:
        return encode_frame(self.TYPE, request_id, self.encode_payload())


@dataclass(frozen=True)
class Hello(Message):
    """HELLO and READY payload: who the sender is and what it can do (§3)."""

    TYPE: ClassVar[int] = MsgType.HELLO
    version: int = PROTOCOL_VERSION
    capabilities: int = CAP_ALL
    max_frame: int = MAX_FRAME
    max_inflight: int = 0
    software: bytes = b""
    magic: int = MAGIC

    _FIXED: ClassVar[struct.Struct] = struct.Struct("<IIQII")

    def encode_payload(self) -> bytes:
        return self._FIXED.pack(
            self.magic, self.version, self.capabilities, self.max_frame, self.max_inflight
        ) + _bstr(self.software)

    @classmethod
    def decode(cls, payload: bytes) -> Hello:
        r = _Reader(payload, "HELLO")
        magic, version = r.u32(), r.u32()
        caps, max_frame, inflight = r.u64(), r.u32(), r.u32()
        software = r.bytes_()
        r.end()
        if magic != MAGIC:
            raise AgentProtocolError(
                f"HELLO magic is {magic:#010x}, expected {MAGIC:#010x}: "
                "the peer does not speak the supermachine agent protocol"
            )
        if not MIN_FRAME <= max_frame <= MAX_FRAME:
            raise AgentProtocolError(
                f"HELLO max_frame {max_frame} is outside {MIN_FRAME}..{MAX_FRAME}"
            )
        if len(software) > MAX_SOFTWARE:
            raise AgentProtocolError(f"HELLO software name is {len(software)} bytes long")
        return cls(version, caps, max_frame, inflight, software, magic)

    @property
    def name(self) -> str:
        return self.software.decode("utf-8", "replace") or "unnamed agent"


@dataclass(frozen=True)
class Ready(Hello):
    TYPE: ClassVar[int] = MsgType.READY


@dataclass(frozen=True)
class _Data(Message):
    """A message whose whole payload is opaque data."""

    data: bytes = b""
    NONEMPTY: ClassVar[bool] = False
    LIMIT: ClassVar[int] = MAX_FRAME

    def encode_payload(self) -> bytes:
        return self.data

    @classmethod
    def decode(cls, payload: bytes) -> _Data:
        if cls.NONEMPTY and not payload:
            raise AgentProtocolError(f"{cls.__name__}: empty data frame")
        if len(payload) > cls.LIMIT:
            raise AgentProtocolError(f"{cls.__name__}: {len(payload)} bytes, at most {cls.LIMIT}")
        return cls(payload)


@dataclass(frozen=True)
class Ping(_Data):
    TYPE: ClassVar[int] = MsgType.PING
    LIMIT: ClassVar[int] = MAX_PING


@dataclass(frozen=True)
class Pong(_Data):
    TYPE: ClassVar[int] = MsgType.PONG
    LIMIT: ClassVar[int] = MAX_PING


@dataclass(frozen=True)
class Ok(Message):
    TYPE: ClassVar[int] = MsgType.OK


@dataclass(frozen=True)
class Error(Message):
    TYPE: ClassVar[int] = MsgType.ERROR
    errno: int = 0
    message: bytes = b""

    def encode_payload(self) -> bytes:
        return _u32(self.errno) + self.message

    @classmethod
    def decode(cls, payload: bytes) -> Error:
        r = _Reader(payload, "ERROR")
        return cls(r.u32(), r.rest())

    @property
    def text(self) -> str:
        return self.message.decode("utf-8", "replace")


@dataclass(frozen=True)
class Exec(Message):
    """Start a command (§4 EXEC)."""

    TYPE: ClassVar[int] = MsgType.EXEC
    argv: tuple[bytes, ...] = ()
    env: tuple[bytes, ...] = ()
    cwd: bytes = b""
    timeout_ms: int = 0
    stdin: bool = False
    shell: bool = False

    def encode_payload(self) -> bytes:
        flags = (EXEC_STDIN if self.stdin else 0) | (EXEC_SHELL if self.shell else 0)
        if not self.argv or (self.shell and len(self.argv) != 1):
            raise AgentProtocolError("EXEC needs argv (exactly one command line with shell)")
        parts = [_u32(flags), _u32(self.timeout_ms), _u32(len(self.argv)), _u32(len(self.env))]
        parts.append(_bstr(_cstring(self.cwd, "cwd")))
        parts += [_bstr(_cstring(a, "argv entry")) for a in self.argv]
        parts += [_bstr(_env_entry(e)) for e in self.env]
        return b"".join(parts)

    @classmethod
    def decode(cls, payload: bytes) -> Exec:
        r = _Reader(payload, "EXEC")
        flags, timeout_ms = r.u32(), r.u32()
        if flags & ~(EXEC_STDIN | EXEC_SHELL):
            raise AgentProtocolError(f"EXEC: unknown flags {flags:#x}")
        argc = r.count("argc")
        envc = r.count("envc")
        cwd = _cstring(r.bytes_(), "cwd")
        argv = tuple(_cstring(r.bytes_(), "argv entry") for _ in range(argc))
        env = tuple(_env_entry(r.bytes_()) for _ in range(envc))
        r.end()
        shell = bool(flags & EXEC_SHELL)
        if argc < 1 or (shell and argc != 1):
            raise AgentProtocolError(f"EXEC: argc {argc} is invalid (shell={shell})")
        return cls(argv, env, cwd, timeout_ms, bool(flags & EXEC_STDIN), shell)


@dataclass(frozen=True)
class Stdin(_Data):
    TYPE: ClassVar[int] = MsgType.STDIN
    NONEMPTY: ClassVar[bool] = True


@dataclass(frozen=True)
class StdinEof(Message):
    TYPE: ClassVar[int] = MsgType.STDIN_EOF


@dataclass(frozen=True)
class Stdout(_Data):
    TYPE: ClassVar[int] = MsgType.STDOUT
    NONEMPTY: ClassVar[bool] = True


@dataclass(frozen=True)
class Stderr(_Data):
    TYPE: ClassVar[int] = MsgType.STDERR
    NONEMPTY: ClassVar[bool] = True


@dataclass(frozen=True)
class Exit(Message):
    """End of a command: exit code or signal, agent-measured duration, timeout flag."""

    TYPE: ClassVar[int] = MsgType.EXIT
    status: int = 0
    signaled: bool = False
    timed_out: bool = False
    duration_ns: int = 0

    _FMT: ClassVar[struct.Struct] = struct.Struct("<IiQ")

    def encode_payload(self) -> bytes:
        flags = (EXIT_SIGNALED if self.signaled else 0) | (EXIT_TIMED_OUT if self.timed_out else 0)
        return self._FMT.pack(flags, self.status, self.duration_ns)

    @classmethod
    def decode(cls, payload: bytes) -> Exit:
        if len(payload) != cls._FMT.size:
            raise AgentProtocolError(f"EXIT: payload is {len(payload)} bytes, expected 16")
        flags, status, duration = cls._FMT.unpack(payload)
        if flags & ~(EXIT_SIGNALED | EXIT_TIMED_OUT):
            raise AgentProtocolError(f"EXIT: unknown flags {flags:#x}")
        signaled = bool(flags & EXIT_SIGNALED)
        if (signaled and not 1 <= status <= 64) or (not signaled and not 0 <= status <= 255):
            raise AgentProtocolError(f"EXIT: status {status} out of range (signaled={signaled})")
        return cls(status, signaled, bool(flags & EXIT_TIMED_OUT), duration)


@dataclass(frozen=True)
class Kill(Message):
    TYPE: ClassVar[int] = MsgType.KILL
    signal: int = SIGKILL

    def encode_payload(self) -> bytes:
        return _u32(self.signal)

    @classmethod
    def decode(cls, payload: bytes) -> Kill:
        r = _Reader(payload, "KILL")
        sig = r.u32()
        r.end()
        if not 1 <= sig <= 64:
            raise AgentProtocolError(f"KILL: signal {sig} out of range")
        return cls(sig)


@dataclass(frozen=True)
class PutFile(Message):
    TYPE: ClassVar[int] = MsgType.PUT_FILE
    path: bytes = b""
    data: bytes = b""
    mode: int = 0o644
    append: bool = False

    OVERHEAD: ClassVar[int] = 12  # mode, flags, path length

    def encode_payload(self) -> bytes:
        return (
            _u32(self.mode)
            + _u32(PUT_APPEND if self.append else 0)
            + _bstr(_cstring(self.path, "path"))
            + self.data
        )

    @classmethod
    def decode(cls, payload: bytes) -> PutFile:
        r = _Reader(payload, "PUT_FILE")
        mode, flags = r.u32(), r.u32()
        path = _cstring(r.bytes_(), "path")
        if mode & ~0o7777 or flags & ~PUT_APPEND or not path:
            raise AgentProtocolError(f"PUT_FILE: bad mode {mode:#o}, flags {flags:#x} or path")
        return cls(path, r.rest(), mode, bool(flags & PUT_APPEND))


@dataclass(frozen=True)
class GetFile(Message):
    TYPE: ClassVar[int] = MsgType.GET_FILE
    path: bytes = b""

    def encode_payload(self) -> bytes:
        return _cstring(self.path, "path")

    @classmethod
    def decode(cls, payload: bytes) -> GetFile:
        if not payload:
            raise AgentProtocolError("GET_FILE: empty path")
        return cls(_cstring(payload, "path"))


@dataclass(frozen=True)
class FileData(Message):
    TYPE: ClassVar[int] = MsgType.FILE_DATA
    data: bytes = b""
    more: bool = False

    def encode_payload(self) -> bytes:
        return _u32(FILE_MORE if self.more else 0) + self.data

    @classmethod
    def decode(cls, payload: bytes) -> FileData:
        r = _Reader(payload, "FILE_DATA")
        flags = r.u32()
        if flags & ~FILE_MORE:
            raise AgentProtocolError(f"FILE_DATA: unknown flags {flags:#x}")
        return cls(r.rest(), bool(flags & FILE_MORE))


MESSAGE_CLASSES: dict[int, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Hello,
        Ready,
        Ping,
        Pong,
        Ok,
        Error,
        Exec,
        Stdin,
        StdinEof,
        Stdout,
        Stderr,
        Exit,
        Kill,
        PutFile,
        GetFile,
        FileData,
    )
}


def decode_message(frame: Frame) -> Message:
    """The typed message of a frame; AgentProtocolError for an unknown type or bad payload."""
    cls = MESSAGE_CLASSES.get(frame.type)
    if cls is None:
        raise AgentProtocolError(f"unknown message type {frame.type:#x}")
    return cls.decode(frame.payload)


# ----------------------------------------------------------------------------- results


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


Command = str | bytes | Sequence[str | bytes | os.PathLike[str]]

# ----------------------------------------------------------------------------- client


def _fs(value: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> bytes:
    return os.fsencode(value)


@dataclass
class _Request:
    frames: deque[Frame] = field(default_factory=deque)


class AgentClient:
    """A handshaken connection to a guest agent.

    Parameters: ``sock`` — a connected stream socket (ownership passes to the
    client; `close` closes it). ``timeout`` — how long to wait for an answer
    that should come quickly (handshake, ping, files), in seconds.
    ``kill_grace`` — how long past a command's own ``timeout`` the host waits
    for the agent's EXIT before it gives up with `AgentTimeout`.
    ``console_tail`` — called to attach the guest console to timeout errors.

    Thread safety: any number of threads may call `run`, `write_file`,
    `read_file` and `ping` concurrently; at most the agent's ``max_inflight``
    requests are open at once, further callers wait for a slot.
    After a protocol error or a lost connection every call raises `AgentError`.
    """

    RECV_SIZE = 256 * 1024
    HOST_SOFTWARE = b"pytest-supermachine host"

    def __init__(
        self,
        sock: socket.socket,
        *,
        timeout: float | None = 30.0,
        kill_grace: float = 10.0,
        console_tail: Callable[[], str] | None = None,
        handshake: bool = True,
    ) -> None:
        self._sock = sock
        sock.setblocking(False)
        self.timeout = timeout
        self.kill_grace = kill_grace
        self._console_tail = console_tail
        self._decoder = FrameDecoder(MAX_FRAME)
        self._cv = threading.Condition(threading.Lock())
        self._send_lock = threading.Lock()
        self._requests: dict[int, _Request] = {}
        self._reading = False
        self._failed: tuple[type[AgentError], str] | None = None
        self._next_id = 1
        self.agent: Hello = Hello(max_inflight=1, max_frame=MIN_FRAME, software=b"(no handshake)")
        self._slots = threading.BoundedSemaphore(1)
        if handshake:
            self._handshake()

    # --------------------------------------------------------------- lifecycle

    def _handshake(self) -> None:
        deadline = self._deadline(self.timeout)
        self._requests[0] = _Request()
        try:
            self._send(Hello(software=self.HOST_SOFTWARE).frame(0), deadline)
            frame = self._wait(0, deadline, "the agent's HELLO")
        finally:
            self._requests.pop(0, None)
        msg = decode_message(frame)
        if isinstance(msg, Error):
            text = msg.text
            self._fail(
                AgentProtocolError,
                f"the guest agent refused the handshake: {text} (this host speaks agent "
                f"protocol version {PROTOCOL_VERSION}; if the versions differ, rebuild the "
                "guest image with `supermachine image build` or update the host)",
            )
        if not isinstance(msg, Hello) or isinstance(msg, Ready):
            self._fail(AgentProtocolError, f"expected HELLO from the agent, got {frame!r}")
        assert isinstance(msg, Hello)
        if msg.version != PROTOCOL_VERSION:
            older = "guest agent" if msg.version < PROTOCOL_VERSION else "host"
            self._fail(
                AgentProtocolError,
                f"the guest agent {msg.name!r} speaks agent protocol version {msg.version}, "
                f"this host speaks version {PROTOCOL_VERSION}: the {older} is older; "
                "rebuild the guest image (`supermachine image build`) or update the host",
            )
        if msg.max_inflight < 1:
            self._fail(AgentProtocolError, "the agent's HELLO announces max_inflight 0")
        self.agent = msg
        self._slots = threading.BoundedSemaphore(msg.max_inflight)

    def close(self) -> None:
        """Close the connection; calls in progress fail with AgentError."""
        with self._cv:
            if self._failed is None:
                self._failed = (AgentError, "the agent connection was closed by the host")
            self._cv.notify_all()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in poll()
        with contextlib.suppress(OSError):
            self._sock.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._failed is not None

    # --------------------------------------------------------------- public API

    def ping(self, payload: bytes = b"") -> float:
        """Round trip a PING; returns the elapsed seconds."""
        payload = payload or os.urandom(8)
        start = time.perf_counter()
        with self._request() as rid:
            deadline = self._deadline(self.timeout)
            self._send(Ping(payload).frame(rid), deadline)
            msg = self._expect(rid, deadline, "PONG")
            if not isinstance(msg, Pong) or msg.data != payload:
                self._fail(AgentProtocolError, f"PING answered with {msg!r}")
        return time.perf_counter() - start

    def run(
        self,
        cmd: Command,
        *,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        input: bytes | str | None = None,
        check: bool = False,
    ) -> RunResult:
        """Run a command in the guest and wait for it.

        ``cmd`` as a string is a command line the agent interprets (``/bin/sh
        -c`` on Linux, a built-in in the microguest); as a sequence it is an
        argv. ``timeout`` (seconds) is enforced by the agent, which kills the
        command and reports ``timed_out=True``; if the agent does not report
        within ``timeout + kill_grace`` the host sends KILL and raises
        `AgentTimeout`. ``input`` is fed as stdin, otherwise stdin is empty.
        ``check=True`` raises `CommandFailed` unless the result is ``ok``.
        Raises `AgentRemoteError` when the command cannot be started.
        """
        shell = isinstance(cmd, (str, bytes))
        argv = (_fs(cmd),) if shell else tuple(_fs(a) for a in cmd)  # type: ignore[union-attr]
        if not argv:
            raise ValueError("run() needs a command")
        env_entries = tuple(_fs(k) + b"=" + _fs(v) for k, v in (env or {}).items())
        for k in env or {}:
            if not k or "=" in k or "\0" in k:
                raise ValueError(f"invalid environment variable name {k!r}")
        stdin = input.encode() if isinstance(input, str) else input
        self._require(CAP_EXEC, "running commands")
        if shell:
            self._require(CAP_SHELL, "command lines (pass an argv list instead)")
        if stdin is not None:
            self._require(CAP_STDIN, "stdin")
        if env_entries:
            self._require(CAP_ENV, "environment variables")
        if cwd is not None:
            self._require(CAP_CWD, "a working directory")
        timeout_ms = 0
        if timeout is not None:
            if timeout <= 0:
                raise ValueError(f"timeout must be positive, got {timeout}")
            self._require(CAP_TIMEOUT, "timeouts")
            timeout_ms = max(1, min(int(timeout * 1000), 0xFFFFFFFF))
        msg = Exec(
            argv,
            env_entries,
            _fs(cwd) if cwd is not None else b"",
            timeout_ms,
            stdin is not None,
            shell,
        )
        shown = repr(cmd if shell else list(cmd))  # type: ignore[arg-type]
        if len(shown) > 200:  # error messages name the command, not a megabyte of it
            shown = f"{shown[:160]}…({len(shown)} chars)"
        try:
            payload = msg.encode_payload()
        except AgentProtocolError as exc:  # NUL bytes in argv/env/cwd: a caller error
            raise ValueError(str(exc)) from None
        if len(payload) > self.agent.max_frame:
            raise ValueError(f"command {shown} does not fit in one frame of the agent")
        with self._request() as rid:
            deadline = self._deadline(None if timeout is None else timeout + self.kill_grace)
            out, err = bytearray(), bytearray()
            try:
                self._send(encode_frame(MsgType.EXEC, rid, payload), deadline)
                if stdin is not None:
                    self._send_stdin(rid, stdin, deadline)
                while True:
                    m = self._expect(rid, deadline, f"the end of guest command {shown}")
                    if isinstance(m, Stdout):
                        out += m.data
                    elif isinstance(m, Stderr):
                        err += m.data
                    elif isinstance(m, Exit):
                        break
                    else:
                        self._fail(AgentProtocolError, f"unexpected {type(m).__name__} for EXEC")
            except AgentTimeout:
                if self.agent.capabilities & CAP_KILL and not self.closed:
                    with contextlib.suppress(AgentError):
                        self._send(Kill(SIGKILL).frame(rid), self._deadline(1.0))
                raise
        result = RunResult(
            returncode=-m.status if m.signaled else m.status,
            stdout=bytes(out),
            stderr=bytes(err),
            duration=m.duration_ns / 1e9,
            timed_out=m.timed_out,
            signal=m.status if m.signaled else None,
        )
        if check and not result.ok:
            raise CommandFailed(shown, result)
        return result

    def write_file(self, path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> None:
        """Create or truncate ``path`` in the guest with ``data`` (split across frames as needed)."""
        self._require(CAP_FILES, "file transfer")
        bpath = _fs(path)
        if not bpath or b"\0" in bpath:
            raise ValueError(f"invalid guest path {path!r}")
        if mode & ~0o7777:
            raise ValueError(f"mode {mode:#o} has bits outside 0o7777")
        room = self.agent.max_frame - PutFile.OVERHEAD - len(bpath)
        if room < 1:
            raise ValueError(f"guest path of {len(bpath)} bytes does not fit in a frame")
        view = memoryview(data)
        offset = 0
        while True:
            chunk = bytes(view[offset : offset + room])
            self._file_request(PutFile(bpath, chunk, mode, append=offset > 0), f"write {path}")
            offset += len(chunk)
            if offset >= len(view):
                break

    def read_file(self, path: str | os.PathLike[str]) -> bytes:
        """The contents of ``path`` in the guest; `AgentRemoteError` (with errno) if unreadable."""
        self._require(CAP_FILES, "file transfer")
        bpath = _fs(path)
        if not bpath or b"\0" in bpath:
            raise ValueError(f"invalid guest path {path!r}")
        parts: list[bytes] = []
        with self._request() as rid:
            deadline = self._deadline(self.timeout)
            self._send(GetFile(bpath).frame(rid), deadline)
            while True:
                m = self._expect(rid, deadline, f"the contents of {path}", f"read {path}")
                if not isinstance(m, FileData):
                    self._fail(AgentProtocolError, f"GET_FILE answered with {m!r}")
                assert isinstance(m, FileData)
                parts.append(m.data)
                if not m.more:
                    return b"".join(parts)
                deadline = self._deadline(self.timeout)

    # --------------------------------------------------------------- requests

    def _require(self, cap: int, what: str) -> None:
        if not self.agent.capabilities & cap:
            raise AgentError(f"the guest agent {self.agent.name!r} does not support {what}")

    def _file_request(self, msg: Message, what: str) -> None:
        with self._request() as rid:
            deadline = self._deadline(self.timeout)
            self._send(msg.frame(rid), deadline)
            m = self._expect(rid, deadline, f"the answer to {what}", what)
            if not isinstance(m, Ok):
                self._fail(AgentProtocolError, f"{what}: answered with {m!r}")

    def _request(self) -> _RequestSlot:
        return _RequestSlot(self)

    def _open(self) -> int:
        self._slots.acquire()
        with self._cv:
            if self._failed is not None:
                self._slots.release()
                self._raise_failed()
            rid = self._next_id
            while rid == 0 or rid in self._requests:
                rid = (rid + 1) & 0xFFFFFFFF
            self._next_id = (rid + 1) & 0xFFFFFFFF
            self._requests[rid] = _Request()
            return rid

    def _close_request(self, rid: int) -> None:
        with self._cv:
            self._requests.pop(rid, None)
        self._slots.release()

    def _expect(
        self, rid: int, deadline: float | None, waiting_for: str, what: str = ""
    ) -> Message:
        """Next message of a request; ERROR becomes AgentRemoteError."""
        frame = self._wait(rid, deadline, waiting_for)
        try:
            msg = decode_message(frame)
        except AgentProtocolError as exc:
            self._fail(AgentProtocolError, str(exc))
        if isinstance(msg, Error):
            raise AgentRemoteError(what or waiting_for, msg.errno, msg.text)
        return msg

    def _send_stdin(self, rid: int, data: bytes, deadline: float | None) -> None:
        room = self.agent.max_frame
        view = memoryview(data)
        req = self._requests[rid]
        for offset in range(0, len(view), room):
            if req.frames and req.frames[-1].type in (MsgType.EXIT, MsgType.ERROR):
                return  # the command is done: the rest of its stdin would be ignored
            self._send(encode_frame(MsgType.STDIN, rid, view[offset : offset + room]), deadline)
        self._send(encode_frame(MsgType.STDIN_EOF, rid), deadline)

    # --------------------------------------------------------------- I/O engine

    @staticmethod
    def _deadline(timeout: float | None) -> float | None:
        return None if timeout is None else time.monotonic() + timeout

    def _timeout_error(self, waiting_for: str) -> AgentTimeout:
        tail = ""
        if self._console_tail is not None:
            try:
                tail = self._console_tail()
            except Exception as exc:  # a broken tail provider must not hide the timeout
                tail = f"(console tail unavailable: {exc})"
        return AgentTimeout(f"timed out waiting for {waiting_for} from the guest agent", tail)

    def _fail(self, cls: type[AgentError], message: str) -> NoReturn:
        """Mark the connection dead (first reason wins), wake everyone, raise."""
        with self._cv:
            if self._failed is None:
                self._failed = (cls, message)
            self._cv.notify_all()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._raise_failed()  # the first reason, which may be another thread's

    def abort(self, cls: type[AgentError], message: str) -> None:
        """Fail every pending and future call with `cls(message)` (from any thread)."""
        with contextlib.suppress(AgentError):
            self._fail(cls, message)

    def _raise_failed(self) -> NoReturn:
        assert self._failed is not None
        cls, message = self._failed
        raise cls(message)

    def _wait(self, rid: int, deadline: float | None, waiting_for: str) -> Frame:
        """Block until a frame for ``rid`` arrives, reading the socket if nobody else is."""
        while True:
            with self._cv:
                while True:
                    req = self._requests[rid]
                    if req.frames:
                        return req.frames.popleft()
                    if self._failed is not None:
                        self._raise_failed()
                    if not self._reading:
                        self._reading = True
                        break
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise self._timeout_error(waiting_for)
                    self._cv.wait(remaining)
            try:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise self._timeout_error(waiting_for)
                if self._poll(select.POLLIN, remaining):
                    self._read_some()
            finally:
                with self._cv:
                    self._reading = False
                    self._cv.notify_all()

    def _poll(self, events: int, timeout: float | None) -> int:
        p = select.poll()
        try:
            p.register(self._sock, events)
        except (ValueError, OSError):  # socket closed under us
            with self._cv:
                if self._failed is not None:
                    self._raise_failed()
            self._fail(AgentError, "the agent socket was closed")
        ms = None if timeout is None else max(0, int(timeout * 1000 + 0.999))
        result = p.poll(ms)
        return result[0][1] if result else 0

    def _read_some(self) -> None:
        """One recv, decoded and dispatched. Caller holds the reader role."""
        try:
            data = self._sock.recv(self.RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fail(AgentError, f"lost the connection to the guest agent: {exc}")
        if not data:
            try:
                self._decoder.close()
            except AgentProtocolError as exc:
                self._fail(AgentProtocolError, str(exc))
            self._fail(AgentError, "the guest agent closed the connection")
        try:
            frames = self._decoder.feed(data)
        except AgentProtocolError as exc:
            self._fail(AgentProtocolError, str(exc))
        hangup: Frame | None = None
        with self._cv:
            for frame in frames:
                req = self._requests.get(frame.request_id)
                if req is not None:
                    req.frames.append(frame)
                elif frame.request_id == 0:
                    hangup = frame
                    break
                # else: a late frame of a request we gave up on; dropped
            self._cv.notify_all()
        if hangup is not None:
            # connection-level: an ERROR means the agent is hanging up on us
            reason = f"unexpected {hangup!r}"
            if hangup.type == MsgType.ERROR:
                with contextlib.suppress(AgentProtocolError):
                    reason = Error.decode(hangup.payload).text
            self._fail(AgentProtocolError, f"the guest agent reports: {reason}")

    def _send(self, data: bytes, deadline: float | None) -> None:
        """Write one whole frame; keeps draining input while the socket is full."""
        view = memoryview(data)
        with self._send_lock:
            while view:
                if self._failed is not None:
                    self._raise_failed()
                try:
                    n = self._sock.send(view)
                    view = view[n:]
                    continue
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError as exc:
                    self._fail(AgentError, f"lost the connection to the guest agent: {exc}")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise self._timeout_error("the agent to accept input")
                with self._cv:
                    reader = not self._reading
                    if reader:
                        self._reading = True
                if reader:
                    try:
                        ev = self._poll(select.POLLOUT | select.POLLIN, remaining)
                        if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                            self._read_some()
                    finally:
                        with self._cv:
                            self._reading = False
                            self._cv.notify_all()
                else:
                    self._poll(select.POLLOUT, 0.05 if remaining is None else min(remaining, 0.05))


class _RequestSlot:
    """Context manager: a request id held open (and an inflight slot) for one exchange."""

    __slots__ = ("_client", "_rid")

    def __init__(self, client: AgentClient) -> None:
        self._client = client
        self._rid = 0

    def __enter__(self) -> int:
        self._rid = self._client._open()
        return self._rid

    def __exit__(self, *exc: object) -> None:
        self._client._close_request(self._rid)


def read_ready(sock: socket.socket, timeout: float | None = 30.0) -> Ready:
    """Read the READY frame an agent sends on the ready connection (§6) and check it.

    Raises `AgentProtocolError` for anything but a well-formed READY of our
    protocol version, `AgentTimeout` if none arrives in time.
    """
    decoder = FrameDecoder(MIN_FRAME)
    deadline = None if timeout is None else time.monotonic() + timeout
    prev = sock.gettimeout()
    try:
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise AgentTimeout("timed out waiting for the guest agent's READY")
            sock.settimeout(remaining)
            try:
                data = sock.recv(MIN_FRAME)
            except TimeoutError:
                continue
            if not data:
                decoder.close()
                raise AgentProtocolError("the ready connection closed before READY")
            frames = decoder.feed(data)
            if frames:
                msg = decode_message(frames[0])
                if not isinstance(msg, Ready):
                    raise AgentProtocolError(f"expected READY, got {frames[0]!r}")
                if msg.version != PROTOCOL_VERSION:
                    raise AgentProtocolError(
                        f"the guest agent {msg.name!r} speaks protocol version {msg.version}, "
                        f"this host {PROTOCOL_VERSION}: rebuild the guest image"
                    )
                return msg
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(prev)


__all__ = [
    "AGENT_PORT",
    "MAX_FRAME",
    "PROTOCOL_VERSION",
    "READY_PORT",
    "AgentClient",
    "AgentError",
    "AgentProtocolError",
    "AgentRemoteError",
    "AgentTimeout",
    "CommandFailed",
    "Frame",
    "FrameDecoder",
    "MsgType",
    "RunResult",
    "decode_message",
    "encode_frame",
    "read_ready",
]
