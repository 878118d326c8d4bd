"""The guest's side of virtio-fs, in Python, for tests: what Linux's fuse/virtio_fs driver sends.

`FuseGuest` drives a `VirtioFs` device through the real virtio-mmio
transport (`tests.virtio_driver`) over a bytearray guest memory: each
request is one chain (``fuse_in_header`` + arguments readable, room for the
reply writable) on the request queue (or the hiprio queue for FORGET), and
the reply is parsed from the guest buffers the device wrote. Struct layouts
come from the same ``linux/fuse.h`` extraction the device uses.

`raw` sends arbitrary bytes (hostile tests); the named helpers (`lookup`,
`read`, ...) return ``(errno, parsed payload)`` with errno 0 on success, so
tests can assert on error codes without exceptions in the way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from pytest_supermachine.vmm.devices.hub import pack_state, unpack_state
from pytest_supermachine.vmm.devices.virtio.fs import VirtioFs
from pytest_supermachine.vmm.devices.virtio.fs.device import HIPRIO_QUEUE
from pytest_supermachine.vmm.devices.virtio.fs.uapi import FUSE, OPCODES
from pytest_supermachine.vmm.devices.virtio.mmio import VirtioMmioTransport
from pytest_supermachine.vmm.memory import GuestMemory
from tests.virtio_driver import VirtioMmioDriver

MEM = 8 << 20
REQUEST_QUEUE = 1
ROOT = 1
OUT_HEADER = FUSE.sizeof("fuse_out_header")
DEFAULT_ROOM = 256 * 1024


@dataclass
class Reply:
    """One reply as the guest sees it: header fields plus payload bytes."""

    length: int
    error: int
    unique: int
    payload: bytes
    used: int

    @property
    def errno(self) -> int:
        return -self.error


class FuseGuest:
    """A FUSE session against `device`, played from the guest side."""

    def __init__(self, device: VirtioFs, *, init: bool = True) -> None:
        self.device = device
        self.memory = GuestMemory.from_bytearray(bytearray(MEM))
        self.transport = VirtioMmioTransport(device, self.memory)
        self.driver = VirtioMmioDriver(self.transport, self.memory)
        self.driver.init()
        self.queues = [self.driver.setup_queue(i, 64) for i in range(1 + device.num_request_queues)]
        self.driver.driver_ok()
        self._heap = self.driver.alloc.checkpoint()
        self.unique = 0
        if init:
            err, out = self.init()
            assert err == 0, f"INIT failed: {os.strerror(err)}"
            self.init_out = out

    def restore_into(self, device: VirtioFs) -> None:
        """Continue this session on `device`: the transport state (device state included) is
        captured, encoded as a snapshot stores it, and restored into a fresh transport for
        `device` over the same guest memory, as a restore in another process does."""
        state = unpack_state(pack_state(self.transport.state()))
        transport = VirtioMmioTransport(device, self.memory)
        transport.restore_state(state)
        transport.set_interrupt(self.driver._on_interrupt)
        self.driver.transport = transport
        self.transport, self.device = transport, device

    # -- transport ------------------------------------------------------------------------
    def raw(
        self, request: bytes, room: int = DEFAULT_ROOM, *, queue: int = REQUEST_QUEUE
    ) -> Reply | None:
        """Send `request` bytes as one chain; the reply, or None if the device wrote nothing."""
        self.driver.alloc.rewind(self._heap)
        q = self.queues[queue]
        req = q.submit([request], [room] if room else [])
        q.kick()
        used = q.used()
        assert [h for h, _ in used] == [req.head], f"device did not complete the request: {used}"
        n = used[0][1]
        if n == 0:
            return None
        data = req.written()[:n]
        hdr = FUSE.parse("fuse_out_header", data)
        assert hdr is not None, f"reply shorter than fuse_out_header: {data!r}"
        return Reply(int(hdr.len), int(hdr.error), int(hdr.unique), data[OUT_HEADER:], n)

    def request(
        self, opcode: str, nodeid: int, body: bytes = b"", *, room: int = DEFAULT_ROOM
    ) -> Reply | None:
        """A well-formed request: header for `opcode` on `nodeid`, then `body`."""
        self.unique += 1
        hdr = FUSE.build(
            "fuse_in_header",
            len=FUSE.sizeof("fuse_in_header") + len(body),
            opcode=OPCODES[opcode],
            unique=self.unique,
            nodeid=nodeid,
        )
        queue = HIPRIO_QUEUE if opcode in ("FUSE_FORGET", "FUSE_BATCH_FORGET") else REQUEST_QUEUE
        return self.raw(hdr + body, room, queue=queue)

    def call(
        self,
        opcode: str,
        nodeid: int,
        body: bytes = b"",
        out: str | None = None,
        *,
        room: int = DEFAULT_ROOM,
    ) -> tuple[int, Any]:
        """``(errno, payload)``: payload parsed as ``struct <out>`` if given, else raw bytes."""
        reply = self.request(opcode, nodeid, body, room=room)
        assert reply is not None, f"{opcode} got no reply"
        assert reply.length == reply.used, "fuse_out_header.len differs from the bytes written"
        assert reply.unique == self.unique
        if reply.error:
            assert not reply.payload, "an error reply carries no payload"
            return reply.errno, None
        return 0, FUSE.parse(out, reply.payload) if out else reply.payload

    # -- operations -------------------------------------------------------------------------
    def init(self, flags: int = 0xFFFF_FFFF, flags2: int = 0xFFFF_FFFF) -> tuple[int, Any]:
        body = FUSE.build(
            "fuse_init_in", major=7, minor=38, max_readahead=1 << 17, flags=flags, flags2=flags2
        )
        return self.call("FUSE_INIT", 0, body, "fuse_init_out")

    def lookup(self, parent: int, name: bytes) -> tuple[int, Any]:
        return self.call("FUSE_LOOKUP", parent, name + b"\0", "fuse_entry_out")

    def walk(self, path: str) -> int:
        """Node id of root-relative `path`, by LOOKUP per component (asserting success)."""
        node = ROOT
        for part in path.split("/"):
            if part:
                err, entry = self.lookup(node, os.fsencode(part))
                assert err == 0, f"lookup {part!r} in {path!r}: {os.strerror(err)}"
                node = int(entry.nodeid)
        return node

    def getattr(self, nodeid: int) -> tuple[int, Any]:
        return self.call("FUSE_GETATTR", nodeid, FUSE.build("fuse_getattr_in"), "fuse_attr_out")

    def open(self, nodeid: int, flags: int = os.O_RDONLY) -> tuple[int, int]:
        err, out = self.call(
            "FUSE_OPEN", nodeid, FUSE.build("fuse_open_in", flags=flags), "fuse_open_out"
        )
        return err, int(out.fh) if out is not None else 0

    def read(self, nodeid: int, fh: int, size: int, offset: int = 0) -> tuple[int, bytes]:
        body = FUSE.build("fuse_read_in", fh=fh, offset=offset, size=size)
        return self.call("FUSE_READ", nodeid, body)

    def read_all(self, nodeid: int, fh: int, chunk: int = 128 * 1024) -> bytes:
        out = b""
        while True:
            err, data = self.read(nodeid, fh, chunk, len(out))
            assert err == 0, os.strerror(err)
            if not data:
                return out
            out += data

    def write(self, nodeid: int, fh: int, data: bytes, offset: int = 0) -> tuple[int, Any]:
        body = FUSE.build("fuse_write_in", fh=fh, offset=offset, size=len(data)) + data
        return self.call("FUSE_WRITE", nodeid, body, "fuse_write_out")

    def release(self, nodeid: int, fh: int, *, directory: bool = False) -> int:
        op = "FUSE_RELEASEDIR" if directory else "FUSE_RELEASE"
        return self.call(op, nodeid, FUSE.build("fuse_release_in", fh=fh))[0]

    def opendir(self, nodeid: int) -> tuple[int, int]:
        err, out = self.call("FUSE_OPENDIR", nodeid, FUSE.build("fuse_open_in"), "fuse_open_out")
        return err, int(out.fh) if out is not None else 0

    def readdir(
        self, nodeid: int, fh: int, *, plus: bool = False, size: int = 4096
    ) -> list[tuple[bytes, int, Any]]:
        """Every entry as ``(name, dirent type, entry_out or None)``, following offsets to the end."""
        entries: list[tuple[bytes, int, Any]] = []
        offset = 0
        op = "FUSE_READDIRPLUS" if plus else "FUSE_READDIR"
        while True:
            err, data = self.call(
                op, nodeid, FUSE.build("fuse_read_in", fh=fh, offset=offset, size=size)
            )
            assert err == 0, os.strerror(err)
            if not data:
                return entries
            pos = 0
            while pos < len(data):
                entry = None
                if plus:
                    entry = FUSE.parse("fuse_entry_out", data, pos)
                    pos += FUSE.sizeof("fuse_entry_out")
                d = FUSE.parse("fuse_dirent", data, pos)
                start = pos + FUSE.sizeof("fuse_dirent")
                name = data[start : start + d.namelen]
                entries.append((name, int(d.type), entry))
                offset = int(d.off)
                pos = start + d.namelen + (-(FUSE.sizeof("fuse_dirent") + d.namelen) % 8)

    def readlink(self, nodeid: int) -> tuple[int, bytes]:
        return self.call("FUSE_READLINK", nodeid)

    def create(
        self, parent: int, name: bytes, mode: int = 0o644, flags: int = os.O_WRONLY
    ) -> tuple[int, Any, int]:
        body = FUSE.build("fuse_create_in", flags=flags, mode=0o100000 | mode) + name + b"\0"
        err, data = self.call("FUSE_CREATE", parent, body)
        if err:
            return err, None, 0
        entry = FUSE.parse("fuse_entry_out", data)
        opened = FUSE.parse("fuse_open_out", data, FUSE.sizeof("fuse_entry_out"))
        return 0, entry, int(opened.fh)


def fds_under(prefix: str) -> list[str]:
    """This process's open fds whose target lies under `prefix`."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:  # the fd listdir itself used
            continue
        if target.startswith(prefix):
            found.append(target)
    return found
