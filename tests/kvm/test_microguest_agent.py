"""The microguest's agent end to end: Machine -> virtio-vsock/blk -> the C agent in the guest.

What the agent must do is docs/agent-protocol.md (and tests/agent_peer.py, the
reference peer); the microguest's built-ins are listed in
pytest_supermachine/guest/microguest/__init__.py. Most tests share one machine
per module (booting costs ~30 ms, but the tier runs on a loaded 2-CPU host);
the ones that break the guest (crash, hang) or need a snapshot boot their own.
Timing assertions are deliberately loose: they catch "spins" and "serialised",
not "slow by 20%".
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_supermachine.errors import GuestCrashed, GuestTimeout
from pytest_supermachine.guest.microguest import GuestMode, Mark, PanicCode
from pytest_supermachine.vmm import agent as P
from pytest_supermachine.vmm.devices.hub import DiskSpec
from pytest_supermachine.vmm.machine import ExitReason, Machine

DISK_SECTORS = 2048
DISK_SERIAL = "mg-test-disk"
PATTERN = bytes(range(256))


def emitted(n: int) -> bytes:
    """What `emit n` prints: 0, 1, .., 255, 0, 1, ..."""
    return (PATTERN * (n // 256 + 1))[:n]


def boot_agent(elf: Path, **cfg: object) -> Machine:
    m = Machine(**{"mem_mib": 64, **cfg})  # type: ignore[arg-type]
    try:
        m.boot_direct64(elf, mode=GuestMode.AGENT)
        m.start()
        m.wait_ready(30)
    except BaseException:
        m.stop()
        raise
    return m


@pytest.fixture(scope="module")
def disk_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("disk") / "base.img"
    path.write_bytes(bytes(range(256)) * (DISK_SECTORS * 2))  # sector s, byte i: i % 256
    return path


@pytest.fixture(scope="module")
def vm(microguest_elf: Path, disk_image: Path) -> Iterator[Machine]:
    """One agent machine with a disk, shared by the tests that leave it serving."""
    m = boot_agent(microguest_elf, disks=(DiskSpec(str(disk_image), serial=DISK_SERIAL),))
    yield m
    m.stop()


@pytest.fixture
def fresh(microguest_elf: Path) -> Iterator[Callable[..., Machine]]:
    """Agent machines of the test's own (stopped afterwards)."""
    machines: list[Machine] = []

    def make(**cfg: object) -> Machine:
        m = boot_agent(microguest_elf, **cfg)
        machines.append(m)
        return m

    yield make
    for m in machines:
        m.stop()


class Raw:
    """A bare protocol connection to the agent, for what AgentClient never sends."""

    def __init__(self, m: Machine, hello: bool = True) -> None:
        self.sock = m.connect(P.AGENT_PORT, timeout=10)
        self.sock.settimeout(10)
        self.decoder = P.FrameDecoder()
        self.frames: list[P.Frame] = []
        if hello:
            self.send(P.Hello(software=b"raw test").frame(0))
            reply = P.decode_message(self.recv())
            assert isinstance(reply, P.Hello)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> P.Frame:
        while not self.frames:
            data = self.sock.recv(1 << 16)
            if not data:
                raise EOFError("the agent closed the connection")
            self.frames += self.decoder.feed(data)
        return self.frames.pop(0)

    def until(self, rid: int, *types: int) -> list[P.Frame]:
        """Frames of request `rid` up to and including the first of `types`."""
        got = []
        while True:
            f = self.recv()
            if f.request_id == rid:
                got.append(f)
                if f.type in types:
                    return got

    def closed(self, timeout: float = 10) -> bool:
        """Does the agent close the connection (EOF) within `timeout`?"""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(1 << 16):
                pass
        except TimeoutError:
            return False
        except OSError:
            pass
        return True

    def close(self) -> None:
        self.sock.close()


def exec_frame(rid: int, argv: list[bytes], *, flags: int = 0, timeout_ms: int = 0) -> bytes:
    shell = bool(flags & P.EXEC_SHELL)
    msg = P.Exec(tuple(argv), (), b"", timeout_ms, bool(flags & P.EXEC_STDIN), shell)
    return msg.frame(rid)


