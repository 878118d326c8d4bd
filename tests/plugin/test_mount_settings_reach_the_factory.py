"""Mounts through the plugin on the microguest: refused with a clear error, other tests unaffected."""

from __future__ import annotations


def test_mounts_on_the_microguest_error_at_setup_naming_the_image(project):
    (project.path / "data").mkdir()
    project.write(
        "test_mount_marker.py",
        """
import pytest

@pytest.mark.microvm(mounts={"/data": "data"})
def test_wants_a_mount(microvm):
    pass

def test_without_mounts(microvm):
    assert microvm.run("true").ok
""",
    )
    result = project.run()
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*mounts need a Linux image: image 'microguest'*/data*"])


def test_a_malformed_mounts_ini_is_a_usage_error(project):
    project.ini("supermachine_mounts = /data")
    project.write("test_mount_ini.py", "def test_nothing():\n    pass\n")
    result = project.run()
    assert result.ret == 4
    result.stderr.fnmatch_lines(["*mounts from ini (supermachine_mounts)*GUEST=HOST*"])
