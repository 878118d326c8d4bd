"""The Linux guest agent (pytest_supermachine/guest/agent) run as a host process.

The real static binary listens on a Unix socket in a tmp dir instead of vsock
(``--listen unix:PATH``) and announces itself on another (``--ready``);
`AgentClient` drives it exactly as the VMM does over vsock. The shapes follow
tests/unit/test_agent_protocol.py (which runs the Python reference agent), plus
what only a real agent has: processes, process groups, files, backpressure.
Needs gcc (static glibc), not KVM.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import socket
import stat
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_supermachine.errors import GuestBuildError
from pytest_supermachine.guest.agent import build as agent_build
from pytest_supermachine.guest.agent import initramfs as irf
from pytest_supermachine.vmm import agent as P
from pytest_supermachine.vmm.agent import (
    AgentClient,
    AgentProtocolError,
    AgentRemoteError,
    Frame,
    FrameDecoder,
    MsgType,
)
from tests.environment import needs
from tests.waiting import wait_until

pytestmark = [
    pytest.mark.unit,
    pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build the agent"),
]

AGENT_MAX_FRAME = 1 << 20


# ----------------------------------------------------------------------------- harness


@pytest.fixture(scope="module")
def agent_bin() -> Path:
    return agent_build.build_agent()


class AgentProcess:
    """The agent binary serving a Unix socket; `connect` gives handshaken clients."""

    def __init__(self, binary: Path, workdir: Path, extra_env: dict[str, str] | None = None):
        self.workdir = workdir
        self.sock_path = workdir / "agent.sock"
        ready_path = workdir / "ready.sock"
        ready = socket.socket(socket.AF_UNIX)
        ready.bind(str(ready_path))
        ready.listen(1)
        ready.settimeout(10)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/home/agent-test"}
        env.update(extra_env or {})
        self.proc = subprocess.Popen(
            [
                str(binary),
                "--listen",
                f"unix:{self.sock_path}",
                "--ready",
                f"unix:{ready_path}",
                "--cwd",
                str(workdir),
            ],
            env=env,
            stderr=subprocess.PIPE,
        )
        try:
            conn, _ = ready.accept()  # READY arrives only once the listener is up
        finally:
            ready.close()
        with conn:
            self.ready = P.read_ready(conn, timeout=10)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def connect(self, timeout: float = 10.0) -> AgentClient:
        return AgentClient(self.raw_socket(), timeout=timeout, kill_grace=5.0)

    def raw_socket(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(self.sock_path))
        return s

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> str:
        if self.alive():
            self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err.decode(errors="replace")


@pytest.fixture(scope="module")
def agent(agent_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    a = AgentProcess(agent_bin, tmp_path_factory.mktemp("agent"), {"SM_BASE": "base"})
    yield a
    a.stop()


@pytest.fixture
def client(agent: AgentProcess) -> Iterator[AgentClient]:
    c = agent.connect()
    yield c
    c.close()
    assert agent.alive(), "the agent died"


class Raw:
    """A byte-level connection, for what AgentClient refuses to send."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = FrameDecoder()
        self.pending: list[Frame] = []
        self.stash: dict[int, list[Frame]] = {}

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def hello(self, **kwargs: object) -> P.Hello:
        self.send(P.Hello(**kwargs).frame(0))  # type: ignore[arg-type]
        frame = self.next()
        assert frame is not None and frame.type == MsgType.HELLO
        msg = P.decode_message(frame)
        assert isinstance(msg, P.Hello)
        return msg

    def next(self, timeout: float = 10.0) -> Frame | None:
        """The next frame, or None at EOF."""
        deadline = time.monotonic() + timeout
        while not self.pending:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(1 << 20)
            except ConnectionResetError:
                data = b""
            if not data:
                self.decoder.close()
                return None
            self.pending += self.decoder.feed(data)
        return self.pending.pop(0)

    def until(self, rid: int, end: tuple[int, ...] = (MsgType.EXIT, MsgType.ERROR)) -> list[Frame]:
        """Frames of request ``rid`` up to and including its last one (others are kept)."""
        got = []
        while True:
            stash = self.stash.get(rid)
            f = stash.pop(0) if stash else self.next()
            assert f is not None, f"connection closed; got {got}"
            if f.request_id != rid:
                self.stash.setdefault(f.request_id, []).append(f)
                continue
            got.append(f)
            if f.type in end:
                return got

    def expect_hangup(self) -> P.Error:
        """The agent's protocol-error answer: one ERROR on request 0, then EOF."""
        frames = []
        while (f := self.next()) is not None:
            frames.append(f)
        assert frames and frames[-1].type == MsgType.ERROR and frames[-1].request_id == 0, frames
        err = P.decode_message(frames[-1])
        assert isinstance(err, P.Error)
        return err

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(agent: AgentProcess) -> Iterator[Raw]:
    r = Raw(agent.raw_socket())
    yield r
    r.close()
    assert agent.alive(), "the agent died"


def exec_frame(rid: int, *argv: str, shell: bool = False, **kw: object) -> bytes:
    return P.Exec(tuple(a.encode() for a in argv), shell=shell, **kw).frame(rid)  # type: ignore[arg-type]


def pid_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"  # a zombie is as good as gone
    except FileNotFoundError:
        return True


# ----------------------------------------------------------------------------- handshake, ready


def test_ready_frame_announces_the_agent(agent):
    assert agent.ready.software.startswith(b"sm-agent")
    assert agent.ready.version == P.PROTOCOL_VERSION


