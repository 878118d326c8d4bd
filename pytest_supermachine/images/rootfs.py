"""ext4 root filesystem images from a host directory, without root, cached by content.

Why ext4 made by ``mkfs.ext4 -d``: the guest kernel has ext4 built in, e2fsprogs
can populate a file system from a directory without mounting anything (so no
root, no loop devices), and the result is a plain sparse file the VMM attaches
as a read-only virtio-blk base with a copy-on-write overlay.

What `mkfs.ext4 -d` alone gets wrong, and how it is fixed here:

* **Ownership.** It copies each file's host uid/gid, so a tree owned by a CI user
  would become a guest tree owned by uid 1000. After mkfs, one ``debugfs -w``
  pass sets every inode's owner to 0:0, or to what the caller's `EntryAttrs` say
  (the OCI unpacker passes the owners recorded in the layer tars).
* **Modes and device nodes a non-root host cannot create.** The same pass sets
  exact modes (setuid bits included) and turns placeholder files into device
  nodes or FIFOs (``mknod`` inside the image), so unpacking never needs root.
* **Reproducibility.** It copies host ctimes (which nobody can set) and atimes
  (which reading the tree changes) and host xattrs (SELinux labels and the
  like). The pass sets atime = ctime = mtime and removes every xattr.
  Everything else is pinned: our own ``mke2fs.conf`` (not the host's), a
  UUID and directory hash seed derived from the content key,
  ``E2FSPROGS_FAKE_TIME`` for the superblock and creation times, ``LC_ALL=C``
  (mkfs sorts directory entries with ``alphasort``, a locale collation), a
  fixed inode count and journal size. Result: the same tree content (names,
  types, modes, mtimes to the second, bytes, symlink targets, hardlinks) built
  with the same e2fsprogs version gives a byte-identical image, whoever owns the
  files and whenever they were copied. The e2fsprogs version is part of the
  cache key for that reason.

The root directory itself is always 0755, 0:0, with the epoch as its times
(``-E root_owner=0:0``); the source directory's own mode is not used.

Images are built under ``cache_dir()/rootfs/<key>/`` by `build_once` (cache.py),
so concurrent callers (xdist workers) build once and nobody takes a half-built
entry. Output files are written to a temporary name and renamed, so nobody ever
sees half an image.

Why this module is longer than ~600 lines: reproducible ext4 images need the tree scan, the
size and inode estimates, the mkfs and debugfs passes and the sparse copy to agree on one
entry model (`_Entry`, `EntryAttrs`); they are one concept, a directory as an image.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pytest_supermachine.cache import build_once, content_key
from pytest_supermachine.errors import GuestBuildError

#: The Debian package with ``mkfs.ext4`` and ``debugfs``.
E2FSPROGS_PACKAGE = "e2fsprogs"
#: Bumped whenever this module changes how the same inputs become image bytes.
RECIPE_VERSION = "1"
#: Creation/superblock time when ``SOURCE_DATE_EPOCH`` is unset: 2000-01-01T00:00:00Z.
#: Not 0, because e2fsprogs reads a fake time of 0 as "use the real clock".
DEFAULT_EPOCH = 946684800
#: File name of the image inside a cache entry.
IMAGE_NAME = "rootfs.ext4"
#: The `build_once` kind of the ext4 images: they live in ``cache_dir()/rootfs/<key>/``.
CACHE_KIND = "rootfs"

BLOCK_SIZE = 4096
INODE_SIZE = 256
_MiB = 1 << 20

# Our own mke2fs.conf, so the host's /etc/mke2fs.conf (which differs between
# distributions and releases) cannot change the features or the bytes. Features
# are the Debian 12 ext4 defaults minus resize_inode (images are never grown
# online); all of them are supported by any kernel since 3.18.
_MKE2FS_CONF = """\
[defaults]
	base_features = sparse_super,large_file,filetype,dir_index,ext_attr
	default_mntopts = acl,user_xattr
	enable_periodic_fsck = 0
	blocksize = 4096
	inode_size = 256
	inode_ratio = 16384
	reserved_ratio = 0

[fs_types]
	ext4 = {
		features = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
	}
