#!/usr/bin/env bash
# The local demo: real MariaDB, Redis and Kafka-protocol broker; the relay
# streams a real outbox; business rows + outbox rows are written in single
# transactions; the records are read back from Kafka.
#
#   scripts/demo.sh            MariaDB's binlog
#   scripts/demo.sh postgres   PostgreSQL's logical replication (the Debezium
#                              outbox demo's flow and schema)
set -euo pipefail
SOURCE=${1:-mysql}
case "$SOURCE" in mysql | postgres) ;; *) echo "usage: $0 [mysql|postgres]" >&2; exit 2 ;; esac
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export PATH="$HOME/.cargo/bin:$PATH"
log() { echo "demo.sh: $*" >&2; }
command -v cargo >/dev/null || {
  log "cargo not found: install a Rust toolchain (rustup, Rust 1.85 or newer), then run this again"
  exit 1
}

log "starting MariaDB (3307), PostgreSQL (5433), Redis (6390) and the broker (9092), installing" \
  "what is missing (the first broker build takes 25-40 min)"
scripts/services.sh start
log "building the relay (~3 min the first time)"
QUIET=--quiet
[ -t 2 ] && QUIET= # cargo's progress on a terminal
cargo build $QUIET -p outbox-relay --bin outbox-relay --example tail

if [ "$SOURCE" = postgres ]; then
  PSQL="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)/psql -qX -h 127.0.0.1 -p 5433 -U app -v ON_ERROR_STOP=1"
  export PGPASSWORD=app-password
  $PSQL -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'shop'" | grep -q 1 ||
    $PSQL -d postgres -c "CREATE DATABASE shop"
  $PSQL -d shop -f config/local/schema-postgres.sql
  CONFIG=config/local/relay-postgres.toml
  CHECKPOINT=outbox-relay:demo-pg:checkpoint
  export OUTBOX_RELAY_POSTGRES_PASSWORD=relay-password
else
  SQL="mariadb --no-defaults -h127.0.0.1 -P3307 -uapp -papp-password --default-character-set=utf8mb4"
  $SQL < config/local/schema.sql
  CONFIG=config/local/relay.toml
  CHECKPOINT=outbox-relay:demo:checkpoint
  export OUTBOX_RELAY_MYSQL_PASSWORD=relay-password
fi

LOG=target/demo-relay.log
target/debug/outbox-relay --config "$CONFIG" >"$LOG" 2>&1 &
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
  if [ "$SOURCE" = postgres ]; then
    # The user, its outbox row, and (as Debezium allows) an outbox message
    # without a table: one transaction.
    $PSQL -d shop -c "BEGIN;
      WITH u AS (INSERT INTO users (email) VALUES ('$name-$RUN@example.com') RETURNING id)
      INSERT INTO outbox (aggregatetype, aggregateid, type, payload)
        SELECT 'User', u.id::text, 'UserCreated', jsonb_build_object('email', '$name-$RUN@example.com') FROM u;
      SELECT pg_logical_emit_message(true, 'outbox', json_build_object('id', gen_random_uuid(),
        'aggregatetype', 'User', 'aggregateid', '$name', 'type', 'WelcomeMailRequested',
        'payload', json_build_object('email', '$name-$RUN@example.com'))::text);
      COMMIT;" >/dev/null
    echo "registered $name-$RUN@example.com"
    continue
  fi
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
  want=3
  [ "$SOURCE" = postgres ] && want=6 # the rows and the messages
  [ "$(printf '%s' "$out" | grep -c . || true)" -ge $want ] && break
  [ $SECONDS -lt $deadline ] || { echo "records did not arrive:"; cat "$LOG"; exit 1; }
  sleep 0.5
done
printf '%s\n' "$out"

kill -TERM $RELAY
wait $RELAY || true
trap - EXIT
echo "relay stopped; checkpoint in Redis:"
redis-cli -p 6390 HGETALL "$CHECKPOINT"
echo
echo "Still running: MariaDB (127.0.0.1:3307), PostgreSQL (5433), Redis (6390) and the broker (9092), data in"
echo "target/services/; run the demo again as it is, or stop them with: scripts/services.sh stop"
