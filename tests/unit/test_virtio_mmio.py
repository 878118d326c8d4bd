"""virtio-mmio v2 transport: registers, status handshake, queues, interrupts, errors, state.

The device behind the transport is a tiny echo device (copies each request's
readable bytes into its writable buffers), so these tests exercise only the
transport. No KVM.
"""

from __future__ import annotations

import struct

import pytest

from pytest_supermachine.vmm._native import lib
from pytest_supermachine.vmm.devices.virtio.device import (
    STATUS_ACKNOWLEDGE,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FAILED,
    STATUS_FEATURES_OK,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_BLOCK,
    VIRTIO_ID_VSOCK,
    VirtioDevice,
)
from pytest_supermachine.vmm.devices.virtio.mmio import (
    INT_CONFIG,
    INT_USED_RING,
    MMIO_MAGIC,
    REG_CONFIG_GENERATION,
    REG_DEVICE_FEATURES,
    REG_DEVICE_FEATURES_SEL,
    REG_DEVICE_ID,
    REG_MAGIC_VALUE,
    REG_QUEUE_DESC_HIGH,
    REG_QUEUE_DESC_LOW,
    REG_QUEUE_NUM,
    REG_QUEUE_NUM_MAX,
    REG_QUEUE_READY,
    REG_QUEUE_SEL,
    REG_SHM_LEN_LOW,
    REG_STATUS,
    REG_VENDOR_ID,
    REG_VERSION,
    VENDOR_ID,
    VirtioMmioTransport,
)
from pytest_supermachine.vmm.devices.virtio.queue import VirtQueueError
from pytest_supermachine.vmm.memory import GuestMemory
from tests.virtio_driver import VirtioMmioDriver

pytestmark = pytest.mark.unit

MEM = 1 << 20
ECHO_ID = 42
ECHO_FEATURE = 3


class EchoDevice(VirtioDevice):
    """Two queues; queue 0 echoes readable bytes into writable buffers."""

    device_type = ECHO_ID
    queue_max_sizes = (16, 8)

    def __init__(self) -> None:
        super().__init__()
        self.activations = 0
        self.resets = 0
        self.config = bytearray(b"\x11\x22\x33\x44\x55\x66\x77\x88")
        self.fail_next: str | None = None

    def device_features(self) -> int:
        return (
            1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_F_EVENT_IDX
            | 1 << VIRTIO_F_INDIRECT_DESC
            | 1 << ECHO_FEATURE
        )

    def config_space(self) -> bytes:
        return bytes(self.config)

    def write_config(self, offset: int, data: bytes) -> None:
        self.config[offset : offset + len(data)] = data

    def activate(self, queues, memory, interrupt) -> None:
        super().activate(queues, memory, interrupt)
        self.activations += 1

    def reset(self) -> None:
        super().reset()
        self.resets += 1

    def process_queue(self, index: int) -> None:
        if self.fail_next:
            raise VirtQueueError(self.fail_next)
        q = self.queues[index]
        added = False
        while (chain := q.pop()) is not None:
            n = chain.write(0, chain.read())
            q.add_used(chain.head, n)
            added = True
        if added:
            self.signal_used(q)


class Rig:
    def __init__(self) -> None:
        self.mem = GuestMemory.from_bytearray(bytearray(MEM))
        self.dev = EchoDevice()
        self.t = VirtioMmioTransport(self.dev, self.mem)
        self.drv = VirtioMmioDriver(self.t, self.mem)

    def ready(self, *, exclude: int = 0) -> None:
        self.drv.init(exclude=exclude)
        self.q = self.drv.setup_queue(0)
        self.drv.setup_queue(1)
        self.drv.driver_ok()


@pytest.fixture
def rig() -> Rig:
    return Rig()


# -- identification -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reg", "value"),
    [
        (REG_MAGIC_VALUE, MMIO_MAGIC),
        (REG_VERSION, 2),
        (REG_DEVICE_ID, ECHO_ID),
        (REG_VENDOR_ID, VENDOR_ID),
    ],
    ids=["magic", "version", "device-id", "vendor-id"],
)
def test_identification_registers(rig: Rig, reg: int, value: int):
    assert rig.drv.read32(reg) == value


