#!/usr/bin/env bash
# The main job: install, check KVM, then a demo pytest session on the bundled default image
# (the Linux guest; its kernel is built on first use and cached). Extra arguments go to
# pytest, e.g. --supermachine-image=microguest for the millisecond test guest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/supermachine doctor
.venv/bin/python -m pytest examples/demo -v -p no:cacheprovider "$@"
