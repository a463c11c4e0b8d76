#!/usr/bin/env bash
# The relay benchmark: starts the services (installing what is missing),
# builds the release binaries and prints one table (min/median/max over 3
# repetitions); the CSV goes to target/bench/results.csv. Knobs (env):
# BENCH_ROWS (200000), BENCH_REPS (3), BENCH_RATE (2000 rows/s),
# BENCH_LATENCY_SECS (30); BENCH_ONLY=postgres runs the PostgreSQL part alone
# (target/bench/postgres.csv), BENCH_ONLY=tail the duplicates' trade alone
# (target/bench/tail.csv), BENCH_ONLY=return the return after an outage of
# each dependency alone (bench/outage.rs, target/bench/return.csv). A second table (bench/tail.rs,
# target/bench/results-tail.csv): duplicates after a SIGKILL per
# max_in_flight / checkpoint_interval setting. The failover rows (Redis and Lease election)
# come from the last run of the failover tests, target/bench/failover-*.txt:
# scripts/test.sh kills 5 times, `OUTBOX_FAILOVER_KILLS=20 scripts/test.sh`
# 20 times (the benchmark's figure).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export PATH="$HOME/.cargo/bin:$PATH"
scripts/services.sh start
cargo build --release --locked --quiet --bin outbox-relay --bin outbox-operator
cargo bench -p outbox-tests --bench relay
