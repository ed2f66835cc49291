#!/usr/bin/env bash
# Build (or reuse) the deployment tools' own venv: checkov, which scans the Kubernetes
# manifests and the Dockerfiles. Idempotent; safe to rerun.
#
# checkov pins dozens of libraries (boto3, networkx, pydantic ...) that clash with vLLM's
# environment, so it gets a venv of its own:
#   ${DELIBERATE_CACHE:-$HOME/.cache/deliberate}/tools-venv-<hash of this file>
# The hash covers this script, so changing a pin builds a fresh venv.
# Prints the venv path as its last line (tests read it from DELIBERATE_TOOLS_VENV, or
# recompute it with `scripts/setup-deploy-tools.sh --print-path`).
set -euo pipefail
cd "$(dirname "$0")/.."

CHECKOV_VERSION="3.3.30"
CACHE="${DELIBERATE_CACHE:-$HOME/.cache/deliberate}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3

hash=$(sha256sum scripts/setup-deploy-tools.sh | cut -c1-12)
VENV="$CACHE/tools-venv-$hash"

if [ "${1:-}" = "--print-path" ]; then
  echo "$VENV"
  exit 0
fi

log() { echo "[setup-deploy-tools] $*" >&2; }

if [ ! -f "$VENV/.complete" ]; then
  log "building $VENV (checkov==$CHECKOV_VERSION: about a minute)"
  mkdir -p "$CACHE"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  "$VENV/bin/pip" install --quiet "checkov==$CHECKOV_VERSION"
  "$VENV/bin/checkov" --version >/dev/null
  touch "$VENV/.complete"
else
  log "reusing $VENV"
fi
echo "$VENV"
