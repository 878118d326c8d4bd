"""The guest kernel: a Linux source, our config fragment, and per-host patches.

Why build our own kernel instead of using the host's or a distro image: a test VM
must boot in milliseconds on hardware KVM and at all under nested PVM, which needs
a tiny, module-free kernel with the PVH entry, virtio-mmio cmdline devices and
vsock built in, plus (on PVM) a few patches. The recipe is package data,
``pytest_supermachine/images/kernel_recipe/``: ``pvh.config`` (merged onto ``make tinyconfig``) and
``pvm/*.patch``. Everything that changes the bytes of the result goes into the
cache key, so a recipe edit rebuilds exactly once and every xdist worker shares
that one build.

Where the kernel comes from (`guest_kernel`): ``$SUPERMACHINE_KERNEL`` (a vmlinux the
user built), else the user cache's build for the installed source, else the one the
wheel carries (built from the same recipe), else a build now from the source that
`find_kernel_source` finds (``$SUPERMACHINE_KERNEL_SOURCE``, or any
``/usr/src/linux-source-*.tar.*``).

No VM or pytest code here: this module only turns a recipe into two files.

Why this module is longer than ~600 lines: it is the whole recipe-to-vmlinux path, from
finding a source and keying the build to the build itself and the places a built kernel
may already be (user, cache, wheel); one cache key ties them, and splitting would spread
that key's inputs over several files.
"""

from __future__ import annotations

import enum
import functools
import json
import os
import re
import selectors
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pytest_supermachine.cache import MANIFEST_NAME, build_once, cache_dir, content_key
from pytest_supermachine.errors import GuestBuildError
from pytest_supermachine.package_data import bundled_dir, package_path

#: Where Debian and Ubuntu's ``linux-source-<series>`` packages put their tarball.
SOURCE_SEARCH_DIR = Path("/usr/src")
#: A kernel source tarball (kernel.org's ``linux-6.12.tar.xz``, Debian's) or a source tree.
SOURCE_ENV = "SUPERMACHINE_KERNEL_SOURCE"
#: A vmlinux (PVH entry) the user built: used as is, nothing is built.
KERNEL_ENV = "SUPERMACHINE_KERNEL"
#: The series the recipe is fitted to (patches apply, config check passes; built and booted by
#: tests/linux/test_kernel_sources.py and bench/bench_kernel_sources.py where installed).
VERIFIED_SERIES: tuple[str, ...] = ("6.1", "6.12")
#: The series preferred when several sources are installed (the one the cache keys and
#: the wheel's kernels come from).
PREFERRED_SERIES = "6.1"
#: Fragment symbols a newer kernel no longer has, and why that is fine: the config check
#: skips one only when no Kconfig file of the tree being built defines it.
RETIRED_SYMBOLS: dict[str, str] = {
    # Gone from 6.12's arch/x86/Kconfig: the feature names clearcpuid= needs are always built in.
    "CONFIG_X86_FEATURE_NAMES": "feature names are always built in",
}
#: Compressions ``tar -xf`` recognises by itself (given the decompressor).
TARBALL_SUFFIXES = (".tar.xz", ".tar.gz", ".tgz", ".tar.bz2", ".tar.zst")
#: Present when the host's /dev/kvm is kvm_pvm (guest CPL0 emulated, see docs/vmm.md, "Facts of this machine").
PVM_MODULE = Path("/sys/module/kvm_pvm")
#: The recipe directory (package data, so an installed wheel has it).
RECIPE_DIR = package_path("pytest_supermachine.images", "kernel_recipe")
FRAGMENT_NAME = "pvh.config"
#: Bumped whenever this module changes how the same inputs become artifacts.
RECIPE_VERSION = "1"
#: Environment variable that overrides host detection ("kvm" or "pvm").
VARIANT_ENV = "SUPERMACHINE_KERNEL_VARIANT"

#: Lines of the build log quoted in a `GuestBuildError`.
LOG_TAIL_LINES = 60

