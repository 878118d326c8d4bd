"""The user-mode network behind the NIC: libslirp, bound with cffi in ABI mode.

libslirp (QEMU's user networking, Debian ``libslirp0``) is a TCP/IP stack
in a library: the guest's TCP connections and UDP datagrams become ordinary
host sockets of this process, so networking needs no root, no tap and no
bridge. It serves the guest network `SLIRP_ADDRESSING` (guest 10.0.2.15/24,
gateway 10.0.2.2 = the host's loopback, DNS proxy 10.0.2.3).

**Why cffi ABI mode** (``ffi.dlopen("libslirp.so.0")`` with a hand-written
cdef) rather than the API mode of the C core: nothing is compiled, so the
package installs and imports on a machine without ``libslirp-dev`` (the NIC
is then unavailable with a clear error, everything else works), and the few
declarations used are libslirp's stable, versioned ABI (``SlirpConfig``
carries its own version; this binding uses version 4, libslirp ≥ 4.5).
The cdef mirrors ``/usr/include/slirp/libslirp.h``; ``struct in6_addr`` is
declared with 32-bit members because its alignment (4) fixes the offsets of
the fields that follow it.

**Threading.** libslirp is not thread-safe: every call into it is made
under one lock. `SlirpBackend.start` runs the poll loop (`run_once`) in a
thread the backend owns; `send` (the device's tx path, another thread)
feeds frames with ``slirp_input`` under the same lock and wakes the loop,
whose poll set may have changed. Frames for the guest reach the receiver
from inside those calls.

**Snapshots.** libslirp has ``slirp_state_save/load``, but what it saves is
only meaningful with the same host sockets still open, which a restored VM
(another process, or the same one much later) does not have. So the backend
keeps no state across a restore or reset: `reset` destroys the stack and
builds a fresh one with the same exposed ports, every connection is gone,
and the guest learns it from an RST as soon as it sends on one (see
`device.VirtioNet.reset_connections`, which also provokes that at once).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import cffi

from .....errors import SupermachineError
from .backend import SLIRP_ADDRESSING, GuestAddressing

log = logging.getLogger(__name__)

_CDEF = """
typedef struct Slirp Slirp;
typedef ssize_t (*SlirpReadCb)(void *buf, size_t len, void *opaque);
typedef ssize_t (*SlirpWriteCb)(const void *buf, size_t len, void *opaque);
typedef void (*SlirpTimerCb)(void *opaque);
typedef int (*SlirpAddPollCb)(int fd, int events, void *opaque);
typedef int (*SlirpGetREventsCb)(int idx, void *opaque);
typedef enum SlirpTimerId { SLIRP_TIMER_RA, SLIRP_TIMER_NUM } SlirpTimerId;

struct in_addr { uint32_t s_addr; };
struct in6_addr { uint32_t s6_addr32[4]; };
struct sockaddr_in;
struct sockaddr_in6;

typedef struct SlirpCb {
    SlirpWriteCb send_packet;
    void (*guest_error)(const char *msg, void *opaque);
    int64_t (*clock_get_ns)(void *opaque);
    void *(*timer_new)(SlirpTimerCb cb, void *cb_opaque, void *opaque);
    void (*timer_free)(void *timer, void *opaque);
    void (*timer_mod)(void *timer, int64_t expire_time, void *opaque);
    void (*register_poll_fd)(int fd, void *opaque);
    void (*unregister_poll_fd)(int fd, void *opaque);
    void (*notify)(void *opaque);
    void (*init_completed)(Slirp *slirp, void *opaque);
    void *(*timer_new_opaque)(SlirpTimerId id, void *cb_opaque, void *opaque);
} SlirpCb;

typedef struct SlirpConfig {
    uint32_t version;
    int restricted;
    bool in_enabled;
    struct in_addr vnetwork;
    struct in_addr vnetmask;
    struct in_addr vhost;
    bool in6_enabled;
    struct in6_addr vprefix_addr6;
    uint8_t vprefix_len;
    struct in6_addr vhost6;
    const char *vhostname;
    const char *tftp_server_name;
    const char *tftp_path;
    const char *bootfile;
    struct in_addr vdhcp_start;
    struct in_addr vnameserver;
    struct in6_addr vnameserver6;
    const char **vdnssearch;
    const char *vdomainname;
    size_t if_mtu;
    size_t if_mru;
    bool disable_host_loopback;
    bool enable_emu;
    struct sockaddr_in *outbound_addr;
    struct sockaddr_in6 *outbound_addr6;
    bool disable_dns;
    bool disable_dhcp;
} SlirpConfig;

