#!/usr/bin/env bash
# Build the corral box image here, with no container registry.
#
#   1. make sure a Docker engine runs          (scripts/docker-engine.sh)
#   2. the base image: debootstrap Debian bookworm from this machine's apt
#      mirror and `docker import` it as corral-base:bookworm -- skipped when
#      that image exists or CORRAL_BASE_IMAGE names another base
#   3. the build context: wheels of corral and the box's dependencies, built
#      on the host (the image's Python is 3.11 like the host's)
#   4. `docker build` of docker/Dockerfile as corral-box:latest -- skipped when
#      the image carries the label corral.context_hash equal to the hash of
#      this build's inputs
#
# Idempotent: a second run does nothing and takes a few seconds.
#
# Environment:
#   CORRAL_BASE_IMAGE  base image to build on; set = no debootstrap (e.g. python:3.11-slim)
#   CORRAL_IMAGE       name of the box image                (default corral-box:latest)
#   CORRAL_BUILD_DIR   where the build context is prepared  (default <repo>/build/corral-image)
#   CORRAL_MIRROR      Debian mirror for debootstrap        (default: read from apt's sources)
#   CORRAL_REBUILD=1   build even when the hash matches
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
IMAGE="${CORRAL_IMAGE:-corral-box:latest}"
DEFAULT_BASE="corral-base:bookworm"
BASE="${CORRAL_BASE_IMAGE:-$DEFAULT_BASE}"
CTX="${CORRAL_BUILD_DIR:-$REPO/build/corral-image}"
SUITE=bookworm
# python3-venv brings ensurepip (pip for the venv); procps gives ps/kill to
# agents; tini is PID 1. Nothing else: the image stays small.
INCLUDE="python3,python3-venv,tini,ca-certificates,bash,procps"

T0=$(date +%s)
say() { echo "[build-image +$(( $(date +%s) - T0 ))s] $*" >&2; }
die() { echo "[build-image] ERROR: $*" >&2; exit 1; }

# Pick the interpreter that has the repo's dependencies (the venv), so the
# pinned versions below are the ones the tests run with.
PY="${CORRAL_PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PY="$REPO/.venv/bin/python"; else PY="$(command -v python3)"; fi
fi
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' 2>/dev/null \
  || die "$PY is not Python 3.11; the image's Python (Debian bookworm) is 3.11 and wheels must match"

"$REPO/scripts/docker-engine.sh"

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

# ---------------------------------------------------------------- base image
debian_mirror() {
  if [ -n "${CORRAL_MIRROR:-}" ]; then echo "$CORRAL_MIRROR"; return; fi
  local f uri
  # deb822 files (URIs: ...) and one-line files (deb URI suite ...); the
  # security archive is not a full mirror, so it is skipped.
  for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -r "$f" ] || continue
    uri=$(awk '
      /^[[:space:]]*URIs:/ { for (i = 2; i <= NF; i++) print $i }
      /^[[:space:]]*deb[[:space:]]/ { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; break } }
    ' "$f" | grep -E '/debian/?$' | grep -v -- '-security' | head -n1 || true)
    if [ -n "$uri" ]; then echo "${uri%/}"; return; fi
  done
  die "no Debian mirror found in /etc/apt/sources.list{,.d}; set CORRAL_MIRROR"
}

build_base() {
  if ! command -v debootstrap >/dev/null; then
    say "installing debootstrap with apt"
    DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends debootstrap >/dev/null \
      || die "apt-get install debootstrap failed"
  fi
  [ "$(id -u)" = 0 ] || die "debootstrap needs root (or set CORRAL_BASE_IMAGE to an existing image)"
  local mirror rootfs
  mirror=$(debian_mirror)
  rootfs=$(mktemp -d /tmp/corral-rootfs.XXXXXX)
  trap 'rm -rf "$rootfs"' EXIT
  say "debootstrap $SUITE from $mirror (minbase + $INCLUDE)"
  debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$rootfs" "$mirror" \
    >"$rootfs.log" 2>&1 || { tail -n 30 "$rootfs.log" >&2; die "debootstrap failed (log: $rootfs.log)"; }
  # Package caches and lists are dead weight in every container.
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
         "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
  say "importing the root filesystem as $DEFAULT_BASE"
  tar -C "$rootfs" --numeric-owner -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["bash"]' \
    - "$DEFAULT_BASE" >/dev/null
  rm -rf "$rootfs" "$rootfs.log"
  trap - EXIT
}

