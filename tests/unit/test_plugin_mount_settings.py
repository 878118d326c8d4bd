"""Where mounts come from in the plugin: ini/CLI/env, the marker, ``@layer``; and who may have them."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_supermachine import layer
from pytest_supermachine.errors import SupermachineError
from pytest_supermachine.fixtures.factory import MicrovmFactory
from pytest_supermachine.fixtures.layers import LayerError, layer_of
from pytest_supermachine.mounts import Mount
from pytest_supermachine.session.settings import Settings, SettingsError

pytestmark = pytest.mark.unit


def resolve(**ini: str) -> Settings:
    return Settings.resolve(cli={}, env={}, ini=ini, root_dir=Path("/project"))


def test_ini_mounts_are_guest_equals_host_lines_read_only_unless_rw():
    s = resolve(supermachine_mounts="\n/src=.\n/out = build/out:rw\n")
    assert s.mounts == (("/out", Mount("build/out", writable=True)), ("/src", Mount(".")))
    assert s.sources["mounts"] == "ini (supermachine_mounts)"
    assert s.root_dir == Path("/project")


def test_mounts_on_one_line_are_comma_separated():
    assert resolve(supermachine_mounts="/a=x:ro,/b=y").mounts == (
        ("/a", Mount("x")),
        ("/b", Mount("y")),
    )


@pytest.mark.parametrize("bad", ["/src", "=.", "/src=", "/a=x,/a=y"])
def test_a_malformed_mount_setting_names_its_source(bad):
    with pytest.raises(SettingsError, match=r"mounts from ini \(supermachine_mounts\)"):
        resolve(supermachine_mounts=bad)


def test_a_markers_mounts_replace_the_sessions():
    s = resolve(supermachine_mounts="/src=.")
    marked = s.with_marker({"mounts": {"/data": Mount("d", writable=True)}})
    assert marked.mounts == (("/data", Mount("d", writable=True)),)
    assert marked.sources["mounts"] == "marker"
    assert s.with_marker({"mounts": {}}).mounts == ()


def test_marker_mounts_must_be_a_mapping():
    with pytest.raises(SettingsError, match="mounts must be a mapping"):
        resolve().with_marker({"mounts": ["/src"]})


def test_a_layer_is_built_with_its_own_mounts_and_its_stack_inherits_them():
    @layer(mounts={"/src": "."})
    def with_src(vm):
        pass

    @layer(base=with_src)
    def on_top(vm):
        pass

    @layer(base=with_src, mounts={})
    def without(vm):
        pass

    @layer
    def plain(vm):
        pass

    assert layer_of(on_top).chain_mounts() == (("/src", Mount(".")),)
    assert layer_of(without).chain_mounts() == ()
    assert layer_of(plain).chain_mounts() is None


def test_layer_mounts_must_be_a_mapping():
    with pytest.raises(LayerError, match="mounts must be a mapping"):
        layer(mounts="/src")


def test_an_image_without_mount_support_refuses_mounts_before_any_vm(tmp_path):
    factory = MicrovmFactory(Settings(cache_dir=tmp_path, root_dir=tmp_path))
    try:
        with pytest.raises(SupermachineError, match="mounts need a Linux image.*microguest"):
            factory.base("microguest", mounts={"/src": "."})
    finally:
        factory.close()


def test_ini_dax_suffix_asks_for_a_dax_window():
    assert resolve(supermachine_mounts="/src=.:dax").mounts == (("/src", Mount(".", dax=True)),)
    with pytest.raises(SettingsError, match="read-only"):
        resolve(supermachine_mounts="/src=.:rw:dax")
