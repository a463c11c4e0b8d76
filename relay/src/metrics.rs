//! Prometheus metrics of the relay (prometheus-client, text exposition).

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

pub type Labels = Vec<(String, String)>;

/// Every metric the relay exports. Cheap to clone (shared handles).
#[derive(Clone)]
pub struct Metrics {
    pub registry: Arc<Registry>,
    /// Records acknowledged by Kafka, by source table and topic.
    pub events: Family<Labels, Counter>,
    /// Payload bytes acknowledged by Kafka, by source table.
    pub bytes: Family<Labels, Counter>,
    /// Rows sent to the dead-letter topic, by source table.
    pub dead_letters: Family<Labels, Counter>,
    /// UPDATE/DELETE rows on outbox tables, and plain-table rows of actions
    /// not relayed (`changes.tables`), ignored.
    pub ignored: Family<Labels, Counter>,
    /// Errors by kind: mysql, kafka, redis, bad_row, fenced.
    pub errors: Family<Labels, Counter>,
    pub reconnects: Counter,
    /// Streams restarted at the last acknowledged commit after Kafka
    /// failed a record with an error that sending again may fix.
    pub stream_restarts: Counter,
    pub checkpoints: Counter,
    /// 1 while the binlog stream is open.
    pub streaming: Gauge,
    /// Seconds since the last checkpoint write.
    pub checkpoint_age: Gauge<f64, AtomicU64>,
    /// Commit time of the last checkpointed transaction (unix seconds).
    pub checkpoint_commit_time: Gauge,
    /// Offset of the checkpoint in its binlog file.
    pub checkpoint_offset: Gauge,
    /// now − commit time of the last relayed transaction while behind; 0 when caught up.
    pub lag_seconds: Gauge<f64, AtomicU64>,
    pub epoch: Gauge,
    /// Log bytes (binlog, WAL) between the relayed position and the server's head.
    pub lag_bytes: Gauge,
    /// PostgreSQL: WAL bytes the server retains for the relay's slot.
    pub retained_wal_bytes: Gauge,
    /// Seconds from reading a row in the binlog to Kafka's acknowledgement.
    pub ack_latency: Histogram,
    /// PostgreSQL: seconds from a transaction's commit timestamp to the relay
    /// reading its commit (transactions with outbox rows).
    pub commit_read_latency: Histogram,
    /// PostgreSQL: seconds from a transaction's commit timestamp to the sink's
    /// acknowledgement of its last record (finer buckets: the 10 ms target).
    pub commit_ack_latency: Histogram,
    /// 1 while this process leads (streams), 0 as a standby.
    pub is_leader: Gauge,
    /// Terms this process won.
    pub leadership_changes: Counter,
    /// Seconds from winning the term to streaming (resume, preflight, producer).
    pub takeover_seconds: Gauge<f64, AtomicU64>,
    /// Age of the stored checkpoint this term resumed from: records an
    /// earlier run sent after it are sent again.
    pub resumed_checkpoint_age: Gauge<f64, AtomicU64>,
}

