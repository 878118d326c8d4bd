"""@layer as a decorator: what it records, what it refuses, how parameters combine (no VMs)."""

from __future__ import annotations

import pytest

from pytest_supermachine import LayerError, layer
from pytest_supermachine.fixtures.layers import Layer, layer_of


@layer
def base_layer(vm):
    vm.append("base")


@layer(base=base_layer, params=[1, 2], ids=["one", "two"])
def numbered(vm, param):
    vm.append(param)


@layer(base=numbered, params=["x", "y"])
def lettered(vm, param):
    vm.append(param)


def test_decorating_gives_a_fixture_named_after_the_function():
    lay = layer_of(base_layer)
    assert isinstance(lay, Layer)
    assert lay.name == "base_layer" and lay.base is None
    assert base_layer.name == "base_layer"  # pytest's fixture definition


def test_chain_runs_from_the_image_outwards():
    assert [lay.name for lay in layer_of(lettered).chain()] == [
        "base_layer",
        "numbered",
        "lettered",
    ]


def test_parameters_of_the_chain_combine():
    lay = layer_of(lettered)
    assert lay.param_sets() == [(1, "x"), (1, "y"), (2, "x"), (2, "y")]
    assert lay.param_ids() == ["one-x", "one-y", "two-x", "two-y"]
    assert [(each.name, p) for each, p in lay.split_params((2, "y"))][1:] == [
        ("numbered", 2),
        ("lettered", "y"),
    ]
    assert layer_of(base_layer).param_sets() is None


def test_source_is_the_functions_own_text():
    assert layer_of(numbered).source.startswith("@layer(base=base_layer")
    assert "vm.append(param)" in layer_of(numbered).source


def test_run_passes_the_parameter_and_wraps_errors():
    calls: list = []
    layer_of(numbered).run(calls, 7)
    assert calls == [7]

    @layer
    def broken(vm):
        raise KeyError("missing")

    with pytest.raises(
        LayerError,
        match=r"layer 'broken' \(.*:\d+\) failed while building its "
        r"snapshot: KeyError: 'missing'",
    ) as info:
        layer_of(broken).run(None)
    assert isinstance(info.value.__cause__, KeyError)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: layer(lambda: None), "must take \\(vm\\)"),
        (lambda: layer(params=[1])(lambda vm: None), "must take \\(vm, param\\)"),
        (lambda: layer(base=print)(lambda vm: None), "needs another @layer"),
        (lambda: layer(params=[])(lambda vm, p: None), "at least one parameter"),
        (lambda: layer(params=[1, 2], ids=["a"])(lambda vm, p: None), "one id per parameter"),
        (lambda: layer(layer(lambda vm: None)), "already a layer"),
    ],
)
def test_malformed_layers_are_refused_at_decoration(make, message):
    with pytest.raises(LayerError, match=message):
        make()


def test_decorating_does_no_vm_work(monkeypatch):
    import pytest_supermachine.vmm.machine as machine

    monkeypatch.setattr(machine.Machine, "__init__", lambda *a, **k: pytest.fail("VM created"))

    @layer
    def quiet(vm):
        pass

    assert layer_of(quiet).name == "quiet"
