#!/usr/bin/env bash
# The main job: install, check KVM, and boot the bundled microguest (console + timings).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/supermachine doctor
.venv/bin/supermachine demo
