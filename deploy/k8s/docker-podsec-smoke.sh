#!/bin/sh
# The pods of deploy/k8s/base, emulated with plain docker (no cluster needed): the same image,
# arguments, paths and security settings, to check that fedmoe runs under them.
#
#   pod spec                                   here
#   runAsUser/runAsGroup 1000, runAsNonRoot    --user 1000:1000
#   readOnlyRootFilesystem                     --read-only
#   capabilities drop ALL                      --cap-drop ALL
#   allowPrivilegeEscalation false             --security-opt no-new-privileges
#   emptyDir /tmp, /home/fedmoe                --tmpfs
#   PVC with fsGroup 1000                      a host folder owned by 1000:1000
#   Secret (root:1000, 0440)                   a host file root:1000 0440, mounted read-only
#   Services' DNS names                        network aliases on a docker network
#   grpc readiness probe                       grpc.health.v1 Check from the host
#
# A run of 2 peers and 8 rounds; peer 1 is restarted after round 1 and must rejoin as the same
# member (its secret on its "PVC"). Needs root (chown) and docker. Leaves nothing behind.
#   sh deploy/k8s/docker-podsec-smoke.sh        (FEDMOE_IMAGE, default fedmoe:latest)
set -eu

IMAGE="${FEDMOE_IMAGE:-fedmoe:latest}"
NET=fedmoe-k8s-smoke
NS=default
PY="${PYTHON:-.venv/bin/python}"
WORK="$(mktemp -d /tmp/fedmoe-k8s-smoke.XXXXXX)"
say() { echo "smoke: $*" >&2; }

cleanup() {
    for c in fk8s-coordinator fk8s-peer-0 fk8s-peer-1; do docker rm -f "$c" >/dev/null 2>&1 || true; done
    docker network rm "$NET" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

mkdir -p "$WORK/token" "$WORK/results" "$WORK/state-0" "$WORK/state-1"
"$PY" -c 'import secrets; print(secrets.token_urlsafe(32))' >"$WORK/token/join-token"
chown 0:1000 "$WORK/token/join-token"
chmod 0440 "$WORK/token/join-token"
chown 1000:1000 "$WORK/results" "$WORK/state-0" "$WORK/state-1"
docker network create "$NET" >/dev/null

POD="--user 1000:1000 --read-only --cap-drop ALL --security-opt no-new-privileges
     --tmpfs /tmp --tmpfs /home/fedmoe:uid=1000,gid=1000,mode=0755
     -v $WORK/token:/etc/fedmoe/join-token:ro --network $NET"

# shellcheck disable=SC2086  # $POD is a list of options
docker run -d --name fk8s-coordinator $POD --network-alias fedmoe-coordinator \
    -v "$WORK/results:/runs" "$IMAGE" \
    coordinator --listen 0.0.0.0:50051 --peers 2 --rounds 8 --dataset digits \
    --out /runs/run --state-dir /runs/state --token-file /etc/fedmoe/join-token/join-token \
    --metrics-port 9100 --metrics-listen 0.0.0.0 >/dev/null

start_peer() {
    k=$1
    name="fedmoe-peer-$k.fedmoe-peers.$NS.svc.cluster.local"
    # shellcheck disable=SC2086
    docker run -d --name "fk8s-peer-$k" $POD --hostname "fedmoe-peer-$k" --network-alias "$name" \
        -e OMP_NUM_THREADS=1 -v "$WORK/state-$k:/state" "$IMAGE" \
        peer --coordinator fedmoe-coordinator:50051 --listen 0.0.0.0:50052 \
        --advertise "$name:50052" --index "$k" --state-dir /state --device cpu \
        --token-file /etc/fedmoe/join-token/join-token >/dev/null
}

# The kubelet's grpc probe: grpc.health.v1 Check, service "", on the pod's address.
ip="$(docker inspect -f "{{(index .NetworkSettings.Networks \"$NET\").IPAddress}}" fk8s-coordinator)"
"$PY" - "$ip" <<'EOF'
import sys, time, grpc
from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g
stub = g.HealthStub(grpc.insecure_channel(f"{sys.argv[1]}:50051"))
deadline = time.monotonic() + 60
while True:
    try:
        r = stub.Check(h.HealthCheckRequest(service=""), timeout=3)
        if r.status == h.HealthCheckResponse.SERVING:
            print("smoke: coordinator health: SERVING", file=sys.stderr)
            break
    except grpc.RpcError:
        pass
    if time.monotonic() > deadline:
        sys.exit("smoke: coordinator never reported SERVING")
    time.sleep(0.5)
EOF

start_peer 0
start_peer 1

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    limit=$1; what=$2; shift 2
    end=$(($(date +%s) + limit))
    until "$@"; do
        if [ "$(date +%s)" -gt "$end" ]; then say "timed out waiting for $what"; return 1; fi
        sleep 1
    done
}
round1() { grep -q '"round": 1' "$WORK/results/run/metrics.jsonl" 2>/dev/null; }
wait_for 300 "round 1" round1
say "round 1 written; restarting peer 1"
docker restart -t 0 fk8s-peer-1 >/dev/null

rc="$(docker wait fk8s-coordinator)"
docker logs fk8s-coordinator 2>&1 | tail -n 3
for k in 0 1; do
    say "peer $k exit $(docker wait "fk8s-peer-$k"); state: $(ls "$WORK/state-$k" | tr '\n' ' ')"
done
"$PY" - "$WORK/results/run/summary.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
print("smoke: status", s["status"], "final accuracy", s.get("final_accuracy_mean"))
for peer, m in sorted(s["membership"].items()):
    print(f"smoke: {peer} advertised {m['address']}, joins {m['joins']}")
rejoined = [e for e in s["events"] if e.get("event") == "rejoined"]
print("smoke: rejoined events", json.dumps(rejoined))
ok = s["status"] == "completed" and any(e.get("proven") for e in rejoined)
sys.exit(0 if ok else "smoke: expected a completed run and a proven rejoin")
EOF
say "coordinator exit $rc"
[ "$rc" = 0 ]
