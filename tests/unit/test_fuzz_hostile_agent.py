"""Fuzz tier: hostile agent frame streams against the host's `AgentClient` (issue 10).

A hypothesis-generated "agent" handshakes (or not), then answers one host call
(`run`, `read_file`, `write_file`, `ping`) with a stream of actions: valid
frames of every type for the right, a wrong or the connection's request id,
floods of output or file data, random bytes, pauses, and an ending (hang up,
or fall silent). Every call must end within its deadline and either return
(accepted, with output and file data inside their limits) or raise an
`AgentError` (refused cleanly). Anything else — another exception, a call
still running after its deadline — is "other", and there must be none.

Bounded in time: ``SUPERMACHINE_FUZZ_EXAMPLES`` examples (default 150, each at
most ~0.5 s); the counts of each outcome class are printed.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_supermachine.vmm import agent as P
from pytest_supermachine.vmm.agent import AgentClient, AgentError, Frame, FrameDecoder

pytestmark = pytest.mark.unit

EXAMPLES = int(os.environ.get("SUPERMACHINE_FUZZ_EXAMPLES", "150"))
CALL_TIMEOUT = 0.3
KILL_GRACE = 0.2
SLACK = 5.0  # past the deadline before a call counts as hung (a loaded 2-CPU host)
OUTPUT_LIMIT = 10_000
READ_LIMIT = 20_000

payloads = st.one_of(
    st.binary(max_size=64),
    st.builds(
        lambda m: m.encode_payload(),
        st.sampled_from(
            [
                P.Ok(),
                P.Pong(b"x" * 8),
                P.Exit(0, False, False, 1),
                P.Exit(9, True, True, 5),
                P.Error(2, b"ENOENT"),
                P.FileData(b"abc", more=False),
                P.FileData(b"abc", more=True),
                P.Hello(),
                P.Stdout(b"out"),
                P.Stderr(b"err"),
            ]
        ),
    ),
)
request_ids = st.sampled_from([0, 1, 1, 1, 2, 0xFFFFFFFF])
frame_action = st.builds(
    lambda t, rid, body: ("frame", Frame(t, rid, body).encode()),
    st.sampled_from(sorted(P.TYPE_NAMES)),
    request_ids,
    payloads,
)
flood_action = st.builds(
    lambda msg, rid, n: ("flood", msg.frame(rid) * n),
    st.sampled_from([P.Stdout(b"o" * 4000), P.Stderr(b"e" * 4000), P.FileData(b"f" * 4000, True)]),
    request_ids,
    st.integers(1, 40),
)
garbage_action = st.builds(lambda b: ("garbage", b), st.binary(min_size=1, max_size=200))
pause_action = st.builds(lambda ms: ("pause", ms), st.integers(0, 50))
hostile_actions = st.lists(
    st.one_of(frame_action, frame_action, flood_action, flood_action, garbage_action, pause_action),
    max_size=8,
)
# Streams a call can survive: floods of its own request, frames for requests the
# host is not waiting for (dropped), pauses.
stray_action = st.builds(
    lambda t, rid, body: ("frame", Frame(t, rid, body).encode()),
    st.sampled_from(sorted(P.TYPE_NAMES)),
    st.sampled_from([2, 77, 0xFFFFFFFF]),
    payloads,
)
own_flood = st.builds(
    lambda msg, n: ("flood", msg.frame(1) * n),
    st.sampled_from([P.Stdout(b"o" * 4000), P.Stderr(b"e" * 4000), P.FileData(b"f" * 4000, True)]),
    st.integers(1, 40),
)
plausible_actions = st.lists(st.one_of(stray_action, own_flood, pause_action), max_size=8)
actions = st.one_of(hostile_actions, plausible_actions)
endings = st.sampled_from(["hangup", "silence", "answer", "answer", "answer", "exit", "ok"])
calls = st.sampled_from(["run", "read_file", "write_file", "ping"])
handshakes = st.sampled_from(["hello", "hello", "hello", "wrong-version", "garbage", "silence"])

OUTCOMES: Counter[str] = Counter()


ANSWERS = {
    "run": P.Exit(0, False, False, 1),
    "read_file": P.FileData(b"end", more=False),
    "write_file": P.Ok(),
    "ping": P.Pong(b"12345678"),
}


def _ending_frame(ending: str, call: str) -> bytes:
    """The last frame: the call's own answer, another call's, or none (hang up / fall silent)."""
    msg = {"answer": ANSWERS[call], "exit": ANSWERS["run"], "ok": ANSWERS["write_file"]}.get(ending)
    return b"" if msg is None else msg.frame(1)


def _serve(
    guest: socket.socket,
    handshake: str,
    script: list,
    ending: str,
    call: str,
    done: threading.Event,
) -> None:
    decoder = FrameDecoder()
    with contextlib.suppress(OSError, P.AgentProtocolError):
        while not decoder.feed(guest.recv(4096)):
            pass
        if handshake == "hello":
            guest.sendall(P.Hello(max_frame=8192, max_inflight=4).frame(0))
        elif handshake == "wrong-version":
            guest.sendall(P.Hello(version=P.PROTOCOL_VERSION + 1).frame(0))
        elif handshake == "garbage":
            guest.sendall(b"\x00\xff" * 20)
        else:
            done.wait()
            return
        guest.settimeout(CALL_TIMEOUT)
        with contextlib.suppress(TimeoutError):
            guest.recv(65536)  # the request (ping's answer must echo what the host sent)
        for kind, data in script:
            if kind == "pause":
                time.sleep(data / 1000)
            else:
                guest.sendall(data)
        guest.sendall(_ending_frame(ending, call))
        if ending == "silence":
            done.wait()
        guest.shutdown(socket.SHUT_WR)


def _call(client: AgentClient, call: str) -> Callable[[], object]:
    return {
        "run": lambda: client.run("x", timeout=CALL_TIMEOUT, output_limit=OUTPUT_LIMIT),
        "read_file": lambda: client.read_file("/f", timeout=CALL_TIMEOUT, limit=READ_LIMIT),
        "write_file": lambda: client.write_file("/f", b"d" * 20000, timeout=CALL_TIMEOUT),
        "ping": lambda: client.ping(b"12345678"),
    }[call]


def _classify(handshake: str, script: list, ending: str, call: str) -> str:
    host, guest = socket.socketpair()
    done = threading.Event()
    server = threading.Thread(
        target=_serve, args=(guest, handshake, script, ending, call, done), daemon=True
    )
    server.start()
    outcome: list[str] = []

    def attempt() -> None:
        try:
            client = AgentClient(host, timeout=CALL_TIMEOUT, kill_grace=KILL_GRACE)
        except AgentError:
            outcome.append("refused cleanly")
            return
        except BaseException as exc:
            outcome.append(f"other: handshake raised {exc!r}")
            return
        try:
            value = _call(client, call)()
            if isinstance(value, P.RunResult) and (
                len(value.stdout) > OUTPUT_LIMIT or len(value.stderr) > OUTPUT_LIMIT
            ):
                outcome.append(f"other: kept {len(value.stdout)}+{len(value.stderr)} bytes")
            elif isinstance(value, bytes) and len(value) > READ_LIMIT:
                outcome.append(f"other: read {len(value)} bytes")
            else:
                outcome.append("accepted")
        except AgentError:
            outcome.append("refused cleanly")
        except BaseException as exc:
            outcome.append(f"other: {call} raised {exc!r}")
        finally:
            client.close()

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(CALL_TIMEOUT * 2 + KILL_GRACE + SLACK)
    done.set()
    result = outcome[0] if outcome else "other: hang"
    with contextlib.suppress(OSError):
        host.close()
    guest.close()
    server.join(5)
    return result


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(handshakes, actions, endings, calls)
def _fuzz_one(handshake: str, script: list, ending: str, call: str) -> None:
    outcome = _classify(handshake, script, ending, call)
    OUTCOMES[outcome.split(":")[0] if outcome.startswith("other") else outcome] += 1
    assert not outcome.startswith("other"), (outcome, handshake, script, ending, call)


def test_hostile_agent_streams_end_in_time_as_a_result_or_an_agent_error(capsys):
    OUTCOMES.clear()
    started = time.monotonic()
    try:
        _fuzz_one()
    finally:
        with capsys.disabled():
            counts = {"refused cleanly": 0, "accepted": 0, "other": 0, **OUTCOMES}
            print(
                f"\nfuzz hostile agent: {sum(counts.values())} streams in "
                f"{time.monotonic() - started:.1f} s: "
                + ", ".join(f"{k} {v}" for k, v in counts.items())
            )
