"""Loading the plugin is free of side effects (no VMM import, no /dev/kvm, no builds); no import cycles."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import pytest_supermachine


def run(code: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_importing_the_plugin_imports_no_vmm_code():
    out = run(
        "import sys, pytest_supermachine.plugin, pytest_supermachine\n"
        "print(sorted(m for m in sys.modules if '.vmm' in m or m == '_cffi_backend'))"
    )
    assert out == "[]"


#: What serves VMs: loaded when a test first asks for one, never by a session without VMs.
VM_SERVING_MODULES = {
    "pytest_supermachine.fixtures.lease",
    "pytest_supermachine.fixtures.factory",
    "pytest_supermachine.fixtures.pool",
    "pytest_supermachine.fixtures.layers",
    "pytest_supermachine.session.stats",
    "pytest_supermachine.capsules.capsule",
    "pytest_supermachine.capsules.replay",
    "pytest_supermachine.snapshot_store",
    "pytest_supermachine.mounts",
    "pytest_supermachine.vmm.machine",
}


@pytest.mark.parametrize("flags", [["-q"], []], ids=["quiet", "with-header"])
def test_a_session_without_vms_loads_nothing_that_serves_vms(tmp_path, flags):
    (tmp_path / "test_plain.py").write_text("def test_plain():\n    assert True\n")
    (tmp_path / "conftest.py").write_text(
        "import sys\n\n"
        "def pytest_unconfigure():\n"
        "    print('LOADED', sorted(m for m in sys.modules if m.startswith('pytest_supermachine')))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", *flags, "-p", "no:cacheprovider", "-p", "supermachine"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    [line] = [line for line in proc.stdout.splitlines() if line.startswith("LOADED ")]
    loaded = set(ast.literal_eval(line.removeprefix("LOADED ")))
    assert "pytest_supermachine.plugin" in loaded
    assert loaded & VM_SERVING_MODULES == set()


def test_public_api_names_resolve_lazily():
    out = run(
        "import pytest_supermachine as p\n"
        "print(p.Machine.__name__, p.RunResult.__name__, p.layer.__name__, "
        "p.LayerError.__mro__[1].__name__)"
    )
    assert out == "Machine RunResult layer SupermachineError"


def test_package_import_does_not_import_pytest():
    assert run("import sys, pytest_supermachine; print('pytest' in sys.modules)") == "False"


PACKAGE = Path(pytest_supermachine.__file__).parent


def _module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _runtime_imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules `name` imports when it runs: at module level or in a function.

    Imports under ``if TYPE_CHECKING:`` are left out: they are annotations, never executed.
    """
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and ast.unparse(child.test).endswith("TYPE_CHECKING"):
                for stmt in child.orelse:
                    visit(stmt)
                continue
            if isinstance(child, ast.ImportFrom):
                base = package[: len(package) - child.level + 1] if child.level else []
                target = ".".join([*base, *([child.module] if child.module else [])])
                for alias in child.names:
                    submodule = f"{target}.{alias.name}"
                    found.add(submodule if submodule in modules else target)
            elif isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names)
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in modules and m != name}


def test_no_module_of_the_package_imports_itself_through_others():
    modules = _module_names()
    graph = {name: _runtime_imports(name, path, modules) for name, path in modules.items()}
    cycles: list[list[str]] = []
    done: set[str] = set()

    def walk(name: str, stack: list[str]) -> None:
        if name in stack:
            cycles.append([*stack[stack.index(name) :], name])
            return
        if name in done:
            return
        for target in sorted(graph[name]):
            walk(target, [*stack, name])
        done.add(name)

    for name in sorted(graph):
        walk(name, [])
    assert cycles == []
