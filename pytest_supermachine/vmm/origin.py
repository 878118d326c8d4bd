"""The snapshot a machine was restored from: what `reset()` returns to, what a diff is taken against.

A restored machine keeps its origin open for as long as it lives: the snapshot chain
(its RAM is mapped MAP_PRIVATE from the files), the vCPU/irqchip state decoded once into
a ready ioctl batch (`vmstate.PreparedState`), and the set of RAM pages changed since the
restore or the last reset, from KVM's dirty log and from the devices' host-side writes.
With that, a reset touches exactly the changed pages and a diff snapshot stores exactly
them. The machine orchestrates (pausing the vCPUs, quiescing devices); this module owns
the pages and the files.
"""

from __future__ import annotations

import enum
import mmap
import os
import threading
from collections.abc import Sequence
from typing import Any

from ..errors import MachineError
from ._native import ffi, lib
from .kvm import Vm
from .layout import PAGE_SIZE
from .memory import DirtyPages, GuestMemory, PageWriter
from .reset_cost import ResetChoice, ResetCostModel, RetouchEstimate
from .snapshot import SnapshotChain, SnapshotRef
from .vmstate import PreparedState


class ResetStrategy(enum.Enum):
    """How `reset()` returns dirtied RAM pages to the snapshot's bytes.

    COPY copies the snapshot's bytes back over each dirtied page: the page stays
    resident and writable, so the guest's next write to it (the next test doing what
    this one did) costs nothing. Measured here: ~2x the reset time of DISCARD, but the
    following run re-dirties the same pages ~4x faster (no copy-on-write faults).
    DISCARD drops the pages with MADV_DONTNEED: the quickest reset and the memory goes
    back to the host, but every page is faulted in and copied again on its next write.
    AUTO (default) picks one of the two per reset from the dirty count and how much of
    it the machine's runs write again, by whole cost (vmm/reset_cost.py).
    """

    COPY = "copy"
    DISCARD = "discard"
    AUTO = "auto"


