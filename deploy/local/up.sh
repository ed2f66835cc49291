#!/usr/bin/env bash
# Start Redis, the decoder server and two coprocessor workers as separate processes on this
# machine (the cluster's topology), and wait until all are ready. Options: --help.
#   deploy/local/up.sh                      # API on http://127.0.0.1:8000/v1
#   deploy/local/up.sh --workers 4 --run-dir /tmp/deliberate-local
# Uses `deliberate` from PATH; without one on PATH, the environment of scripts/setup.sh.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if ! command -v deliberate >/dev/null; then
  venv="$("$here/../../scripts/setup.sh")"
  export PATH="$venv/bin:$PATH"
fi
exec python3 "$here/launcher.py" up "$@"
