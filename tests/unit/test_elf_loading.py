"""Guest kernels are parsed and loaded through GuestMemory; malformed ones are refused."""

import struct

import pytest

from pytest_supermachine.errors import MachineError
from pytest_supermachine.vmm.boot import load_elf, parse_elf
from pytest_supermachine.vmm.memory import GuestMemory


def make_elf(path, *, paddr=0x100000, payload=b"\x90" * 16, memsz=None, machine=62):
    phoff = 64
    offset = 0x1000
    ehdr = struct.pack(
        "<16sHHIQQQIHHHHHH",
        b"\x7fELF\x02\x01\x01" + bytes(9),
        2,
        machine,
        1,
        paddr,
        phoff,
        0,
        0,
        64,
        56,
        1,
        64,
        0,
        0,
    )
    phdr = struct.pack(
        "<IIQQQQQQ",
        1,
        5,
        offset,
        paddr,
        paddr,
        len(payload),
        memsz if memsz is not None else len(payload) + 32,
        0x1000,
    )
    data = ehdr + phdr
    data += bytes(offset - len(data)) + payload
    path.write_bytes(data)
    return path


def test_segment_is_copied_and_bss_zeroed(tmp_path):
    mem = GuestMemory.from_bytearray(bytearray(b"\xff" * (2 << 20)))
    image = parse_elf(make_elf(tmp_path / "k"))
    load_elf(mem, image)
    assert mem.read(0x100000, 16) == b"\x90" * 16
    assert mem.read(0x100010, 32) == bytes(32)
    assert image.entry == 0x100000 and image.end == 0x100030


def test_segment_past_ram_is_refused_with_advice(tmp_path):
    mem = GuestMemory.from_bytearray(bytearray(1 << 20))
    image = parse_elf(make_elf(tmp_path / "k", paddr=0xFFF00, memsz=0x1000))
    with pytest.raises(MachineError, match="does not fit in guest RAM.*more memory"):
        load_elf(mem, image)


def test_non_elf_is_refused(tmp_path):
    (tmp_path / "k").write_bytes(b"MZ" + bytes(100))
    with pytest.raises(MachineError, match="no ELF magic"):
        parse_elf(tmp_path / "k")


def test_other_architectures_are_refused(tmp_path):
    with pytest.raises(MachineError, match="not x86-64"):
        parse_elf(make_elf(tmp_path / "k", machine=183))


def test_truncated_segment_is_refused(tmp_path):
    path = make_elf(tmp_path / "k")
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(MachineError, match="past the end of the file"):
        parse_elf(path)
