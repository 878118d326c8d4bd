"""Property tests: hostile virtqueues and register writes never crash the host.

Whatever a guest puts in its descriptor table, rings and registers, the
device either completes requests correctly or ends in DEVICE_NEEDS_RESET;
no other exception escapes, and no access leaves guest RAM (GuestMemory
raises for that, which would surface here as a failure). A model test pins
down the copy-on-write overlay's marks, discards and snapshots.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pytest_supermachine.vmm.devices.virtio.blk import CowDisk, VirtioBlock
from pytest_supermachine.vmm.devices.virtio.mmio import VirtioMmioTransport
from pytest_supermachine.vmm.devices.virtio.queue import (
    QueueState,
    VirtQueue,
    VirtQueueError,
)
from pytest_supermachine.vmm.memory import DeviceMemory, GuestMemory
from tests.virtio_driver import VirtioMmioDriver

pytestmark = pytest.mark.unit

MEM = 64 * 1024
RAM_BASE = 0x10000  # RAM does not start at 0: addresses below it are outside RAM too
DESC, AVAIL, USED = RAM_BASE + 0x1000, RAM_BASE + 0x2000, RAM_BASE + 0x3000
SCRATCH = RAM_BASE + 0x4000  # indirect tables and data live here

# 100 examples keeps the whole virtio suite well under 20 s; raise it locally with
# SUPERMACHINE_FUZZ_EXAMPLES=5000 when changing the queue or the blk parser.
FAST = settings(
    max_examples=int(os.environ.get("SUPERMACHINE_FUZZ_EXAMPLES", "100")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

u16 = st.integers(0, 0xFFFF)
# Biased towards almost-valid values, so chains get deep before something breaks.
in_ram = st.integers(RAM_BASE, RAM_BASE + MEM - 0x200)
address = st.one_of(
    in_ram,
    in_ram,
    in_ram,
    st.sampled_from([0, RAM_BASE - 1, RAM_BASE + MEM - 1, SCRATCH, 2**63, 2**64 - 1]),
)
length = st.one_of(
    st.integers(1, 0x200),
    st.integers(1, 0x200),
    st.integers(1, 0x200),
    st.sampled_from([0, 16, 32, 0xFFFF_FFFF, MEM]),
)
flags = st.one_of(
    st.sampled_from([0, 2]),  # end of chain, readable or writable
    st.sampled_from([1, 3]),  # chain continues
    st.integers(0, 7),  # anything, INDIRECT included
)
descriptor = st.tuples(address, length, flags, st.integers(0, 17))  # next may be past the table


@st.composite
def hostile_ring(draw: st.DrawFn) -> dict:
    size = draw(st.sampled_from([1, 2, 4, 8, 16]))
    start = draw(st.sampled_from([0, 0xFFFE, 0x7FFF]))
    descs = draw(st.lists(descriptor, min_size=size, max_size=size))
    if draw(st.booleans()):  # chains that run forward through the table, like real ones
        descs = [(a, n, f, i + 1) for i, (a, n, f, _) in enumerate(descs)]
    return {
        "size": size,
        "descs": descs,
        "scratch_descs": draw(st.lists(descriptor, max_size=6)),
        "heads": draw(st.lists(st.integers(0, size), min_size=size, max_size=size)),
        "start": start,
        "avail_idx": draw(
            st.one_of(
                st.integers(1, size).map(lambda n: (start + n) & 0xFFFF),
                st.integers(0, size + 1).map(lambda n: (start + n) & 0xFFFF),
                u16,
            )
        ),
        "used_event": draw(u16),
        "avail_flags": draw(st.integers(0, 1)),
        "event_idx": draw(st.booleans()),
        "indirect": draw(st.booleans()),
    }


def lay_out(ring: dict) -> GuestMemory:
    mem = GuestMemory.from_bytearray(bytearray(MEM), gpa=RAM_BASE)
    pack = struct.Struct("<QIHH").pack
    for i, d in enumerate(ring["descs"]):
        mem.write(DESC + 16 * i, pack(*d))
    for i, d in enumerate(ring["scratch_descs"]):
        mem.write(SCRATCH + 16 * i, pack(*d))
    size = ring["size"]
    for i, h in enumerate(ring["heads"]):
        mem.write_u16(AVAIL + 4 + 2 * i, h)
    mem.write_u16(AVAIL, ring["avail_flags"])
    mem.write_u16(AVAIL + 2, ring["avail_idx"])
    mem.write_u16(AVAIL + 4 + 2 * size, ring["used_event"])
    return mem


def queue_for(ring: dict, mem: GuestMemory) -> tuple[VirtQueue, DeviceMemory]:
    q = VirtQueue(16)
    st_ = q.state()
    st_.size, st_.ready = ring["size"], True
    st_.desc_addr, st_.avail_addr, st_.used_addr = DESC, AVAIL, USED
    st_.next_avail = st_.next_used = ring["start"]
    st_.event_idx, st_.indirect = ring["event_idx"], ring["indirect"]
    dm = DeviceMemory(mem)
    q.restore_state(st_, dm)
    return q, dm


@FAST
@given(ring=hostile_ring(), written=st.integers(0, 2**32 - 1))
def test_hostile_rings_give_valid_chains_or_virtqueue_error(ring: dict, written: int):
    mem = lay_out(ring)
    q, dm = queue_for(ring, mem)
    size = ring["size"]
    popped = 0
    try:
        for _ in range(size + 2):
            chain = q.pop()
            if chain is None:
                break
            popped += 1
            assert 0 <= chain.head < size
            bufs = chain.readable + chain.writable
            assert 1 <= len(bufs) <= size
            for gpa, n in bufs:
                assert n > 0
                mem.locate(gpa, n)  # inside RAM, or this raises and fails the test
            assert chain.readable_len + chain.writable_len <= 0xFFFF_FFFF
            chain.write(0, b"\x5a" * min(chain.writable_len, 64))
            q.add_used(chain.head, written)
            q.needs_notification()
        assert popped <= size
        event(f"queue: {popped if popped < 3 else '3+'} chains, then empty")
    except VirtQueueError:
        event(f"queue: error after {popped if popped < 3 else '3+'} chains")
    for page in dm.written_pages():
        mem.locate(page * 4096, 1)  # every recorded page is guest RAM


@FAST
@given(
    size=st.sampled_from([1, 2, 16]),
    addrs=st.tuples(*[st.integers(0, 2**64 - 1)] * 3),
    indices=st.tuples(u16, u16, st.one_of(st.none(), u16)),
    flags=st.tuples(st.booleans(), st.booleans(), st.booleans()),
)
def test_queue_state_dict_roundtrip_for_any_values(size, addrs, indices, flags):
    st_ = QueueState(16, size, flags[0], *addrs, *indices[:2], flags[1], flags[2], indices[2])
    assert QueueState.from_dict(st_.to_dict()) == st_


# -- through the transport, with a real device ----------------------------------------------------------


@pytest.fixture(scope="module")
def base_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("blk") / "base.img"
    p.write_bytes(bytes(range(256)) * 64)  # 16 KiB
    return p


def blk_rig(base: Path, mem: GuestMemory) -> tuple[VirtioMmioTransport, VirtioMmioDriver]:
    dev = VirtioBlock(base)
    t = VirtioMmioTransport(dev, mem)
    drv = VirtioMmioDriver(t, mem, heap=(SCRATCH + 0x2000, RAM_BASE + MEM))
    return t, drv


request = st.tuples(
    st.sampled_from([0, 0, 1, 1, 4, 8, 11, 99]),  # IN, OUT, FLUSH, GET_ID, DISCARD, bogus
    st.integers(0, 40),  # sector (the disk has 32)
    st.integers(0, 1200),  # data bytes (not always whole sectors)
    st.integers(0, 2),  # status bytes
    st.booleans(),  # indirect
)
mutation = st.tuples(st.integers(0, 0x3FFF), st.integers(0, 255))


@FAST
@given(requests=st.lists(request, min_size=1, max_size=6), mutations=st.lists(mutation, max_size=3))
def test_mutated_blk_requests_end_in_completion_or_needs_reset(
    base_image: Path, requests: list, mutations: list
):
    """Valid requests from the driver, then a few random bytes of the rings, tables,
    headers or data overwritten: every outcome is a completion or NEEDS_RESET."""
    before = base_image.read_bytes()
    mem = GuestMemory.from_bytearray(bytearray(MEM), gpa=RAM_BASE)
    t, drv = blk_rig(base_image, mem)
    try:
        drv.init()
        q = drv.setup_queue(0, 32)
        drv.driver_ok()
        for rtype, sector, n, status_len, indirect in requests:
            readable = [struct.pack("<IIQ", rtype, 0, sector)]
            writable = []
            if rtype == 1 and n:
                readable.append(bytes([sector & 0xFF]) * n)
            elif n:
                writable.append(n)
            if status_len:
                writable.append(status_len)
            q.submit(readable, writable, indirect=indirect)
        for offset, value in mutations:
            gpa = q.desc + offset
            if gpa < drv.alloc.next:
                mem.write(gpa, bytes([value]))
        t.notify(0)
        if t.needs_reset:
            assert t.last_error and drv.interrupt_status() & 0x2
            event("mutated blk: needs reset")
        else:
            used = q.used()
            # (a mutation may have rewritten the avail idx itself: read it back)
            assert len(used) == t.queues[0].next_avail == mem.read_u16(q.avail + 2)
            assert all(head < 32 for head, _ in used)
            event(f"mutated blk: {'clean' if not mutations else 'mutated'} completion")
    finally:
        t.device.close()
    assert base_image.read_bytes() == before


register = st.sampled_from(
    [
        0x000,
        0x010,
        0x014,
        0x020,
        0x024,
        0x030,
        0x034,
        0x038,
        0x044,
        0x050,
        0x060,
        0x064,
        0x070,
        0x080,
        0x084,
        0x090,
        0x094,
        0x0A0,
        0x0A4,
        0x0AC,
        0x0FC,
        0x100,
        0x108,
        0xFFC,
    ]
)
mmio_op = st.tuples(
    st.booleans(),
    st.one_of(register, st.integers(0, 0x1100)),
    st.sampled_from([1, 2, 4, 8]),
    st.integers(0, 2**64 - 1),
)


@FAST
@given(ops=st.lists(mmio_op, max_size=60))
def test_random_register_traffic_never_raises(base_image: Path, ops: list):
    mem = GuestMemory.from_bytearray(bytearray(MEM), gpa=RAM_BASE)
    t, drv = blk_rig(base_image, mem)
    try:
        drv.init()
        drv.setup_queue(0)
        for is_write, offset, size, value in ops:
            if is_write:
                t.write(offset, value.to_bytes(8, "little")[:size])
            else:
                assert len(t.read(offset, size)) == size
        # Whatever happened, a driver reset brings the device back to life.
        drv.init()
        q = drv.setup_queue(0)
        drv.driver_ok()
        req = q.submit([struct.pack("<IIQ", 0, 0, 1)], [512, 1])
        q.kick()
        assert req.written() == bytes(range(256)) * 2 + b"\0"
    finally:
        t.device.close()


# -- the copy-on-write overlay against a model ----------------------------------------------------------

DISK = 21 * 512  # three overlay blocks, the last one partial

disk_op = st.one_of(
    st.tuples(
        st.just("write"),
        st.integers(0, DISK // 512 - 1),
        st.integers(1, 9),
        st.integers(1, 255),
    ),
    st.tuples(st.just("mark")),
    st.tuples(st.just("discard"), st.integers(0, 10)),
    st.tuples(st.just("release"), st.integers(0, 10)),
    st.tuples(st.just("restore_full")),
    st.tuples(st.just("diff_roundtrip"), st.integers(0, 10)),
)


@FAST
@given(ops=st.lists(disk_op, max_size=40))
def test_overlay_matches_a_model_through_marks_discards_and_restores(
    tmp_path_factory: pytest.TempPathFactory, ops: list
):
    base = tmp_path_factory.getbasetemp() / "model-base.img"
    if not base.exists():
        base.write_bytes(bytes((i * 7) & 0xFF for i in range(DISK - 100)))
    base_bytes = base.read_bytes() + bytes(100)
    disk = CowDisk(base)
    model = bytearray(base_bytes)
    # mark -> (content when taken, written-since sets of all marks when taken)
    marks: dict[int, tuple[bytes, dict[int, set[int]]]] = {}
    since: dict[int, set[int]] = {}
    try:
        for op in ops:
            kind = op[0]
            if kind == "write":
                _, sector, count, byte = op
                count = min(count, DISK // 512 - sector)
                disk.write(sector * 512, bytes([byte]) * (512 * count))
                model[sector * 512 : (sector + count) * 512] = bytes([byte]) * (512 * count)
                blocks = set(range(sector * 512 // 4096, ((sector + count) * 512 - 1) // 4096 + 1))
                for s in since.values():
                    s |= blocks
            elif kind == "mark":
                m = disk.mark()
                marks[m] = (bytes(model), {k: set(v) for k, v in since.items()})
                since[m] = set()
            elif kind in ("discard", "release", "diff_roundtrip") and marks:
                m = sorted(marks)[op[1] % len(marks)]
                if kind == "discard":
                    disk.discard_to(m)
                    content, saved = marks[m]
                    model[:] = content
                    for later in [k for k in marks if k > m]:
                        del marks[later], since[later]
                    for k in since:
                        since[k] = set(saved[k]) if k != m else set()
                elif kind == "release":
                    disk.release(m)
                    del marks[m], since[m]
                else:
                    other = CowDisk(base)
                    other.write(0, marks[m][0])
                    other.restore_state(disk.state(since=m))
                    assert other.read(0, DISK) == bytes(model)
                    other.close()
            elif kind == "restore_full":
                state = disk.state()
                disk.close()
                disk = CowDisk(base)
                disk.restore_state(state)
                marks.clear()
                since.clear()
            assert disk.read(0, DISK) == bytes(model)
            for m, s in since.items():
                assert disk.blocks_written_since(m) == s, (m, ops)
    finally:
        disk.close()
    assert base.read_bytes() == base_bytes[: DISK - 100]
