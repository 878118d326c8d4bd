"""Pulling images from a real registry (docker-registry on loopback, images pushed by skopeo).

Specification of `pytest_supermachine.images.distribution`: what a pull yields,
what the cache guarantees, where credentials come from, and the errors a user
sees for every way a pull goes wrong (each naming the reference and leaving
nothing cached).
"""

from __future__ import annotations

import base64
import json
import os
import random
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pytest_supermachine.cache import cache_dir
from pytest_supermachine.errors import SupermachineError
from pytest_supermachine.images.distribution import (
    AUTH_ENV,
    DOCKER_MANIFEST,
    INSECURE_ENV,
    BlobDigestError,
    ImageNotFoundError,
    ManifestError,
    PlatformNotFoundError,
    PullProgress,
    RegistryAuthError,
    RegistryUnreachableError,
    allows_plain_http,
    pull_image,
    pulled_images,
    registry_credentials,
)
from pytest_supermachine.images.oci import ImageConfig, unpack_oci_tree
from pytest_supermachine.images.reference import parse_registry_reference

pytest.register_assert_rewrite("tests.registry_fixtures")  # it is also a plugin, below

from tests.registry_fixtures import (  # noqa: E402
    Image,
    LocalRegistry,
    TokenService,
    build_index_layout,
    build_layout,
)

pytest_plugins = ["tests.registry_fixtures"]  # local_registry, auth_registry, token_registry


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private cache and HOME, and none of the caller's registry settings."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("SUPERMACHINE_CACHE_DIR", str(tmp_path / "cache"))
    for name in ("DOCKER_CONFIG", AUTH_ENV, INSECURE_ENV):
        monkeypatch.delenv(name, raising=False)
    return home


def oci_cache() -> Path:
    return cache_dir() / "oci"


def cache_entries() -> list[str]:
    """Everything in the pull cache but lock files (temporary pull dirs included)."""
    root = oci_cache()
    return (
        sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock"))
        if root.exists()
        else []
    )


@pytest.fixture
def image(local_registry: LocalRegistry, tmp_path: Path, request: pytest.FixtureRequest) -> Image:
    """An image of its own for this test (unique bytes, so no blob is shared with another test)."""
    layers = [
        {
            "etc/greeting": f"hello from {request.node.name}\n".encode(),
            "usr/bin/tool": b"#!/bin/sh\necho old\n",
        },
        {"usr/bin/tool": b"#!/bin/sh\necho tool\n"},  # replaces the lower layer's
        {"srv/data": random.Random(request.node.name).randbytes(1 << 20)},
    ]
    layout = build_layout(
        tmp_path / "layout", *layers, config=ImageConfig(env=("PATH=/usr/bin",), working_dir="/srv")
    )
    return local_registry.push(layout, "tests/" + request.node.name.lower().replace("_", "-"), "v1")


def write_docker_config(home: Path, config: dict[str, object]) -> None:
    (home / ".docker").mkdir(exist_ok=True)
    (home / ".docker" / "config.json").write_text(json.dumps(config))


# ---------------------------------------------------------------------------
# Pulling


def test_pull_by_tag_gives_a_layout_that_unpacks_to_the_image_files(
    image: Image, tmp_path: Path
) -> None:
    pulled = pull_image(image.ref)
    unpacked = unpack_oci_tree(pulled.layout, tmp_path / "tree")
    assert (tmp_path / "tree/etc/greeting").read_text().startswith("hello from test_pull_by_tag")
    assert (tmp_path / "tree/usr/bin/tool").read_bytes() == b"#!/bin/sh\necho tool\n"
    assert (tmp_path / "tree/srv/data").stat().st_size == 1 << 20
    assert unpacked.layers == 3
    assert unpacked.config.working_dir == "/srv"
    assert pulled.manifest_digest == image.manifest_digest
    assert pulled.reference.digest == image.manifest_digest
    assert pulled.layout.parent.parent == oci_cache()
    assert not pulled.from_cache


def test_pull_by_digest_gives_the_image_the_tag_names(
    image: Image, local_registry: LocalRegistry
) -> None:
    pulled = pull_image(f"oci:{local_registry.host}/{image.repository}@{image.manifest_digest}")
    assert pulled.manifest_digest == image.manifest_digest
    assert pulled.config_digest == image.blob_digests[0]


