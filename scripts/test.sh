#!/usr/bin/env bash
# Runs every test: starts the services (installing what is missing), checks
# formatting and lints, builds the binaries, runs unit and integration tests.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export PATH="$HOME/.cargo/bin:$PATH"

scripts/services.sh start
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo build --workspace --bins --quiet
if [ -z "${KUBECONFIG:-}" ]; then
  echo "test.sh: KUBECONFIG is not set: the end-to-end tests against a Kubernetes API server (tests/it/kube.rs) are SKIPPED" >&2
fi
cargo test --workspace
# The benchmark's smoke version (debug build, 5,000 rows, no targets), so it cannot rot.
cargo test -p outbox-tests --bench relay
