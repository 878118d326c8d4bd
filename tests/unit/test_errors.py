"""Errors that carry the guest console: the tail is in the message and on the exception."""

import pytest

from pytest_supermachine.errors import (
    CONSOLE_TAIL_HEADER,
    ConsoleTailError,
    GuestCrashed,
    GuestTimeout,
    MachineError,
)


@pytest.mark.parametrize("error", [GuestCrashed, GuestTimeout])
def test_console_tail_follows_the_message_under_its_header(error: type[ConsoleTailError]) -> None:
    exc = error("guest stopped", "last line\n")
    assert str(exc) == f"guest stopped\n{CONSOLE_TAIL_HEADER}\nlast line\n"
    assert exc.console_tail == "last line\n"


def test_an_empty_console_tail_leaves_the_message_alone() -> None:
    exc = GuestTimeout("guest not ready")
    assert str(exc) == "guest not ready"
    assert exc.console_tail == ""


@pytest.mark.parametrize("error", [GuestCrashed, GuestTimeout])
def test_console_tail_errors_are_machine_errors(error: type[ConsoleTailError]) -> None:
    assert issubclass(error, MachineError)
    assert issubclass(error, ConsoleTailError)
