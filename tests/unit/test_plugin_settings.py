"""Settings: one declaration per option, precedence marker > CLI > env > ini > default."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_supermachine.session.settings import OPTIONS, Settings, SettingsError


def resolve(cli=None, env=None, ini=None, **kw) -> Settings:
    return Settings.resolve(cli=cli or {}, env=env or {}, ini=ini or {}, **kw)


def test_every_option_has_matching_cli_env_and_ini_names():
    for opt in OPTIONS:
        assert opt.cli == "--supermachine-" + opt.name.replace("_", "-")
        assert opt.ini == "supermachine_" + opt.name
        assert opt.env == "SUPERMACHINE_" + opt.name.upper()
        assert hasattr(Settings(), opt.name)


def test_defaults():
    s = resolve()
    assert (s.image, s.vcpus, s.mem_mib, s.pool_size) == ("default", None, None, 4)
    assert (s.capsule_retention, s.capsule_retention_count, s.rebuild) == ("failed", 3, False)
    assert s.sources == {}


def test_cli_beats_env_beats_ini():
    ini = {
        "supermachine_image": "from-ini",
        "supermachine_pool_size": "1",
        "supermachine_vcpus": "3",
    }
    env = {"SUPERMACHINE_IMAGE": "from-env", "SUPERMACHINE_POOL_SIZE": "2"}
    cli = {"image": "from-cli"}
    s = resolve(cli, env, ini)
    assert (s.image, s.pool_size, s.vcpus) == ("from-cli", 2, 3)
    assert s.sources["image"] == "command line (--supermachine-image)"
    assert s.sources["pool_size"] == "environment (SUPERMACHINE_POOL_SIZE)"
    assert s.sources["vcpus"] == "ini (supermachine_vcpus)"


def test_empty_values_count_as_unset():
    s = resolve({"image": None}, {"SUPERMACHINE_IMAGE": ""}, {"supermachine_image": "ini"})
    assert s.image == "ini"


@pytest.mark.parametrize(
    ("name", "raw", "expected"),
    [
        ("rebuild", "yes", True),
        ("rebuild", "0", False),
        ("rebuild", "True", True),
        ("ready_timeout", "2.5", 2.5),
        ("capsule_retention", "ALL", "all"),
        ("pool_size", "0", 0),
        ("mem_mib", "128", 128),
        ("run_timeout", "30", 30.0),
        ("run_timeout", "none", float("inf")),
        ("output_limit", "1000", 1000),
        ("output_limit", "16M", 16 << 20),
        ("output_limit", "2KiB", 2048),
        ("output_limit", "1g", 1 << 30),
        ("output_limit", "none", None),
    ],
)
def test_values_are_parsed(name, raw, expected):
    assert getattr(resolve(env={f"SUPERMACHINE_{name.upper()}": raw}), name) == expected


@pytest.mark.parametrize(
    ("name", "raw", "message"),
    [
        ("vcpus", "0", "must be at least 1"),
        ("pool_size", "-1", "must not be negative"),
        ("capsule_retention", "some", "must be one of all, failed, none"),
        ("rebuild", "maybe", "expected a boolean"),
        ("ready_timeout", "0", "positive number of seconds"),
        ("run_timeout", "0", "positive number of seconds, or 'none'"),
        ("output_limit", "lots", "number of bytes .*or 'none'"),
        ("output_limit", "-5", "number of bytes"),
    ],
)
def test_bad_values_name_their_source(name, raw, message):
    with pytest.raises(
        SettingsError, match=rf"{name} from ini \(supermachine_{name}\): .*{message}"
    ):
        resolve(ini={f"supermachine_{name}": raw})


@pytest.mark.parametrize("nested_pvm", [False, True])
def test_a_ready_timeout_that_is_set_is_used_as_given_on_any_host(nested_pvm):
    s = resolve(env={"SUPERMACHINE_READY_TIMEOUT": "30"})
    assert s.ready_timeout_in_force(nested_pvm) == (
        30.0,
        "environment (SUPERMACHINE_READY_TIMEOUT)",
    )


def test_an_unset_ready_timeout_is_120_s_on_hardware_kvm():
    assert resolve().ready_timeout_in_force(nested_pvm=False) == (120.0, "default")


def test_an_unset_ready_timeout_is_900_s_on_a_nested_pvm_host():
    assert resolve().ready_timeout_in_force(nested_pvm=True) == (
        900.0,
        "default on a nested-PVM host",
    )


def test_relative_paths_resolve_against_their_source(tmp_path):
    s = resolve(
        {"capsule_dir": "caps"},
        ini={"supermachine_cache_dir": "cache"},
        invocation_dir=tmp_path / "cwd",
        ini_dir=tmp_path / "ini",
    )
    assert s.capsule_dir == tmp_path / "cwd" / "caps"
    assert s.cache_dir == tmp_path / "ini" / "cache"
    assert s.resolved_capsule_dir(tmp_path) == tmp_path / "cwd" / "caps"
    assert resolve().resolved_capsule_dir(tmp_path) == tmp_path / ".supermachine" / "failures"


def test_marker_beats_everything_and_is_checked():
    s = resolve({"vcpus": "2", "image": "cli"})
    marked = s.with_marker({"vcpus": 4, "image": "other"})
    assert (marked.vcpus, marked.image, marked.sources["vcpus"]) == (4, "other", "marker")
    assert s.with_marker({}) is s
    with pytest.raises(SettingsError, match="unknown argument.*cpus"):
        s.with_marker({"cpus": 2})
    with pytest.raises(SettingsError, match="vcpus=...*must be at least 1"):
        s.with_marker({"vcpus": 0})


def test_cache_dir_default_is_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("SUPERMACHINE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert resolve().resolved_cache_dir() == tmp_path / "pytest-supermachine"
    assert resolve({"cache_dir": "/x"}).resolved_cache_dir() == Path("/x")


def test_a_marker_sizes_the_writable_layer_of_its_test():
    s = resolve(ini={"supermachine_disk_mib": "256"})
    marked = s.with_marker({"disk_mib": 64})
    assert (marked.disk_mib, marked.sources["disk_mib"]) == (64, "marker")
    with pytest.raises(SettingsError, match="disk_mib"):
        s.with_marker({"disk_mib": 0})


def test_run_timeout_and_output_limit_follow_marker_cli_env_ini():
    ini = {"supermachine_run_timeout": "10", "supermachine_output_limit": "1K"}
    env = {"SUPERMACHINE_RUN_TIMEOUT": "20", "SUPERMACHINE_OUTPUT_LIMIT": "2K"}
    s = resolve({"run_timeout": "30"}, env, ini)
    assert (s.run_timeout, s.output_limit) == (30.0, 2048)
    marked = s.with_marker({"run_timeout": 5, "output_limit": "8K"})
    assert (marked.run_timeout, marked.output_limit) == (5.0, 8192)
    assert marked.sources["output_limit"] == "marker"


def test_a_marker_output_limit_of_none_means_unlimited():
    marked = resolve(env={"SUPERMACHINE_OUTPUT_LIMIT": "1K"}).with_marker({"output_limit": None})
    assert (marked.output_limit, marked.sources["output_limit"]) == (None, "marker")


def test_unset_run_timeout_and_output_limit_leave_the_machines_defaults():
    s = resolve()
    assert (s.run_timeout, s.output_limit) == (None, None)
    assert "output_limit" not in s.sources
