#!/usr/bin/env bash
# Regenerates every generated file (tests fail when one is stale):
#   crds/outboxrelays.yaml                          `outbox-operator crd`
#   charts/outbox-operator/files/outboxrelays.yaml  the same, for the chart
#   config/install/outbox-operator.yaml             `helm template` with default values
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --quiet -p outbox-operator
target/debug/outbox-operator crd > crds/outboxrelays.yaml
cp crds/outboxrelays.yaml charts/outbox-operator/files/outboxrelays.yaml
HELM=$(scripts/services.sh helm)
"$HELM" template outbox-operator charts/outbox-operator --namespace outbox-system \
  > config/install/outbox-operator.yaml
echo "generated: crds/outboxrelays.yaml, charts/outbox-operator/files/outboxrelays.yaml, config/install/outbox-operator.yaml"