def test_ready_is_retried_until_the_host_listens(agent_bin, tmp_path):
    ready_path = tmp_path / "late-ready.sock"
    proc = subprocess.Popen(
        [
            str(agent_bin),
            "--listen",
            f"unix:{tmp_path / 'a.sock'}",
            "--ready",
            f"unix:{ready_path}",
        ],
        stderr=subprocess.PIPE,
    )
    err = b""
    try:
        os.set_blocking(proc.stderr.fileno(), False)
        deadline = time.monotonic() + 10
        while b"(retrying)" not in err:  # the first attempts find nobody
            assert time.monotonic() < deadline and proc.poll() is None, err
            with contextlib.suppress(BlockingIOError):
                err += os.read(proc.stderr.fileno(), 4096)
            time.sleep(0.02)
        os.set_blocking(proc.stderr.fileno(), True)
        ready = socket.socket(socket.AF_UNIX)
        ready.bind(str(ready_path))
        ready.listen(1)
        ready.settimeout(10)
        conn, _ = ready.accept()
        with conn:
            assert P.read_ready(conn, timeout=10).software.startswith(b"sm-agent")
        ready.close()
    finally:
        proc.kill()
        os.set_blocking(proc.stderr.fileno(), True)
        err += proc.communicate()[1]
    assert b"(retrying)" in err


def test_handshake_learns_the_agents_identity_and_limits(client):
    assert client.agent.capabilities == P.CAP_ALL | P.CAP_USER | P.CAP_SEED | P.CAP_TCP
    assert client.agent.max_inflight == 64
    assert client.agent.max_frame == AGENT_MAX_FRAME


def test_version_mismatch_is_refused_naming_both_versions(raw):
    raw.send(P.Hello(version=2).frame(0))
    err = raw.expect_hangup()
    assert err.errno == errno.EPROTO
    assert "version 1" in err.text and "host 2" in err.text


def test_anything_before_hello_is_a_protocol_error(raw):
    raw.send(exec_frame(1, "true"))
    assert "expected HELLO" in raw.expect_hangup().text


# ----------------------------------------------------------------------------- run


def test_run_returns_stdout_and_exit_code(client):
    r = client.run("echo hello world")
    assert (r.returncode, r.stdout, r.stderr) == (0, b"hello world\n", b"")
    assert r.ok and 0 < r.duration < 5


def test_run_with_an_argv_list_keeps_arguments_whole(client):
    assert client.run(["printf", "%s|", "a b", "c"]).stdout == b"a b|c|"


def test_argv_is_looked_up_in_path(client, agent):
    (agent.workdir / "bin").mkdir(exist_ok=True)
    tool = agent.workdir / "bin" / "sm-tool"
    tool.write_text("#!/bin/sh\necho tool $1\n")
    tool.chmod(0o755)
    r = client.run(["sm-tool", "x"], env={"PATH": f"{agent.workdir}/bin:/usr/bin:/bin"})
    assert r.stdout == b"tool x\n"


def test_nonzero_exit_is_not_ok(client):
    r = client.run("exit 3")
    assert (r.returncode, r.ok) == (3, False)


def test_a_signal_is_a_negative_returncode(client):
    r = client.run("kill -SEGV $$")
    assert (r.returncode, r.signal, r.timed_out) == (-11, 11, False)


def test_a_command_gets_sigpipe_back_at_its_default_though_the_agent_ignores_it(client):
    r = client.run("kill -PIPE $$; echo survived")
    assert (r.returncode, r.stdout) == (-13, b"")


def test_a_command_starts_with_no_signal_blocked_or_ignored(client):
    status = dict(
        line.split(":\t", 1)
        for line in client.run("cat /proc/self/status").stdout.decode().splitlines()
    )
    glibc_internal = 3 << 31  # signals 32 and 33: glibc's own, no program can set them
    blocked, ignored = int(status["SigBlk"], 16), int(status["SigIgn"], 16)
    assert (blocked, ignored & ~glibc_internal) == (0, 0)


def test_stderr_is_kept_apart_from_stdout(client):
    r = client.run("echo out; echo oops >&2")
    assert (r.stdout, r.stderr) == (b"out\n", b"oops\n")


def test_input_is_fed_as_stdin(client):
    assert client.run("cat", input=b"abc").stdout == b"abc"


def test_without_input_stdin_is_empty(client):
    r = client.run("cat; echo rc=$?")
    assert r.stdout == b"rc=0\n"


def test_large_stdin_streams_through_while_output_flows_back(client):
    data = bytes(range(256)) * 20000  # 5 MB: more than the pipe and socket buffers
    assert client.run("cat", input=data).stdout == data


def test_stdin_to_a_command_that_does_not_read_it_is_dropped(client):
    r = client.run("true", input=b"x" * 3_000_000)
    assert r.ok


def test_megabytes_of_stdout_arrive_whole(client):
    r = client.run("head -c 10000000 /dev/zero | tr '\\0' 'x'")
    assert r.stdout == b"x" * 10_000_000


def test_stdout_is_streamed_in_frames_not_buffered(raw):
    raw.hello()
    raw.send(exec_frame(1, "head -c 10000000 /dev/zero", shell=True))
    frames = raw.until(1)
    out = [f for f in frames if f.type == MsgType.STDOUT]
    assert sum(len(f.payload) for f in out) == 10_000_000
    assert max(len(f.payload) for f in out) <= 64 * 1024
    assert len(out) >= 10_000_000 // (64 * 1024)


def _descendant_named(ancestor: int, comm: str) -> int | None:
    """The pid of a live descendant of `ancestor` whose command name is `comm`, if any."""
    parents: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError):
            stat_line = (entry / "stat").read_text()
            name = stat_line[stat_line.index("(") + 1 : stat_line.rindex(")")]
            parents[int(entry.name)] = (
                int(stat_line[stat_line.rindex(")") + 2 :].split()[1]),
                name,
            )
    for pid, (ppid, name) in parents.items():
        if name != comm:
            continue
        while ppid in parents and ppid != ancestor:
            ppid = parents[ppid][0]
        if ppid == ancestor:
            return pid
    return None


