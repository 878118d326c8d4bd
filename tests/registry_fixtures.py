"""A real OCI registry on loopback for the pull tests, and small images pushed into it.

`registry` is Debian's ``docker-registry`` (the CNCF distribution registry) serving
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

import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import tarfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from pytest_supermachine.images.oci import ImageConfig, write_image_archive

_START_TIMEOUT = 30.0
_PUSH_TIMEOUT = 120.0


def require_tool(program: str, package: str) -> str:
    """The path of ``program``; else skip (or fail under SUPERMACHINE_REQUIRE_KVM=1) saying how to get it."""
    path = shutil.which(program)
    if path is None:
        why = (f"{program} is not installed (apt-get install {package}; "
               "scripts/bootstrap.sh installs it)")
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

    def push(self, layout: Path, repository: str, tag: str) -> Image:
        """Copy the OCI layout (all its platforms, if an index) to ``repository:tag`` with skopeo."""
        skopeo = require_tool("skopeo", "skopeo")
        dest = f"docker://{self.host}/{repository}:{tag}"
        command = [skopeo, "--insecure-policy", "copy", "--all", "--dest-tls-verify=false"]
        if self.credentials is not None:
            command += ["--dest-creds", ":".join(self.credentials)]
        done = subprocess.run([*command, f"oci:{layout}", dest], capture_output=True,
                              timeout=_PUSH_TIMEOUT, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"skopeo copy to {dest} failed: {done.stderr.decode()}")
        index = json.loads((layout / "index.json").read_text())
        top = index["manifests"][0]["digest"]
        return Image(ref=f"oci:{self.host}/{repository}:{tag}", repository=repository, tag=tag,
                     manifest_digest=top, blob_digests=_image_blobs(layout, top))

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


def start_registry(workdir: Path, *, credentials: tuple[str, str] | None = None) -> LocalRegistry:
    """A docker-registry on 127.0.0.1 answering ``/v2/`` (with htpasswd auth if ``credentials``)."""
    binary = require_tool("docker-registry", "docker-registry")
    workdir.mkdir(parents=True, exist_ok=True)
    auth = ""
    if credentials is not None:
        htpasswd = require_tool("htpasswd", "apache2-utils")
        entry = subprocess.run([htpasswd, "-Bbn", *credentials], capture_output=True,
                               check=True, timeout=30).stdout
        (workdir / "htpasswd").write_bytes(entry)
        auth = f"auth:\n  htpasswd:\n    realm: supermachine-test\n    path: {workdir / 'htpasswd'}\n"
    last_log = ""
    for _attempt in range(3):  # another process may take the free port before the registry does
        port = _free_port()
        storage = workdir / f"storage-{port}"
        config = workdir / f"config-{port}.yml"
        config.write_text(
            "version: 0.1\nlog:\n  level: info\n"
            f"storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: 127.0.0.1:{port}\n{auth}")
        log = workdir / f"registry-{port}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen([binary, "serve", str(config)], stdout=out,
                                       stderr=subprocess.STDOUT)
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
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    """An open (anonymous, plain HTTP) registry on loopback for the session."""
    running = start_registry(tmp_path_factory.mktemp("registry"))
    yield running
    running.stop()


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    """A registry that wants Basic auth (htpasswd, bcrypt) as ``auth_registry.credentials``."""
    running = start_registry(tmp_path_factory.mktemp("auth-registry"),
                             credentials=("tester", secrets.token_urlsafe(12)))
    yield running
    running.stop()


# ---------------------------------------------------------------------------
# Images


def build_layout(dest: Path, files: Mapping[str, bytes], *, architecture: str = "amd64",
                 config: ImageConfig | None = None) -> Path:
    """An OCI image layout directory at ``dest``: one gzip layer holding ``files``."""
    tree = dest.with_name(dest.name + ".tree")
    for name, data in files.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_bytes(data)
    archive = write_image_archive([tree], dest.with_name(dest.name + ".tar"), config=config,
                                  compress=True)
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
    manifest = json.loads((layout / "blobs/sha256" / index["manifests"][0]["digest"][7:]).read_bytes())
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
        single = build_layout(dest.with_name(f"{dest.name}-{architecture}"), files,
                              architecture=architecture)
        for blob in (single / "blobs/sha256").iterdir():
            shutil.copyfile(blob, dest / "blobs/sha256" / blob.name)
        entry = json.loads((single / "index.json").read_text())["manifests"][0]
        entry["platform"] = {"os": "linux", "architecture": architecture}
        entries.append(entry)
    digest, size = _put_blob(dest, json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": entries}, sort_keys=True).encode())
    (dest / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (dest / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": digest,
         "size": size}]}))
    return dest
