"""Split virtqueue: parsing chains, used ring, event idx, hostile rings, state. No KVM."""

from __future__ import annotations

import array

import pytest

from pytest_supermachine.errors import GuestMemoryError, SupermachineError
from pytest_supermachine.vmm.devices.virtio.queue import (
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    DescriptorChain,
    QueueState,
    VirtQueue,
    VirtQueueError,
)
from pytest_supermachine.vmm.layout import HIGH_RAM_START, RamRegion
from pytest_supermachine.vmm.memory import DeviceMemory, GuestMemory
from tests.virtio_driver import DriverQueue, GuestAllocator

pytestmark = pytest.mark.unit

MEM = 1 << 20
SIZE = 8


class Setup:
    """A VirtQueue and the driver's view of the same rings in 1 MiB of guest memory."""

    def __init__(self, *, size: int = SIZE, event_idx: bool = False, indirect: bool = True):
        self.guest = GuestMemory.from_bytearray(bytearray(MEM))
        self.mem = DeviceMemory(self.guest)
        self.drv = DriverQueue(self.guest, GuestAllocator(0x1000, MEM), 0, size)
        self.q = VirtQueue(size)
        self.q.desc_addr, self.q.avail_addr, self.q.used_addr = (
            self.drv.desc,
            self.drv.avail,
            self.drv.used_addr,
        )
        self.q.ready = True
        self.q.activate(self.mem, event_idx=event_idx, indirect=indirect)


@pytest.fixture
def s() -> Setup:
    return Setup()


def test_error_is_a_supermachine_error():
    assert issubclass(VirtQueueError, SupermachineError)


def test_empty_ring_pops_nothing(s: Setup):
    assert s.q.pop() is None


def test_chain_gives_readable_then_writable_buffers(s: Setup):
    req = s.drv.submit([b"head", b"body!"], [3, 7])
    chain = s.q.pop()
    assert chain is not None
    assert chain.head == req.head
    assert chain.readable == req.readable
    assert chain.writable == req.writable
    assert (chain.readable_len, chain.writable_len) == (9, 10)
    assert chain.read() == b"headbody!"


def test_pop_consumes_one_chain_per_call(s: Setup):
    a = s.drv.submit([b"a"], [])
    b = s.drv.submit([b"b"], [])
    assert [s.q.pop().head, s.q.pop().head] == [a.head, b.head]
    assert s.q.pop() is None


def test_chain_read_and_write_cross_buffer_boundaries(s: Setup):
    s.drv.submit([b"abc", b"defg"], [2, 3, 4])
    chain = s.q.pop()
    assert chain.read(2, 3) == b"cde"
    assert chain.read(5, 100) == b"fg"  # clipped
    assert chain.write(1, b"123456789") == 8  # clipped to the writable stream
    assert b"".join(s.guest.read(g, n) for g, n in chain.writable) == b"\xaa12345678"


def test_add_used_writes_element_and_index(s: Setup):
    req = s.drv.submit([b"x"], [4])
    chain = s.q.pop()
    s.q.add_used(chain.head, 4)
    assert s.drv.used() == [(req.head, 4)]
    assert s.drv.used_idx() == 1


def test_indirect_chain_is_parsed_like_a_direct_one(s: Setup):
    req = s.drv.submit([b"hdr", b"data"], [5, 1], indirect=True)
    chain = s.q.pop()
    assert chain.head == req.head
    assert chain.readable == req.readable
    assert chain.writable == req.writable


def test_indirect_without_the_feature_is_an_error():
    s = Setup(indirect=False)
    s.drv.submit([b"hdr"], [1], indirect=True)
    with pytest.raises(VirtQueueError, match="not negotiated"):
        s.q.pop()


def test_indices_wrap_around_at_16_bits(s: Setup):
    st = s.q.state()
    st.next_avail = st.next_used = 0xFFFE
    s.q.restore_state(st, s.mem)
    s.drv.avail_idx = s.drv.last_used = 0xFFFE
    heads = []
    for i in range(4):
        s.drv.submit([bytes([i])], [1])
        chain = s.q.pop()
        heads.append(chain.read())
        s.q.add_used(chain.head, 1)
    assert heads == [b"\0", b"\1", b"\2", b"\3"]
    assert s.q.next_avail == s.q.next_used == 2
    assert len(s.drv.used()) == 4


# -- hostile rings -------------------------------------------------------------------------


def _raw(s: Setup, *descs: tuple[int, int, int, int]) -> None:
    for i, d in enumerate(descs):
        s.drv.write_desc(i, *d)
    s.drv.publish(0)


def test_descriptor_loop_is_an_error(s: Setup):
    _raw(s, (0x8000, 16, VIRTQ_DESC_F_NEXT, 1), (0x8000, 16, VIRTQ_DESC_F_NEXT, 0))
    with pytest.raises(VirtQueueError, match="loops"):
        s.q.pop()


