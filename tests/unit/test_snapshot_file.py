"""Snapshot file layer: round trips, sparse RAM, diffs and chains, atomic saves, refusals.

No KVM: guest memory is bytearrays or anonymous mappings, vCPU state is opaque bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import random
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_supermachine.errors import SupermachineError
from pytest_supermachine.vmm.hostfacts import check_host, check_snapshot, host_cpu_facts
from pytest_supermachine.vmm.layout import PAGE_SIZE, RamRegion
from pytest_supermachine.vmm.memory import GuestMemory
from pytest_supermachine.vmm.snapshot import (
    FORMAT_VERSION,
    HEADER_SIZE,
    MAGIC,
    NotASnapshotError,
    SnapshotChain,
    SnapshotCorrupt,
    SnapshotError,
    SnapshotFile,
    SnapshotHostMismatch,
    SnapshotParentError,
    SnapshotRef,
    SnapshotTruncated,
    SnapshotVersionError,
    flatten,
    peek_digest,
    write_snapshot,
)
from pytest_supermachine.vmm.snapshot import reader as snapshot_reader
from pytest_supermachine.vmm.snapshot import writer as snapshot_writer

pytestmark = pytest.mark.unit

P = PAGE_SIZE
REGIONS = [RamRegion(0, 32 * P), RamRegion(0x100000, 16 * P)]
FACTS = {
    "cpu_vendor": "GenuineIntel",
    "cpu_family": 6,
    "cpu_model": 85,
    "cpu_stepping": 7,
    "kvm_api_version": 12,
    "pvm": True,
    "page_size": 4096,
}


def small_memory(seed: int = 0, fill: float = 0.5) -> GuestMemory:
    """Two regions; roughly `fill` of the pages hold random bytes, the rest are zero."""
    rng = random.Random(seed)
    buffers = []
    for region in REGIONS:
        buf = bytearray(region.size)
        for page in range(region.size // P):
            if rng.random() < fill:
                buf[page * P : (page + 1) * P] = rng.randbytes(P)
        buffers.append(buf)
    return GuestMemory(REGIONS, buffers)


def ram_bytes(memory: GuestMemory) -> list[bytes]:
    return [memory.read(r.gpa, r.size) for r in memory.regions]


@contextlib.contextmanager
def mapped(source: SnapshotFile | SnapshotChain) -> Iterator[GuestMemory]:
    """RAM of a snapshot or chain, unmapped afterwards."""
    memory = source.map_ram()
    try:
        yield memory
    finally:
        memory.close()


def write_page(memory: GuestMemory, region: int, page: int, data: bytes) -> None:
    memory.write(memory.regions[region].gpa + page * P, data)


# ------------------------------------------------------------------------ round trips


def test_full_round_trip_keeps_sections_facts_layout_and_ram(tmp_path: Path) -> None:
    memory = small_memory()
    sections = {
        "vcpu/0": b"\x01" * 4096,
        "irqchip/pic_master": b"pic",
        "empty": b"",
        "clock": b"\0" * 48,
    }
    ref = write_snapshot(tmp_path / "base.snap", sections=sections, host_facts=FACTS, memory=memory)
    with SnapshotFile.open(tmp_path / "base.snap") as snap:
        assert snap.digest == ref.digest == peek_digest(tmp_path / "base.snap")
        assert not snap.is_diff and snap.parent_digest is None
        assert dict(snap.sections) == sections
        assert snap.host_facts == FACTS
        assert snap.ram_regions == tuple(REGIONS)
        assert snap.format_version == FORMAT_VERSION
        assert all(o is not None and o % P == 0 for o in snap.region_file_offsets)
        restored = snap.map_ram()
        try:
            assert ram_bytes(restored) == ram_bytes(memory)
            assert all(isinstance(restored.buffer(i), mmap.mmap) for i in range(len(REGIONS)))
            restored.write(0, b"private")  # MAP_PRIVATE: writable, never reaches the file
        finally:
            restored.close()
    with SnapshotFile.open(tmp_path / "base.snap") as snap, mapped(snap) as again:
        assert ram_bytes(again) == ram_bytes(memory)


def test_full_snapshot_stores_only_nonzero_pages_in_place(tmp_path: Path) -> None:
    memory = small_memory(fill=0.3)
    write_snapshot(tmp_path / "s", sections={}, host_facts={}, memory=memory)
    with SnapshotFile.open(tmp_path / "s") as snap:
        stored = {(e.region, e.first_page + k) for e in snap.extents for k in range(e.page_count)}
        for i, region in enumerate(REGIONS):
            for page in range(region.size // P):
                nonzero = any(memory.read(region.gpa + page * P, P))
                assert ((i, page) in stored) == nonzero
                source = snap.page_source(i, page)
                assert source is not None
                if nonzero:
                    assert source.file_offset == snap.region_file_offsets[i] + page * P
                else:
                    assert source.file_offset is None


def test_sparse_on_disk_256_mib_with_1_mib_touched(tmp_path: Path) -> None:
    memory = GuestMemory.anonymous(256 << 20)
    try:
        memory.write(0x200000, os.urandom(1 << 20))
        write_snapshot(
            tmp_path / "big.snap", sections={}, host_facts={}, memory=memory, durable=False
        )
        st = os.stat(tmp_path / "big.snap")
        assert st.st_size >= 256 << 20  # the apparent size covers all of RAM (mappable)
        assert st.st_blocks * 512 < (1 << 20) + (256 << 10), "zero pages must be holes"
        with SnapshotFile.open(tmp_path / "big.snap") as snap, mapped(snap) as restored:
            assert restored.read(0x200000, 1 << 20) == memory.read(0x200000, 1 << 20)
            assert restored.read(0, 4096) == bytes(4096)
    finally:
        memory.close()


def test_diff_round_trip_stores_only_changed_pages(tmp_path: Path) -> None:
    memory = small_memory()
    base = write_snapshot(
        tmp_path / "base", sections={"vcpu/0": b"a"}, host_facts=FACTS, memory=memory
    )
    write_page(memory, 0, 3, b"\x11" * P)
    write_page(memory, 0, 4, b"\x22" * P)
    write_page(memory, 1, 15, b"\x33" * P)
    write_page(memory, 0, 9, bytes(P))  # a page that became zero
    pages = [{3, 4, 9}, [15]]
    ref = write_snapshot(
        tmp_path / "diff",
        sections={"vcpu/0": b"b"},
        host_facts=FACTS,
        memory=memory,
        pages=pages,
        parent=base,
    )
    with SnapshotFile.open(tmp_path / "diff") as diff:
        assert diff.is_diff and diff.parent_digest == base.digest and diff.digest == ref.digest
        assert diff.stored_pages == 3
        assert diff.page_source(0, 9) is not None and diff.page_source(0, 9).file_offset is None
        assert diff.page_source(0, 5) is None  # unchanged: lives in the parent
        assert os.stat(tmp_path / "diff").st_size <= 4 * P + 3 * P
        with pytest.raises(SnapshotError, match="is a diff"):
            diff.map_ram()
    with SnapshotChain.open(tmp_path / "diff") as chain:
        assert chain.depth == 2 and dict(chain.sections) == {"vcpu/0": b"b"}
        with mapped(chain) as restored:
            assert ram_bytes(restored) == ram_bytes(memory)


def test_diff_pages_may_be_given_as_kvm_dirty_bitmaps(tmp_path: Path) -> None:
    memory = small_memory()
    base = write_snapshot(tmp_path / "base", sections={}, host_facts={}, memory=memory)
    for page in (0, 7, 8, 31):
        write_page(memory, 0, page, bytes([page + 1]) * P)
    bitmap = bytearray(8)  # u64-aligned like KVM_GET_DIRTY_LOG
    for page in (0, 7, 8, 31):
        bitmap[page // 8] |= 1 << (page % 8)
    write_snapshot(
        tmp_path / "diff",
        sections={},
        host_facts={},
        memory=memory,
        pages=[bitmap, b""],
        parent=base,
    )
    with SnapshotChain.open(tmp_path / "diff") as chain, mapped(chain) as restored:
        assert ram_bytes(restored) == ram_bytes(memory)
        assert sorted(chain.diff_page_sources()[0]) == [0, 7, 8, 31]


def test_chain_of_depth_five_gives_newest_bytes_and_flatten_equals_it(tmp_path: Path) -> None:
    rng = random.Random(7)
    memory = small_memory(seed=1)
    ref = write_snapshot(tmp_path / "l0", sections={"layer": b"0"}, host_facts=FACTS, memory=memory)
    expected_owner: dict[tuple[int, int], int] = {}
    for layer in range(1, 5):
        changed: list[set[int]] = [set(), set()]
        for _ in range(12):
            region = rng.randrange(2)
            page = rng.randrange(REGIONS[region].size // P)
            data = bytes(P) if rng.random() < 0.2 else rng.randbytes(P)
            write_page(memory, region, page, data)
            changed[region].add(page)
            expected_owner[(region, page)] = layer
        # the next layer lives in a subdirectory: hints are relative to the child
        sub = tmp_path / f"d{layer}"
        sub.mkdir()
        ref = write_snapshot(
            sub / "layer.snap",
            sections={"layer": str(layer).encode()},
            host_facts=FACTS,
            memory=memory,
            pages=changed,
            parent=ref,
        )
        assert ref.path.parent == sub
    with SnapshotChain.open(ref.path) as chain:
        assert chain.depth == 5
        assert [f.sections["layer"] for f in chain.files] == [b"0", b"1", b"2", b"3", b"4"]
        for (region, page), layer in expected_owner.items():
            source = chain.page_source(REGIONS[region].gpa + page * P + 17)
            assert source.snapshot is chain.files[layer]
        untouched = next(
            (r, p)
            for r in range(2)
            for p in range(REGIONS[r].size // P)
            if (r, p) not in expected_owner
        )
        assert (
            chain.page_source(REGIONS[untouched[0]].gpa + untouched[1] * P).snapshot is chain.base
        )
        with mapped(chain) as restored:
            assert ram_bytes(restored) == ram_bytes(memory)
        assert chain.read_ram(REGIONS[1].gpa + 100, 3 * P) == memory.read(
            REGIONS[1].gpa + 100, 3 * P
        )

        flat = flatten(chain, tmp_path / "flat.snap")
    with SnapshotFile.open(flat.path) as flat_snap, mapped(flat_snap) as flat_memory:
        assert not flat_snap.is_diff
        assert dict(flat_snap.sections) == {"layer": b"4"}
        assert flat_snap.host_facts == FACTS
        assert ram_bytes(flat_memory) == ram_bytes(memory)


def test_overlay_after_madv_dontneed_resets_ram_in_place(tmp_path: Path) -> None:
    """The in-place reset path: discard private pages, re-apply the diffs, RAM equals the chain."""
    memory = small_memory()
    base = write_snapshot(tmp_path / "base", sections={}, host_facts={}, memory=memory)
    write_page(memory, 0, 5, b"\x55" * P)
    write_page(memory, 1, 2, bytes(P))
    write_snapshot(
        tmp_path / "diff", sections={}, host_facts={}, memory=memory, pages=[[5], [2]], parent=base
    )
    with SnapshotChain.open(tmp_path / "diff") as chain, mapped(chain) as vm_ram:
        dirty = [[0, 5, 6], [2, 3]]
        for region, pages in enumerate(dirty):
            for page in pages:
                write_page(vm_ram, region, page, b"\xee" * P)
        for region, pages in enumerate(dirty):
            for page in pages:
                vm_ram.buffer(region).madvise(mmap.MADV_DONTNEED, page * P, P)
        chain.overlay_diffs(vm_ram, dirty)
        assert ram_bytes(vm_ram) == ram_bytes(memory)


def test_moving_a_chain_directory_keeps_it_openable(tmp_path: Path) -> None:
    memory = small_memory()
    (tmp_path / "a").mkdir()
    base = write_snapshot(tmp_path / "a" / "base", sections={}, host_facts={}, memory=memory)
    write_page(memory, 0, 1, b"\x01" * P)
    write_snapshot(
        tmp_path / "a" / "diff",
        sections={},
        host_facts={},
        memory=memory,
        pages=[[1], []],
        parent=base,
    )
    shutil.move(tmp_path / "a", tmp_path / "b")
    with SnapshotChain.open(tmp_path / "b" / "diff") as chain:
        assert chain.base.path == tmp_path / "b" / "base"


# ------------------------------------------------------------------------ atomic save


def test_failed_save_leaves_no_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    memory = small_memory()
    calls = 0

    def failing_pwrite(fd: int, data: object, offset: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError(28, "No space left on device")
        real_pwrite(fd, data, offset)

    real_pwrite = snapshot_writer.pwrite_all
    monkeypatch.setattr(snapshot_writer, "pwrite_all", failing_pwrite)
    with pytest.raises(OSError, match="No space"):
        write_snapshot(tmp_path / "s.snap", sections={}, host_facts={}, memory=memory)
    assert calls == 2
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_the_previous_file_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    memory = small_memory()
    old = write_snapshot(tmp_path / "s.snap", sections={"v": b"old"}, host_facts={}, memory=memory)

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "ftruncate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_snapshot(tmp_path / "s.snap", sections={"v": b"new"}, host_facts={}, memory=memory)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["s.snap"]
    with SnapshotFile.open(tmp_path / "s.snap") as snap:
        assert snap.digest == old.digest and snap.sections["v"] == b"old"


def test_open_file_keeps_reading_the_old_inode_after_replace(tmp_path: Path) -> None:
    memory = small_memory()
    write_snapshot(tmp_path / "s", sections={"v": b"1"}, host_facts={}, memory=memory)
    with SnapshotFile.open(tmp_path / "s") as snap:
        expected = ram_bytes(memory)
        memory.write(0, b"\xff" * P)
        write_snapshot(tmp_path / "s", sections={"v": b"2"}, host_facts={}, memory=memory)
        with mapped(snap) as restored:
            assert ram_bytes(restored) == expected


# ------------------------------------------------------------------------ writer refusals


def test_writer_refuses_bad_arguments(tmp_path: Path) -> None:
    memory = small_memory()
    base = write_snapshot(tmp_path / "base", sections={}, host_facts={}, memory=memory)
    with pytest.raises(ValueError, match="section name"):
        write_snapshot(tmp_path / "x", sections={"has space": b""}, host_facts={}, memory=memory)
    with pytest.raises(ValueError, match="JSON"):
        write_snapshot(tmp_path / "x", sections={}, host_facts={"x": object()}, memory=memory)
    with pytest.raises(ValueError, match="outside region 1"):
        write_snapshot(
            tmp_path / "x", sections={}, host_facts={}, memory=memory, pages=[[], [16]], parent=base
        )
    with pytest.raises(ValueError, match="beyond"):
        write_snapshot(
            tmp_path / "x",
            sections={},
            host_facts={},
            memory=memory,
            pages=[b"", b"\0\0\1"],
            parent=base,
        )
    with pytest.raises(ValueError, match="both"):
        write_snapshot(tmp_path / "x", sections={}, host_facts={}, memory=memory, pages=[[], []])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def test_diff_against_a_rebuilt_or_different_parent_is_refused(tmp_path: Path) -> None:
    memory = small_memory()
    stale = write_snapshot(tmp_path / "base", sections={}, host_facts={}, memory=memory)
    write_snapshot(tmp_path / "base", sections={}, host_facts={}, memory=memory)  # rebuilt
    with pytest.raises(SnapshotParentError, match="rebuilt"):
        write_snapshot(
            tmp_path / "d", sections={}, host_facts={}, memory=memory, pages=[[], []], parent=stale
        )
    other = GuestMemory.from_bytearray(bytearray(8 * P))
    with pytest.raises(SnapshotParentError, match="RAM layout"):
        write_snapshot(
            tmp_path / "d",
            sections={},
            host_facts={},
            memory=other,
            pages=[[]],
            parent=SnapshotRef.of(tmp_path / "base"),
        )


# ------------------------------------------------------------------------ reader refusals


@pytest.fixture
def full_file(tmp_path: Path) -> Path:
    write_snapshot(
        tmp_path / "full.snap",
        sections={"vcpu/0": b"r" * 100},
        host_facts=FACTS,
        memory=small_memory(),
    )
    return tmp_path / "full.snap"


def resign(data: bytearray) -> bytearray:
    """Recompute the digest, as a buggy or malicious writer would: the checksum then passes."""
    length = struct.unpack_from("<Q", data, 40)[0]
    data[96:128] = hashlib.sha256(bytes(data[:96]) + bytes(data[128 : 128 + length])).digest()
    return data


def test_refuses_a_file_that_is_not_a_snapshot(tmp_path: Path) -> None:
    (tmp_path / "text").write_bytes(b"hello, this is not a snapshot at all" * 10)
    (tmp_path / "empty").write_bytes(b"")
    for name in ("text", "empty"):
        with pytest.raises(NotASnapshotError, match="not a supermachine snapshot"):
            SnapshotFile.open(tmp_path / name)
    with pytest.raises(NotASnapshotError, match="not a regular file"):
        SnapshotFile.open(tmp_path)
    with pytest.raises(SnapshotError, match="cannot open"):
        SnapshotFile.open(tmp_path / "missing")
    assert issubclass(SnapshotError, SupermachineError)


def test_refuses_unknown_version_and_flags(full_file: Path) -> None:
    data = bytearray(full_file.read_bytes())
    struct.pack_into("<I", data, 8, FORMAT_VERSION + 1)
    full_file.write_bytes(data)
    with pytest.raises(
        SnapshotVersionError, match=f"version {FORMAT_VERSION + 1}.*reads version {FORMAT_VERSION}"
    ):
        SnapshotFile.open(full_file)
    with pytest.raises(SnapshotVersionError):
        peek_digest(full_file)
    struct.pack_into("<I", data, 8, FORMAT_VERSION)
    struct.pack_into("<I", data, 16, 1 << 7)
    full_file.write_bytes(resign(data))
    with pytest.raises(SnapshotVersionError, match="features 0x80"):
        SnapshotFile.open(full_file)


def test_refuses_a_checksum_mismatch(full_file: Path) -> None:
    data = bytearray(full_file.read_bytes())
    data[HEADER_SIZE + 30] ^= 0x04
    full_file.write_bytes(data)
    with pytest.raises(SnapshotCorrupt, match="checksum"):
        SnapshotFile.open(full_file)


def test_refuses_truncation_and_trailing_bytes(full_file: Path) -> None:
    data = full_file.read_bytes()
    for cut, match in (
        (len(data) - 1, "truncated: it is"),
        (HEADER_SIZE + 10, "truncated or its header"),
        (60, "truncated"),
    ):
        full_file.write_bytes(data[:cut])
        with pytest.raises(SnapshotTruncated, match=match):
            SnapshotFile.open(full_file)
    full_file.write_bytes(data + b"\0")
    with pytest.raises(SnapshotCorrupt, match="unexpected bytes after"):
        SnapshotFile.open(full_file)


def test_refuses_a_lying_header_before_mapping_anything(
    full_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A correctly re-signed file whose region would end past EOF is refused in open()."""
    mapped = []
    monkeypatch.setattr(snapshot_reader, "map_file_private", lambda *a: mapped.append(a))
    data = bytearray(full_file.read_bytes())
    last_region_size_at = HEADER_SIZE + 4 + 24 + 8  # regions start after the u32 count
    struct.pack_into("<Q", data, last_region_size_at, 1 << 30)
    full_file.write_bytes(resign(data))
    with pytest.raises(SnapshotCorrupt, match="inconsistent metadata.*do not fill the RAM area"):
        SnapshotFile.open(full_file)
    assert mapped == []


