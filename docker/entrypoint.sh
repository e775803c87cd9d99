#!/bin/sh
# Container entrypoint of the fedmoe image: runs `fedmoe "$@"`.
#
# Started as a non-root user (the image's default, uid 1000): runs fedmoe as is.
#
# Started as root (docker-compose.yml does, `user: "0:0"`): picks the uid:gid the run's files
# must belong to on the host, prepares the run directory for it, then drops to it for good
# (setpriv: no supplementary groups, no capabilities, no_new_privs) and runs fedmoe. Why: a
# bind-mounted ./runs that docker created is root's, and a fixed uid (1000) is nobody in
# particular on most hosts; the owner of the clone is the one who reads the results.
#
#   uid:gid   FEDMOE_UID / FEDMOE_GID when set; else the owner of /fedmoe-clone (the compose
#             project folder, i.e. the clone, mounted read-only); else 1000:1000.
#   FEDMOE_RUN_DIR  (optional) created and handed over to uid:gid, with what it holds from
#             earlier runs; its parent too when root owns it (docker made a missing ./runs).
#
# The uid may be 0 (a clone owned by root): fedmoe then runs as root without any capability,
# which can use root's files but bypass no permission.
set -eu

say() { echo "fedmoe-entrypoint: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
    exec fedmoe "$@"
fi

CLONE=/fedmoe-clone
uid="${FEDMOE_UID:-}"
gid="${FEDMOE_GID:-}"
if [ -z "$uid" ]; then
    if [ -e "$CLONE" ]; then uid="$(stat -c %u "$CLONE")"; else uid=1000; fi
fi
if [ -z "$gid" ]; then
    if [ -e "$CLONE" ]; then gid="$(stat -c %g "$CLONE")"; else gid=1000; fi
fi
for pair in "FEDMOE_UID=$uid" "FEDMOE_GID=$gid"; do
    case "${pair#*=}" in
        '' | *[!0-9]*)
            say "${pair%%=*} must be a number (a host uid/gid, e.g. \$(id -u)), got '${pair#*=}'"
            exit 2
            ;;
    esac
done

if [ -n "${FEDMOE_RUN_DIR:-}" ]; then
    case "$FEDMOE_RUN_DIR" in
        /?*) ;;
        *)
            say "FEDMOE_RUN_DIR must be an absolute path, got '$FEDMOE_RUN_DIR'"
            exit 2
            ;;
    esac
    mkdir -p "$FEDMOE_RUN_DIR"
    parent="$(dirname "$FEDMOE_RUN_DIR")"
    if [ "$parent" != / ] && [ "$(stat -c %u "$parent")" = 0 ]; then
        chown "$uid:$gid" "$parent"
    fi
    # -h: a symlink left in the run directory is re-owned itself, never what it points to
    chown -R -h "$uid:$gid" "$FEDMOE_RUN_DIR"
fi

exec setpriv --reuid="$uid" --regid="$gid" --clear-groups \
    --inh-caps=-all --bounding-set=-all --no-new-privs -- fedmoe "$@"