#: ``progress(phase, elapsed_seconds, lines)``: phase is one of "wait" (another
#: process holds the build lock), "extract", "patch", "configure", "compile",
#: "done" (also reported for a cache hit); ``lines`` counts the output lines of
#: the current phase's commands (the make output during "compile"). Called at
#: least once a second while a phase runs.
ProgressCallback = Callable[[str, float, int], None]

# Host tool -> Debian package, for a precise "apt-get install" hint.
_BUILD_TOOLS: dict[str, str] = {
    "make": "make",
    "gcc": "gcc",
    "ld": "binutils",
    "bc": "bc",
    "bison": "bison",
    "flex": "flex",
    "perl": "perl",
    "tar": "tar",
    "xz": "xz-utils",
    "gzip": "gzip",
    "patch": "patch",
}
# Headers the kernel's host programs need (objtool links libelf).
_BUILD_HEADERS: dict[str, str] = {
    "/usr/include/gelf.h": "libelf-dev",
}

# Pinned so that `uname -v` and the kernel image bytes do not depend on the
# build machine or the time of the build.
_REPRODUCIBLE_ENV = {
    "KBUILD_BUILD_USER": "supermachine",
    "KBUILD_BUILD_HOST": "supermachine",
    "KBUILD_BUILD_TIMESTAMP": "Thu Jan  1 00:00:00 UTC 1970",
    "KBUILD_BUILD_VERSION": "1",
    "LC_ALL": "C",
}

# CPU features the PVM variant's kernel must not use. Under kvm_pvm the guest's
# CPL0 code is emulated, and the emulator lacks these instructions, or the host's
# settings for them leak through. Each one was either hit while booting here or
# sits on a hot kernel path behind an alternative:
#   xsave, avx   XSAVE/XRSTOR at FPU init and every context switch (hit);
#   cx16         CMPXCHG16B (hit by a stock kernel);
#   popcnt       POPCNT in hweight64() via alternatives (hit: "emulation failure"
#                right after the alternatives self-test);
#   smap         CLAC/STAC in every entry and uaccess (hit);
#   fsgsbase     RDGSBASE/WRGSBASE in paranoid entry and context switch;
#   rdpid        RDPID in GET_PERCPU_BASE of paranoid entry (NMI, #MC, #DB);
#   pcid, invpcid  INVPCID in TLB flushes, CR3 with PCID bits;
#   pku          RDPKRU/WRPKRU at context switch;
#   rdrand, rdseed  early entropy;
#   smep, umip   CR4 bits the emulator need not know about;
#   erms, fsrm   not unsafe but slow: with ERMS the kernel clears and copies
#                pages with `rep stosb`/`rep movsb`, which the emulator steps
#                byte by byte; without it, `rep stosq`. Measured here: first
#                touch of an anonymous page 10 ms -> 4-6 ms.
# `clearcpuid=xsave` does what `noxsave` does (both clear X86_FEATURE_XSAVE in
# cpu_parse_early_param()), without `noxsave`'s side effect of being passed to
# init as an unknown argument. The VMM's CPUID should hide the same features
# (and XSAVE's dependants); listing them here makes a forgotten CPUID bit
# harmless. The value must stay under 128 bytes (cpu_parse_early_param()).
PVM_CLEARED_CPU_FEATURES: tuple[str, ...] = (
    "xsave",
    "avx",
    "cx16",
    "popcnt",
    "smap",
    "fsgsbase",
    "rdpid",
    "pcid",
    "invpcid",
    "pku",
    "rdrand",
    "rdseed",
    "smep",
    "umip",
    "erms",
    "fsrm",
)

