"""NetSpec: the NIC as a machine option and as a snapshot records it (validated at restore)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_supermachine.errors import MachineError
from pytest_supermachine.vmm.devices.hub import (
    NetSpec,
    device_section,
    spec_from_dict,
    spec_to_dict,
)
from pytest_supermachine.vmm.restore_validation import _device_spec
from pytest_supermachine.vmm.snapshot import SnapshotInvalid

SNAP = Path("/nonexistent/x.snap")


def test_network_settings_become_specs():
    assert NetSpec.from_setting(False) is None
    assert NetSpec.from_setting(True) == NetSpec(allow=None)
    assert NetSpec.from_setting(["127.0.0.1:80"]) == NetSpec(allow=("127.0.0.1:80",))


def test_a_string_is_not_an_allow_list():
    with pytest.raises(MachineError, match="list of 'host:port' patterns"):
        NetSpec.from_setting("127.0.0.1:80")


def test_a_spec_survives_the_snapshots_json_and_names_its_section():
    spec = NetSpec(allow=("10.0.0.0/8:443",))
    assert spec_from_dict(spec_to_dict(spec)) == spec
    assert device_section(2, spec) == "device/2-net"


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ({"kind": "net", "allow": ["no-port"]}, "no-port"),
        ({"kind": "net", "allow": "127.0.0.1:80"}, "allow="),
        ({"kind": "net", "allow": None, "mac": "01:00:00:00:00:01"}, "multicast"),
        ({"kind": "net", "allow": None, "mac": "zz"}, "MAC"),
        ({"kind": "net", "allow": None, "ports": 3}, "unknown fields"),
    ],
)
def test_a_snapshots_nic_that_this_vmm_could_not_have_written_is_refused(entry, problem):
    with pytest.raises(SnapshotInvalid, match=problem):
        _device_spec(entry, 0, SNAP)


def test_a_valid_nic_entry_is_accepted():
    entry = {"kind": "net", "allow": ["127.0.0.1:5432"], "mac": "52:54:00:12:34:56"}
    assert _device_spec(entry, 0, SNAP) == NetSpec(allow=("127.0.0.1:5432",))