"""

# mkfs failures that mean "the image is too small" (worth one retry, bigger).
_NO_SPACE = re.compile(r"Could not allocate|No space left|No free space|too small", re.I)
_SBIN_PATH = "/usr/sbin:/sbin"


@dataclass(frozen=True)
class Device:
    """A device node or FIFO to create in the image at a placeholder's path."""

    kind: Literal["c", "b", "p"]
    major: int = 0
    minor: int = 0


@dataclass(frozen=True)
class EntryAttrs:
    """What the image records for one path, instead of what the host tree says.

    ``mode`` is the permission part (``0o7777``: setuid/setgid/sticky included);
    None keeps the host file's. ``mtime`` None keeps the host file's. With a
    ``device``, the host path must be an empty regular file (a placeholder); the
    image gets the device node or FIFO instead.
    """

    uid: int = 0
    gid: int = 0
    mode: int | None = None
    mtime: int | None = None
    device: Device | None = None

    def to_json(self) -> list[object]:
        dev = (
            None
            if self.device is None
            else [self.device.kind, self.device.major, self.device.minor]
        )
        return [self.uid, self.gid, self.mode, self.mtime, dev]


@dataclass(frozen=True)
class _Entry:
    path: str  # "/a/b", relative to the tree's root, always starting with "/"
    st: os.stat_result
    xattrs: tuple[str, ...]


# ---------------------------------------------------------------------------
# Tools


def _find_tool(name: str) -> str | None:
    # Debian keeps mkfs/debugfs in /usr/sbin, which is not on a normal user's PATH.
    return shutil.which(name) or shutil.which(name, path=_SBIN_PATH)


def check_tools() -> tuple[str, str]:
    """Paths of ``mkfs.ext4`` and ``debugfs``, or a `GuestBuildError` saying what to install."""
    mkfs, debugfs = _find_tool("mkfs.ext4"), _find_tool("debugfs")
    if mkfs is None or debugfs is None:
        missing = " and ".join(
            n for n, p in (("mkfs.ext4", mkfs), ("debugfs", debugfs)) if p is None
        )
        raise GuestBuildError(
            f"building an ext4 root filesystem needs {missing}, which were not found "
            f"on PATH or in {_SBIN_PATH}; install them with\n"
            f"    apt-get install {E2FSPROGS_PACKAGE}\n"
            "(as root, after `apt-get update`)"
        )
    return mkfs, debugfs


@functools.cache
def _mkfs_version_of(mkfs: str) -> str:
    out = subprocess.run([mkfs, "-V"], capture_output=True, text=True, check=False)
    lines = (out.stderr or out.stdout).strip().splitlines()
    return lines[0] if lines else "unknown"


def e2fsprogs_version() -> str:
    """The first line of ``mke2fs -V``; part of every cache key (bytes depend on it)."""
    return _mkfs_version_of(check_tools()[0])


def source_date_epoch() -> int:
    """``SOURCE_DATE_EPOCH`` if set and positive, else `DEFAULT_EPOCH`: the image's own timestamps."""
    value = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    try:
        return int(value) if value and int(value) > 0 else DEFAULT_EPOCH
    except ValueError:
        return DEFAULT_EPOCH


# ---------------------------------------------------------------------------
# Scanning the tree


def _scan(src: Path) -> list[_Entry]:
    """Every entry below ``src`` (not ``src`` itself), parents before children, names sorted as bytes."""
    entries: list[_Entry] = []

    def walk(directory: Path, rel: str) -> None:
        try:
            with os.scandir(directory) as it:
                children = sorted(it, key=lambda d: os.fsencode(d.name))
        except OSError as exc:
            raise GuestBuildError(f"cannot list {directory}: {exc}") from exc
        for child in children:
            path = f"{rel}/{child.name}"
            if "\n" in child.name:
                # debugfs reads its commands line by line; such a name cannot be addressed.
                raise GuestBuildError(
                    f"cannot put {path!r} into an ext4 image: its name contains a newline"
                )
            st = child.stat(follow_symlinks=False)
            try:
                xattrs = tuple(sorted(os.listxattr(child.path, follow_symlinks=False)))
            except OSError:
                xattrs = ()
            entries.append(_Entry(path, st, xattrs))
            if stat.S_ISDIR(st.st_mode):
                walk(Path(child.path), path)

    walk(src, "")
    return entries