def test_magic_reads_virt(rig: Rig):
    assert rig.t.read(REG_MAGIC_VALUE, 4) == b"virt"


def test_boot_info_device_types_are_the_virtio_device_ids():
    # the microguest finds its devices in the boot info by these bootinfo.h numbers
    assert (lib.SM_DEV_VIRTIO_BLK, lib.SM_DEV_VIRTIO_VSOCK) == (VIRTIO_ID_BLOCK, VIRTIO_ID_VSOCK)


def test_device_features_are_offered_in_two_words(rig: Rig):
    feats = rig.drv.device_features()
    assert feats == rig.dev.device_features()
    rig.drv.write32(REG_DEVICE_FEATURES_SEL, 2)
    assert rig.drv.read32(REG_DEVICE_FEATURES) == 0


def test_version_1_is_always_offered():
    class Bare(EchoDevice):
        def device_features(self) -> int:
            return 0

    t = VirtioMmioTransport(Bare(), GuestMemory.from_bytearray(bytearray(MEM)))
    drv = VirtioMmioDriver(t, t.memory.guest)
    assert drv.device_features() >> VIRTIO_F_VERSION_1 & 1


# -- status handshake -------------------------------------------------------------------------------


def test_handshake_sets_each_status_bit_in_order(rig: Rig):
    rig.ready()
    assert rig.drv.status == (
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK
    )
    assert rig.dev.activations == 1


def test_negotiated_features_reach_the_device(rig: Rig):
    rig.drv.init(features=1 << VIRTIO_F_VERSION_1 | 1 << ECHO_FEATURE)
    assert rig.dev.acked_features == 1 << VIRTIO_F_VERSION_1 | 1 << ECHO_FEATURE
    assert rig.dev.has_feature(ECHO_FEATURE)


def test_features_without_version_1_are_refused(rig: Rig):
    with pytest.raises(RuntimeError, match="refused"):
        rig.drv.init(features=1 << ECHO_FEATURE)
    assert not rig.drv.status & STATUS_FEATURES_OK


def test_features_the_device_did_not_offer_are_refused(rig: Rig):
    with pytest.raises(RuntimeError, match="refused"):
        rig.drv.init(features=1 << VIRTIO_F_VERSION_1 | 1 << 20)


def test_driver_features_cannot_change_after_features_ok(rig: Rig):
    rig.drv.init(features=1 << VIRTIO_F_VERSION_1)
    rig.drv.write_driver_features(rig.dev.device_features())
    assert rig.t.driver_features == 1 << VIRTIO_F_VERSION_1


@pytest.mark.parametrize(
    "bits",
    [STATUS_DRIVER, STATUS_ACKNOWLEDGE | STATUS_FEATURES_OK, STATUS_DRIVER_OK],
    ids=["driver-before-ack", "features-ok-before-driver", "driver-ok-first"],
)
def test_status_bits_out_of_order_do_not_stick(rig: Rig, bits: int):
    rig.drv.write32(REG_STATUS, bits)
    assert rig.drv.status & ~STATUS_ACKNOWLEDGE == 0
    assert rig.dev.activations == 0


def test_clearing_status_bits_other_than_by_reset_is_ignored(rig: Rig):
    rig.drv.set_status(STATUS_ACKNOWLEDGE)
    rig.drv.set_status(STATUS_DRIVER)
    rig.drv.write32(REG_STATUS, STATUS_DRIVER)
    assert rig.drv.status == STATUS_ACKNOWLEDGE | STATUS_DRIVER


def test_failed_stops_the_handshake(rig: Rig):
    rig.drv.set_status(STATUS_ACKNOWLEDGE)
    rig.drv.set_status(STATUS_FAILED)
    rig.drv.set_status(STATUS_DRIVER)
    assert rig.drv.status == STATUS_ACKNOWLEDGE | STATUS_FAILED


def test_writing_zero_resets_device_and_registers(rig: Rig):
    rig.ready()
    rig.q.submit([b"x"], [1])
    rig.q.kick()
    resets = rig.dev.resets
    rig.drv.write32(REG_STATUS, 0)
    assert rig.drv.status == 0
    assert rig.drv.interrupt_status() == 0
    assert rig.dev.resets == resets + 1 and not rig.dev.active
    rig.drv.write32(REG_QUEUE_SEL, 0)
    assert rig.drv.read32(REG_QUEUE_READY) == 0
    assert rig.t.queues[0].next_avail == 0


