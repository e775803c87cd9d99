#!/usr/bin/env bash
# Build the fedmoe image (fedmoe:latest), with or without registry access.
#
#   scripts/make_image.sh            (the Makefile's `make image`)
#
# 1. Make sure a docker engine answers; where none does, install Debian's
#    docker.io, docker-compose and debootstrap and start dockerd in the
#    background (log: /tmp/dockerd.log). Skipped when `docker info` works.
# 2. Base image: python:3.11-slim when `docker pull` can get it (then the
#    dependencies come from PyPI inside the build); otherwise a local base
#    made with debootstrap (scripts/build_base_image.sh fedmoe-base:bookworm)
#    plus a wheelhouse (scripts/make_wheelhouse.sh .wheelhouse), built with
#    --network none.
# 3. docker build: the "deps" stage is tagged fedmoe-deps:latest so that the
#    cleanup of dangling build images never drops the cached torch layer.
# 4. Smoke check: import torch, torchvision, grpc, protobuf, numpy, sklearn and
#    `fedmoe --help` in the image.
#
# Environment (all optional):
#   FEDMOE_IMAGE        image to tag (default fedmoe:latest)
#   FEDMOE_BASE_IMAGE   force a base image, skipping the pull probe
#   FEDMOE_WHEELHOUSE   with FEDMOE_BASE_IMAGE: wheelhouse dir in the repo
#                       ("" = install from PyPI)
#   FEDMOE_NO_PRUNE=1   keep dangling images of earlier fedmoe builds
set -euo pipefail

cd "$(dirname "$0")/.."

IMAGE="${FEDMOE_IMAGE:-fedmoe:latest}"
DEPS_IMAGE="${IMAGE%%:*}-deps:latest"
PUBLIC_BASE="python:3.11-slim"
LOCAL_BASE="fedmoe-base:bookworm"
LOCAL_WHEELHOUSE=".wheelhouse"

T0=$SECONDS
TIMINGS=()
step_start() { STEP_NAME="$1"; STEP_T=$SECONDS; echo "==> $1"; }
step_end() { local d=$((SECONDS - STEP_T)); TIMINGS+=("$(printf '%-48s %5d s' "$STEP_NAME" "$d")"); echo "<== $STEP_NAME: $d s"; }
as_root() { if [[ $(id -u) == 0 ]]; then "$@"; else sudo "$@"; fi; }

# --- 1. docker engine ------------------------------------------------------
step_start "docker engine"
if docker info >/dev/null 2>&1; then
    echo "docker already works"
else
    if ! command -v dockerd >/dev/null || ! command -v docker-compose >/dev/null \
            || ! command -v debootstrap >/dev/null; then
        as_root apt-get update
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y docker.io docker-compose debootstrap
    fi
    if ! docker info >/dev/null 2>&1; then
        echo "starting dockerd (log: /tmp/dockerd.log)"
        as_root setsid nohup dockerd >/tmp/dockerd.log 2>&1 < /dev/null &
        for _ in $(seq 1 60); do
            docker info >/dev/null 2>&1 && break
            sleep 1
        done
        if ! docker info >/dev/null 2>&1; then
            echo "make_image: dockerd did not come up in 60 s; tail of /tmp/dockerd.log:" >&2
            tail -n 30 /tmp/dockerd.log >&2 || true
            exit 1
        fi
    fi
    echo "docker engine: $(docker version --format '{{.Server.Version}}')"
fi
step_end

# --- 2. base image + wheelhouse -------------------------------------------------
build_net=()
if [[ -n "${FEDMOE_BASE_IMAGE:-}" ]]; then
    BASE="$FEDMOE_BASE_IMAGE"
    WHEELHOUSE="${FEDMOE_WHEELHOUSE:-}"
    echo "base image forced: $BASE, wheelhouse: ${WHEELHOUSE:-<none, PyPI>}"
    if [[ "$BASE" == "$LOCAL_BASE" ]]; then
        step_start "local base image $LOCAL_BASE"
        command -v debootstrap >/dev/null || as_root apt-get install -y debootstrap
        as_root scripts/build_base_image.sh "$LOCAL_BASE"
        step_end
    fi
else
    step_start "docker pull $PUBLIC_BASE"
    if docker image inspect "$PUBLIC_BASE" >/dev/null 2>&1 \
            || timeout 300 docker pull "$PUBLIC_BASE"; then
        BASE="$PUBLIC_BASE"
        WHEELHOUSE=""
    else
        echo "no registry: building the base image locally and installing from a wheelhouse"
        BASE="$LOCAL_BASE"
        WHEELHOUSE="$LOCAL_WHEELHOUSE"
    fi
    step_end
    if [[ "$BASE" == "$LOCAL_BASE" ]]; then
        step_start "local base image $LOCAL_BASE"
        command -v debootstrap >/dev/null || as_root apt-get install -y debootstrap
        as_root scripts/build_base_image.sh "$LOCAL_BASE"
        step_end
    fi
fi
if [[ -n "$WHEELHOUSE" ]]; then
    step_start "wheelhouse $WHEELHOUSE"
    scripts/make_wheelhouse.sh "$WHEELHOUSE"
    step_end
    build_net=(--network none)   # everything comes from the wheelhouse
fi

# --- 3. docker build ---------------------------------------------------------
build_args=(--build-arg "BASE_IMAGE=$BASE" --build-arg "WHEELHOUSE=$WHEELHOUSE")

step_start "docker build --target deps ($DEPS_IMAGE)"
docker build --force-rm "${build_net[@]}" "${build_args[@]}" --target deps -t "$DEPS_IMAGE" .
step_end

step_start "docker build $IMAGE"
docker build --force-rm "${build_net[@]}" "${build_args[@]}" -t "$IMAGE" .
step_end

if [[ "${FEDMOE_NO_PRUNE:-0}" != 1 ]]; then
    # Each build whose source changed leaves untagged images behind (the
    # "build" stage holds a copy of the context, wheelhouse included). Remove
    # the dangling ones of this Dockerfile only (label set in its base stage);
    # the deps stage stays cached because it is tagged.
    docker image prune -f --filter "label=org.fedmoe.build=1" >/dev/null || true
fi

# --- 4. smoke check ------------------------------------------------------------
step_start "smoke check"
docker run --rm --network none --entrypoint python "$IMAGE" -c \
    "import torch, torchvision, grpc, google.protobuf, numpy, sklearn; print('torch', torch.__version__)"
docker run --rm --network none "$IMAGE" --help >/dev/null
step_end

echo
echo "image: $IMAGE  base: $BASE  wheelhouse: ${WHEELHOUSE:-<none, PyPI>}"
docker image ls "$IMAGE" --format '{{.Repository}}:{{.Tag}}  {{.ID}}  {{.Size}}'
echo "timings:"
printf '  %s\n' "${TIMINGS[@]}"
printf '  %-48s %5d s\n' "total" $((SECONDS - T0))
