"""One validation pass over a snapshot's state, before anything is built from it.

A snapshot file's checksum proves it is intact, not that it is honest: anyone can
write a file with a correct digest. So `validate_snapshot` checks every structural
field a restore uses against what this VMM and host can run, and refuses anything
else with `SnapshotInvalid` naming the file, the section and the problem:

* ``machine``: the format, the vCPU count (1..SM_MAX_VCPUS), the RAM size (the
  layout's MIN..MAX, whole MiB) and the RAM regions of the file, which must be
  exactly `layout.ram_regions` of that size (no region over the 32-bit MMIO hole);
  the device list: known kinds, known fields of the right types, a guest CID in
  3..0xFFFFFFFE, at most as many devices as the layout has slots;
* disk images: a snapshot never chooses a host path. A disk names its image by a
  plain file name *beside the snapshot file* and its SHA-256; the file must be a
  regular file with that digest (see `confine_disk`, and `publish_disk` for the
  writer's side);
* vCPU and VM sections: present for every vCPU, each exactly the size of the KVM
  struct it is loaded into (the XSAVE area the host's size: KVM reads that many
  bytes), the CPUID tables parseable, the serial state within its bounds;
* device sections: present and decodable; their contents (transport registers,
  queue state against the spec, the device and guest RAM) are checked by the devices
  themselves while restoring (`VirtioMmioTransport.restore_state`), before the guest
  runs, and reported the same way.

The RAM itself is not checksummed (hashing GiBs on every restore would cost more than
the restore): a guest restored from a crafted RAM image runs whatever it contains,
inside the VM, which is what any guest may do.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import threading
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import DeviceLayoutError
from . import layout, vmstate
from ._native import lib
from .cpuid import CpuidTable
from .devices.hub import BalloonSpec, DeviceSpec, DiskSpec, NetSpec, VsockSpec, device_section
from .devices.virtio.blk import ID_BYTES, SECTOR_SIZE
from .devices.virtio.vsock.device import MAX_GUEST_CID, MIN_GUEST_CID
from .kvm import Kvm, KvmError
from .snapshot import SnapshotChain, SnapshotInvalid

_HASH_CHUNK = 1 << 20
_MAX_DISK_BYTES = 1 << 44  # 16 TiB: what virtio-blk capacity (in sectors) may sensibly say


@dataclass(frozen=True)
class RestorePlan:
    """What a restore builds, every part of it validated."""

    vcpus: int
    mem_bytes: int
    devices: list[DeviceSpec]
    cpuids: list[CpuidTable]


def validate_snapshot(chain: SnapshotChain, kvm: Kvm) -> RestorePlan:
    """Check every structural section of `chain` (its leaf's state, its base's RAM layout).

    Raises `SnapshotInvalid` naming the leaf file for the first problem found.
    """
    try:
        sections = chain.sections
        vcpus, mem_bytes = _machine_shape(sections)
        _check_ram_layout(chain, mem_bytes)
        devices = [
            _device_spec(entry, index, chain.leaf.path)
            for index, entry in enumerate(_device_entries(sections))
        ]
        if devices:
            try:
                layout.device_slots(len(devices))
            except DeviceLayoutError as e:
                raise SnapshotInvalid("machine", str(e)) from None
        cpuids = _cpuids(sections, vcpus)
        vmstate.check_sections(sections, vcpus, xsave_size=_xsave_size(kvm))
        for index, spec in enumerate(devices):
            name = device_section(index, spec)
            if not any(name in f.sections for f in chain.files):
                raise SnapshotInvalid(name, "the section is missing")
    except SnapshotInvalid as e:
        raise e.in_file(chain.leaf.path) from None
    return RestorePlan(vcpus, mem_bytes, devices, cpuids)


def _xsave_size(kvm: Kvm) -> int:
    return max(kvm.check_extension(lib.KVM_CAP_XSAVE2) or 4096, 4096)


def _machine_shape(sections: Mapping[str, bytes]) -> tuple[int, int]:
    meta = vmstate.machine_meta(sections)
    vcpus, mem_bytes = meta.get("vcpus"), meta.get("mem_bytes")
    if type(vcpus) is not int or not 1 <= vcpus <= lib.SM_MAX_VCPUS:
        raise SnapshotInvalid("machine", f"vcpus={vcpus!r} is not 1..{lib.SM_MAX_VCPUS}")
    low, high = layout.MIN_MEM_MIB * layout.MiB, layout.MAX_MEM_MIB * layout.MiB
    if type(mem_bytes) is not int or not low <= mem_bytes <= high or mem_bytes % layout.MiB:
        raise SnapshotInvalid(
            "machine", f"mem_bytes={mem_bytes!r} is not whole MiB in {low}..{high}"
        )
    return vcpus, mem_bytes


def _check_ram_layout(chain: SnapshotChain, mem_bytes: int) -> None:
    expected = [(r.gpa, r.size) for r in layout.ram_regions(mem_bytes)]
    actual = [(r.gpa, r.size) for r in chain.ram_regions]
    if actual != expected:
        shown = ", ".join(f"[{g:#x}+{s:#x}]" for g, s in actual)
        want = ", ".join(f"[{g:#x}+{s:#x}]" for g, s in expected)
        raise SnapshotInvalid(
            "machine",
            f"RAM regions {shown} are not this VMM's layout of {mem_bytes} bytes ({want}); "
            "RAM must not overlap the 32-bit MMIO hole",
        )


def _device_entries(sections: Mapping[str, bytes]) -> list[dict[str, Any]]:
    devices = vmstate.machine_meta(sections).get("devices", [])
    if not isinstance(devices, list) or not all(isinstance(d, dict) for d in devices):
        raise SnapshotInvalid("machine", "the device list is not a list of objects")
    return devices


_SPEC_TYPES: dict[str, tuple[type, ...]] = {
    "guest_cid": (int,),
    "path": (str, type(None)),
    "size": (int, type(None)),
    "read_only": (bool,),
    "serial": (str,),
    "sha256": (str, type(None)),
    "reporting": (bool,),
    "deflate_on_oom": (bool,),
    "allow": (list, type(None)),
    "mac": (str,),
}


def _device_spec(entry: dict[str, Any], index: int, snapshot: Path) -> DeviceSpec:
    kind = entry.get("kind")
    cls: type[VsockSpec] | type[DiskSpec] | type[BalloonSpec] | type[NetSpec]
    if kind == "vsock":
        cls = VsockSpec
    elif kind == "balloon":
        cls = BalloonSpec
    elif kind == "disk":
        cls = DiskSpec
    elif kind == "net":
        cls = NetSpec
    else:
        raise SnapshotInvalid("machine", f"device {index} is of unknown kind {kind!r}")
    values = {k: v for k, v in entry.items() if k != "kind"}
    known = {f.name for f in fields(cls)}
    if set(values) - known:
        raise SnapshotInvalid(
            "machine", f"device {index} ({kind}) has unknown fields {sorted(set(values) - known)}"
        )
    for key, value in values.items():
        if type(value) not in _SPEC_TYPES[key]:
            raise SnapshotInvalid("machine", f"device {index} ({kind}): {key}={value!r}")
    if cls is NetSpec:
        return _net_spec(values, index)
    spec = cls(**values)
    if isinstance(spec, BalloonSpec):
        return spec
    if isinstance(spec, VsockSpec):
        if not MIN_GUEST_CID <= spec.guest_cid <= MAX_GUEST_CID:
            raise SnapshotInvalid(
                "machine",
                f"device {index}: guest_cid={spec.guest_cid} is not "
                f"{MIN_GUEST_CID}..{MAX_GUEST_CID:#x}",
            )
        return spec
    if spec.size is not None and (not 0 <= spec.size <= _MAX_DISK_BYTES or spec.size % SECTOR_SIZE):
        raise SnapshotInvalid(
            "machine",
            f"device {index}: disk size={spec.size} is not a multiple of {SECTOR_SIZE} "
            f"in 0..{_MAX_DISK_BYTES}",
        )
    try:
        serial_bytes = len(spec.serial.encode())
    except UnicodeEncodeError:
        serial_bytes = ID_BYTES + 1
    if serial_bytes > ID_BYTES:
        raise SnapshotInvalid(
            "machine",
            f"device {index}: disk serial {spec.serial!r} is not UTF-8 of at most {ID_BYTES} bytes",
        )
    if spec.path is None:
        if spec.size is None:
            raise SnapshotInvalid("machine", f"device {index}: a blank disk without a size")
        return spec
    return confine_disk(spec, index, snapshot)


def _net_spec(values: dict[str, Any], index: int) -> NetSpec:
    """A NIC's spec from a snapshot: its allow-list parses and its MAC is a unicast address."""
    from .devices.virtio.net import EgressPolicy, EgressPolicyError
    from .devices.virtio.net.packets import mac_bytes

    allow = values.get("allow")
    try:
        if allow is not None:
            EgressPolicy.from_setting(allow)
        mac = values.get("mac", NetSpec.mac)
        if mac_bytes(mac)[0] & 1:
            raise ValueError(f"MAC {mac} is a multicast address")
    except (EgressPolicyError, ValueError) as e:
        raise SnapshotInvalid("machine", f"device {index} (net): {e}") from None
    return NetSpec(allow=None if allow is None else tuple(allow), mac=mac)