def _wait_until_the_producer_stops(agent_pid: int, timeout: float = 60) -> None:
    """Until the agent's `head` has exited or written nothing for 0.5 s.

    Then the agent has taken all it was going to take while the host does not read:
    an agent without backpressure lets `head` write everything and exit.
    """
    deadline = time.monotonic() + timeout
    seen, written, still_since = False, -1, time.monotonic()
    while time.monotonic() < deadline:
        head = _descendant_named(agent_pid, "head")
        if head is None:
            if seen:
                return
        else:
            seen = True
            with contextlib.suppress(OSError):
                now = int(Path(f"/proc/{head}/io").read_text().split("wchar:")[1].split()[0])
                if now != written:
                    written, still_since = now, time.monotonic()
                elif time.monotonic() - still_since > 0.5:
                    return
        time.sleep(0.02)
    raise AssertionError("the agent's command kept writing with nobody reading")


def test_output_is_throttled_by_a_host_that_does_not_read(agent_bin, tmp_path):
    """Backpressure: 50 MB of output to a host that reads nothing costs the agent ~1 MB."""
    a = AgentProcess(agent_bin, tmp_path)
    try:
        r = Raw(a.raw_socket())
        r.hello()
        r.send(exec_frame(1, "head -c 50000000 /dev/zero", shell=True))
        _wait_until_the_producer_stops(a.pid)  # the command fills the pipe, the agent its queue

        def rss_kib() -> int:
            status = Path(f"/proc/{a.pid}/status").read_text()
            return int(status.split("VmHWM:")[1].split()[0])

        peak = rss_kib()
        frames = r.until(1)
        assert sum(len(f.payload) for f in frames if f.type == MsgType.STDOUT) == 50_000_000
        assert peak < 8 * 1024, f"agent peak RSS {peak} KiB while the host did not read"
        r.close()
    finally:
        a.stop()


def test_env_extends_and_overrides_the_agents_environment(client):
    r = client.run("echo $SM_BASE $HOME $A", env={"A": "1", "HOME": "/override"})
    assert r.stdout == b"base /override 1\n"
    assert client.run("echo $SM_BASE $HOME").stdout == b"base /home/agent-test\n"


def test_env_values_may_contain_equals(client):
    assert client.run("echo $B", env={"B": "x=y"}).stdout == b"x=y\n"


def test_cwd_is_honoured_and_defaults_to_the_agents(client, agent, tmp_path):
    assert client.run("pwd", cwd=str(tmp_path)).stdout == f"{tmp_path}\n".encode()
    assert client.run("pwd").stdout == f"{agent.workdir}\n".encode()


def test_a_missing_cwd_is_a_remote_error(client):
    with pytest.raises(AgentRemoteError) as info:
        client.run("true", cwd="/no/such/dir")
    assert info.value.errno == errno.ENOENT


def test_an_unknown_command_is_a_remote_error_with_errno(client):
    with pytest.raises(AgentRemoteError, match="ENOENT") as info:
        client.run(["no-such-command-xyz"])
    assert info.value.errno == errno.ENOENT


def test_a_non_executable_file_is_eacces(client, tmp_path):
    f = tmp_path / "data"
    f.write_text("not a program")
    with pytest.raises(AgentRemoteError) as info:
        client.run([str(f)])
    assert info.value.errno == errno.EACCES


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the agent changes user only as root")


@needs_root
def test_a_command_runs_as_the_user_with_its_groups(client):
    r = client.run("id -u; id -g; id -G", user=P.RunAs(65534, 65534, (100, 29)))
    assert r.stdout == b"65534\n65534\n65534 29 100\n", r


@needs_root
def test_the_cwd_is_entered_before_the_user_is_taken(client, tmp_path):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)  # nobody may not search it; as WorkingDir it still works
    r = client.run(["/bin/sh", "-c", "pwd; id -u"], cwd=str(private), user=P.RunAs(65534, 65534))
    assert r.stdout == f"{private}\n65534\n".encode(), r


@needs_root
def test_a_program_the_user_may_not_execute_is_eacces(client, tmp_path):
    tool = tmp_path / "root-only"
    tool.write_text("#!/bin/sh\necho ran\n")
    tool.chmod(0o700)
    with pytest.raises(AgentRemoteError) as info:
        client.run([str(tool)], user=P.RunAs(65534, 65534))
    assert info.value.errno == errno.EACCES
    assert client.run([str(tool)]).stdout == b"ran\n"  # as root it runs


def test_a_shell_line_that_fails_is_exit_127_not_an_error(client):
    r = client.run("no-such-command-xyz")
    assert r.returncode == 127 and b"not found" in r.stderr


def test_check_raises_command_failed_with_the_output_tails(client):
    with pytest.raises(P.CommandFailed, match="exited with status 1"):
        client.run("echo nope >&2; false", check=True)


# ----------------------------------------------------------------------------- timeouts, kill


def test_timeout_kills_the_command_and_reports_it(client):
    start = time.monotonic()
    r = client.run("sleep 100", timeout=0.2)
    assert r.timed_out and not r.ok
    assert (r.signal, r.returncode) == (9, -9)
    assert 0.15 < r.duration < 5 and time.monotonic() - start < 5


