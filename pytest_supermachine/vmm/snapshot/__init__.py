"""Snapshot files: a versioned, checksummed header and metadata, then page-aligned sparse RAM.

This package is the file layer only. It knows nothing of KVM: the VMM captures vCPU,
irqchip and device state as *named sections of opaque bytes* ("vcpu/0", "pit", ...)
and hands them to `write_snapshot` together with `GuestMemory`; on restore it gets the
same bytes back from `SnapshotFile.sections` and RAM from `SnapshotChain.map_ram()`.
The byte layout is specified in docs/snapshot-format.md; the short version:

    [header 128 B][metadata: regions, sections, host facts, parent, page TOC][pad to 4 KiB]
    [RAM: full = every region contiguous, zero pages left as file holes
          diff = only the given pages, packed]

Guarantees:

- `SnapshotFile.open` validates *everything* before it returns: magic, version, the
  SHA-256 digest over header and metadata, and every offset and length against the real
  file size. Nothing is mmapped or read from RAM before that, so a damaged or lying file
  gives a `SnapshotError`, never a SIGBUS or a read past the end.
- `write_snapshot` is atomic: it writes a temporary file in the target directory,
  fsyncs it and renames it over the final name. A crash leaves at most a stray
  ``.NAME.*.tmp`` file, never a half-written file under the final name.
- A diff names its parent by the parent's digest. A chain whose parent is missing or was
  rebuilt since the diff was taken is refused (`SnapshotParentError`), never silently
  mixed with the wrong base.

Modules, one per concept: `format` (constants, record layouts), `reader` (SnapshotFile),
`writer` (write_snapshot), `chain` (SnapshotChain, flatten), `toc` (page table of
contents), `fileio` (whole-buffer I/O), `errors`. Whether this host may restore a
snapshot is decided by vmm.hostfacts, which knows CPUs and KVM.

Snapshot files are immutable once written: replace them (atomic rename), never edit them
in place, because restored VMs map their RAM straight from the file.
"""

from .chain import SnapshotChain, flatten
from .errors import (
    REBUILD_HINT,
    NotASnapshotError,
    SnapshotCorrupt,
    SnapshotError,
    SnapshotHostMismatch,
    SnapshotInvalid,
    SnapshotParentError,
    SnapshotTruncated,
    SnapshotVersionError,
)
from .format import (
    FLAG_DIFF,
    FORMAT_VERSION,
    HEADER_SIZE,
    MAGIC,
    MAX_CHAIN_DEPTH,
    MAX_METADATA_BYTES,
    MAX_PARENT_HINT_BYTES,
    MAX_PARENT_HINTS,
    MAX_RAM_BYTES,
    MAX_REGIONS,
    MAX_SECTION_NAME_BYTES,
    PageExtent,
    PageSelection,
)
from .reader import PageSource, SnapshotFile, SnapshotRef, peek_digest
from .writer import write_snapshot

__all__ = [
    "FLAG_DIFF",
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "MAGIC",
    "MAX_CHAIN_DEPTH",
    "MAX_METADATA_BYTES",
    "MAX_PARENT_HINTS",
    "MAX_PARENT_HINT_BYTES",
    "MAX_RAM_BYTES",
    "MAX_REGIONS",
    "MAX_SECTION_NAME_BYTES",
    "REBUILD_HINT",
    "NotASnapshotError",
    "PageExtent",
    "PageSelection",
    "PageSource",
    "SnapshotChain",
    "SnapshotCorrupt",
    "SnapshotError",
    "SnapshotFile",
    "SnapshotHostMismatch",
    "SnapshotInvalid",
    "SnapshotParentError",
    "SnapshotRef",
    "SnapshotTruncated",
    "SnapshotVersionError",
    "flatten",
    "peek_digest",
    "write_snapshot",
]
