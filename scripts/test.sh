#!/usr/bin/env bash
# Set up, lint, check the import rules (import-linter), then run the whole test suite (it starts its own
# redis-server and workers).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --browser
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/lint-imports --no-cache
exec .venv/bin/python -m pytest -q --durations=15 "$@"
