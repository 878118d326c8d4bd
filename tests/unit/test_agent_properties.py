"""Property tests of the agent framing: hostile bytes give AgentProtocolError, never anything else.

What is promised (agent.py): `FrameDecoder.feed` and `decode_message` raise
only `AgentProtocolError` for any input; chunking never changes what is
decoded; the client neither hangs nor raises a foreign exception when the
agent sends garbage.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_supermachine.vmm import agent as P
from pytest_supermachine.vmm.agent import (
    AgentClient,
    AgentError,
    AgentProtocolError,
    Frame,
    FrameDecoder,
    MsgType,
)

pytestmark = pytest.mark.unit

KNOWN_TYPES = sorted(P.TYPE_NAMES)
FAST = settings(max_examples=50, deadline=None)

frames = st.builds(
    Frame,
    st.sampled_from(KNOWN_TYPES),
    st.integers(0, 0xFFFFFFFF),
    st.binary(max_size=300),
)


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    out, prev = [], 0
    for p in [*points, len(data)]:
        out.append(data[prev:p])
        prev = p
    return out


def _decode_everything(data: bytes, max_frame: int = P.MAX_FRAME) -> list[Frame]:
    decoder = FrameDecoder(max_frame)
    result = decoder.feed(data)
    for frame in result:
        with contextlib.suppress(AgentProtocolError):
            P.decode_message(frame)
    decoder.close()
    return result


@FAST
@given(st.lists(frames, max_size=8), st.lists(st.integers(0, 10_000), max_size=20))
def test_any_chunking_decodes_the_same_frames(frame_list, cuts):
    stream = b"".join(f.encode() for f in frame_list)
    decoder = FrameDecoder()
    got = [f for chunk in _chunks(stream, cuts) for f in decoder.feed(chunk)]
    decoder.close()
    assert got == frame_list


@FAST
@given(st.binary(max_size=2000))
def test_random_bytes_raise_only_protocol_errors(data):
    with contextlib.suppress(AgentProtocolError):
        _decode_everything(data)


@FAST
@given(st.sampled_from(KNOWN_TYPES), st.binary(max_size=400))
def test_random_payloads_of_every_type_raise_only_protocol_errors(type_, payload):
    with contextlib.suppress(AgentProtocolError):
        P.decode_message(Frame(type_, 1, payload))


@FAST
@given(frames, st.integers(1, 10_000))
def test_a_truncated_stream_is_a_protocol_error_at_close(frame, cut):
    data = frame.encode()
    cut = 1 + cut % (len(data) - 1)  # at least one byte in, at least one missing
    decoder = FrameDecoder()
    assert decoder.feed(data[:cut]) == []
    with pytest.raises(AgentProtocolError, match="inside a frame"):
        decoder.close()


@FAST
@given(st.integers(4096, 0xFFFFFFFF), st.integers(4096, P.MAX_FRAME))
def test_lengths_over_the_bound_are_refused_from_the_header_alone(length, bound):
    header = struct.pack("<IHHI", length, MsgType.STDOUT, 0, 1)
    decoder = FrameDecoder(bound)
    if length > bound:
        with pytest.raises(AgentProtocolError):
            decoder.feed(header)
    else:
        assert decoder.feed(header) == []


@FAST
@given(
    st.lists(
        st.binary(min_size=1, max_size=20).filter(lambda b: b"\0" not in b), min_size=1, max_size=5
    ),
    st.dictionaries(
        st.binary(min_size=1, max_size=8).filter(lambda b: b"\0" not in b and b"=" not in b),
        st.binary(max_size=8).filter(lambda b: b"\0" not in b),
        max_size=4,
    ),
    st.integers(0, 0xFFFFFFFF),
    st.booleans(),
)
def test_exec_round_trips_for_any_valid_fields(argv, env, timeout_ms, stdin):
    msg = P.Exec(tuple(argv), tuple(k + b"=" + v for k, v in env.items()), b"/w", timeout_ms, stdin)
    assert P.Exec.decode(msg.encode_payload()) == msg


# The client over a socketpair: the agent handshakes, then sends arbitrary bytes.


def _hostile_agent(garbage: bytes) -> tuple[AgentClient, socket.socket]:
    host, guest = socket.socketpair()

    def serve() -> None:
        decoder = FrameDecoder()
        try:
            while not decoder.feed(guest.recv(4096)):
                pass
            guest.sendall(P.Hello(max_frame=4096, max_inflight=4).frame(0))
            guest.recv(4096)  # the request
            guest.sendall(garbage)
            guest.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    threading.Thread(target=serve, daemon=True).start()
    return AgentClient(host, timeout=2), guest


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_client_given_garbage_raises_an_agent_error_and_never_hangs(garbage):
    client, guest = _hostile_agent(garbage)
    try:
        with pytest.raises(AgentError) as raised:  # protocol error or closed connection
            client.run("true", timeout=1)
        assert not isinstance(raised.value, P.AgentTimeout), f"the client hung: {raised.value}"
    finally:
        client.close()
        guest.close()


@settings(max_examples=40, deadline=None)
@given(st.lists(frames, max_size=4))
def test_client_given_wellformed_but_wrong_frames_raises_an_agent_error(frame_list):
    client, guest = _hostile_agent(b"".join(f.encode() for f in frame_list))
    try:
        result = client.run("true", timeout=1)
    except P.AgentTimeout as e:
        pytest.fail(f"the client hung: {e}")
    except AgentError:
        pass
    else:  # only an EXIT for the request (id 1) may end it well
        assert any(f.type == MsgType.EXIT and f.request_id == 1 for f in frame_list), result
    finally:
        client.close()
        guest.close()
