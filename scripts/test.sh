#!/usr/bin/env bash
# Runs every test: starts the services (installing what is missing) and a
# Kubernetes API server, checks formatting and lints, builds the binaries,
# runs unit and integration tests, then the end-to-end tests against the API
# server.
#
# The Kubernetes end-to-end tests (tests/it/kube.rs) run against:
#   - the cluster KUBECONFIG points at, when it is set (kind, k3d, a dev cluster);
#   - else the control plane of ../shared/k8s, when it is there (as in CI),
#     started with its own state dir (target/k8s) and ports, stopped at the end;
#   - else nowhere: they are reported as skipped (and under CI=true the run fails).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export PATH="$HOME/.cargo/bin:$PATH"
K8S=$ROOT/../shared/k8s

log() { echo "test.sh: $*" >&2; }
command -v cargo >/dev/null || {
  log "cargo not found: install a Rust toolchain (rustup, Rust 1.85 or newer), then run this again"
  exit 1
}
# Progress from cargo on a terminal; quiet in logs (CI).
QUIET=--quiet
[ -t 2 ] && QUIET=

log "starting MariaDB, PostgreSQL, Redis and the broker (installing what is missing; the first broker build takes 25-40 min)"
scripts/services.sh start
scripts/services.sh helm >/dev/null # the chart tests' helm
if [ -n "${KUBECONFIG:-}" ]; then
  log "Kubernetes end-to-end tests against KUBECONFIG=$KUBECONFIG"
elif [ -f "$K8S/up.sh" ]; then
  export K8S_STATE=$ROOT/target/k8s
  export K8S_API_PORT=${OUTBOX_K8S_API_PORT:-16543}
  export K8S_ETCD_PORT=${OUTBOX_K8S_ETCD_PORT:-23890}
  export K8S_ETCD_PEER_PORT=${OUTBOX_K8S_ETCD_PEER_PORT:-23900}
  trap 'bash "$K8S/down.sh"' EXIT
  log "starting the Kubernetes API server of ../shared/k8s (state $K8S_STATE, port $K8S_API_PORT)"
  KUBECONFIG=$(bash "$K8S/up.sh")
  export KUBECONFIG
elif [ "${CI:-}" = true ]; then
  log "CI=true but no Kubernetes API server: ../shared/k8s/up.sh is missing and KUBECONFIG is not set"
  exit 1
fi

log "formatting and lints (cargo fmt, clippy: ~4 min on 2 cores the first time)"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets $QUIET -- -D warnings
log "building the binaries and tests (~10 min the first time)"
cargo build --workspace --bins $QUIET
cargo test --workspace --no-run $QUIET
log "unit and integration tests (~5 min)"
cargo test --workspace
# The benchmark's smoke version (debug build, 5,000 rows, no targets), so it cannot rot.
cargo test -p outbox-tests --bench relay

# The tests that need a cluster are #[ignore]d in the run above (shown there
# as ignored, with the reason) and run here by name.
# The user journey (tests/it/journey.rs) runs its pods under the test's
# kubelet (tests/it/kubelet.rs): on a control plane without nodes only.
journey=journey::
if [ -n "${KUBECONFIG:-}" ] && [ -n "$(kubectl get nodes -o name 2>/dev/null)" ]; then
  journey=
fi
if [ -n "${KUBECONFIG:-}" ]; then
  log "Kubernetes end-to-end tests (tests/it/kube.rs: ~2 min)"
  cargo test -p outbox-tests --test integration -- --ignored kube::
  # Apart from kube.rs: the journey's pods (operator, relays, writer) would
  # load 2 cores enough to slow the Lease renewals that kube.rs times.
  if [ -n "$journey" ]; then
    log "the user journey (tests/it/journey.rs: ~3 min)"
    cargo test -p outbox-tests --test integration -- --ignored journey::
  else
    skipped=$(cargo test -p outbox-tests --test integration -- --ignored --list journey:: 2>/dev/null |
      grep -c ': test$' || true)
    log "$skipped skipped: the journey tests (tests/it/journey.rs) play the kubelet, on a" \
      "control plane without nodes (../shared/k8s); this cluster has nodes"
  fi
else
  skipped=$(cargo test -p outbox-tests --test integration -- --ignored --list kube:: journey:: 2>/dev/null |
    grep -c ': test$' || true)
  log "$skipped skipped: the Kubernetes end-to-end tests (tests/it/kube.rs, journey.rs) need an API server:" \
    "set KUBECONFIG (kind, k3d, any cluster) or run beside ../shared/k8s"
fi
