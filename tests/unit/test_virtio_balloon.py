"""virtio-balloon as a guest driver sees it: inflate, deflate, free page reporting. No KVM.

The guest side is `tests.virtio_driver`, register by register and ring by ring, as
Linux's virtio_balloon does it. Guest RAM is a bytearray here, where giving a page
back reads as zeros afterwards (what anonymous RAM does after MADV_DONTNEED); the
mmap and snapshot-mapping cases are in test_balloon_pages.py.
"""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_supermachine.vmm.devices.virtio.balloon import (
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_REPORTING,
    VIRTIO_ID_BALLOON,
    VirtioBalloon,
)
from pytest_supermachine.vmm.devices.virtio.balloon.device import (
    MAX_REPORTING_ORDER,
    VIRTIO_BALLOON_F_FREE_PAGE_HINT,
    VIRTIO_BALLOON_F_MUST_TELL_HOST,
    VIRTIO_BALLOON_F_PAGE_POISON,
    VIRTIO_BALLOON_F_STATS_VQ,
    reporting_order,
    reporting_order_cmdline,
)
from pytest_supermachine.vmm.devices.virtio.device import STATUS_DEVICE_NEEDS_RESET
from pytest_supermachine.vmm.devices.virtio.mmio import (
    INT_CONFIG,
    REG_DEVICE_ID,
    VirtioMmioTransport,
)
from pytest_supermachine.vmm.layout import RamRegion
from pytest_supermachine.vmm.memory import GuestMemory
from tests.virtio_driver import DriverQueue, VirtioMmioDriver, version_1

pytestmark = pytest.mark.unit

