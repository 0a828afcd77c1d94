#!/usr/bin/env bash
# Quick start: set up the environment, then run fedface's main job on the ORL faces: a federated
# simulation of 10 sites (each with its own people), DP-SGD at epsilon 8 per site, SecAgg+.
#   bash scripts/quickstart.sh [extra `fedface simulate` flags, e.g. --rounds 5]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
DATA=${FEDFACE_DATA:-../shared/data/orl}
if [ ! -d "$DATA" ]; then
  echo "quickstart: no ORL faces at $DATA; set FEDFACE_DATA to a face directory (see docs/data.md)" >&2
  exit 4
fi
exec .venv/bin/fedface simulate --data "$DATA" "$@"
