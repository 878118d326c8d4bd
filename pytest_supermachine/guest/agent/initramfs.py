"""The Linux guest's initramfs: busybox-static, the agent as ``/init``, a few config files.

Written as a "newc" cpio by this module, byte by byte: no root, no ``cpio``
tool, and every header says uid/gid 0, mtime 0 and an explicit mode, so the
archive's bytes depend on nothing but its inputs (reproducible, and a stable
part of snapshot cache keys). Cached like the agent under
``cache_dir()/initramfs/<key>/initramfs.cpio``, the key hashing the agent
binary, busybox, the extra files and `FORMAT_VERSION`.

Uncompressed on purpose: decompressing at guest CPL0 is slow under nested PVM.
"""

from __future__ import annotations

import os
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ...cache import cached_artifact, content_key
from ...errors import GuestBuildError
from .build import build_agent

#: Bumped whenever this module lays out the same inputs differently.
FORMAT_VERSION = "2"
ARCHIVE_NAME = "initramfs.cpio"
#: Debian's busybox-static installs a statically linked busybox here.
BUSYBOX = Path("/bin/busybox")
BUSYBOX_PACKAGE = "busybox-static"

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"

#: Directories every image has (mount points and homes); parents of other entries are added.
DIRECTORIES = (
    "bin",
    "dev",
    "etc",
    "proc",
    "root",
    "run",
    "sbin",
    "sys",
    "sysroot",
    "tmp",
    "usr",
    "usr/bin",
    "usr/sbin",
)
#: Device nodes the kernel needs before init mounts devtmpfs: it opens /dev/console
#: for init's stdin/stdout/stderr.
DEVICES = {"dev/console": (stat.S_IFCHR | 0o600, 5, 1), "dev/null": (stat.S_IFCHR | 0o666, 1, 3)}
CONFIG_FILES = {
    "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n",
    "etc/group": b"root:x:0:\n",
    "etc/hosts": b"127.0.0.1\tlocalhost supermachine\n",
    "etc/hostname": b"supermachine\n",
    # The NIC's DNS (libslirp's 10.0.2.3, answered by the egress filter: docs/network.md);
    # without a NIC lookups fail at once (no route).
    "etc/resolv.conf": b"nameserver 10.0.2.3\n",
}


@dataclass(frozen=True)
class CpioEntry:
    """One member of a newc archive (what `parse_cpio` returns)."""

    name: str
    mode: int  # file type and permission bits, as in st_mode
    uid: int
    gid: int
    mtime: int
    data: bytes  # file contents, or the target of a symlink
    rdev: tuple[int, int] = (0, 0)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


# ----------------------------------------------------------------------------- cpio writer


class _Writer:
    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0
        self.ino = 0

    def _put(self, data: bytes) -> None:
        self.parts.append(data)
        self.size += len(data)

    def _pad(self) -> None:
        if self.size % 4:
            self._put(b"\0" * (4 - self.size % 4))

    def add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        self.ino += 1
        encoded = name.encode() + b"\0"
        fields = (
            self.ino,
            mode,
            0,  # uid
            0,  # gid
            2 if stat.S_ISDIR(mode) else 1,  # nlink
            0,  # mtime: reproducible
            len(data),
            0,  # devmajor, devminor: of the (nonexistent) source filesystem
            0,
            rdev[0],
            rdev[1],
            len(encoded),
            0,  # check: only for the "070702" crc format
        )
        self._put(NEWC_MAGIC + b"".join(b"%08X" % f for f in fields) + encoded)
        self._pad()
        if data:
            self._put(data)
            self._pad()

    def finish(self) -> bytes:
        self.ino = 0
        self.add(TRAILER, 0)
        return b"".join(self.parts)


def write_cpio(entries: list[CpioEntry]) -> bytes:
    """A newc archive of ``entries`` in the given order (ownership and mtime as given)."""
    w = _Writer()
    for e in entries:
        if e.uid or e.gid or e.mtime:
            raise ValueError("entries are written with uid/gid/mtime 0")
        w.add(e.name, e.mode, e.data, e.rdev)
    return w.finish()


def parse_cpio(data: bytes) -> list[CpioEntry]:
    """The members of a newc archive, up to its trailer. ValueError for anything malformed."""
    entries: list[CpioEntry] = []
    pos = 0
    while True:
        if len(data) - pos < 110:
            raise ValueError(f"truncated cpio header at offset {pos}")
        if data[pos : pos + 6] != NEWC_MAGIC:
            raise ValueError(f"bad cpio magic {data[pos : pos + 6]!r} at offset {pos}")
        try:
            f = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        except ValueError:
            raise ValueError(f"non-hex cpio header field at offset {pos}") from None
        mode, uid, gid, mtime, size = f[1], f[2], f[3], f[5], f[6]
        rdev, namesize = (f[9], f[10]), f[11]
        name_end = pos + 110 + namesize
        if namesize < 1 or name_end > len(data) or data[name_end - 1] != 0:
            raise ValueError(f"bad cpio name at offset {pos}")
        name = data[pos + 110 : name_end - 1].decode()
        pos = (name_end + 3) & ~3
        if name == TRAILER:
            return entries
        if pos + size > len(data):
            raise ValueError(f"cpio member {name} runs past the archive")
        entries.append(CpioEntry(name, mode, uid, gid, mtime, data[pos : pos + size], rdev))
        pos = (pos + size + 3) & ~3


