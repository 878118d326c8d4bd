"""Whom a command runs as: user specs resolved as docker resolves an image's User, and EXEC_USER on the wire."""

from __future__ import annotations

import pytest

from pytest_supermachine.vmm import agent as P
from pytest_supermachine.vmm.agent import AgentProtocolError, RunAs, UserNotFound, resolve_user

pytestmark = pytest.mark.unit

PASSWD = b"""root:x:0:0:root:/root:/bin/sh
# a comment line
app:x:1000:1001:App:/home/app:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
"""
GROUP = b"""root:x:0:
app:x:1001:
staff:x:50:app,other
audio:x:29:app
nogroup:x:65534:
"""


@pytest.mark.parametrize(
    ("spec", "run_as", "home"),
    [
        ("app", RunAs(1000, 1001, (50, 29)), "/home/app"),  # member lists give the groups
        ("1000", RunAs(1000, 1001, (50, 29)), "/home/app"),  # a uid finds its entry too
        (1000, RunAs(1000, 1001, (50, 29)), "/home/app"),
        ("app:staff", RunAs(1000, 50, ()), "/home/app"),  # an explicit group: no others
        ("app:7", RunAs(1000, 7, ()), "/home/app"),
        ("nobody", RunAs(65534, 65534, ()), "/nonexistent"),
        ("4242", RunAs(4242, 0, ()), "/"),  # a uid without an entry is still valid
        ("4242:4343", RunAs(4242, 4343, ()), "/"),
        ("root", RunAs(0, 0, ()), "/root"),
    ],
)
def test_a_user_spec_is_resolved_like_docker_does(spec, run_as: RunAs, home: str) -> None:
    resolved = resolve_user(spec, PASSWD, GROUP)
    assert (resolved.run_as, resolved.home) == (run_as, home)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("ghost", "user 'ghost' is not in the guest's /etc/passwd"),
        ("app:ghosts", "group 'ghosts' is not in the guest's /etc/group"),
    ],
)
def test_a_name_the_guest_does_not_have_is_an_error_naming_it(spec: str, message: str) -> None:
    with pytest.raises(UserNotFound, match=message):
        resolve_user(spec, PASSWD, GROUP)


def test_without_passwd_only_numeric_users_resolve() -> None:
    assert resolve_user("1:2", None, None).run_as == RunAs(1, 2, ())
    with pytest.raises(UserNotFound):
        resolve_user("app", None, None)


def test_exec_user_round_trips_after_env() -> None:
    msg = P.Exec((b"id",), (b"A=1",), b"/srv", 0, False, False, RunAs(65534, 65534, (100, 29)))
    payload = msg.encode_payload()
    assert payload.endswith(b"".join(v.to_bytes(4, "little") for v in (65534, 65534, 2, 100, 29)))
    assert P.Exec.decode(payload) == msg
    assert int.from_bytes(payload[:4], "little") == P.EXEC_USER


def test_an_exec_without_user_is_byte_for_byte_version_1() -> None:
    payload = P.Exec((b"id",)).encode_payload()
    assert int.from_bytes(payload[:4], "little") == 0
    assert P.Exec.decode(payload).user is None


def test_exec_user_with_more_groups_than_announced_is_a_protocol_error() -> None:
    payload = P.Exec((b"id",), user=RunAs(1, 1, (5,))).encode_payload()
    with pytest.raises(AgentProtocolError):
        P.Exec.decode(payload[:-4])  # ngroups says 1, no group follows


@pytest.mark.parametrize("bad", [-1, 0xFFFFFFFF, 1 << 32])
def test_ids_outside_linuxs_range_are_refused(bad: int) -> None:
    with pytest.raises(ValueError, match="not a valid Linux id"):
        RunAs(bad, 0)
