"""OCI / docker-save image archives: layers, whiteouts, hostile entries, the ext4 result.

The archives are made here, from scratch: layer tars with `tarfile`, the JSON
documents by hand, so the reader is checked against the formats, not against our
own writer (which gets one round-trip test of its own at the end).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import stat
import subprocess
import tarfile
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_supermachine.errors import GuestBuildError
from pytest_supermachine.images import rootfs
from pytest_supermachine.images.oci import (
    ImageConfig,
    OciFormatError,
    build_oci_rootfs,
    unpack_oci,
    unpack_oci_tree,
    write_image_archive,
)

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("private_cache")]

needs_e2fsprogs = pytest.mark.skipif(
    rootfs._find_tool("mkfs.ext4") is None or rootfs._find_tool("debugfs") is None,
    reason="needs e2fsprogs (apt-get install e2fsprogs)",
)

MTIME = 1_600_000_000
CONFIG = {
    "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "GREETING=hello"],
    "Cmd": ["/bin/sh", "-c", "echo hi"],
    "Entrypoint": ["/entry"],
    "WorkingDir": "/srv",
    "User": "1000:1000",
}


# ---------------------------------------------------------------------------
# Building archives by hand


def E(
    name: str,
    kind: str = "file",
    data: bytes = b"",
    *,
    mode: int | None = None,
    uid: int = 0,
    gid: int = 0,
    link: str = "",
    dev: tuple[int, int] = (0, 0),
) -> tuple[tarfile.TarInfo, bytes]:
    """One layer tar entry."""
    info = tarfile.TarInfo(name)
    info.type = {
        "file": tarfile.REGTYPE,
        "dir": tarfile.DIRTYPE,
        "sym": tarfile.SYMTYPE,
        "hard": tarfile.LNKTYPE,
        "chr": tarfile.CHRTYPE,
        "fifo": tarfile.FIFOTYPE,
    }[kind]
    info.mode = mode if mode is not None else (0o755 if kind == "dir" else 0o644)
    info.uid, info.gid, info.mtime = uid, gid, MTIME
    info.linkname = link
    info.devmajor, info.devminor = dev
    info.size = len(data) if kind == "file" else 0
    return info, data


def layer_tar(entries: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def config_doc(layers: list[bytes]) -> bytes:
    return json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": CONFIG,
            "rootfs": {"type": "layers", "diff_ids": [sha(t) for t in layers]},
            "history": [{"created_by": "test"}],
        }
    ).encode()


def write_tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def oci_archive(path: Path, layers: list[bytes], *, gzip_layers: bool = False) -> Path:
    """An OCI image layout in a tar: oci-layout, index.json, blobs/sha256/*."""
    files: dict[str, bytes] = {"oci-layout": b'{"imageLayoutVersion":"1.0.0"}'}
    descs = []
    for t in layers:
        blob = gzip.compress(t) if gzip_layers else t
        files[f"blobs/sha256/{sha(blob)[7:]}"] = blob
        descs.append(
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar"
                + ("+gzip" if gzip_layers else ""),
                "digest": sha(blob),
                "size": len(blob),
            }
        )
    cfg = config_doc(layers)
    files[f"blobs/sha256/{sha(cfg)[7:]}"] = cfg
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha(cfg),
                "size": len(cfg),
            },
            "layers": descs,
        }
    ).encode()
    files[f"blobs/sha256/{sha(manifest)[7:]}"] = manifest
    files["index.json"] = json.dumps(
        {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": sha(manifest),
                    "size": len(manifest),
                    "annotations": {"org.opencontainers.image.ref.name": "test"},
                }
            ],
        }
    ).encode()
    return write_tar(path, files)


def docker_archive(path: Path, layers: list[bytes]) -> Path:
    """``docker save`` (pre-25) output: manifest.json, <config>.json, <id>/layer.tar."""
    cfg = config_doc(layers)
    files: dict[str, bytes] = {f"{sha(cfg)[7:]}.json": cfg}
    names = []
    for i, t in enumerate(layers):
        layer_id = hashlib.sha256(f"layer-id-{i}".encode()).hexdigest()  # ids are not digests
        files[f"{layer_id}/VERSION"] = b"1.0"
        files[f"{layer_id}/layer.tar"] = t
        names.append(f"{layer_id}/layer.tar")
    files["manifest.json"] = json.dumps(
        [{"Config": f"{sha(cfg)[7:]}.json", "RepoTags": ["test:latest"], "Layers": names}]
    ).encode()
    files["repositories"] = b"{}"
    return write_tar(path, files)


def make_archive(kind: str, path: Path, layers: list[bytes]) -> Path:
    if kind == "docker":
        return docker_archive(path, layers)
    return oci_archive(path, layers, gzip_layers=(kind == "oci-gzip"))


# The two-layer image the format tests share.
BASE = [
    E("etc/", "dir"),
    E("etc/hostname", data=b"base\n"),
    E("etc/passwd", data=b"root:x:0:0::/root:/bin/sh\n"),
    E("etc/localtime", "sym", link="/usr/share/zoneinfo/UTC"),
    E("bin/", "dir"),
    E("bin/sh", data=b"#!shell\n", mode=0o755),
    E("bin/sh-hardlink", "hard", link="bin/sh"),
    E("bin/su", data=b"su\n", mode=0o4755),
    E("usr/", "dir"),
    E("usr/lib/", "dir"),
    E("usr/lib/libc.so", data=b"libc\n"),
    E("lib", "sym", link="usr/lib"),
    E("opt/", "dir"),
    E("opt/data/", "dir"),
    E("opt/data/a", data=b"a\n"),
    E("opt/data/sub/", "dir"),
    E("opt/data/sub/b", data=b"b\n"),
    E("var/", "dir"),
    E("var/log/", "dir"),
    E("var/log/old.log", data=b"old\n"),
    E("home/", "dir"),
    E("home/user/", "dir", mode=0o700, uid=1000, gid=1000),
    E("home/user/.profile", data=b"export A=1\n", uid=1000, gid=1000, mode=0o600),
    E("dev/", "dir"),
    E("dev/null", "chr", mode=0o666, dev=(1, 3)),
    E("run/", "dir"),
    E("run/initctl", "fifo", mode=0o600),
    E("readonly/", "dir", mode=0o555),
    E("readonly/file", data=b"ro\n", mode=0o444),
    E("readonly/secret", data=b"nobody may read me\n", mode=0o000),
]
TOP = [
    E("etc/", "dir"),
    E("etc/.wh.hostname"),  # deletes a lower file
    E("opt/data/early", data=b"same layer, before the marker\n"),
    E("opt/data/.wh..wh..opq"),  # lower a, sub/ are hidden
    E("opt/data/late", data=b"same layer, after the marker\n"),
    E(".wh.var"),  # deletes a lower directory tree
    E("lib/added.so", data=b"through the lib symlink\n"),  # lands in usr/lib
    E("etc/passwd", data=b"root:x:0:0::/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n"),
    E(".wh..wh.plnk/", "dir"),  # AUFS bookkeeping: ignored
]
FORMATS = ["oci", "oci-gzip", "docker"]


def two_layer_archive(kind: str, tmp_path: Path) -> Path:
    return make_archive(kind, tmp_path / f"image-{kind}.tar", [layer_tar(BASE), layer_tar(TOP)])


# ---------------------------------------------------------------------------
# Unpacking


@pytest.mark.parametrize("kind", FORMATS)
def test_layers_and_whiteouts_on_the_host_tree(kind: str, tmp_path: Path) -> None:
    archive = two_layer_archive(kind, tmp_path)
    dest = tmp_path / "root"
    config = unpack_oci(archive, dest)

    assert config == ImageConfig(
        env=tuple(CONFIG["Env"]),
        cmd=tuple(CONFIG["Cmd"]),
        entrypoint=("/entry",),
        working_dir="/srv",
        user="1000:1000",
    )
    assert config.env_map["GREETING"] == "hello"
    assert config.argv == ("/entry", "/bin/sh", "-c", "echo hi")

    assert not (dest / "etc" / "hostname").exists()
    assert (dest / "etc" / "passwd").read_text().endswith("user:x:1000:1000::/home/user:/bin/sh\n")
    assert sorted(os.listdir(dest / "opt" / "data")) == ["early", "late"]
    assert not (dest / "var").exists()
    assert not (dest / ".wh..wh.plnk").exists()
    assert not any(
        name.startswith(".wh.") for _, dirs, files in os.walk(dest) for name in dirs + files
    )

    assert os.readlink(dest / "lib") == "usr/lib"
    assert (dest / "usr" / "lib" / "added.so").read_text() == "through the lib symlink\n"
    assert os.readlink(dest / "etc" / "localtime") == "/usr/share/zoneinfo/UTC"
    assert os.stat(dest / "bin" / "sh").st_ino == os.stat(dest / "bin" / "sh-hardlink").st_ino
    assert stat.S_IMODE(os.stat(dest / "bin" / "sh").st_mode) == 0o755
    # Host copies stay readable/removable by us; the exact modes go into the image.
    assert stat.S_IMODE(os.stat(dest / "readonly").st_mode) == 0o755
    assert (dest / "dev" / "null").stat().st_size == 0


def test_returned_attrs_hold_what_the_host_tree_cannot(tmp_path: Path) -> None:
    unpacked = unpack_oci_tree(two_layer_archive("oci", tmp_path), tmp_path / "root")
    attrs = unpacked.attrs
    assert unpacked.layers == 2
    assert attrs["/home/user"].uid == 1000 and attrs["/home/user"].mode == 0o700
    assert attrs["/bin/su"].mode == 0o4755
    assert attrs["/readonly"].mode == 0o555
    dev = attrs["/dev/null"].device
    assert dev is not None and (dev.kind, dev.major, dev.minor) == ("c", 1, 3)
    assert attrs["/run/initctl"].device is not None
    assert "/etc/hostname" not in attrs and "/var/log/old.log" not in attrs
    assert attrs["/usr/lib/added.so"].mtime == MTIME


def test_a_whiteout_never_hides_its_own_layer(tmp_path: Path) -> None:
    """Whiteouts only affect lower layers, whatever their position in the tar."""
    lower = layer_tar(
        [
            E("d/", "dir"),
            E("d/old", data=b"old"),
            E("d/keep/", "dir"),
            E("d/keep/lower", data=b"lower"),
        ]
    )
    upper = layer_tar(
        [
            E("d/keep/upper", data=b"upper"),
            E("d/.wh.keep"),  # after an entry of its own layer inside keep/
            E("d/new", data=b"new"),
            E("d/.wh.new"),  # same layer: must not delete d/new
            E("d/.wh.old"),
        ]
    )
    dest = tmp_path / "root"
    unpack_oci(oci_archive(tmp_path / "i.tar", [lower, upper]), dest)
    assert sorted(os.listdir(dest / "d")) == ["keep", "new"]
    assert os.listdir(dest / "d" / "keep") == ["upper"]


def test_entries_replace_each_other_by_type(tmp_path: Path) -> None:
    lower = layer_tar(
        [E("x/", "dir"), E("x/inner", data=b"i"), E("y", data=b"file"), E("z", "sym", link="y")]
    )
    upper = layer_tar(
        [
            E("x", data=b"now a file"),
            E("y/", "dir"),
            E("y/child", data=b"c"),
            E("z", data=b"was a symlink"),
        ]
    )
    dest = tmp_path / "root"
    unpack_oci(oci_archive(tmp_path / "i.tar", [lower, upper]), dest)
    assert (dest / "x").read_bytes() == b"now a file"
    assert (dest / "y" / "child").read_bytes() == b"c"
    assert not (dest / "z").is_symlink() and (dest / "z").read_bytes() == b"was a symlink"


# ---------------------------------------------------------------------------
# Hostile archives


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([E("../escape", data=b"x")], r"path traversal in '\.\./escape'"),
        ([E("a/../../escape", data=b"x")], r"path traversal in 'a/\.\./\.\./escape'"),
        ([E("/etc/abs", data=b"x")], r"absolute path '/etc/abs'"),
        (
            [E("t", data=b"x"), E("h", "hard", link="../../etc/passwd")],
            r"path traversal.*'\.\./\.\./etc/passwd'",
        ),
        ([E("h", "hard", link="/etc/passwd")], r"entry 'h'.*absolute path '/etc/passwd'"),
        (
            [E("up", "sym", link="../.."), E("up/pwned", data=b"x")],
            r"entry 'up/pwned'.*leaves the image root",
        ),
        (
            [E("a/", "dir"), E("a/up", "sym", link="../../outside"), E("a/up/pwned", data=b"x")],
            r"entry 'a/up/pwned'.*leaves the image root",
        ),
        (
            [E("loop", "sym", link="loop"), E("loop/x", data=b"x")],
            r"entry 'loop/x'.*too many levels",
        ),
        ([E("f", data=b"x"), E("f/child", data=b"x")], r"entry 'f/child'.*/f .*not a directory"),
        ([E("etc/.wh..", data=b"")], r"malformed whiteout"),
    ],
)
def test_hostile_entries_are_refused_by_name(
    entries: list[tuple[tarfile.TarInfo, bytes]], message: str, tmp_path: Path
) -> None:
    sentinel_dir = tmp_path / "outside"
    sentinel_dir.mkdir()
    dest = tmp_path / "a" / "b" / "root"
    with pytest.raises(OciFormatError, match=message):
        unpack_oci(oci_archive(tmp_path / "evil.tar", [layer_tar(entries)]), dest)
    assert list(sentinel_dir.iterdir()) == []
    assert not (tmp_path / "escape").exists() and not (tmp_path / "a" / "escape").exists()


