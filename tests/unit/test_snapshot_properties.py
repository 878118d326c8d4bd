"""Property tests of snapshot parsing: hostile files give SnapshotError, nothing else.

What is promised (snapshot.py): opening and using any file -- random bytes, a valid
snapshot truncated anywhere, any single bit flipped in header or metadata, and even a
file whose lies are re-signed with a correct checksum -- raises only `SnapshotError`
subclasses, never another exception, never a crash, and never maps or reads past the
end of the file (the guards below turn such an access into a test failure before it
could become a SIGBUS). Valid snapshots round-trip exactly.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_supermachine.vmm.layout import PAGE_SIZE, RamRegion
from pytest_supermachine.vmm.memory import GuestMemory
from pytest_supermachine.vmm.snapshot import (
    FORMAT_VERSION,
    HEADER_SIZE,
    MAGIC,
    SnapshotChain,
    SnapshotError,
    SnapshotFile,
    flatten,
    write_snapshot,
)
from pytest_supermachine.vmm.snapshot import reader as snapshot_reader

pytestmark = pytest.mark.unit

P = PAGE_SIZE
FAST = settings(max_examples=80, deadline=None)
REGIONS = [RamRegion(0, 24 * P), RamRegion(0x100000, 8 * P)]
FACTS = {"cpu_vendor": "GenuineIntel", "cpu_model": 85, "guest_cpuid": [[1, 0, 0, 0, 1, 2]]}


# --------------------------------------------------------------------------- sample files


def _memory(seed: int) -> GuestMemory:
    rng = random.Random(seed)
    buffers = []
    for region in REGIONS:
        buf = bytearray(region.size)
        for page in range(region.size // P):
            if rng.random() < 0.5:
                buf[page * P : (page + 1) * P] = rng.randbytes(P)
        buffers.append(buf)
    return GuestMemory(REGIONS, buffers)


class Samples:
    """One full snapshot and one diff on top of it, in a directory that lives for the module."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        memory = _memory(1)
        sections = {"vcpu/0": bytes(range(256)), "pit": b"\x01\x02", "empty": b""}
        base = write_snapshot(
            directory / "base.snap",
            sections=sections,
            host_facts=FACTS,
            memory=memory,
            durable=False,
        )
        memory.write(3 * P, b"\xaa" * 2 * P)
        memory.write(7 * P, bytes(P))
        memory.write(0x100000 + 7 * P, b"\xbb" * P)
        write_snapshot(
            directory / "diff.snap",
            sections={"vcpu/0": b"x"},
            host_facts=FACTS,
            memory=memory,
            pages=[[3, 4, 7], [7]],
            parent=base,
            durable=False,
        )
        self.full = (directory / "base.snap").read_bytes()
        self.diff = (directory / "diff.snap").read_bytes()
        self.work = directory / "work.snap"  # same directory: the diff's parent hint resolves

    def write(self, data: bytes | bytearray) -> Path:
        """Overwrite the work file in place (no O_TRUNC: ext4 would flush on every rewrite)."""
        fd = os.open(self.work, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, data, 0)
            os.ftruncate(fd, len(data))
        finally:
            os.close(fd)
        return self.work


@pytest.fixture(scope="module")
def samples() -> Iterator[Samples]:
    with tempfile.TemporaryDirectory() as directory:
        yield Samples(Path(directory))


def _u(data: bytes, offset: int, width: int) -> int:
    return int.from_bytes(data[offset : offset + width], "little")


def metadata_end(data: bytes) -> int:
    return HEADER_SIZE + _u(data, 40, 8)


def ram_offset(data: bytes) -> int:
    return _u(data, 48, 8)


def resign(data: bytearray) -> bytearray:
    """Recompute the digest the way a lying writer would, so the checksum passes."""
    length = min(_u(data, 40, 8), len(data))
    data[96:128] = hashlib.sha256(
        bytes(data[:96]) + bytes(data[HEADER_SIZE : HEADER_SIZE + length])
    ).digest()
    return data


