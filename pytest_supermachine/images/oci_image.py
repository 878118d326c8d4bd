"""`OciImage`: any OCI/Docker image as a test VM (``oci:``, ``oci-archive:``, ``docker-archive:``, ``oci-layout:``).

At first use the image is made bootable, each step cached so that later uses
cost a cache lookup:

1. **Source.** An ``oci:`` reference is pulled (`distribution.pull_image`: a
   tag costs one ``HEAD`` once cached, a digest nothing); an archive or layout
   is read where it is.
2. **Root filesystem.** The layers are unpacked safely and written as an ext4
   image (`oci.build_oci_rootfs`), cached by the pulled manifest digest (which
   pins config and every layer), for local sources by their bytes.
3. **Boot.** Our kernel boots with our initramfs (busybox + the static agent as
   ``/init``); the agent mounts the ext4 read-only (``/dev/vda``) under an
   overlay whose writable upper layer is a tmpfs of `disk_mib` MiB, switches root
   into it and keeps serving there. The upper layer lives in guest RAM, so it
   is part of every snapshot and reset with the VM; the ext4 is never written.
   A full upper layer (``/tmp`` included: it is the image's own) is ``ENOSPC``
   in the guest.

The base snapshot key covers the kernel, the initramfs (agent), the command
line (which carries `disk_mib`), the root filesystem's identity (manifest
digest) and the image config; the factory adds vCPUs and memory.

`run()` defaults come from the image config (`run_defaults`): ``Env``,
``WorkingDir`` and ``User`` (resolved in the image's ``/etc/passwd`` and
``/etc/group`` as docker does; commands run with its uid, gid, supplementary
groups and ``HOME``). `prepare` puts them on every machine of the image: those
the fixtures hand out, those `boot` returns, and those restored from its
snapshots through the factory.
"""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import GuestBuildError
from .distribution import ProgressCallback, PulledImage, pull_image
from .linux import LinuxImage
from .oci import ImageConfig, archive_digest, build_oci_rootfs
from .reference import (
    ArchiveReference,
    ImageReference,
    LayoutReference,
    RegistryReference,
    parse_image_reference,
)

if TYPE_CHECKING:
    from ..vmm.agent.users import ResolvedUser
    from ..vmm.machine import Machine

#: Size of the writable layer over the image (tmpfs in guest RAM; pages are used only when written).
DEFAULT_DISK_MIB = 256
#: A distribution userland needs more than the busybox guest's 128 MiB.
DEFAULT_MEM_MIB = 256


@dataclass(frozen=True)
class RunDefaults:
    """What `Machine.run` uses when the caller does not say: the image config's Env, WorkingDir, User."""

    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    #: None: the image names no User (root, the agent's own).
    user: ResolvedUser | None = None


@dataclass(frozen=True)
class OciImageConfig:
    """What the image says about running it, as a test sees it (``microvm.image_config``)."""

    entrypoint: tuple[str, ...]
    cmd: tuple[str, ...]
    env: Mapping[str, str]
    working_dir: str
    #: ``User`` as written in the image ("app", "1000:1000", "" for root).
    user: str
    #: ``User`` resolved in the image's /etc/passwd and /etc/group: (uid, gid).
    uid_gid: tuple[int, int]
    exposed_ports: tuple[str, ...]
    labels: Mapping[str, str]