def test_absolute_symlinks_resolve_inside_the_root(tmp_path: Path) -> None:
    """``etc -> /real/etc`` then ``etc/x``: written to <root>/real/etc/x, never the host's /real."""
    host_target = tmp_path / "host-etc"
    host_target.mkdir()
    layer = layer_tar(
        [
            E(str(host_target).lstrip("/") + "/", "dir"),
            E("etc", "sym", link=str(host_target)),
            E("etc/x", data=b"inside"),
        ]
    )
    dest = tmp_path / "root"
    unpack_oci(oci_archive(tmp_path / "i.tar", [layer]), dest)
    assert list(host_target.iterdir()) == []
    assert (dest / str(host_target).lstrip("/") / "x").read_bytes() == b"inside"


def test_a_file_over_a_symlink_replaces_the_symlink(tmp_path: Path) -> None:
    """A later regular file at a symlink's path must not write through the symlink."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    lower = layer_tar([E("x", "sym", link=str(victim)), E("rel", "sym", link="../../victim")])
    upper = layer_tar([E("x", data=b"pwned"), E("rel", data=b"pwned too")])
    dest = tmp_path / "root"
    unpack_oci(oci_archive(tmp_path / "i.tar", [lower, upper]), dest)
    assert victim.read_bytes() == b"precious"
    assert (dest / "x").read_bytes() == b"pwned" and not (dest / "x").is_symlink()


def test_corrupt_layer_is_detected_by_digest(tmp_path: Path) -> None:
    good = layer_tar([E("f", data=b"good")])
    bad = layer_tar([E("f", data=b"evil")])
    archive = docker_archive(tmp_path / "i.tar", [good])
    with tarfile.open(archive) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    layer_name = next(n for n in files if n.endswith("layer.tar"))
    files[layer_name] = bad
    write_tar(archive, files)
    with pytest.raises(OciFormatError, match="layer 1/1.*sha256:.*corrupt"):
        unpack_oci(archive, tmp_path / "root")


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"hello.txt": b"hi"}, "not an image archive"),
        ({"manifest.json": b"[]"}, "lists no image"),
        (
            {
                "manifest.json": json.dumps(
                    [
                        {"Config": "a.json", "RepoTags": ["a:1"], "Layers": []},
                        {"Config": "b.json", "RepoTags": ["b:1"], "Layers": []},
                    ]
                ).encode()
            },
            r"holds 2 images \(a:1; b:1\)",
        ),
        (
            {"oci-layout": b"{}", "index.json": b'{"manifests": [{"digest": "md5:00"}]}'},
            "unsupported or malformed digest",
        ),
    ],
)
def test_not_an_image(files: dict[str, bytes], message: str, tmp_path: Path) -> None:
    with pytest.raises(OciFormatError, match=message):
        unpack_oci(write_tar(tmp_path / "x.tar", files), tmp_path / "root")


def test_dest_must_be_empty(tmp_path: Path) -> None:
    dest = tmp_path / "root"
    dest.mkdir()
    (dest / "existing").write_text("x")
    with pytest.raises(GuestBuildError, match="not empty"):
        unpack_oci(two_layer_archive("oci", tmp_path), dest)


def test_an_unpacked_layout_directory_works_too(tmp_path: Path) -> None:
    archive = two_layer_archive("oci", tmp_path)
    layout = tmp_path / "layout"
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(layout, filter="data")
        else:  # pragma: no cover - Python without extraction filters; our own benign archive
            tar.extractall(layout)
    config = unpack_oci(layout, tmp_path / "root")
    assert config.working_dir == "/srv"
    assert sorted(os.listdir(tmp_path / "root" / "opt" / "data")) == ["early", "late"]


# ---------------------------------------------------------------------------
# The ext4 image


def debugfs(image: Path, command: str) -> str:
    tool = rootfs._find_tool("debugfs")
    assert tool
    return subprocess.run(
        [tool, "-R", command, str(image)], capture_output=True, check=True
    ).stdout.decode()


def inode(image: Path, path: str) -> dict[str, str]:
    text = debugfs(image, f'stat "{path}"')
    if "File not found" in text or not text.strip():
        return {}
    out = {"raw": text}
    for key, pattern in {
        "type": r"Type: (\w[\w ]*?)\s+Mode",
        "mode": r"Mode:\s+(\d+)",
        "uid": r"User:\s+(\d+)",
        "gid": r"Group:\s+(\d+)",
        "links": r"Links: (\d+)",
        "device": r"Device major/minor number: (\S+)",
        "fastlink": r'Fast link dest: "(.*)"',
    }.items():
        m = re.search(pattern, text)
        if m:
            out[key] = m.group(1)
    return out


def names(image: Path, path: str) -> list[str]:
    lines = debugfs(image, f'ls -p "{path}"').splitlines()
    return sorted(
        n
        for n in (ln.split("/")[5] for ln in lines if ln.startswith("/"))
        if n not in (".", "..", "lost+found")
    )


def fsck(image: Path) -> None:
    tool = rootfs._find_tool("e2fsck")
    assert tool
    proc = subprocess.run([tool, "-fn", str(image)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_e2fsprogs
@pytest.mark.parametrize("kind", FORMATS)
def test_oci_rootfs_image_is_exact(kind: str, tmp_path: Path) -> None:
    image, config = build_oci_rootfs(two_layer_archive(kind, tmp_path))
    fsck(image)
    assert config.working_dir == "/srv"
    assert names(image, "/") == [
        "bin",
        "dev",
        "etc",
        "home",
        "lib",
        "opt",
        "readonly",
        "run",
        "usr",
    ]
    assert names(image, "/etc") == ["localtime", "passwd"]
    assert names(image, "/opt/data") == ["early", "late"]
    assert names(image, "/usr/lib") == ["added.so", "libc.so"]
    assert inode(image, "/lib")["fastlink"] == "usr/lib"

    home = inode(image, "/home/user")
    assert (home["uid"], home["gid"], int(home["mode"], 8)) == ("1000", "1000", 0o700)
    profile = inode(image, "/home/user/.profile")
    assert (profile["uid"], int(profile["mode"], 8)) == ("1000", 0o600)
    assert int(inode(image, "/bin/su")["mode"], 8) == 0o4755
    assert int(inode(image, "/readonly")["mode"], 8) == 0o555
    assert int(inode(image, "/readonly/file")["mode"], 8) == 0o444
    assert int(inode(image, "/readonly/secret")["mode"], 8) == 0o000
    assert debugfs(image, 'cat "/readonly/secret"') == "nobody may read me\n"
    assert inode(image, "/etc/passwd")["uid"] == "0"
    null = inode(image, "/dev/null")
    assert (null["type"], null["device"], int(null["mode"], 8)) == (
        "character special",
        "01:03",
        0o666,
    )
    assert inode(image, "/run/initctl")["type"] == "FIFO"
    assert inode(image, "/bin/sh")["links"] == "2"
    ls = {
        ln.split("/")[5]: ln.split("/")[1]
        for ln in debugfs(image, "ls -p /bin").splitlines()
        if ln.startswith("/")
    }
    assert ls["sh"] == ls["sh-hardlink"]


@needs_e2fsprogs
def test_oci_rootfs_is_cached_and_reproducible(
    tmp_path: Path, private_cache: Path, mkfs_runs: list[Path]
) -> None:
    archive = two_layer_archive("oci-gzip", tmp_path)
    image, config = build_oci_rootfs(archive)
    again, config2 = build_oci_rootfs(archive, tmp_path / "copy.ext4")
    assert len(mkfs_runs) == 1, "the second build must come from the cache"
    assert config2 == config and again.read_bytes() == image.read_bytes()
    entry = image.parent
    assert sorted(p.name for p in entry.iterdir()) == [
        "config.json",
        "manifest.json",
        "rootfs.ext4",
    ]

    first = image.read_bytes()
    for p in sorted(private_cache.rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    rebuilt, _ = build_oci_rootfs(archive)
    assert len(mkfs_runs) == 2
    assert rebuilt.read_bytes() == first, "same archive, same e2fsprogs: same image bytes"


@needs_e2fsprogs
def test_failed_build_leaves_no_entry(tmp_path: Path, private_cache: Path) -> None:
    archive = oci_archive(tmp_path / "evil.tar", [layer_tar([E("../x", data=b"x")])])
    with pytest.raises(OciFormatError):
        build_oci_rootfs(archive)
    assert [p for p in (private_cache / "rootfs").iterdir() if p.is_dir()] == []


@needs_e2fsprogs
@pytest.mark.parametrize("fmt", ["oci", "docker"])
def test_write_image_archive_round_trip(fmt: str, tmp_path: Path) -> None:
    """Our writer (for tests needing an image without Docker) makes archives we read back exactly."""
    base, top = tmp_path / "base", tmp_path / "top"
    (base / "etc").mkdir(parents=True)
    (base / "etc" / "motd").write_text("hello\n")
    (base / "etc" / "gone").write_text("x\n")
    (base / "bin").mkdir()
    (base / "bin" / "run").write_text("#!/bin/sh\n")
    os.chmod(base / "bin" / "run", 0o750)
    (top / "etc").mkdir(parents=True)
    (top / "etc" / ".wh.gone").write_text("")
    (top / "etc" / "added").write_text("added\n")
    config = ImageConfig(env=("A=1",), cmd=("/bin/run",))
    archive = write_image_archive(
        [base, top], tmp_path / f"img-{fmt}.tar", config=config, fmt=fmt, compress=(fmt == "oci")
    )
    again = write_image_archive(
        [base, top], tmp_path / "again.tar", config=config, fmt=fmt, compress=(fmt == "oci")
    )
    assert archive.read_bytes() == again.read_bytes()
    image, got = build_oci_rootfs(archive)
    assert got == config
    assert names(image, "/etc") == ["added", "motd"]
    assert int(inode(image, "/bin/run")["mode"], 8) == 0o750
    assert inode(image, "/bin/run")["uid"] == "0"


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


@needs_e2fsprogs
@pytest.mark.skipif(os.geteuid() != 0, reason="already covered: these tests run unprivileged")
def test_an_unprivileged_user_gets_the_same_exact_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not root (the normal case): owners, setuid bits, 0555/0000 modes and devices still exact."""
    archive = two_layer_archive("oci", tmp_path)
    as_root, _ = build_oci_rootfs(archive)
    work = Path(tempfile.mkdtemp(prefix="supermachine-nobody-"))
    try:
        os.chown(work, 65534, 65534)
        shared = work / "image.tar"
        shared.write_bytes(archive.read_bytes())
        os.chmod(shared, 0o644)
        monkeypatch.setenv("SUPERMACHINE_CACHE_DIR", str(work / "cache"))

        def build() -> None:
            build_oci_rootfs(shared, work / "out.ext4")

        run_as_nobody(build)
        image = work / "out.ext4"
        fsck(image)
        assert os.stat(image).st_uid == 65534
        assert image.read_bytes() == as_root.read_bytes(), "who builds it does not change the bytes"
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)
