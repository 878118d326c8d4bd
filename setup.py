"""setuptools shim: pyproject.toml holds the metadata; this only wires the cffi extension
(``pytest_supermachine.vmm._core``), which setuptools cannot declare from pyproject alone."""

from setuptools import setup

setup(cffi_modules=["pytest_supermachine/vmm/_build.py:ffibuilder"])
