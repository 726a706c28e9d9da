#!/usr/bin/env bash
# Set up corral on this machine: a venv at .venv with corral (editable) and its test extras.
# Idempotent: a second run only checks. Used by scripts/test.sh and scripts/demo.sh.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${CORRAL_PYTHON_BIN:-python3}"
say() { echo "[setup] $*" >&2; }

if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.corral-installed
want="$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  say "installing corral and its dependencies into .venv (a few minutes on a fresh machine)"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e ".[test,notebooks]"
  echo "$want" > "$stamp"
else
  say ".venv is up to date"
fi