def test_self_loop_is_an_error(s: Setup):
    _raw(s, (0x8000, 16, VIRTQ_DESC_F_NEXT, 0))
    with pytest.raises(VirtQueueError):
        s.q.pop()


def test_chain_using_every_descriptor_is_fine(s: Setup):
    for i in range(SIZE):
        last = i == SIZE - 1
        s.drv.write_desc(i, 0x8000 + 16 * i, 16, 0 if last else VIRTQ_DESC_F_NEXT, i + 1)
    s.drv.publish(0)
    assert len(s.q.pop().readable) == SIZE


def test_indirect_table_longer_than_the_queue_is_an_error(s: Setup):
    table = 0x9000
    for i in range(SIZE + 1):
        s.drv.write_desc(i, 0x8000, 16, VIRTQ_DESC_F_NEXT, i + 1, table=table)
    _raw(s, (table, 16 * (SIZE + 1), VIRTQ_DESC_F_INDIRECT, 0))
    with pytest.raises(VirtQueueError, match="exceeds queue size"):
        s.q.pop()


def test_loop_inside_an_indirect_table_is_an_error(s: Setup):
    table = 0x9000
    s.drv.write_desc(0, 0x8000, 16, VIRTQ_DESC_F_NEXT, 1, table=table)
    s.drv.write_desc(1, 0x8000, 16, VIRTQ_DESC_F_NEXT, 0, table=table)
    _raw(s, (table, 32, VIRTQ_DESC_F_INDIRECT, 0))
    with pytest.raises(VirtQueueError, match="loops"):
        s.q.pop()


def test_indirect_inside_indirect_is_an_error(s: Setup):
    table = 0x9000
    s.drv.write_desc(0, 0xA000, 16, VIRTQ_DESC_F_INDIRECT, 0, table=table)
    _raw(s, (table, 16, VIRTQ_DESC_F_INDIRECT, 0))
    with pytest.raises(VirtQueueError, match="inside an indirect"):
        s.q.pop()


def test_indirect_with_next_is_an_error(s: Setup):
    s.drv.write_desc(0, 0x9000, 16, 0, 0, table=0x9000)
    _raw(s, (0x9000, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 1), (0x8000, 1, 0, 0))
    with pytest.raises(VirtQueueError, match="INDIRECT and NEXT"):
        s.q.pop()


def test_indirect_after_a_direct_descriptor_is_an_error(s: Setup):
    _raw(s, (0x8000, 16, VIRTQ_DESC_F_NEXT, 1), (0x9000, 16, VIRTQ_DESC_F_INDIRECT, 0))
    with pytest.raises(VirtQueueError, match="not the head"):
        s.q.pop()


@pytest.mark.parametrize("length", [0, 8, 17])
def test_indirect_table_length_must_be_whole_descriptors(s: Setup, length: int):
    _raw(s, (0x9000, length, VIRTQ_DESC_F_INDIRECT, 0))
    with pytest.raises(VirtQueueError, match="multiple of 16"):
        s.q.pop()


def test_indirect_table_outside_ram_is_an_error(s: Setup):
    _raw(s, (MEM - 16, 32, VIRTQ_DESC_F_INDIRECT, 0))
    with pytest.raises(VirtQueueError, match="outside guest RAM"):
        s.q.pop()


def test_next_index_out_of_range_is_an_error(s: Setup):
    _raw(s, (0x8000, 16, VIRTQ_DESC_F_NEXT, SIZE))
    with pytest.raises(VirtQueueError, match="out of range"):
        s.q.pop()


def test_head_out_of_range_is_an_error(s: Setup):
    s.drv.publish(SIZE)
    with pytest.raises(VirtQueueError, match="names descriptor"):
        s.q.pop()


def test_zero_length_descriptor_is_an_error(s: Setup):
    _raw(s, (0x8000, 0, 0, 0))
    with pytest.raises(VirtQueueError, match="zero-length"):
        s.q.pop()


@pytest.mark.parametrize(
    ("addr", "length"),
    [(MEM, 1), (MEM - 1, 2), (0, 0xFFFF_FFFF), (2**64 - 1, 1), (2**63, 4096)],
    ids=["past-end", "straddles-end", "huge-length", "max-address", "high-address"],
)
def test_buffer_outside_ram_is_an_error(s: Setup, addr: int, length: int):
    _raw(s, (addr, length, VIRTQ_DESC_F_WRITE, 0))
    with pytest.raises(VirtQueueError, match="outside guest RAM"):
        s.q.pop()


def test_readable_after_writable_is_an_error(s: Setup):
    _raw(s, (0x8000, 16, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1), (0x8000, 16, 0, 0))
    with pytest.raises(VirtQueueError, match="readable descriptor after"):
        s.q.pop()


