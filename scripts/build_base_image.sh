#!/usr/bin/env bash
# Build a local Debian bookworm base image with python3/pip/venv without any
# container registry: debootstrap a minbase root file system from the Debian
# mirror apt is configured with, and `docker import` it.
#
#   scripts/build_base_image.sh [NAME]      (default NAME: fedmoe-base:bookworm)
#
# bookworm's python3 is 3.11 (3.11.2): the wheelhouse (scripts/make_wheelhouse.sh)
# targets cp311 to match.
#
# Idempotent: does nothing when the image NAME already exists
# (BASE_IMAGE_FORCE=1 rebuilds it).
#
# Environment:
#   DEBIAN_MIRROR     mirror URL (default: the first bookworm URI found in
#                     /etc/apt/sources.list{,.d/*})
#   DEBIAN_SUITE      default: bookworm
#   BASE_IMAGE_FORCE  1 to rebuild even when the image exists
# Needs root (debootstrap, chroot) and a working docker daemon.
set -euo pipefail

NAME="${1:-fedmoe-base:bookworm}"
SUITE="${DEBIAN_SUITE:-bookworm}"
INCLUDE="python3,python3-pip,python3-venv"

if [[ "${BASE_IMAGE_FORCE:-0}" != 1 ]] && docker image inspect "$NAME" >/dev/null 2>&1; then
    echo "build_base_image: $NAME already exists, nothing to do"
    exit 0
fi

find_mirror() {
    # deb822 *.sources files: "URIs:" + "Suites:" in one stanza.
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f "$f" ]] || continue
        awk -v suite="$SUITE" '
            BEGIN { RS=""; FS="\n" }
            {
                uris=""; suites=""; types=""
                for (i = 1; i <= NF; i++) {
                    if ($i ~ /^URIs:/)   { uris = $i;   sub(/^URIs:[ \t]*/, "", uris) }
                    if ($i ~ /^Suites:/) { suites = $i; sub(/^Suites:[ \t]*/, "", suites) }
                    if ($i ~ /^Types:/)  { types = $i }
                }
                if (types ~ /(^|[ \t])deb([ \t]|$)/ && (" " suites " ") ~ (" " suite " ")) {
                    split(uris, u, /[ \t]+/); print u[1]; exit
                }
            }' "$f"
    done
    # one-line format: "deb [opts] URI SUITE COMPONENTS..."
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f "$f" ]] || continue
        awk -v suite="$SUITE" '
            $1 == "deb" {
                i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                if ($(i + 1) == suite) { print $i; exit }
            }' "$f"
    done
}

MIRROR="${DEBIAN_MIRROR:-$(find_mirror | head -n1)}"
if [[ -z "$MIRROR" ]]; then
    echo "build_base_image: no $SUITE mirror in /etc/apt/sources.list*; set DEBIAN_MIRROR" >&2
    exit 1
fi
command -v debootstrap >/dev/null || { echo "build_base_image: debootstrap is not installed" >&2; exit 1; }

ROOTFS="$(mktemp -d /var/tmp/fedmoe-rootfs.XXXXXX)"
trap 'rm -rf --one-file-system "$ROOTFS"' EXIT

start=$SECONDS
echo "build_base_image: debootstrap $SUITE from $MIRROR into $ROOTFS"
debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$ROOTFS" "$MIRROR"
echo "build_base_image: debootstrap took $((SECONDS - start)) s"

# Slim it: downloaded .debs, apt lists, docs/man pages/locales are not needed
# at run time (apt-get update inside the image brings the lists back).
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/cache/apt/*.bin \
       "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* \
       "$ROOTFS"/usr/share/info/* "$ROOTFS"/var/log/*.log "$ROOTFS"/var/log/apt/*
find "$ROOTFS"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} +
PYVER="$(chroot "$ROOTFS" python3 -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')"
echo "build_base_image: python3 in the image is $PYVER"

t_import=$SECONDS
tar -C "$ROOTFS" --numeric-owner -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --message "debootstrap --variant=minbase --include=$INCLUDE $SUITE $MIRROR (python $PYVER)" \
    - "$NAME"
echo "build_base_image: import took $((SECONDS - t_import)) s; total $((SECONDS - start)) s"
docker image ls "$NAME"
