"""One NIC as a machine attaches it: the card, its egress filter and a running libslirp network.

The device hub calls `build_nic` for a ``NetSpec``; everything the card needs
is made here so the hub only places and serves it. The network's poll loop
runs in the backend's own thread from the start (the guest may send its first
frame as soon as its driver is up); the card's frames-for-the-guest fd is
served by the hub's event thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from .device import DEFAULT_MAC, VirtioNet
from .policy import EgressFilter, EgressPolicy
from .slirp import SlirpBackend

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_MAC", "build_nic"]


def build_nic(
    allow: Sequence[str] | None,
    *,
    mac: str = DEFAULT_MAC,
    on_refusal: Callable[[str], None] | None = None,
) -> VirtioNet:
    """A `VirtioNet` whose egress is `allow` (None: anything) over a started `SlirpBackend`.

    A malformed pattern raises `EgressPolicyError` and a missing libslirp
    `SlirpUnavailableError`, both before any host resource is held. Every
    refusal goes to `on_refusal` and to this module's logger (WARNING), so it
    shows in pytest's log capture even when nobody reads the machine's log.
    """
    policy = EgressPolicy.from_setting(True if allow is None else list(allow))
    assert policy is not None
    egress = EgressFilter(policy)
    backend = SlirpBackend(egress.addressing)

    def refused(line: str) -> None:
        log.warning("%s", line)
        if on_refusal is not None:
            on_refusal(line)

    try:
        nic = VirtioNet(backend, egress, mac=mac, on_refusal=refused)
    except BaseException:
        backend.close()
        raise
    backend.start()
    return nic
