"""Reference guest agent in Python: the executable spec of docs/agent-protocol.md.

Tests use it to exercise `AgentClient` without a VM: ``AgentPeer(sock)``
serves the guest side of one connection (usually the other end of a
``socket.socketpair()``) from a background thread. Its behaviour is what the
two C agents (microguest, Linux) must match for the built-ins they share:

    echo ARGS...   ARGS joined by spaces and a newline on stdout, exit 0
    true / false   exit 0 / exit 1
    exit N         exit N (0..255)
    cat            copy stdin to stdout until STDIN_EOF
    sleep MS       wait MS milliseconds (KILL and timeouts interrupt it)
    rand [N]       N (default 1, at most 64) numbers of the agent's generator, each
                   16 hex digits on a line; SEED sets its state (`P.seed_state`),
                   and each number is one `P.splitmix64` step

Test-only extras (no C agent needs them): ``err ARGS`` (like echo, on
stderr), ``emit N`` (N bytes of output in 64 KiB chunks), ``env`` (the EXEC's
env entries, one a line), ``pwd`` (the EXEC's cwd), ``signal N`` (ends as if
killed by signal N), ``hang`` (never answers, ignores KILL and timeouts: a hung
guest). An unknown command is ``ERROR ENOENT``, like a failed ``execve``.
Files live in a dict (`AgentPeer.files`); the last SEED's wall clock in
`AgentPeer.wall_ns`; ``seed_answer`` answers every SEED with that message instead
(an ERROR: a guest that cannot take it; anything else: a broken agent).
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass, field

from pytest_supermachine.vmm import agent as P

SOFTWARE = b"python-agent-peer 1"


@dataclass
class _Proc:
    rid: int
    exec: P.Exec
    stdin: queue.Queue[bytes | None] = field(default_factory=queue.Queue)
    killed: threading.Event = field(default_factory=threading.Event)
    kill_signal: int = 0
    timed_out: bool = False


class AgentPeer:
    """Serve the guest side of the protocol on ``sock`` (ownership passes to the peer)."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        version: int = P.PROTOCOL_VERSION,
        capabilities: int = P.CAP_ALL | P.CAP_SEED,
        max_frame: int = 64 * 1024,
        max_inflight: int = 8,
        software: bytes = SOFTWARE,
        files: dict[bytes, tuple[int, bytes]] | None = None,
        seed_answer: P.Message | None = None,
    ) -> None:
        self.sock = sock
        sock.setblocking(True)
        self.hello = P.Hello(version, capabilities, max_frame, max_inflight, software)
        self.files: dict[bytes, tuple[int, bytes]] = files if files is not None else {}
        self.host_hello: P.Hello | None = None
        self.received: list[P.Frame] = []  # every frame, for tests that inspect the wire
        self.error: BaseException | None = None
        self._procs: dict[int, _Proc] = {}
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name="agent-peer", daemon=True)
        self._closed = False
        self.rng_state = 0
        self.wall_ns = 0
        self.seed_answer = seed_answer  # given: every SEED is answered with it, not applied

    def start(self) -> AgentPeer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._closed = True
        for proc in list(self._procs.values()):
            proc.killed.set()
            proc.stdin.put(None)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)
        self.sock.close()

    # ----------------------------------------------------------------- wire

    def send(self, msg: P.Message, rid: int) -> None:
        self.send_raw(msg.frame(rid))

    def send_raw(self, data: bytes) -> None:
        # OSError: the host went away; the reader notices
        with self._send_lock, contextlib.suppress(OSError):
            self.sock.sendall(data)

    def _hangup(self, message: str) -> None:
        self.send(P.Error(errno.EPROTO, message.encode()), 0)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def _serve(self) -> None:
        decoder = P.FrameDecoder(self.hello.max_frame)
        try:
            while not self._closed:
                data = self.sock.recv(256 * 1024)
                if not data:
                    decoder.close()
                    return
                for frame in decoder.feed(data):
                    self.received.append(frame)
                    if not self._handle(frame):
                        return
        except P.AgentProtocolError as exc:
            self.error = exc
            self._hangup(str(exc))
        except OSError as exc:
            self.error = exc
        finally:
            for proc in list(self._procs.values()):
                proc.killed.set()
                proc.stdin.put(None)

    def _handle(self, frame: P.Frame) -> bool:
        msg = P.decode_message(frame)
        rid = frame.request_id
        if self.host_hello is None:
            if not isinstance(msg, P.Hello) or isinstance(msg, P.Ready) or rid != 0:
                raise P.AgentProtocolError(f"expected HELLO first, got {frame!r}")
            if msg.version != self.hello.version:
                self._hangup(
                    f"agent speaks protocol version {self.hello.version}, host {msg.version}"
                )
                return False
            self.host_hello = msg
            self.send(self.hello, 0)
            return True
        if isinstance(msg, (P.Stdin, P.StdinEof, P.Kill)):
            proc = self._procs.get(rid)
            if proc is not None:  # unknown or finished: ignored (§4)
                if isinstance(msg, P.Stdin):
                    proc.stdin.put(msg.data)
                elif isinstance(msg, P.StdinEof):
                    proc.stdin.put(None)
                else:
                    proc.kill_signal = msg.signal
                    proc.killed.set()
            return True
        if not isinstance(msg, (P.Exec, P.Ping, P.PutFile, P.GetFile, P.Seed)):
            raise P.AgentProtocolError(f"{type(msg).__name__} is not a host request")
        with self._lock:
            if rid == 0 or rid in self._procs:
                raise P.AgentProtocolError(f"request id {rid} is 0 or still open")
        if isinstance(msg, P.Ping):
            self.send(P.Pong(msg.data), rid)
        elif isinstance(msg, P.Seed) and self.seed_answer is not None:
            self.send(self.seed_answer, rid)
        elif isinstance(msg, P.Seed):
            with self._lock:
                self.rng_state = P.seed_state(msg.seed)
                if msg.wall_ns:
                    self.wall_ns = msg.wall_ns
            self.send(P.Ok(), rid)
        elif isinstance(msg, P.PutFile):
            self._put(rid, msg)
        elif isinstance(msg, P.GetFile):
            self._get(rid, msg)
        else:
            with self._lock:
                if len(self._procs) >= self.hello.max_inflight:
                    self.send(P.Error(errno.EBUSY, b"too many requests"), rid)
                    return True
                proc = _Proc(rid, msg)
                self._procs[rid] = proc
            threading.Thread(target=self._run, args=(proc,), daemon=True).start()
        return True

    # ----------------------------------------------------------------- files

    def _put(self, rid: int, msg: P.PutFile) -> None:
        if msg.append:
            if msg.path not in self.files:
                self.send(P.Error(errno.ENOENT, b"no such file"), rid)
                return
            mode, old = self.files[msg.path]
            self.files[msg.path] = (mode, old + msg.data)
        else:
            mode = self.files.get(msg.path, (msg.mode, b""))[0]
            self.files[msg.path] = (mode, msg.data)
        self.send(P.Ok(), rid)

    def _get(self, rid: int, msg: P.GetFile) -> None:
        if msg.path not in self.files:
            self.send(P.Error(errno.ENOENT, b"No such file or directory"), rid)
            return
        data = self.files[msg.path][1]
        assert self.host_hello is not None
        room = min(self.host_hello.max_frame, self.hello.max_frame) - 4
        for off in range(0, max(len(data), 1), room):
            chunk = data[off : off + room]
            self.send(P.FileData(chunk, more=off + room < len(data)), rid)

    # ----------------------------------------------------------------- exec

    def _out(self, proc: _Proc, data: bytes, stream: type[P.Message] = P.Stdout) -> None:
        room = 64 * 1024
        for off in range(0, len(data), room):
            self.send(stream(data[off : off + room]), proc.rid)  # type: ignore[call-arg]

    def _wait(self, proc: _Proc, seconds: float) -> bool:
        """Sleep unless killed; True if the sleep completed."""
        return not proc.killed.wait(seconds)

    def _run(self, proc: _Proc) -> None:
        ex = proc.exec
        start = time.monotonic_ns()
        argv = ex.argv[0].split() if ex.shell else list(ex.argv)
        name = os.path.basename(argv[0]).decode() if argv else ""
        args = argv[1:]
        timer = None
        if ex.timeout_ms and name != "hang":

            def expire() -> None:
                proc.timed_out = True
                proc.kill_signal = 9
                proc.killed.set()
                proc.stdin.put(None)

            timer = threading.Timer(ex.timeout_ms / 1000, expire)
            timer.daemon = True
            timer.start()
        status, signaled = 0, False
        try:
            if name == "echo":
                self._out(proc, b" ".join(args) + b"\n")
            elif name == "err":
                self._out(proc, b" ".join(args) + b"\n", P.Stderr)
            elif name == "true":
                pass
            elif name == "false":
                status = 1
            elif name == "exit":
                status = int(args[0]) & 0xFF if args else 0
            elif name == "signal":
                status, signaled = int(args[0]), True
            elif name == "emit":
                n = int(args[0])
                block = bytes(range(256)) * 256
                while n > 0 and not proc.killed.is_set():
                    self._out(proc, block[: min(n, len(block))])
                    n -= len(block)
            elif name == "env":
                self._out(proc, b"".join(e + b"\n" for e in ex.env))
            elif name == "pwd":
                self._out(proc, ex.cwd + b"\n")
            elif name == "cat":
                if ex.stdin:
                    while True:
                        chunk = proc.stdin.get()
                        if chunk is None or proc.killed.is_set():
                            break
                        self._out(proc, chunk)
            elif name == "rand":
                count = int(args[0]) if args else 1
                if not 1 <= count <= 64:
                    raise ValueError(f"count {count} is outside 1..64")
                lines = []
                with self._lock:
                    for _ in range(count):
                        self.rng_state, value = P.splitmix64(self.rng_state)
                        lines.append(b"%016x\n" % value)
                self._out(proc, b"".join(lines))
            elif name == "sleep":
                self._wait(proc, int(args[0]) / 1000 if args else 0)
            elif name == "hang":
                return  # never answers: the request stays open forever
            else:
                self.send(P.Error(errno.ENOENT, b"No such file or directory: " + argv[0]), proc.rid)
                with self._lock:
                    del self._procs[proc.rid]
                return
        except (ValueError, IndexError) as exc:
            self._out(proc, f"{name}: {exc}\n".encode(), P.Stderr)
            status = 2
        finally:
            if timer is not None:
                timer.cancel()
        if proc.killed.is_set() and proc.kill_signal:
            status, signaled = proc.kill_signal, True
        with self._lock:
            del self._procs[proc.rid]
        self.send(P.Exit(status, signaled, proc.timed_out, time.monotonic_ns() - start), proc.rid)


def peer_pair(**kwargs: object) -> tuple[socket.socket, AgentPeer]:
    """A connected (host socket, running AgentPeer) pair over a socketpair."""
    host, guest = socket.socketpair()
    peer = AgentPeer(guest, **kwargs).start()  # type: ignore[arg-type]
    return host, peer
