"""Guests we build ourselves: the microguest (freestanding C) and the Linux agent (static C)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from ..errors import GuestBuildError
from ..package_data import package_path

#: The agent-protocol header both guests compile (``include/agent_protocol.h``): each build
#: puts it on its include path and into its cache key.
PROTOCOL_INCLUDE_DIR = package_path(__name__, "include")


def run_build_step(
    cmd: list[str], cwd: Path, *, what: str, install_hint: str, timeout: float
) -> None:
    """Run one compiler/linker step; any failure is a GuestBuildError carrying its output."""
    try:
        proc = subprocess.run(
            cmd,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        raise GuestBuildError(
            f"{what} needs {cmd[0]!r}, which is not installed or not on PATH; {install_hint}"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise GuestBuildError(f"{what} timed out after {timeout:g} s: {' '.join(cmd)}") from exc
    if proc.returncode != 0:
        raise GuestBuildError(
            f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stdout}"
        )
