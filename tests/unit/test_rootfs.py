"""ext4 images from a directory: contents, ownership, reproducibility, caching.

No KVM: every image is read back with e2fsprogs' own ``debugfs`` (and checked with
``e2fsck -fn``), which is what the guest kernel would see.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import shutil
import stat
import subprocess
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_supermachine.errors import GuestBuildError
from pytest_supermachine.images import rootfs
from pytest_supermachine.images.rootfs import (
    Device,
    EntryAttrs,
    build_ext4_from_dir,
    check_tools,
    make_ext4,
)
from tests.environment import missing

pytestmark = [
    pytest.mark.unit,
    pytest.mark.skipif(
        rootfs._find_tool("mkfs.ext4") is None or rootfs._find_tool("debugfs") is None,
        reason="needs e2fsprogs (apt-get install e2fsprogs)",
    ),
]

MTIME = 1_600_000_000


def debugfs(image: Path, command: str) -> str:
    tool = rootfs._find_tool("debugfs")
    assert tool
    proc = subprocess.run([tool, "-R", command, str(image)], capture_output=True, check=True)
    return proc.stdout.decode("utf-8", "surrogateescape")


def ls(image: Path, path: str) -> dict[str, tuple[int, int, int, int]]:
    """name -> (inode, mode, uid, gid) via ``ls -p`` (``/ino/mode/uid/gid/name/size/``)."""
    out = {}
    for line in debugfs(image, f'ls -p "{path}"').splitlines():
        if not line.startswith("/"):
            continue
        _, ino, mode, uid, gid, name, *_ = line.split("/")
        if name not in (".", ".."):
            out[name] = (int(ino), int(mode, 8), int(uid), int(gid))
    return out


def inode_stat(image: Path, path: str) -> dict[str, str]:
    text = debugfs(image, f'stat "{path}"')
    info: dict[str, str] = {"raw": text}
    for key, pattern in {
        "type": r"Type: (\w[\w ]*?)\s+Mode",
        "mode": r"Mode:\s+(\d+)",
        "uid": r"User:\s+(\d+)",
        "gid": r"Group:\s+(\d+)",
        "links": r"Links: (\d+)",
        "ctime": r"ctime: (0x[0-9a-f]+)",
        "atime": r"atime: (0x[0-9a-f]+)",
        "mtime": r"mtime: (0x[0-9a-f]+)",
        "device": r"Device major/minor number: (\S+)",
        "fastlink": r'Fast link dest: "(.*)"',
    }.items():
        m = re.search(pattern, text)
        if m:
            info[key] = m.group(1)
    return info


def cat(image: Path, path: str) -> bytes:
    tool = rootfs._find_tool("debugfs")
    assert tool
    return subprocess.run(
        [tool, "-R", f'cat "{path}"', str(image)], capture_output=True, check=True
    ).stdout


def fsck(image: Path) -> None:
    tool = rootfs._find_tool("e2fsck")
    assert tool
    proc = subprocess.run([tool, "-fn", str(image)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def make_tree(root: Path, *, foreign_owner: bool = True) -> Path:
    """A small tree with every kind of entry the image must keep."""
    root.mkdir(parents=True)
    (root / "etc").mkdir()
    (root / "etc" / "hostname").write_text("supermachine\n")
    (root / "etc" / "shadow").write_text("root:*:1::::::\n")
    os.chmod(root / "etc" / "shadow", 0o640)
    (root / "bin").mkdir()
    (root / "bin" / "tool").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(root / "bin" / "tool", 0o755)
    (root / "bin" / "suid").write_bytes(b"\x7fELF")
    os.link(root / "bin" / "tool", root / "bin" / "tool-hardlink")
    (root / "bin" / "sh").symlink_to("tool")
    (root / "long-link").symlink_to("/usr/share/" + "x" * 80)
    (root / "private").mkdir(mode=0o700)
    os.chmod(root / "private", 0o700)
    (root / "tmp").mkdir()
    os.chmod(root / "tmp", 0o1777)
    (root / "empty").write_bytes(b"")
    (root / "big").write_bytes(os.urandom(200_000))
    (root / 'odd name "quoted" \\ back').write_text("odd\n")
    (root / "deep" / "er" / "est").mkdir(parents=True)
    (root / "deep" / "er" / "est" / "leaf").write_text("leaf\n")
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            if foreign_owner and os.geteuid() == 0:
                os.lchown(p, 1234, 5678)  # a CI user's files, as far as mkfs can tell
            os.utime(p, (MTIME, MTIME), follow_symlinks=False)
    os.chmod(root / "bin" / "suid", 0o4755)  # after chown, which clears setuid
    return root


def test_contents_modes_links_and_root_ownership(tmp_path: Path) -> None:
    """What the guest sees: same names, bytes, modes, links; every inode owned by 0:0."""
    src = make_tree(tmp_path / "src")
    image = build_ext4_from_dir(src)
    fsck(image)

    top = ls(image, "/")
    assert set(top) >= {
        "etc",
        "bin",
        "long-link",
        "private",
        "tmp",
        "empty",
        "big",
        "deep",
        'odd name "quoted" \\ back',
    }
    for path in [
        "/",
        "/etc",
        "/etc/hostname",
        "/etc/shadow",
        "/bin/tool",
        "/bin/suid",
        "/bin/sh",
        "/long-link",
        "/private",
        "/tmp",
        "/deep/er/est/leaf",
    ]:
        info = inode_stat(image, path)
        assert (info["uid"], info["gid"]) == ("0", "0"), path

    assert int(inode_stat(image, "/etc/shadow")["mode"], 8) == 0o640
    assert int(inode_stat(image, "/bin/tool")["mode"], 8) == 0o755
    assert int(inode_stat(image, "/bin/suid")["mode"], 8) == 0o4755
    assert int(inode_stat(image, "/private")["mode"], 8) == 0o700
    assert int(inode_stat(image, "/tmp")["mode"], 8) == 0o1777

    assert cat(image, "/etc/hostname") == b"supermachine\n"
    assert cat(image, "/big") == (src / "big").read_bytes()
    assert cat(image, "/empty") == b""
    assert cat(image, '/odd name ""quoted"" \\ back') == b"odd\n"
    assert cat(image, "/deep/er/est/leaf") == b"leaf\n"

    assert inode_stat(image, "/bin/sh")["type"] == "symlink"
    assert inode_stat(image, "/bin/sh")["fastlink"] == "tool"
    # A long target lives in a data block, not in the inode.
    assert cat(image, "/long-link") == b"/usr/share/" + b"x" * 80

    bins = ls(image, "/bin")
    assert bins["tool"][0] == bins["tool-hardlink"][0]
    assert inode_stat(image, "/bin/tool")["links"] == "2"


def test_times_are_the_mtime_and_host_xattrs_are_dropped(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    try:
        os.setxattr(src / "etc" / "hostname", "user.host-only", b"leak")
    except OSError:
        missing("the tmp file system has no user xattrs")
    os.utime(src / "etc" / "hostname", (MTIME, MTIME))
    image = build_ext4_from_dir(src)
    info = inode_stat(image, "/etc/hostname")
    assert int(info["mtime"], 16) == MTIME
    assert info["atime"] == info["ctime"] == info["mtime"]
    assert "user.host-only" not in debugfs(image, 'ea_list "/etc/hostname"')
    fsck(image)


def test_same_content_gives_the_same_bytes(tmp_path: Path, private_cache: Path) -> None:
    """Byte-identical images from the same content, even from a later copy with other owners/ctimes."""
    src = make_tree(tmp_path / "src")
    first = build_ext4_from_dir(src, tmp_path / "first.ext4")
    shutil.rmtree(private_cache)

    copy = tmp_path / "copy"
    shutil.copytree(src, copy, symlinks=True)  # new inodes, new ctimes; copy2 keeps mtimes
    for dirpath, dirnames, filenames in os.walk(copy):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            os.utime(p, (MTIME + 5, MTIME), follow_symlinks=False)  # other atimes
            if os.geteuid() == 0:
                os.lchown(p, 0, 0)
    os.utime(copy / "bin", (MTIME, MTIME))
    # copytree does not keep hardlinks; restore that one so the content is the same.
    os.unlink(copy / "bin" / "tool-hardlink")
    os.link(copy / "bin" / "tool", copy / "bin" / "tool-hardlink")
    os.chmod(copy / "bin" / "suid", 0o4755)  # chown cleared it
    for p in (copy / "bin", copy / "bin" / "tool", copy / "bin" / "tool-hardlink"):
        os.utime(p, (MTIME, MTIME))
    assert rootfs.tree_digest(src) == rootfs.tree_digest(copy)
    second = build_ext4_from_dir(copy, tmp_path / "second.ext4")
    assert first.read_bytes() == second.read_bytes()


def test_a_second_build_reuses_the_cache(tmp_path: Path, mkfs_runs: list[Path]) -> None:
    src = make_tree(tmp_path / "src")
    image = build_ext4_from_dir(src)
    assert len(mkfs_runs) == 1
    built_at = image.stat().st_mtime_ns

    assert build_ext4_from_dir(src) == image
    out = build_ext4_from_dir(src, tmp_path / "private.ext4")
    assert len(mkfs_runs) == 1, "unchanged content must not run mkfs again"
    assert image.stat().st_mtime_ns == built_at
    assert out.read_bytes() == image.read_bytes()
    assert out.stat().st_blocks * 512 < out.stat().st_size, "the private copy keeps the holes"

    (src / "etc" / "hostname").write_text("changed\n")
    changed = build_ext4_from_dir(src)
    assert len(mkfs_runs) == 2 and changed != image
    assert cat(changed, "/etc/hostname") == b"changed\n"


def _build_in_child(src: str, log: str) -> str:
    def counting(mkfs: str, src: Path, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return real(mkfs, src, *args, **kwargs)  # type: ignore[arg-type]

    real = rootfs._run_mkfs
    rootfs._run_mkfs = counting  # type: ignore[assignment]
    return str(build_ext4_from_dir(Path(src)))


def test_concurrent_builders_build_once(tmp_path: Path) -> None:
    """xdist workers asking for the same image at once: one mkfs, one shared result."""
    src = make_tree(tmp_path / "src")
    log = tmp_path / "mkfs.log"
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(3) as pool:
        paths = pool.starmap(_build_in_child, [(str(src), str(log))] * 3)
    assert len(set(paths)) == 1
    assert len(log.read_text().split()) == 1


def test_size_computed_or_given(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    auto = build_ext4_from_dir(src)
    assert auto.stat().st_size % (1 << 20) == 0
    assert auto.stat().st_size >= 8 << 20
    given = build_ext4_from_dir(src, size=64 << 20)
    assert given.stat().st_size == 64 << 20
    fsck(given)
    (src / "huge").write_bytes(b"\1" * (3 << 20))
    with pytest.raises(GuestBuildError, match=r"mkfs.ext4 .* 1 MiB image \(too small"):
        build_ext4_from_dir(src, size=1 << 20)


def test_size_estimate_fits_many_small_files(tmp_path: Path) -> None:
    """A thousand small files in one directory: inodes and directory blocks are counted."""
    src = tmp_path / "many"
    src.mkdir()
    for i in range(1000):
        (src / f"file-with-a-longish-name-{i:05d}").write_bytes(b"x" * (i % 5000))
    image = build_ext4_from_dir(src)
    assert len(ls(image, "/")) == 1001  # + lost+found
    fsck(image)


def test_attrs_set_owners_modes_and_devices(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "dev").mkdir(parents=True)
    (src / "dev" / "null").write_bytes(b"")
    (src / "dev" / "fifo").write_bytes(b"")
    (src / "home" / "user").mkdir(parents=True)
    (src / "home" / "user" / "notes").write_text("hi\n")
    attrs = {
        "/dev/null": EntryAttrs(mode=0o666, device=Device("c", 1, 3)),
        "/dev/fifo": EntryAttrs(mode=0o600, uid=7, device=Device("p")),
        "/home/user": EntryAttrs(uid=1000, gid=1000, mode=0o750, mtime=MTIME),
        "/home/user/notes": EntryAttrs(uid=1000, gid=100, mode=0o4711),
    }
    image = make_ext4(src, tmp_path / "img.ext4", seed="attrs", attrs=attrs)
    fsck(image)
    null = inode_stat(image, "/dev/null")
    assert null["type"] == "character special" and null["device"] == "01:03"
    assert int(null["mode"], 8) == 0o666
    fifo = inode_stat(image, "/dev/fifo")
    assert fifo["type"] == "FIFO" and fifo["uid"] == "7"
    home = inode_stat(image, "/home/user")
    assert (home["uid"], home["gid"], int(home["mode"], 8)) == ("1000", "1000", 0o750)
    assert int(home["mtime"], 16) == MTIME
    notes = inode_stat(image, "/home/user/notes")
    assert (notes["uid"], notes["gid"], int(notes["mode"], 8)) == ("1000", "100", 0o4711)
    assert inode_stat(image, "/home")["uid"] == "0"


def test_attrs_for_missing_paths_are_an_error(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with pytest.raises(GuestBuildError, match="/nope"):
        make_ext4(src, tmp_path / "x.ext4", seed="s", attrs={"/nope": EntryAttrs()})


def test_newline_in_a_name_is_refused_by_name(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "bad\nname").write_text("x")
    with pytest.raises(GuestBuildError, match="newline"):
        build_ext4_from_dir(src)


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(GuestBuildError, match="not a directory"):
        build_ext4_from_dir(tmp_path / "missing")


def test_missing_e2fsprogs_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rootfs, "_find_tool", lambda name: None)
    with pytest.raises(GuestBuildError, match="apt-get install e2fsprogs"):
        check_tools()


def test_output_is_atomic_and_leaves_no_temporaries(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    out_dir = tmp_path / "out"
    make_ext4(src, out_dir / "img.ext4", seed="x")
    assert [p.name for p in out_dir.iterdir()] == ["img.ext4"]
    assert stat.S_ISREG(os.stat(out_dir / "img.ext4").st_mode)


def run_as_nobody(fn: Callable[[], None]) -> None:
    """Run ``fn`` in a forked child that dropped to uid/gid 65534 (only modules already imported)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            fn()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the unprivileged build failed (see stderr)"


