"""Image references: the strings that name an OCI/Docker image wherever an image name goes.

Four forms, told apart by their prefix (`parse_image_reference`):

* ``oci:REF`` — an image in a registry, ``REF`` as docker spells it:
  ``[host[:port]/]repo[:tag][@sha256:HEX]``. Docker Hub short names are
  normalised as docker does (``python:3.12`` is ``docker.io/library/python:3.12``,
  ``me/app`` is ``docker.io/me/app:latest``); the first path component is a host
  only when it has a ``.`` or a ``:`` or is ``localhost``.
* ``oci-archive:PATH`` — an OCI image layout packed as a tar (``skopeo copy ... oci-archive:``).
* ``docker-archive:PATH`` — ``docker save`` output.
* ``oci-layout:DIR[:TAG]`` — an OCI image layout directory; ``TAG`` selects the
  manifest whose ``org.opencontainers.image.ref.name`` annotation is ``TAG``. As
  in skopeo, the first ``:`` ends the directory, so ``DIR`` cannot contain one.

Parsing is syntax only and never touches the filesystem or the network; the
local forms have `check()` to verify that what they name exists before anything
is built from it. Every error is an `ImageReferenceError` that quotes the
reference and says what a valid one looks like.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import SupermachineError

#: The registry docker means by a name without a host, and the host its API is served from.
DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
DEFAULT_TAG = "latest"
#: The annotation an OCI layout's index.json names its images by.
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"

PREFIXES = ("oci:", "oci-archive:", "docker-archive:", "oci-layout:")

# The grammar of github.com/distribution/reference (docker's own parser).
_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?"
_PATH_RE = re.compile(rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*")
_DOMAIN_RE = re.compile(_DOMAIN)
_TAG_RE = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
_ANY_DIGEST_RE = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]{32,}")
_MAX_NAME = 255
_MAX_LAYOUT_TAG = 1024


class ImageReferenceError(SupermachineError, ValueError):
    """An image reference is malformed, or a local one names something that is not there."""


@dataclass(frozen=True)
class RegistryReference:
    """``oci:REF``: an image in a registry, normalised (`registry` and `repository` as docker has them).

    ``digest`` (when given) is what a pull fetches; ``tag`` is then only kept for
    display. Without either, the tag is ``latest``.
    """

    registry: str  # "docker.io", "ghcr.io", "127.0.0.1:5000"
    repository: str  # "library/python"
    tag: str | None = None
    digest: str | None = None

    @property
    def target(self) -> str:
        """What the registry's manifest endpoint is asked for: the digest, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    @property
    def api_host(self) -> str:
        """``host[:port]`` of the registry's HTTP API (Docker Hub serves it from its own host)."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def hostname(self) -> str:
        """The registry host without port or IPv6 brackets (for loopback checks)."""
        host = self.registry
        if host.startswith("["):
            return host[1 : host.index("]")]
        return host.rsplit(":", 1)[0] if ":" in host else host

    @property
    def name(self) -> str:
        """``registry/repository[:tag][@digest]``, fully qualified."""
        text = f"{self.registry}/{self.repository}"
        if self.tag is not None or self.digest is None:
            text += f":{self.tag or DEFAULT_TAG}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text

    def with_digest(self, digest: str) -> RegistryReference:
        """The same image pinned to ``digest`` (tag kept for display)."""
        return RegistryReference(self.registry, self.repository, self.tag, digest)

    def __str__(self) -> str:
        return f"oci:{self.name}"


@dataclass(frozen=True)
class ArchiveReference:
    """``oci-archive:PATH`` or ``docker-archive:PATH``: an image tarball on disk."""

    kind: Literal["oci-archive", "docker-archive"]
    path: Path

    def check(self) -> ArchiveReference:
        """Itself, if ``path`` is a readable file; else `ImageReferenceError` saying so."""
        if not self.path.exists():
            raise ImageReferenceError(f"{self}: {self.path} does not exist")
        if not self.path.is_file():
            raise ImageReferenceError(
                f"{self}: {self.path} is not a file (an unpacked OCI layout directory is "
                f"oci-layout:{self.path})"
            )
        return self

    def __str__(self) -> str:
        return f"{self.kind}:{self.path}"


@dataclass(frozen=True)
class LayoutReference:
    """``oci-layout:DIR[:TAG]``: an OCI image layout directory, optionally one tagged image of it."""

    path: Path
    tag: str | None = None

    def check(self) -> LayoutReference:
        """Itself, if ``path`` is an OCI layout (holding ``tag``, if given); else `ImageReferenceError`."""
        if not self.path.is_dir():
            raise ImageReferenceError(f"{self}: {self.path} is not a directory")
        for name in ("oci-layout", "index.json"):
            if not (self.path / name).is_file():
                raise ImageReferenceError(
                    f"{self}: {self.path} has no {name}, so it is not an OCI image layout "
                    "(make one with: skopeo copy docker://IMAGE oci:DIR:TAG)"
                )
        if self.tag is not None and self.tag not in self.tags():
            known = ", ".join(sorted(self.tags())) or "none"
            raise ImageReferenceError(
                f"{self}: the layout has no image tagged {self.tag!r} (tags: {known})"
            )
        return self

    def tags(self) -> set[str]:
        """The ``org.opencontainers.image.ref.name`` annotations of the layout's index.json."""
        try:
            index = json.loads((self.path / "index.json").read_text())
        except (OSError, ValueError) as exc:
            raise ImageReferenceError(f"{self}: cannot read its index.json: {exc}") from exc
        manifests = index.get("manifests") if isinstance(index, dict) else None
        return {
            str(m["annotations"][REF_NAME_ANNOTATION])
            for m in manifests or []
            if isinstance(m, dict)
            and isinstance(m.get("annotations"), dict)
            and REF_NAME_ANNOTATION in m["annotations"]
        }

    def __str__(self) -> str:
        return f"oci-layout:{self.path}" + (f":{self.tag}" if self.tag is not None else "")


