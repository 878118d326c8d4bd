"""Build the microguest ELF with the system gcc/ld, once per source content.

The ELF is cached under ``cache_dir()/microguest/<key>/microguest.elf`` where
the key hashes every source file and every flag, so an edit to any of them
builds a new entry and an unchanged tree never rebuilds. A file lock next to
the entry makes parallel pytest-xdist workers build it once; the ELF appears
by atomic rename, so a path that exists is always complete.
"""

from __future__ import annotations

from pathlib import Path

from ...cache import cached_artifact, content_key
from ...package_data import package_path
from .. import PROTOCOL_INCLUDE_DIR, run_build_step

#: The microguest's sources, package data (an installed wheel carries them).
SOURCE_DIR = package_path("pytest_supermachine.guest.microguest")
SOURCE_SUFFIXES = (".c", ".S", ".h", ".ld")
ELF_NAME = "microguest.elf"
LINKER_SCRIPT = "linker.ld"

CC = "gcc"
LD = "ld"
# Freestanding, no SSE/red zone (interrupts use the current stack at CPL0), baseline
# x86-64 and no CET (endbr64 is not known to KVM's instruction emulator, which runs
# all our CPL0 code under nested PVM), no loop-to-memset rewriting inside memset.
CFLAGS = (
    "-std=gnu11",
    "-ffreestanding",
    "-nostdlib",
    "-fno-pic",
    "-fno-pie",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-march=x86-64",
    "-mtune=generic",
    "-O2",
    "-fno-stack-protector",
    "-fcf-protection=none",
    "-fno-asynchronous-unwind-tables",
    "-fno-tree-loop-distribute-patterns",
    "-g",
    "-Wall",
    "-Wextra",
)
LDFLAGS = (
    "-nostdlib",
    "-static",
    "-z",
    "max-page-size=4096",
    "-z",
    "noexecstack",
    "--build-id=none",
)
BUILD_TIMEOUT_S = 120


def source_files(source_dir: Path = SOURCE_DIR) -> list[Path]:
    """Every file that goes into the build, in a stable order."""
    return sorted(p for p in source_dir.iterdir() if p.is_file() and p.suffix in SOURCE_SUFFIXES)


def build_key(source_dir: Path = SOURCE_DIR) -> str:
    """16 hex digits of sha256 over the tools, the flags and every source (name and bytes)."""
    parts: list[bytes | str] = [CC, LD, "\0".join(CFLAGS), "\0".join(LDFLAGS)]
    for path in [*source_files(source_dir), *source_files(PROTOCOL_INCLUDE_DIR)]:
        parts += [path.name, path.read_bytes()]
    return content_key(*parts)[:16]


def build_microguest(source_dir: Path | None = None) -> Path:
    """Return the path of the microguest ELF, compiling it on first use.

    `source_dir` defaults to this package; tests pass a copy to check keys and errors.
    Raises GuestBuildError with the compiler output when the build fails.
    """
    src = (source_dir or SOURCE_DIR).resolve()
    return cached_artifact(
        "microguest", build_key(src), ELF_NAME, lambda tmp: _compile_and_link(src, tmp)
    )


def _compile_and_link(src: Path, out: Path) -> None:
    units = [p for p in source_files(src) if p.suffix in (".c", ".S")]
    objects = [out / f"{p.stem}{p.suffix.replace('.', '_')}.o" for p in units]
    for unit, obj in zip(units, objects, strict=True):
        include = ["-I", str(src), "-I", str(PROTOCOL_INCLUDE_DIR)]
        _run([CC, *CFLAGS, *include, "-c", str(unit), "-o", str(obj)], out)
    _run(
        [
            LD,
            *LDFLAGS,
            "-T",
            str(src / LINKER_SCRIPT),
            "-o",
            str(out / ELF_NAME),
            *map(str, objects),
        ],
        out,
    )


def _run(cmd: list[str], cwd: Path) -> None:
    run_build_step(
        cmd,
        cwd,
        what="microguest build",
        install_hint="install gcc and binutils (Debian: apt-get install gcc binutils)",
        timeout=BUILD_TIMEOUT_S,
    )
