"""OCI / Docker image tarballs unpacked layer by layer into an ext4 root filesystem.

Accepted inputs (detected by content, not by name):

* ``docker save`` output: ``manifest.json`` naming the config and the layer tars;
* an OCI image layout (``oci-layout``, ``index.json``, ``blobs/sha256/...``), e.g.
  from ``skopeo copy ... oci-archive:x.tar`` or ``docker buildx --output type=oci``;
  Docker 25+ writes both, and the OCI view is used then;

either as a tar file (optionally gzip/bzip2/xz compressed) or as an unpacked
directory. Layers may be uncompressed, gzip, bzip2 or xz tars (zstd needs the
``zstandard`` Python package).

Layers are applied in order with the OCI whiteout rules, safely, by `LayerTree`
(layer_tree.py: the archive is hostile input; nothing outside ``dest`` is ever
written). Integrity: JSON blobs and OCI layer blobs are checked against their
sha256 digests, and every uncompressed layer against the config's
``rootfs.diff_ids``.

Running as non-root is the normal case: the host tree is owned by the caller,
with owner read/write (and search on directories) added and setuid/setgid
bits left off; device nodes and FIFOs are empty placeholder files. The real
owners, modes, mtimes and device numbers from the layer tars are returned as
`EntryAttrs` and written into the image by `build_ext4_from_dir`'s debugfs pass,
so the ext4 image is exact. Not carried over: xattrs (file capabilities), and
hardlinked device nodes become separate nodes.

Why this module is longer than ~600 lines: both archive formats, their documents
and digests, the decompression chain and the cached rootfs build share one notion
of an image (`ImageConfig`, the layer list); the layer rules already live apart.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import tarfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pytest_supermachine.cache import build_once, content_key
from pytest_supermachine.errors import GuestBuildError

from . import rootfs
from .layer_tree import LayerTree, OciFormatError
from .rootfs import (
    CACHE_KIND,
    IMAGE_NAME,
    EntryAttrs,
    built_with,
    copy_sparse,
    e2fsprogs_version,
    make_ext4,
    source_date_epoch,
)

#: Bumped whenever this module changes how the same tarball becomes a tree.
RECIPE_VERSION = "2"  # 2: config.json keeps ExposedPorts and Labels
#: The image config next to the image in a cache entry.
CONFIG_NAME = "config.json"

_DIGEST = re.compile(r"^sha256:([0-9a-f]{64})$")
_INDEX_TYPES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}
_MAX_JSON = 64 << 20


@dataclass(frozen=True)
class ImageConfig:
    """What the image says about how to run it (the ``config`` object of its config JSON)."""

    env: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""
    exposed_ports: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_config_json(cls, doc: Mapping[str, Any]) -> ImageConfig:
        """From an image config document (``{"config": {"Env": [...], ...}, "rootfs": ...}``)."""
        cfg = doc.get("config") or {}

        def strings(name: str) -> tuple[str, ...]:
            value = cfg.get(name) or ()
            if isinstance(value, str):  # tolerated: some hand-written configs use a string
                return (value,)
            return tuple(str(v) for v in value)

        return cls(
            env=strings("Env"),
            cmd=strings("Cmd"),
            entrypoint=strings("Entrypoint"),
            working_dir=str(cfg.get("WorkingDir") or ""),
            user=str(cfg.get("User") or ""),
            exposed_ports=tuple(sorted(str(p) for p in cfg.get("ExposedPorts") or {})),
            labels={str(k): str(v) for k, v in (cfg.get("Labels") or {}).items()},
        )

    @property
    def env_map(self) -> dict[str, str]:
        """``Env`` as a dict (later duplicates win, as in Docker)."""
        return dict(item.partition("=")[::2] for item in self.env)

    @property
    def argv(self) -> tuple[str, ...]:
        """What ``docker run IMAGE`` executes: Entrypoint followed by Cmd."""
        return self.entrypoint + self.cmd

    def to_json(self) -> dict[str, Any]:
        return {
            "Env": list(self.env),
            "Cmd": list(self.cmd),
            "Entrypoint": list(self.entrypoint),
            "WorkingDir": self.working_dir,
            "User": self.user,
            "ExposedPorts": {port: {} for port in self.exposed_ports},
            "Labels": dict(self.labels),
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> ImageConfig:
        return cls.from_config_json({"config": doc})


@dataclass
class UnpackedImage:
    """Result of `unpack_oci_tree`: the config and what the host tree cannot represent."""

    config: ImageConfig
    #: Image path ("/usr/bin/sudo") -> owner, exact mode, mtime, device; for `make_ext4`.
    attrs: dict[str, EntryAttrs] = field(default_factory=dict)
    layers: int = 0


# ---------------------------------------------------------------------------
# Reading the outer archive (a tar file or a directory)


class _Source:
    """Named files of the image archive; names are relative, ``/``-separated."""

    def has(self, name: str) -> bool:
        raise NotImplementedError

    def open(self, name: str) -> IO[bytes]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def read_json(self, name: str, digest: str | None = None) -> Any:
        with self.open(name) as f:
            data = f.read(_MAX_JSON + 1)
        if len(data) > _MAX_JSON:
            raise OciFormatError(f"{name} is larger than {_MAX_JSON} bytes; not an image document")
        if digest is not None:
            _check_digest(name, hashlib.sha256(data).hexdigest(), digest)
        try:
            return json.loads(data)
        except ValueError as exc:
            raise OciFormatError(f"{name} is not valid JSON: {exc}") from exc


def _norm(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/")


class _TarSource(_Source):
    def __init__(self, path: Path) -> None:
        try:
            self.tar = tarfile.open(path, "r:*")  # noqa: SIM115 - kept open until close()
            members = self.tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise OciFormatError(f"{path} is not a readable tar archive: {exc}") from exc
        self.members = {_norm(m.name): m for m in members}

    def has(self, name: str) -> bool:
        return _norm(name) in self.members

    def open(self, name: str) -> IO[bytes]:
        member = self.members.get(_norm(name))
        if member is None:
            raise OciFormatError(f"the archive has no {name!r}")
        try:
            f = self.tar.extractfile(member)
        except (tarfile.TarError, KeyError) as exc:
            raise OciFormatError(f"cannot read {name!r} from the archive: {exc}") from exc
        if f is None:
            raise OciFormatError(f"{name!r} in the archive is not a file")
        return f

    def close(self) -> None:
        self.tar.close()


class _DirSource(_Source):
    def __init__(self, path: Path) -> None:
        self.root = path.resolve()

    def _path(self, name: str) -> Path:
        p = (self.root / _norm(name)).resolve()
        if p != self.root and self.root not in p.parents:
            raise OciFormatError(f"{name!r} points outside the image directory {self.root}")
        return p

    def has(self, name: str) -> bool:
        return self._path(name).is_file()

    def open(self, name: str) -> IO[bytes]:
        try:
            return open(self._path(name), "rb")
        except OSError as exc:
            raise OciFormatError(f"cannot read {name!r} from {self.root}: {exc}") from exc


def _open_source(path: Path) -> _Source:
    if path.is_dir():
        return _DirSource(path)
    if not path.is_file():
        raise OciFormatError(f"image archive {path} does not exist")
    return _TarSource(path)


def _check_digest(what: str, actual_hex: str, expected: str) -> None:
    m = _DIGEST.match(expected)
    if m is None:
        raise OciFormatError(f"{what}: unsupported digest {expected!r} (only sha256 is supported)")
    if m.group(1) != actual_hex:
        raise OciFormatError(
            f"{what} has sha256:{actual_hex} but the image says {expected}: the archive is corrupt"
        )


def _blob_name(digest: str) -> str:
    m = _DIGEST.match(str(digest))
    if m is None:
        raise OciFormatError(
            f"unsupported or malformed digest {digest!r} (only sha256 is supported)"
        )
    return f"blobs/sha256/{m.group(1)}"


@dataclass
class _Layer:
    name: str  # file name inside the archive, for messages
    digest: str | None  # of the blob as stored (OCI), checked while reading
    diff_id: str | None  # of the uncompressed tar (config rootfs.diff_ids)


def _read_oci_layout(src: _Source, tag: str | None) -> tuple[dict[str, Any], list[_Layer]]:
    index = src.read_json("index.json")
    if tag is not None:
        index = _tagged(index, tag)
    desc = _pick_manifest(src, index, "index.json")
    manifest = src.read_json(_blob_name(desc.get("digest", "")), desc.get("digest"))
    config_desc = manifest.get("config") or {}
    config = src.read_json(_blob_name(config_desc.get("digest", "")), config_desc.get("digest"))
    layers = [
        _Layer(_blob_name(d.get("digest", "")), d.get("digest"), None)
        for d in manifest.get("layers") or []
    ]
    return config, layers


def _tagged(index: Mapping[str, Any], tag: str) -> dict[str, Any]:
    """The index reduced to the manifests annotated ``org.opencontainers.image.ref.name: tag``."""
    manifests = [
        m
        for m in index.get("manifests") or []
        if (m.get("annotations") or {}).get("org.opencontainers.image.ref.name") == tag
    ]
    if not manifests:
        raise OciFormatError(f"index.json names no image tagged {tag!r}")
    return {**index, "manifests": manifests}


def _pick_manifest(
    src: _Source, index: Mapping[str, Any], where: str, depth: int = 0
) -> dict[str, Any]:
    """The one image manifest an index names: the only one, else the linux/amd64 one."""
    manifests = list(index.get("manifests") or [])
    if not manifests:
        raise OciFormatError(f"{where} lists no manifests")
    if len(manifests) > 1:
        amd64 = [
            m
            for m in manifests
            if (m.get("platform") or {}).get("os") == "linux"
            and (m.get("platform") or {}).get("architecture") == "amd64"
        ]
        if len(amd64) != 1:
            names = [
                (m.get("annotations") or {}).get("org.opencontainers.image.ref.name")
                or m.get("digest")
                for m in manifests
            ]
            raise OciFormatError(
                f"{where} lists {len(manifests)} images ({', '.join(map(str, names))}) and not "
                "exactly one for linux/amd64; save a single image (docker save IMAGE:TAG)"
            )
        manifests = amd64
    desc = manifests[0]
    if desc.get("mediaType") in _INDEX_TYPES:
        if depth > 4:
            raise OciFormatError(f"{where}: image indexes nested too deeply")
        nested = src.read_json(_blob_name(desc.get("digest", "")), desc.get("digest"))
        return _pick_manifest(src, nested, desc.get("digest", where), depth + 1)
    return desc


def _read_docker_save(src: _Source) -> tuple[dict[str, Any], list[_Layer]]:
    manifest = src.read_json("manifest.json")
    if not isinstance(manifest, list) or not manifest:
        raise OciFormatError("manifest.json of the docker-save archive lists no image")
    if len(manifest) > 1:
        tags = [", ".join(m.get("RepoTags") or ["<untagged>"]) for m in manifest]
        raise OciFormatError(
            f"the docker-save archive holds {len(manifest)} images ({'; '.join(tags)}); "
            "save one image per tarball"
        )
    entry = manifest[0]
    config_name = str(entry.get("Config", ""))
    m = re.search(r"([0-9a-f]{64})(\.json)?$", config_name)
    config = src.read_json(config_name, f"sha256:{m.group(1)}" if m else None)
    layers = [_Layer(str(name), None, None) for name in entry.get("Layers") or []]
    return config, layers


def _read_image(src: _Source, tag: str | None = None) -> tuple[ImageConfig, list[_Layer]]:
    if src.has("index.json") and src.has("oci-layout"):
        config, layers = _read_oci_layout(src, tag)
    elif src.has("manifest.json"):
        config, layers = _read_docker_save(src)
    else:
        raise OciFormatError(
            "not an image archive: expected manifest.json (docker save) or "
            "oci-layout + index.json (OCI image layout)"
        )
    diff_ids = list((config.get("rootfs") or {}).get("diff_ids") or [])
    if diff_ids and len(diff_ids) != len(layers):
        raise OciFormatError(
            f"the image config lists {len(diff_ids)} layer diff_ids but the manifest "
            f"{len(layers)} layers"
        )
    if diff_ids:
        for layer, diff_id in zip(layers, diff_ids, strict=True):
            layer.diff_id = diff_id
    return ImageConfig.from_config_json(config), layers


# ---------------------------------------------------------------------------
# Layer streams


class _HashingReader(io.RawIOBase):
    """Reads through, hashing what passes, so a digest is checked without a second pass."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.hash = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self.raw.read(len(b))
        n = len(data)
        b[:n] = data
        self.hash.update(data)
        return n

    def drain(self) -> str:
        """Read (and hash) whatever the consumer left unread; the digest of everything."""
        while chunk := self.raw.read(1 << 20):
            self.hash.update(chunk)
        return self.hash.hexdigest()


