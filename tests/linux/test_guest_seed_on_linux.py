"""The Linux guest's randomness is a function of the seed it is handed (`LinuxImage.seed_guest`).

What the plugin relies on for replay, one level down: a machine reset to its
snapshot and seeded again with the same seed reads the same ``/dev/urandom``
bytes and ``$RANDOM`` values; another seed reads others. Why it takes the host
writing the CRNG key: images/kernel_rng.py.
"""

from __future__ import annotations

import time

from pytest_supermachine.images.kernel_rng import kernel_rng_symbols
from pytest_supermachine.images.linux import LinuxImage
from pytest_supermachine.vmm.machine import Machine

DRAW = "od -An -N16 -tx1 /dev/urandom; echo $RANDOM $RANDOM"


def draw(machine: Machine, image: LinuxImage, seed: bytes) -> tuple[str, str]:
    machine.reset()
    assert image.seed_guest(machine, seed, time.time_ns()) == "kernel+agent"
    out = machine.run(DRAW, check=True).stdout.decode().splitlines()
    return out[0], out[1]


def test_the_bundled_kernel_has_the_crng_symbols(linux_image: LinuxImage):
    assert kernel_rng_symbols(linux_image.kernel().vmlinux) is not None


def test_the_same_seed_draws_the_same_values_after_reset(linux: Machine, linux_image: LinuxImage):
    first = draw(linux, linux_image, b"seed one")
    assert draw(linux, linux_image, b"seed one") == first


def test_another_seed_draws_other_values(linux: Machine, linux_image: LinuxImage):
    urandom, random = draw(linux, linux_image, b"seed one")
    other_urandom, other_random = draw(linux, linux_image, b"seed two")
    assert other_urandom != urandom
    assert other_random != random


def test_the_guest_clock_is_the_seeds_wall_clock(linux: Machine, linux_image: LinuxImage):
    linux.reset()
    linux_image.seed_guest(linux, b"clock", 1_000_000_000 * 2_000_000_000)  # 2033-05-18
    assert linux.run("date -u +%Y-%m-%d", check=True).stdout == b"2033-05-18\n"
