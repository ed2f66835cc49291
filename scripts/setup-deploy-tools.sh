#!/usr/bin/env bash
# Build (or reuse) the deployment tools' own venv: checkov, which scans the Kubernetes
# manifests and the Dockerfiles. Idempotent; safe to rerun.
#
# checkov pins dozens of libraries (boto3, networkx, pydantic ...) that clash with vLLM's
# environment, so it gets a venv of its own:
#   ${DELIBERATE_CACHE:-$HOME/.cache/deliberate}/tools-venv-<hash>
# The hash covers the pin, a revision number and the Python version: changing either builds
# a fresh venv; editing comments does not.
# Prints the venv path as its last line (tests read it from DELIBERATE_TOOLS_VENV, or
# recompute it with `scripts/setup-deploy-tools.sh --print-path`).
set -euo pipefail
cd "$(dirname "$0")/.."

CHECKOV_VERSION="3.3.30"
# Bump when the install steps below change in a way that needs a fresh venv.
TOOLS_REVISION=1
CACHE="${DELIBERATE_CACHE:-$HOME/.cache/deliberate}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3

hash=$(printf 'checkov==%s revision=%s python=%s' "$CHECKOV_VERSION" "$TOOLS_REVISION" \
  "$("$PY" -c 'import sys; print(sys.version_info[:2])')" | sha256sum | cut -c1-12)
VENV="$CACHE/tools-venv-$hash"

if [ "${1:-}" = "--print-path" ]; then
  echo "$VENV"
  exit 0
fi

log() { echo "[setup-deploy-tools] $*" >&2; }
# This machine's pip configuration names optional local indexes that may not exist; drop
# the resulting noise, keep real warnings and errors.
pip_quiet() { "$VENV/bin/pip" --quiet "$@" 2> >(grep -v "is ignored: it is neither" >&2); }

if [ ! -f "$VENV/.complete" ]; then
  log "building $VENV (checkov==$CHECKOV_VERSION: about a minute)"
  mkdir -p "$CACHE"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  pip_quiet install --upgrade pip
  pip_quiet install "checkov==$CHECKOV_VERSION"
  "$VENV/bin/checkov" --version >/dev/null
  touch "$VENV/.complete"
else
  log "reusing $VENV"
fi
echo "$VENV"
