"""The pure parts of the kernel recipe: cache keys, variant choice, config checks.

No kernel is built here; the build itself is exercised by the linux tier.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pytest_supermachine.errors import GuestBuildError
from pytest_supermachine.images import kernel
from pytest_supermachine.images.kernel import (
    KernelVariant,
    bundled_kernel,
    config_mismatches,
    detect_variant,
    find_kernel_source,
    guest_kernel,
    kernel_cache_key,
    recipe_key,
)

pytestmark = pytest.mark.unit


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    """A copy of the real recipe that a test may edit."""
    dst = tmp_path / "recipe"
    shutil.copytree(kernel.RECIPE_DIR, dst)
    return dst


@pytest.fixture
def build_tools() -> None:
    """The host tools a kernel build starts with (the builds here fail early, by design)."""
    try:
        kernel.check_build_tools()
    except GuestBuildError as e:
        pytest.skip(f"kernel build tools missing: {e}")


def key(variant: KernelVariant, recipe: Path, version: str = "linux-source-6.1 6.1.192-1") -> str:
    return kernel_cache_key(variant, recipe_dir=recipe, version=version)


def test_real_recipe_is_complete() -> None:
    """The shipped recipe has the fragment and the PVM patches, each explaining itself."""
    assert (kernel.RECIPE_DIR / kernel.FRAGMENT_NAME).is_file()
    patches = KernelVariant.PVM.patches()
    names = [p.name for p in patches]
    assert names == sorted(names) and len(names) >= 3
    for patch in patches:
        text = patch.read_text()
        header = text.split("\n--- a/", 1)[0]
        # A prose header (why it exists, what breaks without it) before the diff.
        assert len(header.splitlines()) >= 3, patch.name
        assert "Why" in header, patch.name
        assert "\n+++ b/" in text, patch.name


def test_key_is_stable(recipe: Path, tmp_path: Path) -> None:
    """Same content, same key: neither the recipe's location nor its files' times count."""
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(recipe, elsewhere)
    for path in elsewhere.rglob("*"):
        path.touch()
    assert key(KernelVariant.PVM, elsewhere) == key(KernelVariant.PVM, recipe)
    assert key(KernelVariant.PVM, recipe) == key(KernelVariant.PVM, kernel.RECIPE_DIR)


def test_key_depends_on_variant(recipe: Path) -> None:
    assert key(KernelVariant.PVM, recipe) != key(KernelVariant.KVM, recipe)


def test_key_depends_on_source_version(recipe: Path) -> None:
    a = key(KernelVariant.KVM, recipe, "linux-source-6.1 6.1.192-1")
    b = key(KernelVariant.KVM, recipe, "linux-source-6.1 6.1.193-1")
    assert a != b


def test_key_depends_on_fragment(recipe: Path) -> None:
    before = {v: key(v, recipe) for v in KernelVariant}
    with (recipe / kernel.FRAGMENT_NAME).open("a") as f:
        f.write("CONFIG_IKCONFIG=y\n")
    for v in KernelVariant:
        assert key(v, recipe) != before[v]


def test_key_depends_on_patch_content_and_name(recipe: Path) -> None:
    kvm_before = key(KernelVariant.KVM, recipe)
    pvm_before = key(KernelVariant.PVM, recipe)
    patch = KernelVariant.PVM.patches(recipe)[0]
    patch.write_text(patch.read_text() + "\n")
    pvm_edited = key(KernelVariant.PVM, recipe)
    assert pvm_edited != pvm_before
    # Renaming reorders the series: that is a different kernel too.
    patch.rename(patch.with_name("9999-" + patch.name))
    assert key(KernelVariant.PVM, recipe) != pvm_edited
    # The kvm variant applies no patches, so patch edits do not rebuild it.
    assert key(KernelVariant.KVM, recipe) == kvm_before


def test_key_depends_on_added_patch(recipe: Path) -> None:
    before = key(KernelVariant.PVM, recipe)
    (recipe / "pvm" / "9999-extra.patch").write_text("Why: test.\n")
    assert key(KernelVariant.PVM, recipe) != before


def test_detect_variant_from_sys_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(kernel.VARIANT_ENV, raising=False)
    (tmp_path / "kvm").mkdir()
    assert detect_variant(tmp_path) is KernelVariant.KVM
    (tmp_path / "kvm_pvm").mkdir()
    assert detect_variant(tmp_path) is KernelVariant.PVM


def test_detect_variant_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "kvm_pvm").mkdir()
    monkeypatch.setenv(kernel.VARIANT_ENV, "kvm")
    assert detect_variant(tmp_path) is KernelVariant.KVM
    monkeypatch.setenv(kernel.VARIANT_ENV, "bogus")
    with pytest.raises(GuestBuildError, match="bogus"):
        detect_variant(tmp_path)


def test_cmdline_extra() -> None:
    assert KernelVariant.KVM.cmdline_extra == []
    pvm = KernelVariant.PVM.cmdline_extra
    assert "reboot=k" in pvm and "no_int3_selftest" in pvm
    (clear,) = [t for t in pvm if t.startswith("clearcpuid=")]
    cleared = clear.split("=", 1)[1].split(",")
    # Each of these was an emulation failure while booting under kvm_pvm.
    assert {"xsave", "smap", "popcnt"} <= set(cleared)
    # Tokens without "=" that the kernel does not register are passed to init.
    # (noreplace-smp is registered: __setup in arch/x86/kernel/alternative.c)
    assert all("=" in t or t.startswith("no_") or t in ("quiet", "noreplace-smp") for t in pvm)
    # cpu_parse_early_param() copies the value into a 128-byte buffer.
    assert len(clear.split("=", 1)[1]) < 128
    # Each call returns a fresh list: callers may append to it.
    KernelVariant.PVM.cmdline_extra.append("x")
    assert "x" not in KernelVariant.PVM.cmdline_extra


def test_config_mismatches_names_dropped_options() -> None:
    fragment = (
        "# comment\n"
        "CONFIG_A=y\n"
        "CONFIG_B=y\n"
        "CONFIG_NR=8\n"
        "# CONFIG_C is not set\n"
        "# CONFIG_D is not set\n"
    )
    config = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_NR=64\nCONFIG_C=y\n"
    problems = config_mismatches(fragment, config)
    assert len(problems) == 3
    joined = "\n".join(problems)
    assert "CONFIG_B" in joined and "CONFIG_NR" in joined and "CONFIG_C" in joined
    assert "CONFIG_A" not in joined and "CONFIG_D" not in joined


def test_config_mismatches_clean() -> None:
    fragment = (kernel.RECIPE_DIR / kernel.FRAGMENT_NAME).read_text()
    assert config_mismatches(fragment, fragment) == []


def test_missing_source_says_what_was_looked_for_and_what_to_install(tmp_path: Path) -> None:
    (tmp_path / "linux-source-6.1").mkdir()  # an unpacked leftover, not a tarball
    with pytest.raises(GuestBuildError) as err:
        find_kernel_source({}, search_dir=tmp_path)
    message = str(err.value)
    assert f"{tmp_path}/linux-source-*.tar.*" in message
    assert "found only linux-source-6.1" in message
    assert "apt-get install linux-source" in message and "SUPERMACHINE_KERNEL_SOURCE" in message


def test_any_installed_source_tarball_is_found(tmp_path: Path) -> None:
    (tmp_path / "linux-source-6.12.tar.xz").write_bytes(b"")
    assert find_kernel_source({}, search_dir=tmp_path).path == tmp_path / "linux-source-6.12.tar.xz"


def test_verified_series_is_preferred_then_the_newest(tmp_path: Path) -> None:
    for name in (
        "linux-source-5.10.tar.xz",
        "linux-source-6.12.tar.bz2",
        "linux-source-6.2.tar.gz",
    ):
        (tmp_path / name).write_bytes(b"")
    assert find_kernel_source({}, search_dir=tmp_path).path.name == "linux-source-6.12.tar.bz2"
    (tmp_path / "linux-source-6.1.tar.xz").write_bytes(b"")
    assert find_kernel_source({}, search_dir=tmp_path).path.name == "linux-source-6.1.tar.xz"


def test_source_env_names_a_kernel_org_tarball(tmp_path: Path) -> None:
    tarball = tmp_path / "linux-6.12.9.tar.xz"
    tarball.write_bytes(b"")
    env = {kernel.SOURCE_ENV: str(tarball)}
    assert find_kernel_source(env, search_dir=tmp_path / "none").path == tarball


def test_source_env_names_a_source_tree(tmp_path: Path) -> None:
    tree = tmp_path / "linux"
    (tree / "arch").mkdir(parents=True)
    (tree / "Kconfig").write_text("")
    (tree / "Makefile").write_text("VERSION = 6\nPATCHLEVEL = 12\nSUBLEVEL = 9\n")
    source = find_kernel_source({kernel.SOURCE_ENV: str(tree)}, search_dir=tmp_path)
    assert source.path == tree and source.is_tree
    assert " 6.12.9 " in kernel.source_version(tree)


def test_source_env_that_is_no_source_says_what_it_is(tmp_path: Path) -> None:
    (tmp_path / "linux-source-6.1.tar.xz").write_bytes(b"")  # not taken: the variable wins
    with pytest.raises(GuestBuildError, match="directory without a kernel Makefile"):
        find_kernel_source({kernel.SOURCE_ENV: str(tmp_path)}, search_dir=tmp_path)
    with pytest.raises(GuestBuildError, match="does not exist"):
        find_kernel_source({kernel.SOURCE_ENV: str(tmp_path / "x")}, search_dir=tmp_path)


def test_bundled_kernel_is_found_by_variant_and_recipe(tmp_path: Path) -> None:
    """A wheel's kernel counts only when built from this recipe, for this variant."""
    entry = tmp_path / "kernel" / "k1"
    entry.mkdir(parents=True)
    (entry / "vmlinux").write_bytes(b"\x7fELF")
    manifest = entry / "manifest.json"
    manifest.write_text(json.dumps({"variant": "pvm", "recipe": "old recipe"}))
    assert bundled_kernel(KernelVariant.PVM, bundle=tmp_path) is None
    manifest.write_text(json.dumps({"variant": "pvm", "recipe": recipe_key(KernelVariant.PVM)}))
    found = bundled_kernel(KernelVariant.PVM, bundle=tmp_path)
    assert found is not None and found.vmlinux == entry / "vmlinux" and found.key == "k1"
    assert bundled_kernel(KernelVariant.KVM, bundle=tmp_path) is None