class _Peekable(io.RawIOBase):
    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.head = raw.read(6)

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self.head:
            n = min(len(b), len(self.head))
            b[:n] = self.head[:n]
            self.head = self.head[n:]
            return n
        data = self.raw.read(len(b))
        b[: len(data)] = data
        return len(data)


def _decompressed(stream: _Peekable, layer: _Layer) -> IO[bytes]:
    head = stream.head
    buffered = io.BufferedReader(stream, 1 << 20)
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=buffered, mode="rb")  # type: ignore[return-value]
    if head.startswith(b"BZh"):
        return bz2.BZ2File(buffered)  # type: ignore[return-value]
    if head.startswith(b"\xfd7zXZ"):
        return lzma.LZMAFile(buffered)  # type: ignore[return-value]
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        try:  # Python 3.14+
            from compression import zstd  # type: ignore[import-not-found]

            return zstd.ZstdFile(buffered)  # type: ignore[no-any-return]
        except ImportError:
            pass
        try:
            import zstandard  # type: ignore[import-not-found]
        except ImportError as exc:
            raise OciFormatError(
                f"layer {layer.name} is zstd-compressed; install the `zstandard` Python package "
                "or re-save the image with gzip layers"
            ) from exc
        return zstandard.ZstdDecompressor().stream_reader(  # type: ignore[no-any-return]
            buffered, read_across_frames=True
        )
    return buffered  # type: ignore[return-value]


