#!/usr/bin/env bash
# Install everything the project needs on a Debian machine with Python 3.11: redis-server from apt
# (and, with --browser, what the tests need besides: Debian's chromium and chromium-driver for the
# browser tests, orthanc and orthanc-dicomweb as the tests' PACS), then a virtual environment in
# .venv with pinned packages. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=()
command -v redis-server >/dev/null 2>&1 || packages+=(redis-server)
if [ "${1:-}" = "--browser" ]; then
    command -v chromium >/dev/null 2>&1 || packages+=(chromium)
    command -v chromedriver >/dev/null 2>&1 || packages+=(chromium-driver)
    command -v Orthanc >/dev/null 2>&1 || packages+=(orthanc)
    ls /usr/share/orthanc/plugins/libOrthancDicomWeb.so* >/dev/null 2>&1 || packages+=(orthanc-dicomweb)
fi
if [ ${#packages[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${packages[@]}" >/dev/null
fi

PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: an unpinned resolve would pull a newer multi-GB CUDA build
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e '.[test]'
