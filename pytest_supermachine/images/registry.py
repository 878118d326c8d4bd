"""Guest images by name: what a base snapshot is booted from, and what its cache key hashes.

An `Image` knows three things the plugin needs and nothing about pytest:

* `key_parts(vcpus, mem_mib)`: everything image-specific that changes the booted
  guest (its bytes, command line, devices). The plugin adds what every snapshot
  depends on (vCPUs, memory, snapshot and VM-state format versions, plugin version,
  host CPU/KVM facts), hashes the lot, and that hash names the base snapshot in the
  cache. A change in any part gives a new key, so a stale base is never reused.
* `boot(vcpus, mem_mib, timeout=)`: a started `Machine` whose guest is *ready*
  (its agent answers), i.e. exactly the state worth snapshotting.
* `build()`: make sure its artifacts exist (for `supermachine image build`).

Images are registered as factories so that importing this module (which the
plugin does at start-up) builds nothing and opens no device. ``microguest`` is
always available; ``default`` names the image tests get unless they ask for
another: the Linux guest (``linux``).
Other plugins add images with `register_image` or the
``pytest_supermachine_image`` hook.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from ..errors import SupermachineError

if TYPE_CHECKING:
    from ..vmm.machine import Machine


class UnknownImageError(SupermachineError):
    """No image is registered under the requested name."""


class Image(ABC):
    """A bootable guest image (see the module docstring for the contract)."""

    #: Registry name ("microguest", "linux", ...).
    name: str = ""
    #: One line for `supermachine image list` and the report header.
    description: str = ""
    default_vcpus: int = 1
    default_mem_mib: int = 64

    @abstractmethod
    def key_parts(self, vcpus: int, mem_mib: int) -> Mapping[str, bytes | str]:
        """Everything image-specific the booted guest depends on (builds the image if needed)."""

    @abstractmethod
    def boot(self, vcpus: int, mem_mib: int, *, timeout: float) -> Machine:
        """A started machine whose guest is ready; the caller owns (and stops) it."""

    def build(self) -> str:
        """Build what the image needs if missing; returns a short description of the result."""
        return self.description

    def __repr__(self) -> str:
        return f"<Image {self.name}>"


_lock = threading.Lock()
_factories: dict[str, Callable[[], Image]] = {}
_aliases: dict[str, str] = {}
_instances: dict[str, Image] = {}


def register_image(name: str, factory: Callable[[], Image], *, replace: bool = False) -> None:
    """Make `factory()` the image called `name` (created on first use, once per process)."""
    with _lock:
        if not replace and (name in _factories or name in _aliases):
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


def canonical_name(name: str) -> str:
    """`name` with aliases followed (``default`` → ``linux``)."""
    seen = set()
    while name in _aliases and name not in seen:
        seen.add(name)
        name = _aliases[name]
    return name


def image_names() -> list[str]:
    """Every registered name, aliases included, sorted."""
    return sorted({*_factories, *_aliases})


def get_image(name: str) -> Image:
    """The image registered as `name` (aliases followed); `UnknownImageError` names the choices."""
    real = canonical_name(name)
    with _lock:
        image = _instances.get(real)
        if image is not None:
            return image
        factory = _factories.get(real)
    if factory is None:
        raise UnknownImageError(
            f"no guest image named {name!r}; available: {', '.join(image_names())} "
            "(plugins add images through the pytest_supermachine_image hook)"
        )
    image = factory()
    with _lock:
        return _instances.setdefault(real, image)


def _microguest() -> Image:
    from .microguest import MicroguestImage

    return MicroguestImage()


def _linux() -> Image:
    from .linux import LinuxImage

    return LinuxImage()


register_image("microguest", _microguest)
register_image("linux", _linux)
register_alias("default", "linux")
