#!/usr/bin/env bash
# Sets up the test environment and runs the test suite: scripts/test.sh [pytest args]
# Tests marked slow are left out; `bash scripts/test.sh -m ""` runs every test, `-m slow` only those.
# Two workers (pytest-xdist), each taking whole test files: half of a test's time is one core's
# Python (imports, tracing), which the other worker's can overlap.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec .venv/bin/python -m pytest -q --durations=15 -n 2 --dist loadfile -m "not slow" "$@"
