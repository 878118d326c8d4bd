"""Whom a command runs as: a user spec (``name``, ``uid``, ``name:group``, ``uid:gid``) made numeric.

Resolved the way runc (and so docker and podman) resolve an image's ``User``,
against the guest's ``/etc/passwd`` and ``/etc/group`` text:

* the user part is a uid if it is all digits, else a name; the first passwd
  entry with that uid or name gives the uid, the primary gid and the home
  directory; a uid without an entry is still valid (gid 0, home ``/``), a name
  without one is a `UserNotFound`;
* a group part, if given, replaces the primary gid (a gid without an entry is
  still valid, a name without one is a `UserNotFound`);
* without a group part, the supplementary groups are those whose member list
  names the user (what ``initgroups`` gives a login); with one, there are none.

Pure functions over bytes: the caller reads the files (from an image's ext4 or
a running guest) and the agent is told only numbers (`RunAs`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .messages import RunAs


class UserNotFound(ValueError):
    """A user or group name is not in the guest's /etc/passwd or /etc/group."""


@dataclass(frozen=True)
class ResolvedUser:
    """A user spec made numeric, and the home directory run() sets as ``HOME``."""

    spec: str
    run_as: RunAs
    home: str


def _rows(text: bytes | None) -> list[list[str]]:
    if not text:
        return []
    lines = text.decode("utf-8", "replace").splitlines()
    return [line.split(":") for line in lines if line and not line.startswith("#")]


def _id(field: str) -> int | None:
    return int(field) if field.isdigit() else None


def resolve_user(spec: str | int, passwd: bytes | None, group: bytes | None) -> ResolvedUser:
    """`spec` as uid, gid, supplementary groups and home (module docstring for the rules)."""
    text = str(spec).strip()
    if not text:
        raise ValueError("an empty user spec (give a name or a uid, optionally ':group')")
    user, _, grp = text.partition(":")
    uid_arg = _id(user)
    entry = next(
        (
            row
            for row in _rows(passwd)
            if len(row) >= 4 and (row[2] == user if uid_arg is not None else row[0] == user)
        ),
        None,
    )
    if entry is not None and _id(entry[2]) is not None and _id(entry[3]) is not None:
        uid, gid = int(entry[2]), int(entry[3])
        home = entry[5] if len(entry) > 5 and entry[5] else "/"
    elif uid_arg is not None:
        uid, gid, home = uid_arg, 0, "/"
    else:
        raise UserNotFound(f"user {user!r} is not in the guest's /etc/passwd")
    groups: tuple[int, ...] = ()
    if grp:
        gid_arg = _id(grp)
        if gid_arg is not None:
            gid = gid_arg
        else:
            row = next((r for r in _rows(group) if len(r) >= 3 and r[0] == grp), None)
            if row is None or _id(row[2]) is None:
                raise UserNotFound(f"group {grp!r} is not in the guest's /etc/group")
            gid = int(row[2])
    elif entry is not None:
        name = entry[0]
        groups = tuple(
            dict.fromkeys(
                int(r[2])
                for r in _rows(group)
                if len(r) >= 4 and _id(r[2]) is not None and name in r[3].split(",")
            )
        )
    return ResolvedUser(text, RunAs(uid, gid, groups), home)


def resolve_in_guest(
    spec: str | int, read: Callable[[str], bytes], missing: type[Exception]
) -> ResolvedUser:
    """`resolve_user` against the files `read` returns (a guest without one raises `missing`)."""

    def table(path: str) -> bytes | None:
        try:
            return read(path)
        except missing:
            return None

    return resolve_user(spec, table("/etc/passwd"), table("/etc/group"))


__all__ = ["ResolvedUser", "UserNotFound", "resolve_in_guest", "resolve_user"]