def _kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISREG, "f"),
        (stat.S_ISDIR, "d"),
        (stat.S_ISLNK, "l"),
        (stat.S_ISCHR, "c"),
        (stat.S_ISBLK, "b"),
        (stat.S_ISFIFO, "p"),
        (stat.S_ISSOCK, "s"),
    ):
        if test(mode):
            return kind
    return "?"


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError as exc:
        raise GuestBuildError(f"cannot read {path} to build an ext4 image: {exc}") from exc
    return h.hexdigest()


def tree_digest(src: Path, attrs: Mapping[str, EntryAttrs] | None = None) -> str:
    """sha256 of everything of ``src`` that reaches the image (and nothing that does not).

    Covers names, types, permission bits, mtimes (whole seconds: ext4 as made
    here keeps no more), file bytes, symlink targets, device numbers, which
    paths are hardlinks of which, and ``attrs``. Not covered: host owners,
    atimes, ctimes, xattrs, none of which reach the image.
    """
    src = Path(src)
    h = hashlib.sha256()
    first_path: dict[tuple[int, int], str] = {}
    for e in _scan(src):
        st = e.st
        kind = _kind(st.st_mode)
        if kind == "f" and st.st_nlink > 1 and (st.st_dev, st.st_ino) in first_path:
            detail = "=" + first_path[(st.st_dev, st.st_ino)]
        elif kind == "f":
            first_path[(st.st_dev, st.st_ino)] = e.path
            detail = _file_digest(src / e.path[1:])
        elif kind == "l":
            detail = os.readlink(src / e.path[1:])
        elif kind in "cb":
            detail = f"{os.major(st.st_rdev)},{os.minor(st.st_rdev)}"
        else:
            detail = ""
        record = [
            e.path,
            kind,
            stat.S_IMODE(st.st_mode),
            st.st_mtime_ns // 10**9,
            st.st_size,
            detail,
        ]
        h.update(json.dumps(record, ensure_ascii=False).encode("utf-8", "surrogateescape"))
        h.update(b"\n")
    if attrs:
        h.update(
            json.dumps(sorted((k, v.to_json()) for k, v in attrs.items())).encode(
                "utf-8", "surrogateescape"
            )
        )
    return h.hexdigest()


# ---------------------------------------------------------------------------
# Sizing


def _journal_blocks(fs_blocks: int) -> int:
    # Like mke2fs's own default, but fixed here so our size estimate is exact.
    # Journals are never zeroed on disk (lazy_journal_init), so size is free.
    if fs_blocks < 32 * _MiB // BLOCK_SIZE:
        return 4 * _MiB // BLOCK_SIZE
    if fs_blocks < 1024 * _MiB // BLOCK_SIZE:
        return 16 * _MiB // BLOCK_SIZE
    return 64 * _MiB // BLOCK_SIZE