def test_host_mismatch_names_every_difference() -> None:
    current = dict(FACTS, cpu_vendor="AuthenticAMD", cpu_model=1, cpu_stepping=1)
    with pytest.raises(SnapshotHostMismatch) as info:
        check_host(FACTS, current, snapshot="/x/base.snap")
    message = str(info.value)
    assert "snapshot /x/base.snap" in message
    assert "cpu_vendor: snapshot has 'GenuineIntel', this host has 'AuthenticAMD'" in message
    assert "cpu_model: snapshot has 85, this host has 1" in message
    assert "stepping" not in message  # informational only
    assert "rebuild it on this host" in message
    check_host(FACTS, dict(FACTS, cpu_stepping=9, cpu_model_name="other"))


def test_host_mismatch_on_guest_cpuid_the_host_cannot_offer() -> None:
    guest_cpuid = [
        [0x1, 0, 0x806F8, 0, (1 << 28) | (1 << 26) | (1 << 31) | (1 << 27), 1 << 9],
        [0x7, 0, 0, 1 << 5, 0, 0],
    ]
    recorded = dict(FACTS, guest_cpuid=guest_cpuid)
    supported_all = [[0x1, 0, 0, 0, (1 << 28) | (1 << 26), 0], [0x7, 0, 0, 1 << 5, 0, 0]]
    check_host(recorded, dict(FACTS, supported_cpuid=supported_all))  # dynamic bits ignored
    no_avx = [[0x1, 0, 0, 0, 1 << 26, 0]]
    with pytest.raises(SnapshotHostMismatch) as info:
        check_host(recorded, dict(FACTS, supported_cpuid=no_avx))
    assert "0x1.0 ecx: avx (bit 28)" in str(info.value)
    assert "0x7.0 ebx: avx2 (bit 5)" in str(info.value)
    with pytest.raises(ValueError, match="supported_cpuid"):
        check_host(recorded, FACTS)


