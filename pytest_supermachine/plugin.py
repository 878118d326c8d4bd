"""The pytest plugin (entry point `pytest11: supermachine`).

Loading it has no side effects: no /dev/kvm access, no builds, no VMs at import
or collection time. VMs are created lazily by the fixtures (a later issue); for
now the plugin registers its option group, ini names and marker, and reports
the KVM mode in the header.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("supermachine", "pytest-supermachine: a KVM microVM per test")
    group.addoption(
        "--supermachine-image",
        dest="supermachine_image",
        default=None,
        help="guest image for the microvm fixture (default: ini supermachine_image, else 'microguest')",
    )
    parser.addini("supermachine_image", "default guest image for the microvm fixture", default="")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "microvm(image=None, vcpus=None, mem_mib=None): configure the VM this test gets",
    )


def pytest_report_header(config: pytest.Config) -> str:
    from .doctor import kvm_summary

    return f"supermachine: {kvm_summary()}"
