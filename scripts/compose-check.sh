#!/usr/bin/env bash
# Build both images and run the Compose stack end to end on this machine (a development check, not
# CI: it needs root, about 15 minutes and a few GB of disk). Installs Debian's docker.io, Compose and
# debootstrap if missing, then runs scripts/compose_check.py, which starts its own dockerd with
# --bridge=none --iptables=false (host networking only, loopback traffic only), stops it by its pid
# at the end, and writes docs/deploy/compose-check.md.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
for tool in dockerd:docker.io docker-compose:docker-compose debootstrap:debootstrap; do
    command -v "${tool%%:*}" >/dev/null || missing+=("${tool#*:}")
done
if ((${#missing[@]})); then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi
[ -x .venv/bin/python ] || bash scripts/setup.sh
exec .venv/bin/python scripts/compose_check.py "$@"
