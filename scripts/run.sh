#!/usr/bin/env bash
# Set up, then start Redis (unless PRISM_REDIS_URL is set), a worker and the API.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/prism up "$@"
