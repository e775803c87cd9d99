#!/bin/sh
# Entry point of a `peer` replica in docker-compose.tls.yml: claims one peer certificate, then
# runs docker/entrypoint.sh's `fedmoe "$@" --cert-name peer-K` (which drops root for good).
#
# Under mutual TLS the coordinator binds certificate peer-K to index K, and replicas share one
# command line: each takes the lowest peer-K nobody holds, by creating claims/peer-K in the
# shared volume. mkdir is atomic: of two replicas racing for K exactly one succeeds, the other
# tries K+1. The claim records this container's hostname (its id: the same after a restart,
# new for a new container), and the container remembers K in its own filesystem, so a
# restarted replica (`docker compose restart peer`) takes back the same certificate and, with
# its --state-dir, rejoins as the same member.
set -eu

say() { echo "fedmoe-tls-peer: $*" >&2; }

P=/tls  # the tls-peers volume
CLAIMS="$P/claims"
MEMORY=/var/lib/fedmoe-tls/cert-index
me="${HOSTNAME:-$(cat /etc/hostname)}"

if [ ! -f "$P/peers" ] || [ ! -d "$CLAIMS" ]; then
    say "$P holds no certificates: the certs service of docker-compose.tls.yml makes them"
    exit 2
fi
n="$(cat "$P/peers")"
case "$n" in
    '' | *[!0-9]*) say "$P/peers must hold a number, got '$n'"; exit 2 ;;
esac

# True if claims/peer-$1 is this container's: made now, or made by it before a restart.
claim() {
    [ -f "$P/peer-$1.key" ] || return 1
    if mkdir "$CLAIMS/peer-$1" 2>/dev/null; then
        echo "$me" >"$CLAIMS/peer-$1/holder"
        return 0
    fi
    [ "$(cat "$CLAIMS/peer-$1/holder" 2>/dev/null)" = "$me" ]
}

k=""
if [ -f "$MEMORY" ]; then
    old="$(cat "$MEMORY")"
    case "$old" in
        '' | *[!0-9]*) ;;
        *) if claim "$old"; then k="$old"; fi ;;
    esac
fi
if [ -z "$k" ]; then
    i=0
    while [ "$i" -lt "$n" ]; do
        if claim "$i"; then k="$i"; break; fi
        i=$((i + 1))
    done
fi
if [ -z "$k" ]; then
    say "all $n peer certificates are held by other containers: the run has $n peers" \
        "(FEDMOE_PEERS); more replicas than that cannot join"
    exit 2
fi
mkdir -p "$(dirname "$MEMORY")"
echo "$k" >"$MEMORY"
say "this container ($me) holds certificate peer-$k"
exec fedmoe-entrypoint "$@" --cert-name "peer-$k"