# --------------------------------------------------------------------------- boot


def test_agent_announces_itself_and_is_ready(vm: Machine) -> None:
    vm.wait_console(r"microguest: agent listening on vsock port 5253 cid 3 tsc_khz \d+\n", 10)
    assert Mark.AGENT_DEVICES in [mark for mark, _ in vm.marks()]
    hello = vm.agent().agent
    assert hello.software == b"microguest-agent 1"
    assert hello.capabilities == P.CAP_ALL | P.CAP_SEED
    assert hello.max_inflight >= 8
    assert hello.max_frame >= 64 * 1024


def test_agent_sends_ready_to_the_host_listener(microguest_elf: Path) -> None:
    m = Machine(mem_mib=64)
    try:
        listener = m.listen(P.READY_PORT)
        m.boot_direct64(microguest_elf, mode=GuestMode.AGENT)
        m.start()
        sock, _port = listener.accept(timeout=30)
        ready = P.read_ready(sock, timeout=10)
        assert ready.software == b"microguest-agent 1"
        assert sock.recv(1) == b""  # one READY, then the agent closes
        m.wait_ready(5)  # the control port said so too
    finally:
        m.stop()


def test_guest_tsc_rate_is_calibrated(vm: Machine) -> None:
    info = dict(line.split("=", 1) for line in vm.run("info").stdout.decode().splitlines())
    khz = int(info["tsc_khz"])
    kvm_get_tsc_khz = 0xAEA3  # _IO(KVMIO, 0xa3): the rate KVM gives this vCPU's TSC
    with vm.paused():  # a vCPU ioctl waits for KVM_RUN to return
        real_khz = fcntl.ioctl(vm.vcpus[0].fd, kvm_get_tsc_khz, 0)
    assert 100_000 < khz < 10_000_000
    assert abs(khz - real_khz) / real_khz < 0.1, (khz, real_khz)


