"""The ``network`` setting: hermetic by default, a boolean or an allow-list, from every source."""

from __future__ import annotations

import pytest

from pytest_supermachine.session.settings import Settings, SettingsError


def resolve(cli=None, env=None, ini=None) -> Settings:
    return Settings.resolve(cli=cli or {}, env=env or {}, ini=ini or {})


def test_a_session_is_hermetic_unless_it_asks_for_a_network():
    assert resolve().network is False


def test_the_command_line_takes_a_boolean():
    assert resolve({"network": "true"}).network is True
    assert resolve({"network": "off"}).network is False


def test_ini_takes_an_allow_list_separated_by_commas_or_spaces():
    s = resolve(ini={"supermachine_network": "127.0.0.1:5432, 10.0.0.0/8:443\n db.test:*"})
    assert s.network == ("127.0.0.1:5432", "10.0.0.0/8:443", "db.test:*")


def test_a_pattern_without_a_port_names_its_source():
    with pytest.raises(SettingsError, match=r"environment \(SUPERMACHINE_NETWORK\).*'db\.test'"):
        resolve(env={"SUPERMACHINE_NETWORK": "db.test"})


def test_the_marker_overrides_the_session_with_a_list_or_a_boolean():
    session = resolve({"network": "true"})
    assert session.with_marker({"network": ["127.0.0.1:8080"]}).network == ("127.0.0.1:8080",)
    assert session.with_marker({"network": False}).network is False
    assert session.with_marker({"network": False}).sources["network"] == "marker"


def test_a_marker_network_that_is_not_a_list_of_patterns_is_a_usage_error():
    with pytest.raises(SettingsError, match=r"microvm\(network=\.\.\.\)"):
        resolve().with_marker({"network": [5432]})
