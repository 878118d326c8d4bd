"""A demo test session: what using pytest-supermachine looks like.

    pytest examples/demo -v                                   # the default image (Linux)
    pytest examples/demo -v --supermachine-image=microguest   # the bundled test guest

Every test gets its own VM, reset in place to a snapshot before it runs.
"""

import pytest

from pytest_supermachine import AgentRemoteError, layer

# Works on both bundled images: Linux runs it through busybox's shell, the
# microguest through its built-in `echo`.
GREETING = "echo hello from a microVM"


def test_the_vm_runs_commands(microvm):
    result = microvm.run(GREETING)
    assert result.ok
    assert result.stdout == b"hello from a microVM\n"


def test_exit_status_and_stderr_come_back(microvm):
    result = microvm.run("exit 3")
    assert result.returncode == 3
    assert not result.ok


@layer
def with_config(vm):
    """Runs once; every test using `with_config` starts from its diff snapshot."""
    vm.write_file("/tmp/app.conf", b"mode=test\n")


def test_a_layer_prepares_state_once(with_config):
    assert with_config.read_file("/tmp/app.conf") == b"mode=test\n"


def test_writes_do_not_leak_into_the_next_test_part_1(microvm):
    microvm.write_file("/tmp/scratch", b"from part 1")
    assert microvm.read_file("/tmp/scratch") == b"from part 1"


def test_writes_do_not_leak_into_the_next_test_part_2(microvm):
    with pytest.raises(AgentRemoteError, match="ENOENT"):
        microvm.read_file("/tmp/scratch")
