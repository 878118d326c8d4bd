"""One kick serves at most a queue's worth of chains, whatever the driver does meanwhile.

Here the driver's own requests make new work while they are served: each one reads a
disk sector over the available ring, which sets the avail index to one more than the queue holds. Served in
one go, a state like this never ends (issue 10); with the budget, the kick returns after
`size` chains and says more are waiting, and the next kick serves the rest.
"""

from __future__ import annotations

import struct
from pathlib import Path

from pytest_supermachine.vmm.devices.virtio.blk import VIRTIO_BLK_T_IN, VirtioBlock
from pytest_supermachine.vmm.devices.virtio.mmio import VirtioMmioTransport
from pytest_supermachine.vmm.devices.virtio.queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from pytest_supermachine.vmm.memory import GuestMemory
from tests.virtio_driver import VirtioMmioDriver

SIZE = 4


def test_a_kick_serves_at_most_a_queue_of_chains_and_reports_the_rest(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(struct.pack("<H", SIZE + 1).ljust(4096, b"\0"))  # avail idx 5, heads 0
    memory = GuestMemory.from_bytearray(bytearray(1 << 20))
    transport = VirtioMmioTransport(VirtioBlock(image), memory)
    driver = VirtioMmioDriver(transport, memory)
    driver.init()
    queue = driver.setup_queue(0, SIZE)
    driver.driver_ok()
    header, status = 0x80000, 0x81000
    memory.write(header, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0))
    queue.write_desc(0, header, 16, VIRTQ_DESC_F_NEXT, 1)
    queue.write_desc(1, queue.avail + 2, 512, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 2)
    queue.write_desc(2, status, 1, VIRTQ_DESC_F_WRITE)
    queue.publish(0)

    assert transport.notify(0) is True
    assert queue.used_idx() == SIZE
    assert transport.notify(0) is False
    assert queue.used_idx() == SIZE + 1