PVM_CMDLINE: tuple[str, ...] = (
    "clearcpuid=" + ",".join(PVM_CLEARED_CPU_FEATURES),
    # reboot=t (the default fallback) ends in INT3 with an empty IDT, which the
    # emulator cannot deliver; the i8042 reset (0xFE to port 0x64) is a clean
    # PIO exit that the VMM treats as "guest stopped".
    "reboot=k",
    # Both options come from our patches (kernel_recipe/pvm/).
    "no_int3_selftest",
    "no_initmem_poison",
    # mark_rodata_ro() splits and rewrites the kernel's page tables page by page
    # (set_memory_ro/nx); emulated, that is ~5 s of every boot (measured: the
    # "Write protecting" -> "Run /init" stretch went from ~5 s to 0.16 s). A
    # test VM gains nothing from a write-protected kernel text.
    "rodata=off",
    # With one vCPU the kernel rewrites each of its ~3000 LOCK prefixes to a NOP at boot
    # ("SMP alternatives: switching to UP code"), one text_poke() apiece: a page-table
    # write, two CR3 switches and a TLB flush, all emulated. The prefixes cost nothing
    # extra under emulation; keep them (images/kernel_recipe/README.md, boot cost).
    "noreplace-smp",
    # No clocksource watchdog: a timer every 0.5 s that wakes every idle pooled guest
    # (each wakeup is emulated kernel work taken from the host's CPUs).
    "tsc=reliable",
    # Passed to /init's environment, so to every process the agent starts. Guest user code
    # runs natively under kvm_pvm: CPUID and XGETBV show the host's AVX/AVX-512 and XCR0,
    # while this kernel (XSAVE hidden) context-switches only the FXSAVE area, so glibc's
    # AVX/EVEX string functions share YMM/ZMM registers between processes (issue 11,
    # images/kernel_recipe/README.md "User register state"). Setting XCR0 = x87|SSE from
    # the guest kernel does not help on kvm_pvm hosts that keep the host's XCR0 for guest
    # user mode (measured), so glibc is told not to use AVX instead.
    "GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD,-AVX2,-AVX",
)


class KernelVariant(str, enum.Enum):
    """Which kernel a host needs.

    ``kvm``: upstream code, full CPUID, for hardware virtualisation.
    ``pvm``: the patches in ``kernel_recipe/pvm/`` plus `cmdline_extra`,
    for kvm_pvm where guest kernel code is emulated (docs/vmm.md, "Facts of this machine"). The VMM must
    also give a ``pvm`` guest a reduced CPUID; see `cmdline_extra` and the patches.
    """

    KVM = "kvm"
    PVM = "pvm"

    @property
    def cmdline_extra(self) -> list[str]:
        """Kernel command-line tokens the boot code must append for this variant."""
        return list(PVM_CMDLINE) if self is KernelVariant.PVM else []

    def patches(self, recipe_dir: Path = RECIPE_DIR, series: str = "") -> list[Path]:
        """The patches of this variant, in the order they are applied (by file name).

        A patch of the same name in ``<variant>/<series>/`` (``pvm/6.12/``) replaces the
        generic one for that series: the same change, rebased where the code moved. Other
        series get the generic patches (and a clear error if one does not apply).
        """
        if self is KernelVariant.KVM:
            return []
        rebased = recipe_dir / self.value / series if series else None
        return sorted(
            (
                rebased / p.name if rebased is not None and (rebased / p.name).is_file() else p
                for p in (recipe_dir / self.value).glob("*.patch")
            ),
            key=lambda p: p.name,
        )


@dataclass(frozen=True)
class KernelArtifacts:
    """A built kernel in the cache.

    ``vmlinux`` is the uncompressed ELF with the PVH entry note (the fast way in:
    no decompressor); ``bzimage`` the Linux boot protocol image of the same build.
    ``cmdline_extra`` must be appended to the kernel command line by the boot code.
    A user-supplied kernel (``$SUPERMACHINE_KERNEL``) has no ``bzimage`` or ``config``.
    """

    vmlinux: Path
    bzimage: Path | None
    cmdline_extra: list[str]
    key: str
    variant: KernelVariant
    config: Path | None


