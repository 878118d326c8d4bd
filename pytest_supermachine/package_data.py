"""Files the installed package carries, found through `importlib.resources`, never the source tree.

What the package carries: the C sources of the guests and the VMM core, the kernel recipe
(``images/kernel_recipe/``) and, in a wheel made by ``scripts/build-wheel.sh``, prebuilt
guests under ``bundled/<kind>/<key>/`` laid out exactly like cache entries (cache.py), so a
machine without a compiler or a kernel source runs the bundled ones.

The compilers and ``patch`` need real files, so a resource must be a file on disk: a
package imported from a zip archive gets a clear error instead of a half-working run.
"""

from __future__ import annotations

from pathlib import Path

from .errors import SupermachineError

PACKAGE = "pytest_supermachine"
#: Package-data directory of the prebuilt guests a wheel carries (absent in a checkout).
BUNDLED_DIR = "bundled"


def package_path(package: str, *parts: str) -> Path:
    """The file-system path of resource ``parts`` of ``package`` (which need not exist yet)."""
    from importlib.resources import files  # lazy: loading the plugin must stay cheap

    resource = files(package)
    for part in parts:
        resource = resource.joinpath(part)
    if not isinstance(resource, Path):
        raise SupermachineError(
            f"{package} is not installed as files on disk ({resource!r}); the guests are built "
            "from its files by gcc and patch: install it with pip, not as a zip archive"
        )
    return resource


def bundled_dir() -> Path:
    """Where a wheel's prebuilt guests live (``pytest_supermachine/bundled/``)."""
    return package_path(PACKAGE, BUNDLED_DIR)
