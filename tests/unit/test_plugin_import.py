"""Loading the plugin is free of side effects: no VMM import, no /dev/kvm, no builds."""

from __future__ import annotations

import subprocess
import sys


def run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_importing_the_plugin_imports_no_vmm_code():
    out = run("import sys, pytest_supermachine.plugin, pytest_supermachine\n"
              "print(sorted(m for m in sys.modules if '.vmm' in m or m == '_cffi_backend'))")
    assert out == "[]"


def test_public_api_names_resolve_lazily():
    out = run("import pytest_supermachine as p\n"
              "print(p.Machine.__name__, p.RunResult.__name__, p.layer.__name__, "
              "p.LayerError.__mro__[1].__name__)")
    assert out == "Machine RunResult layer SupermachineError"


def test_package_import_does_not_import_pytest():
    assert run("import sys, pytest_supermachine; print('pytest' in sys.modules)") == "False"
