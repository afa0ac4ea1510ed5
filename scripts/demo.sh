#!/usr/bin/env bash
# Set up, then run one call through the whole mesh (arguments go to `callmesh demo`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/callmesh demo "$@"
