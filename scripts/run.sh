#!/usr/bin/env bash
# Set up, then start Redis (unless PRISM_REDIS_URL is set), a worker and the API.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Local quick start: API keys off unless configured (see README "API keys").
if [ -z "${PRISM_API_KEYS_FILE:-}" ]; then
    export PRISM_AUTH="${PRISM_AUTH:-off}"
fi
exec .venv/bin/prism up "$@"
