"""A root file system built on the host from image layers, safely.

Layers are applied in order with the OCI whiteout rules: ``.wh.NAME`` hides NAME
from lower layers, ``.wh..wh..opq`` hides everything a directory had in lower
layers; both only ever affect lower layers, never entries of their own layer,
whatever the order inside the tar. The archive is hostile input: an entry name
that is absolute or has a ``..`` component is refused; a symlink is created as
data and only ever resolved the way the guest would (from the image root), and
an entry whose path would leave the root that way is refused; files are created
with ``O_EXCL|O_NOFOLLOW`` after removing what was there, so nothing outside the
root is ever written. The real owners, modes, times and device numbers are kept
as `EntryAttrs` for the ext4 builder (rootfs.py).

Reading archives and image documents (what the layers are) is oci.py's job.
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from pytest_supermachine.errors import GuestBuildError

from .rootfs import Device, EntryAttrs

_WHITEOUT = ".wh."
_OPAQUE = ".wh..wh..opq"
_MAX_SYMLINK_HOPS = 40


class OciFormatError(GuestBuildError):
    """The tarball is not a docker-save/OCI image, is corrupt, or tries to escape its root."""


def _parts(name: str, what: str) -> tuple[str, ...]:
    """Components of a tar path, refusing absolute paths and ``..`` anywhere."""
    if name.startswith("/"):
        raise OciFormatError(f"{what}: refusing absolute path {name!r}")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise OciFormatError(f"{what}: refusing path traversal in {name!r}")
    return parts


class LayerTree:
    """The root being built on the host, plus the image attributes of its entries."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.attrs: dict[str, EntryAttrs] = {}
        self.layer_new: set[str] = set()  # rel paths made by the current layer (and their parents)

    def host(self, rel: str) -> str:
        return os.path.join(self.root, rel) if rel else str(self.root)

    # -- paths ---------------------------------------------------------------

    def resolve_dir(
        self, parts: Sequence[str], what: str, *, create: bool, mtime: int
    ) -> str | None:
        """The real directory (rel path) that ``parts`` names, resolved as the guest would.

        Symlinks met on the way are followed inside the tree only (absolute
        targets start from the tree's root); leaving the root is refused. With
        ``create``, missing directories are made (root-owned, 0755); without,
        None is returned for a missing one.
        """
        stack: list[str] = []
        todo = list(parts)
        hops = 0
        while todo:
            comp = todo.pop(0)
            if comp in ("", "."):
                continue
            if comp == "..":
                if not stack:
                    raise OciFormatError(
                        f"{what}: its path leaves the image root through a symlink"
                    )
                stack.pop()
                continue
            rel = "/".join([*stack, comp])
            try:
                st = os.lstat(self.host(rel))
            except FileNotFoundError:
                if not create:
                    return None
                os.mkdir(self.host(rel), 0o700)
                os.chmod(self.host(rel), 0o755)  # not the umask's choice
                self.attrs["/" + rel] = EntryAttrs(mode=0o755, mtime=mtime)
                self.layer_new.add(rel)
                stack.append(comp)
                continue
            if stat.S_ISLNK(st.st_mode):
                hops += 1
                if hops > _MAX_SYMLINK_HOPS:
                    raise OciFormatError(f"{what}: too many levels of symlinks in its path")
                target = os.readlink(self.host(rel))
                if target.startswith("/"):
                    stack = []
                todo = [p for p in target.split("/") if p] + todo
            elif stat.S_ISDIR(st.st_mode):
                stack.append(comp)
            else:
                raise OciFormatError(f"{what}: /{rel} is in its path but is not a directory")
        return "/".join(stack)

    def locate(
        self, parts: tuple[str, ...], what: str, mtime: int, *, create: bool = True
    ) -> str | None:
        """Rel path for an entry: parent resolved (see `resolve_dir`), last component not followed."""
        parent = self.resolve_dir(parts[:-1], what, create=create, mtime=mtime)
        if parent is None:
            return None
        return f"{parent}/{parts[-1]}" if parent else parts[-1]

    # -- removal -------------------------------------------------------------

    def remove(self, rel: str) -> None:
        path = self.host(rel)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)  # never follows symlinks inside
        else:
            os.unlink(path)

    def hide_lower(self, rel: str) -> None:
        """Remove what lower layers put at ``rel``, keeping what the current layer made."""
        path = self.host(rel)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if rel not in self.layer_new:
            self.remove(rel)
        elif stat.S_ISDIR(st.st_mode):
            for child in os.listdir(path):
                self.hide_lower(f"{rel}/{child}")

    # -- entries -------------------------------------------------------------

    def apply(self, member: tarfile.TarInfo, tar: tarfile.TarFile, what: str) -> None:
        parts = _parts(member.name, what)
        if not parts:
            return  # the root itself: its owner and mode are fixed (0:0, 0755)
        if any(p.startswith(_WHITEOUT + _WHITEOUT[:-1]) and p != _OPAQUE for p in parts):
            return  # AUFS bookkeeping (.wh..wh.plnk, .wh..wh.aufs): not content
        mtime = int(member.mtime)
        name = parts[-1]
        if name == _OPAQUE:
            directory = self.resolve_dir(parts[:-1], what, create=True, mtime=mtime)
            assert directory is not None
            path = self.host(directory)
            for child in os.listdir(path):
                self.hide_lower(f"{directory}/{child}" if directory else child)
            return
        if name.startswith(_WHITEOUT):
            hidden = name[len(_WHITEOUT) :]
            if hidden in ("", ".", ".."):
                raise OciFormatError(f"{what}: malformed whiteout {member.name!r}")
            rel = self.locate((*parts[:-1], hidden), what, mtime, create=False)
            if rel is not None:
                self.hide_lower(rel)
            return

        rel = self.locate(parts, what, mtime)
        assert rel is not None
        path = self.host(rel)
        attrs = EntryAttrs(uid=member.uid, gid=member.gid, mode=member.mode & 0o7777, mtime=mtime)
        try:
            existing: os.stat_result | None = os.lstat(path)
        except FileNotFoundError:
            existing = None

        if member.isdir():
            if existing is not None and not stat.S_ISDIR(existing.st_mode):
                self.remove(rel)
                existing = None
            if existing is None:
                os.mkdir(path, 0o700)
            os.chmod(path, (member.mode & 0o777) | 0o700)
        elif member.issym():
            if not member.linkname:
                raise OciFormatError(f"{what}: symlink {member.name!r} has an empty target")
            self.remove(rel)
            os.symlink(member.linkname, path)
            attrs = EntryAttrs(uid=member.uid, gid=member.gid, mtime=mtime)
        elif member.islnk():
            link_what = f"{what} (hardlink target {member.linkname!r})"
            target_parts = _parts(member.linkname, link_what)
            if not target_parts:
                raise OciFormatError(f"{link_what}: a hardlink to the root directory")
            target = self.locate(target_parts, link_what, mtime, create=False)
            if target is None or not os.path.lexists(self.host(target)):
                raise OciFormatError(f"{link_what}: the target does not exist")
            if stat.S_ISDIR(os.lstat(self.host(target)).st_mode):
                raise OciFormatError(f"{link_what}: hardlinks to directories are not allowed")
            if target == rel:
                return
            self.remove(rel)
            os.link(self.host(target), path, follow_symlinks=False)
            attrs = self.attrs.get("/" + target, attrs)
        elif member.ischr() or member.isblk() or member.isfifo():
            self.remove(rel)
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
            kind = "c" if member.ischr() else "b" if member.isblk() else "p"
            major, minor = (member.devmajor, member.devminor) if kind != "p" else (0, 0)
            attrs = EntryAttrs(
                uid=member.uid,
                gid=member.gid,
                mode=member.mode & 0o7777,
                mtime=mtime,
                device=Device(kind, major, minor),
            )
        else:  # regular (tarfile treats unknown types as regular too)
            self.remove(rel)
            src = tar.extractfile(member)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as out:
                if src is not None:
                    shutil.copyfileobj(src, out, 1 << 20)
                os.fchmod(out.fileno(), (member.mode & 0o777) | 0o600)
        self.attrs["/" + rel] = attrs
        # This entry and its ancestors now hold content of this layer: whiteouts
        # of the same layer must not remove them (they only hide lower layers).
        self.layer_new.add(rel)
        for i, ch in enumerate(rel):
            if ch == "/":
                self.layer_new.add(rel[:i])

    def apply_layer(self, stream: IO[bytes], what: str) -> None:
        self.layer_new = set()
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    self.apply(member, tar, f"{what}, entry {member.name!r}")
        except tarfile.TarError as exc:
            raise OciFormatError(f"{what} is not a valid tar stream: {exc}") from exc

    def final_attrs(self) -> dict[str, EntryAttrs]:
        """Attributes of the paths that exist at the end (whiteouts leave stale ones behind)."""
        return {p: a for p, a in self.attrs.items() if os.path.lexists(self.host(p[1:]))}
