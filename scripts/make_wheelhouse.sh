#!/usr/bin/env bash
# Download the wheels of fedmoe's runtime dependencies (from pyproject.toml)
# for the container's Python into a directory, so that the image can be built
# with `pip install --no-index --find-links DIR` (no index reachable from the
# build, see docker/NOTES.md).
#
#   scripts/make_wheelhouse.sh [DIR]        (default DIR: .wheelhouse)
#
# Target: CPython 3.11 (Debian bookworm's python3 is 3.11.2, python:3.11-slim
# is 3.11.x), manylinux x86_64 (glibc <= 2.36, bookworm's glibc).
# torch and torchvision are pinned to the releases the project is capped at:
# never let a resolver pick an unpinned torch (that is a multi-GB download).
#
# Idempotent: DIR/.complete holds a key made of the dependency list, the pins
# and the target; when it matches, nothing is done.
#
# Environment:
#   PYTHON           python used to run pip (default: python3)
#   WHEELHOUSE_FORCE=1  re-download even when the stamp matches
set -euo pipefail

cd "$(dirname "$0")/.."
DIR="${1:-.wheelhouse}"
PYTHON="${PYTHON:-python3}"

TORCH_PIN="torch==2.14.1"
TORCHVISION_PIN="torchvision==0.29.1"
PY_VERSION="3.11"
ABI="cp311"
# pip does not expand manylinux_2_X platforms to older glibc versions itself
# (it only does so for manylinux2014/2010), so list every one up to
# bookworm's glibc 2.36; manylinux2014 brings in manylinux2010 and manylinux1.
PLATFORMS=(manylinux2014_x86_64)
for minor in $(seq 17 36); do PLATFORMS+=("manylinux_2_${minor}_x86_64"); done

# Runtime dependencies from pyproject.toml, plus the build backend the
# Dockerfile needs to install the project itself without an index.
mapfile -t DEPS < <("$PYTHON" - <<'EOF'
import tomllib
with open("pyproject.toml", "rb") as f:
    data = tomllib.load(f)
for dep in data["project"]["dependencies"]:
    print(dep)
for dep in data.get("build-system", {}).get("requires", []):
    print(dep)
EOF
)
PINS=("$TORCH_PIN" "$TORCHVISION_PIN")

platform_args=()
for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done

KEY="$(printf '%s\n' "v1" "$PY_VERSION" "$ABI" "${PLATFORMS[@]}" "${DEPS[@]}" "${PINS[@]}" \
       | sha256sum | cut -d' ' -f1)"
STAMP="$DIR/.complete"

if [[ "${WHEELHOUSE_FORCE:-0}" != 1 && -f "$STAMP" && "$(cat "$STAMP")" == "$KEY" ]]; then
    echo "make_wheelhouse: $DIR is complete for this dependency list (key ${KEY:0:12}), nothing to do"
    exit 0
fi

mkdir -p "$DIR"
rm -f "$STAMP"
echo "make_wheelhouse: downloading into $DIR:"
printf '  %s\n' "${DEPS[@]}" "${PINS[@]}"

start=$SECONDS
# pip download honours the pip configuration of this machine (constraint file
# in /etc/xdg/pip/pip.conf, local indexes holding torch); the explicit == pins
# keep torch fixed on machines without that configuration as well.
"$PYTHON" -m pip download \
    --dest "$DIR" \
    --only-binary=:all: \
    --implementation cp \
    --python-version "$PY_VERSION" \
    --abi "$ABI" \
    "${platform_args[@]}" \
    "${DEPS[@]}" "${PINS[@]}"

# Sanity: exactly the pinned torch/torchvision, nothing else of them.
check_one() {  # name version
    local n
    n=$(find "$DIR" -maxdepth 1 -name "$1-*.whl" | wc -l)
    if [[ "$n" != 1 ]] || ! compgen -G "$DIR/$1-$2-cp311-*.whl" >/dev/null; then
        echo "make_wheelhouse: expected exactly one $1-$2 wheel in $DIR, found:" >&2
        find "$DIR" -maxdepth 1 -name "$1-*.whl" >&2
        exit 1
    fi
}
check_one torch 2.14.1
check_one torchvision 0.29.1

echo "$KEY" > "$STAMP"
echo "make_wheelhouse: done in $((SECONDS - start)) s; $(find "$DIR" -maxdepth 1 -name '*.whl' | wc -l) wheels, $(du -sh "$DIR" | cut -f1)"
