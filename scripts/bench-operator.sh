#!/usr/bin/env bash
# The operator at scale, on a real API server: the release `outbox-operator
# run` as a process (admin kubeconfig, leader election on), BENCH_RELAYS
# OutboxRelays (200) over 10 namespaces — the first 50 in one namespace,
# sharing one MySQL Secret — applied at once. Prints one table:
#   - operator RSS idle (before the apply) and after everything settled;
#   - seconds from the apply until every OutboxRelay has its 8 children and a
#     status for its generation;
#   - write requests per reconcile while they were created;
#   - at steady state (every relay Stalled: no relay pods run here), over
#     BENCH_STEADY_SECS (60): the operator's writes and reconciles, and every
#     request the API server served (all clients, watches excluded);
#   - the shared Secret rotated: how many Deployments rolled (50 expected,
#     the other 150 untouched), in how many seconds, with how many writes.
# API server: the cluster KUBECONFIG points at, else ../shared/k8s (own
# state dir target/k8s-bench and ports, stopped at the end). Only for an
# empty test cluster: it creates namespaces obr-bench-*, deleted at the end.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export PATH="$HOME/.cargo/bin:$PATH"
RELAYS=${BENCH_RELAYS:-200}
STEADY=${BENCH_STEADY_SECS:-60}
SHARED=50
NAMESPACES=10
log() { echo "bench-operator: $*" >&2; }
command -v jq >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq jq >/dev/null

OPERATOR_PID=
cleanup() {
  [ -n "$OPERATOR_PID" ] && kill "$OPERATOR_PID" 2>/dev/null
  for i in $(seq 0 $((NAMESPACES - 1))); do
    kubectl delete namespace "obr-bench-$i" --wait=false --ignore-not-found >/dev/null 2>&1 || true
  done
  if [ -n "${K8S_STARTED:-}" ]; then bash "$ROOT/../shared/k8s/down.sh"; fi
}
trap cleanup EXIT
if [ -z "${KUBECONFIG:-}" ]; then
  export K8S_STATE=$ROOT/target/k8s-bench K8S_API_PORT=16743 K8S_ETCD_PORT=24090 K8S_ETCD_PEER_PORT=24100
  log "starting the API server of ../shared/k8s (state $K8S_STATE, a fresh cluster)"
  rm -rf "$K8S_STATE/etcd-data"
  KUBECONFIG=$(bash "$ROOT/../shared/k8s/up.sh")
  export KUBECONFIG K8S_STARTED=1
fi

for i in $(seq 0 $((NAMESPACES - 1))); do # a previous run's, still terminating
  kubectl wait --for=delete "namespace/obr-bench-$i" --timeout=300s >/dev/null 2>&1 || true
done
log "building the release operator"
cargo build --release --locked --quiet --bin outbox-operator
kubectl apply --server-side --force-conflicts -f crds/outboxrelays.yaml >/dev/null
kubectl wait --for=condition=Established crd/outboxrelays.outboxrelay.dev --timeout=60s >/dev/null

port=${BENCH_OPERATOR_PORT:-18681}
HTTP_LISTEN=127.0.0.1:$port POD_NAMESPACE=default target/release/outbox-operator run \
  >target/bench-operator.log 2>&1 &