def detect_variant(sys_module: Path = Path("/sys/module")) -> KernelVariant:
    """`pvm` when the host's KVM is kvm_pvm, else `kvm`.

    ``$SUPERMACHINE_KERNEL_VARIANT`` overrides the detection (for building the
    other variant on purpose, e.g. to ship it to a hardware host).
    """
    forced = os.environ.get(VARIANT_ENV, "").strip().lower()
    if forced:
        try:
            return KernelVariant(forced)
        except ValueError:
            raise GuestBuildError(
                f"${VARIANT_ENV}={forced!r} is not a kernel variant; use one of "
                + ", ".join(v.value for v in KernelVariant)
            ) from None
    return KernelVariant.PVM if (sys_module / "kvm_pvm").exists() else KernelVariant.KVM


@dataclass(frozen=True)
class KernelSource:
    """A kernel source: a tarball (``tar -xf`` unpacks it) or a tree (copied, never built in)."""

    path: Path

    @property
    def is_tree(self) -> bool:
        return self.path.is_dir()


def _is_tarball(path: Path) -> bool:
    return path.name.endswith(TARBALL_SUFFIXES)


def _series(path: Path) -> tuple[int, ...]:
    """(6, 12) for ``linux-source-6.12.tar.xz`` or ``linux-6.12.tar.xz``; () if none."""
    m = re.search(r"(\d+(?:\.\d+)*)\.t", path.name)
    return tuple(int(n) for n in m.group(1).split(".")) if m else ()


def source_series(source: Path) -> str:
    """``"6.12"`` for a 6.12 tarball (by its name) or tree (by its Makefile); ``""`` if unknown."""
    numbers = (
        _tree_version(source).split(".") if source.is_dir() else list(map(str, _series(source)))
    )
    return ".".join(numbers[:2]) if len(numbers) >= 2 and "?" not in numbers[:2] else ""


def _is_source_tree(path: Path) -> bool:
    return (
        (path / "Makefile").is_file() and (path / "Kconfig").is_file() and (path / "arch").is_dir()
    )


def find_kernel_source(
    env: Mapping[str, str] | None = None, search_dir: Path = SOURCE_SEARCH_DIR
) -> KernelSource:
    """The source to build the guest kernel from, or an error naming what was found.

    ``$SUPERMACHINE_KERNEL_SOURCE`` (a tarball or a tree) wins; otherwise the
    ``linux-source-*.tar.*`` tarballs in ``search_dir``: series `PREFERRED_SERIES` if
    installed, else the newest.
    """
    env = os.environ if env is None else env
    supported = (
        f"a kernel source tarball ({', '.join(TARBALL_SUFFIXES)}; kernel.org's or Debian's "
        f"linux-source-<series>) or an unpacked source tree; the recipe is verified on "
        f"Linux {' and '.join(VERIFIED_SERIES)}"
    )
    explicit = env.get(SOURCE_ENV, "").strip()
    if explicit:
        path = Path(explicit).expanduser()
        if path.is_file() and _is_tarball(path):
            return KernelSource(path)
        if path.is_dir() and _is_source_tree(path):
            return KernelSource(path)
        found = (
            "does not exist"
            if not path.exists()
            else "is a directory without a kernel Makefile/Kconfig/arch"
            if path.is_dir()
            else "is a file that is not a tarball"
        )
        raise GuestBuildError(f"${SOURCE_ENV}={explicit} {found}; it must name {supported}")
    candidates = sorted(
        (p for p in search_dir.glob("linux-source-*") if p.is_file() and _is_tarball(p)),
        key=_series,
    )
    if not candidates:
        others = sorted(p.name for p in search_dir.glob("linux-source-*"))
        seen = f"found only {', '.join(others)}" if others else "found none"
        raise GuestBuildError(
            f"no kernel source for the guest kernel: looked for {search_dir}/linux-source-*.tar.* "
            f"({seen}). Install one (Debian/Ubuntu: apt-get install linux-source), or set "
            f"${SOURCE_ENV} to {supported}; or set ${KERNEL_ENV} to a vmlinux you built"
        )
    preferred = [p for p in candidates if source_series(p) == PREFERRED_SERIES]
    return KernelSource((preferred or candidates)[-1])