def test_snapshot_check_host_uses_recorded_facts(full_file: Path) -> None:
    with SnapshotFile.open(full_file) as snap:
        check_snapshot([snap], FACTS)
        with pytest.raises(SnapshotHostMismatch, match="kvm_api_version"):
            check_snapshot([snap], dict(FACTS, kvm_api_version=13))


def test_host_cpu_facts_reads_cpuinfo(tmp_path: Path) -> None:
    (tmp_path / "cpuinfo").write_text(
        "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 85\n"
        "model name\t: Intel(R) Xeon(R)\nstepping\t: 7\n\nprocessor\t: 1\nmodel\t\t: 99\n"
    )
    facts = host_cpu_facts(tmp_path / "cpuinfo")
    assert facts == {
        "cpu_vendor": "GenuineIntel",
        "cpu_family": 6,
        "cpu_model": 85,
        "cpu_stepping": 7,
        "cpu_model_name": "Intel(R) Xeon(R)",
        "page_size": mmap.PAGESIZE,
    }
    assert "page_size" in host_cpu_facts()


def test_refuses_a_missing_parent(tmp_path: Path) -> None:
    memory = small_memory()
    base = write_snapshot(tmp_path / "base", sections={}, host_facts={}, memory=memory)
    write_snapshot(
        tmp_path / "diff", sections={}, host_facts={}, memory=memory, pages=[[1], []], parent=base
    )
    (tmp_path / "base").unlink()
    with pytest.raises(SnapshotParentError, match="missing: looked at .*base"):
        SnapshotChain.open(tmp_path / "diff")


