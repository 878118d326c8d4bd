"""The guest agent protocol (docs/agent-protocol.md): wire format and AgentClient behaviour.

The guest side is `tests.agent_peer.AgentPeer`, the Python reference agent, over
a socketpair. No VM, no KVM.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
import threading
import time

import pytest

from pytest_supermachine.errors import GuestTimeout, SupermachineError
from pytest_supermachine.vmm import agent as P
from pytest_supermachine.vmm.agent import (
    AgentClient,
    AgentError,
    AgentProtocolError,
    AgentRemoteError,
    AgentTimeout,
    CommandFailed,
    Frame,
    FrameDecoder,
    MsgType,
    RunResult,
)
from tests.agent_peer import AgentPeer, peer_pair

pytestmark = pytest.mark.unit


@pytest.fixture
def pair():
    host, peer = peer_pair()
    client = AgentClient(host, timeout=5.0, kill_grace=1.0)
    yield client, peer
    client.close()
    peer.close()


@pytest.fixture
def client(pair):
    return pair[0]


# ----------------------------------------------------------------------------- wire format


def test_frame_header_is_12_bytes_little_endian():
    assert (
        Frame(MsgType.STDOUT, 7, b"hi\n").encode()
        == bytes.fromhex("030000001300000007000000") + b"hi\n"
    )


def test_exec_of_echo_hi_matches_the_documented_bytes():
    frame = P.Exec((b"echo hi",), shell=True).frame(1)
    assert frame.hex() == (
        "1f00000010000000010000000200000000000000010000000000000000000000070000006563686f206869"
    )


def test_hello_matches_the_documented_layout():
    hello = P.Hello(1, 0xFF, 1 << 24, 0, b"host")
    assert hello.frame(0).hex() == (
        "200000000100000000000000534d414701000000ff00000000000000000000010000000004000000686f7374"
    )


def test_exit_payload_is_flags_status_duration():
    payload = P.Exit(9, signaled=True, timed_out=True, duration_ns=5).encode_payload()
    assert payload == struct.pack("<IiQ", 3, 9, 5)


@pytest.mark.parametrize(
    "msg",
    [
        P.Hello(software=b"x"),
        P.Ready(capabilities=3, max_frame=4096, max_inflight=8, software=b"mg"),
        P.Ping(b"abc"),
        P.Pong(b"abc"),
        P.Ok(),
        P.Error(errno.ENOENT, b"gone"),
        P.Exec((b"ls", b"-l"), (b"A=1", b"B="), b"/tmp", 1500, stdin=True),
        P.Exec((b"echo hi",), shell=True),
        P.Stdin(b"in"),
        P.StdinEof(),
        P.Stdout(b"out"),
        P.Stderr(b"err"),
        P.Exit(3, duration_ns=123),
        P.Exit(15, signaled=True, timed_out=True),
        P.Kill(15),
        P.PutFile(b"/etc/x", b"data", 0o600, append=True),
        P.GetFile(b"/etc/x"),
        P.FileData(b"chunk", more=True),
    ],
    ids=lambda m: type(m).__name__,
)
def test_every_message_round_trips_through_encode_and_decode(msg):
    (frame,) = FrameDecoder().feed(msg.frame(42))
    assert frame.request_id == 42
    assert P.decode_message(frame) == msg


def test_decoder_reassembles_frames_fed_one_byte_at_a_time():
    stream = P.Stdout(b"a").frame(1) + P.Exit(0).frame(1) + P.Ok().frame(2)
    decoder = FrameDecoder()
    frames = [f for i in range(len(stream)) for f in decoder.feed(stream[i : i + 1])]
    assert [(f.type, f.request_id) for f in frames] == [
        (MsgType.STDOUT, 1),
        (MsgType.EXIT, 1),
        (MsgType.OK, 2),
    ]
    decoder.close()


def test_decoder_refuses_an_oversized_length_as_soon_as_the_header_is_in():
    decoder = FrameDecoder(max_frame=4096)
    with pytest.raises(AgentProtocolError, match="4097-byte payload"):
        decoder.feed(struct.pack("<IHHI", 4097, MsgType.STDOUT, 0, 1))


def test_decoder_default_bound_is_16_mib():
    FrameDecoder().feed(struct.pack("<IHHI", P.MAX_FRAME, MsgType.STDOUT, 0, 1))
    with pytest.raises(AgentProtocolError):
        FrameDecoder().feed(struct.pack("<IHHI", P.MAX_FRAME + 1, MsgType.STDOUT, 0, 1))


def test_decoder_refuses_reserved_flags():
    with pytest.raises(AgentProtocolError, match="reserved flags"):
        FrameDecoder().feed(struct.pack("<IHHI", 0, MsgType.OK, 1, 1))


def test_decoder_refuses_unknown_types():
    with pytest.raises(AgentProtocolError, match="unknown message type 0x7f"):
        FrameDecoder().feed(struct.pack("<IHHI", 0, 0x7F, 0, 1))


def test_decoder_stays_failed_after_an_error():
    decoder = FrameDecoder()
    with pytest.raises(AgentProtocolError):
        decoder.feed(struct.pack("<IHHI", 0, 0x7F, 0, 1))
    with pytest.raises(AgentProtocolError):
        decoder.feed(P.Ok().frame(1))


def test_a_stream_that_ends_inside_a_frame_is_a_protocol_error():
    decoder = FrameDecoder()
    decoder.feed(P.Stdout(b"hello").frame(1)[:-2])
    with pytest.raises(AgentProtocolError, match="stream ended inside a frame"):
        decoder.close()


@pytest.mark.parametrize(
    "payload",
    [
        struct.pack("<IIII", 0, 0, 0, 0) + struct.pack("<I", 0),  # argc 0
        struct.pack("<IIII", 0, 0, 1000, 0) + b"\0" * 8,  # argc cannot fit
        struct.pack("<IIII", 8, 0, 1, 0) + struct.pack("<I", 0) + struct.pack("<I", 1) + b"x",
        struct.pack("<IIII", 0, 0, 1, 0) + struct.pack("<I", 99),  # cwd longer than payload
        struct.pack("<IIII", 0, 0, 1, 0) + struct.pack("<I", 0) + struct.pack("<I", 1) + b"x!",
        struct.pack("<IIII", 0, 0, 1, 1) + struct.pack("<III", 0, 1, 1) + b"xy" + b"\0",
    ],
    ids=["argc0", "argc-too-big", "unknown-flag", "cwd-overrun", "trailing", "env-no-equals"],
)
def test_malformed_exec_payloads_are_protocol_errors(payload):
    with pytest.raises(AgentProtocolError):
        P.Exec.decode(payload)


def test_nul_bytes_in_argv_are_refused():
    with pytest.raises(AgentProtocolError, match="NUL"):
        P.Exec.decode(_exec_with_arg(b"a\0b"))


def _exec_with_arg(arg: bytes) -> bytes:
    return (
        struct.pack("<IIII", 0, 0, 1, 0) + struct.pack("<I", 0) + struct.pack("<I", len(arg)) + arg
    )


def test_hello_with_a_foreign_magic_is_refused():
    payload = bytearray(P.Hello().encode_payload())
    payload[0:4] = b"HTTP"
    with pytest.raises(AgentProtocolError, match="does not speak"):
        P.Hello.decode(bytes(payload))


def test_exit_status_out_of_range_is_refused():
    with pytest.raises(AgentProtocolError):
        P.Exit.decode(struct.pack("<IiQ", 0, 256, 0))
    with pytest.raises(AgentProtocolError):
        P.Exit.decode(struct.pack("<IiQ", P.EXIT_SIGNALED, 0, 0))


# ----------------------------------------------------------------------------- handshake


def test_handshake_learns_the_agents_identity_and_limits(client):
    assert client.agent.software == b"python-agent-peer 1"
    assert client.agent.max_inflight == 8
    assert client.agent.max_frame == 64 * 1024


def test_version_mismatch_is_refused_clearly():
    host, peer = peer_pair(version=2)
    with pytest.raises(AgentProtocolError, match=r"version 2.*version 1.*rebuild the guest image"):
        AgentClient(host, timeout=5)
    peer.close()


def test_agent_refusing_the_hosts_version_is_reported():
    host, guest = socket.socketpair()

    def refuse():
        guest.recv(1024)
        guest.sendall(P.Error(errno.EPROTO, b"agent speaks version 7").frame(0))

    t = threading.Thread(target=refuse)
    t.start()
    with pytest.raises(AgentProtocolError, match="refused the handshake: agent speaks version 7"):
        AgentClient(host, timeout=5)
    t.join()
    guest.close()


def test_a_silent_agent_times_out_with_the_console_tail():
    host, guest = socket.socketpair()
    with pytest.raises(AgentTimeout, match="HELLO") as info:
        AgentClient(host, timeout=0.2, console_tail=lambda: "kernel panic")
    assert info.value.console_tail == "kernel panic"
    assert isinstance(info.value, GuestTimeout)
    guest.close()


def test_errors_are_supermachine_errors():
    for cls in (AgentError, AgentProtocolError, AgentRemoteError, AgentTimeout, CommandFailed):
        assert issubclass(cls, SupermachineError)


# ----------------------------------------------------------------------------- run


def test_run_returns_stdout_and_exit_code(client):
    r = client.run("echo hello world")
    assert r == RunResult(0, b"hello world\n", b"", r.duration)
    assert r.ok


def test_run_with_an_argv_list(client):
    assert client.run(["echo", "a b", "c"]).stdout == b"a b c\n"


def test_nonzero_exit_is_not_ok(client):
    r = client.run("exit 3")
    assert (r.returncode, r.ok) == (3, False)


def test_stderr_is_kept_apart_from_stdout(client):
    r = client.run("err oops")
    assert (r.stdout, r.stderr) == (b"", b"oops\n")


def test_input_is_fed_as_stdin(client):
    assert client.run("cat", input=b"abc").stdout == b"abc"


def test_without_input_stdin_is_empty(client):
    assert client.run("cat").stdout == b""


def test_large_stdin_streams_through_while_output_flows_back(client):
    data = bytes(range(256)) * 20000  # 5 MB: more than both socket buffers
    assert client.run("cat", input=data).stdout == data


def test_megabytes_of_stdout_arrive_whole(client):
    r = client.run("emit 10000000")
    assert len(r.stdout) == 10_000_000
    assert r.stdout[:512] == bytes(range(256)) * 2


def test_env_and_cwd_are_sent(client):
    r = client.run("env", env={"A": "1", "B": "x=y"})
    assert r.stdout == b"A=1\nB=x=y\n"
    assert client.run("pwd", cwd="/srv").stdout == b"/srv\n"


def test_invalid_env_names_are_refused_before_sending(client):
    with pytest.raises(ValueError):
        client.run("true", env={"A=B": "1"})


def test_timeout_kills_the_command_and_reports_it(client):
    r = client.run("sleep 5000", timeout=0.1)
    assert r.timed_out and not r.ok
    assert (r.signal, r.returncode) == (9, -9)
    assert r.duration < 2


def test_a_signal_is_a_negative_returncode(client):
    r = client.run("signal 11")
    assert (r.returncode, r.signal, r.ok) == (-11, 11, False)


def test_check_raises_command_failed_with_the_output_tails(client):
    with pytest.raises(CommandFailed, match="exited with status 1") as info:
        client.run("false", check=True)
    assert info.value.result.returncode == 1


def test_command_failed_message_carries_stdout_and_stderr_tails():
    exc = CommandFailed("'make'", RunResult(2, b"x" * 5000 + b"built", b"error: oops", 0.5))
    assert "exited with status 2" in str(exc)
    assert "stdout tail ---\n...(cut)..." in str(exc) and str(exc).count("x") < 2100
    assert "stderr tail ---\nerror: oops" in str(exc)


def test_check_passes_ok_results_through(client):
    assert client.run("true", check=True).ok


def test_an_unknown_command_is_a_remote_error_with_errno(client):
    with pytest.raises(AgentRemoteError, match="ENOENT") as info:
        client.run("no-such-command")
    assert info.value.errno == errno.ENOENT


def test_a_hung_agent_raises_agent_timeout_and_the_client_stays_usable(client):
    client.kill_grace = 0.1
    with pytest.raises(AgentTimeout, match="end of guest command 'hang'"):
        client.run("hang", timeout=0.05)
    assert client.run("echo still here").stdout == b"still here\n"


def test_concurrent_runs_are_multiplexed_on_one_connection(pair):
    client, peer = pair
    results: list[RunResult] = []
    threads = [
        threading.Thread(target=lambda i=i: results.append(client.run("sleep 2000")))
        for i in range(8)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(peer._procs) < 8:  # all eight open at once on the peer (in series: one at a time)
        assert any(t.is_alive() for t in threads) and time.monotonic() < deadline
        time.sleep(0.001)
    for t in threads:
        t.join()
    assert len(results) == 8 and all(r.ok for r in results)


def test_more_runs_than_max_inflight_wait_for_a_slot():
    host, peer = peer_pair(max_inflight=2)
    client = AgentClient(host, timeout=5)
    results: list[RunResult] = []
    threads = [
        threading.Thread(target=lambda: results.append(client.run("sleep 50"))) for _ in range(5)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.ok for r in results] == [True] * 5
    client.close()
    peer.close()


def test_missing_capabilities_are_refused_before_sending():
    host, peer = peer_pair(capabilities=P.CAP_EXEC)
    client = AgentClient(host, timeout=5)
    with pytest.raises(AgentError, match="does not support command lines"):
        client.run("echo hi")
    with pytest.raises(AgentError, match="does not support file transfer"):
        client.read_file("/x")
    assert client.run(["echo", "argv works"]).stdout == b"argv works\n"
    client.close()
    peer.close()


# ----------------------------------------------------------------------------- files, ping


def test_write_then_read_a_file(pair):
    client, peer = pair
    client.write_file("/etc/app.conf", b"mode=test\n", mode=0o600)
    assert peer.files[b"/etc/app.conf"] == (0o600, b"mode=test\n")
    assert client.read_file("/etc/app.conf") == b"mode=test\n"


def test_files_larger_than_a_frame_are_split_and_joined(pair):
    client, peer = pair
    data = bytes(range(256)) * 1024  # 256 KiB, agent max_frame is 64 KiB
    client.write_file("/big", data)
    assert peer.files[b"/big"][1] == data
    assert client.read_file("/big") == data
    assert sum(f.type == MsgType.PUT_FILE for f in peer.received) == 5


def test_empty_files_work(client):
    client.write_file("/empty", b"")
    assert client.read_file("/empty") == b""


def test_reading_a_missing_file_raises_with_errno(client):
    with pytest.raises(AgentRemoteError) as info:
        client.read_file("/nope")
    assert info.value.errno == errno.ENOENT


def test_ping_measures_a_round_trip(client):
    assert 0 < client.ping() < 1


# ----------------------------------------------------------------------------- broken agents


def _raw_agent(script):
    """A client whose peer completes the handshake and then runs ``script(guest_socket)``."""
    host, guest = socket.socketpair()

    def serve():
        decoder = FrameDecoder()
        while not decoder.feed(guest.recv(4096)):
            pass
        guest.sendall(P.Hello(max_frame=4096, max_inflight=4).frame(0))
        script(guest)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    client = AgentClient(host, timeout=2)
    return client, guest


def test_garbage_from_the_agent_is_a_protocol_error_for_every_waiter():
    client, guest = _raw_agent(lambda g: (g.recv(4096), g.sendall(b"\xff" * 64)))
    with pytest.raises(AgentProtocolError):
        client.run("true")
    with pytest.raises(AgentProtocolError):
        client.ping()
    guest.close()


def test_an_agent_that_hangs_up_mid_request_is_an_agent_error():
    client, _ = _raw_agent(lambda g: (g.recv(4096), g.close()))
    with pytest.raises(AgentError, match="closed the connection"):
        client.run("true")


def test_an_agent_hanging_up_inside_a_frame_is_a_protocol_error():
    client, _ = _raw_agent(
        lambda g: (g.recv(4096), g.sendall(P.Stdout(b"abcdef").frame(1)[:-3]), g.close())
    )
    with pytest.raises(AgentProtocolError, match="inside a frame"):
        client.run("true")


def test_a_wrong_reply_type_is_a_protocol_error():
    client, guest = _raw_agent(lambda g: (g.recv(4096), g.sendall(P.Ok().frame(1))))
    with pytest.raises(AgentProtocolError, match="unexpected Ok"):
        client.run("true")
    guest.close()


def test_closing_the_client_fails_later_calls(client):
    client.close()
    with pytest.raises(AgentError, match="closed by the host"):
        client.run("true")


# ----------------------------------------------------------------------------- ready


def test_read_ready_accepts_a_ready_frame():
    a, b = socket.socketpair()
    b.sendall(P.Ready(max_frame=4096, max_inflight=8, software=b"microguest").frame(0))
    assert P.read_ready(a, timeout=1).software == b"microguest"
    a.close()
    b.close()


def test_read_ready_refuses_anything_else():
    a, b = socket.socketpair()
    b.sendall(P.Hello().frame(0))
    with pytest.raises(AgentProtocolError, match="expected READY"):
        P.read_ready(a, timeout=1)
    a.close()
    b.close()


def test_read_ready_times_out():
    a, b = socket.socketpair()
    with pytest.raises(AgentTimeout):
        P.read_ready(a, timeout=0.05)
    a.close()
    b.close()


def test_peer_reference_agent_is_importable_standalone():
    assert AgentPeer.__doc__


def test_close_wakes_a_thread_blocked_waiting_for_the_agent():
    host, guest = socket.socketpair()
    guest.sendall(P.Hello(max_frame=4096, max_inflight=4).frame(0))
    client = AgentClient(host, timeout=2)
    errors: list[BaseException] = []

    def wait_forever():
        try:
            client.run("hang")  # no timeout: only close() can end this
        except AgentError as exc:
            errors.append(exc)

    t = threading.Thread(target=wait_forever)
    t.start()
    guest.settimeout(10)
    decoder, seen = FrameDecoder(), []
    while MsgType.EXEC not in seen:  # the request is out: the thread waits for its answer
        seen += [f.type for f in decoder.feed(guest.recv(4096))]
    client.close()
    t.join(2)
    assert not t.is_alive() and errors
    guest.close()


# ----------------------------------------------------------------------------- hostile agents: limits


def _trickle_file_data(guest: socket.socket, stop: threading.Event) -> None:
    """Answer a GET_FILE with one FILE_DATA(MORE) frame every 0.5 s, forever (until ``stop``)."""
    guest.recv(4096)
    while not stop.wait(0.5):
        try:
            guest.sendall(P.FileData(b"x", more=True).frame(1))
        except OSError:
            return


def test_read_file_has_a_deadline_for_the_whole_file_not_per_frame():
    stop = threading.Event()
    client, guest = _raw_agent(lambda g: _trickle_file_data(g, stop))
    try:
        with pytest.raises(AgentTimeout, match="the contents of /f"):
            client.read_file("/f", timeout=1.2)
    finally:
        stop.set()
        guest.close()


def _flood(frame: bytes, guest: socket.socket) -> None:
    guest.recv(4096)
    with contextlib.suppress(OSError):
        while True:
            guest.sendall(frame)


def test_read_file_refuses_a_file_that_outgrows_its_limit():
    chunk = P.FileData(b"x" * 4000, more=True).frame(1)
    client, guest = _raw_agent(lambda g: _flood(chunk, g))
    with pytest.raises(P.AgentFileTooLarge, match="larger than the read limit of 100000 bytes"):
        client.read_file("/f", limit=100_000)
    guest.close()


def test_run_keeps_at_most_the_output_limit_of_a_flood_and_says_so():
    def script(g: socket.socket) -> None:
        g.recv(4096)
        for _ in range(300):
            g.sendall(P.Stdout(b"y" * 4000).frame(1))
        g.sendall(P.Exit(0, False, False, 1).frame(1))

    client, guest = _raw_agent(script)
    result = client.run("flood", output_limit=10_000)
    assert (result.stdout, result.stdout_truncated) == (b"y" * 10_000, True)
    guest.close()


def test_the_clients_output_limit_is_the_default_of_run(pair):
    client, _ = pair
    client.output_limit = 100
    result = client.run("emit 1000")
    assert (len(result.stdout), result.truncated) == (100, True)


def test_output_limit_none_keeps_everything(pair):
    client, _ = pair
    client.output_limit = 100
    assert len(client.run("emit 300000", output_limit=None).stdout) == 300000


def test_a_run_without_timeout_is_bounded_by_the_clients_run_timeout(pair):
    client, _ = pair
    client.run_timeout = 0.3
    client.kill_grace = 0.3
    with pytest.raises(AgentTimeout):
        client.run("hang")


def test_a_failing_output_sink_kills_the_command_and_propagates(pair):
    client, peer = pair

    def broken(chunk: bytes) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        client.run("emit 300000", stdout=broken)
    assert client.run("echo still usable").stdout == b"still usable\n"
    assert any(frame.type == MsgType.KILL for frame in peer.received)


@pytest.mark.parametrize("bad", [-1, 1.5, "10", True])
def test_a_bad_output_limit_is_refused_naming_what_is_accepted(pair, bad):
    client, _ = pair
    with pytest.raises(ValueError, match="number of bytes >= 0 or None"):
        client.run("true", output_limit=bad)


@pytest.mark.parametrize("bad", [0, -2, float("nan")])
def test_a_bad_run_timeout_is_refused_naming_what_is_accepted(pair, bad):
    client, _ = pair
    with pytest.raises(ValueError, match="seconds > 0"):
        client.run("true", timeout=bad)


def test_a_stopped_guest_error_keeps_the_console_tail_apart(pair):
    client, _ = pair
    client.abort(P.AgentGuestStopped, "the guest stopped", "last console line")
    with pytest.raises(P.AgentGuestStopped) as info:
        client.run("true")
    assert info.value.console_tail == "last console line"


def test_command_failed_says_when_output_was_truncated():
    result = RunResult(1, b"x" * 10, b"", 0.1, stdout_truncated=True)
    assert "stdout tail (output past the limit was dropped)" in str(CommandFailed("'x'", result))