def check_build_tools() -> None:
    """Raise naming the Debian packages to install if a build tool is missing."""
    missing = sorted(
        {pkg for tool, pkg in _BUILD_TOOLS.items() if shutil.which(tool) is None}
        | {pkg for header, pkg in _BUILD_HEADERS.items() if not Path(header).exists()}
    )
    if missing:
        raise GuestBuildError(
            "building the guest kernel needs host tools that are missing; install them with\n"
            f"    apt-get install {' '.join(missing)}\n"
            "(or all at once: apt-get install build-essential bc bison flex libelf-dev)"
        )


def _tree_version(tree: Path) -> str:
    """``6.12.0`` from a source tree's Makefile (VERSION, PATCHLEVEL, SUBLEVEL)."""
    fields = dict(
        re.findall(
            r"^(VERSION|PATCHLEVEL|SUBLEVEL) = (\d+)$",
            (tree / "Makefile").read_text(errors="replace"),
            re.M,
        )
    )
    return ".".join(fields.get(k, "?") for k in ("VERSION", "PATCHLEVEL", "SUBLEVEL"))


def source_version(source: Path) -> str:
    """Identify the kernel source cheaply (no decompression).

    Debian's tarball name only says "6.1" and Debian updates the point release
    under the same name, so the version of the package that installed it
    (``linux-source-6.1``) is part of the identity. Without dpkg (a hand-placed or
    kernel.org tarball) the file's size and mtime stand in for it; a tree is
    named by its Makefile's version and the Makefile's mtime (an edited tree
    must be rebuilt: point at a tarball for a stable identity).
    """
    if source.is_dir():
        mtime = (source / "Makefile").stat().st_mtime_ns
        return f"tree {source} {_tree_version(source)} mtime={mtime}"
    name = source.name
    for suffix in TARBALL_SUFFIXES:
        name = name.removesuffix(suffix)
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", name],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        out = None
    if out is not None and out.returncode == 0 and out.stdout.strip():
        return f"{name} {out.stdout.strip()}"
    try:
        st = source.stat()
    except OSError:
        return f"{name} (missing)"
    return f"{name} size={st.st_size} mtime={st.st_mtime_ns}"


def kernel_cache_key(
    variant: KernelVariant,
    *,
    recipe_dir: Path = RECIPE_DIR,
    version: str | None = None,
    source: Path | None = None,
) -> str:
    """hash(recipe version, source version, fragment, patches, variant).

    Patches (those of the source's series, see `KernelVariant.patches`) are hashed by
    name and content, so renaming (= reordering) one changes the key too. ``version``
    defaults to `source_version(source)`; given a ``version`` and no ``source``, the
    generic patches count.
    """
    if version is None:
        source = source or find_kernel_source().path
        version = source_version(source)
    parts: list[bytes | str] = [
        "kernel",
        RECIPE_VERSION,
        version,
        variant.value,
        (recipe_dir / FRAGMENT_NAME).read_bytes(),
    ]
    for patch in variant.patches(recipe_dir, source_series(source) if source else ""):
        parts += [patch.name, patch.read_bytes()]
    return content_key(*parts)


def recipe_key(variant: KernelVariant, recipe_dir: Path = RECIPE_DIR) -> str:
    """hash(recipe version, variant, fragment, patches): the recipe without the source.

    A bundled kernel is matched by this (the machine that runs it may have no
    source to compute the full `kernel_cache_key` from).
    """
    parts: list[bytes | str] = [
        "kernel-recipe",
        RECIPE_VERSION,
        variant.value,
        (recipe_dir / FRAGMENT_NAME).read_bytes(),
    ]
    for patch in variant.patches(recipe_dir):
        parts += [patch.name, patch.read_bytes()]
    return content_key(*parts)


_CONFIG_LINE = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET_LINE = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")


def parse_config(text: str) -> dict[str, str]:
    """Kconfig text -> {symbol: value}; ``# CONFIG_X is not set`` maps to "n"."""
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if m := _CONFIG_LINE.match(line):
            values[m.group(1)] = m.group(2)
        elif m := _UNSET_LINE.match(line):
            values[m.group(1)] = "n"
    return values


