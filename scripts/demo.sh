#!/usr/bin/env bash
# The README's main command: set up on a fresh machine, then run a short demo of corral on its
# embedded default (a local Ray cluster, the process driver): concurrent episodes with shell
# and Python calls, printed as a table. Extra args go to `corral demo` (e.g. --episodes 8 --reuse).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
bash scripts/setup.sh
exec .venv/bin/corral --namespace corral-demo demo "$@"