def _inode_count(entries: list[_Entry], size: int | None) -> int:
    # Enough for the tree plus room to add files in the guest; a user-given size
    # also gets one inode per 64 KiB, so a big writable image is not inode-starved.
    unique = len({(e.st.st_dev, e.st.st_ino) for e in entries}) + 1
    count = unique + unique // 4 + 1024
    if size is not None:
        count = max(count, size // (64 * 1024))
    return count


def estimate_size(entries: list[_Entry], inodes: int) -> int:
    """Bytes for an image holding ``entries``: data, metadata, journal, and room to spare.

    Data blocks are counted per file (hardlinks once), directory blocks from
    their entries' name lengths (plus an htree index block for big ones),
    symlinks of 60 bytes or more take a block. On top: inode tables, 1/8 of that
    (at least 8 MiB) of free space, 1/32 for group descriptors, bitmaps and
    superblock backups, and the journal. Rounded up to whole MiB. The file is
    sparse, so generous free space costs no disk.
    """
    blocks = 0
    dir_bytes: dict[str, int] = {"": 24}
    seen: set[tuple[int, int]] = set()
    for e in entries:
        parent, _, name = e.path.rpartition("/")
        dir_bytes[parent] = dir_bytes.get(parent, 24) + 8 + ((len(os.fsencode(name)) + 3) & ~3)
        mode = e.st.st_mode
        if stat.S_ISDIR(mode):
            dir_bytes.setdefault(e.path, 24)
        elif stat.S_ISREG(mode):
            if (e.st.st_dev, e.st.st_ino) in seen:
                continue
            seen.add((e.st.st_dev, e.st.st_ino))
            data = -(-e.st.st_size // BLOCK_SIZE)
            blocks += data + (1 if data > 4096 else 0)  # extent tree block for big files
        elif stat.S_ISLNK(mode) and e.st.st_size >= 60:
            blocks += 1
    for used in dir_bytes.values():
        dblocks = -(-used * 5 // 4 // BLOCK_SIZE)
        blocks += max(1, dblocks) + (1 if dblocks > 1 else 0)
    blocks += -(-inodes * INODE_SIZE // BLOCK_SIZE)
    blocks += max(blocks // 8, 8 * _MiB // BLOCK_SIZE)
    blocks += blocks // 32 + 64
    blocks += _journal_blocks(blocks)
    return -(-blocks * BLOCK_SIZE // _MiB) * _MiB


# ---------------------------------------------------------------------------
# Building


def _q(path: str) -> bytes:
    """A debugfs argument: double-quoted, with inner quotes doubled (its parser's escape)."""
    return b'"' + os.fsencode(path).replace(b'"', b'""') + b'"'


def _clamp_time(t: int) -> int:
    return max(-(2**31), min(t, 2**34 - 2**31 - 1))  # the range ext4's extra time bits cover


def _fixup_script(entries: Iterable[_Entry], attrs: Mapping[str, EntryAttrs]) -> bytes:
    """debugfs commands that make the image say what the caller wants, not what the host says."""
    out: list[bytes] = []
    for e in entries:
        st, a = e.st, attrs.get(e.path)
        q = _q(e.path)
        fmt = stat.S_IFMT(st.st_mode)
        fresh = False
        if a is not None and a.device is not None:
            if not stat.S_ISREG(st.st_mode) or st.st_size:
                raise GuestBuildError(
                    f"{e.path}: a device placeholder must be an empty regular file"
                )
            parent, _, name = e.path.rpartition("/")
            dev = a.device
            numbers = b"" if dev.kind == "p" else f" {dev.major} {dev.minor}".encode()
            out += [
                b"cd " + _q(parent or "/"),
                b"rm " + _q(name),
                b"mknod " + _q(name) + b" " + dev.kind.encode() + numbers,
                b"cd /",
            ]
            fmt = {"c": stat.S_IFCHR, "b": stat.S_IFBLK, "p": stat.S_IFIFO}[dev.kind]
            fresh = True
        uid, gid = (a.uid, a.gid) if a is not None else (0, 0)
        perm = a.mode if a is not None and a.mode is not None else stat.S_IMODE(st.st_mode)
        host_mtime = st.st_mtime_ns // 10**9
        mtime = _clamp_time(a.mtime if a is not None and a.mtime is not None else host_mtime)
        if not stat.S_ISLNK(st.st_mode) and (fresh or fmt | perm != st.st_mode):
            out.append(b"sif %s mode 0%o" % (q, fmt | perm))
        if fresh or uid != st.st_uid:
            out.append(b"sif %s uid %d" % (q, uid))
        if fresh or gid != st.st_gid:
            out.append(b"sif %s gid %d" % (q, gid))
        if fresh or mtime != host_mtime:
            out.append(b"sif %s mtime @%d" % (q, mtime))
        out.append(b"sif %s atime @%d" % (q, mtime))
        out.append(b"sif %s ctime @%d" % (q, mtime))
        if not fresh:
            out += [b"ea_rm %s %s" % (q, os.fsencode(x)) for x in e.xattrs]
    return b"".join(line + b"\n" for line in out)


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        env=env,
        capture_output=True,
        text=True,
        errors="replace",
        check=False,
        stdin=subprocess.DEVNULL,
    )


def _tool_env() -> dict[str, str]:
    env = dict(os.environ)
    env["LC_ALL"] = "C"
    env["E2FSPROGS_FAKE_TIME"] = str(source_date_epoch())
    return env


def _run_mkfs(
    mkfs: str, src: Path, image: Path, *, size: int, inodes: int, label: str, seed: str, conf: Path
) -> subprocess.CompletedProcess[str]:
    """One ``mkfs.ext4 -d`` run into a fresh sparse file (tests count calls to this)."""
    fs_uuid = uuid.UUID(bytes=hashlib.sha256(b"uuid:" + seed.encode()).digest()[:16], version=4)
    hash_seed = uuid.UUID(bytes=hashlib.sha256(b"hash:" + seed.encode()).digest()[:16], version=4)
    journal_mib = _journal_blocks(size // BLOCK_SIZE) * BLOCK_SIZE // _MiB
    image.unlink(missing_ok=True)
    with open(image, "wb") as f:
        f.truncate(size)
    env = _tool_env()
    env["MKE2FS_CONFIG"] = str(conf)
    argv = [
        mkfs,
        "-q",
        "-F",
        "-t",
        "ext4",
        "-b",
        str(BLOCK_SIZE),
        "-I",
        str(INODE_SIZE),
        "-m",
        "0",
        "-N",
        str(inodes),
        "-J",
        f"size={journal_mib}",
        "-L",
        label,
        "-U",
        str(fs_uuid),
        "-E",
        f"root_owner=0:0,hash_seed={hash_seed},lazy_itable_init=0,lazy_journal_init=1,nodiscard",
        "-d",
        str(src),
        str(image),
        f"{size // 1024}k",
    ]
    return _run(argv, env)


def _run_debugfs(debugfs: str, image: Path, script: bytes, work: Path) -> None:
    if not script:
        return
    cmds = work / "debugfs.cmds"
    cmds.write_bytes(script)
    proc = subprocess.run(
        [debugfs, "-w", "-f", str(cmds), str(image)],
        env=_tool_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        check=False,
    )
    # debugfs exits 0 even when commands fail; anything beyond its banner is an error.
    errors = [
        ln
        for ln in proc.stderr.decode(errors="replace").splitlines()
        if ln.strip() and not ln.startswith("debugfs ")
    ]
    if proc.returncode != 0 or errors:
        raise GuestBuildError(
            "debugfs failed while setting owners/modes/times in the ext4 image "
            f"(exit {proc.returncode}):\n" + "\n".join(errors[:40])
        )


def make_ext4(
    src: Path,
    out: Path,
    *,
    seed: str,
    size: int | None = None,
    label: str = "rootfs",
    attrs: Mapping[str, EntryAttrs] | None = None,
) -> Path:
    """Build an ext4 image of ``src`` at ``out`` (uncached; `build_ext4_from_dir` caches).

    Guarantees: every inode is owned by 0:0 unless ``attrs`` (keyed by image
    path, ``"/etc/shadow"``) says otherwise; modes, symlinks, hardlinks, file
    bytes and mtimes are those of ``src`` (or ``attrs``); atime = ctime = mtime;
    no xattrs; ``seed`` (the caller's content key) fixes the UUID and hash seed,
    so the same content and seed give the same bytes. ``size`` in bytes, or None
    to size from the tree (see `estimate_size`). ``out`` appears atomically.
    """
    src, out = Path(src), Path(out)
    mkfs, debugfs = check_tools()
    if not src.is_dir():
        raise GuestBuildError(f"cannot build an ext4 image from {src}: not a directory")
    if not label or len(label.encode()) > 16:
        raise GuestBuildError(f"ext4 label {label!r} must be 1 to 16 bytes")
    attrs = dict(attrs or {})
    entries = _scan(src)
    known = {e.path for e in entries}
    unknown = sorted(p for p in attrs if p not in known)
    if unknown:
        raise GuestBuildError(f"attributes given for paths not in {src}: {', '.join(unknown[:10])}")
    inodes = _inode_count(entries, size)
    auto = size is None
    want = estimate_size(entries, inodes) if size is None else size
    if want % 1024:
        want += 1024 - want % 1024
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".mkext4-", dir=out.parent) as tmp:
        work = Path(tmp)
        conf = work / "mke2fs.conf"
        conf.write_text(_MKE2FS_CONF)
        image = work / "image.ext4"
        for attempt in range(2):
            proc = _run_mkfs(
                mkfs, src, image, size=want, inodes=inodes, label=label, seed=seed, conf=conf
            )
            if proc.returncode == 0:
                break
            output = (proc.stdout + proc.stderr).strip()
            if auto and attempt == 0 and _NO_SPACE.search(output):
                want *= 2  # our estimate was short; one retry, twice as big
                continue
            hint = " (too small? omit size= to let it be computed)" if not auto else ""
            raise GuestBuildError(
                f"mkfs.ext4 -d {src} failed (exit {proc.returncode}) for a "
                f"{want // _MiB} MiB image{hint}:\n{output[-4000:]}"
            )
        _run_debugfs(debugfs, image, _fixup_script(entries, attrs), work)
        os.replace(image, out)
    return out


# ---------------------------------------------------------------------------
# Cache


def built_with() -> dict[str, object]:
    """What an entry's manifest records about the tools and recipe that made it."""
    return {"e2fsprogs": e2fsprogs_version(), "recipe": RECIPE_VERSION}


def copy_sparse(src: Path, dst: Path) -> Path:
    """Copy ``src`` to ``dst`` keeping holes (images are mostly holes); ``dst`` appears atomically."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    try:
        with open(src, "rb") as fi, open(tmp, "wb") as fo:
            size = os.fstat(fi.fileno()).st_size
            fo.truncate(size)
            for start, end in _data_extents(fi.fileno(), size):
                _copy_range(fi.fileno(), fo.fileno(), start, end)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dst


def _data_extents(fd: int, size: int) -> Iterable[tuple[int, int]]:
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole remains
                return
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # no hole support: all data
                yield offset, size
                return
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end
        offset = end


def _copy_range(fi: int, fo: int, start: int, end: int) -> None:
    pos = start
    while pos < end:
        try:
            n = os.copy_file_range(fi, fo, end - pos, pos, pos)
        except OSError:
            n = 0
        if n <= 0:  # not supported here: plain reads and writes
            data = os.pread(fi, min(end - pos, 1 << 20), pos)
            if not data:
                return
            n = os.pwrite(fo, data, pos)
        pos += n


def build_ext4_from_dir(
    src: Path,
    out: Path | None = None,
    *,
    size: int | None = None,
    label: str = "rootfs",
    attrs: Mapping[str, EntryAttrs] | None = None,
) -> Path:
    """An ext4 image of directory ``src``, built once per content and cached.

    Every file is owned by 0:0 in the image whoever owns it on the host (unless
    ``attrs`` says otherwise); modes, symlinks, hardlinks, mtimes and bytes are
    kept; device nodes, FIFOs and sockets in ``src`` are copied by mkfs.
    ``size`` in bytes, None to compute it from the tree (see `estimate_size`).

    Returns the cached image (``cache_dir()/rootfs/<key>/rootfs.ext4``, shared:
    attach it read-only) when ``out`` is None, else ``out``: a private, sparse
    copy of it that appears atomically. The key hashes the tree's content
    (`tree_digest`), ``size``, ``label``, ``attrs``, the e2fsprogs version and
    the recipe version, so a second call with unchanged content runs no mkfs.
    """
    src = Path(src)
    if not src.is_dir():
        raise GuestBuildError(f"cannot build an ext4 image from {src}: not a directory")
    key = content_key(
        "rootfs-dir",
        RECIPE_VERSION,
        e2fsprogs_version(),
        str(source_date_epoch()),
        label,
        str(size),
        tree_digest(src, attrs),
    )

    def fill(entry: Path) -> Mapping[str, object]:
        make_ext4(src, entry / IMAGE_NAME, seed=key, size=size, label=label, attrs=attrs)
        return {
            **built_with(),
            "kind": "dir",
            "source": str(src.resolve()),
            "label": label,
            "size": (entry / IMAGE_NAME).stat().st_size,
        }

    image = build_once(CACHE_KIND, key, fill) / IMAGE_NAME
    return image if out is None else copy_sparse(image, Path(out))
