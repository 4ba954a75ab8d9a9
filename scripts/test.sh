#!/usr/bin/env bash
# Set up, lint, then run the whole test suite (starts its own redis-server and workers).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest -q --durations=15 "$@"
