"""A real userland for the OCI tests: Debian (essential + python3-minimal) by mmdebstrap, as an OCI layout.

Built from the Debian mirror once per machine and kept in the user cache under
``debian-oci/<key>``, the key hashing the recipe below (suite, variant,
packages, image config), so a change of recipe builds a new one and nothing
else does. The rootfs tarball mmdebstrap writes becomes the image's single
layer as is, so owners, modes and device nodes are exactly Debian's.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

from pytest_supermachine.cache import build_once, content_key
from pytest_supermachine.images.oci import ImageConfig

from .registry_fixtures import require_tool

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
VARIANT = "essential"
PACKAGES = ("python3-minimal",)
#: The image config tests check run() defaults against.
CONFIG = ImageConfig(
    env=("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "APP_MODE=oci-test"),
    working_dir="/srv",
    user="nobody",  # commands run as nobody (65534) unless a test says otherwise
    cmd=("python3",),
    exposed_ports=("8000/tcp",),
    labels={"org.opencontainers.image.title": "supermachine debian test image"},
)
TAG = "bookworm-python"
_BUILD_TIMEOUT = 1800.0


def _blob(blobs: Path, data: bytes) -> dict[str, object]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (blobs / digest[7:]).write_bytes(data)
    return {"digest": digest, "size": len(data)}


def debian_python_layout() -> Path:
    """The OCI layout of the Debian image (built on first use: minutes, needs the mirror)."""
    mmdebstrap = require_tool("mmdebstrap", "mmdebstrap")
    recipe = [SUITE, MIRROR, VARIANT, *PACKAGES, json.dumps(CONFIG.to_json(), sort_keys=True)]

    def fill(entry: Path) -> dict[str, object]:
        rootfs_tar = entry / "rootfs.tar"
        done = subprocess.run(
            [
                mmdebstrap,
                "--quiet",
                f"--variant={VARIANT}",
                f"--include={','.join(PACKAGES)}",
                "--dpkgopt=path-exclude=/usr/share/{doc,man,locale}/*",
                SUITE,
                str(rootfs_tar),
                MIRROR,
            ],
            capture_output=True,
            timeout=_BUILD_TIMEOUT,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"mmdebstrap failed: {done.stderr.decode()[-2000:]}")
        layout = entry / "layout"
        blobs = layout / "blobs" / "sha256"
        blobs.mkdir(parents=True)
        layer_bytes = rootfs_tar.read_bytes()
        layer = _blob(blobs, layer_bytes)
        rootfs_tar.unlink()
        config = _blob(
            blobs,
            json.dumps(
                {
                    "architecture": "amd64",
                    "os": "linux",
                    "config": CONFIG.to_json(),
                    "rootfs": {"type": "layers", "diff_ids": [layer["digest"]]},
                },
                sort_keys=True,
            ).encode(),
        )
        manifest = _blob(
            blobs,
            json.dumps(
                {
                    "schemaVersion": 2,
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
                    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", **layer}],
                },
                sort_keys=True,
            ).encode(),
        )
        (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        (layout / "index.json").write_text(
            json.dumps(
                {
                    "schemaVersion": 2,
                    "manifests": [
                        {
                            "mediaType": "application/vnd.oci.image.manifest.v1+json",
                            **manifest,
                            "annotations": {"org.opencontainers.image.ref.name": TAG},
                        }
                    ],
                }
            )
        )
        return {"recipe": recipe}

    return build_once("debian-oci", content_key(*recipe)[:16], fill) / "layout"


if __name__ == "__main__":  # build it ahead of a test run: python -m tests.debian_image
    print(debian_python_layout())
