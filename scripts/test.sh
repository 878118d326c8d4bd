#!/usr/bin/env bash
# The test suite: install (scripts/bootstrap.sh), lint and format check, then every tier with pytest.
# Extra arguments go to pytest (e.g. -k, -x, -n 2).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/actionlint .github/workflows/*.yml
set +e
.venv/bin/python -m pytest -ra -p no:cacheprovider "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then
  echo "pytest collected no tests: that counts as a failure" >&2
  exit 1
fi
exit $rc
