"""The agent protocol's wire format (``docs/agent-protocol.md``, version 1): constants and framing.

Pure functions over bytes: `encode_frame` builds a frame, `FrameDecoder`
accepts any chunking of a stream and raises `AgentProtocolError` — never
another exception — for anything malformed; it checks a frame's length as soon
as the header is in, so a hostile length never makes it wait for (or allocate)
a huge payload.

The constants here are the protocol's one Python copy; the guests' C copy is
``pytest_supermachine/guest/include/agent_protocol.h``, and
``tests/unit/test_agent_protocol_header.py`` compiles it to check that the two agree.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NoReturn

from .errors import AgentProtocolError

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
CAP_ALL = (1 << 8) - 1  # the base set every version-1 agent has
CAP_USER = 1 << 8  # EXEC_USER: a command runs as a uid, gid and supplementary groups
#: SEED (§4): a per-test seed and wall clock (both agents announce it).
CAP_SEED = 1 << 10
MAX_SEED = 256
#: TCP_CONNECT: the connection becomes a byte stream to a guest TCP port (Linux agent only).
CAP_TCP = 1 << 9

EXEC_STDIN = 1 << 0
EXEC_SHELL = 1 << 1
EXEC_USER = 1 << 2
MAX_GROUPS = 256  # supplementary groups one EXEC_USER may name
EXIT_SIGNALED = 1 << 0
EXIT_TIMED_OUT = 1 << 1
PUT_APPEND = 1 << 0
FILE_MORE = 1 << 0
SEED_RESEED = 1 << 0

SIGKILL = 9


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
    SEED = 0x40
    TCP_CONNECT = 0x41


TYPE_NAMES = {v: k for k, v in vars(MsgType).items() if not k.startswith("_")}


_MASK64 = (1 << 64) - 1


def splitmix64(state: int) -> tuple[int, int]:
    """One splitmix64 step: (new state, output); ``ag_splitmix64`` in the C header.

    How both agents turn a SEED into numbers (the microguest's ``rand`` built-in,
    the Linux agent's per-command ``$RANDOM`` seeds), fixed so a seed means the same
    sequence in every agent.
    """
    state = (state + 0x9E3779B97F4A7C15) & _MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return state, z ^ (z >> 31)


def seed_state(seed: bytes) -> int:
    """The 64-bit generator state a SEED's bytes give (``ag_seed_state``): FNV-1a, one splitmix step."""
    h = 0xCBF29CE484222325
    for byte in seed:
        h = ((h ^ byte) * 0x100000001B3) & _MASK64
    return splitmix64(h)[1]


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