def test_avail_idx_jumping_past_the_queue_size_is_an_error(s: Setup):
    s.drv.set_avail_idx(SIZE + 1)
    with pytest.raises(VirtQueueError, match="more than the queue size"):
        s.q.pop()


def test_avail_idx_going_backwards_is_an_error(s: Setup):
    s.drv.set_avail_idx(0xFFFF)  # "65535 chains ahead"
    with pytest.raises(VirtQueueError):
        s.q.pop()


# -- validation of the rings themselves ---------------------------------------------------------


@pytest.mark.parametrize("size", [0, 3, 12, 2 * SIZE])
def test_queue_size_must_be_a_power_of_two_within_max(size: int):
    q = VirtQueue(SIZE)
    q.size = size
    q.desc_addr, q.avail_addr, q.used_addr = 0x1000, 0x2000, 0x3000
    with pytest.raises(VirtQueueError, match="power of two"):
        q.validate(GuestMemory.from_bytearray(bytearray(MEM)))


@pytest.mark.parametrize(
    ("desc", "avail", "used", "match"),
    [
        (0x1008, 0x2000, 0x3000, "descriptor table .* aligned"),
        (0x1000, 0x2001, 0x3000, "available ring .* aligned"),
        (0x1000, 0x2000, 0x3002, "used ring .* aligned"),
        (MEM - 16, 0x2000, 0x3000, "descriptor table is not in guest RAM"),
        (0x1000, MEM - 2, 0x3000, "available ring is not in guest RAM"),
        (0x1000, 0x2000, MEM, "used ring is not in guest RAM"),
    ],
)
def test_rings_must_be_aligned_and_in_ram(desc: int, avail: int, used: int, match: str):
    q = VirtQueue(SIZE)
    q.desc_addr, q.avail_addr, q.used_addr = desc, avail, used
    with pytest.raises(VirtQueueError, match=match):
        q.validate(GuestMemory.from_bytearray(bytearray(MEM)))


def test_unactivated_queue_refuses_to_pop():
    with pytest.raises(VirtQueueError, match="before it was activated"):
        VirtQueue(SIZE).pop()


def test_max_size_must_be_a_power_of_two():
    with pytest.raises(ValueError):
        VirtQueue(100)


# -- notification suppression --------------------------------------------------------------------


def test_without_event_idx_every_completion_notifies(s: Setup):
    for _ in range(3):
        s.drv.submit([b"x"], [1])
        s.q.add_used(s.q.pop().head, 1)
        assert s.q.needs_notification()


def test_no_interrupt_flag_suppresses_notification(s: Setup):
    s.drv.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    s.drv.submit([b"x"], [1])
    s.q.add_used(s.q.pop().head, 1)
    assert not s.q.needs_notification()


def _complete(s: Setup, n: int) -> None:
    for _ in range(n):
        s.drv.submit([b"x"], [1])
        s.q.add_used(s.q.pop().head, 1)
        s.drv.used()  # the driver reclaims the descriptors


def test_event_idx_notifies_when_used_passes_used_event():
    s = Setup(event_idx=True)
    s.drv.set_used_event(2)  # "interrupt me once used idx goes past 2"
    _complete(s, 1)
    assert s.q.needs_notification()  # the first decision always notifies
    _complete(s, 1)  # used idx 2: not past 2 yet
    assert not s.q.needs_notification()
    _complete(s, 1)  # used idx 3: passed 2
    assert s.q.needs_notification()
    _complete(s, 2)  # used_event 2 is behind: suppressed
    assert not s.q.needs_notification()


def test_event_idx_without_new_used_entries_does_not_notify():
    s = Setup(event_idx=True)
    _complete(s, 1)
    assert s.q.needs_notification()
    assert not s.q.needs_notification()


def test_event_idx_publishes_avail_event_when_the_ring_runs_dry():
    s = Setup(event_idx=True)
    _complete(s, 3)
    assert s.q.pop() is None
    assert s.drv.avail_event() == 3


def test_event_idx_rechecks_after_publishing_avail_event():
    s = Setup(event_idx=True)
    # A buffer that is already available when the device decides to stop is still popped.
    s.drv.submit([b"late"], [1])
    assert s.q.pop().read() == b"late"


# -- device writes are tracked -------------------------------------------------------------------


