"""Pulling images from registries (the OCI distribution API) into the user cache.

`pull_image` turns an ``oci:`` reference into an OCI image layout directory
(``oci-layout``, ``index.json``, ``blobs/sha256/…``) under
``cache_dir()/oci/``, which `oci.unpack_oci_tree` reads like any other layout.
What is guaranteed:

* **Integrity.** Every byte is checked against a digest before it is kept: the
  manifest fetched by digest (or against the registry's ``Docker-Content-Digest``
  for a tag), the platform manifest an index names, the config and every layer
  (streamed sha256 and size). The server is never trusted; a mismatch is a
  `BlobDigestError` and nothing is cached.
* **Atomic, shared cache.** A pull writes into a temporary directory next to
  the cache entry and renames it into place under a `filelock` lock, so xdist
  workers pull an image once, a reader never sees half an image, and an
  interrupted or failed pull leaves no entry behind. An entry is named by the
  digest the reference resolved to and the platform; a reference by digest is
  served from the cache without touching the network, a tag costs one ``HEAD``.
* **Platform.** Image indexes (OCI) and manifest lists (Docker) are resolved to
  ``linux/amd64`` (the only platform the VMM runs); an image that has no such
  variant is a `PlatformNotFoundError` listing what it has.
* **Auth.** Anonymous access, the ``WWW-Authenticate: Bearer realm=…`` token
  dance (Docker Hub, GHCR, Quay, …) and Basic auth. Credentials come from, in
  order: ``$SUPERMACHINE_REGISTRY_AUTH`` (JSON, see `registry_credentials`),
  then docker's ``config.json`` (``$DOCKER_CONFIG`` or ``~/.docker``):
  ``credHelpers[host]``, ``credsStore`` (both through the
  ``docker-credential-NAME get`` helper protocol), and ``auths[host]``.
  Credentials are sent over HTTPS only, except to registries allowed plain HTTP.
* **Transport.** HTTPS, except for loopback hosts and those listed in
  ``$SUPERMACHINE_INSECURE_REGISTRIES`` (comma separated ``host[:port]``), which
  are spoken to in plain HTTP (local registries); ``insecure=`` overrides both.

Every error is a `RegistryError` naming the reference and what to do.

Why this module is longer than ~600 lines: it is one protocol client, the OCI distribution
API as a pull needs it (credentials, the auth challenge, manifests and indexes, verified
blobs, the cache entry the pull fills); each part is small and they share one reference
and one error vocabulary. The credential lookup would be the first to leave if it grows.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
from filelock import FileLock

from ..cache import cache_dir
from ..errors import SupermachineError
from .reference import (
    DEFAULT_TAG,
    DOCKER_HUB,
    REF_NAME_ANNOTATION,
    ImageReferenceError,
    RegistryReference,
    parse_image_reference,
)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
_DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1"
_IMAGE_MANIFESTS = (OCI_MANIFEST, DOCKER_MANIFEST)
_INDEXES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
_ACCEPT = ", ".join((OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_MANIFEST_LIST))

#: JSON credentials for CI: ``{"HOST[:PORT]": "USER:PASSWORD", ...}`` (see `registry_credentials`).
AUTH_ENV = "SUPERMACHINE_REGISTRY_AUTH"
#: Comma-separated ``host[:port]`` of registries spoken to in plain HTTP (besides loopback).
INSECURE_ENV = "SUPERMACHINE_INSECURE_REGISTRIES"
#: The platform the VMM runs.
DEFAULT_PLATFORM = "linux/amd64"
#: A pulled image: ``cache_dir()/oci/<entry>/{layout/, pull.json}``.
CACHE_KIND = "oci"
LAYOUT_DIR = "layout"
PULL_RECORD = "pull.json"

#: Layers fetched at once (docker pulls 3 at a time too).
PARALLEL_DOWNLOADS = 3
_MAX_MANIFEST = 4 << 20  # what containerd accepts too
_MAX_CONFIG = 64 << 20
_CHUNK = 1 << 20
_DIGEST_RE = re.compile(r"sha256:([0-9a-f]{64})")
_PLATFORM_RE = re.compile(r"[a-z0-9]+/[a-z0-9_]+(?:/[a-z0-9]+)?")
_DOCKER_HUB_SERVER = "https://index.docker.io/v1/"
_CHALLENGE_PARAM = re.compile(r'(\w+)=(?:"([^"]*)"|([^,\s]*))')
_HOW_TO_LOGIN = (
    f"provide credentials with `docker login HOST` (~/.docker/config.json, credential helpers "
    f'included) or, in CI, ${AUTH_ENV}=\'{{"HOST": "USER:PASSWORD"}}\''
)


class RegistryError(SupermachineError):
    """Pulling an image from a registry failed; the message names the reference and the remedy."""


class RegistryUnreachableError(RegistryError):
    """The registry did not answer (DNS, connection, TLS, timeout)."""


class ImageNotFoundError(RegistryError):
    """The registry has no such repository, tag or digest (HTTP 404)."""


class RegistryAuthError(RegistryError):
    """The registry wants credentials we do not have, or refused the ones we sent."""


class BlobDigestError(RegistryError):
    """Bytes the registry sent do not match the digest (or size) they were asked for by."""


class PlatformNotFoundError(RegistryError):
    """The image exists, but not for the platform asked for (linux/amd64)."""


class ManifestError(RegistryError):
    """The registry sent a manifest we cannot use (schema 1, malformed, unknown media type)."""


@dataclass(frozen=True)
class Credentials:
    """A user name and secret for one registry, and where they came from (for messages, never the secret).

    ``username == "<token>"`` means ``password`` is an OAuth2 refresh (identity) token.
    """

    username: str
    password: str
    source: str

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, source={self.source!r})"


@dataclass(frozen=True)
class PullProgress:
    """How far a pull is: blob bytes and blobs (config + layers) done out of their totals."""

    bytes_done: int
    bytes_total: int
    layers_done: int
    layers_total: int


@dataclass(frozen=True)
class PulledImage:
    """An image in the cache: its OCI layout directory and the digests that name it."""

    #: The reference pulled, pinned to the digest it resolved to.
    reference: RegistryReference
    #: OCI image layout directory (readable by `oci.unpack_oci_tree`).
    layout: Path
    #: What the reference resolved to (an index or a manifest).
    digest: str
    #: The linux/amd64 image manifest and its config.
    manifest_digest: str
    config_digest: str
    platform: str
    #: Bytes of config + layers as stored (compressed).
    size: int
    layers: int
    #: True when nothing was downloaded.
    from_cache: bool = False


ProgressCallback = Callable[[PullProgress], None]


# ---------------------------------------------------------------------------
# Credentials


def _registry_key(server: str) -> str:
    """A config key (``https://index.docker.io/v1/``, ``ghcr.io``, ``http://h:5000/``) as a registry."""
    host = re.sub(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", "", server.strip()).split("/", 1)[0]
    return DOCKER_HUB if host in ("index.docker.io", "registry-1.docker.io", DOCKER_HUB) else host


def _decode_userpass(value: str, what: str) -> tuple[str, str]:
    user, colon, password = value.partition(":")
    if not colon or not user:
        raise RegistryAuthError(f"{what} is not in the form USER:PASSWORD")
    return user, password


def _credentials_from_entry(entry: Any, source: str) -> Credentials | None:
    """Credentials from one ``auths`` / env entry: ``"USER:PASSWORD"``, ``{"auth": b64}``, …"""
    if isinstance(entry, str):
        return Credentials(*_decode_userpass(entry, source), source)
    if not isinstance(entry, Mapping):
        raise RegistryAuthError(f'{source} is neither "USER:PASSWORD" nor an object')
    if entry.get("identitytoken"):
        return Credentials("<token>", str(entry["identitytoken"]), source)
    if entry.get("auth"):
        try:
            decoded = base64.b64decode(str(entry["auth"]), validate=True).decode()
        except (ValueError, UnicodeDecodeError) as exc:
            raise RegistryAuthError(f'{source}: "auth" is not base64 of USER:PASSWORD') from exc
        return Credentials(*_decode_userpass(decoded, source), source)
    if entry.get("username"):
        return Credentials(str(entry["username"]), str(entry.get("password", "")), source)
    return None  # an empty placeholder, as docker writes next to a credsStore


def _lookup(entries: Any, registry: str) -> tuple[str, Any] | None:
    if not isinstance(entries, Mapping):
        return None
    for key, value in entries.items():
        if _registry_key(str(key)) == registry:
            return str(key), value
    return None


def docker_config_path() -> Path:
    """``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json`` (as docker reads it)."""
    base = os.environ.get("DOCKER_CONFIG") or os.path.join(os.path.expanduser("~"), ".docker")
    return Path(base) / "config.json"


def _from_helper(helper: str, registry: str, source: str) -> Credentials | None:
    """``docker-credential-HELPER get`` with the server URL on stdin (the docker helper protocol)."""
    program = f"docker-credential-{helper}"
    server = _DOCKER_HUB_SERVER if registry == DOCKER_HUB else registry
    try:
        done = subprocess.run(
            [program, "get"], input=server.encode(), capture_output=True, timeout=60, check=False
        )
    except FileNotFoundError as exc:
        raise RegistryAuthError(
            f"{source} names the credential helper {helper!r}, but {program} is not on PATH: "
            f"install it or remove it from {docker_config_path()}"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise RegistryAuthError(f"{program} get did not answer within 60 s") from exc
    out = done.stdout.decode(errors="replace").strip()
    if done.returncode != 0:
        if "credentials not found" in (out + done.stderr.decode(errors="replace")).lower():
            return None
        raise RegistryAuthError(
            f"{program} get failed for {server} (exit {done.returncode}): "
            f"{(out or done.stderr.decode(errors='replace')).strip()[:500]}"
        )
    try:
        answer = json.loads(out)
        username, secret = str(answer["Username"]), str(answer["Secret"])
    except (ValueError, KeyError, TypeError) as exc:
        raise RegistryAuthError(
            f"{program} get answered {out[:200]!r}, not the JSON "
            '{"Username": ..., "Secret": ...} of the helper protocol'
        ) from exc
    return Credentials(username, secret, f"{source} ({program})")


def registry_credentials(registry: str) -> Credentials | None:
    """The credentials for ``registry`` (``host[:port]``, ``docker.io`` for Docker Hub), or None.

    Looked up in this order, the first that has an entry for the registry wins:

    1. ``$SUPERMACHINE_REGISTRY_AUTH``: a JSON object from registry to
       ``"USER:PASSWORD"`` (or ``{"username": …, "password": …}`` or
       ``{"auth": base64("USER:PASSWORD")}``); a docker ``{"auths": {…}}`` object
       is accepted too, so a CI secret holding a docker config works as it is.
    2. docker's ``config.json``: ``credHelpers[registry]``, then ``credsStore``,
       each asked with ``docker-credential-NAME get``; then ``auths[registry]``.
       Keys may be spelled as docker writes them (``https://index.docker.io/v1/``).
    """
    raw = os.environ.get(AUTH_ENV, "").strip()
    if raw:
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise RegistryAuthError(
                f'${AUTH_ENV} is not JSON ({exc}); expected {{"HOST[:PORT]": "USER:PASSWORD"}}'
            ) from exc
        if isinstance(doc, Mapping) and isinstance(doc.get("auths"), Mapping):
            doc = doc["auths"]
        if not isinstance(doc, Mapping):
            raise RegistryAuthError(
                f'${AUTH_ENV} must be a JSON object {{"HOST[:PORT]": "USER:PASSWORD"}}'
            )
        found = _lookup(doc, registry)
        if found is not None:
            creds = _credentials_from_entry(found[1], f"${AUTH_ENV}[{found[0]!r}]")
            if creds is not None:
                return creds
    path = docker_config_path()
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise RegistryAuthError(f"cannot read docker credentials from {path}: {exc}") from exc
    if not isinstance(config, Mapping):
        raise RegistryAuthError(f"{path} is not a JSON object")
    helper = _lookup(config.get("credHelpers"), registry)
    if helper is not None:
        creds = _from_helper(str(helper[1]), registry, f"{path} credHelpers[{helper[0]!r}]")
        if creds is not None:
            return creds
    elif config.get("credsStore"):
        creds = _from_helper(str(config["credsStore"]), registry, f"{path} credsStore")
        if creds is not None:
            return creds
    found = _lookup(config.get("auths"), registry)
    if found is not None:
        return _credentials_from_entry(found[1], f"{path} auths[{found[0]!r}]")
    return None


# ---------------------------------------------------------------------------
# Transport


def _is_loopback(hostname: str) -> bool:
    if hostname == "localhost" or hostname.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


def allows_plain_http(reference: RegistryReference, insecure: bool | None = None) -> bool:
    """Whether the registry is spoken to in plain HTTP: `insecure` if given, else loopback or listed."""
    if insecure is not None:
        return insecure
    listed = {h.strip() for h in re.split(r"[,\s]+", os.environ.get(INSECURE_ENV, "")) if h.strip()}
    return (
        _is_loopback(reference.hostname)
        or reference.registry in listed
        or reference.hostname in listed
    )


def _parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    params = {
        m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
        for m in _CHALLENGE_PARAM.finditer(rest)
    }
    return scheme.lower(), params


def _error_codes(response: httpx.Response) -> str:
    """The registry's error codes (``MANIFEST_UNKNOWN``, ``NAME_UNKNOWN``, …) from a read body."""
    try:
        errors = response.json().get("errors") or []
        return ", ".join(str(e.get("code")) for e in errors if isinstance(e, Mapping))
    except (ValueError, AttributeError, httpx.ResponseNotRead):
        return ""


class RegistryClient:
    """One repository of one registry over HTTP(S), authenticated on demand.

    Requests go out anonymously (or with a token already obtained); a ``401``
    with a ``WWW-Authenticate`` challenge is answered once (a bearer token from
    the realm, with the credentials if there are any, or Basic auth) and the
    request retried. Credentials are looked up (``lookup(registry)``, by default
    `registry_credentials`) only when a challenge asks for them, so a pull that
    needs none never runs a credential helper. Redirects (blob downloads from a CDN) are followed without
    the ``Authorization`` header when they leave the registry's origin.
    """

    def __init__(
        self,
        reference: RegistryReference,
        *,
        lookup: Callable[[str], Credentials | None] = registry_credentials,
        insecure: bool | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.reference = reference
        self._lookup = lookup
        self._credentials: Credentials | None = None
        self._looked_up = False
        self.plain_http = allows_plain_http(reference, insecure)
        scheme = "http" if self.plain_http else "https"
        self.base = f"{scheme}://{reference.api_host}/v2/{reference.repository}"
        self._authorization: str | None = None
        self._http = httpx.Client(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 30.0)),
            follow_redirects=True,
            headers={"User-Agent": "pytest-supermachine"},
            trust_env=not _is_loopback(reference.hostname),
        )  # no proxy for a loopback registry

    @property
    def credentials(self) -> Credentials | None:
        """The registry's credentials (looked up on first use), or None for anonymous access."""
        if not self._looked_up:
            self._credentials = self._lookup(self.reference.registry)
            self._looked_up = True
        return self._credentials

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests ------------------------------------------------------------

    def _unreachable(self, url: str, exc: Exception) -> RegistryUnreachableError:
        hint = (
            ""
            if self.plain_http
            else f"; a registry that speaks plain HTTP must be listed in ${INSECURE_ENV}"
        )
        return RegistryUnreachableError(
            f"{self.reference}: talking to {url} failed: {type(exc).__name__}: {exc} (check the host "
            f"name, the network and proxy settings{hint})"
        )

    def _send(self, method: str, url: str, headers: Mapping[str, str]) -> httpx.Response:
        sent = dict(headers)
        if self._authorization:
            sent["Authorization"] = self._authorization
        try:
            return self._http.send(self._http.build_request(method, url, headers=sent), stream=True)
        except httpx.RequestError as exc:
            raise self._unreachable(url, exc) from exc

    @contextmanager
    def request(
        self, method: str, path: str, headers: Mapping[str, str], what: str
    ) -> Iterator[httpx.Response]:
        """A successful (2xx) streamed response to ``METHOD base/path``; errors as `RegistryError`."""
        url = f"{self.base}/{path}"
        response = self._send(method, url, headers)
        try:
            if response.status_code == 401:
                challenge = response.headers.get("WWW-Authenticate", "")
                response.close()
                self._authorization = self._answer(challenge)
                response = self._send(method, url, headers)
            if response.status_code >= 300:
                response.read()
                raise self._status_error(response, what)
            yield response
        except httpx.RequestError as exc:  # transport, decoding, too many redirects
            raise self._unreachable(url, exc) from exc
        finally:
            response.close()

    def _status_error(self, response: httpx.Response, what: str) -> RegistryError:
        status, codes = response.status_code, _error_codes(response)
        detail = f"HTTP {status}" + (f" {codes}" if codes else "")
        ref = self.reference
        if status == 401:
            if self._credentials is None:
                return RegistryAuthError(
                    f"{ref}: {ref.registry} requires authentication to pull {ref.repository} "
                    f"({detail}; or the repository does not exist): {_HOW_TO_LOGIN}"
                )
            return RegistryAuthError(
                f"{ref}: {ref.registry} rejected the credentials of {self._credentials.username!r} "
                f"from {self._credentials.source} ({detail}): check them, or log in again"
            )
        if status == 403:
            return RegistryAuthError(
                f"{ref}: {ref.registry} denies pulling {ref.repository} "
                f"({detail}): ask for access, or check the credentials"
            )
        if status == 404:
            if "NAME_UNKNOWN" in codes:
                why = f"has no repository {ref.repository!r}"
            elif what == "manifest":
                why = f"has no {ref.target!r} in {ref.repository!r}"
            else:
                why = f"has no {what} in {ref.repository!r}"
            return ImageNotFoundError(
                f"{ref}: {ref.registry} {why} ({detail}): check the name, tag or digest"
            )
        if status == 429:
            return RegistryError(
                f"{ref}: {ref.registry} is rate limiting pulls ({detail}): "
                f"wait, or pull with credentials: {_HOW_TO_LOGIN}"
            )
        return RegistryError(f"{ref}: {ref.registry} answered {detail} for the {what}")

    # -- auth ----------------------------------------------------------------

    def _answer(self, challenge: str) -> str:
        """The ``Authorization`` header answering a ``WWW-Authenticate`` challenge."""
        ref, creds = self.reference, self.credentials
        scheme, params = _parse_challenge(challenge)
        if scheme == "basic":
            if creds is None or creds.username == "<token>":
                raise RegistryAuthError(
                    f"{ref}: {ref.registry} requires authentication (Basic): {_HOW_TO_LOGIN}"
                )
            self._check_secure(self.base, creds)
            token = base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()
            return f"Basic {token}"
        if scheme != "bearer" or not params.get("realm"):
            raise RegistryAuthError(
                f"{ref}: {ref.registry} asks for an authentication scheme we do not speak: "
                f"{challenge[:200]!r}"
            )
        realm = params["realm"]
        query = {"scope": params.get("scope") or f"repository:{ref.repository}:pull"}
        if params.get("service"):
            query["service"] = params["service"]
        try:
            if creds is not None:
                self._check_secure(realm, creds)
            if creds is not None and creds.username == "<token>":
                response = self._http.post(
                    realm,
                    data={
                        **query,
                        "grant_type": "refresh_token",
                        "refresh_token": creds.password,
                        "client_id": "pytest-supermachine",
                    },
                )
            else:
                response = self._http.get(
                    realm,
                    params=query,
                    auth=(creds.username, creds.password) if creds is not None else None,
                )
        except httpx.RequestError as exc:
            raise self._unreachable(realm, exc) from exc
        if response.status_code in (401, 403):
            if creds is None:
                raise RegistryAuthError(
                    f"{ref}: the token service {realm} refused anonymous "
                    f"access (HTTP {response.status_code}): {_HOW_TO_LOGIN}"
                )
            raise RegistryAuthError(
                f"{ref}: the token service {realm} rejected the credentials of "
                f"{creds.username!r} from {creds.source} (HTTP {response.status_code})"
            )
        try:
            response.raise_for_status()
            doc = response.json()
            token = doc.get("token") or doc.get("access_token")
        except (httpx.HTTPStatusError, ValueError, AttributeError) as exc:
            raise RegistryAuthError(
                f"{ref}: the token service {realm} did not give a token: "
                f"HTTP {response.status_code} {response.text[:200]!r}"
            ) from exc
        if not token:
            raise RegistryAuthError(f"{ref}: the token service {realm} answered without a token")
        return f"Bearer {token}"

    def _check_secure(self, url: str, creds: Credentials) -> None:
        parsed = httpx.URL(url)
        if parsed.scheme != "https" and not (self.plain_http or _is_loopback(parsed.host)):
            raise RegistryAuthError(
                f"{self.reference}: refusing to send the credentials from {creds.source} over "
                f"plain HTTP to {url}"
            )

    # -- content -------------------------------------------------------------

    def manifest_digest(self, target: str) -> str | None:
        """The digest the registry gives for ``target`` by ``HEAD`` (None if it gives none)."""
        with self.request("HEAD", f"manifests/{target}", {"Accept": _ACCEPT}, "manifest") as r:
            digest = r.headers.get("Docker-Content-Digest", "")
        return digest if _DIGEST_RE.fullmatch(digest) else None

    def manifest(self, target: str) -> tuple[bytes, str, str]:
        """``(bytes, media type, digest)`` of the manifest ``target`` (a tag or a digest), verified.

        By digest, the bytes must hash to it; by tag, to the registry's
        ``Docker-Content-Digest`` if it sends one.
        """
        with self.request("GET", f"manifests/{target}", {"Accept": _ACCEPT}, "manifest") as r:
            body = _read_limited(r, _MAX_MANIFEST, f"{self.reference}: the manifest")
            content_type = r.headers.get("Content-Type", "").split(";")[0].strip()
            claimed = r.headers.get("Docker-Content-Digest", "")
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        expected = target if _DIGEST_RE.fullmatch(target) else claimed
        if expected and expected != digest:
            raise BlobDigestError(
                f"{self.reference}: the registry sent a manifest with {digest}, not {expected}: "
                "refused (a corrupt registry or something in between is changing content)"
            )
        return body, _media_type(body, content_type, self.reference), digest

    def download_blob(
        self, descriptor: Mapping[str, Any], out: IO[bytes], advance: Callable[[int], None]
    ) -> None:
        """Stream the blob into ``out``, checking its size and sha256 against ``descriptor``."""
        digest, size = str(descriptor.get("digest", "")), descriptor.get("size")
        if not _DIGEST_RE.fullmatch(digest):
            raise ManifestError(
                f"{self.reference}: unsupported or malformed blob digest "
                f"{digest!r} (only sha256 is supported)"
            )
        h, got = hashlib.sha256(), 0
        headers = {"Accept-Encoding": "identity"}
        with self.request("GET", f"blobs/{digest}", headers, f"blob {digest}") as r:
            # The raw stream unless the server encoded it anyway: re-chunking costs a third.
            encoded = r.headers.get("Content-Encoding", "identity").lower() != "identity"
            for chunk in r.iter_bytes() if encoded else r.iter_raw():
                got += len(chunk)
                if isinstance(size, int) and got > size:
                    raise BlobDigestError(
                        f"{self.reference}: blob {digest} is longer than the {size} bytes the "
                        "manifest says: refused, nothing cached"
                    )
                h.update(chunk)
                out.write(chunk)
                advance(len(chunk))
        actual = "sha256:" + h.hexdigest()
        if actual != digest or (isinstance(size, int) and got != size):
            raise BlobDigestError(
                f"{self.reference}: blob {digest} arrived as {got} bytes with {actual}: its bytes "
                "do not match its digest, so it was refused and nothing was cached (a corrupt "
                "registry or proxy; pull again, or report it to the registry's owner)"
            )


def _read_limited(response: httpx.Response, limit: int, what: str) -> bytes:
    body = bytearray()
    for chunk in response.iter_bytes(_CHUNK):
        body += chunk
        if len(body) > limit:
            raise ManifestError(f"{what} is larger than {limit} bytes: refused")
    return bytes(body)


def _media_type(body: bytes, content_type: str, reference: RegistryReference) -> str:
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise ManifestError(f"{reference}: the manifest is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ManifestError(f"{reference}: the manifest is not a JSON object")
    media = str(doc.get("mediaType") or content_type)
    if doc.get("schemaVersion") == 1 or media.startswith(_DOCKER_SCHEMA1):
        raise ManifestError(
            f"{reference}: the registry only has a Docker schema 1 manifest "
            "(deprecated): push the image again with a current docker or skopeo"
        )
    if media not in _IMAGE_MANIFESTS + _INDEXES:
        media = OCI_INDEX if "manifests" in doc else OCI_MANIFEST if "layers" in doc else media
    if media not in _IMAGE_MANIFESTS + _INDEXES:
        raise ManifestError(f"{reference}: {media!r} is not an image manifest or index")
    return media


# ---------------------------------------------------------------------------
# Pulling


def _platform_name(platform: Mapping[str, Any]) -> str:
    parts = [str(platform.get("os", "?")), str(platform.get("architecture", "?"))]
    if platform.get("variant"):
        parts.append(str(platform["variant"]))
    return "/".join(parts)


def _pick_platform(
    index: Mapping[str, Any], platform: str, reference: RegistryReference
) -> Mapping[str, Any]:
    """The descriptor of ``platform`` (``os/arch[/variant]``) in an index; the variant-less one first."""
    want_os, want_arch, *want_variant = platform.split("/")
    manifests = [m for m in index.get("manifests") or [] if isinstance(m, Mapping)]
    matches = [
        m
        for m in manifests
        if isinstance(m.get("platform"), Mapping)
        and m["platform"].get("os") == want_os
        and m["platform"].get("architecture") == want_arch
        and (not want_variant or m["platform"].get("variant") == want_variant[0])
    ]
    if not matches:
        have = sorted(
            {
                _platform_name(m["platform"])
                for m in manifests
                if isinstance(m.get("platform"), Mapping)
            }
        )
        raise PlatformNotFoundError(
            f"{reference}: the image has no {platform} variant (it has: "
            f"{', '.join(have) or 'no platform-tagged manifests'}); the VMs run {platform}, so "
            "pick an image built for it"
        )
    matches.sort(key=lambda m: bool(m["platform"].get("variant")))
    return matches[0]


def _entry_name(digest: str, platform: str) -> str:
    return f"{digest.split(':', 1)[1]}-{platform.replace('/', '-')}"


def _load(entry: Path, from_cache: bool) -> PulledImage:
    record = json.loads((entry / PULL_RECORD).read_text())
    reference = parse_image_reference(record["reference"])
    assert isinstance(reference, RegistryReference)
    return PulledImage(
        reference=reference,
        layout=entry / LAYOUT_DIR,
        digest=record["digest"],
        manifest_digest=record["manifest_digest"],
        config_digest=record["config_digest"],
        platform=record["platform"],
        size=record["size"],
        layers=record["layers"],
        from_cache=from_cache,
    )


def _cache_hit(entry: Path) -> PulledImage | None:
    if not (entry / PULL_RECORD).is_file():
        return None
    os.utime(entry / PULL_RECORD)  # its mtime is the entry's last use
    return _load(entry, from_cache=True)


def pulled_images(cache_root: Path | None = None) -> list[PulledImage]:
    """Every image in the pull cache (for listing and pruning; last use: mtime of its ``pull.json``)."""
    root = Path(cache_root) if cache_root is not None else cache_dir() / CACHE_KIND
    if not root.is_dir():
        return []
    return [
        _load(entry, from_cache=True)
        for entry in sorted(root.iterdir())
        if not entry.name.startswith(".") and (entry / PULL_RECORD).is_file()
    ]


def pull_image(
    reference: RegistryReference | str,
    *,
    platform: str = DEFAULT_PLATFORM,
    cache_root: Path | None = None,
    insecure: bool | None = None,
    progress: ProgressCallback | None = None,
    timeout: float = 60.0,
) -> PulledImage:
    """The image ``reference`` (``oci:…`` or a `RegistryReference`) as a cached OCI layout.

    See the module docstring for what is guaranteed. ``cache_root`` defaults to
    ``cache_dir()/oci``; ``insecure`` forces plain HTTP on or off (default: only
    for loopback and ``$SUPERMACHINE_INSECURE_REGISTRIES``); ``progress`` is called
    as blob bytes arrive; ``timeout`` bounds each network wait, in seconds.
    """
    if not _PLATFORM_RE.fullmatch(platform):
        raise ValueError(
            f"platform must be OS/ARCH[/VARIANT] like {DEFAULT_PLATFORM!r}, not {platform!r}"
        )
    if isinstance(reference, str):
        parsed = parse_image_reference(reference)
        if not isinstance(parsed, RegistryReference):
            raise ImageReferenceError(
                f"{reference!r} is a local image; only oci: references are pulled from a registry"
            )
        reference = parsed
    root = Path(cache_root) if cache_root is not None else cache_dir() / CACHE_KIND
    if reference.digest is not None:
        hit = _cache_hit(root / _entry_name(reference.digest, platform))
        if hit is not None:
            return hit
    with RegistryClient(reference, insecure=insecure, timeout=timeout) as client:
        digest = reference.digest or client.manifest_digest(reference.target)
        if digest is not None:
            hit = _cache_hit(root / _entry_name(digest, platform))
            if hit is not None:
                return hit
        body, media, digest = client.manifest(digest or reference.target)
        root.mkdir(parents=True, exist_ok=True)
        entry = root / _entry_name(digest, platform)
        with FileLock(str(root / f"{entry.name}.lock")):
            hit = _cache_hit(entry)  # another process pulled it while we waited
            if hit is not None:
                return hit
            for stale in root.glob(f".pull-{entry.name}-*"):  # left by a killed pull: the lock
                shutil.rmtree(stale, ignore_errors=True)  # is ours, so its owner is gone
            tmp = Path(tempfile.mkdtemp(prefix=f".pull-{entry.name}-", dir=root))
            try:
                _pull_into(client, tmp, body, media, digest, platform, progress)
                os.replace(tmp, entry)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return _load(entry, from_cache=False)


def _pull_into(
    client: RegistryClient,
    tmp: Path,
    body: bytes,
    media: str,
    digest: str,
    platform: str,
    progress: ProgressCallback | None,
) -> None:
    """Fill ``tmp`` with ``layout/`` and ``pull.json`` for the manifest ``body`` (verified)."""
    reference = client.reference.with_digest(digest)
    manifest_body, manifest_media, manifest_digest = body, media, digest
    if media in _INDEXES:
        desc = _pick_platform(json.loads(body), platform, reference)
        if not _DIGEST_RE.fullmatch(str(desc.get("digest"))):  # fetched by it, verified against it
            raise ManifestError(
                f"{reference}: the index names the {platform} image by a "
                f"malformed digest {desc.get('digest')!r}"
            )
        manifest_body, manifest_media, manifest_digest = client.manifest(str(desc["digest"]))
        if manifest_media not in _IMAGE_MANIFESTS:
            raise ManifestError(
                f"{reference}: the {platform} entry of the index is a "
                f"{manifest_media}, not an image manifest"
            )
    manifest = json.loads(manifest_body)
    config_desc = manifest.get("config")
    layers = manifest.get("layers")
    if (
        not isinstance(config_desc, Mapping)
        or not isinstance(layers, list)
        or not all(isinstance(layer, Mapping) for layer in layers)
    ):
        raise ManifestError(f"{reference}: the image manifest has no config or no layer list")
    blobs = [config_desc, *layers]
    for blob in blobs:  # before any of them names a file
        if not _DIGEST_RE.fullmatch(str(blob.get("digest"))):
            raise ManifestError(
                f"{reference}: unsupported or malformed blob digest "
                f"{blob.get('digest')!r} (only sha256 is supported)"
            )
        if not isinstance(blob.get("size"), int) or blob["size"] < 0:
            raise ManifestError(
                f"{reference}: the manifest gives blob {blob['digest']} no valid size"
            )
    if config_desc["size"] > _MAX_CONFIG:
        raise ManifestError(
            f"{reference}: the image config claims {config_desc['size']} bytes: refused"
        )
    layout = tmp / LAYOUT_DIR
    blob_dir = layout / "blobs" / "sha256"
    blob_dir.mkdir(parents=True)
    total = sum(int(b["size"]) for b in blobs)
    _Download(client, blob_dir, total, len(blobs), progress).run(blobs, platform, reference)
    (blob_dir / manifest_digest.split(":", 1)[1]).write_bytes(manifest_body)
    platform_os, platform_arch, *variant = platform.split("/")
    descriptor: dict[str, Any] = {
        "mediaType": manifest_media,
        "digest": manifest_digest,
        "size": len(manifest_body),
        "platform": {
            "os": platform_os,
            "architecture": platform_arch,
            **({"variant": variant[0]} if variant else {}),
        },
        "annotations": {REF_NAME_ANNOTATION: client.reference.tag or DEFAULT_TAG},
    }
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_text(
        json.dumps(
            {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [descriptor]}, indent=1
        )
    )
    (tmp / PULL_RECORD).write_text(
        json.dumps(
            {
                "reference": str(reference),
                "digest": digest,
                "manifest_digest": manifest_digest,
                "config_digest": str(config_desc["digest"]),
                "platform": platform,
                "size": total,
                "layers": len(layers),
            },
            indent=1,
        )
        + "\n"
    )


class _Cancelled(Exception):
    """Raised in a download thread once another download of the same pull has failed."""


class _Download:
    """The blobs of one image into ``blob_dir``: the config first, then the layers in parallel.

    The config comes first so that an image for another platform is refused
    before its layers are fetched. Layers are fetched by `PARALLEL_DOWNLOADS`
    threads (one HTTP client, thread-safe); the first failure cancels the rest
    (at their next chunk) and is raised. ``progress`` is called under a lock,
    one call at a time, from whichever thread made progress.
    """

    def __init__(
        self,
        client: RegistryClient,
        blob_dir: Path,
        total: int,
        count: int,
        progress: ProgressCallback | None,
    ) -> None:
        self.client, self.blob_dir, self.progress = client, blob_dir, progress
        self.total, self.count = total, count
        self.done = self.blobs_done = 0
        self.lock = threading.Lock()
        self.cancelled = threading.Event()

    def advance(self, nbytes: int, blobs: int = 0) -> None:
        if self.cancelled.is_set():
            raise _Cancelled
        with self.lock:
            self.done += nbytes
            self.blobs_done += blobs
            if self.progress is not None:
                self.progress(PullProgress(self.done, self.total, self.blobs_done, self.count))

    def fetch(self, descriptor: Mapping[str, Any]) -> Path:
        path = self.blob_dir / str(descriptor["digest"]).split(":", 1)[1]
        with open(path, "xb") as out:
            self.client.download_blob(descriptor, out, self.advance)
        self.advance(0, blobs=1)
        return path

    def run(
        self, blobs: list[Mapping[str, Any]], platform: str, reference: RegistryReference
    ) -> None:
        self.advance(0)
        _check_config_platform(self.fetch(blobs[0]), platform, reference)
        pending: dict[str, Mapping[str, Any]] = {}
        for layer in blobs[1:]:
            if layer["digest"] in pending or layer["digest"] == blobs[0]["digest"]:
                self.advance(int(layer["size"]), blobs=1)  # listed twice: fetched once
            else:
                pending[str(layer["digest"])] = layer
        if not pending:
            return
        with ThreadPoolExecutor(
            min(PARALLEL_DOWNLOADS, len(pending)), thread_name_prefix="supermachine-pull"
        ) as pool:
            futures = [pool.submit(self.fetch, layer) for layer in pending.values()]
            try:
                for future in as_completed(futures):
                    future.result()
            except BaseException:
                self.cancelled.set()
                pool.shutdown(wait=True, cancel_futures=True)
                raise


def _check_config_platform(config_path: Path, platform: str, reference: RegistryReference) -> None:
    """Refuse a single-platform image whose config names another platform (before its layers)."""
    try:
        config = json.loads(config_path.read_bytes())
    except ValueError as exc:
        raise ManifestError(f"{reference}: the image config is not JSON: {exc}") from exc
    if not isinstance(config, Mapping):
        raise ManifestError(f"{reference}: the image config is not a JSON object")
    want_os, want_arch, *_ = platform.split("/")
    have_os, have_arch = config.get("os"), config.get("architecture")
    if (have_os and have_os != want_os) or (have_arch and have_arch != want_arch):
        raise PlatformNotFoundError(
            f"{reference}: the image is built for {have_os}/{have_arch}, not {platform}; the VMs "
            f"run {platform}, so pick an image (or tag) built for it"
        )