def test_pulled_layout_holds_exactly_the_verified_blobs(image: Image) -> None:
    pulled = pull_image(image.ref)
    blobs = sorted(p.name for p in (pulled.layout / "blobs/sha256").iterdir())
    assert blobs == sorted(d[7:] for d in [*image.blob_digests, image.manifest_digest])
    index = json.loads((pulled.layout / "index.json").read_text())
    assert [m["digest"] for m in index["manifests"]] == [image.manifest_digest]


def test_pull_of_an_index_takes_the_linux_amd64_image(
    local_registry: LocalRegistry, tmp_path: Path
) -> None:
    layout = build_index_layout(
        tmp_path / "multi", {"arm64": {"arch": b"arm64\n"}, "amd64": {"arch": b"amd64\n"}}
    )
    pushed = local_registry.push(layout, "tests/multi-platform", "v1")
    pulled = pull_image(pushed.ref)
    unpack_oci_tree(pulled.layout, tmp_path / "tree")
    assert (tmp_path / "tree/arch").read_bytes() == b"amd64\n"
    assert pulled.digest == pushed.manifest_digest  # the index
    assert pulled.manifest_digest != pulled.digest
    assert pulled.config_digest == pushed.blob_digests[0]


def test_docker_schema2_image_is_pulled(local_registry: LocalRegistry, tmp_path: Path) -> None:
    layout = build_layout(tmp_path / "layout", {"format": b"docker schema 2\n"})
    pushed = local_registry.push(layout, "tests/docker-schema2", "v1", docker_format=True)
    pulled = pull_image(pushed.ref)
    unpack_oci_tree(pulled.layout, tmp_path / "tree")
    assert (tmp_path / "tree/format").read_bytes() == b"docker schema 2\n"
    index = json.loads((pulled.layout / "index.json").read_text())
    assert index["manifests"][0]["mediaType"] == DOCKER_MANIFEST


def test_docker_manifest_list_is_resolved_to_linux_amd64(
    local_registry: LocalRegistry, tmp_path: Path
) -> None:
    layout = build_index_layout(
        tmp_path / "multi", {"arm64": {"arch": b"arm64\n"}, "amd64": {"arch": b"amd64\n"}}
    )
    pushed = local_registry.push(layout, "tests/docker-list", "v1", docker_format=True)
    pulled = pull_image(pushed.ref)
    unpack_oci_tree(pulled.layout, tmp_path / "tree")
    assert (tmp_path / "tree/arch").read_bytes() == b"amd64\n"
    assert pulled.manifest_digest != pulled.digest


def test_index_without_linux_amd64_is_refused_naming_its_platforms(
    local_registry: LocalRegistry, tmp_path: Path
) -> None:
    layout = build_index_layout(tmp_path / "arm", {"arm64": {"arch": b"arm64\n"}})
    pushed = local_registry.push(layout, "tests/arm-only", "v1")
    with pytest.raises(PlatformNotFoundError, match=r"linux/arm64") as raised:
        pull_image(pushed.ref)
    assert pushed.ref in str(raised.value) or "tests/arm-only" in str(raised.value)
    assert cache_entries() == []


def test_single_image_of_another_architecture_is_refused(
    local_registry: LocalRegistry, tmp_path: Path
) -> None:
    layout = build_layout(tmp_path / "arm", {"arch": b"arm64\n"}, architecture="arm64")
    pushed = local_registry.push(layout, "tests/arm-single", "v1")
    with pytest.raises(PlatformNotFoundError, match=r"built for linux/arm64"):
        pull_image(pushed.ref)
    assert cache_entries() == []


def test_progress_counts_every_blob_byte_up_to_the_total(image: Image) -> None:
    seen: list[PullProgress] = []
    pulled = pull_image(image.ref, progress=seen.append)
    assert seen[-1] == PullProgress(
        pulled.size, pulled.size, len(image.blob_digests), len(image.blob_digests)
    )
    assert [p.bytes_done for p in seen] == sorted(p.bytes_done for p in seen)
    assert all(p.bytes_total == pulled.size for p in seen)