def test_timeout_kills_the_whole_process_group(client, tmp_path):
    pidfile = tmp_path / "bg.pid"
    r = client.run(f"sleep 100 & echo $! > {pidfile}; sleep 100", timeout=0.5)
    assert r.timed_out
    bg = int(pidfile.read_text())
    assert wait_until(lambda: pid_gone(bg)), "the background sleep survived the timeout"


def test_output_before_a_timeout_is_kept(client):
    r = client.run("echo started; sleep 100", timeout=0.3)
    assert r.timed_out and r.stdout == b"started\n"


def test_kill_sends_a_signal_to_the_group(raw, tmp_path):
    raw.hello()
    pidfile = tmp_path / "kill.pid"
    raw.send(exec_frame(5, f"sleep 100 & echo $! > {pidfile}; wait", shell=True))
    assert wait_until(lambda: pidfile.exists() and pidfile.read_text().strip() != "")
    raw.send(P.Kill(15).frame(5))
    (exit_frame,) = [f for f in raw.until(5) if f.type == MsgType.EXIT]
    ex = P.decode_message(exit_frame)
    assert ex == P.Exit(15, signaled=True, timed_out=False, duration_ns=ex.duration_ns)
    assert wait_until(lambda: pid_gone(int(pidfile.read_text())))


def test_stdin_and_kill_for_unknown_requests_are_ignored(raw):
    raw.hello()
    raw.send(P.Stdin(b"x").frame(77) + P.StdinEof().frame(77) + P.Kill(9).frame(77))
    raw.send(P.Ping(b"still").frame(1))
    (pong,) = raw.until(1, end=(MsgType.PONG,))
    assert pong.payload == b"still"


def test_a_background_process_does_not_hold_the_result(client):
    start = time.monotonic()
    r = client.run("sleep 30 >/dev/null 2>&1 & echo bg")
    assert r.ok and r.stdout == b"bg\n" and time.monotonic() - start < 10


def test_closing_the_connection_kills_its_commands(agent, tmp_path):
    r = Raw(agent.raw_socket())
    r.hello()
    pidfile = tmp_path / "orphan.pid"
    r.send(exec_frame(1, f"echo $$ > {pidfile}; sleep 100", shell=True))
    assert wait_until(lambda: pidfile.exists() and pidfile.read_text().strip() != "")
    r.close()
    assert wait_until(lambda: pid_gone(int(pidfile.read_text())))
    assert agent.alive()


# ----------------------------------------------------------------------------- concurrency


def test_64_concurrent_runs_are_multiplexed_on_one_connection(client):
    results: list[P.RunResult] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        # each waits until all 64 have started: in series the first would wait forever
        r = client.run(
            f"mkdir -p barrier; touch barrier/{i}; "
            "until [ $(ls barrier | wc -l) -ge 64 ]; do sleep 0.05; done; "
            f"echo {i}",
            timeout=120,
        )
        with lock:
            results.append(r)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not any(r.timed_out for r in results)
    assert sorted(int(r.stdout) for r in results) == list(range(64))


def test_concurrent_big_outputs_interleave_without_loss(client):
    """Many producers on one connection share the send queue and its backpressure."""
    results: dict[int, P.RunResult] = {}

    def one(i: int) -> None:
        results[i] = client.run(f"head -c {1_000_000 + i} /dev/zero | tr '\\0' '{i % 10}'")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == list(range(16))  # a thread that raised left its result out
    for i, r in results.items():
        assert r.stdout == str(i % 10).encode() * (1_000_000 + i)


def test_more_than_64_open_requests_get_ebusy(raw):
    raw.hello()
    for rid in range(1, 65):
        raw.send(exec_frame(rid, "sleep", "100"))
    raw.send(exec_frame(65, "true"))
    (err,) = raw.until(65)
    assert err.type == MsgType.ERROR and P.decode_message(err).errno == errno.EBUSY
    for rid in range(1, 65):
        raw.send(P.Kill(9).frame(rid))
    for rid in range(1, 65):
        assert raw.until(rid)[-1].type == MsgType.EXIT


def test_connections_come_and_go(agent):
    for _ in range(20):
        with agent.connect() as c:
            assert c.run(["true"]).ok
    a, b = agent.connect(), agent.connect()
    assert a.run("echo a").stdout == b"a\n" and b.run("echo b").stdout == b"b\n"
    a.close()
    assert b.run("echo still").stdout == b"still\n"
    b.close()


# ----------------------------------------------------------------------------- files, ping


def test_write_then_read_a_file_with_its_mode(client, tmp_path):
    path = tmp_path / "app.conf"
    client.write_file(str(path), b"mode=test\n", mode=0o600)
    assert path.read_bytes() == b"mode=test\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert client.read_file(str(path)) == b"mode=test\n"


def test_mode_is_exact_despite_the_umask(client, tmp_path):
    client.write_file(str(tmp_path / "x"), b"", mode=0o777)
    assert stat.S_IMODE((tmp_path / "x").stat().st_mode) == 0o777


def test_overwriting_keeps_the_existing_mode_and_truncates(client, tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"long old contents")
    path.chmod(0o640)
    client.write_file(str(path), b"new", mode=0o600)
    assert path.read_bytes() == b"new" and stat.S_IMODE(path.stat().st_mode) == 0o640


def test_files_larger_than_a_frame_are_split_and_joined(client, tmp_path):
    data = os.urandom(3 * AGENT_MAX_FRAME + 12345)
    client.write_file(str(tmp_path / "big"), data)
    assert (tmp_path / "big").read_bytes() == data
    assert client.read_file(str(tmp_path / "big")) == data


