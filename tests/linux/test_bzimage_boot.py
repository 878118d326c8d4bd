"""The bzImage loader (vmm/boot.py): the kernel build's own bzImage boots by the 64-bit protocol.

The Linux image boots `vmlinux` through its PVH note; `Machine.boot_linux` also takes
a bzImage (zero page with the setup header, e820 map, command line and initrd; the
kernel at 1 MiB entered at +0x200 in long mode). This boots the very bzImage the
recipe built, with the image's initramfs, to the agent.
"""

from __future__ import annotations

from pytest_supermachine.images.linux import LinuxImage
from pytest_supermachine.vmm.layout import ZERO_PAGE_ADDR
from pytest_supermachine.vmm.machine import Machine

RAMDISK_SIZE = 0x21C  # struct setup_header.ramdisk_size, in the zero page


def test_the_recipes_bzimage_boots_to_the_agent(linux_image: LinuxImage) -> None:
    bzimage = linux_image.kernel().bzimage
    assert bzimage.read_bytes()[0x202:0x206] == b"HdrS"  # a bzImage, not the ELF
    initramfs = linux_image.initramfs()
    with Machine(vcpus=1, mem_mib=linux_image.default_mem_mib) as m:
        m.boot_linux(bzimage, cmdline=linux_image.cmdline(), initrd=initramfs)
        assert m.memory.read_u32(ZERO_PAGE_ADDR + RAMDISK_SIZE) == initramfs.stat().st_size
        m.start()
        m.wait_ready(900)
        result = m.run("uname -r; cat /proc/cmdline", timeout=300)
    assert result.ok, result
    release, cmdline = result.stdout.decode().splitlines()
    assert release.startswith("6.1.")
    assert set(linux_image.cmdline().split()) <= set(cmdline.split())  # the zero page's cmdline