# ---------------------------------------------------------------------------
# Cache


def test_second_pull_of_a_tag_downloads_no_blob(
    image: Image, local_registry: LocalRegistry
) -> None:
    first = pull_image(image.ref)
    for digest in image.blob_digests:  # the registry can no longer serve the image's blobs
        local_registry.blob_file(digest).unlink()
    second = pull_image(image.ref)
    assert second.from_cache
    assert second.layout == first.layout


def test_pull_by_digest_of_a_cached_image_needs_no_registry(image: Image) -> None:
    first = pull_image(image.ref)
    unreachable = f"oci:127.0.0.1:9/{image.repository}@{image.manifest_digest}"
    again = pull_image(unreachable)
    assert again.from_cache and again.layout == first.layout


def test_killed_pull_caches_nothing_and_the_next_pull_cleans_up(image: Image) -> None:
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            (
                "import os, signal, sys\n"
                "from pytest_supermachine.images.distribution import pull_image\n"
                "def die(progress):\n"
                "    if progress.layers_done:\n"
                "        os.kill(os.getpid(), signal.SIGKILL)\n"
                "pull_image(sys.argv[1], progress=die)\n"
            ),
            image.ref,
        ],
        timeout=120,
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL
    leftovers = cache_entries()
    assert len(leftovers) == 1 and leftovers[0].startswith(".pull-")
    pulled = pull_image(image.ref)
    assert cache_entries() == [pulled.layout.parent.name]


_PULLER = """
import logging, pathlib, sys, time
from pytest_supermachine.images.distribution import pull_image
holding, release, log = (pathlib.Path(a) for a in sys.argv[2:5])
logging.getLogger("filelock").addHandler(logging.FileHandler(log))  # says when it waits
logging.getLogger("filelock").setLevel(logging.DEBUG)
def hold(progress):  # the first puller stops mid-download until told to go on
    if not holding.exists():
        holding.touch()
        while not release.exists():
            time.sleep(0.01)
print(pull_image(sys.argv[1], progress=hold).from_cache)
"""


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_concurrent_pulls_of_one_image_download_it_once(image: Image, tmp_path: Path) -> None:
    holding, release = tmp_path / "holding", tmp_path / "release"
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    first, second = (
        subprocess.Popen(
            [sys.executable, "-c", _PULLER, image.ref, str(holding), str(release), str(log)],
            stdout=subprocess.PIPE,
        )
        for log in logs
    )
    try:
        wait_for(holding.exists, "a pull to start downloading")
        wait_for(
            lambda: any("not acquired" in log.read_text() for log in logs if log.exists()),
            "the other pull to wait for the lock",
        )
    finally:
        release.touch()  # on failure too, so that both pullers end
    outputs = sorted(p.communicate(timeout=120)[0].decode().strip() for p in (first, second))
    assert outputs == ["False", "True"]  # downloaded once; the other found it in the cache


def test_pulled_images_lists_what_the_cache_holds(image: Image) -> None:
    pulled = pull_image(image.ref)
    listed = pulled_images()
    assert [(p.layout, p.manifest_digest, p.size) for p in listed] == [
        (pulled.layout, pulled.manifest_digest, pulled.size)
    ]


# ---------------------------------------------------------------------------
# Errors


def test_unknown_repository_is_an_error_naming_the_reference(local_registry: LocalRegistry) -> None:
    ref = f"oci:{local_registry.host}/tests/no-such-repository:v1"
    with pytest.raises(ImageNotFoundError) as raised:
        pull_image(ref)
    assert ref in str(raised.value)
    assert cache_entries() == []


def test_unknown_tag_is_an_error_naming_the_reference(image: Image) -> None:
    ref = image.ref.replace(":v1", ":no-such-tag")
    with pytest.raises(ImageNotFoundError, match="no-such-tag") as raised:
        pull_image(ref)
    assert ref in str(raised.value)


def test_unreachable_registry_is_an_error_naming_the_reference() -> None:
    with pytest.raises(RegistryUnreachableError, match=r"oci:127\.0\.0\.1:9/x/y:v1"):
        pull_image("oci:127.0.0.1:9/x/y:v1", timeout=5)