RAM_BASE = 0x100000
MEM = 1 << 20  # 256 pages at 1 MiB..2 MiB
PAGES_AT = RAM_BASE + 0x80000  # the pages the tests balloon; rings live below
FAST = settings(
    max_examples=int(os.environ.get("SUPERMACHINE_FUZZ_EXAMPLES", "100")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def fill(memory: GuestMemory, gpa: int, pages: int, byte: int = 0x5A) -> None:
    memory.write(gpa, bytes([byte]) * (pages * 4096))


def pfns(*gpas: int) -> bytes:
    return struct.pack(f"<{len(gpas)}I", *(g >> 12 for g in gpas))


class Guest:
    """A balloon device and a driver that negotiated everything it offers (or `exclude`)."""

    def __init__(self, device: VirtioBalloon | None = None, *, exclude: int = 0) -> None:
        self.memory = GuestMemory([RamRegion(RAM_BASE, MEM)], [bytearray(MEM)])
        self.device = device or VirtioBalloon()
        self.transport = VirtioMmioTransport(self.device, self.memory)
        self.driver = VirtioMmioDriver(self.transport, self.memory, heap=(RAM_BASE, PAGES_AT))
        self.driver.init(exclude=exclude)
        self.inflate = self.driver.setup_queue(0)
        self.deflate = self.driver.setup_queue(1)
        self.reporting: DriverQueue | None = None
        if self.driver.has_feature(VIRTIO_BALLOON_F_REPORTING):
            self.reporting = self.driver.setup_queue(2, 32)
        self.driver.driver_ok()

    def send(self, queue: DriverQueue, data: bytes) -> list[tuple[int, int]]:
        queue.submit([data], [])
        queue.kick()
        return queue.used()

    def report(self, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """One report: a chain of device-writable buffers, as Linux's page_reporting sends."""
        assert self.reporting is not None
        q = self.reporting
        descs = q._take(len(ranges))
        for i, (gpa, n) in enumerate(ranges):
            last = i == len(ranges) - 1
            q.write_desc(descs[i], gpa, n, 2 | (0 if last else 1), 0 if last else descs[i + 1])
        q.publish(descs[0])
        q.kick()
        used = q.used()
        q.free.extend(descs)
        return used

    def config(self) -> tuple[int, int]:
        num_pages, actual = struct.unpack("<II", self.driver.read_config(0, 8))
        return num_pages, actual


def test_the_device_is_a_balloon_offering_reporting_only():
    g = Guest()
    assert g.driver.read32(REG_DEVICE_ID) == VIRTIO_ID_BALLOON == 5
    offered = g.driver.device_features()
    assert offered >> VIRTIO_BALLOON_F_REPORTING & 1
    for bit in (
        VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
        VIRTIO_BALLOON_F_MUST_TELL_HOST,
        VIRTIO_BALLOON_F_STATS_VQ,
        VIRTIO_BALLOON_F_FREE_PAGE_HINT,
        VIRTIO_BALLOON_F_PAGE_POISON,
    ):
        assert not offered >> bit & 1


def test_deflate_on_oom_is_offered_on_request():
    g = Guest(VirtioBalloon(deflate_on_oom=True))
    assert g.driver.has_feature(VIRTIO_BALLOON_F_DEFLATE_ON_OOM)


def test_without_reporting_the_device_has_two_queues_and_offers_no_reporting():
    g = Guest(VirtioBalloon(reporting=False))
    assert not g.driver.device_features() >> VIRTIO_BALLOON_F_REPORTING & 1
    assert len(g.transport.queues) == 2


def test_a_new_target_is_in_config_space_with_a_config_interrupt():
    g = Guest()
    with g.transport.lock:
        g.device.set_target(64)
    assert g.config() == (64, 0)
    assert g.driver.ack_interrupts() & INT_CONFIG


def test_the_driver_reports_what_the_balloon_holds_in_actual():
    g = Guest()
    g.driver.transport.write(0x100 + 4, struct.pack("<I", 17))
    assert g.config()[1] == 17
    assert g.device.stats().actual_pages == 17


def test_the_driver_cannot_write_the_target():
    g = Guest()
    with g.transport.lock:
        g.device.set_target(5)
    g.driver.transport.write(0x100, struct.pack("<I", 99))
    assert g.config()[0] == 5


def test_inflated_pages_are_given_back_and_counted_before_the_buffer_is_used():
    g = Guest()
    fill(g.memory, PAGES_AT, 4)
    used = g.send(g.inflate, pfns(PAGES_AT, PAGES_AT + 0x2000))
    assert [length for _head, length in used] == [0]
    assert g.memory.read(PAGES_AT, 4096) == bytes(4096)
    assert g.memory.read(PAGES_AT + 0x1000, 4096) == b"\x5a" * 4096  # not in the balloon
    assert g.memory.read(PAGES_AT + 0x2000, 4096) == bytes(4096)
    assert g.device.stats().inflated_pages == 2


def test_deflated_pages_leave_the_balloon():
    g = Guest()
    g.send(g.inflate, pfns(PAGES_AT, PAGES_AT + 0x1000, PAGES_AT + 0x2000))
    g.send(g.deflate, pfns(PAGES_AT + 0x1000))
    assert g.device.stats().inflated_pages == 2
    assert g.device.inflated == {PAGES_AT >> 12, (PAGES_AT + 0x2000) >> 12}


def test_pfns_outside_guest_ram_are_ignored_and_counted_not_an_error():
    g = Guest()
    fill(g.memory, PAGES_AT, 1)
    used = g.send(g.inflate, pfns(0, RAM_BASE + MEM, 0xFFFF_F000) + pfns(PAGES_AT))
    assert len(used) == 1
    assert not g.driver.status & STATUS_DEVICE_NEEDS_RESET
    assert g.device.stats().ignored_pfns == 3
    assert g.device.inflated == {PAGES_AT >> 12}


def test_reported_free_pages_are_given_back_and_counted():
    g = Guest()
    fill(g.memory, PAGES_AT, 8)
    used = g.report([(PAGES_AT, 0x2000), (PAGES_AT + 0x4000, 0x4000)])
    assert [length for _head, length in used] == [0]
    assert g.memory.read(PAGES_AT, 0x2000) == bytes(0x2000)
    assert g.memory.read(PAGES_AT + 0x2000, 0x2000) == b"\x5a" * 0x2000
    assert g.memory.read(PAGES_AT + 0x4000, 0x4000) == bytes(0x4000)
    assert g.device.stats().reported_pages == 6
    assert g.device.stats().inflated_pages == 0  # reported pages stay the guest's


def test_only_whole_pages_of_a_reported_range_are_given_back():
    g = Guest()
    fill(g.memory, PAGES_AT, 3)
    g.report([(PAGES_AT + 0x800, 0x2000)])  # half a page, one page, half a page
    assert g.memory.read(PAGES_AT, 0x1000) == b"\x5a" * 0x1000
    assert g.memory.read(PAGES_AT + 0x1000, 0x1000) == bytes(0x1000)
    assert g.memory.read(PAGES_AT + 0x2000, 0x1000) == b"\x5a" * 0x1000
    assert g.device.stats().reported_pages == 1


def test_a_driver_without_reporting_has_no_reporting_queue():
    g = Guest(exclude=1 << VIRTIO_BALLOON_F_REPORTING)
    assert g.reporting is None
    assert g.driver.features == version_1()


def test_the_balloon_survives_a_snapshot_of_its_state():
    g = Guest()
    with g.transport.lock:
        g.device.set_target(3)
    g.send(g.inflate, pfns(PAGES_AT, PAGES_AT + 0x1000, PAGES_AT + 0x3000))
    g.driver.transport.write(0x100 + 4, struct.pack("<I", 3))
    g.report([(PAGES_AT + 0x8000, 0x1000)])
    state = g.transport.state()
    restored = VirtioBalloon()
    transport = VirtioMmioTransport(restored, g.memory)
    transport.restore_state(state)
    assert restored.stats() == g.device.stats()
    assert restored.inflated == g.device.inflated
    assert restored.active  # and it serves its queues again: a deflate is heard
    g.transport = transport
    g.driver.transport = transport
    g.send(g.deflate, pfns(PAGES_AT))
    assert restored.stats().inflated_pages == 2


HEAP_PFNS = range(RAM_BASE >> 12, PAGES_AT >> 12)  # the driver's rings and buffers
END = RAM_BASE + MEM
pfn_values = st.one_of(
    st.integers(PAGES_AT >> 12, (END >> 12) - 1), st.integers(0, 0xFFFF_FFFF)
).filter(lambda pfn: pfn not in HEAP_PFNS)
pfn_buffers = (
    st.tuples(st.lists(pfn_values, max_size=16), st.binary(max_size=3))
    .map(
        lambda t: struct.pack(f"<{len(t[0])}I", *t[0]) + t[1]  # whole PFNs, then a torn one
    )
    .filter(len)
)  # an empty buffer is a zero-length descriptor: a queue error, tested elsewhere


@FAST
@given(
    inflate=st.lists(pfn_buffers, max_size=4),
    deflate=st.lists(pfn_buffers, max_size=4),
    reports=st.lists(
        st.lists(
            st.tuples(st.integers(PAGES_AT, END - 1), st.integers(1, 0x3000)),
            min_size=1,
            max_size=4,
        ),
        max_size=3,
    ),
)
def test_hostile_pfns_and_ranges_never_raise_and_touch_only_what_was_named(
    inflate: list[bytes], deflate: list[bytes], reports: list[list[tuple[int, int]]]
):
    g = Guest()
    fill(g.memory, PAGES_AT, (END - PAGES_AT) // 4096)
    named: set[int] = set()
    for data in inflate:
        g.send(g.inflate, data)
        named |= {
            pfn
            for (pfn,) in struct.iter_unpack("<I", data[: len(data) // 4 * 4])
            if RAM_BASE >> 12 <= pfn < END >> 12
        }
    for data in deflate:
        g.send(g.deflate, data)
    for ranges in reports:
        clipped = [(gpa, min(n, END - gpa)) for gpa, n in ranges]
        g.report(clipped)
        for gpa, n in clipped:
            named |= set(range(-(-gpa // 4096), (gpa + n) // 4096))
    assert not g.driver.status & STATUS_DEVICE_NEEDS_RESET
    assert g.device.inflated <= named
    for pfn in range(PAGES_AT >> 12, END >> 12):
        expected = bytes(4096) if pfn in named else b"\x5a" * 4096
        assert g.memory.read(pfn << 12, 4096) == expected, hex(pfn)


@pytest.mark.parametrize(
    ("mem_mib", "order"), [(16, 5), (64, 7), (128, 8), (256, 8), (4096, MAX_REPORTING_ORDER)]
)
def test_the_reporting_order_lets_a_guest_report_once_a_quarter_of_its_ram_is_free(
    mem_mib: int, order: int
):
    # Linux reports nothing until 32 chunks of 2**order pages (plus its low watermark)
    # are free; its own order without huge pages (10: 128 MiB) starved 128 MiB guests.
    assert reporting_order(mem_mib << 20) == order
    assert 32 << order <= (mem_mib << 20) // 4096 // 4


def test_the_reporting_order_reaches_the_guest_on_its_command_line():
    assert reporting_order_cmdline(128 << 20) == "sm.page_reporting_order=8"
