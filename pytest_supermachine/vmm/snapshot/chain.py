"""Chains of snapshots: a full base, then diffs, each naming its parent by digest.

A chain whose parent is missing or was rebuilt since the diff was taken is refused
(`SnapshotParentError`), never silently mixed with the wrong base. RAM of a chain is the
base mapped MAP_PRIVATE with every diff's pages copied over it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..layout import PAGE_SIZE, RamRegion
from ..memory import GuestMemory
from .errors import SnapshotError, SnapshotParentError
from .format import MAX_CHAIN_DEPTH, ZERO_PAGE, PageSelection, layout_text, selected_pages
from .reader import PageSource, SnapshotFile, SnapshotRef
from .writer import write_snapshot


class SnapshotChain:
    """A diff and its ancestors down to a full base: `files[0]` is the base, `files[-1]` the leaf.

    Opening checks every link: each parent is found through the hints the child recorded,
    has exactly the digest the child recorded, and the same RAM layout. The chain's state
    (sections, host facts) is the leaf's; its RAM is the base overlaid with each diff in order.
    """

    def __init__(self, files: Sequence[SnapshotFile]) -> None:
        self.files: tuple[SnapshotFile, ...] = tuple(files)
        self._overrides: list[dict[int, PageSource]] | None = None

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], *, max_depth: int = MAX_CHAIN_DEPTH
    ) -> SnapshotChain:
        """Open the snapshot at `path` and follow its parents to the base, validating each."""
        files: list[SnapshotFile] = []
        try:
            snap = SnapshotFile.open(path)
            files.append(snap)
            seen = {snap.digest}
            while snap.parent_digest is not None:
                if len(files) >= max_depth:
                    raise SnapshotParentError(
                        f"snapshot chain from {files[0].path} is deeper than {max_depth} files; "
                        "flatten it (snapshot.flatten) or raise max_depth"
                    )
                parent = _open_parent(snap, [f.path for f in files])
                if parent.digest in seen:
                    parent.close()
                    raise SnapshotParentError(
                        f"snapshot chain from {files[0].path} loops back to {parent.path}"
                    )
                seen.add(parent.digest)
                files.append(parent)
                snap = parent
        except BaseException:
            for f in files:
                f.close()
            raise
        return cls(list(reversed(files)))

    @property
    def base(self) -> SnapshotFile:
        return self.files[0]

    @property
    def leaf(self) -> SnapshotFile:
        return self.files[-1]

    @property
    def depth(self) -> int:
        return len(self.files)

    @property
    def sections(self) -> Mapping[str, bytes]:
        return self.leaf.sections

    @property
    def host_facts(self) -> dict[str, Any]:
        return self.leaf.host_facts

    @property
    def ram_regions(self) -> tuple[RamRegion, ...]:
        return self.base.ram_regions

    def diff_page_sources(self) -> list[dict[int, PageSource]]:
        """Per region: page -> newest source, for the pages some diff changed (newest diff wins).

        Pages not listed are read from the base. In-place reset uses this: after
        MADV_DONTNEED a page shows the base file again, so only these need copying back.
        """
        if self._overrides is None:
            overrides: list[dict[int, PageSource]] = [{} for _ in self.ram_regions]
            for snap in self.files[1:]:
                zero = PageSource(snap, None)
                for region, first, count, offset in snap._toc.rows():
                    table = overrides[region]
                    if offset is None:
                        table.update(dict.fromkeys(range(first, first + count), zero))
                    else:
                        for k in range(count):
                            table[first + k] = PageSource(snap, offset + k * PAGE_SIZE)
            self._overrides = overrides
        return self._overrides

    def page_source(self, gpa: int) -> PageSource:
        """Which file and offset hold the newest version of the page containing `gpa`."""
        for index, region in enumerate(self.ram_regions):
            if region.gpa <= gpa < region.end:
                page = (gpa - region.gpa) // PAGE_SIZE
                source = self.diff_page_sources()[index].get(page)
                if source is None:
                    source = self.base.page_source(index, page)
                    assert source is not None
                return source
        raise ValueError(f"guest address {gpa:#x} is outside {layout_text(self.ram_regions)}")

    def map_ram(self) -> GuestMemory:
        """Guest RAM equal to the chain: the base mapped MAP_PRIVATE, diff pages copied over it."""
        memory = self.base.map_ram()
        try:
            self.overlay_diffs(memory)
        except BaseException:
            # BufferError: views held by the traceback; the mappings go with it.
            with contextlib.suppress(BufferError):
                memory.close()
            raise
        return memory

    def overlay_diffs(
        self, memory: GuestMemory, pages: Sequence[PageSelection] | None = None
    ) -> None:
        """Make `memory`, which shows the base, show the chain: copy diff pages over it.

        `pages` None: every diff's pages, diff by diff from the oldest, so a newer diff
        overwrites an older one (what `map_ram` does after mapping the base).

        `pages` given (per region, like `write_snapshot`'s; e.g. the pages dirtied since the
        last restore): only those, each from its newest diff. Pages whose newest version is
        the base are left alone -- the caller has MADV_DONTNEED'ed them, so they already show
        the base file again. That is the in-place reset.
        """
        regions = self.ram_regions
        if tuple(memory.regions) != regions:
            raise ValueError(
                f"memory layout {layout_text(memory.regions)} is not the snapshot's "
                f"{layout_text(regions)}"
            )
        views = [memory.view(r.gpa, r.size) for r in regions]
        if pages is None:
            for snap in self.files[1:]:
                reads: list[tuple[int, memoryview]] = []
                for region, first, count, offset in snap._toc.rows():
                    target = views[region][first * PAGE_SIZE : (first + count) * PAGE_SIZE]
                    if offset is None:
                        target[:] = bytes(len(target))
                    else:
                        reads.append((offset, target))
                snap.read_pages(reads)
            return
        if len(pages) != len(regions):
            raise ValueError(f"`pages` has {len(pages)} entries for {len(regions)} RAM regions")
        overrides = self.diff_page_sources()
        reads_by_file: dict[int, list[tuple[int, memoryview]]] = {}
        for index, region in enumerate(regions):
            table = overrides[index]
            for page in selected_pages(pages[index], region.size // PAGE_SIZE, index):
                source = table.get(page)
                if source is None:
                    continue
                target = views[index][page * PAGE_SIZE : (page + 1) * PAGE_SIZE]
                if source.file_offset is None:
                    target[:] = ZERO_PAGE
                else:
                    reads_by_file.setdefault(id(source.snapshot), []).append(
                        (source.file_offset, target)
                    )
        for snap in self.files[1:]:
            if id(snap) in reads_by_file:
                snap.read_pages(reads_by_file[id(snap)])

    def read_ram(self, gpa: int, length: int) -> bytes:
        """Bytes of guest RAM as the chain defines them, read from the files (no mapping)."""
        out = bytearray(length)
        view = memoryview(out)
        position = 0
        while position < length:
            address = gpa + position
            in_page = address % PAGE_SIZE
            take = min(PAGE_SIZE - in_page, length - position)
            source = self.page_source(address)
            if source.file_offset is not None:
                source.snapshot.read_pages(
                    [(source.file_offset + in_page, view[position : position + take])]
                )
            position += take
        return bytes(out)

    def close(self) -> None:
        for snap in self.files:
            snap.close()

    def __enter__(self) -> SnapshotChain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open_parent(child: SnapshotFile, chain: Sequence[Path]) -> SnapshotFile:
    """Find the child's parent through its path hints and check digest and layout.

    `chain` is the files opened so far (the child last): a hint that points back into
    it is a loop, reported as one (a digest names its file's content, so a file can
    never be its own ancestor). A hint the file system refuses (a name too long, a
    file that cannot be read) is a hint that did not lead anywhere, never an OSError.
    """
    assert child.parent_digest is not None
    wanted = child.parent_digest
    tried: list[str] = []
    changed: list[str] = []
    for hint in child.parent_hints:
        candidate = Path(hint) if os.path.isabs(hint) else child.path.parent / hint
        candidate = Path(os.path.normpath(candidate))
        try:
            if not candidate.exists():
                tried.append(str(candidate))
                continue
            loop = next((f for f in chain if f.exists() and candidate.samefile(f)), None)
        except OSError as exc:
            tried.append(f"{candidate} ({exc.strerror or exc})")
            continue
        if loop is not None:
            what = "itself" if loop == chain[-1] else f"{loop}, a file it descends from"
            raise SnapshotParentError(
                f"diff snapshot {child.path} names {what} as its parent: the chain loops. "
                "The file was damaged or crafted; rebuild it"
            )
        try:
            parent = SnapshotFile.open(candidate)
        except SnapshotError as exc:
            raise SnapshotParentError(
                f"parent {candidate} of diff snapshot {child.path} is unusable: {exc}"
            ) from exc
        except OSError as exc:
            tried.append(f"{candidate} ({exc.strerror or exc})")
            continue
        if parent.digest != wanted:
            changed.append(f"{candidate} (digest {parent.digest.hex()[:16]}…)")
            parent.close()
            continue
        if parent.ram_regions != child.ram_regions:
            parent.close()
            raise SnapshotParentError(
                f"parent {candidate} of diff snapshot {child.path} has RAM layout "
                f"{layout_text(parent.ram_regions)}, the diff {layout_text(child.ram_regions)}; "
                "rebuild the diff"
            )
        return parent
    if changed:
        raise SnapshotParentError(
            f"diff snapshot {child.path} was taken on top of a parent with digest "
            f"{wanted.hex()[:16]}…, but its parent file changed since: {', '.join(changed)}. "
            "The parent was rebuilt, so this diff no longer applies; rebuild the diff"
        )
    raise SnapshotParentError(
        f"diff snapshot {child.path} needs its parent (digest {wanted.hex()[:16]}…), which is "
        f"missing: looked at {', '.join(tried)}. Restore the parent file next to it, or "
        "rebuild the diff"
    )


def flatten(
    chain: SnapshotChain, out_path: str | os.PathLike[str], *, durable: bool = True
) -> SnapshotRef:
    """Write one full snapshot equal to `chain`: the leaf's sections and facts, the chain's RAM."""
    memory = chain.map_ram()
    try:
        return write_snapshot(
            out_path,
            sections=chain.sections,
            host_facts=chain.host_facts,
            memory=memory,
            durable=durable,
        )
    finally:
        memory.close()