def test_blob_whose_bytes_do_not_match_its_digest_is_refused_and_nothing_cached(
    image: Image, local_registry: LocalRegistry
) -> None:
    layer = local_registry.blob_file(image.blob_digests[-1])
    data = bytearray(layer.read_bytes())
    data[len(data) // 2] ^= 0x01
    layer.write_bytes(bytes(data))
    with pytest.raises(BlobDigestError, match=image.blob_digests[-1]) as raised:
        pull_image(image.ref)
    assert image.ref.split(":v1")[0] in str(raised.value)
    assert cache_entries() == []


def test_manifest_whose_bytes_do_not_match_its_digest_is_refused(
    image: Image, local_registry: LocalRegistry
) -> None:
    stored = local_registry.blob_file(image.manifest_digest)
    stored.write_bytes(stored.read_bytes().replace(b'"schemaVersion"', b'"schemaVersion" '))
    with pytest.raises(BlobDigestError, match=f"not {image.manifest_digest}"):
        pull_image(image.ref)
    assert cache_entries() == []


@pytest.fixture
def hostile_registry() -> Iterator[tuple[str, dict[str, bytes]]]:
    """A registry that serves whatever manifests the test puts in its dict (by ``repo:tag``)."""
    manifests: dict[str, bytes] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            repo, _, tag = self.path.removeprefix("/v2/").partition("/manifests/")
            body = manifests.get(f"{repo}:{tag}")
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        do_HEAD = do_GET

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}", manifests
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("digest", ["sha256:../../../../escaped", "sha256:/tmp/escaped", "md5:x"])
def test_manifest_naming_a_blob_by_a_hostile_digest_is_refused_before_any_file_is_written(
    hostile_registry: tuple[str, dict[str, bytes]], tmp_path: Path, digest: str
) -> None:
    host, manifests = hostile_registry
    manifests["evil/image:v1"] = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": digest,
                "size": 2,
            },
            "layers": [],
        }
    ).encode()
    with pytest.raises(ManifestError, match="malformed blob digest"):
        pull_image(f"oci:{host}/evil/image:v1")
    assert cache_entries() == []
    assert list(tmp_path.rglob("escaped")) == [] and not Path("/tmp/escaped").exists()


def test_index_naming_its_image_by_a_malformed_digest_is_refused(
    hostile_registry: tuple[str, dict[str, bytes]],
) -> None:
    host, manifests = hostile_registry
    manifests["evil/index:v1"] = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": "../v1",
                    "size": 2,
                    "platform": {"os": "linux", "architecture": "amd64"},
                }
            ],
        }
    ).encode()
    with pytest.raises(ManifestError, match="malformed digest '../v1'"):
        pull_image(f"oci:{host}/evil/index:v1")
    assert cache_entries() == []


def test_errors_are_supermachine_errors() -> None:
    for error in (
        ImageNotFoundError,
        RegistryAuthError,
        BlobDigestError,
        PlatformNotFoundError,
        RegistryUnreachableError,
    ):
        assert issubclass(error, SupermachineError)


# ---------------------------------------------------------------------------
# Authentication (a registry with htpasswd Basic auth)


@pytest.fixture
def private_image(
    auth_registry: LocalRegistry, tmp_path: Path, request: pytest.FixtureRequest
) -> Image:
    layout = build_layout(tmp_path / "layout", {"secret": f"{request.node.name}\n".encode()})
    return auth_registry.push(
        layout, "private/" + request.node.name.lower().replace("_", "-"), "v1"
    )


def test_pull_without_credentials_says_how_to_provide_them(private_image: Image) -> None:
    with pytest.raises(RegistryAuthError) as raised:
        pull_image(private_image.ref)
    message = str(raised.value)
    assert private_image.ref in message
    assert "docker login" in message and AUTH_ENV in message
    assert cache_entries() == []


def test_credentials_from_docker_config_auths(
    private_image: Image, auth_registry: LocalRegistry, isolated: Path
) -> None:
    assert auth_registry.credentials is not None
    auth = base64.b64encode(":".join(auth_registry.credentials).encode()).decode()
    write_docker_config(isolated, {"auths": {auth_registry.host: {"auth": auth}}})
    assert pull_image(private_image.ref).manifest_digest == private_image.manifest_digest