def confine_disk(spec: DiskSpec, index: int, snapshot: Path) -> DiskSpec:
    """`spec` with its image resolved beside `snapshot`, its digest checked.

    A snapshot names a disk image by a plain file name and a SHA-256; only a regular
    file of that name in the snapshot's own directory, with that content, is used.
    Paths, names with a directory part or a leading dot, symlinks, devices and files
    whose content changed are refused: a snapshot file must never pick a host file.
    """
    name, digest = spec.path, spec.sha256
    assert name is not None
    if digest is None or len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
        raise SnapshotInvalid(
            "machine", f"device {index}: disk image {name!r} has no SHA-256 recorded"
        )
    if os.sep in name or name.startswith(".") or not name or len(name.encode()) > 255:
        raise SnapshotInvalid(
            "machine",
            f"device {index}: disk image {name!r} is not a plain file name; a snapshot "
            "refers only to images stored beside it",
        )
    path = snapshot.parent / name
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode):
            raise SnapshotInvalid(
                "machine", f"device {index}: disk image {path} is not a regular file"
            )
        actual = _file_sha256(path)
    except OSError as e:
        raise SnapshotInvalid(
            "machine",
            f"device {index}: disk image {path} cannot be read ({e.strerror}); keep the "
            "images a snapshot was written with beside it",
        ) from None
    if actual != digest:
        raise SnapshotInvalid(
            "machine",
            f"device {index}: disk image {path} has SHA-256 {actual[:16]}…, the snapshot "
            f"was taken with {digest[:16]}…: the image changed since",
        )
    return DiskSpec(
        path=str(path),
        size=spec.size,
        read_only=spec.read_only,
        serial=spec.serial,
        sha256=digest,
    )


