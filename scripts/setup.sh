#!/usr/bin/env bash
# Set up a virtual environment with Interlace and its test tools (idempotent).
# torch is installed first at exactly 2.13.0 (a CPU wheel): any looser spec would pull a
# multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
# The server's process sandbox (layer 3): bubblewrap (namespaces) and libseccomp's Python
# binding. Installed only where missing, with apt-get, as root or through sudo; elsewhere the
# server still runs and reports the layer as partial.
if command -v apt-get >/dev/null 2>&1 && { ! command -v bwrap >/dev/null 2>&1 || \
        ! ls /usr/lib/python3/dist-packages/seccomp*.so >/dev/null 2>&1; }; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
    if [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; then
        $SUDO apt-get install -y -qq --no-install-recommends bubblewrap python3-seccomp >/dev/null 2>&1 || \
            { $SUDO apt-get update -qq >/dev/null 2>&1 && \
              $SUDO apt-get install -y -qq --no-install-recommends bubblewrap python3-seccomp >/dev/null 2>&1; } || \
            echo "setup.sh: could not install bubblewrap python3-seccomp; the server's sandbox will be partial" >&2
    fi
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
