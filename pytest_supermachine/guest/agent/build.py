"""Build the static Linux guest agent (``sm-agent``) with the system gcc, once per content.

The binary is cached under ``cache_dir()/agent/<key>/sm-agent`` where the key
hashes every source file and every flag, so an edit to any of them builds a new
entry and an unchanged tree never rebuilds. A file lock next to the entry makes
parallel pytest-xdist workers build it once; the binary appears by atomic
rename, so a path that exists is always complete.

Static glibc (``gcc -static``): the initramfs has no shared libraries, and the
agent uses nothing glibc cannot link statically (no NSS, no dlopen).
"""

from __future__ import annotations

from pathlib import Path

from ...cache import cached_artifact, content_key
from ...package_data import package_path
from .. import PROTOCOL_INCLUDE_DIR, run_build_step

#: The agent's C sources, package data (an installed wheel carries them).
SOURCE_DIR = package_path("pytest_supermachine.guest.agent")
SOURCE_SUFFIXES = (".c", ".h")
BINARY_NAME = "sm-agent"

CC = "gcc"
# -Os: small and plenty fast (the agent waits on the kernel, not on its own code);
# -s: no symbols in the initramfs; baseline x86-64 so the binary runs on any guest CPUID.
CFLAGS = (
    "-std=gnu11",
    "-static",
    "-Os",
    "-s",
    "-march=x86-64",
    "-mtune=generic",
    "-fno-strict-aliasing",
    "-Wall",
    "-Wextra",
    "-Wshadow",
)
#: Added by the test that keeps the sources warning-free (not in user builds: a newer
#: gcc's new warning must not stop a user's test run).
STRICT_FLAGS = ("-Werror",)
BUILD_TIMEOUT_S = 120


def source_files(source_dir: Path = SOURCE_DIR) -> list[Path]:
    """Every file that goes into the build, in a stable order."""
    return sorted(p for p in source_dir.iterdir() if p.is_file() and p.suffix in SOURCE_SUFFIXES)


def build_key(source_dir: Path = SOURCE_DIR) -> str:
    """16 hex digits of sha256 over the compiler, the flags and every source (name and bytes)."""
    parts: list[bytes | str] = [CC, "\0".join(CFLAGS)]
    for path in [*source_files(source_dir), *source_files(PROTOCOL_INCLUDE_DIR)]:
        parts += [path.name, path.read_bytes()]
    return content_key(*parts)[:16]


def build_agent(source_dir: Path | None = None) -> Path:
    """Return the path of the static agent binary, compiling it on first use.

    `source_dir` defaults to this package; tests pass a copy to check keys and errors.
    Raises GuestBuildError with the compiler output when the build fails.
    """
    src = (source_dir or SOURCE_DIR).resolve()

    def compile_agent(tmp: Path) -> None:
        units = [str(p) for p in source_files(src) if p.suffix == ".c"]
        include = ["-I", str(src), "-I", str(PROTOCOL_INCLUDE_DIR)]
        _run([CC, *CFLAGS, *include, "-o", str(tmp / BINARY_NAME), *units], tmp)

    return cached_artifact("agent", build_key(src), BINARY_NAME, compile_agent)


def _run(cmd: list[str], cwd: Path) -> None:
    run_build_step(
        cmd,
        cwd,
        what="the guest agent build",
        install_hint="install gcc and the static C library (Debian: apt-get install gcc libc6-dev)",
        timeout=BUILD_TIMEOUT_S,
    )
