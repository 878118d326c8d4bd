"""Guest user code sees only the register state the guest kernel saves (issue 11).

Under kvm_pvm guest user code runs natively: XGETBV reports the XCR0 the CPU runs
the guest with. The pvm kernel context-switches only the FXSAVE area (x87, SSE), so
that XCR0 must enable nothing more, or glibc and every program that checks XCR0 use
AVX/AVX-512 registers that other guest processes then overwrite (SIGSEGV in ~5 % of
commands before kernel patch 0005). On hardware KVM the guest kernel uses XSAVE
and saves whatever it enables, so there is nothing to check.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pytest_supermachine.vmm.kvm import is_nested_pvm
from pytest_supermachine.vmm.machine import Machine

X87_SSE = 0b11

# Exits with the low byte of XCR0 as user mode sees it: no libc, so no AVX
# code of its own, and nothing but the instruction under test.
XGETBV_PROGRAM = r"""
void _start(void)
{
    unsigned int low, high;
    __asm__ volatile("xgetbv" : "=a"(low), "=d"(high) : "c"(0));
    __asm__ volatile("syscall" : : "a"(60), "D"(low & 0xff));
    for (;;)
        ;
}
"""


@pytest.fixture(scope="module")
def xgetbv_binary(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A static x86-64 program printing nothing, exiting with XCR0's low byte."""
    work = tmp_path_factory.mktemp("xgetbv")
    source, binary = work / "xgetbv.c", work / "xgetbv"
    source.write_text(XGETBV_PROGRAM)
    cmd = ["cc", "-O2", "-static", "-nostdlib", "-fno-pie", "-no-pie", "-o", binary, source]
    subprocess.run(cmd, check=True)
    return Path(binary).read_bytes()


def test_user_mode_xgetbv_reports_only_x87_and_sse_state_on_pvm(
    linux: Machine, xgetbv_binary: bytes
):
    if not is_nested_pvm():
        pytest.skip("hardware KVM: the guest kernel saves every state XCR0 enables")
    linux.write_file("/tmp/xgetbv", xgetbv_binary, mode=0o755)
    result = linux.run("/tmp/xgetbv", timeout=300)
    assert result.returncode == X87_SSE, (
        f"guest user mode runs with XCR0 low byte {result.returncode:#x}, expected "
        f"{X87_SSE:#x} (x87|SSE): AVX state is enabled that the pvm kernel never saves"
    )