def test_device_writes_are_recorded_as_written_pages(s: Setup):
    req = s.drv.submit([b"r"], [4])
    chain = s.q.pop()
    assert s.mem.written_pages() == set()  # popping only reads
    chain.write(0, b"data")
    s.q.add_used(chain.head, 4)
    used_page = s.drv.used_addr // 4096
    assert s.mem.written_pages() == {req.writable[0][0] // 4096, used_page}
    s.mem.clear_written_pages()
    assert s.mem.written_pages() == set()


def test_a_write_spanning_pages_records_each_page():
    mem = DeviceMemory(GuestMemory.from_bytearray(bytearray(MEM)))
    mem.write(0x1FFF, b"abc")
    view = mem.write_view(0x5000, 0x2001)
    assert len(view) == 0x2001
    assert mem.written_pages() == {1, 2, 5, 6, 7}


def test_chain_views_for_zero_copy_fills_are_recorded(s: Setup):
    s.drv.submit([], [4096])
    chain = s.q.pop()
    views = chain.writable_views(0, 4096)
    assert sum(len(v) for v in views) == 4096
    assert chain.writable[0][0] // 4096 in s.mem.written_pages()


# -- snapshots -------------------------------------------------------------------------------------


def test_state_roundtrips_through_dict(s: Setup):
    _complete(s, 3)
    st = s.q.state()
    assert QueueState.from_dict(st.to_dict()) == st


def test_restored_queue_continues_where_the_old_one_stopped(s: Setup):
    _complete(s, 2)
    s.drv.used()
    pending = s.drv.submit([b"after"], [1])
    q2 = VirtQueue(SIZE)
    q2.restore_state(QueueState.from_dict(s.q.state().to_dict()), s.mem)
    chain = q2.pop()
    assert (chain.head, chain.read()) == (pending.head, b"after")
    q2.add_used(chain.head, 1)
    assert s.drv.used() == [(pending.head, 1)]


def test_restoring_into_a_queue_of_another_size_is_refused(s: Setup):
    with pytest.raises(VirtQueueError, match="max size"):
        VirtQueue(SIZE * 2).restore_state(s.q.state())


def test_restore_revalidates_rings_against_memory(s: Setup):
    st = s.q.state()
    st.used_addr = MEM
    with pytest.raises(VirtQueueError):
        VirtQueue(SIZE).restore_state(st, s.mem)


def test_chain_repr_names_its_buffers(s: Setup):
    s.drv.submit([b"x"], [])
    assert "readable=" in repr(s.q.pop())
    assert DescriptorChain(0, s.mem, [], []).read() == b""


# -- memory with two regions (RAM above the 32-bit hole) ----------------------------------------


def test_buffers_in_high_ram_are_used_and_a_buffer_across_the_hole_is_refused():
    low, high = bytearray(MEM), bytearray(MEM)
    guest = GuestMemory([RamRegion(0, MEM), RamRegion(HIGH_RAM_START, MEM)], [low, high])
    mem = DeviceMemory(guest)
    drv = DriverQueue(guest, GuestAllocator(0x1000, MEM), 0, SIZE)
    q = VirtQueue(SIZE)
    q.desc_addr, q.avail_addr, q.used_addr = drv.desc, drv.avail, drv.used_addr
    q.activate(mem, event_idx=False, indirect=True)

    guest.write(HIGH_RAM_START + 0x100, b"from high RAM")
    drv.write_desc(0, HIGH_RAM_START + 0x100, 13, VIRTQ_DESC_F_NEXT, 1)
    drv.write_desc(1, HIGH_RAM_START + 0x200, 4, VIRTQ_DESC_F_WRITE, 0)
    drv.publish(0)
    chain = q.pop()
    assert chain.read() == b"from high RAM"
    chain.write(0, b"ok!!")
    assert bytes(high[0x200:0x204]) == b"ok!!"
    assert (HIGH_RAM_START + 0x200) // 4096 in mem.written_pages()

    drv.write_desc(2, MEM - 8, 16, 0, 0)  # would run from low RAM into the hole
    drv.publish(2)
    with pytest.raises(VirtQueueError, match="outside guest RAM"):
        q.pop()


def test_chain_from_gpa_pairs_checks_them(s: Setup):
    chain = DescriptorChain(0, s.mem, [(0x8000, 4)], [(0x9000, 4)])
    assert chain.readable_len == chain.writable_len == 4
    with pytest.raises(GuestMemoryError):
        DescriptorChain(0, s.mem, [(MEM - 2, 4)], [])


def test_chain_write_accepts_any_buffer(s: Setup):
    s.drv.submit([], [3, 5])
    chain = s.q.pop()
    assert chain.write(0, memoryview(array.array("H", [0x6261, 0x6463, 0x6665, 0x6867]))) == 8
    assert b"".join(s.guest.read(g, n) for g, n in chain.writable) == b"abcdefgh"


def test_publishing_avail_event_records_its_page():
    s = Setup(event_idx=True)
    assert s.q.pop() is None
    avail_event_gpa = s.drv.used_addr + 4 + 8 * SIZE
    assert avail_event_gpa // 4096 in s.mem.written_pages()
