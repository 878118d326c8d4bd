"""A real OCI registry on loopback for the pull tests, and small images pushed into it.

`local_registry` is Debian's ``docker-registry`` (the CNCF distribution registry) serving
plain HTTP on 127.0.0.1 and a free port, its storage in a temporary directory;
`auth_registry` is a second one that wants htpasswd (bcrypt) Basic auth. Both live
for the session and are stopped at its end. Images are built as OCI layouts with
`oci.write_image_archive` and pushed with Debian's ``skopeo``, so what the puller
reads was written by independent, real tools.

A missing tool skips the tests that need it with the reason (and how to install
it), or fails them under ``SUPERMACHINE_REQUIRE_KVM=1`` (CI, where every tier must run).
Use by importing the fixtures into a test module.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import tarfile
import threading
import time
from base64 import b64encode, urlsafe_b64encode
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from pytest_supermachine.images.oci import ImageConfig, write_image_archive

_START_TIMEOUT = 30.0
_PUSH_TIMEOUT = 120.0


def require_tool(program: str, package: str) -> str:
    """The path of ``program``; else skip (or fail under SUPERMACHINE_REQUIRE_KVM=1) saying how to get it."""
    path = shutil.which(program)
    if path is None:
        why = (
            f"{program} is not installed (apt-get install {package}; "
            "scripts/bootstrap.sh installs it)"
        )
        if os.environ.get("SUPERMACHINE_REQUIRE_KVM") == "1":
            pytest.fail(f"SUPERMACHINE_REQUIRE_KVM=1 but {why}")
        pytest.skip(why)
    return path


@dataclass
class Image:
    """An image pushed to a registry: its reference and the digests a pull must reproduce."""

    ref: str  # "oci:127.0.0.1:PORT/repo:tag"
    repository: str
    tag: str
    manifest_digest: str
    #: Blobs the image manifest names (config first, then layers).
    blob_digests: list[str]


@dataclass
class LocalRegistry:
    """A running docker-registry: where it listens, where it stores, how to push to it."""

    host: str  # "127.0.0.1:PORT"
    storage: Path
    log: Path
    process: subprocess.Popen[bytes]
    credentials: tuple[str, str] | None = None

    def blob_file(self, digest: str) -> Path:
        """Where the registry's filesystem driver keeps the bytes of ``digest``."""
        hexa = digest.split(":", 1)[1]
        return self.storage / "docker/registry/v2/blobs/sha256" / hexa[:2] / hexa / "data"

    def push(
        self, layout: Path, repository: str, tag: str, *, docker_format: bool = False
    ) -> Image:
        """Copy the OCI layout (all its platforms, if an index) to ``repository:tag`` with skopeo.

        ``docker_format`` makes skopeo convert to Docker schema 2 media types (the
        returned digests are then those of the OCI layout, not of what was pushed).
        """
        skopeo = require_tool("skopeo", "skopeo")
        dest = f"docker://{self.host}/{repository}:{tag}"
        command = [skopeo, "--insecure-policy", "copy", "--all", "--dest-tls-verify=false"]
        if self.credentials is not None:
            command += ["--dest-creds", ":".join(self.credentials)]
        if docker_format:
            command += ["--format", "v2s2"]
        done = subprocess.run(
            [*command, f"oci:{layout}", dest],
            capture_output=True,
            timeout=_PUSH_TIMEOUT,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"skopeo copy to {dest} failed: {done.stderr.decode()}")
        index = json.loads((layout / "index.json").read_text())
        top = index["manifests"][0]["digest"]
        return Image(
            ref=f"oci:{self.host}/{repository}:{tag}",
            repository=repository,
            tag=tag,
            manifest_digest=top,
            blob_digests=_image_blobs(layout, top),
        )

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _image_blobs(layout: Path, digest: str) -> list[str]:
    doc = json.loads((layout / "blobs/sha256" / digest.split(":", 1)[1]).read_bytes())
    if "manifests" in doc:  # an index: the blobs of its linux/amd64 image, if it has one
        amd64 = [m for m in doc["manifests"] if m["platform"]["architecture"] == "amd64"]
        return _image_blobs(layout, amd64[0]["digest"]) if amd64 else []
    return [doc["config"]["digest"], *(layer["digest"] for layer in doc["layers"])]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_registry(
    workdir: Path, *, credentials: tuple[str, str] | None = None, auth: str = ""
) -> LocalRegistry:
    """A docker-registry on 127.0.0.1 answering ``/v2/``.

    With ``credentials`` (and no ``auth``) it wants them by htpasswd Basic auth;
    ``auth`` is the registry's own ``auth:`` config section (e.g. token auth).
    """
    binary = require_tool("docker-registry", "docker-registry")
    workdir.mkdir(parents=True, exist_ok=True)
    if credentials is not None and not auth:
        htpasswd = require_tool("htpasswd", "apache2-utils")
        entry = subprocess.run(
            [htpasswd, "-Bbn", *credentials], capture_output=True, check=True, timeout=30
        ).stdout
        (workdir / "htpasswd").write_bytes(entry)
        auth = (
            f"auth:\n  htpasswd:\n    realm: supermachine-test\n    path: {workdir / 'htpasswd'}\n"
        )
    last_log = ""
    for _attempt in range(3):  # another process may take the free port before the registry does
        port = _free_port()
        storage = workdir / f"storage-{port}"
        config = workdir / f"config-{port}.yml"
        config.write_text(
            "version: 0.1\nlog:\n  level: info\n"
            f"storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: 127.0.0.1:{port}\n{auth}"
        )
        log = workdir / f"registry-{port}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [binary, "serve", str(config)], stdout=out, stderr=subprocess.STDOUT
            )
        registry = LocalRegistry(f"127.0.0.1:{port}", storage, log, process, credentials)
        if _wait_ready(registry):
            return registry
        registry.stop()
        last_log = log.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"docker-registry did not start; its log:\n{last_log}")


