"""The guests' C header of the agent protocol agrees with the host's Python.

``pytest_supermachine/guest/include/agent_protocol.h`` is compiled into a
small program that prints its constants and what its encoders write; the host
side (``pytest_supermachine.vmm.agent``) must read the same numbers and bytes.
Parsing the header's text instead would check the spelling, not what a C
compiler makes of it.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from pytest_supermachine.guest import PROTOCOL_INCLUDE_DIR
from pytest_supermachine.vmm import agent as P

pytestmark = [
    pytest.mark.unit,
    pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to compile the header"),
]

#: C name -> the value the host uses for it.
EXPECTED_CONSTANTS = {
    "AG_PORT": P.AGENT_PORT,
    "AG_READY_PORT": P.READY_PORT,
    "AG_HOST_CID": socket.VMADDR_CID_HOST,
    "AG_MAGIC": P.MAGIC,
    "AG_VERSION": P.PROTOCOL_VERSION,
    "AG_HDR": P.HEADER_SIZE,
    "AG_MIN_FRAME": P.MIN_FRAME,
    "AG_MAX_FRAME_LIMIT": P.MAX_FRAME,
    "AG_MAX_PING": P.MAX_PING,
    "AG_MAX_SOFTWARE": P.MAX_SOFTWARE,
    "AG_HELLO_FIXED": len(P.Hello(software=b"").encode_payload()),
    "AG_CAP_EXEC": P.CAP_EXEC,
    "AG_CAP_SHELL": P.CAP_SHELL,
    "AG_CAP_STDIN": P.CAP_STDIN,
    "AG_CAP_ENV": P.CAP_ENV,
    "AG_CAP_CWD": P.CAP_CWD,
    "AG_CAP_FILES": P.CAP_FILES,
    "AG_CAP_KILL": P.CAP_KILL,
    "AG_CAP_TIMEOUT": P.CAP_TIMEOUT,
    "AG_CAP_SEED": P.CAP_SEED,
    "AG_MAX_SEED": P.MAX_SEED,
    "SEED_RESEED": P.SEED_RESEED,
    "AG_CAP_ALL": P.CAP_ALL,
    "AG_CAP_USER": P.CAP_USER,
    "AG_CAP_TCP": P.CAP_TCP,
    "EXEC_STDIN": P.EXEC_STDIN,
    "EXEC_SHELL": P.EXEC_SHELL,
    "EXEC_USER": P.EXEC_USER,
    "AG_MAX_GROUPS": P.MAX_GROUPS,
    "EXIT_SIGNALED": P.EXIT_SIGNALED,
    "EXIT_TIMED_OUT": P.EXIT_TIMED_OUT,
    "PUT_APPEND": P.PUT_APPEND,
    "FILE_MORE": P.FILE_MORE,
    **{f"MSG_{name}": code for code, name in P.TYPE_NAMES.items()},
}

# A frame header and a HELLO the program encodes, with values that show byte order.
FRAME = {"type": P.MsgType.FILE_DATA, "request_id": 0x01020304, "len": 0x00050607}
HELLO = {"caps": 0x0102030405060708, "max_frame": 0x10000, "inflight": 7, "name": "probe 1"}
SEED = b"replay me"

PRINT_CONSTANTS = "\n".join(
    f'    printf("const {name} %llu\\n", (unsigned long long)({name}));'
    for name in EXPECTED_CONSTANTS
)

PROGRAM = f"""
#include <stdio.h>
#include "agent_protocol.h"

static void hex(const char *what, const uint8_t *p, uint32_t n)
{{
    printf("%s ", what);
    for (uint32_t i = 0; i < n; i++)
        printf("%02x", p[i]);
    printf("\\n");
}}

