#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite.
# The house rules (layers via import-linter, no import circles, file size, `__all__`) are
# tests too (tests/test_layers.py), so a broken rule shows in pytest's summary like any other.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