class SnapshotOrigin:
    """A restored machine's snapshot chain, its prepared state, and the pages changed since.

    `page_writers` is the machine's own list (devices that write guest RAM from the host);
    it is read on every harvest, so writers added later are seen.
    """

    def __init__(
        self,
        chain: SnapshotChain,
        state: PreparedState,
        vm: Vm,
        memory: GuestMemory,
        page_writers: Sequence[PageWriter],
    ) -> None:
        self.chain = chain
        self.state = state
        self._vm = vm
        self._memory = memory
        self._page_writers = page_writers
        self._dirty = DirtyPages(memory.regions)
        self._base_views: list[tuple[mmap.mmap, Any]] = []
        #: Harvests come from the machine's thread (reset, snapshot, `dirty_pages`) and from
        #: the device thread (`discard`, a balloon giving pages back); one at a time.
        self._lock = threading.Lock()
        self._overlaid: list[int] | None = None
        self.retouch = RetouchEstimate()
        #: What the last reset did (COPY or DISCARD), for benchmarks and diagnostics.
        self.last_reset: ResetStrategy | None = None

    @property
    def parent(self) -> SnapshotRef:
        """What a diff snapshot of this machine names as its parent: the chain's leaf."""
        return self.chain.leaf.ref()

    def harvest(self) -> DirtyPages:
        """OR KVM's dirty log (which it clears) and the devices' host writes (cleared too) in."""
        with self._lock:
            return self._harvest()

    def _harvest(self) -> DirtyPages:
        for slot, region in enumerate(self._memory.regions):
            self._dirty.add_bitmap(slot, self._vm.get_dirty_log(slot, region.size // PAGE_SIZE))
        for writer in self._page_writers:
            self._dirty.add_pages(writer.written_pages())
            writer.clear_written_pages()
        return self._dirty

    def changed_pages(self) -> list[bytes]:
        """Per region, the bitmap of pages changed since the origin (a diff's `pages`)."""
        dirty = self.harvest()
        return [dirty.bitmap(slot) for slot in range(len(self._memory.regions))]

    def discard(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Give the host memory behind page-aligned guest ranges back, keeping the books true.

        After ``MADV_DONTNEED`` a page of this MAP_PRIVATE mapping reads as the *base* file's
        bytes. Where that is the origin's content too (the page is not in a diff of the
        chain), the page no longer differs from the origin: it leaves the dirty set, so a
        COPY reset does not copy it back in (and make it resident again) and a diff snapshot
        does not store it. A page a diff overlays now differs from the origin whatever it
        held before: it joins the dirty set, and reset puts the diff's bytes back.
        The guest must not be writing these pages meanwhile (a balloon's driver gave them
        away); the dirty log is harvested first, so an earlier write is not re-added later.
        """
        with self._lock:
            self._harvest()
            overlaid = self._overlaid_bits()
            for gpa, length in ranges:
                self._memory.discard(gpa, length)
                slot, offset = self._memory.locate(gpa, length)
                self._dirty.set_range(
                    slot, offset // PAGE_SIZE, length // PAGE_SIZE, overlaid[slot]
                )

    def _overlaid_bits(self) -> list[int]:
        """Per region, a bitmap (as an int) of the pages some diff of the chain overlays."""
        if self._overlaid is None:
            self._overlaid = [0] * len(self._memory.regions)
            if self.chain.depth > 1:
                for slot, pages in enumerate(self.chain.diff_page_sources()):
                    bitmap = bytearray((self._memory.regions[slot].size // PAGE_SIZE + 7) // 8)
                    for page in pages:
                        bitmap[page >> 3] |= 1 << (page & 7)
                    self._overlaid[slot] = int.from_bytes(bitmap, "little")
        return self._overlaid

    def _base_view(self, slot: int) -> Any:
        """Read-only page-cache view of the base snapshot's RAM region `slot` (mapped once)."""
        if not self._base_views:
            self._base_views = [
                (view, ffi.from_buffer(view)) for view in self.chain.base.map_ram_readonly()
            ]
        return self._base_views[slot][1]

    def choose(self, model: ResetCostModel, *, restore: bool = True) -> ResetChoice:
        """The cheapest way back for the pages changed now (vCPUs parked; see reset_cost.py)."""
        with self._lock:
            return model.choose(self._harvest().count(), self.retouch.value, restore=restore)

    def reset_memory(
        self, strategy: ResetStrategy, model: ResetCostModel | None = None
    ) -> ResetStrategy:
        """Return every page changed since the origin to the origin's bytes (vCPUs parked).

        AUTO asks `model` (default constants if None) for COPY or DISCARD. Returns the
        strategy used.
        """
        with self._lock:
            dirty = self._harvest()
            if strategy is ResetStrategy.AUTO:
                choice = (model or ResetCostModel()).choose(
                    dirty.count(), self.retouch.value, restore=False
                )
                strategy = ResetStrategy(choice.value)
            self.retouch.observe(dirty.bits())
            self._reset_memory(strategy)
            self.last_reset = strategy
            return strategy

    def _reset_memory(self, strategy: ResetStrategy) -> None:
        dirty = self._harvest()
        chain_pages: list[bytes] = []
        for slot, region in enumerate(self._memory.regions):
            npages = region.size // PAGE_SIZE
            bitmap = dirty.bitmap(slot, word_aligned=True)
            chain_pages.append(bitmap[: (npages + 7) // 8])
            if not dirty.any(slot):
                continue
            target = ffi.cast("void *", self._memory.host_address(slot))
            bits = ffi.from_buffer("uint64_t[]", bitmap)
            if strategy is ResetStrategy.COPY:
                rc = lib.sm_copy_bitmap(target, self._base_view(slot), bits, npages)
            else:
                rc = lib.sm_madvise_bitmap(target, bits, npages, mmap.MADV_DONTNEED)
            if rc < 0:
                raise MachineError(f"returning dirtied pages failed: {os.strerror(-rc)}")
        if self.chain.depth > 1:  # host copies: KVM's dirty log does not see them
            self.chain.overlay_diffs(self._memory, chain_pages)
        dirty.clear()
        self._forget_translations()

    def _forget_translations(self) -> None:
        """Make KVM drop every translation it derived from guest RAM before the reset.

        The pages went back from the host side (copied, dropped, overlaid), which KVM
        does not see: its shadow page tables (PVM, this host's nested KVM, uses shadow
        paging) still mirror the guest's page tables as they were before the reset. A
        COPY reset leaves them pointing at the pages the guest used since the restore,
        so a guest process that changed its page tables meanwhile (a fork's copy-on-write,
        a new mapping) runs on those pages again instead of its snapshot's: seen as a shell
        that held a virtio-fs file open and died with SIGSEGV at its first step after a
        reset (issue 15). DISCARD's ``MADV_DONTNEED`` does reach KVM (its mmu notifier),
        but drops only the entries that map the dropped pages, not those a changed page
        table left pointing at a page the guest did not write.
        Deleting and re-adding a slot is the one way userspace has to drop them all
        (about 0.3-5 ms here; the guest re-faults its working set, as after a restore).
        The slot's dirty log starts empty, as a reset wants.
        """
        for slot, region in enumerate(self._memory.regions):
            address = self._memory.host_address(slot)
            self._vm.set_user_memory_region(slot, region.gpa, 0, address, log_dirty=True)
            self._vm.set_user_memory_region(slot, region.gpa, region.size, address, log_dirty=True)

    def close(self) -> None:
        """Unmap the base views and close the chain (after the VM that maps its RAM is gone)."""
        for view, pointer in self._base_views:
            ffi.release(pointer)
            view.close()
        self._base_views = []
        self.chain.close()