/// Seconds from `t` to now; 0 when `t` is ahead (another machine's clock).
pub fn seconds_since(t: std::time::SystemTime) -> f64 {
    t.elapsed().map_or(0.0, |d| d.as_secs_f64())
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut r = Registry::with_prefix("outbox_relay");
        let m = Metrics {
            registry: Arc::new(Registry::default()),
            events: Family::default(),
            bytes: Family::default(),
            dead_letters: Family::default(),
            ignored: Family::default(),
            errors: Family::default(),
            reconnects: Counter::default(),
            stream_restarts: Counter::default(),
            checkpoints: Counter::default(),
            streaming: Gauge::default(),
            checkpoint_age: Gauge::default(),
            checkpoint_commit_time: Gauge::default(),
            checkpoint_offset: Gauge::default(),
            lag_seconds: Gauge::default(),
            epoch: Gauge::default(),
            lag_bytes: Gauge::default(),
            retained_wal_bytes: Gauge::default(),
            ack_latency: Histogram::new(exponential_buckets(0.000_5, 1.5, 24)),
            commit_read_latency: Histogram::new(exponential_buckets(0.000_5, 1.5, 24)),
            // 0.5 ms × 1.25ⁿ up to ~2 s: 9.1 and 11.4 ms around 10 ms.
            commit_ack_latency: Histogram::new(exponential_buckets(0.000_5, 1.25, 38)),
            is_leader: Gauge::default(),
            leadership_changes: Counter::default(),
            takeover_seconds: Gauge::default(),
            resumed_checkpoint_age: Gauge::default(),
        };
        r.register("events", "Records acknowledged by Kafka", m.events.clone());
        r.register(
            "bytes",
            "Payload bytes acknowledged by Kafka",
            m.bytes.clone(),
        );
        r.register(
            "dead_letters",
            "Rows sent to the dead-letter topic",
            m.dead_letters.clone(),
        );
        r.register(
            "ignored_rows",
            "UPDATE/DELETE rows on outbox tables, and captured plain-table rows of actions not relayed",
            m.ignored.clone(),
        );
        r.register("errors", "Errors by kind", m.errors.clone());
        r.register(
            "reconnects",
            "Binlog stream reconnects",
            m.reconnects.clone(),
        );
        r.register(
            "stream_restarts",
            "Streams restarted at the last acknowledged commit after Kafka failed a record (retriable)",
            m.stream_restarts.clone(),
        );
        r.register(
            "checkpoints",
            "Checkpoint writes to Redis",
            m.checkpoints.clone(),
        );
        r.register(
            "streaming",
            "1 while the binlog stream is open",
            m.streaming.clone(),
        );
        r.register(
            "checkpoint_age_seconds",
            "Seconds since the last checkpoint write",
            m.checkpoint_age.clone(),
        );
        r.register(
            "checkpoint_commit_timestamp_seconds",
            "Commit time of the last checkpointed transaction",
            m.checkpoint_commit_time.clone(),
        );
        r.register(
            "checkpoint_binlog_offset",
            "Binlog offset of the checkpoint",
            m.checkpoint_offset.clone(),
        );
        r.register(
            "lag_seconds",
            "now minus the commit time of the oldest transaction read but not yet acknowledged, 0 when caught up",
            m.lag_seconds.clone(),
        );
        r.register("epoch", "Leadership epoch of this relay", m.epoch.clone());
        r.register(
            "ack_latency_seconds",
            "From reading a row in the binlog to Kafka's acknowledgement of its record",
            m.ack_latency.clone(),
        );
        r.register(
            "commit_read_latency_seconds",
            "PostgreSQL: from a transaction's commit timestamp to the relay reading its commit \
             (transactions with outbox rows; server and relay clocks)",
            m.commit_read_latency.clone(),
        );
        r.register(
            "commit_ack_latency_seconds",
            "PostgreSQL: from a transaction's commit timestamp to the acknowledgement of its last record \
             (transactions with outbox rows; server and relay clocks)",
            m.commit_ack_latency.clone(),
        );
        r.register(
            "lag_bytes",
            "Log bytes (binlog, WAL) between the relayed position and the server's head (polled)",
            m.lag_bytes.clone(),
        );
        r.register(
            "retained_wal_bytes",
            "PostgreSQL: WAL bytes the server retains for the relay's replication slot (polled)",
            m.retained_wal_bytes.clone(),
        );
        r.register(
            "is_leader",
            "1 while this process leads, 0 as a standby",
            m.is_leader.clone(),
        );
        r.register(
            "leadership_changes",
            "Leadership terms this process won",
            m.leadership_changes.clone(),
        );
        r.register(
            "takeover_seconds",
            "Seconds from winning leadership to streaming",
            m.takeover_seconds.clone(),
        );
        r.register(
            "resumed_checkpoint_age_seconds",
            "Age of the stored checkpoint the current term resumed from (what an earlier run sent after it is sent again)",
            m.resumed_checkpoint_age.clone(),
        );
        Metrics {
            registry: Arc::new(r),
            ..m
        }
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }
}

/// A one-label set.
pub fn label(k: &str, v: &str) -> Labels {
    vec![(k.to_string(), v.to_string())]
}