if image_exists "$BASE"; then
  say "base image $BASE exists"
elif [ "$BASE" = "$DEFAULT_BASE" ]; then
  build_base
else
  die "base image $BASE (CORRAL_BASE_IMAGE) is not on this engine and no registry can be reached"
fi
BASE_ID=$(docker image inspect --format '{{.Id}}' "$BASE")

# ----------------------------------------------------------- context hash
# The inputs that decide the context's content: the Dockerfile and helpers,
# corral's sources, the pinned dependency versions and the base image. Hashing
# inputs (rather than built wheels, whose zips carry timestamps) lets a rerun
# skip even the wheel step.
CONSTRAINTS=$("$PY" -m pip freeze --exclude-editable 2>/dev/null | grep -v -E '^(-e |corral[= ])' || true)
HASH=$(
  {
    echo "base $BASE_ID"
    echo "$CONSTRAINTS"
    cd "$REPO"
    find docker/Dockerfile docker/box-requirements.txt corral actors drivers pyproject.toml -type f \
      ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
  } | sha256sum | cut -c1-16
)

if [ "${CORRAL_REBUILD:-0}" != 1 ] && image_exists "$IMAGE" \
   && [ "$(docker image inspect --format '{{ index .Config.Labels "corral.context_hash" }}' "$IMAGE")" = "$HASH" ]; then
  say "$IMAGE is up to date (context hash $HASH)"
  exit 0
fi

# ---------------------------------------------------------- build context
say "preparing the build context in $CTX"
rm -rf "$CTX"
mkdir -p "$CTX/wheels"
cp "$REPO/docker/Dockerfile" "$CTX/Dockerfile"
cp "$REPO/docker/box-requirements.txt" "$CTX/wheels/box-requirements.txt"
printf '%s\n' "$CONSTRAINTS" > "$CTX/wheels/constraints.txt"
printf '.dockerignore\n' > "$CTX/.dockerignore"

say "wheel of corral"
PIP_LOG="$CTX.pip.log"
"$PY" -m pip wheel --quiet --no-deps --wheel-dir "$CTX/wheels" "$REPO" >"$PIP_LOG" 2>&1 \
  || { tail -n 30 "$PIP_LOG" >&2; die "pip wheel of corral failed (log: $PIP_LOG)"; }
# Binary wheels only: the image has no compiler. The host is Debian bookworm
# like the base, so wheels the host's pip picks fit the image's glibc.
say "wheels of the box's dependencies"
"$PY" -m pip download --quiet --only-binary=:all: --dest "$CTX/wheels" \
  -r "$REPO/docker/box-requirements.txt" -c "$CTX/wheels/constraints.txt" >>"$PIP_LOG" 2>&1 \
  || { tail -n 30 "$PIP_LOG" >&2; die "pip download of the box's dependencies failed (log: $PIP_LOG)"; }
say "context: $(ls "$CTX/wheels" | wc -l) files, $(du -sh "$CTX" | cut -f1)"

# -------------------------------------------------------------------- build
say "docker build $IMAGE on $BASE"
# The legacy builder is used on purpose: it needs no buildx plugin, which a
# distribution's docker.io does not always ship.
BUILD_LOG="$CTX.build.log"
DOCKER_BUILDKIT=0 docker build \
  --build-arg BASE="$BASE" \
  --label corral.context_hash="$HASH" \
  --label corral.base="$BASE" \
  --tag "$IMAGE" "$CTX" >"$BUILD_LOG" 2>&1 \
  || { tail -n 40 "$BUILD_LOG" >&2; die "docker build failed (full log: $BUILD_LOG)"; }
# Older box images and the wheel-holding build stage (labelled in the
# Dockerfile) are left dangling by a rebuild; they would pile up.
docker image prune --force --filter label=corral.context_hash >/dev/null 2>&1 || true
docker image prune --force --filter label=corral.build_stage >/dev/null 2>&1 || true
say "built $IMAGE ($(docker image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')), context hash $HASH"
