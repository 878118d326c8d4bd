"""The microguest build: cached by content, rebuilt on change, a proper ELF, clear errors.

These need gcc and ld but no KVM, hence `unit`. The Python mirrors of the
guest's constants are checked against the C headers here too, so a change on
one side only fails fast instead of confusing a VM test later.
"""

from __future__ import annotations

import re
import shutil
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pytest_supermachine.errors import GuestBuildError
from pytest_supermachine.guest import microguest
from pytest_supermachine.guest.microguest import (
    GuestMode,
    Mark,
    PanicCode,
    build,
    build_microguest,
)

pytestmark = [
    pytest.mark.unit,
    pytest.mark.skipif(
        shutil.which(build.CC) is None or shutil.which(build.LD) is None,
        reason=f"the microguest build needs {build.CC} and {build.LD} on PATH",
    ),
]

PT_LOAD = 1
PF_X = 1


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private cache dir, so tests neither see nor pollute the user's cache."""
    path = tmp_path / "cache"
    monkeypatch.setenv("SUPERMACHINE_CACHE_DIR", str(path))
    return path


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """A copy of the microguest sources the test may edit."""
    dst = tmp_path / "src"
    dst.mkdir()
    for path in build.source_files():
        shutil.copy2(path, dst / path.name)
    return dst


def test_second_build_is_cached(cache: Path, src: Path) -> None:
    elf = build_microguest(src)
    assert elf.is_relative_to(cache / "microguest")
    assert elf.parent.name == build.build_key(src)
    mtime = elf.stat().st_mtime_ns
    assert build_microguest(src) == elf
    assert elf.stat().st_mtime_ns == mtime
    leftovers = [p.name for p in (cache / "microguest").iterdir() if p.name.startswith(".build-")]
    assert leftovers == []


def test_copy_has_the_packaged_key(src: Path) -> None:
    # The key depends on names and bytes only, not on where the sources live.
    assert build.build_key(src) == build.build_key()
    assert re.fullmatch(r"[0-9a-f]{16}", build.build_key())


def test_changed_source_gives_new_key(cache: Path, src: Path) -> None:
    first = build_microguest(src)
    with (src / "main.c").open("a") as f:
        f.write("\n/* a change */\n")
    second = build_microguest(src)
    assert second != first
    assert first.is_file() and second.is_file()


def test_header_change_gives_new_key(src: Path) -> None:
    before = build.build_key(src)
    (src / "microguest.h").write_text((src / "microguest.h").read_text() + "\n")
    assert build.build_key(src) != before


def test_elf_is_x86_64_loaded_at_1mib(cache: Path, src: Path) -> None:
    data = build_microguest(src).read_bytes()
    assert data[:4] == b"\x7fELF"
    assert data[4] == 2, "ELFCLASS64"
    assert data[5] == 1, "little endian"
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    assert (e_type, e_machine) == (2, 62), "ET_EXEC for EM_X86_64"
    (e_entry, e_phoff) = struct.unpack_from("<QQ", data, 24)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 54)
    loads = []
    for i in range(e_phnum):
        p_type, p_flags, _off, p_vaddr, p_paddr, _filesz, p_memsz = struct.unpack_from(
            "<IIQQQQQ", data, e_phoff + i * e_phentsize
        )
        if p_type == PT_LOAD:
            loads.append((p_flags, p_vaddr, p_paddr, p_memsz))
    assert loads, "no PT_LOAD segment"
    flags, vaddr, paddr, memsz = loads[0]
    assert vaddr == paddr >= 0x100000, "identity mapped, at or above 1 MiB"
    assert vaddr <= e_entry < vaddr + memsz
    assert flags & PF_X
    # The AP trampoline page and the boot info must stay below the image.
    assert min(v for _f, v, _p, _m in loads) > microguest.TRAMPOLINE_ADDR


def test_compile_error_raises_with_compiler_message(cache: Path, src: Path) -> None:
    with (src / "main.c").open("a") as f:
        f.write("\nint broken(void) { return undeclared_thing_xyz; }\n")
    with pytest.raises(GuestBuildError) as info:
        build_microguest(src)
    message = str(info.value)
    assert "undeclared_thing_xyz" in message
    assert "main.c" in message
    assert "error" in message
    # Nothing half-built is left to be mistaken for a cache hit.
    key = build.build_key(src)
    assert not (cache / "microguest" / key / build.ELF_NAME).exists()
    assert not [p for p in (cache / "microguest").iterdir() if p.name.startswith(".build-")]


def test_missing_compiler_is_a_build_error(
    cache: Path, src: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(build, "CC", "no-such-compiler-xyz")
    with pytest.raises(GuestBuildError, match="no-such-compiler-xyz"):
        build_microguest(src)


def test_parallel_builders_build_once(
    cache: Path, src: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Stand-in for xdist workers: the file lock serialises them, the late ones
    # find the finished ELF instead of compiling again.
    real = build._compile_and_link
    calls = 0
    lock = threading.Lock()

    def counting(source: Path, out: Path) -> None:
        nonlocal calls
        with lock:
            calls += 1
        real(source, out)

    monkeypatch.setattr(build, "_compile_and_link", counting)
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda _: build_microguest(src), range(4)))
    assert len(set(paths)) == 1
    assert calls == 1


def _c_defines(text: str, prefix: str) -> dict[str, int]:
    return {
        m[1]: int(m[2], 0)
        for m in re.finditer(rf"^#define {prefix}(\w+) (0x[0-9A-Fa-f]+|\d+)\b", text, re.M)
    }


def test_guest_mode_mirrors_bootinfo_enum() -> None:
    text = (build.SOURCE_DIR / "bootinfo.h").read_text()
    enum = {m[1]: int(m[2]) for m in re.finditer(r"SM_MODE_(\w+) = (\d+)", text)}
    assert enum == {m.name: m.value for m in GuestMode}


def test_constants_mirror_microguest_h() -> None:
    text = (build.SOURCE_DIR / "microguest.h").read_text()
    assert _c_defines(text, "MG_PANIC_") == {c.name: c.value for c in PanicCode}
    assert _c_defines(text, "MG_MARK_") == {m.name: m.value for m in Mark}
    plain = _c_defines(text, "MG_")
    assert plain["TRAMPOLINE_ADDR"] == microguest.TRAMPOLINE_ADDR
    assert plain["MAX_CPUS"] == microguest.MAX_CPUS
    assert plain["COUNT_PRINT_SHIFT"] == microguest.COUNT_PRINT_SHIFT