def test_a_reset_device_can_be_brought_up_again(rig: Rig):
    rig.ready()
    rig.ready()
    req = rig.q.submit([b"again"], [5])
    rig.q.kick()
    assert req.written() == b"again"


# -- queue registers --------------------------------------------------------------------------------


def test_queue_num_max_per_queue_and_zero_for_missing_queues(rig: Rig):
    sizes = []
    for i in range(3):
        rig.drv.write32(REG_QUEUE_SEL, i)
        sizes.append(rig.drv.read32(REG_QUEUE_NUM_MAX))
    assert sizes == [16, 8, 0]


def test_queue_addresses_are_64_bit_and_read_back(rig: Rig):
    rig.drv.init()
    rig.drv.write32(REG_QUEUE_SEL, 1)
    rig.drv.write32(REG_QUEUE_DESC_LOW, 0x89AB_C000)
    rig.drv.write32(REG_QUEUE_DESC_HIGH, 0x1)
    assert rig.t.queues[1].desc_addr == 0x1_89AB_C000
    assert rig.drv.read32(REG_QUEUE_DESC_HIGH) == 1


def test_queue_registers_are_ignored_before_features_ok(rig: Rig):
    rig.drv.write32(REG_QUEUE_NUM, 4)
    assert rig.t.queues[0].size == 16


def test_queue_registers_are_ignored_after_driver_ok(rig: Rig):
    rig.ready()
    rig.drv.write32(REG_QUEUE_SEL, 0)
    rig.drv.write32(REG_QUEUE_NUM, 4)
    rig.drv.write32(REG_QUEUE_READY, 0)
    assert (rig.t.queues[0].size, rig.t.queues[0].ready) == (16, True)


def test_queue_that_is_not_ready_is_not_activated(rig: Rig):
    rig.drv.init()
    rig.q = rig.drv.setup_queue(0)
    rig.drv.driver_ok()
    assert rig.t.queues[0].active and not rig.t.queues[1].active
    rig.t.notify(1)  # ignored, no error
    assert not rig.t.needs_reset


# -- data path and interrupts ---------------------------------------------------------------------------


def test_kick_runs_the_device_and_raises_a_used_ring_interrupt(rig: Rig):
    rig.ready()
    req = rig.q.submit([b"ping"], [4])
    rig.q.kick()
    assert req.written() == b"ping"
    assert rig.q.used() == [(req.head, 4)]
    assert rig.drv.interrupts == 1
    assert rig.drv.interrupt_status() == INT_USED_RING


def test_ioeventfd_notify_is_the_same_as_a_register_kick(rig: Rig):
    rig.ready()
    req = rig.q.submit([b"pong"], [4])
    rig.q.kick(via_ioeventfd=True)
    assert req.written() == b"pong"
    assert rig.drv.interrupts == 1


def test_interrupt_ack_clears_status_bits(rig: Rig):
    rig.ready()
    rig.q.submit([b"x"], [1])
    rig.q.kick()
    assert rig.drv.ack_interrupts() == INT_USED_RING
    assert rig.drv.interrupt_status() == 0


def test_event_idx_suppresses_interrupts_through_the_transport(rig: Rig):
    rig.ready()
    assert rig.drv.has_feature(VIRTIO_F_EVENT_IDX)
    rig.q.set_used_event(5)
    for _ in range(5):
        rig.q.submit([b"x"], [1])
        rig.q.kick()
        rig.q.used()
    # The first completion always interrupts; then nothing until used idx passes 5.
    assert rig.drv.interrupts == 1
    rig.q.submit([b"x"], [1])
    rig.q.kick()
    assert rig.drv.interrupts == 2


def test_indirect_chains_reach_the_device(rig: Rig):
    rig.ready()
    req = rig.q.submit([b"ab", b"cd"], [4], indirect=True)
    rig.q.kick()
    assert req.written() == b"abcd"