ImageReference = RegistryReference | ArchiveReference | LayoutReference


def _path(text: str) -> Path:
    """``~`` expanded where it names a home (`Path.expanduser` raises for an unknown user)."""
    return Path(os.path.expanduser(text))


def is_image_reference(text: str) -> bool:
    """Whether ``text`` uses one of the reference prefixes (else it is a registered image name)."""
    return text.startswith(PREFIXES)


def parse_image_reference(text: str) -> ImageReference:
    """The typed reference ``text`` spells (see the module docstring); `ImageReferenceError` if none."""
    if not isinstance(text, str):
        raise ImageReferenceError(f"an image reference is a string, not {type(text).__name__}")
    kind, sep, rest = text.partition(":")
    if not sep or f"{kind}:" not in PREFIXES:
        raise ImageReferenceError(
            f"{text!r} is not an image reference: expected one of "
            "oci:[HOST[:PORT]/]REPO[:TAG|@sha256:HEX], oci-archive:PATH, docker-archive:PATH, "
            "oci-layout:DIR[:TAG]"
        )
    if "\0" in rest:
        raise ImageReferenceError(f"{text!r}: a reference cannot contain a NUL character")
    if kind == "oci":
        return parse_registry_reference(rest)
    if not rest:
        raise ImageReferenceError(f"{text!r}: the {kind}: reference names no path")
    if kind in ("oci-archive", "docker-archive"):
        return ArchiveReference(kind, _path(rest))  # type: ignore[arg-type]
    directory, colon, tag = rest.partition(":")
    if not directory:
        raise ImageReferenceError(f"{text!r}: the oci-layout: reference names no directory")
    if colon:
        if (
            not tag
            or len(tag) > _MAX_LAYOUT_TAG
            or not tag.isprintable()
            or any(c.isspace() for c in tag)
        ):
            raise ImageReferenceError(
                f"{text!r}: {tag!r} is not a valid layout tag (printable, no spaces, at most "
                f"{_MAX_LAYOUT_TAG} characters; the directory cannot contain ':')"
            )
        return LayoutReference(_path(directory), tag)
    return LayoutReference(_path(directory))


def parse_registry_reference(ref: str) -> RegistryReference:
    """``[host[:port]/]repo[:tag][@digest]`` (the part after ``oci:``), normalised as docker does."""

    def bad(why: str) -> ImageReferenceError:
        return ImageReferenceError(
            f"'oci:{ref}' is not a valid image reference: {why} "
            "(expected oci:[HOST[:PORT]/]REPO[:TAG][@sha256:HEX], e.g. oci:python:3.12 or "
            "oci:ghcr.io/owner/app@sha256:...)"
        )

    if not ref:
        raise bad("it is empty")
    name, at, digest = ref.partition("@")
    if at and not _DIGEST_RE.fullmatch(digest):
        if _ANY_DIGEST_RE.fullmatch(digest):
            raise bad(f"only sha256 digests are supported, not {digest.split(':')[0]!r}")
        raise bad(f"{digest!r} is not a digest (sha256: and 64 lowercase hex digits)")
    tag: str | None = None
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
        if not _TAG_RE.fullmatch(tag):
            raise bad(
                f"{tag!r} is not a valid tag (letters, digits, '_', '.', '-'; at most 128, "
                "not starting with '.' or '-')"
            )
    first, slash_sep, remainder = name.partition("/")
    if slash_sep and ("." in first or ":" in first or first == "localhost"):
        registry, path = first, remainder
        if not _DOMAIN_RE.fullmatch(registry):
            raise bad(f"{registry!r} is not a valid registry host[:port]")
        port = registry.rsplit("]", 1)[-1].partition(":")[2]
        if port and not 0 < int(port) < 65536:
            raise bad(f"port {port} is out of range")
    else:
        registry, path = DOCKER_HUB, name
    if registry in ("index.docker.io", DOCKER_HUB_API):
        registry = DOCKER_HUB
    if registry == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if not path:
        raise bad("it names no repository")
    if path.lower() != path and _PATH_RE.fullmatch(path.lower()):
        raise bad("repository names must be lowercase")
    if not _PATH_RE.fullmatch(path):
        raise bad(
            f"{path!r} is not a valid repository name (lowercase letters, digits and "
            "separators '.', '_', '__', '-', components joined by '/')"
        )
    if len(registry) + 1 + len(path) > _MAX_NAME:
        raise bad(f"the name is longer than {_MAX_NAME} characters")
    return RegistryReference(registry, path, tag, digest or None)