# ----------------------------------------------------------------------------- contents


def find_busybox() -> Path:
    """The host's static busybox; GuestBuildError saying what to install otherwise."""
    hint = f"install it with: apt-get install {BUSYBOX_PACKAGE}"
    if not BUSYBOX.is_file():
        raise GuestBuildError(f"the guest initramfs needs a static busybox at {BUSYBOX}; {hint}")
    if _elf_is_dynamic(BUSYBOX.read_bytes()):
        raise GuestBuildError(
            f"{BUSYBOX} is dynamically linked (Debian's `busybox` package), the initramfs has "
            f"no shared libraries; {hint} (it replaces the dynamic one)"
        )
    return BUSYBOX


def _elf_is_dynamic(elf: bytes) -> bool:
    """True if a 64-bit little-endian ELF has a PT_INTERP program header."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise GuestBuildError(f"{BUSYBOX} is not a 64-bit little-endian ELF")
    phoff = int.from_bytes(elf[32:40], "little")
    phentsize = int.from_bytes(elf[54:56], "little")
    phnum = int.from_bytes(elf[56:58], "little")
    for i in range(phnum):
        off = phoff + i * phentsize
        if int.from_bytes(elf[off : off + 4], "little") == 3:  # PT_INTERP
            return True
    return False


def busybox_applets(busybox: Path) -> list[str]:
    """Install paths of every applet (``bin/sh``, ``usr/bin/awk``, ...), from the binary itself."""
    try:
        out = subprocess.run(
            [str(busybox), "--list-full"], capture_output=True, check=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise GuestBuildError(f"{busybox} --list-full failed: {exc}") from exc
    return sorted({line.strip().lstrip("/") for line in out.decode().splitlines() if line.strip()})


def _file_mode(data: bytes) -> int:
    """Executables (ELF or #!) get 0755, everything else 0644."""
    return 0o755 if data[:4] == b"\x7fELF" or data[:2] == b"#!" else 0o644


def initramfs_entries(
    agent: bytes, busybox: bytes, applets: list[str], extra_files: dict[str, bytes] | None = None
) -> list[CpioEntry]:
    """Every member of the archive, parents before children, in a stable order."""
    files: dict[str, tuple[int, bytes, tuple[int, int]]] = {}
    for d in DIRECTORIES:
        files[d] = (stat.S_IFDIR | 0o755, b"", (0, 0))
    files["tmp"] = (stat.S_IFDIR | 0o1777, b"", (0, 0))
    files["root"] = (stat.S_IFDIR | 0o700, b"", (0, 0))
    for name, (mode, major, minor) in DEVICES.items():
        files[name] = (mode, b"", (major, minor))
    for name, data in CONFIG_FILES.items():
        files[name] = (stat.S_IFREG | 0o644, data, (0, 0))
    files["init"] = (stat.S_IFREG | 0o755, agent, (0, 0))
    files["sbin/sm-agent"] = (stat.S_IFLNK | 0o777, b"/init", (0, 0))
    files["bin/busybox"] = (stat.S_IFREG | 0o755, busybox, (0, 0))
    for applet in applets:
        if applet != "bin/busybox" and applet not in files:
            # relative, so /bin still works where init binds it into a switched root
            target = os.path.relpath("bin/busybox", os.path.dirname(applet) or ".")
            files[applet] = (stat.S_IFLNK | 0o777, target.encode(), (0, 0))
    for raw, data in (extra_files or {}).items():
        name = raw.strip("/")
        if not name or ".." in name.split("/") or name == TRAILER:
            raise ValueError(f"invalid initramfs path {raw!r}")
        files[name] = (stat.S_IFREG | _file_mode(data), data, (0, 0))
    for name in list(files):  # parents of everything, as directories
        parts = name.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent not in files:
                files[parent] = (stat.S_IFDIR | 0o755, b"", (0, 0))
            elif not stat.S_ISDIR(files[parent][0]):
                raise ValueError(f"initramfs path {name!r} is below the non-directory {parent!r}")
    # sorted by path components: a directory comes right before its contents
    return [
        CpioEntry(name, mode, 0, 0, 0, data, rdev)
        for name, (mode, data, rdev) in sorted(files.items(), key=lambda kv: kv[0].split("/"))
    ]


def build_initramfs(extra_files: dict[str, bytes] | None = None) -> Path:
    """Return the path of the initramfs cpio, assembling it on first use.

    ``extra_files`` maps absolute guest paths to contents (executables — ELF or
    ``#!`` — get mode 0755, others 0644; parent directories are created).
    Needs gcc (the agent) and Debian's busybox-static; raises GuestBuildError
    saying what to install otherwise.
    """
    agent = build_agent().read_bytes()
    bb_path = find_busybox()
    busybox = bb_path.read_bytes()
    parts: list[bytes | str] = [FORMAT_VERSION, agent, busybox]
    for name in sorted(extra_files or {}):
        parts += [name, (extra_files or {})[name]]

    def assemble(tmp: Path) -> None:
        entries = initramfs_entries(agent, busybox, busybox_applets(bb_path), extra_files)
        (tmp / ARCHIVE_NAME).write_bytes(write_cpio(entries))

    return cached_artifact("initramfs", content_key(*parts)[:16], ARCHIVE_NAME, assemble)
