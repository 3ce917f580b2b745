#!/usr/bin/env bash
# Set up a virtual environment with Interlace and its test tools (idempotent).
# torch is installed first at exactly 2.13.0 (a CPU wheel): any looser spec would pull a
# multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
# Debian packages, installed only where missing, with apt-get, as root or through sudo; quiet.
# $1 says what goes without them (printed when they cannot be installed); the rest are the packages.
apt_install() {
    local without="$1"; shift
    local sudo=""
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "setup.sh: no apt-get here; install $* yourself, or $without" >&2
        return 0
    fi
    if [ "$(id -u)" -ne 0 ]; then
        if ! command -v sudo >/dev/null 2>&1; then
            echo "setup.sh: installing $* needs root (or sudo); without them $without" >&2
            return 0
        fi
        sudo="sudo -n"
    fi
    $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1 || \
        { $sudo apt-get update -qq >/dev/null 2>&1 && \
          $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1; } || \
        echo "setup.sh: could not install $* with apt-get; without them $without" >&2
}
# The server's process sandbox (layer 3): bubblewrap (namespaces) and libseccomp's Python
# binding; elsewhere the server still runs and reports the layer as partial.
if ! command -v bwrap >/dev/null 2>&1 || ! ls /usr/lib/python3/dist-packages/seccomp*.so >/dev/null 2>&1; then
    apt_install "the server's sandbox will be partial" bubblewrap python3-seccomp
fi
# The status page's browser test (tests/server/test_status_page.py): Debian's Chromium, its
# WebDriver (selenium, a test extra, drives it) and a font for the screenshots.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    apt_install "the status page's browser test is skipped here (and fails on CI)" \
        chromium chromium-driver fonts-liberation
fi
# The PostgreSQL job-store tests (tests/postgres.py starts a throwaway server): Debian's
# server binaries (initdb, pg_ctl in /usr/lib/postgresql/<version>/bin).
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then
    apt_install "the PostgreSQL job-store tests are skipped here (and fail on CI)" postgresql
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test,ray]"