def test_idle_guest_halts_instead_of_spinning(vm: Machine) -> None:
    vm.run("true")
    tid = vm._threads[0].native_id

    def cpu_seconds() -> float:
        with open(f"/proc/self/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    before = cpu_seconds()
    time.sleep(1.0)
    assert cpu_seconds() - before < 0.1  # a spinning vCPU would burn ~1 s


# --------------------------------------------------------------------------- exec


@pytest.mark.parametrize(
    ("cmd", "code"),
    [
        ("true", 0),
        ("false", 1),
        ("exit 42", 42),
        ("exit 300", 300 & 0xFF),
        ("exit", 0),
        ("signal 9", -9),
        ("signal 15", -15),
    ],
)
def test_exit_statuses(vm: Machine, cmd: str, code: int) -> None:
    assert vm.run(cmd).returncode == code


def test_echo_as_command_line_and_as_argv(vm: Machine) -> None:
    assert vm.run("echo  hello   world ").stdout == b"hello world\n"
    assert vm.run(["echo", "two words", "x"]).stdout == b"two words x\n"
    assert vm.run(["/bin/echo", "by path"]).stdout == b"by path\n"  # argv[0]'s basename
    assert vm.run("echo").stdout == b"\n"
    r = vm.run("err on stderr")
    assert (r.stdout, r.stderr) == (b"", b"on stderr\n")


def test_unknown_command(vm: Machine) -> None:
    r = vm.run("no-such-command arg")  # a command line: like /bin/sh
    assert r.returncode == 127
    assert r.stderr == b"sh: no-such-command: not found\n"
    with pytest.raises(P.AgentRemoteError) as info:  # an argv: like a failed execve
        vm.run(["no-such-command"])
    assert info.value.errno == errno.ENOENT


@pytest.mark.parametrize("cmd", ["sleep", "sleep soon", "exit -1", "dirty 0x", "blk-read 1"])
def test_bad_arguments_exit_2_with_a_message(vm: Machine, cmd: str) -> None:
    r = vm.run(cmd)
    assert r.returncode == 2
    assert r.stderr.startswith(cmd.split()[0].encode() + b": ")


def test_env_and_cwd_reach_the_command(vm: Machine) -> None:
    assert vm.run(["env"], env={"A": "1", "B": "x=y"}).stdout == b"A=1\nB=x=y\n"
    assert vm.run(["pwd"], cwd="/srv").stdout == b"/srv\n"
    assert vm.run("pwd").stdout == b"/\n"


def test_running_as_a_user_is_refused_clearly(vm: Machine) -> None:
    with pytest.raises(P.AgentError, match="does not support running a command as another user"):
        vm.run("echo", user="0")  # the host knows from HELLO: nothing is sent
    raw = Raw(vm)
    try:  # and a host that sends EXEC_USER anyway gets EINVAL saying why
        raw.send(P.Exec((b"echo",), user=P.RunAs(1, 1)).frame(3))
        (frame,) = raw.until(3, P.MsgType.ERROR, P.MsgType.EXIT)
        err = P.decode_message(frame)
        assert isinstance(err, P.Error) and err.errno == errno.EINVAL
        assert "no users" in err.text
    finally:
        raw.close()


def test_stdin_to_stdout(vm: Machine) -> None:
    assert vm.run("cat", input=b"hello\n").stdout == b"hello\n"
    assert vm.run("cat", input=b"").stdout == b""
    assert vm.run("cat").stdout == b""  # no input: empty stdin


def test_megabytes_of_stdin_come_back_unchanged(vm: Machine) -> None:
    data = os.urandom(3 << 20)
    r = vm.run("cat", input=data, timeout=60)
    assert r.returncode == 0
    assert r.stdout == data


def test_stdin_of_a_command_that_never_reads_it_is_dropped(vm: Machine) -> None:
    # Not read, but not blocking the connection either: other requests go on.
    r = vm.run("echo done", input=os.urandom(1 << 20), timeout=30)
    assert r.stdout == b"done\n"
    assert vm.run("true").ok


def test_ten_megabytes_of_stdout(vm: Machine) -> None:
    n = 10_000_000
    r = vm.run(f"emit {n}", timeout=60)
    assert r.returncode == 0
    assert len(r.stdout) == n
    assert r.stdout == emitted(n)


def test_timeout_kills_the_command(vm: Machine) -> None:
    start = time.perf_counter()
    r = vm.run("sleep 10000", timeout=0.3)
    elapsed = time.perf_counter() - start
    assert r.timed_out
    assert r.returncode == -9
    assert 0.25 < r.duration < 3
    assert elapsed < 5
    assert vm.run("echo still serving").stdout == b"still serving\n"


def test_sleep_waits_about_as_long_as_asked(vm: Machine) -> None:
    start = time.perf_counter()
    r = vm.run("sleep 150")
    elapsed = time.perf_counter() - start
    assert r.ok
    assert r.duration > 0.14  # measured by the guest's calibrated TSC
    assert elapsed > 0.14


def test_eight_concurrent_runs_interleave(vm: Machine) -> None:
    results: dict[int, bytes] = {}
    finished: list[int] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        r = vm.run("sleep 3000" if i % 2 else f"echo {i}", timeout=30)
        assert r.ok
        with lock:
            results[i] = r.stdout
            finished.append(i)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(1, 8, 2)]
    for t in threads:
        t.start()
    echoes = [threading.Thread(target=worker, args=(i,)) for i in range(0, 8, 2)]
    for t in echoes:
        t.start()
    for t in threads + echoes:
        t.join()
    total = time.perf_counter() - start
    assert sorted(results) == list(range(8))
    for i in range(0, 8, 2):
        assert results[i] == f"{i}\n".encode()
    assert {i % 2 for i in finished[:4]} == {0}, f"an echo waited for a sleep: {finished}"
    assert total < 4 * 3.0, f"four 3 s sleeps took {total:.2f} s: run one after the other"


def test_several_connections_at_once(vm: Machine) -> None:
    clients = [P.AgentClient(vm.connect(P.AGENT_PORT), timeout=10) for _ in range(3)]
    try:
        for i, c in enumerate(clients):
            assert c.run(f"echo conn {i}").stdout == f"conn {i}\n".encode()
        assert clients[0].ping(b"x") > 0
    finally:
        for c in clients:
            c.close()
    assert vm.run("true").ok  # closed connections were cleaned up


