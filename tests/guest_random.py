"""A test that fails on a guest-random value, for the replay tests and bench/bench_replay.py.

`fails_on_a_repeated_value(command)` is the source of a one-test module whose test
fails only when its guest prints what an earlier run of it printed (kept in
``seen.json`` beside the module): the first run records its value and fails,
writing a failure capsule, so a replay of it fails exactly when the guest repeats
that value, and a replay that drew anything else passes.
"""

from __future__ import annotations

#: The guest command of each source of randomness: (image, command).
SOURCES = {
    "microguest rand": ("microguest", "rand 4"),
    "linux /dev/urandom": ("linux", "od -An -N16 -tx1 /dev/urandom"),
    "linux $RANDOM": ("linux", "echo $RANDOM $RANDOM $RANDOM"),
}

_TEMPLATE = """
import json, pathlib

SEEN = pathlib.Path(__file__).with_name("seen.json")

def test_random(microvm):
    value = microvm.run({command!r}, check=True).stdout.decode()
    seen = json.loads(SEEN.read_text()) if SEEN.exists() else []
    SEEN.write_text(json.dumps(seen + [value]))
    assert seen and value not in seen, f"guest printed {{value!r}}"
"""


def fails_on_a_repeated_value(command: str) -> str:
    """The module source (see the module docstring); values land in ``seen.json``."""
    return _TEMPLATE.format(command=command)


_TWO_TESTS = """
import json, pathlib

def record(name, vm):
    path = pathlib.Path(__file__).with_name("drawn.json")
    drawn = json.loads(path.read_text()) if path.exists() else {{}}
    drawn[name] = vm.run({command!r}, check=True).stdout.decode()
    path.write_text(json.dumps(drawn))

def test_one(microvm):
    record("one", microvm)

def test_two(microvm):
    record("two", microvm)
"""


def two_tests_drawing(command: str) -> str:
    """A module of two passing tests, each recording what `command` printed in its guest
    in ``drawn.json`` beside the module (``{"one": ..., "two": ...}``)."""
    return _TWO_TESTS.format(command=command)
