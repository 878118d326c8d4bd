"""virtio-balloon (virtio 1.x, 5.5): a device model that takes guest pages back.

Queues, in the order the driver numbers them (an absent optional queue takes no
index, as Linux's virtio-mmio driver numbers them): 0 = inflateq, 1 = deflateq, then
reporting_vq if ``VIRTIO_BALLOON_F_REPORTING`` was negotiated. Not offered: the
stats queue (``STATS_VQ``), free page hinting (``FREE_PAGE_HINT``, a migration
aid), ``PAGE_POISON`` (see pages.py for why reporting needs none) and
``MUST_TELL_HOST``. ``DEFLATE_ON_OOM`` only on request (`deflate_on_oom`): without
it Linux takes inflated pages out of its MemTotal and a guest under pressure meets
its OOM killer as a machine that small would, which is what a test that shrinks a
guest wants; with it the guest takes pages back from the balloon instead.

Configuration space (``struct virtio_balloon_config``, little endian): ``num_pages``
(the target the host asks for, in 4 KiB pages; driver read-only) and ``actual``
(what the driver says it holds; the driver writes it). `set_target` changes the
target and raises a configuration-change interrupt.

What the device does with buffers:

* inflateq: a device-readable array of le32 page frame numbers (4 KiB units). Each
  page inside guest RAM joins the balloon and its host memory is given back (the
  `PageDiscarder`) before the buffer is used; a PFN outside guest RAM is ignored
  (counted in `ignored_pfns`, logged at debug level), never an error.
* deflateq: the same array; the pages leave the balloon. Nothing to do on the host:
  the guest's next touch faults a page in.
* reporting_vq: device-writable buffers, each a run of free guest memory. Its whole
  pages are given back and counted (`reported_pages`); the buffer is used with
  length 0, as the spec asks.

Descriptors themselves are bounds-checked by the queue (one outside guest RAM is a
broken driver: ``DEVICE_NEEDS_RESET``); only the PFNs inside buffers are data this
device checks, each through `GuestMemory.locate`.

State for snapshots: the target, ``actual``, the set of ballooned PFNs and the
counters, so a restored machine's balloon is the one its guest's driver remembers.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .....errors import GuestMemoryError
from ....layout import PAGE_SIZE
from ....memory import DeviceMemory
from ..device import (
    VIRTIO_F_VERSION_1,
    DeviceStateError,
    Interrupt,
    VirtioDevice,
    state_int,
)
from ..queue import VirtQueue
from .pages import PFN_SHIFT, MemoryDiscarder, PageDiscarder, page_ranges, whole_pages

log = logging.getLogger(__name__)

#: Device id (virtio 1.x, 5): memory balloon.
VIRTIO_ID_BALLOON = 5

VIRTIO_BALLOON_F_MUST_TELL_HOST = 0
VIRTIO_BALLOON_F_STATS_VQ = 1
VIRTIO_BALLOON_F_DEFLATE_ON_OOM = 2
VIRTIO_BALLOON_F_FREE_PAGE_HINT = 3
VIRTIO_BALLOON_F_PAGE_POISON = 4
VIRTIO_BALLOON_F_REPORTING = 5

#: Queue size of every queue. Linux needs at least 32 on reporting_vq (one report is
#: up to PAGE_REPORTING_CAPACITY = 32 descriptors) and sends 256 PFNs per inflate buffer.
QUEUE_SIZE = 128
#: At most this many bytes of one inflate/deflate buffer are read (Linux sends 1 KiB);
#: the rest of an oversized buffer is ignored, so a guest cannot make one kick cost more.
MAX_PFN_BYTES = 64 * 1024
_U32_MAX = 0xFFFF_FFFF
_CONFIG = struct.Struct("<IIII")  # num_pages, actual, free_page_hint_cmd_id, poison_val

INFLATE, DEFLATE, REPORTING = "inflate", "deflate", "reporting"


@dataclass(frozen=True)
class BalloonStats:
    """What the balloon holds and has done, in 4 KiB pages."""

    target_pages: int  # num_pages: what the host asked for
    actual_pages: int  # what the driver says the balloon holds
    inflated_pages: int  # pages in the balloon as the device counts them
    reported_pages: int  # free pages reported and given back, since the device was created
    ignored_pfns: int  # PFNs outside guest RAM the driver sent (a broken or hostile guest)


#: The Linux guest's command-line key for `reporting_order` (applied by guest/agent/init.c).
REPORTING_ORDER_CMDLINE_KEY = "sm.page_reporting_order"
#: Linux reports free memory in chunks of 2**order pages. At most 8 (1 MiB): a tmpfs
#: file freed in a guest leaves fragments, and 2 MiB chunks (Linux's x86 default with huge
#: pages) left 8.5 MiB of 80 MiB freed unreported in a 128 MiB guest, 13.8 MiB of 100 in a
#: 256 MiB one (bench_devices); 1 MiB chunks left 5.5 MiB.
MAX_REPORTING_ORDER = 8
#: Linux's ``PAGE_REPORTING_CAPACITY``: chunks per report.
_REPORT_CAPACITY = 32


def reporting_order(mem_bytes: int) -> int:
    """The free page reporting order (chunk = 2**order pages) for a guest of `mem_bytes`.

    Why the host chooses it: Linux reports nothing while a zone has less than its low
    watermark plus ``32 << order`` pages free (mm/page_reporting.c), and without huge
    pages (our kernel has none) it uses ``MAX_ORDER - 1`` = 10: 128 MiB, so a 128 MiB
    guest never reported a page (a test that freed 81 MiB kept it all on the host).
    The largest order up to `MAX_REPORTING_ORDER` whose 32 chunks fit in a quarter of
    RAM: 64 MiB -> 7, 128 MiB and more -> 8 (1 MiB chunks); at least 0.
    """
    pages = max(mem_bytes // PAGE_SIZE, 1)
    order = 0
    while order < MAX_REPORTING_ORDER and _REPORT_CAPACITY << (order + 1) <= pages // 4:
        order += 1
    return order


def reporting_order_cmdline(mem_bytes: int) -> str:
    """The kernel command-line token telling the guest's init `reporting_order`."""
    return f"{REPORTING_ORDER_CMDLINE_KEY}={reporting_order(mem_bytes)}"