int main(void)
{{
{PRINT_CONSTANTS}
    for (uint32_t t = 0; t <= 0xffff; t++)
        if (ag_known_type((uint16_t)t))
            printf("known %u\\n", t);
    uint8_t frame[AG_HDR];
    ag_header_store(frame, {FRAME["type"]}, {FRAME["request_id"]}u, {FRAME["len"]}u);
    hex("frame", frame, AG_HDR);
    struct ag_header h = ag_header_load(frame);
    printf("loaded %u %u %u %u\\n", h.len, h.type, h.flags, h.request_id);
    uint8_t hello[AG_HELLO_FIXED + 64];
    uint32_t n = ag_hello_store(hello, {HELLO["caps"]}ull, {HELLO["max_frame"]}u,
                                {HELLO["inflight"]}u, "{HELLO["name"]}");
    hex("hello", hello, n);
    uint64_t rng = ag_seed_state((const uint8_t *)"{SEED.decode()}", {len(SEED)}u);
    printf("rng %llu", (unsigned long long)rng);
    for (int i = 0; i < 3; i++)
        printf(" %llu", (unsigned long long)ag_splitmix64(&rng));
    printf("\\n");
    return 0;
}}
"""


@pytest.fixture(scope="module")
def printed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """What the compiled program prints, by the first word of each line."""
    work = tmp_path_factory.mktemp("agent_protocol_h")
    (work / "probe.c").write_text(PROGRAM)
    exe = work / "probe"
    cmd = ["gcc", "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-I", str(PROTOCOL_INCLUDE_DIR)]
    build = subprocess.run(
        [*cmd, "-o", str(exe), str(work / "probe.c")], capture_output=True, text=True
    )
    assert build.returncode == 0, build.stderr
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    lines: dict[str, list[str]] = {}
    for line in out.splitlines():
        word, rest = line.split(" ", 1)
        lines.setdefault(word, []).append(rest)
    return lines


def test_every_constant_has_the_hosts_value(printed: dict[str, list[str]]) -> None:
    in_c = {name: int(value) for name, value in (line.split() for line in printed["const"])}
    assert in_c == EXPECTED_CONSTANTS


def test_the_known_message_types_are_the_hosts(printed: dict[str, list[str]]) -> None:
    assert [int(t) for t in printed["known"]] == sorted(P.TYPE_NAMES)


def test_a_stored_frame_header_is_the_hosts_header(printed: dict[str, list[str]]) -> None:
    expected = P.HEADER.pack(FRAME["len"], FRAME["type"], 0, FRAME["request_id"])
    assert bytes.fromhex(printed["frame"][0]) == expected


def test_a_loaded_frame_header_has_the_stored_fields(printed: dict[str, list[str]]) -> None:
    fields = [int(v) for v in printed["loaded"][0].split()]
    assert fields == [FRAME["len"], FRAME["type"], 0, FRAME["request_id"]]


def test_a_stored_hello_decodes_on_the_host(printed: dict[str, list[str]]) -> None:
    hello = P.Hello.decode(bytes.fromhex(printed["hello"][0]))
    assert hello == P.Hello(
        version=P.PROTOCOL_VERSION,
        capabilities=HELLO["caps"],
        max_frame=HELLO["max_frame"],
        max_inflight=HELLO["inflight"],
        software=HELLO["name"].encode(),
    )


def test_a_seed_gives_the_hosts_generator_sequence(printed: dict[str, list[str]]) -> None:
    state = P.seed_state(SEED)
    expected = [state]
    for _ in range(3):
        state, value = P.splitmix64(state)
        expected.append(value)
    assert [int(v) for v in printed["rng"][0].split()] == expected


def test_the_header_needs_no_c_library(tmp_path: Path) -> None:
    # Only the compiler's own headers (stdint.h) are on the path, as in the microguest.
    compiler_include = subprocess.run(
        ["gcc", "-print-file-name=include"], capture_output=True, text=True, check=True
    ).stdout.strip()
    unit = tmp_path / "freestanding.c"
    unit.write_text('#define AG_HEX "%x"\n#include "agent_protocol.h"\n')
    cmd = [
        "gcc",
        "-std=gnu11",
        "-ffreestanding",
        "-nostdinc",
        "-isystem",
        compiler_include,
        "-I",
        str(PROTOCOL_INCLUDE_DIR),
        "-Wall",
        "-Wextra",
        "-Werror",
        "-fsyntax-only",
        str(unit),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
