"""Why a snapshot file cannot be used: one exception class per kind of refusal.

Every message names the file, the reason, and what to do (usually: rebuild it, see
`REBUILD_HINT`). `SnapshotHostMismatch` is raised by vmm.hostfacts, which decides
whether this host can stand in for the one a snapshot was taken on.
"""

from __future__ import annotations

import os

from ...errors import SupermachineError


class SnapshotError(SupermachineError):
    """A snapshot file cannot be used; the message says which file, why, and what to do."""


class NotASnapshotError(SnapshotError):
    """The file does not start with the snapshot magic (or is not a regular file)."""


class SnapshotVersionError(SnapshotError):
    """The file is a snapshot, but of a format version or feature this reader does not know."""


class SnapshotCorrupt(SnapshotError):
    """The checksum does not match, or the checksummed metadata contradicts itself."""


class SnapshotTruncated(SnapshotCorrupt):
    """The file is shorter than its header says: an interrupted copy or a damaged header."""


class SnapshotHostMismatch(SnapshotError):
    """The snapshot was taken on a host this one cannot stand in for (CPU model, KVM ABI, CPUID)."""


class SnapshotParentError(SnapshotError):
    """A diff's parent is missing, was rebuilt since the diff was taken, or does not fit."""


class SnapshotInvalid(SnapshotError):
    """The file is intact (its checksum matches) but its state is not one this VMM may run.

    Raised by the one validation pass at restore (vmm/restore_validation.py) before
    anything is built from the state: a field out of range, a section of the wrong size,
    queue rings outside RAM, a disk image outside the snapshot's directory. `path`,
    `section` and `problem` say which file, which section and what is wrong.
    """

    def __init__(self, section: str, problem: str, path: str | os.PathLike[str] | None = None):
        self.section = section
        self.problem = problem
        self.path = None if path is None else str(path)
        where = f"snapshot {self.path}" if self.path else "snapshot"
        super().__init__(
            f"{where}: section '{section}': {problem}. The snapshot was damaged or "
            f"crafted; {REBUILD_HINT}"
        )

    def __reduce__(self) -> tuple[type[SnapshotInvalid], tuple[str, str, str | None]]:
        return (SnapshotInvalid, (self.section, self.problem, self.path))

    def in_file(self, path: str | os.PathLike[str]) -> SnapshotInvalid:
        """The same refusal, naming the file (the layers that find the problem do not know it)."""
        return SnapshotInvalid(self.section, self.problem, path)


REBUILD_HINT = "delete it (or run `supermachine cache prune`) so it is rebuilt"