def test_get_file_streams_several_frames(raw, tmp_path):
    raw.hello()
    data = os.urandom(1_000_000)
    (tmp_path / "f").write_bytes(data)
    raw.send(P.GetFile(str(tmp_path / "f").encode()).frame(1))
    frames = []
    while True:
        msg = P.decode_message(raw.until(1, end=(MsgType.FILE_DATA, MsgType.ERROR))[-1])
        assert isinstance(msg, P.FileData)
        frames.append(msg)
        if not msg.more:
            break
    assert len(frames) > 1 and b"".join(m.data for m in frames) == data


def test_empty_files_work(client, tmp_path):
    client.write_file(str(tmp_path / "empty"), b"")
    assert client.read_file(str(tmp_path / "empty")) == b""


def test_proc_files_are_read_to_the_end(client):
    assert client.read_file("/proc/self/status").startswith(b"Name:")


@pytest.mark.parametrize(
    ("path", "code"),
    [("/no/such/file", errno.ENOENT), ("/", errno.EISDIR)],
)
def test_unreadable_files_raise_with_errno(client, path, code):
    with pytest.raises(AgentRemoteError) as info:
        client.read_file(path)
    assert info.value.errno == code


def test_parent_directories_are_not_created(client, tmp_path):
    with pytest.raises(AgentRemoteError) as info:
        client.write_file(str(tmp_path / "missing" / "f"), b"x")
    assert info.value.errno == errno.ENOENT


def test_append_to_a_missing_file_is_enoent(raw, tmp_path):
    raw.hello()
    raw.send(P.PutFile(str(tmp_path / "nope").encode(), b"x", append=True).frame(1))
    (err,) = raw.until(1, end=(MsgType.OK, MsgType.ERROR))
    assert P.decode_message(err) == P.Error(errno.ENOENT, P.decode_message(err).message)


def test_ping_measures_a_round_trip(client):
    assert 0 < client.ping() < 1


def test_a_big_ping_is_einval_and_the_connection_lives(raw):
    raw.hello()
    raw.send(P.encode_frame(MsgType.PING, 1, b"x" * 5000))
    (err,) = raw.until(1, end=(MsgType.ERROR, MsgType.PONG))
    assert P.decode_message(err).errno == errno.EINVAL
    raw.send(P.Ping(b"ok").frame(2))
    assert raw.until(2, end=(MsgType.PONG,))[0].payload == b"ok"


# ----------------------------------------------------------------------------- hostile input


def test_garbage_is_a_protocol_error_and_the_agent_lives_on(agent, raw):
    raw.send(b"\xff" * 64)
    assert raw.expect_hangup().errno == errno.EPROTO
    with agent.connect() as c:
        assert c.run("echo alive").stdout == b"alive\n"


def test_an_oversized_length_is_refused_without_waiting_for_the_payload(raw):
    raw.hello()
    raw.send(struct.pack("<IHHI", AGENT_MAX_FRAME + 1, MsgType.STDIN, 0, 1))
    assert "exceeds max_frame" in raw.expect_hangup().text


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (struct.pack("<IHHI", 0, MsgType.PING, 1, 1), "reserved"),
        (struct.pack("<IHHI", 0, 0x7F, 0, 1), "unknown message type"),
        (struct.pack("<IHHI", 0, MsgType.OK, 0, 1), "not a host request"),
        (struct.pack("<IHHI", 0, MsgType.STDIN, 0, 1), "empty STDIN"),
        (struct.pack("<IHHI", 1, MsgType.STDIN_EOF, 0, 1) + b"x", "STDIN_EOF"),
        (struct.pack("<IHHI", 4, MsgType.KILL, 0, 1) + struct.pack("<I", 99), "KILL"),
        (struct.pack("<IHHI", 0, MsgType.PING, 0, 0), "is 0 or still open"),
        (P.Hello().frame(0), "not a host request"),
    ],
    ids=[
        "flags",
        "type",
        "agent-message",
        "empty-stdin",
        "eof-payload",
        "bad-kill",
        "rid0",
        "hello2",
    ],
)
def test_bad_frames_after_the_handshake_hang_up(raw, header, message):
    raw.hello()
    raw.send(header)
    err = raw.expect_hangup()
    assert err.errno == errno.EPROTO and message in err.text


def test_reusing_an_open_request_id_hangs_up(raw):
    raw.hello()
    raw.send(exec_frame(3, "sleep", "100") + exec_frame(3, "true"))
    assert "still open" in raw.expect_hangup().text


@pytest.mark.parametrize(
    "payload",
    [
        struct.pack("<IIII", 0, 0, 0, 0) + struct.pack("<I", 0),  # argc 0
        struct.pack("<IIII", 0, 0, 1000, 0) + b"\0" * 8,  # argc cannot fit
        struct.pack("<IIII", 8, 0, 1, 0) + struct.pack("<I", 0) + struct.pack("<I", 1) + b"x",
        struct.pack("<IIII", 0, 0, 1, 0) + struct.pack("<I", 99),  # cwd longer than payload
        struct.pack("<IIII", 0, 0, 1, 0) + struct.pack("<I", 0) + struct.pack("<I", 1) + b"x!",
        struct.pack("<IIII", 0, 0, 1, 1) + struct.pack("<III", 0, 1, 1) + b"xy" + b"\0",
        struct.pack("<IIII", 0, 0, 1, 0) + struct.pack("<II", 0, 3) + b"a\0b",  # NUL in argv
        struct.pack("<IIII", 2, 0, 2, 0) + struct.pack("<IIcIc", 0, 1, b"a", 1, b"b"),
        b"\x01\x02",
    ],
    ids=[
        "argc0",
        "argc-too-big",
        "unknown-flag",
        "cwd-overrun",
        "trailing",
        "env-no-equals",
        "nul-argv",
        "shell-argc2",
        "short",
    ],
)
def test_malformed_exec_payloads_are_einval_and_the_connection_lives(raw, payload):
    raw.hello()
    raw.send(P.encode_frame(MsgType.EXEC, 9, payload))
    (err,) = raw.until(9)
    assert err.type == MsgType.ERROR and P.decode_message(err).errno == errno.EINVAL
    raw.send(P.Ping(b"ok").frame(10))
    assert raw.until(10, end=(MsgType.PONG,))[0].payload == b"ok"