def test_refuses_a_parent_that_changed(tmp_path: Path) -> None:
    memory = small_memory()
    base = write_snapshot(tmp_path / "base", sections={}, host_facts={}, memory=memory)
    write_snapshot(
        tmp_path / "diff", sections={}, host_facts={}, memory=memory, pages=[[1], []], parent=base
    )
    write_snapshot(
        tmp_path / "base", sections={}, host_facts={}, memory=memory
    )  # rebuilt, same content
    with pytest.raises(SnapshotParentError, match="changed since.*rebuild the diff"):
        SnapshotChain.open(tmp_path / "diff")


def test_refuses_a_corrupt_parent_and_a_too_deep_chain(tmp_path: Path) -> None:
    memory = small_memory()
    ref = write_snapshot(tmp_path / "s0", sections={}, host_facts={}, memory=memory)
    for i in range(1, 4):
        ref = write_snapshot(
            tmp_path / f"s{i}",
            sections={},
            host_facts={},
            memory=memory,
            pages=[[i], []],
            parent=ref,
        )
    with pytest.raises(SnapshotParentError, match="deeper than 3"):
        SnapshotChain.open(ref.path, max_depth=3)
    with SnapshotChain.open(ref.path, max_depth=4) as chain:
        assert chain.depth == 4
    data = bytearray((tmp_path / "s1").read_bytes())
    data[200] ^= 1
    (tmp_path / "s1").write_bytes(data)
    with pytest.raises(SnapshotParentError, match="s1 of diff snapshot .*s2 is unusable.*checksum"):
        SnapshotChain.open(ref.path)


def test_section_lookup_names_missing_sections(full_file: Path) -> None:
    with SnapshotFile.open(full_file) as snap:
        assert snap.section("vcpu/0") == b"r" * 100
        with pytest.raises(SnapshotCorrupt, match="no section 'pit'"):
            snap.section("pit")


def test_header_constants_match_the_documented_layout() -> None:
    assert MAGIC == b"SMSNAP\x1a\n" and len(MAGIC) == 8
    assert HEADER_SIZE == 128
