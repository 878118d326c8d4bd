"""`Image`: what a base snapshot is booted from, and what its cache key hashes.

An `Image` knows three things the plugin needs and nothing about pytest:

* `key_parts(vcpus, mem_mib)`: everything image-specific that changes the booted
  guest (its bytes, command line, devices). The plugin adds what every snapshot
  depends on (vCPUs, memory, snapshot and VM-state format versions, plugin version,
  host CPU/KVM facts), hashes the lot, and that hash names the base snapshot in the
  cache. A change in any part gives a new key, so a stale base is never reused.
* `boot(vcpus, mem_mib, timeout=, network=)`: a started `Machine` whose guest is
  *ready* (its agent answers), i.e. exactly the state worth snapshotting. `network`
  (``Machine(network=...)``: a NIC and its egress allow-list) is passed only when a
  test asks for a NIC, so images that cannot drive one need not accept it. An image
  with `supports_mounts` also takes ``mounts=`` (`FsSpec`s, vmm/fsmounts.py) and boots
  with those host directories mounted; the plugin asks only such images for mounts.
* `build()`: make sure its artifacts exist (for `supermachine image build`).

Images are found by name through the ``pytest_supermachine_image`` hook, whose
default implementation (plugin.py) serves the images in registry.py: those added
with `register_image`, then the bundled ones.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..vmm.machine import Machine


class Image(ABC):
    """A bootable guest image (see the module docstring for the contract)."""

    #: Registry name ("microguest", "linux", ...).
    name: str = ""
    #: One line for `supermachine image list` and the report header.
    description: str = ""
    default_vcpus: int = 1
    default_mem_mib: int = 64
    #: Whether `boot` takes ``mounts=`` (host directories over virtio-fs: Linux guests).
    supports_mounts: bool = False

    @abstractmethod
    def key_parts(self, vcpus: int, mem_mib: int) -> Mapping[str, bytes | str]:
        """Everything image-specific the booted guest depends on (builds the image if needed)."""

    @abstractmethod
    def boot(
        self, vcpus: int, mem_mib: int, *, timeout: float, network: bool | Sequence[str] = False
    ) -> Machine:
        """A started machine whose guest is ready; the caller owns (and stops) it.

        `network` is the machine's ``network=`` (docs/network.md); an image whose
        guest cannot use a NIC raises `SupermachineError` saying so.
        """

    def prepare(self, machine: Machine) -> None:
        """Make a machine restored from this image's snapshots behave as the image says.

        Called on every machine handed to a test; the default does nothing (an OCI
        image sets `run()`'s defaults and ``machine.image_config``).
        """
        return None

    def seed_guest(self, machine: Machine, seed: bytes, wall_ns: int) -> str:
        """Give a handed-out machine its test's `seed` and wall clock (ns since the epoch).

        Called on every machine handed to a test, after `prepare` and before the test
        runs anything. The default sends the agent protocol's SEED (the microguest
        seeds its ``rand`` built-in, an agent sets its clock) if the agent has
        ``CAP_SEED``, without waiting for its answer: the agent applies it before it
        reads the test's first request, and a failure fails that request
        (`AgentClient.seed` with ``wait=False``). Returns how the guest was seeded, for
        the failure capsule: ``"agent"``, or ``"none"`` when the agent cannot take a seed.
        """
        from ..vmm.agent import CAP_SEED  # lazy: the VMM is loaded only to run VMs

        agent = machine.agent()
        if not agent.agent.capabilities & CAP_SEED:
            return "none"
        agent.seed(seed, wall_ns, wait=False)
        return "agent"

    def build(self) -> str:
        """Build what the image needs if missing; returns a short description of the result."""
        return self.description

    def __repr__(self) -> str:
        return f"<Image {self.name}>"
