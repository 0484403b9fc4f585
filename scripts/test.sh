#!/usr/bin/env bash
# Sets up the test environment and runs the test suite: scripts/test.sh [pytest args]
# Tests marked slow are left out; `bash scripts/test.sh -m ""` runs every test, `-m slow` only those.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec .venv/bin/python -m pytest -q --durations=15 -m "not slow" "$@"
