"""``network=`` from the marker and the settings reaches the image that boots the base snapshot."""

from __future__ import annotations


def test_a_network_marker_on_an_image_without_tcp_stack_fails_with_the_reason(project):
    project.write(
        "test_net_marker.py",
        """
import pytest

@pytest.mark.microvm(network=["127.0.0.1:5432"])
def test_wants_a_nic(microvm):
    pass

def test_hermetic(microvm):
    assert microvm.run("echo ok").stdout == b"ok\\n"
""",
    )
    result = project.run()
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*microguest has no TCP/IP stack*"])


def test_a_malformed_network_setting_is_a_usage_error_naming_its_source(project):
    project.write("test_net_setting.py", "def test_x(microvm): pass\n")
    result = project.run("--supermachine-network=nohostport")
    result.stderr.fnmatch_lines(["*network from command line (--supermachine-network)*"])
