"""On the Linux guest the agent session survives reset: no vsock connect, no handshake.

Reconnecting is what made a Linux reset + exec cost ~2.6 s more than an exec (the
guest kernel accepting a new connection, the agent's handshake). The plugin takes the
base snapshot with the agent connected, so a `microvm` restored or reset from it runs
its commands on the carried session: `Machine.agent_connects` does not move. Through
the plugin, with the base snapshot in the user cache (only the first session boots).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pytest_supermachine.images.linux import LinuxImage
from tests.plugin.smhelpers import USER_CACHE, Project

SESSION_ON_LINUX = """
import pytest

@pytest.mark.parametrize("i", range(3))
def test_reset_and_run_need_no_reconnect(microvm, i):
    before = microvm.agent_connects
    r = microvm.run(f"test -e /tmp/by-test && echo leaked; echo {i} | tee /tmp/by-test", timeout=300)
    assert r.stdout == f"{i}\\n".encode(), r
    assert microvm.agent_connects == before == 0

def test_a_session_closed_by_the_host_falls_back_to_reconnecting(microvm):
    before = microvm.agent_connects
    microvm.agent().close()
    assert microvm.run("echo again", timeout=300).stdout == b"again\\n"
    assert microvm.agent_connects == before + 1
"""


@pytest.fixture
def linux_project(
    linux_image: LinuxImage, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Project]:
    project = Project(pytester, USER_CACHE, monkeypatch)
    project.ini("supermachine_image = linux", "supermachine_pool_size = 1")
    yield project


def test_linux_microvms_run_on_the_session_their_snapshot_carries(linux_project: Project):
    linux_project.write("test_session_on_linux.py", SESSION_ON_LINUX)
    result = linux_project.run("-p", "no:randomly")
    result.assert_outcomes(passed=4)
