"""SEED on the wire, the per-handout seeds, and finding the kernel CRNG in a vmlinux."""

from __future__ import annotations

import errno
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from pytest_supermachine.images.kernel_rng import (
    RESEED_HOLD_TICKS,
    KernelRngSymbols,
    _elf_symbols,
    crng_key,
    write_crng_state,
)
from pytest_supermachine.session.seed import GuestSeeds, handout_seed
from pytest_supermachine.vmm import agent as P
from pytest_supermachine.vmm.memory import DeviceMemory, GuestMemory
from tests.agent_peer import peer_pair
from tests.waiting import wait_until


def test_seed_payload_is_flags_wall_clock_then_the_seed():
    payload = P.Seed(b"abc", wall_ns=5, reseed=True).encode_payload()
    assert payload == struct.pack("<IQ", P.SEED_RESEED, 5) + b"abc"
    assert P.Seed.decode(payload) == P.Seed(b"abc", 5, True)


@pytest.mark.parametrize(
    "payload",
    [
        struct.pack("<IQ", 0, 1),  # no seed byte
        struct.pack("<IQ", 0, 1) + b"x" * (P.MAX_SEED + 1),
        struct.pack("<IQ", 2, 1) + b"x",  # unknown flag
        b"\0" * 11,
    ],
)
def test_a_malformed_seed_is_a_protocol_error(payload: bytes):
    with pytest.raises(P.AgentProtocolError):
        P.Seed.decode(payload)


def test_client_seed_sets_the_agents_generator_and_clock():
    host, peer = peer_pair()
    with P.AgentClient(host) as client:
        client.seed(b"per-test", wall_ns=1_700_000_000_000_000_000)
        first = client.run(["rand", "2"]).stdout
        client.seed(b"per-test")
        assert client.run(["rand", "2"]).stdout == first
        client.seed(b"another test")
        assert client.run(["rand", "2"]).stdout != first
    assert peer.wall_ns == 1_700_000_000_000_000_000
    peer.close()


def test_client_seed_needs_the_capability():
    host, peer = peer_pair(capabilities=P.CAP_ALL & ~P.CAP_SEED)
    with P.AgentClient(host) as client, pytest.raises(P.AgentError, match="seeding"):
        client.seed(b"x")
    peer.close()


#: How an agent that cannot set the clock answers a SEED.
REFUSED = P.Error(errno.EPERM, b"cannot set the clock")


def test_a_posted_seed_is_applied_before_the_next_command():
    host, peer = peer_pair()
    with P.AgentClient(host) as client:
        client.seed(b"per-test")
        expected = client.run(["rand", "2"]).stdout
        client.seed(b"per-test", wall_ns=1_700_000_000_000_000_000, wait=False)
        assert client.run(["rand", "2"]).stdout == expected
        assert client.session_state() is not None  # the posted request is closed
    assert peer.wall_ns == 1_700_000_000_000_000_000
    peer.close()


def test_a_posted_seed_that_fails_fails_the_next_call_once():
    host, peer = peer_pair(seed_answer=REFUSED)
    with P.AgentClient(host) as client:
        client.seed(b"per-test", wait=False)
        with pytest.raises(P.AgentRemoteError, match="seed the guest") as failed:
            client.run("true")
        assert failed.value.errno == errno.EPERM
        assert client.run("true").ok
    peer.close()


def test_a_posted_seed_answered_with_neither_ok_nor_error_fails_the_connection():
    host, peer = peer_pair(seed_answer=P.Pong(b"??"))
    with P.AgentClient(host) as client:
        client.seed(b"per-test", wait=False)
        with pytest.raises(P.AgentProtocolError, match="seed the guest"):
            client.run("true")
        assert client.closed
    peer.close()


def test_settle_waits_for_a_posted_seed_and_raises_its_failure():
    host, peer = peer_pair(seed_answer=REFUSED)
    with P.AgentClient(host) as client:
        client.seed(b"per-test", wait=False)
        with pytest.raises(P.AgentRemoteError, match="seed the guest"):
            client.settle()
        client.settle()  # nothing posted any more
    peer.close()


def test_an_idle_client_carries_its_session_once_the_posted_answer_has_arrived():
    host, peer = peer_pair()
    with P.AgentClient(host) as client:
        client.seed(b"per-test", wait=False)
        # the peer answers from its own thread
        assert wait_until(lambda: client.session_state() is not None, poll=0.001)
    peer.close()


def test_posting_to_an_agent_with_one_slot_waits_for_the_answer():
    host, peer = peer_pair(max_inflight=1)
    with P.AgentClient(host) as client:
        client.seed(b"per-test", wait=False)
        assert client.session_state() is not None
        assert client.run("true").ok
    peer.close()


def test_handout_seeds_differ_by_test_and_handout_and_repeat_for_the_same():
    seeds = {
        handout_seed(s, nodeid, i)
        for s in (1, 2)
        for nodeid in ("t.py::a", "t.py::b")
        for i in (1, 2)
    }
    assert len(seeds) == 8
    assert handout_seed(7, "t.py::a", 1) == handout_seed(7, "t.py::a", 1)