@pytest.mark.skipif(os.geteuid() != 0, reason="already covered: these tests run unprivileged")
def test_an_unprivileged_users_tree_becomes_root_owned(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tree owned by (and built by) uid 65534: the image says 0:0, setuid kept, same bytes as root's."""
    work = Path(tempfile.mkdtemp(prefix="supermachine-nobody-"))
    try:
        os.chown(work, 65534, 65534)
        src = work / "src"
        monkeypatch.setenv("SUPERMACHINE_CACHE_DIR", str(work / "cache"))

        def build() -> None:
            make_tree(src, foreign_owner=False)
            build_ext4_from_dir(src, work / "out.ext4")

        run_as_nobody(build)
        image = work / "out.ext4"
        assert os.stat(src / "etc" / "hostname").st_uid == 65534
        for path in ["/", "/etc/hostname", "/bin/suid", "/bin/sh", "/private"]:
            info = inode_stat(image, path)
            assert (info["uid"], info["gid"]) == ("0", "0"), path
        assert int(inode_stat(image, "/bin/suid")["mode"], 8) == 0o4755
        fsck(image)
        monkeypatch.setenv("SUPERMACHINE_CACHE_DIR", str(work / "root-cache"))
        assert build_ext4_from_dir(src).read_bytes() == image.read_bytes()
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)


def test_names_that_are_not_utf8_survive(tmp_path: Path) -> None:
    """Names are bytes on Linux: a Latin-1 name reaches the image, and the debugfs pass finds it."""
    src = tmp_path / "src"
    src.mkdir()
    name = os.fsdecode(b"caf\xe9")
    (src / name).write_bytes(b"x")
    os.utime(src / name, (MTIME, MTIME))
    image = build_ext4_from_dir(src)
    entries = ls(image, "/")
    assert name in entries
    info = inode_stat(image, f"<{entries[name][0]}>")
    assert int(info["mtime"], 16) == MTIME and info["ctime"] == info["mtime"]
    fsck(image)
