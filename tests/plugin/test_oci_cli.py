"""`supermachine image pull`, `image list` and `cache prune` on pulled OCI images (real registry on loopback)."""

from __future__ import annotations

from pathlib import Path

from smhelpers import Project

from pytest_supermachine.images.oci_image import OciImage
from tests.registry_fixtures import LocalRegistry, build_layout, local_registry  # noqa: F401


def _pushed(registry: LocalRegistry, tmp_path: Path, tag: str) -> str:
    layout = build_layout(tmp_path / "layout", {"etc/greeting": f"hello {tag}\n".encode()})
    return registry.push(layout, "cli/image", tag).ref


def test_image_pull_shows_progress_and_the_digest_then_list_shows_the_image(
    project: Project,
    local_registry: LocalRegistry,  # noqa: F811
    tmp_path: Path,
) -> None:
    ref = _pushed(local_registry, tmp_path, "pull")
    cache = tmp_path / "cache"
    pulled = project.cli("image", "pull", ref, "--cache-dir", str(cache))
    assert pulled.ret == 0, pulled.stderr.str()
    pulled.stdout.fnmatch_lines([f"{ref[4:]}: sha256:* (linux/amd64, *, 1 layers) pulled in *"])
    pulled.stderr.fnmatch_lines(["*layers 2/2*"])  # config + the layer

    listed = project.cli("image", "list", "--cache-dir", str(cache))
    listed.stdout.fnmatch_lines(
        ["pulled OCI images*", f"  {ref[4:]}  sha256:* 1 layers, last used *"]
    )


def test_cache_prune_all_removes_pulled_images_and_their_locks(
    project: Project,
    local_registry: LocalRegistry,  # noqa: F811
    tmp_path: Path,
) -> None:
    ref = _pushed(local_registry, tmp_path, "prune")
    cache = tmp_path / "cache"
    assert project.cli("image", "pull", ref, "--quiet", "--cache-dir", str(cache)).ret == 0
    assert any((cache / "oci").glob("*.lock"))

    pruned = project.cli("cache", "prune", "--all", "--cache-dir", str(cache))
    assert pruned.ret == 0, pruned.stderr.str()
    pruned.stdout.fnmatch_lines(["removed *-linux-amd64: --all"])
    assert list((cache / "oci").iterdir()) == []


def test_cache_prune_removes_the_root_filesystem_built_from_a_pulled_image(
    project: Project,
    local_registry: LocalRegistry,  # noqa: F811
    tmp_path: Path,
) -> None:
    ref = _pushed(local_registry, tmp_path, "rootfs")
    cache = tmp_path / "cache"
    project.monkeypatch.setenv("SUPERMACHINE_CACHE_DIR", str(cache))
    disk, _config = OciImage(ref).rootfs()  # pulls it and builds its ext4 in that cache
    assert disk.is_file() and disk.is_relative_to(cache / "rootfs")

    pruned = project.cli("cache", "prune", "--unused-days", "0", "--cache-dir", str(cache))
    assert pruned.ret == 0, pruned.stderr.str()
    pruned.stdout.fnmatch_lines(
        [
            "removed *-linux-amd64: pulled image * unused*",
            "removed *: root filesystem of pulled sha256:*",
        ]
    )
    assert not disk.exists()
    assert [p.name for p in (cache / "rootfs").iterdir()] == []  # the entry and its lock
    assert list((cache / "oci").iterdir()) == []