def test_the_seed_option_wins_and_a_replay_uses_the_capsules_seed_and_clock():
    assert GuestSeeds(None, option=5, session_id="s").session_seed == 5
    capsule = {
        "seeds": {"supermachine_seed": 42},
        "vms": [{"seed": {"handout": 1, "wall_ns": 123}}],
    }
    replay = GuestSeeds(None, option=5, session_id="s", replay=capsule)
    assert replay.session_seed == 42
    assert replay.for_handout("t.py::a", 1).wall_ns == 123
    assert replay.for_handout("t.py::a", 1).seed == handout_seed(42, "t.py::a", 1)


def test_without_an_option_the_session_seed_follows_the_session_id():
    a, b = (
        GuestSeeds(None, option=None, session_id="x"),
        GuestSeeds(None, option=None, session_id="x"),
    )
    assert a.session_seed == b.session_seed
    assert a.source == "random (this session)"
    assert GuestSeeds(None, option=None, session_id="y").session_seed != a.session_seed


def test_crng_keys_are_32_bytes_and_differ_by_seed():
    assert len(crng_key(b"a")) == 32
    assert crng_key(b"a") != crng_key(b"b")


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build an ELF")
def test_symbols_are_read_from_the_elf_symbol_table(tmp_path: Path):
    source = tmp_path / "s.c"
    source.write_text(
        "static long base_crng[6] = {1};\nlong jiffies;\nlong *p(void){return base_crng;}\n"
    )
    obj = tmp_path / "s.o"
    subprocess.run(["gcc", "-c", "-O0", "-o", str(obj), str(source)], check=True)
    nm = subprocess.run(["nm", str(obj)], capture_output=True, text=True, check=True).stdout
    expected = {
        line.split()[2]: int(line.split()[0], 16)
        for line in nm.splitlines()
        if line.split()[-1] in ("base_crng", "jiffies") and len(line.split()) == 3
    }
    assert _elf_symbols(obj, ("base_crng", "jiffies", "missing")) == expected


SYMBOLS = KernelRngSymbols(base_crng=0x3000, crng_init=0x5000, jiffies=0x6000, linux_banner=0x7000)


def guest_with_a_kernel(banner: bytes) -> DeviceMemory:
    """Guest RAM holding what `write_crng_state` reads: a banner, a CRNG, jiffies."""
    guest = GuestMemory.from_bytearray(bytearray(0x8000))
    guest.write(SYMBOLS.linux_banner, banner)
    guest.write_u64(SYMBOLS.base_crng + 40, 7)  # generation
    guest.write_u64(SYMBOLS.jiffies, 1000)
    guest.write_u32(SYMBOLS.crng_init, 1)  # CRNG_EARLY
    return DeviceMemory(guest)


def test_the_crng_gets_the_seeds_key_a_new_generation_and_a_late_birth():
    mem = guest_with_a_kernel(b"Linux version 6.1.192 (x@y)")
    assert write_crng_state(mem, SYMBOLS, b"seed")
    guest = mem.guest
    assert guest.read(SYMBOLS.base_crng, 32) == crng_key(b"seed")
    assert guest.read_u64(SYMBOLS.base_crng + 40) == 8
    assert guest.read_u64(SYMBOLS.base_crng + 32) == 1000 + RESEED_HOLD_TICKS
    assert guest.read_u32(SYMBOLS.crng_init) == 2  # CRNG_READY
    assert {0x3000 >> 12, 0x5000 >> 12} <= mem.written_pages()  # seen by reset and diffs


def kernel_would_reseed(birth: int, jiffies: int, interval: int) -> bool:
    """Linux 6.1's ``time_is_before_jiffies(birth + interval)`` on 64-bit unsigned longs."""
    return ((birth + interval - jiffies) & ((1 << 64) - 1)) >= 1 << 63


@pytest.mark.parametrize("age_s", [60, 3600 + 1, 86400, 10 * 365 * 86400])
def test_no_time_based_reseed_however_old_the_restored_snapshot_is(age_s: int):
    # The host reads the snapshot's jiffies; after the restore the guest's clock jumps
    # ahead by the snapshot's age. A reseed would mix the TSC in: no replay would repeat.
    mem = guest_with_a_kernel(b"Linux version 6.1.192 (x@y)")
    assert write_crng_state(mem, SYMBOLS, b"seed")
    birth = mem.guest.read_u64(SYMBOLS.base_crng + 32)
    assert not kernel_would_reseed(birth, 1000 + age_s * SYMBOLS.hz, 60 * SYMBOLS.hz)


def test_a_kernel_of_unknown_layout_is_left_alone():
    mem = guest_with_a_kernel(b"Linux version 6.6.1 (x@y)")
    assert not write_crng_state(mem, SYMBOLS, b"seed")
    assert mem.guest.read(SYMBOLS.base_crng, 32) == bytes(32)
    assert not mem.written_pages()