OPERATOR_PID=$!
metric() { # name: the operator's metric
  curl -fsS "http://127.0.0.1:$port/metrics" | awk -v m="outbox_operator_$1" '$1 == m {print $2}'
}
reconciles() { # all outcomes
  curl -fsS "http://127.0.0.1:$port/metrics" | awk '/^outbox_operator_reconciles_total\{/ {s += $2} END {print s + 0}'
}
rss_mb() { awk '/VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$OPERATOR_PID/status"; }
apiserver_requests() { # every request served but watches
  kubectl get --raw /metrics | awk '/^apiserver_request_total\{/ && !/verb="WATCH"/ {s += $NF} END {printf "%d", s}'
}
since() { awk -v a="$(date +%s.%N)" -v b="$1" 'BEGIN {printf "%.1f", a - b}'; }
wait_until() { # what seconds cmd...
  local what=$1 secs=$2 deadline=$((SECONDS + $2)); shift 2
  until "$@"; do
    [ $SECONDS -lt $deadline ] || { log "$what: not within ${secs}s"; exit 1; }
    sleep 0.5
  done
}
kill -0 $OPERATOR_PID
wait_until "the operator leading" 60 bash -c "curl -fsS http://127.0.0.1:$port/metrics 2>/dev/null | grep -q '^outbox_operator_is_leader 1'"
rss_idle=$(rss_mb)

# The resources: Secrets per namespace, relays spread over the namespaces.
manifest=target/bench-operator.yaml
: >"$manifest"
ns_of() { if [ "$1" -lt $SHARED ]; then echo 0; else echo $((1 + ($1 - SHARED) % (NAMESPACES - 1))); fi; }
for i in $(seq 0 $((NAMESPACES - 1))); do
  cat >>"$manifest" <<YAML
---
apiVersion: v1
kind: Namespace
metadata: {name: obr-bench-$i}
---
apiVersion: v1
kind: Secret
metadata: {name: mysql, namespace: obr-bench-$i}
stringData: {password: bench}
YAML
done
for r in $(seq 0 $((RELAYS - 1))); do
  cat >>"$manifest" <<YAML
---
apiVersion: outboxrelay.dev/v1alpha1
kind: OutboxRelay
metadata: {name: relay-$r, namespace: obr-bench-$(ns_of "$r")}
spec:
  heartbeatInterval: 5s
  mysql: {host: mysql, user: relay, passwordSecret: {name: mysql, key: password}, outboxes: [{database: shop}]}
  kafka: {bootstrapServers: "kafka:9092"}
  redis: {url: "redis://redis:6379/0"}
YAML
done

reconciled() { # every relay with a status for its generation, and its Deployment
  local n d
  n=$(kubectl get obr -A -o json | jq '[.items[] | select(.status.observedGeneration == .metadata.generation)] | length')
  d=$(kubectl get deploy -A -l app.kubernetes.io/managed-by=outbox-operator -o name | wc -l)
  [ "$n" -ge "$RELAYS" ] && [ "$d" -ge "$RELAYS" ]
}
writes0=$(metric api_writes_total)
rec0=$(reconciles)
log "applying $RELAYS OutboxRelays in $NAMESPACES namespaces"
start=$(date +%s.%N)
kubectl apply --server-side -f "$manifest" >/dev/null
wait_until "all reconciled" 300 reconciled
took=$(since "$start")
writes1=$(metric api_writes_total)
rec1=$(reconciles)

log "waiting until every relay is Stalled (no relay pods run here: ~70 s after creation)"
stalled() {
  [ "$(kubectl get obr -A -o json | jq '[.items[] | select(any(.status.conditions[]?; .type == "Stalled" and .status == "True"))] | length')" -ge "$RELAYS" ]
}
wait_until "all Stalled" 300 stalled
sleep 5 # the last Stalled transitions' writes and their watch events
rss_settled=$(rss_mb)
w0=$(metric api_writes_total)
r0=$(reconciles)
a0=$(apiserver_requests)
log "steady state: measuring for ${STEADY}s"
sleep "$STEADY"
w1=$(metric api_writes_total)
r1=$(reconciles)
a1=$(apiserver_requests)

hashes() { kubectl get deploy -A -l app.kubernetes.io/managed-by=outbox-operator \
  -o jsonpath='{range .items[*]}{.metadata.namespace}/{.metadata.name} {.spec.template.metadata.annotations.outboxrelay\.dev/config-hash}{"\n"}{end}' | sort; }
hashes >target/bench-hashes-before
log "rotating the Secret $SHARED relays share"
rstart=$(date +%s.%N)
kubectl -n obr-bench-0 patch secret mysql --type merge -p '{"stringData":{"password":"rotated"}}' >/dev/null
rolled() { hashes >target/bench-hashes-after; [ "$(comm -13 target/bench-hashes-before target/bench-hashes-after | wc -l)" -ge $SHARED ]; }
wait_until "the rotation rolled" 120 rolled
rtook=$(since "$rstart")
sleep 5 # anything else it would roll
hashes >target/bench-hashes-after
changed=$(comm -13 target/bench-hashes-before target/bench-hashes-after | wc -l)
w2=$(metric api_writes_total)

per_min() { echo $(($1 * 60 / STEADY)); }
printf '\n| metric | value | target |\n|---|---:|---|\n'
printf '| operator RSS idle (MB) | %s | |\n' "$rss_idle"
printf '| operator RSS with %d OutboxRelays, settled (MB) | %s | ≤ 50 |\n' "$RELAYS" "$rss_settled"
printf '| apply → all %d with children and status (s) | %s | ≤ 30 |\n' "$RELAYS" "$took"
printf '| reconciles / writes while creating | %d / %d | |\n' $((rec1 - rec0)) $((writes1 - writes0))
printf '| writes per creating reconcile | %s | 8 children + status |\n' \
  "$(awk -v w=$((writes1 - writes0)) -v r=$((rec1 - rec0)) 'BEGIN {printf "%.1f", w / r}')"
printf '| steady state: operator reconciles / min | %d | |\n' "$(per_min $((r1 - r0)))"
printf '| steady state: operator writes / min | %d | 0 |\n' "$(per_min $((w1 - w0)))"
printf '| steady state: API server requests / min (all clients, no watches) | %d | |\n' "$(per_min $((a1 - a0)))"
printf '| Secret shared by %d rotated: Deployments rolled | %d of %d | %d |\n' "$SHARED" "$changed" "$RELAYS" "$SHARED"
printf '| … rolled within (s) / operator writes | %s / %d | |\n' "$rtook" $((w2 - w1))
