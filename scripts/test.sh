#!/usr/bin/env bash
# The README's test command: sets everything up on a fresh machine, then runs the whole suite.
#
#   scripts/test.sh [pytest args...]
#
# Set-up: the venv and packages (scripts/setup.sh), a Docker engine (scripts/docker-engine.sh:
# installs docker.io and starts dockerd if none answers) and the corral-box image
# (scripts/build-image.sh: debootstraps a Debian base and builds on it; skipped when built).
# CORRAL_SKIP_DOCKER=1 skips the engine and the image (the Docker tests then skip,
# unless CORRAL_REQUIRE_DOCKER=1, which CI sets, makes them fail).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
T0=$(date +%s)
say() { echo "[test +$(( $(date +%s) - T0 ))s] $*" >&2; }

bash scripts/setup.sh
if [ "${CORRAL_SKIP_DOCKER:-0}" != 1 ]; then
  bash scripts/docker-engine.sh
  bash scripts/build-image.sh
fi
say "checking the generated sync code is current"
.venv/bin/python scripts/unasync.py --check
say "running the tests"
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider --timeout=600 "$@" tests
rc=$?
set -e
say "pytest exited $rc"
exit $rc