class VirtioBalloon(VirtioDevice):
    """The balloon device (id 5). `reporting`: offer free page reporting;
    `deflate_on_oom`: offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM.

    `discarder` gives the host memory of inflated and reported pages back; None
    means straight onto the guest memory the device is activated with
    (`MemoryDiscarder`). A machine restored from a snapshot passes one that keeps
    its dirty-page bookkeeping (see pages.py).
    """

    device_type = VIRTIO_ID_BALLOON

    def __init__(
        self,
        *,
        reporting: bool = True,
        deflate_on_oom: bool = False,
        discarder: PageDiscarder | None = None,
    ) -> None:
        super().__init__()
        self.reporting = reporting
        self.deflate_on_oom = deflate_on_oom
        self.queue_max_sizes = (QUEUE_SIZE,) * (3 if reporting else 2)
        self.discarder = discarder
        self.target_pages = 0
        self.actual_pages = 0
        self.inflated: set[int] = set()
        self.reported_pages = 0
        self.ignored_pfns = 0
        self._roles: list[str] = []
        self._changed = threading.Condition()

    # -- negotiation and config -----------------------------------------------------------
    def device_features(self) -> int:
        features = 1 << VIRTIO_F_VERSION_1
        if self.deflate_on_oom:
            features |= 1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM
        if self.reporting:
            features |= 1 << VIRTIO_BALLOON_F_REPORTING
        return features

    def config_space(self) -> bytes:
        return _CONFIG.pack(self.target_pages, self.actual_pages, 0, 0)

    def write_config(self, offset: int, data: bytes) -> None:
        """Only ``actual`` (bytes 4..7) is the driver's to write; bytes of it are merged in."""
        cfg = bytearray(self.config_space())
        for i, byte in enumerate(data):
            if 4 <= offset + i < 8:
                cfg[offset + i] = byte
        with self._changed:
            self.actual_pages = _CONFIG.unpack(cfg)[1]
            self._changed.notify_all()

    def wait_actual(
        self, pages: int, timeout: float, *, stop: Callable[[], bool] = lambda: False
    ) -> bool:
        """Wait until the driver says the balloon holds `pages` pages; False after
        `timeout` seconds or as soon as `stop()` is true (checked every 0.1 s)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.actual_pages != pages:
                left = deadline - time.monotonic()
                if left <= 0 or stop():
                    return False
                self._changed.wait(min(left, 0.1))
        return True

    def set_target(self, pages: int) -> None:
        """Ask the driver to hold `pages` 4 KiB pages in the balloon (config-change interrupt).

        The caller holds the transport lock (`VirtioMmioTransport.process_device` or the
        transport's own entry points); before the driver is up the target is simply
        what it reads when it starts.
        """
        if type(pages) is not int or not 0 <= pages <= _U32_MAX:
            raise ValueError(f"balloon target must be 0..{_U32_MAX} pages, got {pages!r}")
        if pages == self.target_pages:
            return
        self.target_pages = pages
        if self.interrupt is not None:
            self.interrupt.signal_config()

    def stats(self) -> BalloonStats:
        return BalloonStats(
            self.target_pages,
            self.actual_pages,
            len(self.inflated),
            self.reported_pages,
            self.ignored_pfns,
        )

    # -- lifecycle ----------------------------------------------------------------------------
    def activate(self, queues: list[VirtQueue], memory: DeviceMemory, interrupt: Interrupt) -> None:
        super().activate(queues, memory, interrupt)
        self._roles = [INFLATE, DEFLATE]
        if self.has_feature(VIRTIO_BALLOON_F_REPORTING):
            self._roles.append(REPORTING)
        if self.discarder is None:
            self.discarder = MemoryDiscarder(memory.guest)

    def reset(self) -> None:
        """Driver reset: the driver forgets its balloon (Linux re-inflates to the target)."""
        super().reset()
        self._roles = []
        self.inflated.clear()
        self.actual_pages = 0

    # -- queues ---------------------------------------------------------------------------------
    def process_queue(self, index: int) -> bool:
        if index >= len(self._roles):  # a queue the negotiated features do not have
            return False
        queue = self.queues[index]
        role = self._roles[index]
        served = 0
        while served < queue.size and (chain := queue.pop()) is not None:
            if role == REPORTING:
                self._report(chain.writable)
            else:
                self._inflate_or_deflate(chain.read(0, MAX_PFN_BYTES), role == INFLATE)
            queue.add_used(chain.head, 0)
            served += 1
        if served:
            self.signal_used(queue)
        return served == queue.size and queue.pending() > 0

    def _guest_pfns(self, data: bytes) -> list[int]:
        """The le32 PFNs in `data` whose page is guest RAM; the others are counted and dropped."""
        assert self.memory is not None
        locate = self.memory.guest.locate
        pfns, bad = [], 0
        for (pfn,) in struct.iter_unpack("<I", data[: len(data) // 4 * 4]):
            try:
                locate(pfn << PFN_SHIFT, PAGE_SIZE)
            except GuestMemoryError:
                bad += 1
                continue
            pfns.append(pfn)
        if bad:
            self.ignored_pfns += bad
            log.debug("virtio-balloon: %d PFNs outside guest RAM ignored", bad)
        return pfns

    def _inflate_or_deflate(self, data: bytes, inflate: bool) -> None:
        pfns = self._guest_pfns(data)
        if not inflate:
            self.inflated.difference_update(pfns)
            return
        self.inflated.update(pfns)
        self._discard(page_ranges(pfns))

    def _report(self, buffers: list[tuple[int, int]]) -> None:
        ranges = [r for gpa, n in buffers if (r := whole_pages(gpa, n)) is not None]
        self._discard(ranges)
        self.reported_pages += sum(n for _gpa, n in ranges) // PAGE_SIZE

    def _discard(self, ranges: list[tuple[int, int]]) -> None:
        if ranges and self.discarder is not None:
            self.discarder.discard(ranges)

    # -- snapshots --------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        st = super().state()
        st["balloon"] = {
            "target_pages": self.target_pages,
            "actual_pages": self.actual_pages,
            "inflated": struct.pack(f"<{len(self.inflated)}I", *sorted(self.inflated)),
            "reported_pages": self.reported_pages,
            "ignored_pfns": self.ignored_pfns,
        }
        return st

    def restore_state(self, state: dict[str, Any]) -> None:
        super().restore_state(state)
        saved = state.get("balloon")
        if saved is None:
            return
        if not isinstance(saved, dict):
            raise DeviceStateError(f"balloon state is a {type(saved).__name__}, not a mapping")
        inflated = saved.get("inflated", b"")
        if not isinstance(inflated, bytes) or len(inflated) % 4:
            raise DeviceStateError("balloon inflated PFNs are not a whole number of le32 values")
        target = state_int(saved, "target_pages", _U32_MAX)
        actual = state_int(saved, "actual_pages", _U32_MAX)
        reported = state_int(saved, "reported_pages", (1 << 64) - 1, 0)
        ignored = state_int(saved, "ignored_pfns", (1 << 64) - 1, 0)
        self.target_pages, self.actual_pages = target, actual
        self.inflated = {pfn for (pfn,) in struct.iter_unpack("<I", inflated)}
        self.reported_pages, self.ignored_pfns = reported, ignored