def publish_disk(spec: DiskSpec, snapshot: Path) -> dict[str, Any]:
    """The machine-section entry for disk `spec` in a snapshot written to `snapshot`.

    A disk with an image gets it placed beside the snapshot under its content digest
    (a hard link when the file system allows, else a copy), and is recorded by that
    name and digest, so a restore finds it only there (`confine_disk`).
    """
    entry: dict[str, Any] = {
        "kind": "disk",
        **{f.name: getattr(spec, f.name) for f in fields(spec)},
    }
    if spec.path is None:
        return entry
    digest = spec.sha256 or _file_sha256(Path(spec.path))
    name = f"{digest}.disk"
    target = snapshot.parent / name
    if not target.exists():
        temp = snapshot.parent / f".{name}.{os.getpid()}.tmp"
        try:
            os.link(spec.path, temp)
        except OSError:
            shutil.copyfile(spec.path, temp)
        os.replace(temp, target)
    entry.update(path=name, sha256=digest)
    return entry


#: Digests of disk images this process hashed, by what identifies a file's content version.
_DIGESTS: dict[tuple[int, ...], str] = {}
_DIGESTS_LOCK = threading.Lock()


def _file_sha256(path: Path) -> str:
    """SHA-256 of a disk image, hashed once per process per content version.

    A restore checks the disk image's digest every time, and an image is hundreds
    of MB (an OCI root filesystem): hashing it on every fresh restore cost up to a
    second. The memo is keyed by device, inode, size, mtime and ctime (ns): any
    write to the file, or a file put in its place, changes the key (ctime moves with
    every write and cannot be set back), so a changed image is always rehashed.
    """
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        with _DIGESTS_LOCK:
            known = _DIGESTS.get(key)
        if known is not None:
            return known
        h = hashlib.sha256()
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    with _DIGESTS_LOCK:
        if len(_DIGESTS) > 1024:  # a long-lived process with many images: start over
            _DIGESTS.clear()
        _DIGESTS[key] = digest
    return digest


def _cpuids(sections: Mapping[str, bytes], vcpus: int) -> list[CpuidTable]:
    tables = []
    for i in range(vcpus):
        name = f"vcpu/{i}/cpuid"
        data = sections.get(name)
        if data is None:
            raise SnapshotInvalid(name, "the section is missing")
        try:
            tables.append(CpuidTable.from_bytes(data))
        except KvmError as e:
            raise SnapshotInvalid(name, str(e)) from None
    return tables


__all__ = [
    "RestorePlan",
    "confine_disk",
    "publish_disk",
    "validate_snapshot",
]
