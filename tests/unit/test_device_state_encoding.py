"""Device state sections: JSON plus raw blobs, round trip, and malformed input refused."""

import pytest

from pytest_supermachine.errors import MachineError
from pytest_supermachine.vmm.devices.hub import (
    BalloonSpec,
    DiskSpec,
    VsockSpec,
    pack_state,
    spec_from_dict,
    spec_to_dict,
    unpack_state,
)


def test_state_with_nested_bytes_round_trips():
    state = {
        "status": 15,
        "queues": [{"ready": True, "size": 256}],
        "device": {"overlay": {"blocks": [1, 7], "data": b"\x00" * 8192}, "tag": b"id"},
    }
    assert unpack_state(pack_state(state)) == state


def test_blobs_are_stored_raw_not_inflated():
    blob = bytes(range(256)) * 4096  # 1 MiB
    assert len(pack_state({"data": blob})) < len(blob) + 100


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\xff\xff\x7f{}",
        b"\x02\x00\x00\x00{}\x05\x00\x00\x00\x00\x00\x00\x00ab",
        b'\x0f\x00\x00\x00{"$blob": 3}',
    ],
)
def test_malformed_sections_raise_a_machine_error(data):
    with pytest.raises(MachineError, match="malformed"):
        unpack_state(data)


@pytest.mark.parametrize(
    "spec",
    [
        VsockSpec(),
        VsockSpec(guest_cid=9),
        DiskSpec("/img/base.ext4", read_only=True, serial="disk0"),
        DiskSpec(None, size=1 << 20),
        BalloonSpec(),
        BalloonSpec(reporting=False, deflate_on_oom=True),
    ],
)
def test_device_specs_round_trip_through_snapshot_metadata(spec):
    assert spec_from_dict(spec_to_dict(spec)) == spec


def test_unknown_device_kind_is_refused():
    with pytest.raises(MachineError, match="unknown device kind 'gpu'"):
        spec_from_dict({"kind": "gpu"})
