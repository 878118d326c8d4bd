"""Opening /dev/kvm fails with errors that say what is wrong and how to fix it."""

import os
import stat
import tempfile

import pytest

from pytest_supermachine.errors import KvmUnavailableError
from pytest_supermachine.vmm.kvm import Kvm
from pytest_supermachine.vmm.kvm_device import KVM_DEVICE_ENV
from tests.environment import needs


def test_missing_device_says_kvm_is_absent_and_how_to_get_it(tmp_path):
    with pytest.raises(KvmUnavailableError, match="does not exist.*modprobe kvm_intel"):
        Kvm(str(tmp_path / "kvm"))


def test_regular_file_is_not_taken_for_kvm(tmp_path):
    fake = tmp_path / "kvm"
    fake.write_bytes(b"")
    with pytest.raises(KvmUnavailableError, match="not a character device"):
        Kvm(str(fake))


def test_device_path_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(KVM_DEVICE_ENV, str(tmp_path / "elsewhere"))
    with pytest.raises(KvmUnavailableError, match="elsewhere does not exist"):
        Kvm()


def test_non_kvm_character_device_is_refused(tmp_path):
    # /dev/null opens fine but is not KVM: the API-version ioctl fails with a KvmError naming it.
    from pytest_supermachine.errors import KvmError

    with pytest.raises(KvmError, match="KVM_GET_API_VERSION"):
        Kvm("/dev/null")


def open_as_nobody(path) -> str:
    """Try Kvm(path) in a forked child that dropped root; returns the error text."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no pytest machinery, just the open
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                Kvm(str(path))
                msg = "opened"
            except KvmUnavailableError as e:
                msg = str(e)
            os.write(write_end, msg.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    return out


@needs(None if os.geteuid() == 0 else "creating a device node needs root (mknod)")
def test_permission_denied_names_the_udev_rule():
    with tempfile.TemporaryDirectory() as d:  # a directory the unprivileged child can enter
        os.chmod(d, 0o755)
        node = os.path.join(d, "kvm")
        os.mknod(node, 0o600 | stat.S_IFCHR, os.makedev(10, 232))
        message = open_as_nobody(node)
    assert "permission denied" in message
    assert 'KERNEL=="kvm", GROUP="kvm", MODE="0666"' in message


def test_the_header_probe_speaks_the_cores_ioctl_numbers():
    """The report header probes KVM without loading the compiled core: same constants."""
    from pytest_supermachine.vmm import kvm_device
    from pytest_supermachine.vmm._native import lib

    assert kvm_device.KVM_GET_API_VERSION == lib.KVM_GET_API_VERSION
    assert kvm_device.KVM_API_VERSION == lib.KVM_API_VERSION


@pytest.mark.parametrize(
    ("device", "said"), [("missing", "does not exist"), ("/dev/null", "KVM_GET_API_VERSION")]
)
def test_the_header_probe_reports_an_unusable_device_without_raising(
    tmp_path, monkeypatch, device, said
):
    from pytest_supermachine.vmm.kvm_device import kvm_summary

    monkeypatch.setenv(KVM_DEVICE_ENV, str(tmp_path / device) if device == "missing" else device)
    line = kvm_summary()
    assert line.startswith("KVM unavailable") and said in line