def integer_fields(data: bytes) -> list[tuple[int, int]]:
    """(offset, width) of every integer field of header and metadata, walked per the format doc."""
    fields = [(8, 4), (12, 4), (16, 4), (20, 4), (24, 8), (32, 8), (40, 8), (48, 8), (56, 8)]
    pos = HEADER_SIZE

    def field(width: int) -> int:
        nonlocal pos
        fields.append((pos, width))
        pos += width
        return _u(data, pos - width, width)

    def skip(length: int) -> None:
        nonlocal pos
        pos += length

    for _ in range(field(4)):  # regions: gpa, size, file_offset
        field(8), field(8), field(8)
    for _ in range(field(4)):  # sections: name length, name, data length, data
        skip(field(2))
        skip(field(8))
    skip(field(4))  # host facts
    for _ in range(field(2)):  # parent hints
        skip(field(4))
    skip(16)  # snapshot id
    field(8)  # created
    for _ in range(field(8)):  # extents: region, kind, first page, count, file offset
        field(4), field(4), field(8), field(8), field(8)
    assert pos == metadata_end(data), (
        "the documented metadata layout must end exactly at metadata_length"
    )
    return fields


# --------------------------------------------------------------------------- the guard


@contextlib.contextmanager
def no_access_past_eof() -> Iterator[None]:
    """Fail the test (AssertionError, not SnapshotError) if validation let an out-of-file
    range through to an mmap or a read; the module's own last-line checks never see it."""
    real_map, real_read = snapshot_reader.map_file_private, snapshot_reader.read_scattered

    def checked_map(fd: int, offset: int, length: int, path: Path):  # type: ignore[no-untyped-def]
        assert offset >= 0 and length > 0 and offset + length <= os.fstat(fd).st_size, (
            "mmap past EOF"
        )
        return real_map(fd, offset, length, path)

    def checked_read(fd: int, reads: list, path: Path) -> None:  # type: ignore[type-arg]
        size = os.fstat(fd).st_size
        for offset, view in reads:
            assert offset >= 0 and offset + len(view) <= size, "read past EOF"
        real_read(fd, reads, path)

    snapshot_reader.map_file_private, snapshot_reader.read_scattered = checked_map, checked_read
    try:
        yield
    finally:
        snapshot_reader.map_file_private, snapshot_reader.read_scattered = real_map, real_read