@pytest.mark.parametrize(
    ("type_", "payload"),
    [
        (MsgType.PUT_FILE, struct.pack("<III", 0o10000, 0, 1) + b"x"),  # mode bits
        (MsgType.PUT_FILE, struct.pack("<III", 0o644, 2, 1) + b"x"),  # flags
        (MsgType.PUT_FILE, struct.pack("<III", 0o644, 0, 0)),  # empty path
        (MsgType.PUT_FILE, struct.pack("<III", 0o644, 0, 50) + b"x"),  # path overrun
        (MsgType.GET_FILE, b""),
        (MsgType.GET_FILE, b"/etc\0passwd"),
    ],
)
def test_malformed_file_requests_are_einval(raw, type_, payload):
    raw.hello()
    raw.send(P.encode_frame(type_, 4, payload))
    (err,) = raw.until(4, end=(MsgType.ERROR, MsgType.OK, MsgType.FILE_DATA))
    assert err.type == MsgType.ERROR and P.decode_message(err).errno == errno.EINVAL


def test_random_frames_never_crash_the_agent(agent):
    """Valid headers with random payloads of every type, many connections: errors, no crash."""
    rng = random.Random(1234)
    types = sorted(P.TYPE_NAMES)
    for _ in range(400):
        r = Raw(agent.raw_socket())
        try:
            r.hello()
            blob = b""
            for _ in range(rng.randrange(1, 12)):
                t = rng.choice(types)
                n = rng.choice([0, 1, 3, 4, 12, 16, 20, 40, rng.randrange(200)])
                payload = rng.randbytes(n)
                if t == MsgType.EXEC and rng.random() < 0.5:  # plausible counts, bad strings
                    payload = struct.pack("<IIII", rng.choice([0, 1, 2]), 50, 1, 1) + payload
                blob += P.encode_frame(t, rng.randrange(4), payload)
            if rng.random() < 0.3:
                blob += rng.randbytes(rng.randrange(1, 64))  # and raw garbage
            with contextlib.suppress(OSError):
                r.send(blob)
                r.sock.shutdown(socket.SHUT_WR)  # EOF: the agent closes if it has not hung up
            with contextlib.suppress(AgentProtocolError, OSError):
                while r.next(timeout=5) is not None:
                    pass
        finally:
            r.close()
        assert agent.alive()
    with agent.connect() as c:
        assert c.run("echo alive").stdout == b"alive\n"


def test_a_frame_split_into_single_bytes_is_reassembled(raw):
    raw.hello()
    for b in exec_frame(1, "echo", "slow"):
        raw.send(bytes([b]))
    assert raw.until(1)[0].payload == b"slow\n"


# ----------------------------------------------------------------------------- build


def test_build_is_cached_and_keyed_by_content(agent_bin, tmp_path):
    assert agent_build.build_agent() == agent_bin
    copy = tmp_path / "src"
    shutil.copytree(agent_build.SOURCE_DIR, copy, ignore=shutil.ignore_patterns("*.py", "__*"))
    assert agent_build.build_key(copy) == agent_build.build_key()
    (copy / "agent.h").write_text((copy / "agent.h").read_text() + "\n/* changed */\n")
    assert agent_build.build_key(copy) != agent_build.build_key()


def test_a_broken_source_raises_with_the_compiler_output(tmp_path):
    copy = tmp_path / "src"
    shutil.copytree(agent_build.SOURCE_DIR, copy, ignore=shutil.ignore_patterns("*.py", "__*"))
    (copy / "conn.c").write_text((copy / "conn.c").read_text() + "\nthis is not C;\n")
    with pytest.raises(GuestBuildError, match="agent build failed.*conn.c"):
        agent_build.build_agent(copy)


