#!/usr/bin/env bash
# The main job: start an Interlace server on its embedded default (the built-in demo model,
# SQLite job store, local result directory) and run the quick start against it: a trace run
# locally, the same trace under remote='local' (the faithful simulation) and with remote=True.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
WORK="$(mktemp -d)"
PORT="${INTERLACE_PORT:-$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}"
export INTERLACE_CACHE_DIR="$WORK/cache" INTERLACE_CONFIG_DIR="$WORK/config"
KEY="$(.venv/bin/interlace keys create --name demo --data-dir "$WORK/server" | grep -m1 "^il_")"
.venv/bin/interlace serve --data-dir "$WORK/server" --port "$PORT" > "$WORK/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true; rm -rf "$WORK"' EXIT
for _ in $(seq 1 120); do
    if .venv/bin/python -c "import httpx,sys; httpx.get('http://127.0.0.1:$PORT/v1/info', timeout=1).raise_for_status()" 2>/dev/null; then break; fi
    if ! kill -0 $SERVER 2>/dev/null; then cat "$WORK/server.log"; exit 1; fi
    sleep 0.5
done
echo "Interlace server on http://127.0.0.1:$PORT (log: $WORK/server.log)"
INTERLACE_HOST="http://127.0.0.1:$PORT" INTERLACE_API_KEY="$KEY" .venv/bin/python examples/quickstart.py