def test_user_kernel_wins_and_is_keyed_by_its_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vmlinux = tmp_path / "vmlinux"
    vmlinux.write_bytes(b"\x7fELF one")
    monkeypatch.setenv(kernel.KERNEL_ENV, str(vmlinux))
    first = guest_kernel(KernelVariant.PVM)
    assert first.vmlinux == vmlinux and first.cmdline_extra == KernelVariant.PVM.cmdline_extra
    other = tmp_path / "other"
    other.write_bytes(b"\x7fELF two")
    monkeypatch.setenv(kernel.KERNEL_ENV, str(other))
    assert guest_kernel(KernelVariant.PVM).key != first.key


def test_user_kernel_that_is_no_elf_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(kernel.KERNEL_ENV, str(tmp_path / "bzImage"))
    (tmp_path / "bzImage").write_bytes(b"MZ")
    with pytest.raises(GuestBuildError, match="is not a vmlinux"):
        guest_kernel(KernelVariant.PVM)


def test_cache_hit_needs_no_tools(tmp_path: Path, recipe: Path) -> None:
    """A complete cache entry is returned without building (or locking)."""
    source = tmp_path / "linux-source-6.1.tar.xz"
    source.write_bytes(b"not really")
    k = kernel_cache_key(KernelVariant.PVM, recipe_dir=recipe, source=source)
    entry = tmp_path / "cache" / "kernel" / k
    entry.mkdir(parents=True)
    for name in ("vmlinux", "bzImage", "config", "manifest.json"):
        (entry / name).write_bytes(b"x")
    phases: list[str] = []
    art = kernel.build_kernel(
        KernelVariant.PVM,
        recipe_dir=recipe,
        source=source,
        root=tmp_path / "cache",
        progress=lambda phase, elapsed, lines: phases.append(phase),
    )
    assert art.vmlinux == entry / "vmlinux" and art.bzimage == entry / "bzImage"
    assert art.key == k and art.cmdline_extra == KernelVariant.PVM.cmdline_extra
    assert phases == ["done"]


