"""The agent protocol's messages: one small dataclass per message type.

Each has ``encode_payload()`` and ``decode(payload)``, and `decode_message(frame)`
dispatches on the frame's type. Pure functions over bytes; every malformed
payload is an `AgentProtocolError`, never another exception.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

from .errors import AgentProtocolError
from .protocol import (
    CAP_ALL,
    CAP_SEED,
    CAP_USER,
    EXEC_SHELL,
    EXEC_STDIN,
    EXEC_USER,
    EXIT_SIGNALED,
    EXIT_TIMED_OUT,
    FILE_MORE,
    MAGIC,
    MAX_FRAME,
    MAX_GROUPS,
    MAX_PING,
    MAX_SEED,
    MAX_SOFTWARE,
    MIN_FRAME,
    PROTOCOL_VERSION,
    PUT_APPEND,
    SEED_RESEED,
    SIGKILL,
    Frame,
    MsgType,
    encode_frame,
)


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
    capabilities: int = CAP_ALL | CAP_USER | CAP_SEED
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
class RunAs:
    """Whom a command runs as (EXEC_USER): uid, primary gid, supplementary gids."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for what, value in (
            ("uid", self.uid),
            ("gid", self.gid),
            *(("group", g) for g in self.groups),
        ):
            if not 0 <= value < 0xFFFFFFFF:  # 2**32-1 is (uid_t)-1, "no change" to the kernel
                raise ValueError(f"{what} {value} is not a valid Linux id")
        if len(self.groups) > MAX_GROUPS:
            raise ValueError(f"{len(self.groups)} supplementary groups, at most {MAX_GROUPS}")


@dataclass(frozen=True)
class Exec(Message):
    """Start a command (§4 EXEC); with `user`, as that user (EXEC_USER, after env)."""

    TYPE: ClassVar[int] = MsgType.EXEC
    argv: tuple[bytes, ...] = ()
    env: tuple[bytes, ...] = ()
    cwd: bytes = b""
    timeout_ms: int = 0
    stdin: bool = False
    shell: bool = False
    user: RunAs | None = None

    def encode_payload(self) -> bytes:
        flags = (
            (EXEC_STDIN if self.stdin else 0)
            | (EXEC_SHELL if self.shell else 0)
            | (EXEC_USER if self.user is not None else 0)
        )
        if not self.argv or (self.shell and len(self.argv) != 1):
            raise AgentProtocolError("EXEC needs argv (exactly one command line with shell)")
        parts = [_u32(flags), _u32(self.timeout_ms), _u32(len(self.argv)), _u32(len(self.env))]
        parts.append(_bstr(_cstring(self.cwd, "cwd")))
        parts += [_bstr(_cstring(a, "argv entry")) for a in self.argv]
        parts += [_bstr(_env_entry(e)) for e in self.env]
        if self.user is not None:
            u = self.user
            parts += [_u32(u.uid), _u32(u.gid), _u32(len(u.groups)), *map(_u32, u.groups)]
        return b"".join(parts)

    @classmethod
    def decode(cls, payload: bytes) -> Exec:
        r = _Reader(payload, "EXEC")
        flags, timeout_ms = r.u32(), r.u32()
        if flags & ~(EXEC_STDIN | EXEC_SHELL | EXEC_USER):
            raise AgentProtocolError(f"EXEC: unknown flags {flags:#x}")
        argc = r.count("argc")
        envc = r.count("envc")
        cwd = _cstring(r.bytes_(), "cwd")
        argv = tuple(_cstring(r.bytes_(), "argv entry") for _ in range(argc))
        env = tuple(_env_entry(r.bytes_()) for _ in range(envc))
        user = None
        if flags & EXEC_USER:
            uid, gid = r.u32(), r.u32()
            ngroups = r.count("ngroups")
            if ngroups > MAX_GROUPS:
                raise AgentProtocolError(f"EXEC: {ngroups} groups, at most {MAX_GROUPS}")
            groups = tuple(r.u32() for _ in range(ngroups))
            try:
                user = RunAs(uid, gid, groups)
            except ValueError as e:
                raise AgentProtocolError(f"EXEC: {e}") from None
        r.end()
        shell = bool(flags & EXEC_SHELL)
        if argc < 1 or (shell and argc != 1):
            raise AgentProtocolError(f"EXEC: argc {argc} is invalid (shell={shell})")
        return cls(argv, env, cwd, timeout_ms, bool(flags & EXEC_STDIN), shell, user)


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


@dataclass(frozen=True)
class Seed(Message):
    """SEED: the per-test seed the agent mixes into the guest's randomness, and the wall clock.

    ``wall_ns`` 0 leaves the guest clock alone; ``reseed`` asks the Linux agent to make
    the kernel reseed its CRNG too (for a host that could not set the CRNG itself).
    """

    TYPE: ClassVar[int] = MsgType.SEED
    seed: bytes = b"\0"
    wall_ns: int = 0
    reseed: bool = False

    _FIXED: ClassVar[struct.Struct] = struct.Struct("<IQ")

    def encode_payload(self) -> bytes:
        if not 1 <= len(self.seed) <= MAX_SEED:
            raise ValueError(f"a seed is 1..{MAX_SEED} bytes, got {len(self.seed)}")
        if not 0 <= self.wall_ns < 1 << 64:
            raise ValueError(f"wall_ns {self.wall_ns} is not a u64")
        flags = SEED_RESEED if self.reseed else 0
        return self._FIXED.pack(flags, self.wall_ns) + self.seed

    @classmethod
    def decode(cls, payload: bytes) -> Seed:
        r = _Reader(payload, "SEED")
        flags, wall_ns = r.u32(), r.u64()
        seed = r.rest()
        if flags & ~SEED_RESEED or not 1 <= len(seed) <= MAX_SEED:
            raise AgentProtocolError(f"SEED: bad flags {flags:#x} or a {len(seed)}-byte seed")
        return cls(seed, wall_ns, bool(flags & SEED_RESEED))


@dataclass(frozen=True)
class TcpConnect(Message):
    """Turn this connection into a byte stream to the guest's 127.0.0.1:`port` (§4)."""

    TYPE: ClassVar[int] = MsgType.TCP_CONNECT
    port: int = 0

    def encode_payload(self) -> bytes:
        return _u32(self.port)

    @classmethod
    def decode(cls, payload: bytes) -> TcpConnect:
        r = _Reader(payload, "TCP_CONNECT")
        port = r.u32()
        r.end()
        if not 1 <= port <= 65535:
            raise AgentProtocolError(f"TCP_CONNECT: port {port} out of range")
        return cls(port)


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
        Seed,
        TcpConnect,
    )
}


def decode_message(frame: Frame) -> Message:
    """The typed message of a frame; AgentProtocolError for an unknown type or bad payload."""
    cls = MESSAGE_CLASSES.get(frame.type)
    if cls is None:
        raise AgentProtocolError(f"unknown message type {frame.type:#x}")
    return cls.decode(frame.payload)