def test_credentials_from_the_environment_variable(
    private_image: Image, auth_registry: LocalRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert auth_registry.credentials is not None
    monkeypatch.setenv(
        AUTH_ENV, json.dumps({auth_registry.host: ":".join(auth_registry.credentials)})
    )
    assert pull_image(private_image.ref).manifest_digest == private_image.manifest_digest


@pytest.fixture
def credential_helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """``docker-credential-test`` on PATH: answers for the servers in its store, logs each query."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    store, queries = tmp_path / "helper-store.json", tmp_path / "helper-queries"
    store.write_text("{}")
    helper = bin_dir / "docker-credential-test"
    helper.write_text(
        "#!/usr/bin/env python3\n"
        "import json, sys\n"
        f"store = json.load(open({str(store)!r}))\n"
        "assert sys.argv[1:] == ['get'], sys.argv\n"
        "server = sys.stdin.read().strip()\n"
        f"open({str(queries)!r}, 'a').write(server + '\\n')\n"
        "if server not in store:\n"
        "    print('credentials not found in native keychain'); sys.exit(1)\n"
        "user, secret = store[server]\n"
        "print(json.dumps({'ServerURL': server, 'Username': user, 'Secret': secret}))\n"
    )
    helper.chmod(helper.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    yield store


def test_credentials_from_a_credential_helper(
    private_image: Image, auth_registry: LocalRegistry, isolated: Path, credential_helper: Path
) -> None:
    credential_helper.write_text(
        json.dumps({auth_registry.host: list(auth_registry.credentials or ())})
    )
    write_docker_config(isolated, {"credHelpers": {auth_registry.host: "test"}})
    assert pull_image(private_image.ref).manifest_digest == private_image.manifest_digest
    assert (credential_helper.parent / "helper-queries").read_text() == f"{auth_registry.host}\n"


def test_anonymous_pull_never_asks_the_credential_helper(
    image: Image, isolated: Path, credential_helper: Path
) -> None:
    write_docker_config(isolated, {"credsStore": "test"})
    pull_image(image.ref)
    assert not (credential_helper.parent / "helper-queries").exists()


def test_wrong_credentials_are_rejected_naming_where_they_came_from(
    private_image: Image, auth_registry: LocalRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(AUTH_ENV, json.dumps({auth_registry.host: "tester:wrong-password"}))
    with pytest.raises(RegistryAuthError, match=rf"rejected .*'tester'.*\${AUTH_ENV}"):
        pull_image(private_image.ref)
    assert cache_entries() == []


# ---------------------------------------------------------------------------
# Token authentication (a registry in token mode with its token service)


def push_to_token_registry(
    token_registry: tuple[LocalRegistry, TokenService], tmp_path: Path, repository: str
) -> Image:
    running, _tokens = token_registry
    layout = build_layout(tmp_path / "layout", {"where": repository.encode()})
    return running.push(layout, repository, "v1")


def test_anonymous_bearer_token_pulls_a_public_image(
    token_registry: tuple[LocalRegistry, TokenService], tmp_path: Path
) -> None:
    pushed = push_to_token_registry(token_registry, tmp_path, "public/anonymous-pull")
    assert pull_image(pushed.ref).manifest_digest == pushed.manifest_digest
    _running, tokens = token_registry
    assert tokens.requests[-1] == (None, "repository:public/anonymous-pull:pull")


def test_bearer_token_with_credentials_pulls_a_private_image(
    token_registry: tuple[LocalRegistry, TokenService],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pushed = push_to_token_registry(token_registry, tmp_path, "private/token-pull")
    running, tokens = token_registry
    monkeypatch.setenv(AUTH_ENV, json.dumps({running.host: ":".join(tokens.credentials)}))
    assert pull_image(pushed.ref).manifest_digest == pushed.manifest_digest
    assert tokens.requests[-1] == ("tester", "repository:private/token-pull:pull")


def test_bearer_registry_without_credentials_says_how_to_provide_them(
    token_registry: tuple[LocalRegistry, TokenService], tmp_path: Path
) -> None:
    pushed = push_to_token_registry(token_registry, tmp_path, "private/token-denied")
    with pytest.raises(RegistryAuthError, match="requires authentication") as raised:
        pull_image(pushed.ref)
    assert pushed.ref in str(raised.value) and AUTH_ENV in str(raised.value)
    assert cache_entries() == []


def test_token_service_refusing_the_credentials_is_an_error_naming_them(
    token_registry: tuple[LocalRegistry, TokenService],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pushed = push_to_token_registry(token_registry, tmp_path, "private/token-wrong")
    running, _tokens = token_registry
    monkeypatch.setenv(AUTH_ENV, json.dumps({running.host: "tester:wrong"}))
    with pytest.raises(RegistryAuthError, match=r"token service .* rejected .*'tester'"):
        pull_image(pushed.ref)


# ---------------------------------------------------------------------------
# Credential lookup and transport policy (no registry needed)


def test_environment_credentials_win_over_docker_config(
    isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_docker_config(isolated, {"auths": {"ghcr.io": {"username": "file", "password": "f"}}})
    monkeypatch.setenv(AUTH_ENV, json.dumps({"ghcr.io": {"username": "env", "password": "e"}}))
    creds = registry_credentials("ghcr.io")
    assert creds is not None and (creds.username, creds.password) == ("env", "e")


def test_docker_hub_credentials_are_found_under_dockers_own_key(isolated: Path) -> None:
    auth = base64.b64encode(b"hubuser:hubpass").decode()
    write_docker_config(isolated, {"auths": {"https://index.docker.io/v1/": {"auth": auth}}})
    ref = parse_registry_reference("python:3.12")
    creds = registry_credentials(ref.registry)
    assert creds is not None and (creds.username, creds.password) == ("hubuser", "hubpass")


def test_credentials_store_is_asked_with_dockers_hub_server_url(
    isolated: Path, credential_helper: Path
) -> None:
    credential_helper.write_text(json.dumps({"https://index.docker.io/v1/": ["u", "s"]}))
    write_docker_config(
        isolated, {"credsStore": "test", "auths": {"https://index.docker.io/v1/": {}}}
    )
    creds = registry_credentials("docker.io")
    assert creds is not None and (creds.username, creds.password) == ("u", "s")


def test_helper_without_an_entry_falls_back_to_auths(
    isolated: Path, credential_helper: Path
) -> None:
    auth = base64.b64encode(b"a:b").decode()
    write_docker_config(isolated, {"credsStore": "test", "auths": {"quay.io": {"auth": auth}}})
    creds = registry_credentials("quay.io")
    assert creds is not None and (creds.username, creds.password) == ("a", "b")


def test_missing_credential_helper_is_an_error_saying_so(isolated: Path) -> None:
    write_docker_config(isolated, {"credHelpers": {"ghcr.io": "no-such-helper-xyz"}})
    with pytest.raises(
        RegistryAuthError, match="docker-credential-no-such-helper-xyz is not on PATH"
    ):
        registry_credentials("ghcr.io")


def test_no_configuration_means_anonymous() -> None:
    assert registry_credentials("ghcr.io") is None


def test_credentials_never_show_their_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(AUTH_ENV, json.dumps({"ghcr.io": "user:hunter2"}))
    creds = registry_credentials("ghcr.io")
    assert creds is not None and creds.password == "hunter2"
    assert "hunter2" not in repr(creds)


@pytest.mark.parametrize(
    ("ref", "plain"),
    [
        ("127.0.0.1:5000/a", True),
        ("localhost:5000/a", True),
        ("[::1]:5000/a", True),
        ("registry.example:5000/a", False),
        ("ghcr.io/a/b", False),
        ("python", False),
    ],
)
def test_plain_http_only_for_loopback_by_default(ref: str, plain: bool) -> None:
    assert allows_plain_http(parse_registry_reference(ref)) is plain


def test_insecure_registries_setting_allows_plain_http(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(INSECURE_ENV, "registry.example:5000, other.example")
    assert allows_plain_http(parse_registry_reference("registry.example:5000/a"))
    assert allows_plain_http(parse_registry_reference("other.example/a"))
    assert not allows_plain_http(parse_registry_reference("registry.example:5001/a"))