def _apply_layers(src: _Source, layers: list[_Layer], tree: LayerTree) -> None:
    for n, layer in enumerate(layers, 1):
        what = f"layer {n}/{len(layers)} ({layer.name})"
        with src.open(layer.name) as raw:
            blob = _HashingReader(raw)
            peek = _Peekable(io.BufferedReader(blob, 1 << 20))  # type: ignore[arg-type]
            plain = _decompressed(peek, layer)
            tar_bytes = _HashingReader(plain)
            try:
                tree.apply_layer(io.BufferedReader(tar_bytes, 1 << 20), what)  # type: ignore[arg-type]
                tar_digest = tar_bytes.drain()
                blob_digest = blob.drain()
            except (EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile) as exc:
                raise OciFormatError(f"{what} is corrupt: {exc}") from exc
        if layer.digest is not None:
            _check_digest(what, blob_digest, layer.digest)
        if layer.diff_id is not None:
            _check_digest(f"{what} uncompressed", tar_digest, layer.diff_id)


def unpack_oci_tree(tarball: Path, dest: Path, *, tag: str | None = None) -> UnpackedImage:
    """Unpack the image in ``tarball`` into the empty (or new) directory ``dest``.

    ``tag`` picks the image of an OCI layout annotated with that
    ``org.opencontainers.image.ref.name`` (what ``oci-layout:DIR:TAG`` names).

    Returns the image config and the attributes the host tree cannot hold
    (owners, exact modes, device nodes; see the module docstring). Raises
    `OciFormatError` (a `GuestBuildError`) naming the layer and entry for a
    malformed archive, a digest mismatch, or an entry that tries to escape;
    ``dest`` then holds a partial tree for the caller to remove (nothing outside
    ``dest`` is ever touched).
    """
    tarball, dest = Path(tarball), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise GuestBuildError(f"cannot unpack an image into {dest}: the directory is not empty")
    src = _open_source(tarball)
    try:
        config, layers = _read_image(src, tag)
        tree = LayerTree(dest)
        _apply_layers(src, layers, tree)
    finally:
        src.close()
    return UnpackedImage(config=config, attrs=tree.final_attrs(), layers=len(layers))