def _wait_ready(registry: LocalRegistry) -> bool:
    """Poll ``/v2/`` until the registry answers (200, or 401 with auth), it exits, or time is up."""
    deadline = time.monotonic() + _START_TIMEOUT
    with httpx.Client(timeout=2.0, trust_env=False) as client:
        while time.monotonic() < deadline and registry.process.poll() is None:
            try:
                if client.get(f"http://{registry.host}/v2/").status_code in (200, 401):
                    return True
            except httpx.TransportError:
                pass
            time.sleep(0.05)  # poll interval while the server binds its port
    return False


@pytest.fixture(scope="session")
def local_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    """An open (anonymous, plain HTTP) registry on loopback for the session."""
    running = start_registry(tmp_path_factory.mktemp("registry"))
    yield running
    running.stop()


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    """A registry that wants Basic auth (htpasswd, bcrypt) as ``auth_registry.credentials``."""
    running = start_registry(
        tmp_path_factory.mktemp("auth-registry"), credentials=("tester", secrets.token_urlsafe(12))
    )
    yield running
    running.stop()


# ---------------------------------------------------------------------------
# Token auth (the Bearer challenge, as Docker Hub, GHCR and Quay do it)


def _b64url(data: bytes) -> str:
    return urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class TokenService:
    """The token service of the registry's ``auth: token`` mode: grants signed JWTs.

    Anonymous callers get ``pull`` on repositories under ``public/`` only; a
    caller with ``credentials`` (Basic auth) gets every action asked for; wrong
    credentials get 401. The registry verifies each token's RS256 signature
    against the certificate in ``x5c``, which must be the one it trusts.
    """

    workdir: Path
    credentials: tuple[str, str]
    issuer: str = "supermachine-test-issuer"
    service: str = "supermachine-test-registry"
    #: ``(user or None, scope)`` of every token request, in order.
    requests: list[tuple[str | None, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        openssl = require_tool("openssl", "openssl")
        self.key, self.cert = self.workdir / "token.key", self.workdir / "token.pem"
        subprocess.run(
            [
                openssl,
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=supermachine-test-token",
                "-keyout",
                str(self.key),
                "-out",
                str(self.cert),
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        der = subprocess.run(
            [openssl, "x509", "-in", str(self.cert), "-outform", "DER"],
            check=True,
            capture_output=True,
            timeout=30,
        ).stdout
        self._x5c = b64encode(der).decode()
        self._openssl = openssl
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, body = service.answer(self.path, self.headers.get("Authorization", ""))
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.realm = f"http://127.0.0.1:{self.server.server_address[1]}/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def auth_config(self) -> str:
        return (
            f"auth:\n  token:\n    realm: {self.realm}\n    service: {self.service}\n"
            f"    issuer: {self.issuer}\n    rootcertbundle: {self.cert}\n"
        )

    def answer(self, path: str, authorization: str) -> tuple[int, dict[str, object]]:
        query = parse_qs(urlsplit(path).query)
        scope = (query.get("scope") or [""])[0]
        user = None
        if authorization.startswith("Basic "):
            user, _, password = base64.b64decode(authorization[6:]).decode().partition(":")
            if (user, password) != self.credentials:
                self.requests.append((user, scope))
                return 401, {"details": "wrong user name or password"}
        self.requests.append((user, scope))
        access = []
        for item in scope.split():
            kind, name, actions = item.split(":")
            if user is None:
                if not name.startswith("public/"):
                    continue
                actions = "pull" if "pull" in actions.split(",") else ""
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        return 200, {"token": self.sign(user or "", access)}

    def sign(self, subject: str, access: list[dict[str, object]]) -> str:
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + 600,
            "nbf": now - 60,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        signing_input = (
            _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        )
        signature = subprocess.run(
            [self._openssl, "dgst", "-sha256", "-sign", str(self.key)],
            input=signing_input.encode(),
            capture_output=True,
            check=True,
            timeout=30,
        ).stdout
        return f"{signing_input}.{_b64url(signature)}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="session")
def token_registry(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[LocalRegistry, TokenService]]:
    """A registry in token-auth mode and its token service (``public/*`` is anonymous-readable)."""
    workdir = tmp_path_factory.mktemp("token-registry")
    tokens = TokenService(workdir, ("tester", secrets.token_urlsafe(12)))
    running = start_registry(workdir, credentials=tokens.credentials, auth=tokens.auth_config())
    yield running, tokens
    running.stop()
    tokens.stop()


# ---------------------------------------------------------------------------
# Images


def build_layout(
    dest: Path,
    *layers: Mapping[str, bytes],
    architecture: str = "amd64",
    config: ImageConfig | None = None,
) -> Path:
    """An OCI image layout directory at ``dest``: one gzip layer per mapping of path -> bytes."""
    trees = []
    for n, files in enumerate(layers):
        tree = dest.with_name(f"{dest.name}.layer{n}")
        for name, data in files.items():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            (tree / name).write_bytes(data)
        trees.append(tree)
    archive = write_image_archive(
        trees, dest.with_name(dest.name + ".tar"), config=config, compress=True
    )
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    if architecture != "amd64":
        _retarget(dest, architecture)
    return dest


def _put_blob(layout: Path, data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (layout / "blobs/sha256" / digest[7:]).write_bytes(data)
    return digest, len(data)


def _retarget(layout: Path, architecture: str) -> None:
    """Make the layout's single image claim ``architecture`` (config, manifest and index rewritten)."""
    index = json.loads((layout / "index.json").read_text())
    manifest = json.loads(
        (layout / "blobs/sha256" / index["manifests"][0]["digest"][7:]).read_bytes()
    )
    config = json.loads((layout / "blobs/sha256" / manifest["config"]["digest"][7:]).read_bytes())
    config["architecture"] = architecture
    digest, size = _put_blob(layout, json.dumps(config, sort_keys=True).encode())
    manifest["config"].update(digest=digest, size=size)
    digest, size = _put_blob(layout, json.dumps(manifest, sort_keys=True).encode())
    index["manifests"][0].update(digest=digest, size=size)
    (layout / "index.json").write_text(json.dumps(index))


def build_index_layout(dest: Path, images: Mapping[str, Mapping[str, bytes]]) -> Path:
    """An OCI layout whose index names one image per architecture (``{"arm64": files, ...}``)."""
    (dest / "blobs/sha256").mkdir(parents=True)
    entries = []
    for architecture, files in images.items():
        single = build_layout(
            dest.with_name(f"{dest.name}-{architecture}"), files, architecture=architecture
        )
        for blob in (single / "blobs/sha256").iterdir():
            shutil.copyfile(blob, dest / "blobs/sha256" / blob.name)
        entry = json.loads((single / "index.json").read_text())["manifests"][0]
        entry["platform"] = {"os": "linux", "architecture": architecture}
        entries.append(entry)
    digest, size = _put_blob(
        dest,
        json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": entries,
            },
            sort_keys=True,
        ).encode(),
    )
    (dest / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (dest / "index.json").write_text(
        json.dumps(
            {
                "schemaVersion": 2,
                "manifests": [
                    {
                        "mediaType": "application/vnd.oci.image.index.v1+json",
                        "digest": digest,
                        "size": size,
                    }
                ],
            }
        )
    )
    return dest
