"""An OCI image from a registry as a test VM: Debian with python3, pulled, booted, run.

The image is a real Debian userland (mmdebstrap, tests/debian_image.py) pushed
with skopeo to a docker-registry on loopback and named by ``oci:127.0.0.1:PORT/…``
in a test's marker; the plugin pulls it, builds its root filesystem, boots it once
into a base snapshot (user cache), and the test runs commands in it. One boot,
a handful of commands: each exec costs about a second here.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pytest_supermachine.images.linux import LinuxImage
from tests.debian_image import debian_python_layout
from tests.plugin.smhelpers import USER_CACHE, Project
from tests.registry_fixtures import LocalRegistry, local_registry  # noqa: F401 (fixture)

ON_DEBIAN = """
import pytest

@pytest.mark.microvm(image="{ref}")
def test_debian_python(microvm):
    assert microvm.run("python3 -c 'print(6*7)'").stdout == b"42\\n"
    assert b'ID=debian' in microvm.run("cat /etc/os-release").stdout
    # the image config's Env and WorkingDir are run()'s defaults
    assert microvm.run("echo $APP_MODE; pwd").stdout == b"oci-test\\n/srv\\n"
    assert microvm.image_config.exposed_ports == ("8000/tcp",)
    assert microvm.image_config.cmd == ("python3",)
    # the writable layer (supermachine_disk_mib = 16) filling up is ENOSPC in the guest
    full = microvm.run("head -c 32M /dev/zero > /var/big")
    assert full.returncode != 0 and b"No space left on device" in full.stderr, full
"""


@pytest.fixture
def debian_project(
    linux_image: LinuxImage,
    local_registry: LocalRegistry,  # noqa: F811
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[Project, str]]:
    """A pytester project and the reference of the Debian image pushed to the local registry."""
    pushed = local_registry.push(debian_python_layout(), "debian/python", "bookworm")
    project = Project(pytester, USER_CACHE, monkeypatch)
    project.ini("supermachine_disk_mib = 16")
    yield project, pushed.ref


def test_a_debian_image_from_a_registry_runs_python_with_its_config_and_a_bounded_disk(
    debian_project,
) -> None:
    project, ref = debian_project
    project.write("test_debian.py", ON_DEBIAN.format(ref=ref))
    result = project.run()
    result.assert_outcomes(passed=1)
