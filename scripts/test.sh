#!/usr/bin/env bash
# Set up the environment, then run the tests.
#   bash scripts/test.sh            the whole suite (what CI runs)
#   FAST=1 bash scripts/test.sh     the fast subset (unit tests; under a minute)
#   bash scripts/test.sh -k config  extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Nothing leaves the machine during tests (Flower telemetry, Ray usage stats).
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 RAY_USAGE_STATS_ENABLED=0
if [ "${FAST:-0}" = "1" ]; then
  exec .venv/bin/python -m pytest -m "not integration and not slow" "$@"
fi
exec .venv/bin/python -m pytest "$@"
