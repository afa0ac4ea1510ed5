#!/usr/bin/env bash
# Set up Callmesh on this machine: system packages, the Python environment in .venv/,
# and the models in the data directory ($CALLMESH_DATA_DIR, default .data/).
# Idempotent: a second run checks and does nothing.
#   scripts/setup.sh          what the demo needs
#   scripts/setup.sh --dev    plus test tools (pytest, buf, promtool) and the small test LLM
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0
[[ "${1:-}" == "--dev" ]] && dev=1
say() { printf '==> %s\n' "$*"; }

missing=()
command -v espeak-ng >/dev/null || missing+=(espeak-ng)
command -v ffmpeg >/dev/null || missing+=(ffmpeg)
if (( dev )); then
  command -v npm >/dev/null || missing+=(npm)
  command -v chromium >/dev/null || missing+=(chromium)   # the web page tests drive it headless
  command -v docker-compose >/dev/null || missing+=(docker-compose)   # validates docker-compose.yml offline
  compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing+=(postgresql)   # scale-out tests start one on loopback
  command -v text2wave >/dev/null || missing+=(festival festvox-kallpc16k)   # a second voice for the evaluation sets
  command -v kubectl >/dev/null || missing+=(kubernetes-client)   # renders deploy/k8s with kubectl kustomize
  command -v wrk >/dev/null || missing+=(wrk)   # the webhook benchmark's second client (bench/webhook_load.py)
  command -v promtool >/dev/null || missing+=(prometheus)   # promtool checks and unit-tests deploy/prometheus
fi
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
if (( ${#missing[@]} )); then
  say "installing system packages: ${missing[*]}"
  if [[ $(id -u) -ne 0 ]]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python3 - <<'PY' || { echo "Python 3.11 or newer is needed" >&2; exit 1; }
import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY

if [[ ! -x .venv/bin/python ]]; then
  say "creating .venv"
  python3 -m venv .venv
fi
stamp=.venv/.callmesh-installed
want="$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
if [[ ! -f $stamp || "$(cat "$stamp")" != "$want" ]]; then
  say "installing Python packages into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt -e '.[dev]'
  echo "$want" > "$stamp"
fi

if (( dev )) && [[ ! -x node_modules/.bin/buf ]]; then
  say "installing buf (npm @bufbuild/buf)"
  npm install --no-audit --no-fund --silent
fi

models=(whisper-base qwen2.5-coder-1.5b)
(( dev )) && models+=(qwen2.5-coder-0.5b)
say "models: ${models[*]}"
.venv/bin/python -m callmesh.models "${models[@]}"
say "setup done"
