"""The host's client of a guest agent: `AgentClient` and the READY reader.

`AgentClient` works over any connected stream socket (a vsock connection from
the muxer, or a ``socket.socketpair()`` end in tests). It performs the
handshake and offers ``run``, ``write_file``, ``read_file`` and ``ping``;
several threads may use one client at once (requests are multiplexed by id).
It has no thread of its own: whichever caller is waiting reads the socket and
hands frames of other requests to their owners, and a caller sending stdin
keeps draining incoming output so neither side can block the other.

Whatever the agent sends, a call ends by one deadline for the whole call (a
`run` given no timeout gets `run_timeout`), and the host keeps a bounded
amount of what it sent: `run` output up to ``output_limit`` per stream
(`output`), `read_file` data up to its ``limit``.

Why this module is longer than ~600 lines: `AgentClient` multiplexes every request over one
socket without a thread of its own, and every public call (run, files, ping) shares the
same reading, deadline and abort machinery; the framing and messages already live in
protocol.py and messages.py, the output caps in output.py.
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NoReturn, TypeVar

from .errors import (
    AgentError,
    AgentFileTooLarge,
    AgentProtocolError,
    AgentRemoteError,
    AgentTimeout,
    CommandFailed,
)
from .messages import (
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
    Stdout,
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
    CAP_CWD,
    CAP_ENV,
    CAP_EXEC,
    CAP_FILES,
    CAP_KILL,
    CAP_SEED,
    CAP_SHELL,
    CAP_STDIN,
    CAP_TIMEOUT,
    CAP_USER,
    MAX_FRAME,
    MIN_FRAME,
    PROTOCOL_VERSION,
    SIGKILL,
    Frame,
    FrameDecoder,
    MsgType,
    encode_frame,
)
from .result import Command, RunResult

#: Seconds a command may run when `AgentClient.run` is given no timeout (the
#: plugin's ``--supermachine-run-timeout`` changes it for a session): a hung
#: guest must end in `AgentTimeout`, never hang the caller.
DEFAULT_RUN_TIMEOUT = 300.0

#: Bytes `AgentClient.read_file` accepts by default before it refuses the file.
DEFAULT_READ_LIMIT = 128 * 1024 * 1024


def check_run_timeout(timeout: float) -> float:
    """A run timeout as seconds > 0 (``math.inf``: no limit), or ValueError naming the problem."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(
            f"a run timeout must be a number of seconds > 0 (math.inf for none), got {timeout!r}"
        )
    return float(timeout)