def unpack_oci(tarball: Path, dest: Path) -> ImageConfig:
    """Unpack the image in ``tarball`` into ``dest`` and return its config.

    See `unpack_oci_tree` for guarantees; owners and device nodes from the
    layers are not applied to ``dest`` (use `build_oci_rootfs` for an exact image).
    """
    return unpack_oci_tree(tarball, dest).config


# ---------------------------------------------------------------------------
# Cache


_digest_memo: dict[tuple[int, int, int, int], str] = {}


def archive_digest(path: Path) -> str:
    """sha256 of the archive's bytes (of every file, for an unpacked layout), memoised per process."""
    path = Path(path)
    st = path.stat()
    memo_key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if not path.is_dir() and memo_key in _digest_memo:
        return _digest_memo[memo_key]
    h = hashlib.sha256()
    files = (
        [path]
        if not path.is_dir()
        else sorted(
            (p for p in path.rglob("*") if p.is_file()),
            key=lambda p: p.relative_to(path).as_posix(),
        )
    )
    for p in files:
        if path.is_dir():
            h.update(p.relative_to(path).as_posix().encode("utf-8", "surrogateescape") + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    digest = h.hexdigest()
    if not path.is_dir():
        _digest_memo[memo_key] = digest
    return digest


def oci_cache_key(
    tarball: Path,
    *,
    size: int | None = None,
    label: str = "rootfs",
    tag: str | None = None,
    content_digest: str | None = None,
) -> str:
    """The cache key of `build_oci_rootfs`: the image's identity + everything that changes the image.

    The identity is ``content_digest`` when the caller has a digest that pins the
    image's content (a pulled image's manifest digest: it names the config and
    every layer by digest), else the archive's bytes.
    """
    return content_key(
        "rootfs-oci",
        RECIPE_VERSION,
        rootfs.RECIPE_VERSION,
        e2fsprogs_version(),
        str(source_date_epoch()),
        label,
        str(size),
        str(tag),
        content_digest or archive_digest(tarball),
    )


def build_oci_rootfs(
    tarball: Path,
    out: Path | None = None,
    *,
    size: int | None = None,
    label: str = "rootfs",
    tag: str | None = None,
    content_digest: str | None = None,
) -> tuple[Path, ImageConfig]:
    """An ext4 root filesystem of the image in ``tarball``, and the image's config.

    Built once per archive content (`oci_cache_key`) under
    ``cache_dir()/rootfs/<key>/`` (``rootfs.ext4`` + ``config.json``), by
    unpacking (`unpack_oci_tree`) and `make_ext4` with the layers' owners,
    modes and device nodes; the unpacked tree is deleted afterwards. Returns the
    shared cached image (attach it read-only) when ``out`` is None, else a
    private sparse copy at ``out``. ``tag`` selects an image of a layout
    (`unpack_oci_tree`); ``content_digest``, when given, keys the cache instead
    of re-hashing the archive (`oci_cache_key`).
    """
    tarball = Path(tarball)
    key = oci_cache_key(tarball, size=size, label=label, tag=tag, content_digest=content_digest)

    def fill(entry: Path) -> Mapping[str, object]:
        tree = entry / "tree"
        try:
            unpacked = unpack_oci_tree(tarball, tree, tag=tag)
            make_ext4(
                tree, entry / IMAGE_NAME, seed=key, size=size, label=label, attrs=unpacked.attrs
            )
        finally:
            shutil.rmtree(tree, ignore_errors=True)  # dirs are owner-writable by construction
        (entry / CONFIG_NAME).write_text(json.dumps(unpacked.config.to_json(), indent=2) + "\n")
        return {
            **built_with(),
            "kind": "oci",
            "source": str(tarball.resolve()),
            "content_digest": content_digest,  # a pulled image's manifest digest (for prune)
            "label": label,
            "layers": unpacked.layers,
            "size": (entry / IMAGE_NAME).stat().st_size,
        }

    entry = build_once(CACHE_KIND, key, fill)
    config = ImageConfig.from_json(json.loads((entry / CONFIG_NAME).read_text()))
    image = entry / IMAGE_NAME
    return (image if out is None else copy_sparse(image, Path(out))), config


# ---------------------------------------------------------------------------
# Writing archives (for tests that need an image without Docker)


def _layer_tar(layer_dir: Path) -> bytes:
    """One layer tar of ``layer_dir``: sorted, owned by 0:0, mtimes kept (so deterministic)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:

        def add(directory: Path, prefix: str) -> None:
            for child in sorted(directory.iterdir(), key=lambda p: os.fsencode(p.name)):
                name = f"{prefix}{child.name}"
                info = tar.gettarinfo(str(child), arcname=name)
                if info is None:  # a socket: not representable in a tar
                    continue
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                if info.isreg():
                    with open(child, "rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)
                if info.isdir():
                    add(child, name + "/")

        add(Path(layer_dir), "")
    return buf.getvalue()


def write_image_archive(
    layers: Sequence[Path],
    out: Path,
    *,
    config: ImageConfig | None = None,
    fmt: str = "oci",
    compress: bool = False,
) -> Path:
    """Write an image archive (``fmt`` "oci": OCI layout; "docker": docker-save) of directories.

    Each directory in ``layers`` (bottom first) becomes one layer, entries owned
    by 0:0 with their modes and mtimes; a file named ``.wh.NAME`` or
    ``.wh..wh..opq`` in a layer directory is a whiteout, as in any image.
    ``compress`` gzips the layers (OCI only). Deterministic: the same
    directories give the same archive bytes. Meant for tests that need an
    image without Docker; ``out`` appears atomically.
    """
    if fmt not in ("oci", "docker"):
        raise ValueError(f"fmt must be 'oci' or 'docker', not {fmt!r}")
    config = config or ImageConfig()
    files: dict[str, bytes] = {}
    diff_ids: list[str] = []
    layer_descs: list[dict[str, Any]] = []
    layer_names: list[str] = []
    for layer_dir in layers:
        tar_bytes = _layer_tar(Path(layer_dir))
        diff_id = "sha256:" + hashlib.sha256(tar_bytes).hexdigest()
        diff_ids.append(diff_id)
        if fmt == "docker":
            name = f"{diff_id[7:]}/layer.tar"
            files[name] = tar_bytes
            layer_names.append(name)
            continue
        blob = gzip.compress(tar_bytes, compresslevel=6, mtime=0) if compress else tar_bytes
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        files[_blob_name(digest)] = blob
        media = "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if compress else "")
        layer_descs.append({"mediaType": media, "digest": digest, "size": len(blob)})
    config_doc = {
        "architecture": "amd64",
        "os": "linux",
        "config": config.to_json(),
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    config_bytes = json.dumps(config_doc, sort_keys=True).encode()
    config_digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
    if fmt == "docker":
        files[f"{config_digest[7:]}.json"] = config_bytes
        files["manifest.json"] = json.dumps(
            [
                {
                    "Config": f"{config_digest[7:]}.json",
                    "RepoTags": ["supermachine/test:latest"],
                    "Layers": layer_names,
                }
            ]
        ).encode()
    else:
        files[_blob_name(config_digest)] = config_bytes
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": config_digest,
                    "size": len(config_bytes),
                },
                "layers": layer_descs,
            },
            sort_keys=True,
        ).encode()
        manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
        files[_blob_name(manifest_digest)] = manifest
        files["oci-layout"] = b'{"imageLayoutVersion": "1.0.0"}'
        files["index.json"] = json.dumps(
            {
                "schemaVersion": 2,
                "manifests": [
                    {
                        "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "digest": manifest_digest,
                        "size": len(manifest),
                    }
                ],
            }
        ).encode()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(files[name]))
    os.replace(tmp, out)
    return out
