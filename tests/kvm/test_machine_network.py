"""The NIC as a machine option: attached, snapshotted, restored and reset with its egress policy.

The microguest does not drive the card, so these check the VMM's side only;
what the guest sees through it is the Linux tier's (tests/linux/test_network.py).
"""

from __future__ import annotations

import pytest

from pytest_supermachine.errors import MachineError
from pytest_supermachine.guest.microguest import GuestMode
from pytest_supermachine.vmm.agent.tcp import AgentNoTcp
from pytest_supermachine.vmm.devices.hub import NetSpec
from pytest_supermachine.vmm.machine import Machine


def test_a_machine_is_hermetic_by_default(make_machine):
    m = make_machine(GuestMode.AGENT)
    with pytest.raises(MachineError, match="no network card"):
        m.devices.nic()


def test_network_true_attaches_a_nic_that_allows_everything(make_machine):
    m = make_machine(GuestMode.AGENT, network=True)
    assert m.devices.nic().egress.policy.allow_all


def test_an_allow_list_gives_a_nic_with_exactly_that_policy(make_machine):
    m = make_machine(GuestMode.AGENT, network=["127.0.0.1:5432", "10.0.0.0/8:443"])
    nic = m.devices.nic()
    assert [r.pattern for r in nic.egress.policy.rules] == ["127.0.0.1:5432", "10.0.0.0/8:443"]
    assert nic.egress.allows("10.0.2.2", 5432)  # the host's loopback, seen from the guest
    assert not nic.egress.allows("10.0.2.2", 5433)


def test_a_malformed_allow_list_is_refused_when_the_machine_is_made():
    with pytest.raises(MachineError, match=r"network=.*'db:none'"):
        Machine(network=["db:none"])


def test_restore_rebuilds_the_nic_with_the_snapshots_policy(make_machine, tmp_path):
    m = make_machine(GuestMode.AGENT, network=["127.0.0.1:8080"])
    m.start()
    m.wait_ready(60)
    m.snapshot(tmp_path / "net.snap")
    with Machine.restore(tmp_path / "net.snap") as r:
        assert NetSpec(allow=("127.0.0.1:8080",)) in [d.spec for d in r.devices.devices]
        assert r.devices.nic().egress.allows("10.0.2.2", 8080)
        assert r.run("echo up").stdout == b"up\n"
        r.reset()
        assert r.devices.nic().egress.allows("10.0.2.2", 8080)
        assert r.run("echo again").stdout == b"again\n"


def test_connect_tcp_on_the_microguest_says_it_has_no_tcp_stack(make_machine):
    m = make_machine(GuestMode.AGENT)
    m.start()
    m.wait_ready(60)
    with pytest.raises(AgentNoTcp, match="microguest has none"):
        m.connect_tcp(80)


def test_restore_can_replace_the_egress_policy_but_not_add_a_nic(make_machine, tmp_path):
    m = make_machine(GuestMode.AGENT, network=True)
    m.start()
    m.wait_ready(60)
    m.snapshot(tmp_path / "open.snap")
    with Machine.restore(tmp_path / "open.snap", network=["127.0.0.1:80"]) as r:
        assert not r.devices.nic().egress.policy.allow_all
        assert r.devices.nic().egress.allows("10.0.2.2", 80)
        assert not r.devices.nic().egress.allows("10.0.2.2", 81)
    hermetic = make_machine(GuestMode.AGENT)
    hermetic.start()
    hermetic.wait_ready(60)
    hermetic.snapshot(tmp_path / "hermetic.snap")
    with pytest.raises(MachineError, match="has no network card"):
        Machine.restore(tmp_path / "hermetic.snap", network=True)
