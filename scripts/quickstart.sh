#!/usr/bin/env bash
# Quick start: set up the environment, then run fedface's main job on the ORL faces.
# (Until the federated simulation lands, the main job is the centralized baseline.)
#   bash scripts/quickstart.sh [extra `fedface train` flags]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
DATA=${FEDFACE_DATA:-../shared/data/orl}
if [ ! -d "$DATA" ]; then
  echo "quickstart: no ORL faces at $DATA; set FEDFACE_DATA to a face directory (see docs/data.md)" >&2
  exit 4
fi
exec .venv/bin/fedface train --config simulations/scenarios/baseline.toml --data "$DATA" "$@"
