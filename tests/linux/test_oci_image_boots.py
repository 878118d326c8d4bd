"""An OCI image from a registry as a test VM: Debian with python3, pulled, built ahead, booted, run.

The image is a real Debian userland (mmdebstrap, tests/debian_image.py) whose
config names ``User: nobody``, pushed with skopeo to a docker-registry on loopback
and named by ``oci:127.0.0.1:PORT/…``. ``supermachine image build`` pulls it,
builds its root filesystem and boots it into a base snapshot (user cache); the
pytester project's tests then find that snapshot cached and only restore it:
plain tests, a ``@layer`` on the image, machines from ``microvm_factory``. One
boot, a handful of commands: each exec costs about a second here.
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
from pytest_supermachine import layer

# every test here: the Debian image with a 16 MiB writable layer (one base snapshot)
pytestmark = pytest.mark.microvm(image="{ref}", disk_mib=16)


def test_debian_python(microvm):
    assert microvm.run("python3 -c 'print(6*7)'").stdout == b"42\\n"
    assert b'ID=debian' in microvm.run("cat /etc/os-release").stdout
    # the random pool was seeded at boot: a read that would have to wait fails at once
    assert microvm.run("python3 -c 'import os; os.getrandom(16, os.GRND_NONBLOCK)'").ok
    # the image config's Env, WorkingDir and User (nobody, resolved in its passwd) are run()'s
    defaults = microvm.run("echo $APP_MODE; pwd; id -u; id -g; echo $HOME")
    assert defaults.stdout == b"oci-test\\n/srv\\n65534\\n65534\\n/nonexistent\\n", defaults
    assert microvm.run("id -un; echo $HOME", user="root").stdout == b"root\\n/root\\n"
    assert microvm.image_config.exposed_ports == ("8000/tcp",)
    assert microvm.image_config.uid_gid == (65534, 65534)


def test_the_markers_disk_mib_bounds_the_writable_layer(microvm):
    full = microvm.run("head -c 32M /dev/zero > /tmp/big")
    assert full.returncode != 0 and b"No space left on device" in full.stderr, full


@layer
def with_tool(vm):
    vm.write_file("/usr/local/bin/greet", b"#!/bin/sh\\necho hello from $(id -un) in $(pwd)\\n", 0o755)
    vm.run("id -u > /tmp/layer-ran-as", check=True)


def test_a_layer_on_the_image(with_tool):
    assert with_tool.run("greet").stdout == b"hello from nobody in /srv\\n"
    assert with_tool.read_file("/tmp/layer-ran-as") == b"65534\\n"  # the body ran as the image says


def test_machines_from_the_factory_behave_as_the_image_says(microvm_factory):
    vm = microvm_factory.restore(microvm_factory.base("{ref}", disk_mib=16))
    assert vm.run("echo $APP_MODE; pwd; id -u").stdout == b"oci-test\\n/srv\\n65534\\n"
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
    yield Project(pytester, USER_CACHE, monkeypatch), pushed.ref


def test_a_debian_image_built_ahead_serves_tests_layers_and_the_factory(debian_project) -> None:
    project, ref = debian_project
    build = ("image", "build", ref, "--disk-mib", "16", "--ready-timeout", "3000")
    built = project.cli(*build, timeout=3600)  # a boot under load here can take 15 min
    assert built.ret == 0, built.stderr.str()
    built.stdout.fnmatch_lines([f"{ref}: base snapshot * (1 vCPU, 256 MiB) in *"])

    project.write("test_debian.py", ON_DEBIAN.format(ref=ref))
    result = project.run()
    result.assert_outcomes(passed=4)
    assert not [b for b in project.builds() if b.startswith("base ")]  # built ahead: restored
