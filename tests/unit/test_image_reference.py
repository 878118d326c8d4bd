"""Image references: the four prefixes, docker's normalisation, and clear errors for everything else."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_supermachine.images.reference import (
    ArchiveReference,
    ImageReferenceError,
    LayoutReference,
    RegistryReference,
    is_image_reference,
    parse_image_reference,
)

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "registry", "repository", "tag", "digest"),
    [
        ("oci:python:3.12", "docker.io", "library/python", "3.12", None),
        ("oci:python", "docker.io", "library/python", None, None),
        ("oci:me/app", "docker.io", "me/app", None, None),
        ("oci:docker.io/python:3.12-slim", "docker.io", "library/python", "3.12-slim", None),
        ("oci:index.docker.io/library/python", "docker.io", "library/python", None, None),
        ("oci:ghcr.io/owner/app:v1", "ghcr.io", "owner/app", "v1", None),
        ("oci:quay.io/a/b/c@" + DIGEST, "quay.io", "a/b/c", None, DIGEST),
        ("oci:127.0.0.1:5000/x/y:t", "127.0.0.1:5000", "x/y", "t", None),
        ("oci:localhost/x", "localhost", "x", None, None),
        ("oci:localhost:5000/x:1@" + DIGEST, "localhost:5000", "x", "1", DIGEST),
        ("oci:[::1]:5000/x", "[::1]:5000", "x", None, None),
        ("oci:my_org/my-app__x.y", "docker.io", "my_org/my-app__x.y", None, None),
    ],
)
def test_registry_references_are_normalised_as_docker_does(
    text: str, registry: str, repository: str, tag: str | None, digest: str | None
) -> None:
    assert parse_image_reference(text) == RegistryReference(registry, repository, tag, digest)


def test_docker_hub_is_spoken_to_at_its_api_host() -> None:
    ref = parse_image_reference("oci:python:3.12")
    assert isinstance(ref, RegistryReference)
    assert (ref.api_host, ref.name) == ("registry-1.docker.io", "docker.io/library/python:3.12")


def test_a_digest_is_what_gets_pulled_even_with_a_tag() -> None:
    ref = parse_image_reference(f"oci:python:3.12@{DIGEST}")
    assert isinstance(ref, RegistryReference)
    assert ref.target == DIGEST and ref.name == f"docker.io/library/python:3.12@{DIGEST}"


def test_without_tag_or_digest_the_tag_is_latest() -> None:
    ref = parse_image_reference("oci:busybox")
    assert isinstance(ref, RegistryReference) and ref.target == "latest"


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("oci:", "empty"),
        ("oci:Python", "lowercase"),
        ("oci:python:", "not a valid tag"),
        ("oci:python:.bad", "not a valid tag"),
        ("oci:python@sha256:abc", "not a digest"),
        ("oci:python@sha512:" + "a" * 128, "only sha256"),
        ("oci:ghcr.io/", "no repository"),
        ("oci:host.io:99999/x", "out of range"),
        ("oci:bad_host.io/x", "not a valid registry host"),
        ("oci:a//b", "not a valid repository"),
        ("oci:-a/b", "not a valid repository"),
        ("oci:" + "a" * 300, "longer than 255"),
        ("docker://python", "not an image reference"),
        ("python:3.12", "not an image reference"),
        ("oci-archive:", "names no path"),
        ("oci-layout::tag", "names no directory"),
        ("oci-layout:dir:", "not a valid layout tag"),
        ("oci-layout:dir:has space", "not a valid layout tag"),
    ],
)
def test_malformed_references_are_refused_saying_why(text: str, complaint: str) -> None:
    with pytest.raises(ImageReferenceError, match=complaint) as raised:
        parse_image_reference(text)
    assert repr(text)[1:-1] in str(raised.value) or text in str(raised.value)


def test_archive_references_name_their_file(tmp_path: Path) -> None:
    assert parse_image_reference(f"oci-archive:{tmp_path}/a.tar") == ArchiveReference(
        "oci-archive", tmp_path / "a.tar"
    )
    assert parse_image_reference("docker-archive:img.tar") == ArchiveReference(
        "docker-archive", Path("img.tar")
    )


def test_layout_references_split_directory_and_tag_at_the_first_colon() -> None:
    assert parse_image_reference("oci-layout:/srv/img:v1:extra") == LayoutReference(
        Path("/srv/img"), "v1:extra"
    )
    assert parse_image_reference("oci-layout:/srv/img") == LayoutReference(Path("/srv/img"))


def test_a_missing_archive_is_refused_when_checked(tmp_path: Path) -> None:
    ref = parse_image_reference(f"docker-archive:{tmp_path}/nope.tar")
    assert isinstance(ref, ArchiveReference)
    with pytest.raises(ImageReferenceError, match="does not exist"):
        ref.check()


def test_a_directory_is_not_an_archive(tmp_path: Path) -> None:
    ref = parse_image_reference(f"oci-archive:{tmp_path}")
    assert isinstance(ref, ArchiveReference)
    with pytest.raises(ImageReferenceError, match=f"oci-layout:{tmp_path}"):
        ref.check()


def test_a_layout_must_have_its_index_and_the_tag_asked_for(tmp_path: Path) -> None:
    with pytest.raises(ImageReferenceError, match="no oci-layout"):
        LayoutReference(tmp_path).check()
    (tmp_path / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (tmp_path / "index.json").write_text(
        json.dumps(
            {
                "manifests": [
                    {"digest": DIGEST, "annotations": {"org.opencontainers.image.ref.name": "v1"}}
                ]
            }
        )
    )
    assert LayoutReference(tmp_path, "v1").check() == LayoutReference(tmp_path, "v1")
    with pytest.raises(ImageReferenceError, match=r"no image tagged 'v2' \(tags: v1\)"):
        LayoutReference(tmp_path, "v2").check()


def test_registered_image_names_are_not_references() -> None:
    assert not is_image_reference("linux") and not is_image_reference("microguest")
    assert all(
        is_image_reference(p + "x")
        for p in ("oci:", "oci-archive:", "docker-archive:", "oci-layout:")
    )


@given(st.text(max_size=300))
def test_any_string_parses_or_is_refused_with_a_reference_error(text: str) -> None:
    for candidate in (text, "oci:" + text, "oci-layout:" + text, "oci-archive:" + text):
        try:
            ref = parse_image_reference(candidate)
        except ImageReferenceError:
            continue
        again = parse_image_reference(str(ref))  # what we print, we read back as the same image
        if isinstance(ref, RegistryReference):
            assert isinstance(again, RegistryReference)
            assert (again.name, again.target) == (ref.name, ref.target)
        else:
            assert again == ref


_component = st.from_regex(r"[a-z0-9]+(?:[._-][a-z0-9]+)?", fullmatch=True)


@given(
    st.lists(_component, min_size=1, max_size=4),
    st.one_of(st.none(), st.from_regex(r"\w[\w.-]{0,20}", fullmatch=True).filter(str.isascii)),
    st.one_of(st.none(), st.from_regex(r"sha256:[0-9a-f]{64}", fullmatch=True)),
)
def test_valid_docker_names_round_trip(
    parts: list[str], tag: str | None, digest: str | None
) -> None:
    text = (
        "oci:ghcr.io/"
        + "/".join(parts)
        + (f":{tag}" if tag else "")
        + (f"@{digest}" if digest else "")
    )
    ref = parse_image_reference(text)
    assert ref == RegistryReference("ghcr.io", "/".join(parts), tag, digest)
    assert str(ref) == text or (tag is None and digest is None)