def exercise(path: Path) -> bool:
    """Open `path` as a file and as a chain and touch every RAM byte; True if it was accepted.

    Anything but a SnapshotError escapes and fails the test.
    """
    with no_access_past_eof():
        try:
            with SnapshotFile.open(path) as snap:
                for i, region in enumerate(snap.ram_regions):
                    snap.page_source(i, region.size // P - 1)
            with SnapshotChain.open(path) as chain:
                memory = chain.map_ram()
                try:
                    for region in memory.regions:
                        hashlib.sha256(memory.view(region.gpa, region.size))  # touches every page
                finally:
                    memory.close()
                chain.read_ram(chain.ram_regions[-1].end - 10, 10)
        except SnapshotError:
            return False
    return True


def refused(path: Path) -> bool:
    with no_access_past_eof():
        try:
            SnapshotFile.open(path).close()
        except SnapshotError:
            return True
    return False


# --------------------------------------------------------------------------- properties


def test_samples_are_valid_and_walkable(samples: Samples) -> None:
    for data in (samples.full, samples.diff):
        assert exercise(samples.write(data))
        assert len(integer_fields(data)) > 20


@FAST
@given(st.binary(max_size=3000))
def test_random_bytes_are_refused(samples: Samples, data: bytes) -> None:
    assert refused(samples.write(data))


@FAST
@given(st.binary(max_size=3000), st.sampled_from(["full", "diff"]))
def test_random_bytes_behind_a_valid_header_prefix_are_refused(
    samples: Samples, tail: bytes, kind: str
) -> None:
    valid = samples.full if kind == "full" else samples.diff
    keep = HEADER_SIZE  # magic, version and every header field valid; metadata random
    assert refused(samples.write(valid[:keep] + tail))
    assert refused(samples.write(MAGIC + struct.pack("<I", FORMAT_VERSION) + tail))


@pytest.mark.parametrize("kind", ["full", "diff"])
def test_every_truncation_up_to_the_ram_and_at_every_extent_is_refused(
    samples: Samples, kind: str
) -> None:
    data = samples.full if kind == "full" else samples.diff
    cuts = set(range(ram_offset(data) + 1))
    with SnapshotFile.open(samples.write(data)) as snap:
        for e in snap.extents:
            if e.file_offset is not None:
                for edge in (e.file_offset, e.file_offset + e.page_count * P):
                    cuts |= {edge - 1, edge, edge + 1}
    path = samples.write(data)
    for cut in sorted((c for c in cuts if 0 <= c < len(data)), reverse=True):
        os.truncate(path, cut)  # only ever shrinks: cheap
        assert refused(path), f"truncation to {cut} bytes was accepted"


@FAST
@given(st.data())
def test_truncation_at_random_offsets_is_refused(samples: Samples, data: st.DataObject) -> None:
    valid = data.draw(st.sampled_from([samples.full, samples.diff]))
    cut = data.draw(st.integers(0, len(valid) - 1))
    assert refused(samples.write(valid[:cut]))


@pytest.mark.parametrize("kind", ["full", "diff"])
def test_every_single_bit_flip_in_header_and_metadata_is_refused(
    samples: Samples, kind: str
) -> None:
    data = samples.full if kind == "full" else samples.diff
    path = samples.write(data)
    fd = os.open(path, os.O_RDWR)
    try:
        for offset in range(metadata_end(data)):
            for bit in range(8):
                os.pwrite(fd, bytes([data[offset] ^ (1 << bit)]), offset)
                assert refused(path), f"flip of bit {bit} of byte {offset} was accepted"
            os.pwrite(fd, data[offset : offset + 1], offset)
    finally:
        os.close(fd)


@FAST
@given(st.data())
def test_bit_flips_in_the_padding_before_ram_are_refused(
    samples: Samples, data: st.DataObject
) -> None:
    valid = data.draw(st.sampled_from([samples.full, samples.diff]))
    offset = data.draw(st.integers(metadata_end(valid), ram_offset(valid) - 1))
    mutated = bytearray(valid)
    mutated[offset] ^= 1 << data.draw(st.integers(0, 7))
    assert refused(samples.write(mutated))


INTERESTING = [
    0,
    1,
    2,
    P - 1,
    P,
    P + 1,
    0x7FFF_FFFF,
    0xFFFF_FFFF,
    1 << 32,
    1 << 40,
    1 << 52,
    (1 << 63),
    (1 << 64) - 1,
]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_resigned_lies_in_any_integer_field_are_refused_or_harmless(
    samples: Samples, data: st.DataObject
) -> None:
    """With a correct checksum the only defence is validation: it must hold for every field."""
    valid = data.draw(st.sampled_from([samples.full, samples.diff]))
    offset, width = data.draw(st.sampled_from(integer_fields(valid)))
    original = _u(valid, offset, width)
    candidates = [
        *INTERESTING,
        len(valid),
        ram_offset(valid),
        original + 1,
        original - 1,
        original + P,
        original - P,
    ]
    value = data.draw(st.sampled_from(candidates) | st.integers(0, (1 << (8 * width)) - 1)) % (
        1 << (8 * width)
    )
    mutated = bytearray(valid)
    mutated[offset : offset + width] = value.to_bytes(width, "little")
    exercise(samples.write(resign(mutated)))


@FAST
@given(st.data())
def test_resigned_random_overwrites_are_refused_or_harmless(
    samples: Samples, data: st.DataObject
) -> None:
    valid = data.draw(st.sampled_from([samples.full, samples.diff]))
    offset = data.draw(st.integers(0, metadata_end(valid) - 1).filter(lambda o: not 96 <= o < 128))
    patch = data.draw(st.binary(min_size=1, max_size=8))
    mutated = bytearray(valid)
    mutated[offset : offset + len(patch)] = patch
    exercise(samples.write(resign(mutated[: len(valid)])))


@FAST
@given(st.data())
def test_resigned_json_and_names_are_refused_or_harmless(
    samples: Samples, data: st.DataObject
) -> None:
    """Hostile host facts (deep nesting, bad UTF-8) and section names inside a valid checksum."""
    facts = data.draw(
        st.sampled_from(
            [b"[" * 100_000, b'{"a":' * 5000, b"\xff\xfe", b"null", b"[]", b'{"a":NaN}', b"{}"]
        )
        | st.binary(max_size=40)
    )
    name = data.draw(
        st.sampled_from([b"", b"a b", b"\xff", b"ok", b"\x00", b"x" * 300]) | st.binary(max_size=8)
    )
    sections = (
        struct.pack("<I", 1) + struct.pack("<H", len(name) % 65536) + name + struct.pack("<Q", 0)
    )
    regions = struct.pack("<I", 1) + struct.pack("<QQQ", 0, P, 4096 * 2)
    tail = struct.pack("<H", 0) + bytes(16) + struct.pack("<QQ", 0, 0)
    metadata = regions + sections + struct.pack("<I", len(facts)) + facts + tail
    ram = _align_up(HEADER_SIZE + len(metadata))
    regions = struct.pack("<I", 1) + struct.pack("<QQQ", 0, P, ram)
    metadata = regions + sections + struct.pack("<I", len(facts)) + facts + tail
    header = struct.pack(
        "<8sIIIIQQQQQ32s32s",
        MAGIC,
        FORMAT_VERSION,
        HEADER_SIZE,
        0,
        P,
        ram + P,
        HEADER_SIZE,
        len(metadata),
        ram,
        P,
        bytes(32),
        bytes(32),
    )
    body = bytearray(header + metadata)
    body += bytes(ram + P - len(body))
    exercise(samples.write(resign(body)))


def _align_up(value: int) -> int:
    return (value + P - 1) // P * P


# --------------------------------------------------------------------------- round trips


@st.composite
def layouts(draw: st.DrawFn) -> list[RamRegion]:
    regions, gpa = [], 0
    for _ in range(draw(st.integers(1, 3))):
        gpa += draw(st.integers(0, 4)) * P
        size = draw(st.integers(1, 12)) * P
        regions.append(RamRegion(gpa, size))
        gpa += size
    return regions


def _page(kind: bytes, rng: random.Random) -> bytes:
    if kind == b"zero":
        return bytes(P)
    if kind == b"fill":
        return rng.randbytes(P)
    page = bytearray(P)
    page[rng.randrange(P)] = rng.randrange(1, 256)
    return bytes(page)


@settings(max_examples=20, deadline=None)
@given(
    layouts(),
    st.dictionaries(
        st.from_regex(r"[!-~]{1,20}", fullmatch=True), st.binary(max_size=64), max_size=5
    ),
    st.integers(0, 2**32),
    st.integers(1, 4),
)
def test_random_chains_round_trip_and_flatten(
    samples: Samples,
    regions: list[RamRegion],
    sections: dict[str, bytes],
    seed: int,
    depth: int,
) -> None:
    rng = random.Random(seed)
    directory = Path(tempfile.mkdtemp(dir=samples.dir))  # fresh names: no rename over old files
    memory = GuestMemory(regions, [bytearray(r.size) for r in regions])
    for region in regions:
        for page in range(region.size // P):
            memory.write(
                region.gpa + page * P, _page(rng.choice([b"zero", b"fill", b"partial"]), rng)
            )
    ref = write_snapshot(
        directory / "0", sections=sections, host_facts={"n": 0}, memory=memory, durable=False
    )
    for layer in range(1, depth):
        changed: list[set[int]] = [set() for _ in regions]
        for _ in range(rng.randrange(6)):
            i = rng.randrange(len(regions))
            page = rng.randrange(regions[i].size // P)
            memory.write(
                regions[i].gpa + page * P, _page(rng.choice([b"zero", b"fill", b"partial"]), rng)
            )
            changed[i].add(page)
        ref = write_snapshot(
            directory / str(layer),
            sections={"layer": bytes([layer])},
            host_facts={"n": layer},
            memory=memory,
            pages=changed,
            parent=ref,
            durable=False,
        )
    expected = [memory.read(r.gpa, r.size) for r in regions]
    with SnapshotChain.open(ref.path) as chain:
        assert chain.depth == depth
        assert chain.host_facts == {"n": depth - 1}
        if depth == 1:
            assert dict(chain.sections) == sections
        restored = chain.map_ram()
        try:
            assert [restored.read(r.gpa, r.size) for r in regions] == expected
        finally:
            restored.close()
        flat = flatten(chain, directory / "flat", durable=False)
    with SnapshotFile.open(flat.path) as snap:
        restored = snap.map_ram()
        try:
            assert [restored.read(r.gpa, r.size) for r in regions] == expected
        finally:
            restored.close()
