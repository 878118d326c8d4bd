"""OCI image references in the plugin: what a user gets when the reference is wrong.

These fail before any VM exists (the pull or the reference check refuses), so
they run in the plugin tier against the real registry on loopback.
"""

from __future__ import annotations

from pathlib import Path

from smhelpers import Project

from pytest_supermachine.cache import cache_dir
from tests.registry_fixtures import LocalRegistry, local_registry  # noqa: F401 (fixture)

USES_IMAGE = """
import pytest

@pytest.mark.microvm(image="{ref}")
def test_in_the_image(microvm):
    pass
"""


def _pull_cache_entries() -> set[str]:
    root = cache_dir() / "oci"
    return {p.name for p in root.iterdir()} if root.is_dir() else set()


def test_an_unknown_tag_is_an_error_naming_the_reference_and_caches_nothing(
    project: Project,
    local_registry: LocalRegistry,  # noqa: F811
) -> None:
    ref = f"oci:{local_registry.host}/no/such-image:missing"
    project.write("test_missing.py", USES_IMAGE.format(ref=ref))
    before = _pull_cache_entries()
    result = project.run()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"*ImageNotFoundError*{ref}*"])
    assert {e for e in _pull_cache_entries() - before if not e.endswith(".lock")} == set()


def test_a_missing_archive_is_an_error_naming_the_path(project: Project, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.tar"
    project.write("test_missing.py", USES_IMAGE.format(ref=f"oci-archive:{missing}"))
    result = project.run()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"*oci-archive:{missing}: {missing} does not exist*"])
