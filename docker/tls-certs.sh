#!/bin/sh
# The `certs` service of docker-compose.tls.yml: makes the run's CA and certificates (once per
# pair of volumes) and hands each container only what it needs. Started as root; `fedmoe certs`
# itself runs as the clone owner through docker/entrypoint.sh (same uid as every other service).
#
#   /tls/coordinator (volume tls-coordinator, the coordinator only):
#       ca.crt, coordinator.crt/.key, healthcheck.crt/.key (the health check's client cert)
#   /tls/peers (volume tls-peers, every peer replica):
#       ca.crt, peer-0 .. peer-(N-1).crt/.key, peers (N), claims/ (see docker/tls-peer.sh)
#
# ca.key is never stored: nothing can issue a certificate after this service has run. Keys are
# 0600, directories 0700, all owned by the clone owner's uid:gid.
#
# Certificates are kept while FEDMOE_PEERS is unchanged (a restarted peer keeps its own);
# claims are released on every run of this service, i.e. at each `up`, before any peer starts.
set -eu

say() { echo "fedmoe-tls-certs: $*" >&2; }

N="${FEDMOE_PEERS:-4}"
case "$N" in
    '' | *[!0-9]* | 0*)
        say "FEDMOE_PEERS must be a positive number, got '$N'"
        exit 2
        ;;
esac
C=/tls/coordinator
P=/tls/peers
for d in "$C" "$P"; do
    [ -d "$d" ] || { say "$d is not mounted (run this through docker-compose.tls.yml)"; exit 2; }
done

if [ -f "$P/peers" ] && [ "$(cat "$P/peers")" = "$N" ] && [ -f "$C/coordinator.key" ] \
    && [ -f "$C/healthcheck.key" ] && [ -f "$P/peer-$((N - 1)).key" ]; then
    say "certificates for $N peers already made: kept"
else
    work=/tmp/fedmoe-certs
    rm -rf "$work"
    # As the clone owner: the entrypoint creates $work for that uid and drops to it.
    FEDMOE_RUN_DIR="$work" fedmoe-entrypoint certs "$work" --peers "$N" \
        --node healthcheck --host coordinator >/dev/null
    # A fresh CA: whatever the volumes held (another run's CA, certificates, claims) is void.
    find "$C" "$P" -mindepth 1 -delete
    cp -p "$work/ca.crt" "$work/coordinator.crt" "$work/coordinator.key" \
        "$work/healthcheck.crt" "$work/healthcheck.key" "$C/"
    cp -p "$work/ca.crt" "$work"/peer-*.crt "$work"/peer-*.key "$P/"
    echo "$N" >"$P/peers"
    chown "$(stat -c %u:%g "$work/ca.crt")" "$P/peers"
    rm -rf "$work" # ca.key with it
    say "made a CA and certificates for the coordinator, the health check and $N peers"
fi

owner="$(stat -c %u:%g "$C/ca.crt")"
rm -rf "$P/claims"
mkdir -m 0700 "$P/claims"
chown "$owner" "$C" "$P" "$P/claims"
chmod 0700 "$C" "$P"
