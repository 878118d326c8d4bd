"""/dev/kvm as a file: which device, opening it with errors that say how to fix access,
whether it is nested PVM, and the one-line probe the report header shows.

Pure Python (no cffi, no compiled core), so the pytest report header can probe KVM
without loading the VMM: a run that uses no VM pays a syscall or three, not an import
of the core (issue 13). `kvm.Kvm` opens the device through `open_kvm_device` too.
"""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

from ..errors import KvmUnavailableError

DEFAULT_KVM_DEVICE = "/dev/kvm"
KVM_DEVICE_ENV = "SUPERMACHINE_KVM_DEVICE"
PVM_MODULE_PATH = Path("/sys/module/kvm_pvm")
#: ``_IO(KVMIO, 0x00)`` and the one API version there has ever been (linux/kvm.h).
KVM_GET_API_VERSION = 0xAE00
KVM_API_VERSION = 12

UDEV_FIX = (
    "give your user access to it, e.g. add yourself to the 'kvm' group "
    "(sudo usermod -aG kvm $USER, then log in again), or install the udev rule "
    'KERNEL=="kvm", GROUP="kvm", MODE="0666" in /etc/udev/rules.d/99-kvm.rules '
    "and run: sudo udevadm control --reload-rules && sudo udevadm trigger"
)


def kvm_device_path() -> str:
    """The KVM device to open: `$SUPERMACHINE_KVM_DEVICE` or /dev/kvm."""
    return os.environ.get(KVM_DEVICE_ENV) or DEFAULT_KVM_DEVICE


def is_nested_pvm() -> bool:
    """True when /dev/kvm is provided by kvm_pvm (guest CPL0 emulated, see docs/vmm.md, "Facts of this machine")."""
    return PVM_MODULE_PATH.exists()


def open_kvm_device(path: str) -> int:
    """An O_RDWR fd of the KVM device at `path`; `KvmUnavailableError` saying how to fix it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise KvmUnavailableError(
            f"{path} does not exist: this machine has no KVM. Enable virtualization "
            "(VT-x/AMD-V) in the firmware and load the module (sudo modprobe kvm_intel or "
            "kvm_amd); in a cloud VM pick an instance type with nested virtualization"
        ) from None
    except PermissionError:
        raise KvmUnavailableError(f"permission denied looking at {path}: {UDEV_FIX}") from None
    if not stat.S_ISCHR(st.st_mode):
        raise KvmUnavailableError(f"{path} is not a character device: it cannot be KVM")
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except PermissionError:
        raise KvmUnavailableError(
            f"permission denied opening {path} (owner uid {st.st_uid}, gid {st.st_gid}, "
            f"mode {stat.S_IMODE(st.st_mode):o}): {UDEV_FIX}"
        ) from None
    except OSError as e:
        raise KvmUnavailableError(f"cannot open {path}: {e.strerror}") from None


def kvm_summary() -> str:
    """One line for pytest's report header; never raises, never creates a VM."""
    path = kvm_device_path()
    try:
        fd = open_kvm_device(path)
    except KvmUnavailableError as e:
        return f"KVM unavailable ({e})"
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as e:
        return f"KVM unavailable ({path}: KVM_GET_API_VERSION failed: {e.strerror})"
    finally:
        os.close(fd)
    if version != KVM_API_VERSION:
        return (
            f"KVM unavailable ({path} speaks KVM API version {version}, this VMM needs "
            f"{KVM_API_VERSION}: update the host kernel)"
        )
    mode = "nested PVM (guest CPL0 emulated: slow tier)" if is_nested_pvm() else "hardware KVM"
    return f"{path} API {version}, {mode}"


__all__ = [
    "DEFAULT_KVM_DEVICE",
    "KVM_API_VERSION",
    "KVM_DEVICE_ENV",
    "KVM_GET_API_VERSION",
    "PVM_MODULE_PATH",
    "UDEV_FIX",
    "is_nested_pvm",
    "kvm_device_path",
    "kvm_summary",
    "open_kvm_device",
]