def test_kick_of_a_missing_queue_is_ignored(rig: Rig):
    rig.ready()
    rig.t.notify(7)
    rig.t.notify(-1)
    assert not rig.t.needs_reset


def test_kick_before_driver_ok_is_ignored(rig: Rig):
    rig.drv.init()
    rig.drv.setup_queue(0).submit([b"x"], [1])
    rig.t.notify(0)
    assert rig.drv.interrupts == 0


def test_interrupt_callback_can_be_given_at_construction():
    fired = []
    mem = GuestMemory.from_bytearray(bytearray(MEM))
    t = VirtioMmioTransport(EchoDevice(), mem, lambda: fired.append(1))
    t._irq.signal_used_queue()
    assert fired == [1]


# -- errors become DEVICE_NEEDS_RESET ---------------------------------------------------------------------


def test_broken_queue_sets_needs_reset_and_raises_config_interrupt(rig: Rig):
    rig.ready()
    rig.q.publish(200)  # a head index past the queue size
    rig.q.kick()
    assert rig.drv.status & STATUS_DEVICE_NEEDS_RESET
    assert rig.drv.interrupt_status() & INT_CONFIG
    assert rig.drv.interrupts == 1
    assert "names descriptor" in rig.t.last_error


def test_needs_reset_device_ignores_kicks_until_reset(rig: Rig):
    rig.ready()
    rig.dev.fail_next = "boom"
    rig.q.kick()
    rig.dev.fail_next = None
    req = rig.q.submit([b"x"], [1])
    rig.q.kick()
    assert req.written() == b"\xaa"
    rig.ready()  # driver resets and re-initialises
    assert not rig.t.needs_reset and rig.t.last_error is None
    req = rig.q.submit([b"y"], [1])
    rig.q.kick()
    assert req.written() == b"y"


def test_rings_outside_ram_fail_activation_not_the_host(rig: Rig):
    rig.drv.init()
    rig.drv.setup_queue(0)
    rig.drv.write_queue_addresses(MEM - 8, 0x2000, 0x3000)
    rig.drv.driver_ok()
    assert rig.drv.status & STATUS_DEVICE_NEEDS_RESET
    assert rig.drv.status & STATUS_DRIVER_OK
    assert not rig.dev.active
    assert "descriptor table" in rig.t.last_error


def test_guest_memory_errors_from_a_device_also_become_needs_reset(rig: Rig):
    rig.ready()

    def touch_outside() -> None:
        rig.t.memory.write(MEM, b"x")

    rig.t.process_device(touch_outside)
    assert rig.t.needs_reset


def test_process_device_runs_backend_work_under_the_lock(rig: Rig):
    rig.ready()
    ran = []
    rig.t.process_device(lambda: ran.append(rig.t.lock._is_owned()))
    assert ran == [True]


# -- access sizes and config space ---------------------------------------------------------------------------


@pytest.mark.parametrize(("offset", "size"), [(REG_MAGIC_VALUE, 1), (REG_MAGIC_VALUE, 2), (0x2, 4)])
def test_non_32_bit_register_reads_return_zeros(rig: Rig, offset: int, size: int):
    assert rig.t.read(offset, size) == bytes(size)


def test_non_32_bit_register_writes_are_ignored(rig: Rig):
    rig.t.write(REG_STATUS, b"\x01")
    rig.t.write(REG_STATUS, b"\x01\x00")
    assert rig.drv.status == 0


def test_unknown_and_read_only_registers_are_harmless(rig: Rig):
    rig.drv.write32(REG_MAGIC_VALUE, 0)
    rig.drv.write32(0xF0, 0xFFFF_FFFF)
    assert rig.drv.read32(REG_MAGIC_VALUE) == MMIO_MAGIC
    assert rig.drv.read32(0xF0) == 0


def test_no_shared_memory_regions(rig: Rig):
    assert rig.drv.read32(REG_SHM_LEN_LOW) == 0xFFFF_FFFF


@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_config_space_reads_at_any_width(rig: Rig, size: int):
    assert rig.drv.read_config(0, size) == bytes(rig.dev.config[:size])


def test_config_space_past_the_structure_reads_zero(rig: Rig):
    assert rig.drv.read_config(6, 4) == b"\x77\x88\0\0"
    assert rig.drv.read_config(0x800, 4) == bytes(4)


