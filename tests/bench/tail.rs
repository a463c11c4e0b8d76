//! The duplicates' trade (issue #18): what a SIGKILL sends again, against
//! the settings that bound it — `max_in_flight` (records read but not yet
//! acknowledged: the tail of a catch-up) and `redis.checkpoint_interval`
//! (acknowledged records not yet checkpointed: the tail at a steady pace) —
//! and what each costs: drain rate and Redis writes.
//!
//! Per setting, fresh databases and topics: a drain of `rows` (events/s
//! from process start, as the main drain); then, `reps` times each, the same
//! drain with the relay SIGKILLed when half is acknowledged, then restarted
//! (records read back: duplicates = records − rows), and a steady writer
//! with the relay SIGKILLed once it streams at the writer's pace
//! (duplicates in records and in ms of the writer's traffic; checkpoint
//! writes per second before the kill). Each kill has a database of its own,
//! so its duplicates are its own: min / median / max over the reps.

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
    /// Per rep.
    pub catchup_dups: Vec<f64>,
    /// Per rep: duplicates, ms of the writer's traffic they are, the
    /// writer's rows/s and checkpoint writes/s before the kill.
    pub steady: Vec<Steady>,
}

pub struct Steady {
    pub dups: f64,
    pub ms: f64,
    pub rate: f64,
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

pub async fn measure(rows: usize, setting: (usize, u64), reps: usize) -> Tail {
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
    let mut catchup_dups = Vec::new();
    let mut steady = Vec::new();
    for _ in 0..reps {
        catchup_dups.push(catchup_kill(rows, setting).await as f64);
        steady.push(steady_kill(setting).await);
    }
    Tail {
        max_in_flight: setting.0,
        interval_ms: setting.1,
        drain_eps,
        catchup_dups,
        steady,
    }
}

/// The drain of `rows`, SIGKILLed halfway: its duplicates.
async fn catchup_kill(rows: usize, setting: (usize, u64)) -> usize {
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
    duplicates(&f).await
}

/// A steady writer (transactions of 20 rows over 200 keys); the kill comes
/// once the relay has caught up and streamed 2 s more.
async fn steady_kill(setting: (usize, u64)) -> Steady {
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
    let rate = written as f64 / began.elapsed().as_secs_f64();
    wait_checkpoint_at_head(redis_url(), &f.name, &f.db, Duration::from_secs(60)).await;
    drop(relay);
    let dups = duplicates(&f).await as f64;
    Steady {
        dups,
        ms: dups / rate * 1000.0,
        rate,
        checkpoints_per_sec,
    }
}

/// The table, as markdown (min / median / max over the reps where there are
/// several); also returned as CSV (medians).
pub fn table(rows: usize, tails: &[Tail]) -> String {
    println!(
        "\nDuplicates after a SIGKILL against the settings that bound them ({rows} rows per drain; \
         min / median / max over the kills, {} per setting and kind):\n\n\
         | max_in_flight | checkpoint_interval (ms) | drain (events/s) | SIGKILL halfway through the drain: duplicates | \
         SIGKILL at a steady pace: duplicates | … in ms of the writer's traffic | writer (rows/s) | \
         checkpoint writes/s at that pace |\n|---:|---:|---:|---:|---:|---:|---:|---:|",
        tails.first().map_or(0, |t| t.catchup_dups.len())
    );
    let mut csv = String::from(
        "max_in_flight,checkpoint_interval_ms,drain_eps,catchup_duplicates,steady_duplicates,steady_ms,writer_rows_per_s,checkpoints_per_s\n",
    );
    for t in tails {
        let col = |f: fn(&Steady) -> f64| crate::stats(&t.steady.iter().map(f).collect::<Vec<_>>());
        let spread = |(lo, mid, hi): (f64, f64, f64), digits: usize| {
            if lo == hi {
                format!("{mid:.digits$}")
            } else {
                format!("{lo:.digits$} / {mid:.digits$} / {hi:.digits$}")
            }
        };
        let catchup = crate::stats(&t.catchup_dups);
        let (dups, ms, rate, cps) = (
            col(|s| s.dups),
            col(|s| s.ms),
            col(|s| s.rate),
            col(|s| s.checkpoints_per_sec),
        );
        let head = [
            t.max_in_flight.to_string(),
            t.interval_ms.to_string(),
            format!("{:.0}", t.drain_eps),
        ];
        let cells = [
            spread(catchup, 0),
            spread(dups, 0),
            spread(ms, 0),
            spread(rate, 0),
            spread(cps, 1),
        ];
        println!("| {} | {} |", head.join(" | "), cells.join(" | "));
        let medians = [catchup.1, dups.1, ms.1, rate.1].map(|m| format!("{m:.0}"));
        csv.push_str(&format!(
            "{},{},{:.1}\n",
            head.join(","),
            medians.join(","),
            cps.1
        ));
    }
    csv
}