Slirp *slirp_new(const SlirpConfig *cfg, const SlirpCb *callbacks, void *opaque);
void slirp_cleanup(Slirp *slirp);
void slirp_pollfds_fill(Slirp *slirp, uint32_t *timeout, SlirpAddPollCb add_poll, void *opaque);
void slirp_pollfds_poll(Slirp *slirp, int select_error, SlirpGetREventsCb get_revents,
                        void *opaque);
void slirp_input(Slirp *slirp, const uint8_t *pkt, int pkt_len);
void slirp_handle_timer(Slirp *slirp, SlirpTimerId id, void *cb_opaque);
int slirp_add_hostfwd(Slirp *slirp, int is_udp, struct in_addr host_addr, int host_port,
                      struct in_addr guest_addr, int guest_port);
int slirp_remove_hostfwd(Slirp *slirp, int is_udp, struct in_addr host_addr, int host_port);
const char *slirp_version_string(void);
"""

#: SlirpConfig version this binding fills in (fields up to disable_dhcp).
_CONFIG_VERSION = 4
#: sizeof(SlirpConfig) on x86-64 with libslirp 4.7 (checked at load: a wrong cdef is fatal).
_CONFIG_SIZE = 184

# SLIRP_POLL_* <-> poll(2) events.
_TO_POLL = (
    (1, select.POLLIN),
    (2, select.POLLOUT),
    (4, select.POLLPRI),
    (8, select.POLLERR),
    (16, select.POLLHUP),
)

_ffi = cffi.FFI()
_ffi.cdef(_CDEF)
_lib: Any = None


class SlirpUnavailableError(SupermachineError):
    """libslirp cannot be loaded (Debian: ``apt install libslirp0``)."""


def load_libslirp() -> Any:
    """The dlopen()ed library (once per process); `SlirpUnavailableError` if absent."""
    global _lib
    if _lib is None:
        try:
            lib = _ffi.dlopen("libslirp.so.0")
        except OSError as e:
            raise SlirpUnavailableError(
                f"the NIC needs libslirp (Debian/Ubuntu: apt install libslirp0): {e}"
            ) from None
        if _ffi.sizeof("SlirpConfig") != _CONFIG_SIZE:
            raise SlirpUnavailableError("the libslirp binding's SlirpConfig layout is wrong here")
        _lib = lib
    return _lib


def libslirp_version() -> str:
    return _ffi.string(load_libslirp().slirp_version_string()).decode()


def _in_addr(address: str) -> Any:
    value = _ffi.new("struct in_addr *")
    value.s_addr = int.from_bytes(ipaddress.IPv4Address(address).packed, "little")
    return value[0]


class SlirpBackend:
    """A libslirp network for one NIC (see the module docstring).

    `addressing` is what the guest is configured with (libslirp's defaults).
    Frames for the guest go to the receiver (`set_receiver`); until one is
    set they are dropped (TCP retransmits). `expose` forwards a host port on
    the loopback to a guest port. Call `start` to run the poll loop in the
    backend's own thread, or drive `run_once` yourself; `close` stops both.
    """

    def __init__(self, addressing: GuestAddressing = SLIRP_ADDRESSING) -> None:
        self._lib = load_libslirp()
        self.addressing = addressing
        self._lock = threading.RLock()
        #: Bumped by `reset`: poll results of an older stack are discarded.
        self._generation = 0
        #: The generation whose fds the poll thread is blocked on, if it is.
        self._polling: int | None = None
        self._out_of_poll = threading.Condition(self._lock)
        self._receiver: Callable[[bytes], None] | None = None
        self._wakeup = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        #: timer handle -> [SlirpTimerId, cb_opaque, expiry in ms or None]
        self._timers: dict[int, list[Any]] = {}
        self._next_timer = 1
        self._poll_fds: list[tuple[int, int]] = []
        self._revents: dict[int, int] = {}
        #: (guest_port, host_address, host_port) of every exposed port, re-created by reset.
        self._forwards: list[tuple[int, str, int]] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False
        self.frames_to_guest = 0
        self.frames_from_guest = 0
        self._callbacks = self._make_callbacks()
        try:
            self._slirp = self._new_stack()
        except BaseException:
            os.close(self._wakeup)
            raise

    # -- the libslirp instance ------------------------------------------------------------
    def _make_callbacks(self) -> Any:
        cb = _ffi.new("SlirpCb *")
        keep = [
            _ffi.callback(
                "ssize_t(const void *, size_t, void *)", self._send_packet, onerror=_cb_error
            ),
            _ffi.callback("void(const char *, void *)", self._guest_error),
            _ffi.callback("int64_t(void *)", lambda _o: time.monotonic_ns()),
            _ffi.callback("void(void *, void *)", self._timer_free, onerror=_cb_error),
            _ffi.callback("void(void *, int64_t, void *)", self._timer_mod, onerror=_cb_error),
            _ffi.callback("void(int, void *)", lambda _fd, _o: self._wake()),
            _ffi.callback("void(int, void *)", lambda _fd, _o: None),
            _ffi.callback("void(void *)", lambda _o: self._wake()),
            _ffi.callback(
                "void *(SlirpTimerId, void *, void *)", self._timer_new, onerror=_cb_error
            ),
            _ffi.callback("int(int, int, void *)", self._add_poll, onerror=_cb_error),
            _ffi.callback("int(int, void *)", self._get_revents, onerror=_cb_error),
        ]
        (
            cb.send_packet,
            cb.guest_error,
            cb.clock_get_ns,
            cb.timer_free,
            cb.timer_mod,
            cb.register_poll_fd,
            cb.unregister_poll_fd,
            cb.notify,
            cb.timer_new_opaque,
        ) = keep[:9]
        self._add_poll_cb, self._get_revents_cb = keep[9:]
        self._keepalive = keep
        return cb

    def _new_stack(self) -> Any:
        a = self.addressing
        cfg = _ffi.new("SlirpConfig *")
        cfg.version = _CONFIG_VERSION
        cfg.restricted = 0
        cfg.in_enabled = True
        cfg.vnetwork = _in_addr(str(a.network.network_address))
        cfg.vnetmask = _in_addr(a.netmask)
        cfg.vhost = _in_addr(a.gateway)
        cfg.in6_enabled = False
        cfg.vdhcp_start = _in_addr(a.guest)
        cfg.vnameserver = _in_addr(a.dns)
        cfg.disable_dhcp = True  # the guest is configured on its command line
        slirp = self._lib.slirp_new(cfg, self._callbacks, _ffi.NULL)
        if slirp == _ffi.NULL:
            raise SupermachineError("slirp_new failed (invalid guest addressing?)")
        return slirp

    # -- callbacks (called by libslirp, always under self._lock) ------------------------------
    def _send_packet(self, buf: Any, length: int, _opaque: Any) -> int:
        receiver = self._receiver
        if receiver is not None:
            self.frames_to_guest += 1
            receiver(bytes(_ffi.buffer(buf, length)))
        return length

    def _guest_error(self, msg: Any, _opaque: Any) -> None:
        log.debug("slirp: guest error: %s", _ffi.string(msg).decode(errors="replace"))

    def _timer_new(self, timer_id: int, cb_opaque: Any, _opaque: Any) -> Any:
        handle = self._next_timer
        self._next_timer += 1
        self._timers[handle] = [timer_id, cb_opaque, None]
        return _ffi.cast("void *", handle)

    def _timer_free(self, timer: Any, _opaque: Any) -> None:
        self._timers.pop(int(_ffi.cast("uintptr_t", timer)), None)

    def _timer_mod(self, timer: Any, expire_ms: int, _opaque: Any) -> None:
        entry = self._timers.get(int(_ffi.cast("uintptr_t", timer)))
        if entry is not None:
            entry[2] = expire_ms
            self._wake()

    def _add_poll(self, fd: int, events: int, _opaque: Any) -> int:
        mask = 0
        for slirp_bit, poll_bit in _TO_POLL:
            if events & slirp_bit:
                mask |= poll_bit
        self._poll_fds.append((fd, mask))
        return len(self._poll_fds) - 1

    def _get_revents(self, index: int, _opaque: Any) -> int:
        revents = self._revents.get(index, 0)
        return sum(slirp_bit for slirp_bit, poll_bit in _TO_POLL if revents & poll_bit)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.eventfd_write(self._wakeup, 1)

    # -- NetBackend ------------------------------------------------------------------------
    def set_receiver(self, receiver: Callable[[bytes], None]) -> None:
        self._receiver = receiver

    def send(self, frame: bytes) -> None:
        with self._lock:
            if self._closed:
                return
            self.frames_from_guest += 1
            self._lib.slirp_input(self._slirp, frame, len(frame))
        self._wake()  # new sockets or data to write: the poll set changed

    def run_once(self, timeout: float) -> None:
        with self._lock:
            if self._closed:
                return
            generation = self._generation
            self._poll_fds = [(self._wakeup, select.POLLIN)]
            timeout_ms = _ffi.new("uint32_t *", max(0, min(int(timeout * 1000), 0xFFFFFFFF)))
            self._lib.slirp_pollfds_fill(self._slirp, timeout_ms, self._add_poll_cb, _ffi.NULL)
            wait_ms = min(timeout_ms[0], self._ms_to_next_timer())
            fds = list(self._poll_fds)
            self._polling = generation
        poller = select.poll()
        for fd, mask in fds:
            poller.register(fd, mask)
        try:
            ready = poller.poll(wait_ms)
            failed = 0
        except InterruptedError:
            ready, failed = [], 1
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._wakeup)
        index_of = {fd: i for i, (fd, _) in enumerate(fds)}
        with self._lock:
            self._polling = None
            self._out_of_poll.notify_all()
            if self._closed or generation != self._generation:
                return  # the stack these fds belonged to is gone (reset)
            self._revents = {index_of[fd]: ev for fd, ev in ready if fd in index_of}
            self._lib.slirp_pollfds_poll(self._slirp, failed, self._get_revents_cb, _ffi.NULL)
            self._revents = {}
            self._fire_timers()

    def _ms_to_next_timer(self) -> int:
        expiries = [e[2] for e in self._timers.values() if e[2] is not None]
        if not expiries:
            return 0xFFFFFFFF
        return max(0, int(min(expiries) - time.monotonic_ns() // 1_000_000))

    def _fire_timers(self) -> None:
        now_ms = time.monotonic_ns() // 1_000_000
        for entry in list(self._timers.values()):
            if entry[2] is not None and entry[2] <= now_ms:
                entry[2] = None
                self._lib.slirp_handle_timer(self._slirp, entry[0], entry[1])

    def reset(self) -> None:
        """A fresh stack: every connection is gone, exposed ports are listening again."""
        with self._lock:
            if self._closed:
                return
            self._lib.slirp_cleanup(self._slirp)
            self._timers.clear()
            old, self._generation = self._generation, self._generation + 1
            self._slirp = self._new_stack()
            # A thread blocked in poll(2) keeps the old stack's closed listening sockets
            # alive (bound); wait until it has left, or the ports cannot be bound again.
            self._wake()
            self._out_of_poll.wait_for(lambda: self._polling != old, timeout=5)
            for guest_port, host_address, host_port in self._forwards:
                if not self._add_forward(guest_port, host_address, host_port):
                    log.warning(
                        "slirp: exposed port %s:%d could not be bound again after reset",
                        host_address,
                        host_port,
                    )
        self._wake()

    # -- exposed ports ------------------------------------------------------------------------
    def expose(
        self, guest_port: int, *, host_port: int = 0, host_address: str = "127.0.0.1"
    ) -> tuple[str, int]:
        """Listen on `host_address`:`host_port` (0: a free port) and forward every TCP
        connection to the guest's `guest_port`. Returns the host address and port."""
        if not 1 <= guest_port <= 65535:
            raise ValueError(f"guest port must be 1..65535, got {guest_port}")
        with self._lock:
            if self._closed:
                raise SupermachineError("the network backend is closed")
            for _ in range(8):  # a free port found here may be taken before slirp binds it
                port = host_port or _free_tcp_port(host_address)
                if self._add_forward(guest_port, host_address, port):
                    self._forwards.append((guest_port, host_address, port))
                    return host_address, port
                if host_port:
                    break
        raise SupermachineError(
            f"cannot forward {host_address}:{host_port or '<free port>'} to guest port {guest_port}"
        )

    def unexpose(self, host_port: int, *, host_address: str = "127.0.0.1") -> None:
        with self._lock:
            self._forwards = [f for f in self._forwards if f[1:] != (host_address, host_port)]
            if not self._closed:
                self._lib.slirp_remove_hostfwd(self._slirp, 0, _in_addr(host_address), host_port)

    def _add_forward(self, guest_port: int, host_address: str, host_port: int) -> bool:
        rc = self._lib.slirp_add_hostfwd(
            self._slirp,
            0,
            _in_addr(host_address),
            host_port,
            _in_addr(self.addressing.guest),
            guest_port,
        )
        return rc == 0

    # -- the poll thread -------------------------------------------------------------------------
    def start(self) -> None:
        """Run the poll loop in a thread of the backend's own (idempotent)."""
        if self._thread is None and not self._closed:
            self._thread = threading.Thread(
                target=self._serve, name="supermachine-slirp", daemon=True
            )
            self._thread.start()

    def _serve(self) -> None:
        while not self._stopping:
            try:
                self.run_once(1.0)
            except Exception:  # a bug here must not kill networking silently
                log.exception("slirp: poll loop iteration failed")

    def close(self) -> None:
        self._stopping = True
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._lib.slirp_cleanup(self._slirp)
            self._slirp = _ffi.NULL
        os.close(self._wakeup)


def _cb_error(exc_type: type, exc: BaseException, _tb: Any) -> None:
    log.error("slirp: callback raised %s: %s", exc_type.__name__, exc)


def _free_tcp_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return s.getsockname()[1]