def test_failed_build_stays_for_inspection_until_the_next_attempt(
    tmp_path: Path, recipe: Path, build_tools: None
) -> None:
    """A failed build keeps its log and work dir, is no cache hit, and a retry starts afresh."""
    source = tmp_path / "linux-source-6.1.tar.xz"
    source.write_bytes(b"not a tarball")
    root = tmp_path / "cache"
    for _attempt in range(2):
        with pytest.raises(GuestBuildError, match="phase 'extract'"):
            kernel.build_kernel(
                KernelVariant.PVM, recipe_dir=recipe, source=source, root=root, niceness=0
            )
    entry = root / "kernel" / kernel_cache_key(KernelVariant.PVM, recipe_dir=recipe, source=source)
    assert (entry / "work").is_dir() and not (entry / "manifest.json").exists()
    assert (entry / "build.log").read_text().count("variant=pvm") == 1, "the retry's log only"


def test_failed_step_raises_with_log_tail(tmp_path: Path) -> None:
    """A failing build command names the phase and quotes the end of the log."""
    log = tmp_path / "build.log"
    seen: list[tuple[str, int]] = []
    b = kernel._Builder(tmp_path, log, lambda p, e, n: seen.append((p, n)), niceness=0)
    assert b.run("configure", ["sh", "-c", "echo one; echo two"], cwd=tmp_path) == 2
    with pytest.raises(GuestBuildError) as info:
        b.run("compile", ["sh", "-c", "echo 'fs/x.c:1: error: boom'; exit 3"], cwd=tmp_path)
    message = str(info.value)
    assert "'compile'" in message and "exited 3" in message
    assert "error: boom" in message and str(log) in message
    assert ("configure", 2) in seen


