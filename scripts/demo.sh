#!/usr/bin/env bash
# The local demo: real MariaDB, Redis and Kafka-protocol broker; the relay
# streams a real outbox; business rows + outbox rows are written in single
# transactions; the records are read back from Kafka.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export PATH="$HOME/.cargo/bin:$PATH"
log() { echo "demo.sh: $*" >&2; }
command -v cargo >/dev/null || {
  log "cargo not found: install a Rust toolchain (rustup, Rust 1.85 or newer), then run this again"
  exit 1
}

log "starting MariaDB (3307), Redis (6390) and the broker (9092), installing what is missing" \
  "(the first broker build takes 25-40 min)"
scripts/services.sh start
log "building the relay (~3 min the first time)"
QUIET=--quiet
[ -t 2 ] && QUIET= # cargo's progress on a terminal
cargo build $QUIET -p outbox-relay --bin outbox-relay --example tail

SQL="mariadb --no-defaults -h127.0.0.1 -P3307 -uapp -papp-password --default-character-set=utf8mb4"
$SQL < config/local/schema.sql

LOG=target/demo-relay.log
OUTBOX_RELAY_MYSQL_PASSWORD=relay-password target/debug/outbox-relay --config config/local/relay.toml >"$LOG" 2>&1 &
RELAY=$!
trap 'kill $RELAY 2>/dev/null || true' EXIT
deadline=$((SECONDS + 60))
until curl -fsS http://127.0.0.1:8080/readyz >/dev/null 2>&1; do
  if ! kill -0 $RELAY 2>/dev/null; then echo "relay exited:"; cat "$LOG"; exit 1; fi
  [ $SECONDS -lt $deadline ] || { echo "relay not ready:"; cat "$LOG"; exit 1; }
  sleep 0.2
done
echo "relay is streaming (log: $LOG)"

# What an API's "register user" does: the user row and its event, one transaction.
RUN=$(date +%s)
for name in alice bob carol; do
  $SQL shop -e "BEGIN;
    INSERT INTO users (email) VALUES ('$name-$RUN@example.com');
    INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, headers)
      VALUES ('User', LAST_INSERT_ID(), 'UserRegistered',
              JSON_OBJECT('email', '$name-$RUN@example.com'), JSON_OBJECT('source', 'demo'));
    COMMIT;"
  echo "registered $name-$RUN@example.com"
done

echo "records in outbox.event.User for this run:"
deadline=$((SECONDS + 30))
while :; do
  out=$(target/debug/examples/tail 127.0.0.1:9092 outbox.event.User | grep -- "-$RUN@" || true)
  [ "$(printf '%s' "$out" | grep -c . || true)" -ge 3 ] && break
  [ $SECONDS -lt $deadline ] || { echo "records did not arrive:"; cat "$LOG"; exit 1; }
  sleep 0.5
done
printf '%s\n' "$out"

kill -TERM $RELAY
wait $RELAY || true
trap - EXIT
echo "relay stopped; checkpoint in Redis:"
redis-cli -p 6390 HGETALL outbox-relay:demo:checkpoint
echo
echo "Still running: MariaDB (127.0.0.1:3307), Redis (6390) and the broker (9092), data in"
echo "target/services/; run the demo again as it is, or stop them with: scripts/services.sh stop"
