#!/usr/bin/env bash
# Create or update the project's virtual environment (.venv) with everything fedface needs.
#
# torch is installed FIRST and pinned on every later pip line: on these machines
# `torch==2.13.0` is a CPU wheel on local disk, while an unpinned torch would pull a multi-GB
# CUDA build. Set FEDFACE_TORCH to another requirement (e.g. "torch==2.13.0+cu128" or
# "torch>=2.4") to install your platform's build instead.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
TORCH_SPEC=${FEDFACE_TORCH:-torch==2.13.0}
VENV=.venv
STAMP=$VENV/.fedface-setup

want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)-$TORCH_SPEC
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/fedface" ]; then
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
echo "setup: installing $TORCH_SPEC" >&2
"${pip[@]}" install "$TORCH_SPEC"
echo "setup: installing fedface and its dependencies" >&2
"${pip[@]}" install -e ".[dev]" "$TORCH_SPEC"
"${pip[@]}" check >&2 || { echo "setup: pip check found conflicts (above)" >&2; exit 1; }
echo "$want" > "$STAMP"
echo "setup: done ($("$VENV/bin/fedface" --version))" >&2