def test_every_connection_can_fill_its_max_inflight(vm: Machine) -> None:
    clients = [P.AgentClient(vm.connect(P.AGENT_PORT), timeout=30) for _ in range(3)]
    codes: list[int] = []

    def worker(c: P.AgentClient) -> None:
        codes.append(c.run("sleep 300", timeout=30).returncode)

    try:
        limit = clients[0].agent.max_inflight
        threads = [
            threading.Thread(target=worker, args=(c,)) for c in clients for _ in range(limit)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for c in clients:
            c.close()
    assert codes == [0] * (3 * limit)


def test_dirty_pages(vm: Machine) -> None:
    assert vm.run("dirty 64").stdout == b"64\n"
    info = dict(line.split("=", 1) for line in vm.run("info").stdout.decode().splitlines())
    r = vm.run(f"dirty {int(info['scratch_pages']) + 1}")
    assert r.returncode == 1
    assert b"scratch area has" in r.stderr


# --------------------------------------------------------------------------- files


def test_file_put_get(vm: Machine) -> None:
    vm.write_file("/etc/app.conf", b"mode=test\n")
    assert vm.read_file("/etc/app.conf") == b"mode=test\n"
    vm.write_file("/etc/app.conf", b"short")  # replaces, truncating
    assert vm.read_file("/etc/app.conf") == b"short"
    vm.write_file("/empty", b"")
    assert vm.read_file("/empty") == b""


def test_big_file_spans_frames_both_ways(vm: Machine) -> None:
    data = os.urandom(3 << 20)  # > max_frame: one PUT_FILE and PUT_APPENDs; FILE_DATA with MORE
    vm.write_file("/big", data)
    assert vm.read_file("/big") == data
    assert vm.run("cat /big").stdout == data


def test_missing_file(vm: Machine) -> None:
    with pytest.raises(P.AgentRemoteError) as info:
        vm.read_file("/no/such/file")
    assert info.value.errno == errno.ENOENT
    r = vm.run("cat /no/such/file")
    assert r.returncode == 1
    assert b"No such file" in r.stderr


def test_write_and_cat_builtins_share_the_file_store(vm: Machine) -> None:
    assert vm.run("write /w.txt", input=b"via stdin").ok
    assert vm.read_file("/w.txt") == b"via stdin"
    vm.write_file("/p.txt", b"via put")
    assert vm.run("cat /p.txt /w.txt").stdout == b"via putvia stdin"


def test_file_store_limits_are_enospc(fresh: Callable[..., Machine]) -> None:
    m = fresh()
    with pytest.raises(P.AgentRemoteError) as info:
        m.write_file("/huge", bytes(17 << 20))  # over the 16 MiB per file
    assert info.value.errno == errno.ENOSPC
    for i in range(64 - 1):  # /huge exists (partly written): 63 more fill the table
        m.write_file(f"/f{i}", b"x")
    with pytest.raises(P.AgentRemoteError) as info:
        m.write_file("/one-too-many", b"x")
    assert info.value.errno == errno.ENOSPC
    assert m.read_file("/f7") == b"x"


# --------------------------------------------------------------------------- blk


def test_blk_size_id_and_read(vm: Machine, disk_image: Path) -> None:
    assert vm.run("blk-size").stdout == f"{DISK_SECTORS}\n".encode()
    assert vm.run("blk-id").stdout == f"{DISK_SERIAL}\n".encode()
    base = disk_image.read_bytes()
    assert vm.run("blk-read 100 3").stdout == base[100 * 512 : 103 * 512]
    big = vm.run(f"blk-read 0 {DISK_SECTORS}", timeout=60).stdout  # many requests
    assert big == base


def test_blk_write_keeps_the_rest_of_the_sector(vm: Machine, disk_image: Path) -> None:
    assert vm.run("blk-write 7 deadbeef").ok
    sector = vm.run("blk-read 7 1").stdout
    assert sector[:4] == b"\xde\xad\xbe\xef"
    assert sector[4:] == disk_image.read_bytes()[7 * 512 + 4 : 8 * 512]
    assert vm.run("blk-write 8 " + "ab" * 1024).ok  # two whole sectors
    assert vm.run("blk-read 8 2").stdout == b"\xab" * 1024
    assert vm.run("blk-flush").ok


def test_blk_out_of_range_and_bad_hex(vm: Machine) -> None:
    r = vm.run(f"blk-read {DISK_SECTORS - 1} 2")
    assert r.returncode == 1 and b"beyond the disk" in r.stderr
    assert vm.run("blk-write 0 xyz").returncode == 2


def test_blk_read_only_disk_reports_io_errors(fresh: Callable[..., Machine]) -> None:
    m = fresh(disks=(DiskSpec(None, size=64 << 10, read_only=True),))
    r = m.run("blk-write 0 00")
    assert r.returncode == 1
    assert b"I/O error" in r.stderr or b"unsupported" in r.stderr
    assert m.run("blk-read 0 1").stdout == bytes(512)


def test_no_disk_no_blk_commands(fresh: Callable[..., Machine]) -> None:
    r = fresh().run("blk-read 0 1")
    assert r.returncode == 1
    assert r.stderr == b"blk-read: no virtio-blk device\n"


# --------------------------------------------------------------------------- protocol


def test_ping_echoes_its_payload(vm: Machine) -> None:
    raw = Raw(vm)
    try:
        raw.send(P.Ping(b"payload!").frame(5))
        frame = raw.recv()
        assert (frame.type, frame.request_id, frame.payload) == (P.MsgType.PONG, 5, b"payload!")
    finally:
        raw.close()


def test_kill_ends_a_command_with_the_signal(vm: Machine) -> None:
    raw = Raw(vm)
    try:
        raw.send(exec_frame(1, [b"sleep", b"20000"]))
        raw.send(P.Kill(15).frame(1))
        raw.send(P.Kill(9).frame(77))  # unknown request: ignored
        (exit_frame,) = raw.until(1, P.MsgType.EXIT)
        ex = P.decode_message(exit_frame)
        assert isinstance(ex, P.Exit)
        assert (ex.signaled, ex.status, ex.timed_out) == (True, 15, False)
    finally:
        raw.close()


def test_more_requests_than_max_inflight_get_ebusy(vm: Machine) -> None:
    raw = Raw(vm)
    try:
        limit = 16
        for rid in range(1, limit + 2):
            raw.send(exec_frame(rid, [b"sleep", b"20000"]))
        err = P.decode_message(raw.until(limit + 1, P.MsgType.ERROR)[-1])
        assert isinstance(err, P.Error) and err.errno == errno.EBUSY
        for rid in range(1, limit + 1):
            raw.send(P.Kill(9).frame(rid))
        for rid in range(1, limit + 1):
            raw.until(rid, P.MsgType.EXIT)
    finally:
        raw.close()


def test_malformed_exec_is_einval_and_the_connection_lives_on(vm: Machine) -> None:
    raw = Raw(vm)
    try:
        raw.send(
            P.encode_frame(P.MsgType.EXEC, 3, struct.pack("<IIII", 0, 0, 5, 0))
        )  # argc 5, no data
        err = P.decode_message(raw.recv())
        assert isinstance(err, P.Error) and err.errno == errno.EINVAL
        raw.send(P.encode_frame(P.MsgType.EXEC, 4, struct.pack("<IIII", 0x80, 0, 1, 0)))  # bad flag
        err = P.decode_message(raw.recv())
        assert isinstance(err, P.Error) and err.errno == errno.EINVAL
        raw.send(exec_frame(3, [b"echo", b"ok"]))
        frames = raw.until(3, P.MsgType.EXIT)
        assert frames[0].payload == b"ok\n"
    finally:
        raw.close()


@pytest.mark.parametrize(
    "frame",
    [
        P.HEADER.pack(0, P.MsgType.PING, 1, 9),  # reserved flags
        P.HEADER.pack(0, 0x7F, 0, 9),  # unknown type
        P.HEADER.pack(64 << 20, P.MsgType.PUT_FILE, 0, 9),  # over max_frame: judged on the header
        P.Ping(b"x").frame(0),  # request id 0
        P.Stdout(b"x").frame(9),  # not a host request
        P.Hello().frame(0),  # a second HELLO
    ],
    ids=["flags", "type", "length", "rid0", "direction", "hello-again"],
)
def test_protocol_errors_end_the_connection_with_eproto(vm: Machine, frame: bytes) -> None:
    raw = Raw(vm)
    try:
        raw.send(frame)
        err = P.decode_message(raw.recv())
        assert isinstance(err, P.Error)
        assert err.errno == errno.EPROTO
        assert raw.closed()
    finally:
        raw.close()
    assert vm.run("echo fine").stdout == b"fine\n"  # other connections are unaffected


def test_reused_open_request_id_is_a_protocol_error(vm: Machine) -> None:
    raw = Raw(vm)
    try:
        raw.send(exec_frame(1, [b"sleep", b"20000"]))
        raw.send(exec_frame(1, [b"true"]))
        err = P.decode_message(raw.recv())
        assert isinstance(err, P.Error) and err.errno == errno.EPROTO
        assert raw.closed()
    finally:
        raw.close()


def test_version_mismatch_is_refused_with_both_versions(vm: Machine) -> None:
    raw = Raw(vm, hello=False)
    try:
        raw.send(P.Hello(version=2, software=b"future host").frame(0))
        err = P.decode_message(raw.recv())
        assert isinstance(err, P.Error) and err.errno == errno.EPROTO
        assert "version 1" in err.text and "2" in err.text
    finally:
        raw.close()


def test_requests_before_hello_are_refused(vm: Machine) -> None:
    raw = Raw(vm, hello=False)
    try:
        raw.send(P.Ping(b"x").frame(1))
        err = P.decode_message(raw.recv())
        assert isinstance(err, P.Error) and err.errno == errno.EPROTO
    finally:
        raw.close()


def test_stdin_in_pieces_with_eof(vm: Machine) -> None:
    raw = Raw(vm)
    try:
        raw.send(exec_frame(2, [b"cat"], flags=P.EXEC_STDIN))
        for piece in (b"one ", b"two ", b"three"):
            raw.send(P.Stdin(piece).frame(2))
        raw.send(P.StdinEof().frame(2))
        frames = raw.until(2, P.MsgType.EXIT)
        out = b"".join(f.payload for f in frames if f.type == P.MsgType.STDOUT)
        assert out == b"one two three"
        raw.send(P.Stdin(b"late").frame(2))  # after EXIT: ignored
        raw.send(P.Ping(b"still").frame(3))
        assert raw.until(3, P.MsgType.PONG)[-1].payload == b"still"
    finally:
        raw.close()


# --------------------------------------------------------------------------- snapshots


def test_reconnect_after_restore_and_reset(fresh: Callable[..., Machine], tmp_path: Path) -> None:
    m = fresh(disks=(DiskSpec(None, size=1 << 20),))
    m.write_file("/state", b"base")
    assert m.run("blk-write 0 aa").ok
    m.snapshot(tmp_path / "base")
    m.write_file("/state", b"after the snapshot")  # the live machine goes on
    assert m.run("blk-write 0 cc").ok
    assert m.run("blk-read 0 1").stdout[:1] == b"\xcc"
    m.stop()

    r = Machine.restore(tmp_path / "base")
    try:
        assert (
            r.run("echo restored").stdout == b"restored\n"
        )  # a new connection to the old listener
        assert r.read_file("/state") == b"base"
        assert r.run("blk-read 0 1").stdout[:1] == b"\xaa"
        for _ in range(3):
            r.write_file("/state", b"dirty")
            assert r.run("blk-write 0 bb").ok
            assert r.run("blk-read 0 1").stdout[:1] == b"\xbb"
            r.reset()
            assert r.run("echo again").stdout == b"again\n"
            assert r.read_file("/state") == b"base"
            assert r.run("blk-read 0 1").stdout[:1] == b"\xaa"
    finally:
        r.stop()


def test_blk_write_survives_a_live_snapshot_and_restore(
    fresh: Callable[..., Machine], tmp_path: Path
) -> None:
    m = fresh(disks=(DiskSpec(None, size=1 << 20),))
    assert m.run("blk-write 3 0123456789").ok
    m.snapshot(tmp_path / "live")
    assert m.run("echo live").stdout == b"live\n"  # still running after the live snapshot
    m.stop()
    r = Machine.restore(tmp_path / "live")
    try:
        assert r.run("blk-read 3 1").stdout[:5] == bytes.fromhex("0123456789")
    finally:
        r.stop()


# --------------------------------------------------------------------------- failures


def test_crash_is_a_clear_error_with_the_console_tail(fresh: Callable[..., Machine]) -> None:
    m = fresh()
    start = time.perf_counter()
    with pytest.raises(GuestCrashed) as info:  # at once, not after the command's timeout
        m.run("crash", timeout=30)
    assert time.perf_counter() - start < 10
    assert "exception 6" in str(info.value)  # the console tail is part of the message
    assert "#UD at cpl 3" in str(info.value)
    exit_ = m.exit_info()
    assert (exit_.reason, exit_.code) == (ExitReason.PANIC, 6)


def test_hang_lets_the_host_timeout_fire(fresh: Callable[..., Machine]) -> None:
    m = fresh()
    m.agent().kill_grace = 0.5
    start = time.perf_counter()
    with pytest.raises(GuestTimeout) as info:
        m.run("hang", timeout=0.5)
    assert time.perf_counter() - start < 10
    assert "hanging with interrupts off" in info.value.console_tail


def test_agent_mode_without_vsock_panics_with_a_reason(microguest_elf: Path) -> None:
    m = Machine(mem_mib=64, vsock=False)
    try:
        m.boot_direct64(microguest_elf, mode=GuestMode.AGENT)
        m.start()
        exit_ = m.wait(timeout=30)
        assert (exit_.reason, exit_.code) == (ExitReason.PANIC, PanicCode.AGENT_NO_VSOCK)
        assert "no virtio-vsock device" in m.console
    finally:
        m.stop()


def test_agent_mode_in_too_little_ram_panics_with_a_reason(microguest_elf: Path) -> None:
    m = Machine(mem_mib=8)
    try:
        m.boot_direct64(microguest_elf, mode=GuestMode.AGENT)
        m.start()
        exit_ = m.wait(timeout=30)
        assert (exit_.reason, exit_.code) == (ExitReason.PANIC, PanicCode.AGENT_NO_MEMORY)
        assert "not enough RAM for the agent's buffers" in m.console
    finally:
        m.stop()


def test_connection_reset_by_the_host_is_forgotten(vm: Machine) -> None:
    open_before = vm.devices.vsock().backend.connections()  # the machine's own agent connection
    for _ in range(12):  # more than the agent's 8 connection slots: closed ones are freed
        raw = Raw(vm)
        raw.send(exec_frame(1, [b"sleep", b"20000"]))
        raw.sock.shutdown(socket.SHUT_RDWR)
        raw.close()
    wait_until_connections_are(vm, open_before)
    assert vm.run("echo ok").stdout == b"ok\n"


def wait_until_connections_are(vm: Machine, expected: list, timeout: float = 30) -> None:
    """Until the vsock device holds just the `expected` connections: every close is over."""
    deadline = time.monotonic() + timeout
    while (now := vm.devices.vsock().backend.connections()) != expected:
        assert time.monotonic() < deadline, f"connections {now}, expected {expected}"
        time.sleep(0.01)


def test_device_that_needs_a_reset_stops_the_guest_with_a_reason(
    fresh: Callable[..., Machine],
) -> None:
    # A broken rx ring: the device fails while delivering the host's connect,
    # raises a configuration interrupt, and the guest finds it needs a reset.
    m = fresh()
    assert m.run("true").ok
    m._drop_agent()
    wait_until_connections_are(
        m, []
    )  # the close is over: the next thing the device does is our connect
    rxq = m.devices.devices[0].transport.queues[0]
    with m.paused():  # the next rx buffer the device takes names descriptor 999
        state = rxq.state()
        m.memory.write(
            rxq.avail_addr + 4 + 2 * (state.next_avail % state.size), struct.pack("<H", 999)
        )
    with pytest.raises(Exception):  # noqa: B017 - refused or timed out, either is fine here
        m.connect(P.AGENT_PORT, timeout=1)
    exit_ = m.wait(timeout=30)
    assert (exit_.reason, exit_.code) == (ExitReason.PANIC, PanicCode.AGENT_DEVICE)
    assert "virtio-vsock needs a reset" in m.console
