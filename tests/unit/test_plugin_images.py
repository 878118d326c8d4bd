"""Images by name: the bundled ones without registration, `register_image`, and the hook order (no VMs)."""

from __future__ import annotations

import pytest

from pytest_supermachine.images import registry
from pytest_supermachine.images.linux import LinuxImage
from pytest_supermachine.images.microguest import MicroguestImage
from pytest_supermachine.images.registry import (
    UnknownImageError,
    canonical_name,
    find_image,
    get_image,
    image_names,
    register_alias,
    register_image,
)


class Roomy(MicroguestImage):
    name = "roomy"
    default_mem_mib = 80


@pytest.fixture(autouse=True)
def registry_as_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing registered, nothing created: a test's registrations leave with it."""
    monkeypatch.setattr(registry, "_factories", {})
    monkeypatch.setattr(registry, "_aliases", {})
    monkeypatch.setattr(registry, "_instances", {})


def test_bundled_images_are_there_without_registration():
    assert image_names() == ["default", "linux", "microguest"]
    assert isinstance(find_image("microguest"), MicroguestImage)
    assert isinstance(find_image("linux"), LinuxImage)


def test_default_names_the_linux_image_and_each_image_is_made_once():
    assert canonical_name("default") == "linux"
    assert find_image("default") is find_image("linux")


def test_register_image_adds_a_name():
    register_image("roomy", Roomy)
    assert "roomy" in image_names()
    assert isinstance(get_image("roomy"), Roomy)


def test_register_image_replaces_a_bundled_image_only_when_asked():
    with pytest.raises(ValueError, match="'linux' is already registered"):
        register_image("linux", Roomy)
    register_image("linux", Roomy, replace=True)
    assert isinstance(find_image("linux"), Roomy)
    assert isinstance(find_image("default"), Roomy), "the alias follows the replacement"


def test_register_alias_redirects_a_bundled_alias():
    register_alias("default", "microguest")
    assert canonical_name("default") == "microguest"
    assert isinstance(find_image("default"), MicroguestImage)


def test_an_unknown_name_is_none_and_get_image_names_the_choices():
    assert find_image("nope") is None
    with pytest.raises(UnknownImageError, match="'nope'; available: default, linux, microguest"):
        get_image("nope")


def test_an_image_hook_in_a_conftest_is_asked_before_the_plugins_own(pytester: pytest.Pytester):
    pytester.makeconftest("""
from pytest_supermachine.images.microguest import MicroguestImage

class Mine(MicroguestImage):
    name = "linux"

def pytest_supermachine_image(config, name):
    return Mine() if name == "linux" else None
""")
    pytester.makepyfile("""
def test_images(request):
    image = request.config.hook.pytest_supermachine_image
    assert type(image(config=request.config, name="linux")).__name__ == "Mine"
    assert type(image(config=request.config, name="default")).__name__ == "LinuxImage"
    assert type(image(config=request.config, name="microguest")).__name__ == "MicroguestImage"
    assert image(config=request.config, name="nope") is None
""")
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)
