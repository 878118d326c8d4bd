"""Images by name: those added with `register_image`, then the bundled ones.

Every image a test gets is found through the ``pytest_supermachine_image`` hook
(hookspecs.py). The plugin's own implementation of it is marked ``trylast`` and
answers with `find_image`, so a plugin or conftest implementing the hook decides
first (and may replace a bundled image by returning another for its name); then
come images added with `register_image` (``replace=True`` replaces a bundled one);
then the bundled images: ``microguest`` (always available), ``linux`` (the Linux
guest), and ``default``, the alias naming the image tests get unless they ask for
another (``linux``). A name that is an image reference (``oci:…``,
``oci-archive:…``, ``docker-archive:…``, ``oci-layout:…``; images/reference.py)
is an `OciImage` of it, one per reference and writable-layer size.

Nothing is made at import: an image is created on first use, once per process, so
importing this module builds nothing and opens no device.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from ..errors import SupermachineError

if TYPE_CHECKING:
    from .image import Image  # the report header reads aliases here and loads no image code


def _microguest() -> Image:
    from .microguest import MicroguestImage  # lazy: loading the plugin must stay cheap

    return MicroguestImage()


def _linux() -> Image:
    from .linux import LinuxImage  # lazy: loading the plugin must stay cheap

    return LinuxImage()


#: The images this package ships, by name (each module is imported on first use).
BUNDLED_IMAGES: Mapping[str, Callable[[], Image]] = {
    "microguest": _microguest,
    "linux": _linux,
}
#: Other names for bundled images: ``default`` is the image tests get unless they ask.
BUNDLED_ALIASES: Mapping[str, str] = {"default": "linux"}


class UnknownImageError(SupermachineError):
    """No image is registered under the requested name."""


_lock = threading.Lock()
_factories: dict[str, Callable[[], Image]] = {}
_aliases: dict[str, str] = {}
_instances: dict[str, Image] = {}


def register_image(name: str, factory: Callable[[], Image], *, replace: bool = False) -> None:
    """Make `factory()` the image called `name` (created on first use, once per process)."""
    with _lock:
        if not replace and name in image_names():
            raise ValueError(f"an image named {name!r} is already registered")
        _aliases.pop(name, None)
        _factories[name] = factory
        _instances.pop(name, None)


def register_alias(name: str, target: str) -> None:
    """Make `name` another name for the image `target` (``default`` is such an alias)."""
    with _lock:
        _factories.pop(name, None)
        _instances.pop(name, None)
        _aliases[name] = target


def alias_target(name: str) -> str | None:
    """The name `name` stands for if it is an alias, else None (registered names first)."""
    if name in _factories:
        return None
    if name in _aliases:
        return _aliases[name]
    if name in BUNDLED_IMAGES:
        return None
    return BUNDLED_ALIASES.get(name)


def canonical_name(name: str) -> str:
    """`name` with aliases followed (``default`` → ``linux``)."""
    seen = set()
    while name not in seen and (target := alias_target(name)) is not None:
        seen.add(name)
        name = target
    return name


def image_names() -> list[str]:
    """Every name, registered and bundled, aliases included, sorted."""
    return sorted({*_factories, *_aliases, *BUNDLED_IMAGES, *BUNDLED_ALIASES})


def find_image(name: str, *, disk_mib: int | None = None) -> Image | None:
    """The image called `name` (aliases followed), created on first use; None if none is.

    A reference (`is_image_reference`) gives its `OciImage` whose writable layer is
    `disk_mib` MiB (default: oci_image.DEFAULT_DISK_MIB); a malformed reference or a missing
    archive or layout raises `ImageReferenceError` naming it. Nothing is pulled here.
    """
    from .reference import is_image_reference  # lazy: loading the plugin must stay cheap

    if is_image_reference(name) and name not in _factories:
        from .oci_image import DEFAULT_DISK_MIB, image_for_reference  # lazy: httpx etc.

        key = f"{name}\0{disk_mib or DEFAULT_DISK_MIB}"
        with _lock:
            if key not in _instances:
                _instances[key] = image_for_reference(name, disk_mib=disk_mib or DEFAULT_DISK_MIB)
            return _instances[key]
    real = canonical_name(name)
    with _lock:
        image = _instances.get(real)
        if image is not None:
            return image
        factory = _factories.get(real) or BUNDLED_IMAGES.get(real)
    if factory is None:
        return None
    image = factory()
    with _lock:
        return _instances.setdefault(real, image)


def unknown_image(name: str) -> UnknownImageError:
    """The error for an image name nothing provides; it names the choices."""
    return UnknownImageError(
        f"no guest image named {name!r}; available: {', '.join(image_names())} "
        "(plugins add images through the pytest_supermachine_image hook), or an OCI image "
        "reference: oci:REF, oci-archive:PATH, docker-archive:PATH, oci-layout:DIR[:TAG]"
    )


def get_image(name: str) -> Image:
    """The image called `name` (aliases followed); `UnknownImageError` names the choices."""
    image = find_image(name)
    if image is None:
        raise unknown_image(name)
    return image