def config_mismatches(
    fragment: str, config: str, retired: Mapping[str, str] | None = None
) -> list[str]:
    """What the fragment asks for that the final .config does not have.

    Kconfig silently drops a request whose dependencies are unmet (or whose
    symbol was renamed); this is how we notice. Returns one readable line per
    problem, empty when the config honours the fragment. Symbols in ``retired``
    (ones this kernel no longer has, see `retired_here`) are not checked.
    """
    wanted = parse_config(fragment)
    got = parse_config(config)
    problems = []
    for symbol, value in wanted.items():
        if retired and symbol in retired:
            continue
        have = got.get(symbol, "n")
        if value == "n":
            if have not in ("n", ""):
                problems.append(f"{symbol}: fragment says 'is not set', config has {have}")
        elif have != value:
            shown = "not set" if have == "n" else have
            problems.append(f"{symbol}: fragment wants {value}, config has {shown}")
    return problems


def retired_here(tree: Path, candidates: Mapping[str, str] = RETIRED_SYMBOLS) -> dict[str, str]:
    """The `RETIRED_SYMBOLS` that no Kconfig file of ``tree`` defines (so this kernel lacks them).

    A symbol the tree still defines stays checked: only its absence excuses it.
    """
    names = {s.removeprefix("CONFIG_"): s for s in candidates}
    pattern = re.compile(
        rb"^\s*(?:menu)?config\s+(" + "|".join(map(re.escape, names)).encode() + rb")\s*$", re.M
    )
    defined: set[str] = set()
    if names:
        for kconfig in tree.rglob("Kconfig*"):
            if kconfig.is_file():
                defined.update(names[m.decode()] for m in pattern.findall(kconfig.read_bytes()))
    return {s: why for s, why in candidates.items() if s not in defined}


