//! The PostgreSQL half of the benchmark, against the private PostgreSQL of
//! scripts/services.sh: the same drain method as MySQL's; latency from the
//! relay's own histograms (pgoutput carries commit timestamps in
//! microseconds, the binlog only seconds, so MySQL needs a second reader).

use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_relay::config::Config;
use outbox_relay::metrics::Metrics;
use outbox_relay::pg::PgSource;
use outbox_relay::source::{Source, SourceEvent};
use tokio_postgres::Client;

use crate::support::*;
use crate::{bucket_quantile, payload, proc_stats};

async fn connect(user: &str, password: &str, db: &str) -> Client {
    pg_connect(pg_port(), user, password, db).await
}

/// A database of its own with the DESIGN outbox table and the relay's
/// publication; `relay` names the relay (its slot is made when it leads).
pub(crate) struct Bench {
    pub(crate) db: String,
    pub(crate) name: String,
    pub(crate) dir: Scratch,
}

impl Bench {
    pub(crate) async fn new(prefix: &str) -> Bench {
        let db = format!("{prefix}_{}", unique());
        connect("app", "app-password", "postgres")
            .await
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await
            .expect("create database");
        connect("app", "app-password", &db)
            .await
            .batch_execute(
                "CREATE TABLE outbox (id bigserial PRIMARY KEY, aggregate_type text NOT NULL,
                   aggregate_id text NOT NULL, event_type text NOT NULL, payload jsonb NOT NULL)",
            )
            .await
            .expect("outbox table");
        create_topics(&[format!("{db}.Order")], 3).await;
        Bench {
            name: format!("pgbench-{db}"),
            dir: Scratch::new(prefix),
            db,
        }
    }

    pub(crate) fn toml(&self, name: &str, http_port: u16) -> String {
        format!(
            r#"name = "{name}"
[postgres]
host = "127.0.0.1"
port = {port}
user = "relay"
database = "{db}"
[[outbox]]
schema = "public"
topic = "{db}.{{aggregate_type}}"
[kafka]
bootstrap_servers = "{broker}"
[redis]
url = "{redis}"
key_prefix = "test:"
[http]
listen = "127.0.0.1:{http_port}"
"#,
            port = pg_port(),
            db = self.db,
            broker = broker(),
            redis = redis_url(),
        )
    }

    fn start(&self, name: &str) -> Relay {
        let port = free_port();
        Relay::start(
            &self.dir.0,
            &self.toml(name, port),
            port,
            &[("OUTBOX_RELAY_POSTGRES_PASSWORD", RELAY_PASSWORD)],
        )
    }

    /// The relay's `PgSource` in-process, as the relay `name` (its own slot,
    /// created on the first call), reading from the slot's position.
    async fn source(&self, name: &str) -> PgSource {
        let cfg = Arc::new(
            Config::from_toml(
                &self.toml(name, free_port()),
                std::path::Path::new("bench.toml"),
                &[(
                    "OUTBOX_RELAY_POSTGRES_PASSWORD".into(),
                    RELAY_PASSWORD.into(),
                )],
            )
            .expect("config"),
        );
        let opened = PgSource::open(&cfg).await.expect("preflight");
        let (_durable_tx, durable) = tokio::sync::watch::channel(None);
        let term = outbox_relay::election::Leadership::fixed(1);
        PgSource::begin(cfg, opened, None, term, Metrics::new(), durable)
            .await
            .expect("the reader's slot")
            .0
    }

    /// Drops the slots of this database (ending a reader still attached),
    /// then the database.
    pub(crate) async fn drop_all(self) {
        let admin = connect("postgres", "postgres-password", "postgres").await;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // DROP DATABASE cannot share a (multi-statement) transaction.
            let dropped = match admin
                .batch_execute(&format!(
                    "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
                     WHERE database = '{db}' AND active_pid IS NOT NULL; \
                     SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                     WHERE database = '{db}'",
                    db = self.db
                ))
                .await
            {
                Ok(()) => {
                    admin
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.db))
                        .await
                }
                Err(e) => Err(e),
            };
            match dropped {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => {
                    panic!(
                        "dropping {}: {}",
                        self.db,
                        outbox_relay::pgsql::error_text(&e)
                    )
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

/// Inserts `rows` rows in 500-row transactions over 1,000 aggregates.
async fn fill(db: &str, rows: usize) {
    let c = connect("app", "app-password", db).await;
    let mut n = 0;
    while n < rows {
        let batch = 500.min(rows - n);
        let values: Vec<String> = (n..n + batch)
            .map(|i| format!("('Order','agg-{}','Created','{}')", i % 1000, payload(i)))
            .collect();
        c.batch_execute(&format!(
            "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES {}",
            values.join(",")
        ))
        .await
        .expect("insert batch");
        n += batch;
    }
}

/// What a PostgreSQL drain measured.
pub struct PgDrain {
    pub drain_eps: f64,
    /// The same rows read and mapped by the relay's `PgSource` in-process,
    /// nothing produced (on a slot of its own).
    pub read_eps: f64,
    pub peak_rss: u64,
    pub idle_rss: u64,
}

/// `rows` rows written while the relay is stopped (its slot keeps them),
/// then drained: events/s from process start to the last acknowledgement.
pub async fn drain(rows: usize) -> PgDrain {
    let b = Bench::new("pgdrain").await;
    // A first start creates the publication and the slot; stopped, the
    // slot keeps what is written next.
    let mut relay = b.start(&b.name);
    relay.wait_ready().await;
    assert!(relay.terminate().await.success(), "{}", relay.logs());
    let reader = format!("{}-read", b.name);
    drop(b.source(&reader).await);
    fill(&b.db, rows).await;

    // Read-only: the relay's source alone, from its own slot.
    let mut source = b.source(&reader).await;
    let t = Instant::now();
    let mut read = 0;
    while read < rows {
        if let SourceEvent::Row { result: Ok(_), .. } = source.next().await.expect("stream") {
            read += 1;
        }
    }
    let read_eps = rows as f64 / t.elapsed().as_secs_f64();
    drop(source);

    relay_bin();
    let t = Instant::now();
    let mut relay = b.start(&b.name);
    let pid = relay.pid();
    let mut peak = 0;
    while (relay.events().await as usize) < rows {
        peak = peak.max(proc_stats(pid).0);
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "drain did not finish: {}",
            relay.logs()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let drain_eps = rows as f64 / t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (idle_rss, _) = proc_stats(pid);
    assert!(relay.terminate().await.success(), "{}", relay.logs());
    b.drop_all().await;
    PgDrain {
        drain_eps,
        read_eps,
        peak_rss: peak,
        idle_rss,
    }
}

/// What the PostgreSQL latency phase measured: p50 and p99 in ms (upper
/// bounds of the relay's histogram buckets) and the relay's RSS.
pub struct PgLatency {
    /// Commit timestamp → the relay reading the commit.
    pub commit_read: (f64, f64),
    /// The relay reading a row → Kafka's acknowledgement.
    pub read_ack: (f64, f64),
    /// Commit timestamp → Kafka's acknowledgement of the transaction's
    /// last record.
    pub commit_ack: (f64, f64),
    pub rss: u64,
}

/// Steady single-row transactions at `rate`/s for `secs` (two writers),
/// the relay the only logical reader: its own histograms of commit →
/// read and commit → Kafka ack (pgoutput's commit timestamp, same
/// machine's clock), and read → Kafka ack.
pub async fn latency(rate: u64, secs: u64) -> PgLatency {
    let b = Bench::new("pglat").await;
    let mut relay = b.start(&b.name);
    relay.wait_ready().await;
    let warm = connect("app", "app-password", &b.db).await;
    warm.batch_execute(&format!(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('Order','warm-up','Created','{}')",
        payload(0)
    ))
    .await
    .expect("warm-up row");
    relay.wait_events(1).await;

    let per = rate / 2;
    let mut writers = Vec::new();
    for w in 0..2 {
        let c = connect("app", "app-password", &b.db).await;
        writers.push(tokio::spawn(async move {
            let insert = c
                .prepare(
                    "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
                     VALUES ('Order', $1, 'Created', $2::text::jsonb)",
                )
                .await
                .expect("prepare");
            let t0 = Instant::now();
            for i in 0..per * secs {
                let due = t0 + Duration::from_micros(i * 1_000_000 / per);
                tokio::time::sleep_until(due.into()).await;
                c.execute(
                    &insert,
                    &[&format!("w{w}-{}", i % 100), &payload(i as usize)],
                )
                .await
                .expect("insert");
            }
        }));
    }
    for w in writers {
        w.await.expect("writer");
    }
    relay.wait_events(2 * per * secs + 1).await;
    let m = http_get(relay.http_port, "/metrics")
        .await
        .map(|r| r.1)
        .unwrap_or_default();
    let q = |name: &str| {
        (
            bucket_quantile(&m, name, 0.5),
            bucket_quantile(&m, name, 0.99),
        )
    };
    let (rss, _) = proc_stats(relay.pid());
    assert!(relay.terminate().await.success(), "{}", relay.logs());
    b.drop_all().await;
    PgLatency {
        commit_read: q("commit_read_latency"),
        read_ack: q("ack_latency"),
        commit_ack: q("commit_ack_latency"),
        rss,
    }
}