def test_missing_tools_named_as_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernel.shutil, "which", lambda tool: None if tool == "bison" else "/x")
    with pytest.raises(GuestBuildError, match=r"apt-get install bison\b"):
        kernel.check_build_tools()


def test_series_patch_replaces_the_generic_one_of_the_same_name() -> None:
    """pvm/6.12/ holds rebased patches: 6.12 gets those, every other series the generic ones."""
    generic = KernelVariant.PVM.patches()
    rebased = KernelVariant.PVM.patches(series="6.12")
    assert [p.name for p in rebased] == [p.name for p in generic]
    replaced = [p for p in rebased if p.parent.name == "6.12"]
    assert replaced, "the recipe carries at least one patch rebased onto 6.12"
    for patch in replaced:
        # Each says which generic patch it rebases, so the two are kept in step.
        assert f"../{patch.name}" in patch.read_text().split("\n--- a/", 1)[0]
    assert KernelVariant.PVM.patches(series="6.1") == generic
    assert KernelVariant.KVM.patches(series="6.12") == []


def test_key_of_a_series_depends_on_its_own_patches(recipe: Path, tmp_path: Path) -> None:
    source_61 = tmp_path / "linux-source-6.1.tar.xz"
    source_612 = tmp_path / "linux-source-6.12.tar.xz"
    for source in (source_61, source_612):
        source.write_bytes(b"")

    def keys() -> tuple[str, str]:
        return tuple(  # type: ignore[return-value]
            kernel_cache_key(KernelVariant.PVM, recipe_dir=recipe, source=s, version="v")
            for s in (source_61, source_612)
        )

    before = keys()
    assert before[0] != before[1]
    (rebased,) = (recipe / "pvm" / "6.12").glob("0002-*.patch")
    rebased.write_text(rebased.read_text() + "\n")
    after = keys()
    assert after[0] == before[0] and after[1] != before[1]


@pytest.mark.parametrize(
    ("name", "series"),
    [
        ("linux-source-6.12.tar.xz", "6.12"),
        ("linux-6.12.9.tar.gz", "6.12"),
        ("linux-source-6.1.tar.xz", "6.1"),
        ("kernel.tar.xz", ""),
    ],
)
def test_source_series_from_a_tarball_name(name: str, series: str) -> None:
    assert kernel.source_series(Path(name)) == series


def test_retired_symbol_is_excused_only_where_the_tree_lacks_it(tmp_path: Path) -> None:
    """A symbol a newer kernel dropped is not checked there, and still checked where it exists."""
    fragment = "CONFIG_X86_FEATURE_NAMES=y\nCONFIG_VIRTIO=y\n"
    config = "CONFIG_VIRTIO=y\n"
    new_tree, old_tree = tmp_path / "new", tmp_path / "old"
    (new_tree / "arch" / "x86").mkdir(parents=True)
    (new_tree / "arch" / "x86" / "Kconfig").write_text("config X86_64\n\tdef_bool y\n")
    (old_tree / "arch" / "x86").mkdir(parents=True)
    (old_tree / "arch" / "x86" / "Kconfig").write_text('config X86_FEATURE_NAMES\n\tbool "names"\n')
    assert config_mismatches(fragment, config, kernel.retired_here(new_tree)) == []
    assert kernel.retired_here(old_tree) == {}
    assert config_mismatches(fragment, config, kernel.retired_here(old_tree)) == [
        "CONFIG_X86_FEATURE_NAMES: fragment wants y, config has not set"
    ]


def test_unverified_series_that_fails_says_what_was_found_and_what_is_supported(
    tmp_path: Path, recipe: Path, build_tools: None
) -> None:
    tree = tmp_path / "linux"
    (tree / "arch").mkdir(parents=True)
    (tree / "Kconfig").write_text("")
    (tree / "Makefile").write_text("VERSION = 5\nPATCHLEVEL = 10\nSUBLEVEL = 0\n")
    with pytest.raises(GuestBuildError) as info:
        kernel.build_kernel(
            KernelVariant.PVM, recipe_dir=recipe, source=tree, root=tmp_path / "c", niceness=0
        )
    message = str(info.value)
    assert "phase 'patch'" in message
    assert f"{tree} is Linux 5.10; the recipe is verified on Linux 6.1 and 6.12" in message
