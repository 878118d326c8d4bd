#!/usr/bin/env bash
# Builds dist/*.tar.gz (the sources: guests are built on the installing machine) and
# dist/*.whl, a linux_x86_64 wheel that carries its guests: the compiled C core plus the
# microguest, the Linux agent, the initramfs and the guest kernel, staged from the user cache
# (built first if missing: the kernel takes minutes) by `python -m pytest_supermachine.bundle`.
# The installed wheel needs no compiler and no kernel source. Run after scripts/bootstrap.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
out=${1:-dist}
bundled=pytest_supermachine/bundled
rm -rf "$bundled" build
trap 'rm -rf "$bundled" build' EXIT
"$PY" -m build --sdist --outdir "$out" .
"$PY" -m pytest_supermachine.bundle "$bundled"
"$PY" -m build --wheel --outdir "$out" .
ls -l "$out"
