"""The recipe fits every kernel source it claims: each installed Debian ``linux-source-*``
besides the one the default image uses builds (``$SUPERMACHINE_KERNEL_SOURCE``) and boots
to the agent, which runs a command.

The default source is booted by the rest of this tier. Each other one costs a kernel build
(~10 min on 2 cores, cached by content) and a boot, so CI runs this only where such a
source is installed (``apt-get install linux-source-6.12``; bench/bench_kernel_sources.py
prints the numbers).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_supermachine.images import kernel
from pytest_supermachine.images.linux import LinuxImage

OTHER_SOURCES = sorted(
    p
    for p in kernel.SOURCE_SEARCH_DIR.glob("linux-source-*.tar.*")
    if p.is_file() and kernel.source_series(p) != kernel.PREFERRED_SERIES
)


@pytest.mark.skipif(
    not OTHER_SOURCES,
    reason=f"no linux-source other than {kernel.PREFERRED_SERIES} in {kernel.SOURCE_SEARCH_DIR} "
    "(apt-get install linux-source-6.12 to check the recipe on it)",
)
@pytest.mark.parametrize("source", OTHER_SOURCES, ids=lambda p: p.name)
def test_guest_from_another_kernel_source_runs_a_command(
    source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(kernel.SOURCE_ENV, str(source))
    monkeypatch.delenv(kernel.KERNEL_ENV, raising=False)
    image = LinuxImage()
    built = image.kernel()
    assert built.key == kernel.kernel_cache_key(built.variant, source=source)
    machine = image.boot(1, image.default_mem_mib, timeout=900)
    try:
        result = machine.run("uname -r", timeout=300)
    finally:
        machine.stop()
    assert result.ok, result
    assert result.stdout.decode().startswith(kernel.source_series(source) + ".")
