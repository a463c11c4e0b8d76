//! The duplicates' trade (issue #18): what a SIGKILL sends again, against
//! the settings that bound it — `max_in_flight` (records read but not yet
//! acknowledged: the tail of a catch-up) and `redis.checkpoint_interval`
//! (acknowledged records not yet checkpointed: the tail at a steady pace) —
//! and what each costs: drain rate and Redis writes.
//!
//! Per setting, three fresh databases and topics: a drain of `rows`
//! (events/s from process start, as the main drain); the same drain with
//! the relay SIGKILLed when half is acknowledged, then restarted (records
//! read back: duplicates = records − rows); a steady writer with the relay
//! SIGKILLed once it streams at the writer's pace (duplicates in records
//! and in ms of the writer's traffic; checkpoint writes per second before
//! the kill).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::*;
use crate::{drain_relay, fill, relay_config};

/// `max_in_flight`, `redis.checkpoint_interval` in ms.
pub const SETTINGS: [(usize, u64); 5] = [
    (20_000, 100),
    (5_000, 100),
    (1_000, 100),
    (20_000, 20),
    (20_000, 500),
];

pub struct Tail {
    pub max_in_flight: usize,
    pub interval_ms: u64,
    pub drain_eps: f64,
    pub catchup_dups: usize,
    pub steady_dups: usize,
    pub steady_rate: f64,
    pub checkpoints_per_sec: f64,
}

fn config(f: &Fixture, start: &str, port: u16, (in_flight, ms): (usize, u64)) -> String {
    relay_config(f, start, port)
        .replace(
            "checkpoint_interval = \"200ms\"",
            &format!("checkpoint_interval = \"{ms}ms\""),
        )
        .replacen(
            "[mysql]",
            &format!("max_in_flight = {in_flight}\n\n[mysql]"),
            1,
        )
}

/// Reads back every record of `f` and returns the duplicates, after
/// checking that none is missing.
async fn duplicates(f: &Fixture) -> usize {
    let rows = f.db.rows().await;
    let recs = read_topics(&f.topics, rows.len(), Duration::from_secs(120)).await;
    let report = check(&rows, &recs);
    report.assert_complete();
    report.duplicates
}

pub async fn measure(rows: usize, setting: (usize, u64)) -> Tail {
    // The drain, undisturbed.
    let f = Fixture::new("tail", mysql_port(), &["Order"], 3).await;
    let (file, pos) = f.db.head().await;
    let start = format!("file:{file}:{pos}");
    fill(&f.db, rows).await;
    let head = f.db.head().await;
    let port = free_port();
    let toml = config(&f, &start, port, setting);
    let (drain_eps, _, _, relay) = drain_relay(&f, &f.name, &toml, port, rows, &head).await;
    drop(relay);

    // The same drain, SIGKILLed halfway.
    let f = Fixture::new("tailkill", mysql_port(), &["Order"], 3).await;
    let (file, pos) = f.db.head().await;
    let start = format!("file:{file}:{pos}");
    fill(&f.db, rows).await;
    let port = free_port();
    let mut relay = Relay::start(&f.dir.0, &config(&f, &start, port, setting), port, &[]);
    relay.wait_events(rows as u64 / 2).await;
    relay.kill().await;
    let port = free_port();
    let relay = Relay::start(&f.dir.0, &config(&f, &start, port, setting), port, &[]);
    wait_checkpoint_at_head(redis_url(), &f.name, &f.db, Duration::from_secs(300)).await;
    drop(relay);
    let catchup_dups = duplicates(&f).await;

    // A steady writer (transactions of 20 rows over 200 keys); the kill
    // comes once the relay has caught up and streamed 2 s more.
    let f = Fixture::new("tailsteady", mysql_port(), &["Order"], 3).await;
    let (file, pos) = f.db.head().await;
    let start = format!("file:{file}:{pos}");
    let stop = Arc::new(AtomicBool::new(false));
    let began = Instant::now();
    let writer = steady_writer(
        f.db.clone(),
        stop.clone(),
        20,
        200,
        Duration::from_millis(10),
    );
    let port = free_port();
    let mut relay = Relay::start(&f.dir.0, &config(&f, &start, port, setting), port, &[]);
    relay.wait_events(200).await;
    let (n, c, t) = (
        relay.events().await,
        relay.metric("outbox_relay_checkpoints_total").await,
        Instant::now(),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let checkpoints_per_sec =
        (relay.metric("outbox_relay_checkpoints_total").await - c) / t.elapsed().as_secs_f64();
    assert!(relay.events().await > n, "the relay stopped streaming");
    relay.kill().await;
    let port = free_port();
    let mut relay = Relay::start(&f.dir.0, &config(&f, &start, port, setting), port, &[]);
    relay.wait_events(500).await;
    stop.store(true, Ordering::Relaxed);
    let written = writer.await.expect("writer");
    let steady_rate = written as f64 / began.elapsed().as_secs_f64();
    wait_checkpoint_at_head(redis_url(), &f.name, &f.db, Duration::from_secs(60)).await;
    drop(relay);
    let steady_dups = duplicates(&f).await;
    Tail {
        max_in_flight: setting.0,
        interval_ms: setting.1,
        drain_eps,
        catchup_dups,
        steady_dups,
        steady_rate,
        checkpoints_per_sec,
    }
}

/// The table, as markdown; also returned as CSV.
pub fn table(rows: usize, tails: &[Tail]) -> String {
    println!(
        "\nDuplicates after a SIGKILL against the settings that bound them ({rows} rows per drain):\n\n\
         | max_in_flight | checkpoint_interval (ms) | drain (events/s) | SIGKILL halfway through the drain: duplicates | \
         SIGKILL at a steady pace: duplicates | … in ms of the writer's traffic | writer (rows/s) | \
         checkpoint writes/s at that pace |\n|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let mut csv = String::from(
        "max_in_flight,checkpoint_interval_ms,drain_eps,catchup_duplicates,steady_duplicates,steady_ms,writer_rows_per_s,checkpoints_per_s\n",
    );
    for t in tails {
        let cells = [
            t.max_in_flight.to_string(),
            t.interval_ms.to_string(),
            format!("{:.0}", t.drain_eps),
            t.catchup_dups.to_string(),
            t.steady_dups.to_string(),
            format!("{:.0}", t.steady_dups as f64 / t.steady_rate * 1000.0),
            format!("{:.0}", t.steady_rate),
            format!("{:.1}", t.checkpoints_per_sec),
        ];
        println!("| {} |", cells.join(" | "));
        csv.push_str(&cells.join(","));
        csv.push('\n');
    }
    csv
}