class OciImage(LinuxImage):
    """An OCI/Docker image booted on the Linux guest's kernel and agent (see the module docstring)."""

    default_mem_mib = DEFAULT_MEM_MIB

    def __init__(self, reference: str | ImageReference, *, disk_mib: int = DEFAULT_DISK_MIB):
        if disk_mib < 1:
            raise ValueError(f"disk_mib must be at least 1, not {disk_mib}")
        self.reference = (
            parse_image_reference(reference) if isinstance(reference, str) else reference
        )
        self.name = str(self.reference)
        self.description = f"OCI image {self.reference}"
        self.disk_mib = disk_mib
        self._lock = threading.Lock()
        self._rootfs: tuple[Path, ImageConfig] | None = None
        self._pulled: PulledImage | None = None
        self._sizes: dict[int, OciImage] = {}

    # ------------------------------------------------------------------ the image's files

    def pull(self, progress: ProgressCallback | None = None) -> PulledImage | None:
        """Pull a registry image into the cache (once per process); None for local sources."""
        if not isinstance(self.reference, RegistryReference):
            return None
        with self._lock:
            if self._pulled is None:
                self._pulled = pull_image(self.reference, progress=progress)
            return self._pulled

    def rootfs(self) -> tuple[Path, ImageConfig]:
        """The cached read-only ext4 of the image's layers, and its config (built on first use)."""
        pulled = self.pull()
        with self._lock:
            if self._rootfs is None:
                if pulled is not None:
                    self._rootfs = build_oci_rootfs(
                        pulled.layout, content_digest=pulled.manifest_digest
                    )
                elif isinstance(self.reference, LayoutReference):
                    ref = self.reference.check()
                    self._rootfs = build_oci_rootfs(ref.path, tag=ref.tag)
                else:
                    assert isinstance(self.reference, ArchiveReference)
                    self._rootfs = build_oci_rootfs(self.reference.check().path)
            return self._rootfs

    def identity(self) -> str:
        """What pins the image's content: the manifest digest if pulled, else the source's bytes."""
        pulled = self.pull()
        if pulled is not None:
            return pulled.manifest_digest
        path = self.reference.path  # type: ignore[union-attr]
        return f"sha256:{archive_digest(path)}"

    @cached_property
    def image_config(self) -> OciImageConfig:
        """Entrypoint, Cmd, Env, WorkingDir, User (and its uid/gid), ExposedPorts, labels."""
        _disk, config = self.rootfs()
        user = self.run_defaults.user
        return OciImageConfig(
            entrypoint=config.entrypoint,
            cmd=config.cmd,
            env=config.env_map,
            working_dir=config.working_dir,
            user=config.user,
            uid_gid=(user.run_as.uid, user.run_as.gid) if user else (0, 0),
            exposed_ports=config.exposed_ports,
            labels=dict(config.labels),
        )

    @cached_property
    def run_defaults(self) -> RunDefaults:
        """The environment and working directory commands get unless the caller says otherwise."""
        disk, config = self.rootfs()
        user = resolve_user(disk, config.user) if config.user else None
        return RunDefaults(env=config.env_map, cwd=config.working_dir or None, user=user)

    def with_disk_mib(self, disk_mib: int) -> OciImage:
        """This image with a writable layer of `disk_mib` MiB (a test's marker; a new base snapshot).

        The pull and the root filesystem are shared: only the boot differs.
        """
        if disk_mib == self.disk_mib:
            return self
        with self._lock:
            sibling = self._sizes.get(disk_mib)
            if sibling is None:
                sibling = self._sizes[disk_mib] = OciImage(self.reference, disk_mib=disk_mib)
                sibling._pulled, sibling._rootfs = self._pulled, self._rootfs
            return sibling

    # ------------------------------------------------------------------ Image

    def boot(self, vcpus: int, mem_mib: int, *, timeout: float) -> Machine:
        machine = super().boot(vcpus, mem_mib, timeout=timeout)
        self.prepare(machine)
        return machine

    def prepare(self, machine: Machine) -> None:
        defaults = self.run_defaults
        machine.default_env = dict(defaults.env)
        machine.default_cwd = defaults.cwd
        machine.default_user = defaults.user
        machine.image_config = self.image_config

    def disks(self) -> tuple:
        from ..vmm.devices.hub import DiskSpec  # lazy: the VMM is loaded only to run VMs

        disk, _config = self.rootfs()
        return (DiskSpec(path=str(disk), read_only=True, serial="image"),)

    def cmdline(self) -> str:
        return f"{super().cmdline()} sm.root=/dev/vda sm.overlay_mib={self.disk_mib}"

    def key_parts(self, vcpus: int, mem_mib: int) -> Mapping[str, bytes | str]:
        _disk, config = self.rootfs()
        return {
            **super().key_parts(vcpus, mem_mib),
            "oci": self.identity(),
            "oci-config": json.dumps(config.to_json(), sort_keys=True),
            "devices": "vsock+disk:image(ro)" + ("+balloon" if self.balloon() else ""),
        }

    def build(self) -> str:
        disk, _config = self.rootfs()
        return f"{self.reference}: {self.identity()}, root filesystem {disk}; {super().build()}"

    def __repr__(self) -> str:
        return f"<OciImage {self.reference}>"


def resolve_user(disk: Path, user: str) -> ResolvedUser:
    """``User`` of an image config ("name", "uid", "name:group", "uid:gid") made numeric.

    Resolved in the image's /etc/passwd and /etc/group, read from its ext4 with
    debugfs, by the rules of `users.resolve_user` (docker's); a name the image
    does not have is a `GuestBuildError` naming it.
    """

    from ..vmm.agent.users import UserNotFound  # lazy: the VMM is loaded only to run VMs
    from ..vmm.agent.users import resolve_user as resolve_users

    def table(path: str) -> bytes:
        done = subprocess.run(
            ["debugfs", "-R", f"cat {path}", str(disk)],
            capture_output=True,
            timeout=60,
            check=False,
        )
        return done.stdout

    try:
        return resolve_users(user, table("/etc/passwd"), table("/etc/group"))
    except UserNotFound as e:
        raise GuestBuildError(f"the image's User {user!r}: {e}") from None


def image_for_reference(text: str, *, disk_mib: int = DEFAULT_DISK_MIB) -> OciImage:
    """The `OciImage` a reference names (parsed and checked; nothing is pulled yet)."""
    reference = parse_image_reference(text)
    if isinstance(reference, ArchiveReference | LayoutReference):
        reference.check()
    return OciImage(reference, disk_mib=disk_mib)


__all__ = ["OciImage", "OciImageConfig", "RunDefaults", "image_for_reference", "resolve_user"]