def test_sources_compile_without_warnings(tmp_path):
    units = [str(p) for p in agent_build.source_files() if p.suffix == ".c"]
    cmd = [
        agent_build.CC,
        *agent_build.CFLAGS,
        *agent_build.STRICT_FLAGS,
        "-I",
        str(agent_build.PROTOCOL_INCLUDE_DIR),
        "-o",
        str(tmp_path / "a"),
    ]
    out = subprocess.run(
        [*cmd, *units],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr


def test_the_binary_is_static(agent_bin):
    elf = agent_bin.read_bytes()
    assert elf[:4] == b"\x7fELF" and not irf._elf_is_dynamic(elf)


def test_bad_options_exit_2_with_usage(agent_bin, tmp_path):
    bad = subprocess.run([str(agent_bin), "--bogus"], capture_output=True, timeout=10)
    assert bad.returncode == 2 and b"usage" in bad.stderr


# ----------------------------------------------------------------------------- initramfs


needs_busybox = pytest.mark.skipif(
    not irf.BUSYBOX.is_file(), reason=f"needs {irf.BUSYBOX}: apt-get install {irf.BUSYBOX_PACKAGE}"
)


def test_cpio_round_trips():
    entries = [
        irf.CpioEntry("d", stat.S_IFDIR | 0o755, 0, 0, 0, b""),
        irf.CpioEntry("d/f", stat.S_IFREG | 0o600, 0, 0, 0, b"hello"),
        irf.CpioEntry("d/l", stat.S_IFLNK | 0o777, 0, 0, 0, b"/f"),
        irf.CpioEntry("c", stat.S_IFCHR | 0o600, 0, 0, 0, b"", (5, 1)),
    ]
    data = irf.write_cpio(entries)
    assert data[:6] == b"070701" and len(data) % 4 == 0
    assert irf.parse_cpio(data) == entries


def test_parse_cpio_refuses_garbage():
    for bad in (b"", b"070701" + b"0" * 50, b"x" * 200, irf.write_cpio([])[:-8]):
        with pytest.raises(ValueError):
            irf.parse_cpio(bad)


@needs_busybox
def test_initramfs_has_the_expected_entries_and_modes():
    entries = {e.name: e for e in irf.parse_cpio(irf.build_initramfs().read_bytes())}
    init = entries["init"]
    assert init.mode == stat.S_IFREG | 0o755 and init.data == agent_build.build_agent().read_bytes()
    assert entries["bin/busybox"].mode == stat.S_IFREG | 0o755
    sh = entries["bin/sh"]
    assert sh.mode == stat.S_IFLNK | 0o777 and sh.data == b"busybox"  # relative: see init.c
    assert entries["usr/bin/awk"].data == b"../../bin/busybox"
    assert entries["dev/console"].mode == stat.S_IFCHR | 0o600 and entries["dev/console"].rdev == (
        5,
        1,
    )
    assert entries["tmp"].mode == stat.S_IFDIR | 0o1777
    for d in ("proc", "sys", "dev", "run", "sysroot", "etc"):
        assert entries[d].is_dir
    assert all(e.uid == 0 and e.gid == 0 and e.mtime == 0 for e in entries.values())
    seen: set[str] = set()
    for name in entries:  # every parent comes before its children
        parent = name.rpartition("/")[0]
        assert not parent or parent in seen, name
        seen.add(name)


@needs_busybox
def test_initramfs_is_reproducible(monkeypatch, tmp_path):
    first = irf.build_initramfs().read_bytes()
    assert irf.build_initramfs().read_bytes() == first
    monkeypatch.setenv("SUPERMACHINE_CACHE_DIR", str(tmp_path))  # a fresh build, from scratch
    again = irf.build_initramfs()
    assert again.is_relative_to(tmp_path) and again.read_bytes() == first


@needs_busybox
def test_extra_files_get_modes_and_parents():
    path = irf.build_initramfs({"/opt/app/run.sh": b"#!/bin/sh\necho hi\n", "etc/app.conf": b"x"})
    entries = {e.name: e for e in irf.parse_cpio(path.read_bytes())}
    assert entries["opt"].is_dir and entries["opt/app"].is_dir
    assert entries["opt/app/run.sh"].mode == stat.S_IFREG | 0o755
    assert entries["etc/app.conf"].mode == stat.S_IFREG | 0o644
    with pytest.raises(ValueError):
        irf.build_initramfs({"../escape": b""})


# ----------------------------------------------------------------------------- init as PID 1
#
# The initramfs, unpacked into a directory, booted as the root of fresh mount,
# PID, UTS (and network) namespaces: the agent is PID 1 there and does init's
# work for real (devtmpfs, proc, sysfs, tmpfs, hostname, lo, switch root onto a
# loop device). Needs root; the mounts live and die with the namespaces.


def _namespaces_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root (mount, PID and UTS namespaces)"
    if shutil.which("unshare") is None:
        return "needs unshare (util-linux)"
    probe = subprocess.run(
        ["unshare", "--mount", "--uts", "--net", "--pid", "--fork", "true"], capture_output=True
    )
    if probe.returncode != 0:
        return f"cannot create namespaces here: {probe.stderr.decode().strip()}"
    if not irf.BUSYBOX.is_file():
        return f"needs {irf.BUSYBOX}: apt-get install {irf.BUSYBOX_PACKAGE}"
    return None


needs_namespaces = needs(_namespaces_problem())


def _loop_problem() -> str | None:
    missing = [t for t in ("losetup", "mkfs.ext4", "debugfs") if shutil.which(t) is None]
    if missing:
        return f"needs {', '.join(missing)} (apt-get install util-linux e2fsprogs)"
    if not Path("/dev/loop-control").exists():
        return "needs loop devices (/dev/loop-control)"
    return None


needs_loop = needs(_loop_problem())


@pytest.fixture(scope="module")
def unpacked_initramfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("initramfs")
    for e in irf.parse_cpio(irf.build_initramfs().read_bytes()):
        p = root / e.name
        if stat.S_ISDIR(e.mode):
            p.mkdir(exist_ok=True)
            p.chmod(stat.S_IMODE(e.mode))
        elif stat.S_ISLNK(e.mode):
            p.symlink_to(e.data.decode())
        elif stat.S_ISREG(e.mode):
            p.write_bytes(e.data)
            p.chmod(stat.S_IMODE(e.mode))
        # device nodes: devtmpfs provides them
    (root / "sock").mkdir()
    return root


class Pid1:
    """The initramfs root booted in namespaces with the agent as PID 1."""

    def __init__(self, root: Path, listen: str, cmdline: str, *, net: bool, log: Path) -> None:
        self.log = log
        args = ["unshare", "--mount", "--uts", "--pid", "--fork", "--kill-child"]
        args += ["--propagation", "private", *(["--net"] if net else []), f"--root={root}"]
        args += ["/init", "--listen", listen, "--cmdline", cmdline]
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(args, stderr=f, stdout=f)
        self.address = str(root / listen[6:]) if listen.startswith("unix:/") else "\0" + listen[6:]

    def connect(self) -> AgentClient:
        deadline = time.monotonic() + 15
        while True:
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(self.address)
                return AgentClient(s, timeout=10)
            except OSError:
                s.close()
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise AssertionError(
                        f"the PID 1 agent never listened:\n{self.console()}"
                    ) from None
                time.sleep(0.05)

    def console(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        self.proc.kill()  # unshare --kill-child: PID 1 dies, and the namespaces with it
        self.proc.wait(10)


@needs_namespaces
def test_init_as_pid1_mounts_names_and_reaps(unpacked_initramfs, tmp_path):
    vm = Pid1(
        unpacked_initramfs,
        "unix:/sock/pid1.sock",
        "console=ttyS0 sm.hostname=testvm quiet",
        net=True,
        log=tmp_path / "console",
    )
    try:
        c = vm.connect()
        assert c.run("hostname").stdout == b"testvm\n"
        assert c.run("cat /proc/1/cmdline").stdout.startswith(b"/init\0")
        mounts = c.run("cat /proc/mounts").stdout.decode()
        for fs, where in [
            ("devtmpfs", "/dev"),
            ("proc", "/proc"),
            ("sysfs", "/sys"),
            ("tmpfs", "/tmp"),
            ("tmpfs", "/run"),
            ("tmpfs", "/dev/shm"),
        ]:
            assert f"{fs} {where} {fs}" in mounts, mounts
        assert c.run("stat -c %a /tmp").stdout == b"1777\n"
        assert b"inet 127.0.0.1/8" in c.run("ip addr show lo").stdout
        assert c.run("echo hi > /dev/null && ls /dev/fd/").ok
        assert c.run("echo $PATH $HOME").stdout == (
            b"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin /root\n"
        )
        # a double fork leaves an orphan to PID 1: the agent reaps it, no zombie stays
        c.run("sh -c 'sleep 0.2 &'")
        deadline = time.monotonic() + 30
        while "(sleep) " in (states := c.run("cat /proc/[0-9]*/stat").stdout.decode()):
            assert time.monotonic() < deadline, f"the orphan was never reaped: {states}"
            time.sleep(0.05)
        assert ") Z " not in states, states
        c.close()
    finally:
        vm.stop()
    assert "cannot" not in vm.console(), vm.console()


@pytest.fixture
def ext4_disk(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A small ext4 image from a directory (no /bin/sh in it), attached to a loop device."""
    src = tmp_path / "rootsrc"
    (src / "data").mkdir(parents=True)
    (src / "data" / "hello").write_text("from the disk\n")
    (src / "etc").mkdir()
    image = tmp_path / "root.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-d", str(src), str(image), "16M"], check=True)
    dev = subprocess.run(
        ["losetup", "--find", "--show", str(image)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        yield image, dev
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)


@needs_namespaces
@needs_loop
def test_init_switches_to_a_read_only_ext4_root_under_a_tmpfs_overlay(
    unpacked_initramfs, ext4_disk, tmp_path
):
    image, dev = ext4_disk
    before = image.read_bytes()
    name = f"@sm-agent-test-{os.getpid()}-overlay"
    vm = Pid1(unpacked_initramfs, f"unix:{name}", f"sm.root={dev}", net=False, log=tmp_path / "c")
    try:
        c = vm.connect()
        # no /bin/sh on the disk: command lines run with the initramfs busybox
        assert c.run("cat /data/hello").stdout == b"from the disk\n"
        assert c.run("test ! -e /init && test -e /data").ok  # the disk is the root now
        mounts = c.run(["/.supermachine/bin/cat", "/proc/mounts"]).stdout.decode()
        assert "overlay / overlay" in mounts and "devtmpfs /dev" in mounts, mounts
        c.write_file("/data/new", b"written in the guest")
        assert c.run("rm /data/hello && ls /data").stdout == b"new\n"
        assert c.read_file("/data/new") == b"written in the guest"
        c.close()
    finally:
        vm.stop()
    assert image.read_bytes() == before, "the read-only base was modified"
    assert "root is " + dev in vm.console()


@needs_namespaces
@needs_loop
def test_overlay_mib_bounds_everything_written_to_the_root_tmp_included(
    unpacked_initramfs, ext4_disk, tmp_path
):
    _image, dev = ext4_disk  # its root has no /tmp: init makes one in the writable layer
    name = f"@sm-agent-test-{os.getpid()}-overlay-mib"
    cmdline = f"sm.root={dev} sm.overlay_mib=4"
    vm = Pid1(unpacked_initramfs, f"unix:{name}", cmdline, net=False, log=tmp_path / "c")
    try:
        c = vm.connect()
        assert c.run("stat -c %a /tmp").stdout == b"1777\n"
        for path in ("/tmp/big", "/data/big"):
            full = c.run(f"dd if=/dev/zero of={path} bs=1M count=8")
            assert full.returncode != 0 and b"No space left on device" in full.stderr, full
            assert c.run(f"rm {path}").ok
        c.close()
    finally:
        vm.stop()


@needs_namespaces
@needs_loop
def test_init_with_overlay_off_mounts_the_disk_read_write(unpacked_initramfs, ext4_disk, tmp_path):
    image, dev = ext4_disk
    name = f"@sm-agent-test-{os.getpid()}-rw"
    vm = Pid1(
        unpacked_initramfs,
        f"unix:{name}",
        f"sm.root={dev} sm.overlay=0 sm.rootfstype=ext4",
        net=False,
        log=tmp_path / "c",
    )
    try:
        c = vm.connect()
        c.write_file("/data/kept", b"persisted")
        assert c.run("sync").ok
        c.close()
    finally:
        vm.stop()
    out = subprocess.run(
        ["debugfs", "-R", "cat /data/kept", str(image)], capture_output=True, check=True
    )
    assert out.stdout == b"persisted"