def test_config_space_odd_widths_and_window_overruns_are_zero(rig: Rig):
    assert rig.t.read(0x100, 3) == bytes(3)
    assert rig.t.read(0xFFC, 8) == bytes(8)


def test_config_space_writes_reach_the_device(rig: Rig):
    rig.t.write(0x101, b"\xee")
    assert rig.drv.read_config(0, 2) == b"\x11\xee"


def test_config_generation_changes_when_the_device_signals_config(rig: Rig):
    rig.ready()
    before = rig.drv.read32(REG_CONFIG_GENERATION)
    rig.dev.interrupt.signal_config()
    assert rig.drv.read32(REG_CONFIG_GENERATION) == before + 1
    assert rig.drv.interrupt_status() & INT_CONFIG


# -- dirty tracking and state -----------------------------------------------------------------------------------


def test_written_pages_cover_data_and_used_ring(rig: Rig):
    rig.ready()
    rig.t.clear_written_pages()
    req = rig.q.submit([b"x" * 10], [10])
    rig.q.kick()
    pages = rig.t.written_pages()
    assert req.writable[0][0] // 4096 in pages
    assert rig.q.used_addr // 4096 in pages
    assert req.readable[0][0] // 4096 not in pages or req.readable[0][0] // 4096 in {
        req.writable[0][0] // 4096,
        rig.q.used_addr // 4096,
    }
    rig.t.clear_written_pages()
    assert rig.t.written_pages() == set()


def test_written_pages_survive_a_device_reset(rig: Rig):
    rig.ready()
    rig.q.submit([b"x"], [1])
    rig.q.kick()
    rig.drv.write32(REG_STATUS, 0)
    assert rig.t.written_pages()


def test_state_restores_into_a_fresh_transport_and_continues(rig: Rig):
    rig.ready()
    for _ in range(3):
        rig.q.submit([b"x"], [1])
    rig.q.kick()
    rig.q.used()
    state = rig.t.state()
    pending = rig.q.submit([b"later"], [5])
    rig.q.set_used_event(3)  # event idx: interrupt me when used idx passes 3

    # A "restored VM": a copy of guest RAM and a brand-new device and transport.
    mem2 = GuestMemory.from_bytearray(bytearray(rig.mem.buffer(0)))
    dev2 = EchoDevice()
    t2 = VirtioMmioTransport(dev2, mem2)
    fired = []
    t2.set_interrupt(lambda: fired.append(1))
    t2.restore_state(state)
    assert dev2.active and dev2.acked_features == rig.dev.acked_features
    t2.notify(0)
    assert mem2.read(pending.writable[0][0], 5) == b"later"
    assert fired == [1]
    assert t2.state()["queues"][0]["next_used"] == 4


def test_state_of_a_needs_reset_device_stays_inactive(rig: Rig):
    rig.ready()
    rig.dev.fail_next = "x"
    rig.q.kick()
    state = rig.t.state()
    t2 = VirtioMmioTransport(EchoDevice(), rig.mem)
    t2.restore_state(state)
    assert t2.needs_reset and not t2.device.active


def test_state_restore_refuses_another_device_type(rig: Rig):
    state = rig.t.state()
    state["device_type"] = 2
    with pytest.raises(ValueError, match="device type"):
        VirtioMmioTransport(EchoDevice(), rig.mem).restore_state(state)


def test_state_without_device_section_keeps_the_device_content(rig: Rig):
    rig.ready()
    rig.dev.config[0] = 0x99
    state = rig.t.state(include_device=False)
    assert "device" not in state
    rig.t.restore_state(state)
    assert rig.dev.config[0] == 0x99 and rig.dev.active


def test_state_is_plain_data(rig: Rig):
    rig.ready()
    state = rig.t.state()

    def check(v: object) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                assert isinstance(k, str)
                check(x)
        elif isinstance(v, list):
            for x in v:
                check(x)
        else:
            assert v is None or isinstance(v, int | str | bytes)

    check(state)


def test_registers_are_little_endian(rig: Rig):
    assert struct.unpack("<I", rig.t.read(REG_VERSION, 4)) == (2,)
