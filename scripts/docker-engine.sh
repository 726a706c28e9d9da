#!/usr/bin/env bash
# Make sure a Docker engine answers on this machine, starting one if needed.
#
# CI starts on a fresh machine: this installs docker.io with apt when the
# engine is missing, starts dockerd in the background (log in
# $CORRAL_DOCKERD_LOG) and waits for its socket. When an engine already
# answers it does nothing, so it is safe to run again; it never restarts or
# stops a running engine.
#
# Environment:
#   CORRAL_DOCKERD_LOG      dockerd's log file        (default /tmp/corral-dockerd.log)
#   CORRAL_DOCKERD_TIMEOUT  seconds to wait for it    (default 60)
set -euo pipefail

LOG="${CORRAL_DOCKERD_LOG:-/tmp/corral-dockerd.log}"
TIMEOUT="${CORRAL_DOCKERD_TIMEOUT:-60}"
SOCK=/var/run/docker.sock

say() { echo "[docker-engine] $*" >&2; }
die() { say "ERROR: $*"; exit 1; }

# sudo only when we are not root already and it exists (CI containers run as root).
SUDO=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || die "not root and no sudo: cannot install or start dockerd"
  SUDO="sudo"
fi

if docker info >/dev/null 2>&1; then
  say "engine already running ($(docker version --format '{{.Server.Version}}' 2>/dev/null))"
  exit 0
fi

if ! command -v dockerd >/dev/null || ! command -v docker >/dev/null; then
  say "installing docker.io with apt"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q >/dev/null
  $SUDO apt-get install -y -q --no-install-recommends docker.io iptables ca-certificates >/dev/null \
    || die "apt-get install docker.io failed"
fi

# A socket file with no engine behind it is left over from a dead dockerd;
# a live dockerd that has not opened its socket yet is simply waited for.
if ! pgrep -x dockerd >/dev/null; then
  say "starting dockerd (log: $LOG)"
  $SUDO rm -f "$SOCK"
  # setsid: the engine must outlive this script and its caller's process group.
  $SUDO setsid nohup dockerd >"$LOG" 2>&1 </dev/null &
else
  say "dockerd is running but not answering yet; waiting"
fi

deadline=$(( $(date +%s) + TIMEOUT ))
until docker info >/dev/null 2>&1; do
  if [ "$(date +%s)" -ge "$deadline" ]; then
    say "last lines of $LOG:"
    tail -n 20 "$LOG" >&2 2>/dev/null || true
    die "dockerd did not answer on $SOCK within ${TIMEOUT}s"
  fi
  sleep 0.2
done
say "engine ready ($(docker version --format '{{.Server.Version}}'))"
