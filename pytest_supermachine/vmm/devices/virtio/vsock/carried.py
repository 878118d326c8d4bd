"""Connections that are part of a machine's state: captured by snapshots, back after restore.

A host-initiated connection whose owner asks for it (`VsockMuxer.carry`; the machine
does so for its guest-agent connection) is recorded in the vsock device's snapshot
section when the snapshot is taken while the connection is *quiet*: established,
nothing buffered on the host side in either direction, no shutdown begun, and its
owner says its own protocol is between exchanges (the owner's callback returns a
state, not None). The record holds the ports and every credit counter, so that after
a reset or a restore the host side continues exactly where the guest's side (in guest
RAM, restored together with it) stands: no REQUEST, no handshake, no
TRANSPORT_RESET. The owner gets a fresh host socket for it and its recorded state
(`VsockMuxer.take_carried`).

Every other connection the host knew at capture is recorded only by its ports
(`stale`): the guest still holds it in RAM after a restore, the host does not, so the
host resets it (RST) at once instead of leaving the guest to wait on it.

Everything read back from a snapshot is checked here (`CarriedState.from_dict`); a
value no capture could have written raises `ValueError` naming it (the device turns
that into `DeviceStateError`, i.e. a refused snapshot).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .connection import ConnectionState, VsockConnection
from .packet import OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_RESPONSE, U32_MASK

#: What an owner returns for its connection: a JSON-able dict (bytes allowed), or None when
#: its protocol is mid-exchange (the connection is then not carried by this snapshot).
OwnerState = Callable[[], "dict[str, Any] | None"]

#: Control packets a quiet connection may still owe the guest.
_CARRIED_OPS = frozenset({OP_RESPONSE, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST})
#: Counters are byte totals of one connection: far below this in any real run.
_COUNTER_LIMIT = 1 << 62
#: The receive buffer a connection may advertise (the muxer's is 256 KiB).
_MAX_BUF_ALLOC = 1 << 30

_COUNTERS = ("peer_buf_alloc", "peer_fwd_cnt", "tx_cnt", "rx_cnt", "fwd_cnt", "last_fwd_sent")


@dataclass(frozen=True)
class CarriedState:
    """One carried connection as a snapshot records it."""

    host_port: int
    guest_port: int
    buf_alloc: int
    peer_buf_alloc: int
    peer_fwd_cnt: int
    tx_cnt: int
    rx_cnt: int
    fwd_cnt: int
    last_fwd_sent: int
    credit_requested: bool
    ctrl: tuple[tuple[int, int], ...]
    owner: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "host_port": self.host_port,
            "guest_port": self.guest_port,
            "buf_alloc": self.buf_alloc,
            **{name: getattr(self, name) for name in _COUNTERS},
            "credit_requested": self.credit_requested,
            "ctrl": [list(c) for c in self.ctrl],
            "owner": self.owner,
        }

    @classmethod
    def from_dict(cls, data: Any) -> CarriedState:
        """Check and load a recorded connection; ValueError names the first bad value."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a carried connection is a {type(data).__name__}, not a mapping")
        host_port, guest_port = port_pair([data.get("host_port"), data.get("guest_port")])
        buf_alloc = _int(data, "buf_alloc", 1, _MAX_BUF_ALLOC)
        counters = {name: _int(data, name, 0, _COUNTER_LIMIT) for name in _COUNTERS}
        if counters["peer_buf_alloc"] > U32_MASK:
            raise ValueError(f"peer_buf_alloc={counters['peer_buf_alloc']} exceeds 32 bits")
        if (
            counters["fwd_cnt"] > counters["rx_cnt"]
            or counters["rx_cnt"] - counters["fwd_cnt"] > buf_alloc
        ):
            raise ValueError("fwd_cnt/rx_cnt do not describe a quiet connection")
        credit_requested = data.get("credit_requested")
        if type(credit_requested) is not bool:
            raise ValueError(f"credit_requested={credit_requested!r} is not a bool")
        ctrl = data.get("ctrl")
        if not isinstance(ctrl, list) or len(ctrl) > 8:
            raise ValueError(f"ctrl={ctrl!r} is not a short list")
        pairs = []
        for entry in ctrl:
            if (
                not isinstance(entry, list)
                or len(entry) != 2
                or entry[0] not in _CARRIED_OPS
                or entry[1] != 0
            ):
                raise ValueError(f"ctrl entry {entry!r} is not a control packet a quiet one owes")
            pairs.append((entry[0], 0))
        owner = data.get("owner")
        if not isinstance(owner, dict):
            raise ValueError(f"owner state {owner!r} is not a mapping")
        return cls(
            host_port,
            guest_port,
            buf_alloc,
            credit_requested=credit_requested,
            ctrl=tuple(pairs),
            owner=owner,
            **counters,
        )


def capture(conn: VsockConnection, owner: OwnerState) -> CarriedState | None:
    """`conn`'s record if it is quiet and its owner has a state for it, else None."""
    if (
        conn.state is not ConnectionState.ESTABLISHED
        or conn.out
        or conn.readable
        or conn.host_eof
        or conn.user_gone
        or conn.wr_shut
        or conn.guest_shut
        or conn.deadline is not None
        or any(c not in {(op, 0) for op in _CARRIED_OPS} for c in conn.ctrl)
        or _has_unread(conn.sock)
    ):
        return None
    state = owner()
    if state is None:
        return None
    return CarriedState(
        conn.host_port,
        conn.guest_port,
        conn.buf_alloc,
        conn.peer_buf_alloc,
        conn.peer_fwd_cnt,
        conn.tx_cnt,
        conn.rx_cnt,
        conn.fwd_cnt,
        conn.last_fwd_sent,
        conn.credit_requested,
        tuple(conn.ctrl),
        state,
    )


def revive(state: CarriedState, sock: socket.socket, guest_cid: int) -> VsockConnection:
    """An established connection continuing from `state`, bridged to `sock` (our end)."""
    conn = VsockConnection(
        state.host_port,
        state.guest_port,
        sock,
        ConnectionState.ESTABLISHED,
        guest_cid=guest_cid,
        buf_alloc=state.buf_alloc,
    )
    for name in _COUNTERS:
        setattr(conn, name, getattr(state, name))
    conn.credit_requested = state.credit_requested
    for op, flags in state.ctrl:
        conn.queue_control(op, flags)
    return conn


def port_pair(value: Any) -> tuple[int, int]:
    """A recorded (host port, guest port) pair, checked."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"{value!r} is not a (host port, guest port) pair")
    for port in value:
        if type(port) is not int or not 0 <= port <= U32_MASK:
            raise ValueError(f"port {port!r} is not a 32-bit port number")
    return value[0], value[1]


def _int(data: Mapping[str, Any], name: str, low: int, high: int) -> int:
    value = data.get(name)
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"{name}={value!r} is outside {low}..{high}")
    return value


def _has_unread(sock: socket.socket) -> bool:
    """Has the user written bytes (or closed its end) that the muxer has not seen yet?"""
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        pass  # a broken socket is not quiet
    return True  # bytes, or EOF (the user closed its end): not quiet either way


@dataclass
class CarriedConnection:
    """A carried connection after restore: the owner's end of its socket and its state."""

    socket: socket.socket
    host_port: int
    guest_port: int
    owner: dict[str, Any]


__all__ = ["CarriedConnection", "CarriedState", "OwnerState", "capture", "port_pair", "revive"]
