#!/usr/bin/env bash
# Stop what deploy/local/up.sh started: SIGTERM to the workers and the server, then Redis;
# SIGKILL whatever still runs after the grace period. Options: --run-dir DIR, --grace SECONDS.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
exec python3 "$here/launcher.py" down "$@"