def _log_tail(log: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return "(no build log)"
    return "\n".join(text.splitlines()[-lines:])


class _Builder:
    """One build in one work directory; runs commands with logging and progress."""

    def __init__(
        self,
        work: Path,
        log: Path,
        progress: ProgressCallback | None,
        niceness: int,
    ) -> None:
        self.work = work
        self.log_path = log
        self.progress = progress
        self.niceness = niceness
        self.start = time.monotonic()
        self.env = {**os.environ, **_REPRODUCIBLE_ENV}

    def report(self, phase: str, lines: int = 0) -> None:
        if self.progress is not None:
            self.progress(phase, time.monotonic() - self.start, lines)

    def run(self, phase: str, argv: Sequence[str | os.PathLike[str]], cwd: Path) -> int:
        """Run one command, appending its output to the log; return its line count."""
        cmd = [os.fspath(a) for a in argv]
        if self.niceness:
            cmd = ["nice", "-n", str(self.niceness), *cmd]
        lines = 0
        with self.log_path.open("ab") as log:
            log.write(f"\n$ {' '.join(cmd)}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                cmd,
                cwd=cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            assert proc.stdout is not None
            os.set_blocking(proc.stdout.fileno(), False)
            pending = b""
            with selectors.DefaultSelector() as sel:
                sel.register(proc.stdout, selectors.EVENT_READ)
                while True:
                    ready = sel.select(timeout=1.0)
                    if ready:
                        chunk = proc.stdout.read(65536)
                        if not chunk:
                            break
                        log.write(chunk)
                        pending += chunk
                        lines += pending.count(b"\n")
                        pending = pending[pending.rfind(b"\n") + 1 :]
                    self.report(phase, lines)
            rc = proc.wait()
            log.write(f"[exit {rc}]\n".encode())
        if rc != 0:
            raise GuestBuildError(
                f"kernel build failed in phase {phase!r}: `{' '.join(cmd)}` exited {rc}\n"
                f"(work dir {self.work}, full log {self.log_path})\n"
                f"--- build log tail ---\n{_log_tail(self.log_path)}"
            )
        return lines


def _artifacts(entry: Path, key: str, variant: KernelVariant) -> KernelArtifacts:
    return KernelArtifacts(
        vmlinux=entry / "vmlinux",
        bzimage=entry / "bzImage",
        cmdline_extra=variant.cmdline_extra,
        key=key,
        variant=variant,
        config=entry / "config",
    )


def build_kernel(
    variant: KernelVariant | None = None,
    *,
    progress: ProgressCallback | None = None,
    recipe_dir: Path = RECIPE_DIR,
    source: Path | None = None,
    root: Path | None = None,
    jobs: int | None = None,
    niceness: int = 10,
    keep_work: bool = False,
) -> KernelArtifacts:
    """Build (or find in the cache) the guest kernel for ``variant``.

    The entry ``<cache>/kernel/<key>/`` holds ``vmlinux``, ``bzImage``, ``config``,
    ``build.log`` and ``manifest.json``; it is made by `build_once` (cache.py), so
    concurrent callers (xdist workers) build once and the others wait, reporting
    phase "wait". The source tree and objects (~1 GiB) are deleted after a
    successful build unless ``keep_work``; after a failure they stay for inspection
    and are replaced by the next attempt. ``niceness`` lowers the compiler's
    priority so a build does not starve the tests running beside it.
    """
    variant = variant or detect_variant()
    source = source or find_kernel_source().path
    key = kernel_cache_key(variant, recipe_dir=recipe_dir, source=source)
    patches = variant.patches(recipe_dir, source_series(source))
    start = time.monotonic()

    def fill(entry: Path) -> dict[str, object]:
        check_build_tools()
        work = entry / "work"
        work.mkdir()
        log = entry / "build.log"
        log.write_bytes(f"kernel {key} variant={variant.value}\n".encode())
        b = _Builder(work, log, progress, niceness)
        b.start = start
        _build_tree(b, patches, work, recipe_dir, source, jobs or os.cpu_count() or 1)
        shutil.copyfile(work / ".config", entry / "config")
        shutil.copyfile(work / "vmlinux", entry / "vmlinux")
        shutil.copyfile(work / "arch" / "x86" / "boot" / "bzImage", entry / "bzImage")
        if not keep_work:
            shutil.rmtree(work, ignore_errors=True)
        return {
            "variant": variant.value,
            "source": source_version(source),
            "patches": [str(p.relative_to(recipe_dir)) for p in patches],
            "recipe": recipe_key(variant, recipe_dir),
        }

    def waiting() -> None:
        if progress is not None:
            progress("wait", 0.0, 0)

    entry = build_once("kernel", key, fill, root=root, on_wait=waiting, keep_failed=True)
    if progress is not None:
        progress("done", time.monotonic() - start, 0)
    return _artifacts(entry, key, variant)


def _unverified_note(source: Path) -> str:
    """What to tell a user whose source is not a series the recipe is verified on."""
    series = source_series(source) or "of an unknown series"
    if series in VERIFIED_SERIES:
        return ""
    return (
        f"\n{source} is Linux {series}; the recipe is verified on Linux "
        f"{' and '.join(VERIFIED_SERIES)}: set ${SOURCE_ENV} to one of those (Debian: "
        f"apt-get install linux-source-{PREFERRED_SERIES}), or ${KERNEL_ENV} to a vmlinux you built"
    )


def _build_tree(
    b: _Builder,
    patches: Sequence[Path],
    work: Path,
    recipe_dir: Path,
    source: Path,
    jobs: int,
) -> None:
    """extract -> patch -> configure (+verify) -> compile, inside ``work``."""
    b.report("extract")
    if source.is_dir():
        b.run("extract", ["cp", "-a", f"{source}/.", work], cwd=work)
    else:
        b.run("extract", ["tar", "-xf", source, "-C", work, "--strip-components=1"], cwd=work)

    b.report("patch")
    for patch in patches:
        try:
            b.run(
                "patch", ["patch", "-p1", "--forward", "--batch", "-i", patch.resolve()], cwd=work
            )
        except GuestBuildError as e:
            raise GuestBuildError(f"{e}{_unverified_note(source)}") from None

    b.report("configure")
    fragment = recipe_dir / FRAGMENT_NAME
    b.run("configure", ["make", "tinyconfig"], cwd=work)
    b.run(
        "configure",
        ["scripts/kconfig/merge_config.sh", "-m", ".config", fragment.resolve()],
        cwd=work,
    )
    b.run("configure", ["make", "olddefconfig"], cwd=work)
    retired = retired_here(work)
    with b.log_path.open("a") as log:
        for symbol, why in retired.items():
            log.write(f"config check: {symbol} skipped, this kernel has no such symbol ({why})\n")
    problems = config_mismatches(fragment.read_text(), (work / ".config").read_text(), retired)
    if problems:
        raise GuestBuildError(
            f"the kernel config does not honour {fragment}: Kconfig dropped or changed\n  "
            + "\n  ".join(problems)
            + "\n(a dependency is missing from the fragment, or the symbol does not exist "
            "in this kernel version)" + _unverified_note(source)
        )

    b.report("compile")
    b.run("compile", ["make", f"-j{jobs}", "vmlinux", "bzImage"], cwd=work)


def bundled_kernel(variant: KernelVariant, *, bundle: Path | None = None) -> KernelArtifacts | None:
    """The kernel of ``variant`` the installed wheel carries, if built from this recipe."""
    want = recipe_key(variant)
    for manifest in sorted((bundle or bundled_dir()).glob(f"kernel/*/{MANIFEST_NAME}")):
        fields = json.loads(manifest.read_text())
        if fields.get("variant") == variant.value and fields.get("recipe") == want:
            return _artifacts(manifest.parent, manifest.parent.name, variant)
    return None


@functools.lru_cache(maxsize=4)
def _file_key(path: Path, size: int, mtime_ns: int) -> str:
    return content_key("user-kernel", path.read_bytes())


def user_kernel(vmlinux: Path, variant: KernelVariant) -> KernelArtifacts:
    """``$SUPERMACHINE_KERNEL``: a vmlinux built elsewhere, keyed by its bytes."""
    if not vmlinux.is_file() or vmlinux.read_bytes()[:4] != b"\x7fELF":
        raise GuestBuildError(
            f"${KERNEL_ENV}={vmlinux} is not a vmlinux (an uncompressed ELF kernel with the PVH "
            "entry note); unset it to use the bundled or cached kernel"
        )
    st = vmlinux.stat()
    return KernelArtifacts(
        vmlinux=vmlinux,
        bzimage=None,
        cmdline_extra=variant.cmdline_extra,
        key=_file_key(vmlinux.resolve(), st.st_size, st.st_mtime_ns),
        variant=variant,
        config=None,
    )


def guest_kernel(
    variant: KernelVariant | None = None, *, progress: ProgressCallback | None = None
) -> KernelArtifacts:
    """The kernel the Linux image boots, cheapest source first.

    ``$SUPERMACHINE_KERNEL``; else the user cache's build for the installed source;
    else the wheel's bundled kernel of the same recipe; else a build now (which needs
    a source, see `find_kernel_source`, and the build tools). Only the last can fail
    for want of a source, and then says what it looked for.
    """
    variant = variant or detect_variant()
    user = os.environ.get(KERNEL_ENV, "").strip()
    if user:
        return user_kernel(Path(user).expanduser(), variant)
    try:
        source: Path | None = find_kernel_source().path
    except GuestBuildError:
        source = None
    if source is not None:
        key = kernel_cache_key(variant, source=source)
        if (cache_dir() / "kernel" / key / MANIFEST_NAME).is_file():
            return _artifacts(cache_dir() / "kernel" / key, key, variant)
    bundled = bundled_kernel(variant)
    if bundled is not None:
        return bundled
    return build_kernel(variant, progress=progress, source=source)
