"""The Linux guest on our VMM: boot, snapshot, restore, run, files, isolation, an OCI rootfs."""

from __future__ import annotations

import time

import pytest

from pytest_supermachine.images.linux import LinuxImage
from pytest_supermachine.vmm.agent import AgentRemoteError
from pytest_supermachine.vmm.devices.hub import DiskSpec
from pytest_supermachine.vmm.machine import Machine


def test_restored_guest_runs_uname_and_reports_our_kernel(linux_snapshot, timings):
    t0 = time.monotonic()
    with Machine.restore(linux_snapshot) as m:
        result = m.run("uname -r", timeout=300)
        timings["restore to first exec done, s"] = time.monotonic() - t0
    assert result.ok
    assert result.stdout.startswith(b"6.1.")


def test_exit_codes_reach_the_host(linux):
    assert linux.run("exit 3", timeout=300).returncode == 3
    assert linux.run(["/bin/busybox", "false"], timeout=300).returncode == 1


def test_stdin_reaches_the_command(linux):
    result = linux.run(["/bin/busybox", "cat"], input=b"through stdin\n", timeout=300)
    assert result.stdout == b"through stdin\n"


def test_files_round_trip_through_the_agent(linux):
    linux.write_file("/tmp/data.bin", bytes(range(256)) * 64)
    assert linux.read_file("/tmp/data.bin") == bytes(range(256)) * 64


def test_a_restore_does_not_see_another_restores_writes(linux_snapshot):
    with Machine.restore(linux_snapshot) as a, Machine.restore(linux_snapshot) as b:
        a.write_file("/tmp/mine", b"a's")
        assert b.run(["/bin/busybox", "test", "-e", "/tmp/mine"], timeout=300).returncode == 1


def test_reset_forgets_what_the_test_wrote(linux, timings):
    linux.write_file("/tmp/scratch", b"x")
    t0 = time.monotonic()
    linux.reset()
    result = linux.run(["/bin/busybox", "test", "-e", "/tmp/scratch"], timeout=300)
    timings["reset + exec, s"] = time.monotonic() - t0
    assert result.returncode == 1


def test_an_oci_image_made_from_a_directory_boots_as_the_root_filesystem(tmp_path, busybox):
    from pytest_supermachine.images.oci import build_oci_rootfs, write_image_archive

    layer = tmp_path / "layer"
    (layer / "bin").mkdir(parents=True)
    (layer / "bin" / "busybox").write_bytes(busybox.read_bytes())
    (layer / "bin" / "busybox").chmod(0o755)
    (layer / "bin" / "sh").symlink_to("busybox")
    (layer / "etc").mkdir()
    (layer / "etc" / "greeting").write_text("hello from the image\n")
    (layer / "data").mkdir()
    archive = write_image_archive([layer], tmp_path / "image.tar")
    rootfs, _config = build_oci_rootfs(archive)
    original = rootfs.read_bytes()

    image = LinuxImage()
    with Machine(mem_mib=image.default_mem_mib, disks=(DiskSpec(str(rootfs)),)) as m:
        m.boot_linux(
            image.kernel().vmlinux,
            initrd=image.initramfs(),
            cmdline=f"{image.cmdline()} sm.root=/dev/vda sm.overlay=0",
        )
        m.start()
        m.wait_ready(900)
        assert m.read_file("/etc/greeting") == b"hello from the image\n"
        m.snapshot(tmp_path / "oci.snap")

    # disk writes land in each VM's copy-on-write overlay: isolated, the image untouched
    with Machine.restore(tmp_path / "oci.snap") as a, Machine.restore(tmp_path / "oci.snap") as b:
        a.run(
            ["/bin/busybox", "sh", "-c", "echo a > /data/written && sync"], timeout=300, check=True
        )
        assert a.read_file("/data/written") == b"a\n"
        assert b.run(["/bin/busybox", "test", "-e", "/data/written"], timeout=300).returncode == 1
    assert rootfs.read_bytes() == original


def test_kernel_command_line_names_our_devices(linux):
    cmdline = linux.read_file("/proc/cmdline").decode()
    assert "virtio_mmio.device=4K@0xd0000000:5" in cmdline


def test_a_missing_command_is_a_clear_failure(linux):
    with pytest.raises(AgentRemoteError, match="No such file or directory: /no/such/binary"):
        linux.run(["/no/such/binary"], timeout=300)