def _fs(value: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> bytes:
    return os.fsencode(value)


_T = TypeVar("_T")


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
    ``run_timeout`` — the timeout of a `run` given none (`DEFAULT_RUN_TIMEOUT`).
    ``output_limit`` — bytes of each output stream a `run` keeps by default
    (`DEFAULT_OUTPUT_LIMIT`; ``None`` keeps everything).
    ``handshake`` — False leaves the handshake to a later `handshake()` call
    (so the owner can register the client before waiting on the guest).

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
        run_timeout: float = DEFAULT_RUN_TIMEOUT,
        output_limit: int | None = DEFAULT_OUTPUT_LIMIT,
        handshake: bool = True,
    ) -> None:
        check_output_limit(output_limit)
        self._sock = sock
        sock.setblocking(False)
        self.timeout = timeout
        self.kill_grace = kill_grace
        self.run_timeout = check_run_timeout(run_timeout)
        self.output_limit = output_limit
        self._console_tail = console_tail
        self._decoder = FrameDecoder(MAX_FRAME)
        self._cv = threading.Condition(threading.Lock())
        self._send_lock = threading.Lock()
        self._requests: dict[int, _Request] = {}
        self._posted: dict[int, str] = {}  # request id -> what it does, for an ERROR answer
        self._posted_error: AgentError | None = None  # a posted request's failure, not yet raised
        self._reading = False
        self._failed: tuple[type[AgentError], str, str] | None = None
        self._next_id = 1
        self.agent: Hello = Hello(max_inflight=1, max_frame=MIN_FRAME, software=b"(no handshake)")
        self._slots = threading.BoundedSemaphore(1)
        self._handshaken = False
        if handshake:
            self.handshake()

    # --------------------------------------------------------------- lifecycle

    def handshake(self, timeout: float | None = None) -> None:
        """Exchange HELLOs (within ``timeout``, else the client's ``timeout``); learn the agent."""
        deadline = self._deadline(self.timeout if timeout is None else timeout)
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
        self._handshaken = True

    def session_state(self) -> dict[str, object] | None:
        """What `resume_session` needs to continue this connection elsewhere, or None.

        None unless the client is between exchanges: handshaken, not failed, no
        request open, nothing half-read and nothing unread on the socket. The state
        is the agent's HELLO and the next request id: the guest keeps the rest of the
        session (its own side) in its RAM. Answers to posted requests that have
        already arrived are taken first (without waiting for any that have not).
        """
        self._take_arrived_answers()
        with self._cv:
            if (
                self._failed is not None
                or self._posted_error is not None
                or self._requests
                or self._reading
                or self._decoder.buffered
                or not self._handshaken
            ):
                return None
            try:
                self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                return None
            else:
                return None  # bytes (or EOF) nobody has read
            return {"hello": self.agent.encode_payload(), "next_id": self._next_id}

    def resume_session(self, state: dict[str, object]) -> None:
        """Continue a session from `session_state()` instead of a handshake.

        The socket must be the same connection as the guest sees it (a carried vsock
        connection restored with the guest's RAM). Raises `AgentProtocolError` for a
        state `session_state` could not have produced.
        """
        hello, next_id = state.get("hello"), state.get("next_id")
        if not isinstance(hello, bytes) or type(next_id) is not int:
            raise AgentProtocolError(f"an agent session state of {sorted(state)}")
        if not 1 <= next_id <= 0xFFFFFFFF:
            raise AgentProtocolError(f"an agent session's next request id {next_id}")
        msg = Hello.decode(hello)
        if msg.version != PROTOCOL_VERSION or msg.max_inflight < 1:
            raise AgentProtocolError(
                f"an agent session of protocol version {msg.version}, "
                f"max_inflight {msg.max_inflight}"
            )
        self.agent = msg
        self._slots = threading.BoundedSemaphore(msg.max_inflight)
        self._next_id = next_id
        self._handshaken = True

    def _take_arrived_answers(self) -> None:
        """Read what is on the socket now, if nobody else is reading, without waiting."""
        with self._cv:
            if not self._posted or self._reading or self._failed is not None:
                return
            self._reading = True
        try:
            while self._posted and self._poll(select.POLLIN, 0):
                self._read_some()
        except AgentError:
            pass  # the client is failed now; session_state sees it
        finally:
            self._release_reader()

    def close(self) -> None:
        """Close the connection; calls in progress fail with AgentError."""
        with self._cv:
            if self._failed is None:
                self._failed = (AgentError, "the agent connection was closed by the host", "")
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

    def seed(
        self,
        seed: bytes,
        wall_ns: int = 0,
        *,
        reseed: bool = False,
        timeout: float | None = None,
        wait: bool = True,
    ) -> None:
        """Send SEED: the agent mixes ``seed`` into the guest's randomness and sets its clock.

        ``wall_ns`` (nanoseconds since the epoch; 0 leaves the clock alone) becomes the
        guest's ``CLOCK_REALTIME``. Returns once the agent has applied both. An agent
        applies a SEED before it reads the next frame (docs/agent-protocol.md), so every
        request sent later sees it either way; ``wait=False`` therefore only sends it
        (see `settle`): its answer is taken by whichever call reads next, and an ERROR
        answer fails that call. `AgentError` if the agent has no `CAP_SEED`.
        """
        self._require(CAP_SEED, "seeding its randomness")
        deadline = self._deadline(self.timeout if timeout is None else timeout)
        message = Seed(bytes(seed), wall_ns, reseed)
        if wait:
            self._file_request(message, "seed the guest", deadline)
        else:
            self._post(message, "seed the guest", deadline)

    def settle(self, timeout: float | None = None) -> None:
        """Wait (within ``timeout``, else the client's) for the answers of posted requests.

        Raises the first posted request's failure not raised yet (`AgentRemoteError`),
        `AgentTimeout` if an answer does not come in time.
        """
        deadline = self._deadline(self.timeout if timeout is None else timeout)
        self._wait_until(lambda: True if not self._posted else None, deadline, "posted answers")

    def run(
        self,
        cmd: Command,
        *,
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        input: bytes | str | None = None,
        check: bool = False,
        stdout: OutputSink | None = None,
        stderr: OutputSink | None = None,
        output_limit: int | DefaultLimit | None = DEFAULT,
        user: RunAs | None = None,
    ) -> RunResult:
        """Run a command in the guest and wait for it.

        ``cmd`` as a string is a command line the agent interprets (``/bin/sh
        -c`` on Linux, a built-in in the microguest); as a sequence it is an
        argv. ``timeout`` (seconds) is enforced by the agent, which kills the
        command and reports ``timed_out=True``; if the agent does not report
        within ``timeout + kill_grace`` the host sends KILL and raises
        `AgentTimeout`. ``timeout=None`` means the client's ``run_timeout``
        (`DEFAULT_RUN_TIMEOUT` unless set; an agent without timeouts is then
        only bounded by the host); only ``math.inf`` waits forever.
        ``input`` is fed as stdin, otherwise stdin is empty.
        ``check=True`` raises `CommandFailed` unless the result is ``ok``.
        Raises `AgentRemoteError` when the command cannot be started.

        Output: each of stdout and stderr is kept up to ``output_limit`` bytes
        (the client's ``output_limit`` when not given, `DEFAULT_OUTPUT_LIMIT`
        unless set; ``None`` keeps everything); the rest is read and dropped,
        and the result's ``stdout_truncated``/``stderr_truncated`` say so.
        ``stdout=``/``stderr=`` a binary file or a callable streams that output
        there, chunk by chunk as it arrives, instead of keeping it (no limit
        applies; the result's field is empty). If a sink raises, the command is
        killed and the exception propagates.

        ``user`` runs the command with that uid, gid and supplementary groups
        instead of the agent's own (root); an agent without `CAP_USER` (the
        microguest) is refused before anything is sent.
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
        limit = self.output_limit if isinstance(output_limit, DefaultLimit) else output_limit
        check_output_limit(limit)
        out = OutputCapture(stdout, limit)
        err = OutputCapture(stderr, limit)
        self._require(CAP_EXEC, "running commands")
        if shell:
            self._require(CAP_SHELL, "command lines (pass an argv list instead)")
        if stdin is not None:
            self._require(CAP_STDIN, "stdin")
        if env_entries:
            self._require(CAP_ENV, "environment variables")
        if cwd is not None:
            self._require(CAP_CWD, "a working directory")
        if user is not None:
            self._require(CAP_USER, "running a command as another user")
        explicit = timeout is not None
        timeout = check_run_timeout(self.run_timeout if timeout is None else timeout)
        timeout_ms = 0
        if explicit and timeout != math.inf:
            self._require(CAP_TIMEOUT, "timeouts")
        if timeout != math.inf and self.agent.capabilities & CAP_TIMEOUT:
            timeout_ms = max(1, min(int(timeout * 1000), 0xFFFFFFFF))
        msg = Exec(
            argv,
            env_entries,
            _fs(cwd) if cwd is not None else b"",
            timeout_ms,
            stdin is not None,
            shell,
            user,
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
            deadline = self._deadline(timeout + self.kill_grace)
            try:
                self._send(encode_frame(MsgType.EXEC, rid, payload), deadline)
                if stdin is not None:
                    self._send_stdin(rid, stdin, deadline)
                while True:
                    m = self._expect(rid, deadline, f"the end of guest command {shown}")
                    if isinstance(m, Stdout):
                        out.take(m.data)
                    elif isinstance(m, Stderr):
                        err.take(m.data)
                    elif isinstance(m, Exit):
                        break
                    else:
                        self._fail(AgentProtocolError, f"unexpected {type(m).__name__} for EXEC")
            except (AgentRemoteError, AgentProtocolError):
                raise
            except BaseException:  # timed out, or a sink failed: the command must not linger
                if self.agent.capabilities & CAP_KILL and not self.closed:
                    with contextlib.suppress(AgentError):
                        self._send(Kill(SIGKILL).frame(rid), self._deadline(1.0))
                raise
        result = RunResult(
            returncode=-m.status if m.signaled else m.status,
            stdout=out.value(),
            stderr=err.value(),
            duration=m.duration_ns / 1e9,
            timed_out=m.timed_out,
            signal=m.status if m.signaled else None,
            stdout_truncated=out.truncated,
            stderr_truncated=err.truncated,
        )
        if check and not result.ok:
            raise CommandFailed(shown, result)
        return result

    def write_file(
        self,
        path: str | os.PathLike[str],
        data: bytes,
        mode: int = 0o644,
        *,
        timeout: float | None = None,
    ) -> None:
        """Create or truncate ``path`` in the guest with ``data`` (split across frames as needed).

        The whole transfer must finish within ``timeout`` seconds (the client's
        ``timeout`` when not given), else `AgentTimeout`.
        """
        self._require(CAP_FILES, "file transfer")
        bpath = _fs(path)
        if not bpath or b"\0" in bpath:
            raise ValueError(f"invalid guest path {path!r}")
        if mode & ~0o7777:
            raise ValueError(f"mode {mode:#o} has bits outside 0o7777")
        room = self.agent.max_frame - PutFile.OVERHEAD - len(bpath)
        if room < 1:
            raise ValueError(f"guest path of {len(bpath)} bytes does not fit in a frame")
        deadline = self._deadline(self.timeout if timeout is None else timeout)
        view = memoryview(data)
        offset = 0
        while True:
            chunk = bytes(view[offset : offset + room])
            put = PutFile(bpath, chunk, mode, append=offset > 0)
            self._file_request(put, f"write {path}", deadline)
            offset += len(chunk)
            if offset >= len(view):
                break

    def read_file(
        self,
        path: str | os.PathLike[str],
        *,
        timeout: float | None = None,
        limit: int | None = DEFAULT_READ_LIMIT,
    ) -> bytes:
        """The contents of ``path`` in the guest; `AgentRemoteError` (with errno) if unreadable.

        The whole file must arrive within ``timeout`` seconds (the client's
        ``timeout`` when not given), else `AgentTimeout`; a file longer than
        ``limit`` bytes (`DEFAULT_READ_LIMIT`; ``None`` for no limit) raises
        `AgentFileTooLarge` as soon as the limit is passed, so a guest cannot
        make the host hold more than that.
        """
        self._require(CAP_FILES, "file transfer")
        check_output_limit(limit)
        bpath = _fs(path)
        if not bpath or b"\0" in bpath:
            raise ValueError(f"invalid guest path {path!r}")
        parts: list[bytes] = []
        size = 0
        with self._request() as rid:
            deadline = self._deadline(self.timeout if timeout is None else timeout)
            self._send(GetFile(bpath).frame(rid), deadline)
            while True:
                m = self._expect(rid, deadline, f"the contents of {path}", f"read {path}")
                if not isinstance(m, FileData):
                    self._fail(AgentProtocolError, f"GET_FILE answered with {m!r}")
                assert isinstance(m, FileData)
                size += len(m.data)
                if limit is not None and size > limit:
                    raise AgentFileTooLarge(
                        f"guest file {path} is larger than the read limit of {limit} bytes: "
                        "pass read_file(..., limit=N) (None for no limit) to read it"
                    )
                parts.append(m.data)
                if not m.more:
                    return b"".join(parts)

    # --------------------------------------------------------------- requests

    def _require(self, cap: int, what: str) -> None:
        if not self.agent.capabilities & cap:
            raise AgentError(f"the guest agent {self.agent.name!r} does not support {what}")

    def _file_request(self, msg: Message, what: str, deadline: float | None) -> None:
        with self._request() as rid:
            self._send(msg.frame(rid), deadline)
            m = self._expect(rid, deadline, f"the answer to {what}", what)
            if not isinstance(m, Ok):
                self._fail(AgentProtocolError, f"{what}: answered with {m!r}")

    def _post(self, msg: Message, what: str, deadline: float | None) -> None:
        """Send a request whose only answer is OK or ERROR, without waiting for it.

        The request keeps its id and inflight slot until the answer is read (`_read_some`
        settles it). One slot always stays free for a call that waits, so posting never
        starves one: with the agent's slots all but used up, the posted answers are
        awaited first.
        """
        with self._cv:
            crowded = len(self._posted) + 1 >= self.agent.max_inflight
        if crowded:
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            self.settle(remaining)
        rid = self._open()
        with self._cv:
            self._posted[rid] = what
        try:
            self._send(msg.frame(rid), deadline)
        except BaseException:
            with self._cv:
                self._posted.pop(rid, None)
            self._close_request(rid)
            raise
        if self.agent.max_inflight == 1:  # no slot to spare for the next call
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            self.settle(remaining)

    def _settle_posted(self, rid: int, frame: Frame) -> str | None:
        """A posted request's answer arrived: close it; keep an ERROR to raise. Holds ``_cv``.

        Returns what is wrong with an answer that is neither OK nor ERROR: a protocol
        error, which fails the connection (as for a request that waits, `_file_request`).
        """
        what = self._posted.pop(rid)
        del self._requests[rid]
        self._slots.release()
        if frame.type == MsgType.OK:
            return None
        try:
            msg = decode_message(frame)
        except AgentProtocolError as exc:
            return f"{what}: {exc}"
        if not isinstance(msg, Error):
            return f"{what}: answered with {msg!r}"
        if self._posted_error is None:
            self._posted_error = AgentRemoteError(what, msg.errno, msg.text)
        return None

    def _raise_posted_error(self) -> None:
        """Raise (once) a posted request's failure. Holds ``_cv``."""
        error, self._posted_error = self._posted_error, None
        if error is not None:
            raise error

    def _request(self) -> _RequestSlot:
        return _RequestSlot(self)

    def _open(self) -> int:
        self._slots.acquire()
        with self._cv:
            if self._failed is not None or self._posted_error is not None:
                self._slots.release()
                if self._failed is not None:
                    self._raise_failed()
                self._raise_posted_error()
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
        if timeout is None or timeout == math.inf:
            return None
        return time.monotonic() + timeout

    def _timeout_error(self, waiting_for: str) -> AgentTimeout:
        tail = ""
        if self._console_tail is not None:
            try:
                tail = self._console_tail()
            except Exception as exc:  # a broken tail provider must not hide the timeout
                tail = f"(console tail unavailable: {exc})"
        return AgentTimeout(f"timed out waiting for {waiting_for} from the guest agent", tail)

    def _fail(self, cls: type[AgentError], message: str, console_tail: str = "") -> NoReturn:
        """Mark the connection dead (first reason wins), wake everyone, raise."""
        with self._cv:
            if self._failed is None:
                self._failed = (cls, message, console_tail)
            self._cv.notify_all()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._raise_failed()  # the first reason, which may be another thread's

    def abort(self, cls: type[AgentError], message: str, console_tail: str = "") -> None:
        """Fail every pending and future call with `cls(message)` (from any thread).

        With a ``console_tail``, ``cls`` must take it as its second argument (a
        `ConsoleTailError`, such as `AgentGuestStopped`).
        """
        with contextlib.suppress(AgentError):
            self._fail(cls, message, console_tail)

    def _raise_failed(self) -> NoReturn:
        assert self._failed is not None
        cls, message, console_tail = self._failed
        if console_tail:
            raise cls(message, console_tail)  # type: ignore[call-arg]
        raise cls(message)

    def _wait(self, rid: int, deadline: float | None, waiting_for: str) -> Frame:
        """Block until a frame for ``rid`` arrives, reading the socket if nobody else is."""
        frames = self._requests[rid].frames
        return self._wait_until(lambda: frames.popleft() if frames else None, deadline, waiting_for)

    def _wait_until(
        self, take: Callable[[], _T | None], deadline: float | None, waiting_for: str
    ) -> _T:
        """Block until ``take()`` (called holding ``_cv``) gives a value, reading if nobody is.

        A posted request's failure read meanwhile is raised here: the call that
        follows a posted request learns that it failed.
        """
        while True:
            with self._cv:
                while True:
                    self._raise_posted_error()
                    value = take()
                    if value is not None:
                        return value
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
                self._release_reader()

    def _release_reader(self) -> None:
        """Give up the reader role (taken by setting ``_reading`` under ``_cv``); wake waiters."""
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
        broken: str | None = None
        with self._cv:
            for frame in frames:
                req = self._requests.get(frame.request_id)
                if frame.request_id in self._posted:
                    broken = self._settle_posted(frame.request_id, frame) or broken
                elif req is not None:
                    req.frames.append(frame)
                elif frame.request_id == 0:
                    hangup = frame
                    break
                # else: a late frame of a request we gave up on; dropped
            self._cv.notify_all()
        if broken is not None:
            self._fail(AgentProtocolError, broken)
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
                        self._release_reader()
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
