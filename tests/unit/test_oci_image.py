"""OCI images as guest images without a VM: reference resolution, layout tags, User, the config."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest

from pytest_supermachine.errors import GuestBuildError, SupermachineError
from pytest_supermachine.fixtures.factory import MicrovmFactory
from pytest_supermachine.images.oci import (
    ImageConfig,
    OciFormatError,
    build_oci_rootfs,
    unpack_oci_tree,
    write_image_archive,
)
from pytest_supermachine.images.oci_image import OciImage, resolve_user
from pytest_supermachine.images.reference import ImageReferenceError
from pytest_supermachine.images.registry import find_image
from pytest_supermachine.session.settings import Settings
from pytest_supermachine.vmm.agent import RunAs
from tests.image_fixtures import private_cache  # noqa: F401 (fixture)

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("private_cache")]


def _image(tmp_path: Path, name: str, files: dict[str, bytes]) -> Path:
    tree = tmp_path / f"{name}-tree"
    for path, data in files.items():
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        (tree / path).write_bytes(data)
    return write_image_archive([tree], tmp_path / f"{name}.tar")


def _two_tag_layout(tmp_path: Path) -> Path:
    """One OCI layout holding two images, annotated with the tags "a" and "b"."""
    layout = tmp_path / "layout"
    (layout / "blobs/sha256").mkdir(parents=True)
    manifests = []
    for tag in ("a", "b"):
        archive = _image(tmp_path, tag, {"etc/which": tag.encode()})
        single = tmp_path / f"{tag}-layout"
        with tarfile.open(archive) as tar:
            tar.extractall(single, filter="data")
        for blob in (single / "blobs/sha256").iterdir():
            shutil.copyfile(blob, layout / "blobs/sha256" / blob.name)
        entry = json.loads((single / "index.json").read_text())["manifests"][0]
        entry["annotations"] = {"org.opencontainers.image.ref.name": tag}
        manifests.append(entry)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": manifests}))
    return layout


def test_a_layout_tag_picks_the_image_annotated_with_it(tmp_path: Path) -> None:
    layout = _two_tag_layout(tmp_path)
    unpack_oci_tree(layout, tmp_path / "root", tag="b")
    assert (tmp_path / "root/etc/which").read_bytes() == b"b"


def test_a_layout_tag_no_image_has_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(OciFormatError, match="no image tagged 'c'"):
        unpack_oci_tree(_two_tag_layout(tmp_path), tmp_path / "root", tag="c")


def test_the_image_config_keeps_exposed_ports_and_labels() -> None:
    doc = {"config": {"ExposedPorts": {"80/tcp": {}}, "Labels": {"team": "qa"}}}
    config = ImageConfig.from_config_json(doc)
    assert config.exposed_ports == ("80/tcp",)
    assert config.labels == {"team": "qa"}
    assert ImageConfig.from_json(config.to_json()) == config


@pytest.fixture
def passwd_disk(tmp_path: Path) -> Path:
    archive = _image(
        tmp_path,
        "users",
        {
            "etc/passwd": b"root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n",
            "etc/group": b"root:x:0:\nstaff:x:50:\n",
        },
    )
    return build_oci_rootfs(archive)[0]


@pytest.mark.parametrize(
    ("user", "ids"),
    [("app", (1000, 1001)), ("1000", (1000, 1001)), ("app:staff", (1000, 50)), ("42", (42, 0))],
)
def test_the_image_user_is_resolved_in_its_passwd_and_group(
    passwd_disk: Path, user: str, ids: tuple[int, int]
) -> None:
    run_as = resolve_user(passwd_disk, user).run_as
    assert (run_as.uid, run_as.gid) == ids


def test_the_image_user_is_the_default_user_of_its_machines(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/passwd").write_text("nobody:x:65534:65534::/nonexistent:/bin/sh\n")
    (tree / "etc/group").write_text("nogroup:x:65534:\nusers:x:100:nobody\n")
    archive = write_image_archive([tree], tmp_path / "u.tar", config=ImageConfig(user="nobody"))
    image = OciImage(f"oci-archive:{archive}")
    user = image.run_defaults.user
    assert user is not None and user.run_as == RunAs(65534, 65534, (100,))
    assert user.home == "/nonexistent"
    assert image.image_config.uid_gid == (65534, 65534)


def test_a_user_the_image_does_not_have_is_an_error_naming_it(passwd_disk: Path) -> None:
    with pytest.raises(GuestBuildError, match="'nobody' is not in the guest's /etc/passwd"):
        resolve_user(passwd_disk, "nobody")


def test_a_reference_is_an_oci_image_named_by_its_normalised_reference() -> None:
    image = find_image("oci:python:3.12-slim")
    assert isinstance(image, OciImage)
    assert image.name == "oci:docker.io/library/python:3.12-slim"
    assert find_image("oci:python:3.12-slim") is image


def test_the_writable_layer_size_gives_another_image(tmp_path: Path) -> None:
    archive = _image(tmp_path, "sized", {"etc/x": b"x"})
    small = find_image(f"oci-archive:{archive}", disk_mib=16)
    assert isinstance(small, OciImage) and small.disk_mib == 16
    assert find_image(f"oci-archive:{archive}", disk_mib=32) is not small


def test_a_marker_disk_size_gives_a_sibling_image_sharing_the_root_filesystem(
    tmp_path: Path,
) -> None:
    image = OciImage(f"oci-archive:{_image(tmp_path, 'sib', {'etc/x': b'x'})}")
    disk = image.rootfs()
    small = image.with_disk_mib(16)
    assert (small.disk_mib, small.reference, small.rootfs()) == (16, image.reference, disk)
    assert image.with_disk_mib(16) is small and image.with_disk_mib(image.disk_mib) is image


def test_the_factory_resizes_oci_images_and_refuses_a_size_for_others(tmp_path: Path) -> None:
    archive = _image(tmp_path, "fac", {"etc/x": b"x"})
    factory = MicrovmFactory(Settings(cache_dir=tmp_path / "cache"))
    try:
        resized = factory.image(f"oci-archive:{archive}", disk_mib=48)
        assert isinstance(resized, OciImage) and resized.disk_mib == 48
        with pytest.raises(SupermachineError, match="disk_mib=48 sizes the writable layer"):
            factory.image("microguest", disk_mib=48)
    finally:
        factory.close()


def test_a_missing_archive_is_refused_before_anything_is_built(tmp_path: Path) -> None:
    with pytest.raises(ImageReferenceError, match="does not exist"):
        find_image(f"oci-archive:{tmp_path / 'none.tar'}")


def test_the_config_and_run_defaults_come_from_the_image(tmp_path: Path) -> None:
    config = ImageConfig(env=("A=1",), working_dir="/srv", cmd=("app",), labels={"k": "v"})
    tree = tmp_path / "tree"
    (tree / "srv").mkdir(parents=True)
    image = OciImage(
        f"oci-archive:{write_image_archive([tree], tmp_path / 'c.tar', config=config)}"
    )
    assert image.run_defaults.env == {"A": "1"}
    assert image.run_defaults.cwd == "/srv"
    assert image.image_config.cmd == ("app",)
    assert image.image_config.labels == {"k": "v"}
    assert image.run_defaults.user is None  # no User: root, the agent's own
