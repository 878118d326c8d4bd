"""virtio-blk over a read-only base image and a copy-on-write overlay. No KVM.

The guest side is `tests.virtio_driver`: every request goes through the MMIO
registers, the rings in guest memory and the device, as it would from Linux.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_supermachine.vmm.devices.virtio.blk import (
    ID_BYTES,
    OVERLAY_BLOCK_SIZE,
    QUEUE_SIZE,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    CowDisk,
    VirtioBlock,
)
from pytest_supermachine.vmm.devices.virtio.device import VIRTIO_F_EVENT_IDX, VIRTIO_ID_BLOCK
from pytest_supermachine.vmm.devices.virtio.mmio import REG_DEVICE_ID, VirtioMmioTransport
from pytest_supermachine.vmm.memory import GuestMemory
from tests.virtio_driver import DriverQueue, Request, VirtioMmioDriver

pytestmark = pytest.mark.unit

MEM = 1 << 20
DISK = 64 * 1024  # 128 sectors, 16 overlay blocks
SERIAL = "sm-disk-0"


def pattern(n: int, seed: int = 0) -> bytes:
    """Recognisable bytes: every 512-byte sector says which sector it is."""
    return b"".join(struct.pack("<I", seed + i // 512) * 128 for i in range(0, n, 512))[:n]


@pytest.fixture
def base(tmp_path: Path) -> Path:
    p = tmp_path / "base.img"
    p.write_bytes(pattern(DISK))
    return p


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


class Blk:
    """A virtio-blk device behind its transport, driven by the test driver."""

    def __init__(self, base: Path | None, **kw) -> None:
        self.mem = GuestMemory.from_bytearray(bytearray(MEM))
        self.dev = VirtioBlock(base, serial=SERIAL, **kw)
        self.t = VirtioMmioTransport(self.dev, self.mem)
        self.drv = VirtioMmioDriver(self.t, self.mem)

    def up(self, *, exclude: int = 0, size: int | None = None) -> Blk:
        self.drv.init(exclude=exclude)
        self.q: DriverQueue = self.drv.setup_queue(0, size)
        self.drv.driver_ok()
        return self

    def submit(
        self,
        rtype: int,
        sector: int = 0,
        data: bytes = b"",
        read_len: int = 0,
        *,
        status_len: int = 1,
        split: int = 0,
        indirect: bool = False,
        kick: bool = True,
    ) -> Request:
        """One request: header, data out (optionally split in `split`-byte descriptors),
        data in, status."""
        readable = [struct.pack("<IIQ", rtype, 0, sector)]
        if data:
            step = split or len(data)
            readable += [data[i : i + step] for i in range(0, len(data), step)]
        writable = []
        if read_len:
            step = split or read_len
            writable += [min(step, read_len - i) for i in range(0, read_len, step)]
        if status_len:
            writable.append(status_len)
        req = self.q.submit(readable, writable, indirect=indirect)
        if kick:
            self.q.kick()
        return req

    def status(self, req: Request) -> int:
        return req.written()[-1]

    def read(self, sector: int, n: int, **kw) -> bytes:
        req = self.submit(VIRTIO_BLK_T_IN, sector, read_len=n, **kw)
        assert self.status(req) == VIRTIO_BLK_S_OK
        self.q.used()
        return req.written()[:-1]

    def write(self, sector: int, data: bytes, **kw) -> None:
        req = self.submit(VIRTIO_BLK_T_OUT, sector, data, **kw)
        assert self.status(req) == VIRTIO_BLK_S_OK
        self.q.used()


@pytest.fixture
def blk(base: Path) -> Iterator[Blk]:
    b = Blk(base).up()
    yield b
    b.dev.close()


# -- identity and configuration ----------------------------------------------------------------------


def test_device_id_is_block(blk: Blk):
    assert blk.drv.read32(REG_DEVICE_ID) == VIRTIO_ID_BLOCK == 2


def test_capacity_in_sectors_is_in_config(blk: Blk):
    assert struct.unpack("<Q", blk.drv.read_config(0, 8)) == (DISK // 512,)


def test_seg_max_leaves_room_for_header_and_status(blk: Blk):
    assert struct.unpack("<I", blk.drv.read_config(12, 4)) == (QUEUE_SIZE - 2,)


def test_flush_and_seg_max_are_offered(blk: Blk):
    feats = blk.drv.device_features()
    assert feats >> VIRTIO_BLK_F_FLUSH & 1 and feats >> VIRTIO_BLK_F_SEG_MAX & 1
    assert not feats >> VIRTIO_BLK_F_RO & 1


def test_read_only_volume_offers_ro(base: Path):
    assert Blk(base, read_only=True).drv.device_features() >> VIRTIO_BLK_F_RO & 1


def test_base_size_not_a_sector_multiple_rounds_up_with_zeros(tmp_path: Path):
    p = tmp_path / "odd.img"
    p.write_bytes(b"\x01" * 700)
    b = Blk(p).up()
    assert b.dev.capacity == 2
    assert b.read(0, 1024) == b"\x01" * 700 + bytes(324)


def test_blank_disk_without_a_base_reads_zeros():
    b = Blk(None, size=8192).up()
    assert b.read(0, 8192) == bytes(8192)
    b.write(3, b"\x07" * 512)
    assert b.read(3, 512) == b"\x07" * 512


def test_size_larger_than_the_base_reads_zeros_past_it(base: Path):
    b = Blk(base, size=2 * DISK).up()
    assert b.read(DISK // 512, 1024) == bytes(1024)
    assert b.read(0, 512) == pattern(512)


def test_disk_size_must_be_whole_sectors(base: Path):
    with pytest.raises(ValueError, match="multiple of 512"):
        VirtioBlock(base, size=1000)


def test_serial_longer_than_20_bytes_is_refused(base: Path):
    with pytest.raises(ValueError, match="at most 20"):
        VirtioBlock(base, serial="x" * 21)


# -- requests ---------------------------------------------------------------------------------------


def test_read_returns_base_content(blk: Blk):
    assert blk.read(5, 1024) == pattern(DISK)[5 * 512 : 7 * 512]


def test_read_completes_with_data_length_plus_status(blk: Blk):
    req = blk.submit(VIRTIO_BLK_T_IN, 0, read_len=4096)
    assert blk.q.used() == [(req.head, 4097)]
    assert blk.drv.interrupts == 1


def test_write_then_read_returns_new_data(blk: Blk):
    blk.write(9, b"\x5a" * 1024)
    assert (
        blk.read(8, 2048)
        == pattern(DISK)[8 * 512 : 9 * 512] + b"\x5a" * 1024 + pattern(DISK)[11 * 512 : 12 * 512]
    )


def test_write_completes_with_used_length_one(blk: Blk):
    req = blk.submit(VIRTIO_BLK_T_OUT, 0, b"\0" * 512)
    assert blk.q.used() == [(req.head, 1)]


def test_writes_never_touch_the_base_file(blk: Blk, base: Path):
    before, mtime = sha(base), base.stat().st_mtime_ns
    for sector in range(0, DISK // 512, 3):
        blk.write(sector, b"\xff" * 512)
    blk.submit(VIRTIO_BLK_T_FLUSH)
    assert (sha(base), base.stat().st_mtime_ns) == (before, mtime)


def test_base_image_is_opened_read_only(blk: Blk, base: Path):
    fds = [
        int(fd)
        for fd in os.listdir("/proc/self/fd")
        if os.path.realpath(f"/proc/self/fd/{fd}") == str(base.resolve())
    ]
    assert fds
    for fd in fds:
        assert os.fstat(fd) and (os.O_ACCMODE & _fd_flags(fd)) == os.O_RDONLY


def _fd_flags(fd: int) -> int:
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("flags:"):
                return int(line.split()[1], 8)
    raise AssertionError("no flags in fdinfo")


def test_partial_block_write_keeps_the_rest_of_the_block(blk: Blk):
    blk.write(1, b"\x11" * 512)  # sector 1 of overlay block 0
    assert blk.read(0, 4096) == pattern(512) + b"\x11" * 512 + pattern(DISK)[1024:4096]


def test_write_spanning_blocks_and_descriptors(blk: Blk):
    data = pattern(3 * 4096, seed=1000)
    blk.write(6, data, split=1536)  # starts mid-block, spans 4 blocks, 8 data descriptors
    assert blk.read(6, len(data), split=2048) == data
    assert blk.read(0, 3 * 512) == pattern(DISK)[: 3 * 512]


def test_indirect_requests(blk: Blk):
    blk.write(2, b"\x42" * 512, indirect=True)
    assert blk.read(2, 512, indirect=True) == b"\x42" * 512


def test_flush_succeeds(blk: Blk):
    req = blk.submit(VIRTIO_BLK_T_FLUSH)
    assert blk.status(req) == VIRTIO_BLK_S_OK


def test_get_id_returns_the_serial_nul_padded(blk: Blk):
    req = blk.submit(VIRTIO_BLK_T_GET_ID, read_len=ID_BYTES)
    assert blk.status(req) == VIRTIO_BLK_S_OK
    assert req.written()[:-1] == SERIAL.encode().ljust(20, b"\0")
    assert blk.q.used() == [(req.head, ID_BYTES + 1)]


def test_get_id_into_a_short_buffer_is_truncated(blk: Blk):
    req = blk.submit(VIRTIO_BLK_T_GET_ID, read_len=4)
    assert req.written() == SERIAL.encode()[:4] + bytes([VIRTIO_BLK_S_OK])


def test_a_20_byte_serial_has_no_nul(base: Path):
    b = Blk(base)
    b.dev.serial = b"x" * 20
    b.up()
    req = b.submit(VIRTIO_BLK_T_GET_ID, read_len=ID_BYTES)
    assert req.written()[:-1] == b"x" * 20


# -- bad requests get a status, not an exception ------------------------------------------------------


@pytest.mark.parametrize(
    ("sector", "n"),
    [(DISK // 512, 512), (DISK // 512 - 1, 1024), (2**63, 512), (2**64 - 1, 512)],
    ids=["at-end", "straddles-end", "huge-sector", "max-sector"],
)
def test_read_past_the_end_is_ioerr(blk: Blk, sector: int, n: int):
    req = blk.submit(VIRTIO_BLK_T_IN, sector, read_len=n)
    assert blk.status(req) == VIRTIO_BLK_S_IOERR
    assert req.written()[:-1] == b"\xaa" * n  # nothing written into the data buffer
    assert not blk.t.needs_reset


def test_write_past_the_end_is_ioerr(blk: Blk):
    req = blk.submit(VIRTIO_BLK_T_OUT, DISK // 512, b"\0" * 512)
    assert blk.status(req) == VIRTIO_BLK_S_IOERR
    assert blk.dev.disk.overlay_blocks() == set()


@pytest.mark.parametrize("rtype", [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT])
def test_length_not_a_sector_multiple_is_ioerr(blk: Blk, rtype: int):
    if rtype == VIRTIO_BLK_T_IN:
        req = blk.submit(rtype, 0, read_len=100)
    else:
        req = blk.submit(rtype, 0, b"x" * 100)
    assert blk.status(req) == VIRTIO_BLK_S_IOERR


def test_unknown_request_type_is_unsupp(blk: Blk):
    req = blk.submit(0x7777)
    assert blk.status(req) == VIRTIO_BLK_S_UNSUPP


def test_discard_is_unsupp_because_it_is_not_offered(blk: Blk):
    req = blk.submit(VIRTIO_BLK_T_DISCARD, data=bytes(16))
    assert blk.status(req) == VIRTIO_BLK_S_UNSUPP


def test_header_shorter_than_16_bytes_is_ioerr(blk: Blk):
    req = blk.q.submit([b"\0" * 8], [1])
    blk.q.kick()
    assert blk.status(req) == VIRTIO_BLK_S_IOERR


def test_request_without_status_byte_completes_with_nothing_written(blk: Blk):
    req = blk.submit(VIRTIO_BLK_T_IN, 0, status_len=0)
    assert blk.q.used() == [(req.head, 0)]
    assert not blk.t.needs_reset
    assert blk.read(0, 512) == pattern(512)  # and the device still works


def test_status_is_the_last_byte_of_a_longer_status_buffer(blk: Blk):
    req = blk.submit(VIRTIO_BLK_T_FLUSH, status_len=4)
    assert req.written() == b"\xaa\xaa\xaa" + bytes([VIRTIO_BLK_S_OK])


def test_a_broken_queue_needs_reset_and_reset_recovers(blk: Blk):
    blk.q.publish(QUEUE_SIZE + 3)
    blk.q.kick()
    assert blk.t.needs_reset
    blk.up()
    assert blk.read(0, 512) == pattern(512)


def test_base_image_io_error_is_ioerr(blk: Blk):
    blk.dev.close()  # the base image goes away under the device
    req = blk.submit(VIRTIO_BLK_T_IN, 0, read_len=512)
    assert blk.status(req) == VIRTIO_BLK_S_IOERR
    assert not blk.t.needs_reset


# -- read-only volumes ---------------------------------------------------------------------------------


def test_write_to_a_read_only_volume_is_ioerr(base: Path):
    b = Blk(base, read_only=True).up()
    req = b.submit(VIRTIO_BLK_T_OUT, 0, b"\0" * 512)
    assert b.status(req) == VIRTIO_BLK_S_IOERR
    assert b.read(0, 512) == pattern(512)


# -- notification suppression ---------------------------------------------------------------------------


def test_event_idx_suppresses_interrupts_until_used_event(blk: Blk):
    assert blk.drv.has_feature(VIRTIO_F_EVENT_IDX)
    blk.q.set_used_event(3)
    for _ in range(3):
        blk.read(0, 512)
    assert blk.drv.interrupts == 1  # the first completion, then quiet up to used idx 3
    blk.read(0, 512)
    assert blk.drv.interrupts == 2


def test_batched_requests_get_one_interrupt(blk: Blk):
    for i in range(8):
        blk.submit(VIRTIO_BLK_T_IN, i, read_len=512, kick=False)
    blk.q.kick()
    assert len(blk.q.used()) == 8
    assert blk.drv.interrupts == 1


def test_without_event_idx_every_kick_with_completions_interrupts(base: Path):
    b = Blk(base).up(exclude=1 << VIRTIO_F_EVENT_IDX)
    for _ in range(3):
        b.read(0, 512)
    assert b.drv.interrupts == 3


def test_device_publishes_avail_event_for_the_driver(blk: Blk):
    for _ in range(5):
        blk.read(0, 512)
    assert blk.q.avail_event() == 5


# -- the overlay is VM state -----------------------------------------------------------------------------


def test_discard_to_mark_restores_reads(blk: Blk):
    blk.write(0, b"\x01" * 512)
    m = blk.dev.mark()
    blk.write(0, b"\x02" * 512)
    blk.write(40, b"\x03" * 4096)
    blk.dev.discard_to(m)
    assert blk.read(0, 512) == b"\x01" * 512
    assert blk.read(40, 4096) == pattern(DISK)[40 * 512 : 48 * 512]


def test_discard_to_the_same_mark_works_again_and_again(blk: Blk):
    m = blk.dev.mark()
    for i in range(3):
        blk.write(8, bytes([i + 1]) * 512)
        assert blk.dev.overlay_blocks_written_since(m) == {1}
        blk.dev.discard_to(m)
        assert blk.read(8, 512) == pattern(DISK)[8 * 512 : 9 * 512]
        assert blk.dev.overlay_blocks_written_since(m) == set()


def test_blocks_written_since_a_mark(blk: Blk):
    blk.write(0, b"a" * 512)
    m = blk.dev.mark()
    blk.write(8, b"b" * 512)  # block 1
    blk.write(17, b"c" * 4096)  # blocks 2 and 3
    assert blk.dev.overlay_blocks_written_since(m) == {1, 2, 3}
    assert blk.dev.disk.overlay_blocks() == {0, 1, 2, 3}


def test_nested_marks_discard_to_the_older_one(blk: Blk):
    m1 = blk.dev.mark()
    blk.write(0, b"1" * 512)
    m2 = blk.dev.mark()
    blk.write(0, b"2" * 512)
    blk.dev.discard_to(m2)
    assert blk.read(0, 512) == b"1" * 512
    blk.dev.discard_to(m1)
    assert blk.read(0, 512) == pattern(512)
    with pytest.raises(ValueError, match="not live"):
        blk.dev.discard_to(m2)


def test_released_mark_folds_into_the_previous_one(blk: Blk):
    m1 = blk.dev.mark()
    blk.write(0, b"1" * 512)
    m2 = blk.dev.mark()
    blk.write(8, b"2" * 512)
    blk.dev.disk.release(m2)
    assert blk.dev.overlay_blocks_written_since(m1) == {0, 1}
    blk.dev.discard_to(m1)
    assert blk.dev.disk.overlay_blocks() == set()


def test_full_state_restores_the_disk_into_a_fresh_device(blk: Blk, base: Path):
    blk.write(3, b"\x33" * 512)
    blk.write(100, b"\x64" * 1024)
    state = blk.dev.state()
    b2 = Blk(base)
    b2.dev.restore_state(state)
    b2.up()
    assert b2.read(0, DISK) == blk.read(0, DISK)


def test_diff_state_holds_only_blocks_since_the_mark_and_applies_on_top(blk: Blk, base: Path):
    blk.write(0, b"\x01" * 512)
    parent = blk.dev.state()
    m = blk.dev.mark()
    blk.write(16, b"\x02" * 512)
    diff = blk.dev.state(since_mark=m)
    assert diff["overlay"]["blocks"] == [2]
    assert len(diff["overlay"]["data"]) == OVERLAY_BLOCK_SIZE

    b2 = Blk(base)
    b2.dev.restore_state(parent)
    b2.dev.restore_state(diff)
    b2.up()
    assert b2.read(0, DISK) == blk.read(0, DISK)


def test_restore_state_refuses_an_overlay_of_another_disk_size(blk: Blk, base: Path):
    state = blk.dev.state()
    with pytest.raises(ValueError, match="does not fit"):
        VirtioBlock(base, size=2 * DISK).restore_state(state)


def test_restore_state_refuses_blocks_past_the_end(blk: Blk):
    st = blk.dev.disk.state()
    st["blocks"], st["data"] = [DISK // OVERLAY_BLOCK_SIZE], bytes(OVERLAY_BLOCK_SIZE)
    with pytest.raises(ValueError, match="past the end"):
        blk.dev.disk.restore_state(st)


def test_full_restore_drops_marks(blk: Blk):
    m = blk.dev.mark()
    blk.dev.restore_state(blk.dev.state())
    with pytest.raises(ValueError, match="not live"):
        blk.dev.discard_to(m)


def test_driver_reset_keeps_the_disk_content(blk: Blk):
    blk.write(0, b"\x09" * 512)
    blk.up()  # the driver writes 0 to Status and starts over
    assert blk.read(0, 512) == b"\x09" * 512


def test_transport_state_with_the_device_restores_everything(blk: Blk, base: Path):
    blk.write(4, b"\x44" * 512)
    state = blk.t.state()
    mem2 = GuestMemory.from_bytearray(bytearray(blk.mem.buffer(0)))
    dev2 = VirtioBlock(base, serial=SERIAL)
    t2 = VirtioMmioTransport(dev2, mem2)
    t2.restore_state(state)
    assert dev2.active
    assert dev2.disk.read(4 * 512, 512) == b"\x44" * 512


# -- pages the device wrote ----------------------------------------------------------------------------------


def test_guest_pages_written_by_reads_are_recorded(blk: Blk):
    blk.t.clear_written_pages()
    req = blk.submit(VIRTIO_BLK_T_IN, 0, read_len=8192)
    gpa, n = req.writable[0]
    pages = blk.t.written_pages()
    assert set(range(gpa // 4096, (gpa + n - 1) // 4096 + 1)) <= pages
    assert blk.q.used_addr // 4096 in pages


def test_a_disk_write_records_only_status_and_used_ring_pages(blk: Blk):
    blk.t.clear_written_pages()
    req = blk.submit(VIRTIO_BLK_T_OUT, 0, b"z" * 4096)
    status_gpa = req.writable[-1][0]
    assert blk.t.written_pages() == {status_gpa // 4096, blk.q.used_addr // 4096}


# -- CowDisk on its own --------------------------------------------------------------------------------------


def test_cow_disk_reads_base_and_overlay_mixed(base: Path):
    with CowDisk(base) as d:
        d.write(4096 + 100, b"XY")
        data = d.read(4000, 300)
        expect = bytearray(pattern(DISK)[4000:4300])
        expect[196:198] = b"XY"
        assert data == bytes(expect)
        assert d.read(0, 0) == b""
