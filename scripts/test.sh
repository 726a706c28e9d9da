#!/usr/bin/env bash
# The README's test command: sets everything up on a fresh machine, then runs the whole suite.
#
#   scripts/test.sh                  # every layer (tests/cluster in a pytest session of its own)
#   scripts/test.sh [pytest args...] # only what the arguments select
#
# Set-up: the venv and packages (scripts/setup.sh), a Docker engine (scripts/docker-engine.sh:
# installs docker.io and starts dockerd if none answers), the corral-box image
# (scripts/build-image.sh: debootstraps a Debian base and builds on it; skipped when built) and
# iproute2 for the multi-node tests (worker nodes in network namespaces; they need root).
# CORRAL_SKIP_DOCKER=1 skips the engine and the image (the Docker tests then skip, unless
# CORRAL_REQUIRE_DOCKER=1, which CI sets, makes them fail); CORRAL_REQUIRE_CLUSTER=1 (CI) makes
# the multi-node tests fail rather than skip when they cannot run.
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
if ! command -v ip >/dev/null && [ "$(id -u)" = 0 ]; then
  say "installing iproute2 (the multi-node tests make network namespaces)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends iproute2 >/dev/null
fi
say "checking the generated sync code is current"
.venv/bin/python scripts/unasync.py --check
PYTEST=(.venv/bin/python -m pytest -q -p no:cacheprovider --timeout=900)
set +e
if [ $# -gt 0 ]; then
  say "running pytest $*"
  "${PYTEST[@]}" "$@"
  rc=$?
else
  say "running the tests"
  "${PYTEST[@]}" --ignore=tests/cluster tests
  rc=$?
  # A process joins one Ray cluster: the multi-node tests build theirs in a session of their own.
  say "running the multi-node tests"
  RAY_AUTH_MODE=token "${PYTEST[@]}" tests/cluster
  rc2=$?
  [ $rc -eq 0 ] && rc=$rc2
fi
set -e
say "pytest exited $rc"
exit $rc
