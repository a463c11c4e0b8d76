//! The relay benchmark against the real local MariaDB, Redis and broker
//! (scripts/bench.sh; results in target/bench/ and BENCHMARKS.md).
//!
//! - drain: ROWS outbox rows inserted while no relay runs, then the relay
//!   (release binary) drains them: events/s from process start to the
//!   checkpoint at the head; beside it the same records read and decoded
//!   without producing (read-only, in-process `Source`) and produced by the
//!   relay's `Sink` with its producer settings (produce-only).
//! - latency: steady single-row transactions; commit (client saw COMMIT
//!   return) → record read back by a consumer, per record.
//! - footprint: the relay's peak and steady RSS, CPU seconds per 100k events,
//!   binary size.
//!
//! Built in the test profile (`cargo test --bench relay`, as CI does) it runs
//! a smoke version: few rows, one repetition, no targets.

#[allow(dead_code)]
#[path = "../it/support.rs"]
mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use outbox_relay::binlog::{self, SourceEvent};
use outbox_relay::config::Config;
use outbox_relay::kafka::{Sent, Sink};
use outbox_relay::metrics::Metrics;
use outbox_relay::outbox::Record;
use outbox_relay::position::StartFrom;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, TopicPartitionList};

use support::*;

struct Plan {
    rows: usize,
    reps: usize,
    latency_rate: u64,
    latency_secs: u64,
}

fn plan() -> Plan {
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    if cfg!(debug_assertions) {
        Plan {
            rows: env("BENCH_ROWS", 5_000) as usize,
            reps: env("BENCH_REPS", 1) as usize,
            latency_rate: env("BENCH_RATE", 500),
            latency_secs: env("BENCH_LATENCY_SECS", 3),
        }
    } else {
        Plan {
            rows: env("BENCH_ROWS", 200_000) as usize,
            reps: env("BENCH_REPS", 3) as usize,
            latency_rate: env("BENCH_RATE", 2_000),
            latency_secs: env("BENCH_LATENCY_SECS", 30),
        }
    }
}

/// ≈300-byte JSON payload.
fn payload(n: usize) -> String {
    let mut s = format!(
        "{{\"order\":{n},\"customer\":\"c-{}\",\"status\":\"created\",\"items\":[",
        n % 997
    );
    let mut i = 0;
    while s.len() < 270 {
        s.push_str(&format!("{{\"sku\":\"s{i}\",\"qty\":{}}},", i + 1));
        i += 1;
    }
    s.pop();
    s.push_str("]}");
    s
}

/// Inserts `rows` rows in 500-row transactions (multi-row INSERTs) over
/// 1,000 aggregates.
async fn fill(db: &TestDb, rows: usize) {
    let mut c = db.pool.get_conn().await.expect("connect");
    let mut n = 0;
    while n < rows {
        let batch = 500.min(rows - n);
        let values: Vec<String> = (n..n + batch)
            .map(|i| format!("('Order','agg-{}','Created','{}')", i % 1000, payload(i)))
            .collect();
        c.query_drop(format!(
            "BEGIN; INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES {}; COMMIT",
            values.join(",")
        ))
        .await
        .expect("insert batch");
        n += batch;
    }
}

fn relay_config(f: &Fixture, start: &str, http_port: u16) -> String {
    let spec = RelaySpec {
        extra: "",
        ..f.spec()
    };
    spec.toml(http_port).replace(
        "start_from = \"earliest\"",
        &format!("start_from = \"{start}\""),
    )
}

/// /proc/<pid>: (RSS bytes, CPU seconds).
fn proc_stats(pid: u32) -> (u64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 (11 and 12 after the name); 100 Hz.
    (rss_kb * 1024, (ticks(11) + ticks(12)) / 100.0)
}

#[derive(Default, Clone)]
struct Drain {
    drain_eps: f64,
    read_eps: f64,
    produce_eps: f64,
    peak_rss: u64,
    steady_rss: u64,
    idle_rss: u64,
    cpu_per_100k: f64,
}

async fn drain_once(rows: usize) -> Drain {
    let f = Fixture::new("bench", MYSQL_PORT, &["Order"], 3).await;
    let (file, pos) = f.db.head().await;
    let start = format!("file:{file}:{pos}");
    fill(&f.db, rows).await;
    let head = f.db.head().await;

    // Read-only: the binlog read, decoded and mapped, nothing produced.
    let cfg = Arc::new(
        Config::from_toml(
            &relay_config(&f, &start, free_port()),
            Path::new("bench.toml"),
            &[("OUTBOX_RELAY_MYSQL_PASSWORD".into(), RELAY_PASSWORD.into())],
        )
        .expect("config"),
    );
    let mut conn = binlog::connect(&cfg.mysql).await.expect("connect");
    let info = binlog::preflight(&mut conn, &cfg).await.expect("preflight");
    let from: StartFrom = start.parse().expect("start");
    let at = binlog::resolve_start(&mut conn, &info, &from)
        .await
        .expect("start");
    let mut source = binlog::Source::new(cfg.clone(), info, at, 1, Metrics::new()).expect("source");
    let t = Instant::now();
    let mut records: Vec<Record> = Vec::with_capacity(rows);
    while records.len() < rows {
        if let SourceEvent::Row { result: Ok(r), .. } = source.next().await.expect("binlog") {
            records.push(r);
        }
    }
    let read_eps = rows as f64 / t.elapsed().as_secs_f64();
    drop(source);

    // Produce-only: the same records, the relay's producer and settings, to
    // a topic of their own.
    let topic = format!("{}.produce", f.db.name);
    create_topics(std::slice::from_ref(&topic), 3).await;
    let sink = Sink::new(&cfg.kafka).expect("producer");
    let t = Instant::now();
    let mut acks = Vec::with_capacity(rows);
    for mut r in records {
        r.topic.clone_from(&topic);
        match sink.send(&r).await.expect("send") {
            Sent::Queued(fut) => acks.push(fut),
            Sent::Refused(e) => panic!("refused: {e}"),
        }
    }
    for a in acks {
        a.await.expect("delivery").expect("acknowledged");
    }
    let produce_eps = rows as f64 / t.elapsed().as_secs_f64();
    drop(sink);

    // Drain: the relay process from start to the checkpoint at the head.
    let port = free_port();
    let t = Instant::now();
    let relay = Relay::start(&f.dir.0, &relay_config(&f, &start, port), port, &[]);
    let pid = relay.pid();
    let mut peak = 0;
    loop {
        peak = peak.max(proc_stats(pid).0);
        if checkpoint(&f.name)
            .await
            .is_some_and(|(_, p)| (&p.file.file, p.file.pos) >= (&head.0, head.1))
        {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "drain did not finish: {}",
            relay.logs()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let drain_eps = rows as f64 / t.elapsed().as_secs_f64();
    let (steady_rss, cpu) = proc_stats(pid);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (idle_rss, _) = proc_stats(pid);
    let got = relay.events().await as usize;
    assert_eq!(got, rows, "the relay acknowledged {got} of {rows}");
    drop(relay);
    Drain {
        drain_eps,
        read_eps,
        produce_eps,
        peak_rss: peak,
        steady_rss,
        idle_rss,
        cpu_per_100k: cpu * 100_000.0 / rows as f64,
    }
}

/// The relay's own read → ack latency at quantile `q`, in ms: the upper
/// bound of the histogram bucket it falls in.
fn bucket_quantile(metrics: &str, q: f64) -> f64 {
    let buckets: Vec<(f64, f64)> = metrics
        .lines()
        .filter(|l| l.starts_with("outbox_relay_ack_latency_seconds_bucket{"))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let n = l.rsplit(' ').next()?.parse().ok()?;
            Some((
                if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                },
                n,
            ))
        })
        .collect();
    let total = buckets.last().map_or(0.0, |b| b.1);
    buckets
        .iter()
        .find(|(_, n)| *n >= q * total)
        .map_or(f64::NAN, |(le, _)| le * 1000.0)
}

/// Single-row transactions at `rate`/s for `secs`; returns per-record
/// latencies commit → read back, the relay's own read → ack p50/p99 (ms),
/// and its RSS while steady.
async fn latency(rate: u64, secs: u64) -> (Vec<Duration>, (f64, f64), u64) {
    let f = Fixture::new("latency", MYSQL_PORT, &["Order"], 1).await;
    let (file, pos) = f.db.head().await;
    let port = free_port();
    let mut relay = Relay::start(
        &f.dir.0,
        &relay_config(&f, &format!("file:{file}:{pos}"), port),
        port,
        &[],
    );
    relay.wait_ready().await;

    // The consumer: one partition, read as fast as the broker answers.
    let topic = f.topics[0].clone();
    let (tx, rx) = std::sync::mpsc::channel::<(u64, Instant)>();
    let total = (rate * secs) as usize + 1;
    // How long the consumer's fetch may wait at the broker. 1 ms reads back
    // sooner but floods tansu with fetches, which slows its produce
    // acknowledgements 10× (measured: relay read → ack p50 32–64 ms with
    // 1 ms, ≤ 4 ms with 100 ms); tansu then answers after the full wait, so
    // read-back latency includes up to 100 ms of it.
    let wait_ms = std::env::var("BENCH_FETCH_WAIT_MS").unwrap_or_else(|_| "100".into());
    let reader = std::thread::spawn(move || {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", BROKER)
            .set("group.id", format!("bench-{}", unique()))
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", wait_ms.as_str())
            .set("fetch.min.bytes", "1")
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, rdkafka::Offset::Beginning)
            .expect("partition");
        c.assign(&tpl).expect("assign");
        let mut seen = 0;
        let deadline = Instant::now() + Duration::from_secs(secs + 60);
        while seen < total && Instant::now() < deadline {
            if let Some(Ok(m)) = c.poll(Duration::from_millis(5)) {
                let now = Instant::now();
                let id = m
                    .headers()
                    .and_then(|h| {
                        use rdkafka::message::Headers;
                        h.iter()
                            .find(|h| h.key == "id")
                            .and_then(|h| h.value.map(<[u8]>::to_vec))
                    })
                    .and_then(|v| String::from_utf8(v).ok()?.parse().ok())
                    .unwrap_or(0);
                let _ = tx.send((id, now));
                seen += 1;
            }
        }
    });

    // Warm up: one row through the whole path, so the consumer is assigned
    // and fetching before the clock starts.
    f.db.insert_txn(&[Ev::new("Order", "warm-up", "{}")]).await;
    rx.recv_timeout(Duration::from_secs(60))
        .expect("the warm-up record read back");

    // Writers: two connections share the rate; each records when its
    // COMMIT returned.
    let per = rate / 2;
    let mut writers = Vec::new();
    for w in 0..2 {
        let pool = f.db.pool.clone();
        writers.push(tokio::spawn(async move {
            let mut c = pool.get_conn().await.expect("connect");
            let mut out = Vec::new();
            let t0 = Instant::now();
            for i in 0..per * secs {
                let due = t0 + Duration::from_micros(i * 1_000_000 / per);
                tokio::time::sleep_until(due.into()).await;
                c.exec_drop(
                    "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('Order', ?, 'Created', ?)",
                    (format!("w{w}-{}", i % 100), payload(i as usize)),
                )
                .await
                .expect("insert");
                out.push((c.last_insert_id().expect("id"), Instant::now()));
            }
            out
        }));
    }
    let mut committed = std::collections::HashMap::new();
    for w in writers {
        committed.extend(w.await.expect("writer"));
    }
    let (rss, _) = proc_stats(relay.pid());
    reader.join().expect("reader");
    let mut lat: Vec<Duration> = rx
        .try_iter()
        .filter_map(|(id, seen)| Some(seen.saturating_duration_since(*committed.get(&id)?)))
        .collect();
    lat.sort();
    let m = http_get(relay.http_port, "/metrics")
        .await
        .map(|r| r.1)
        .unwrap_or_default();
    let own = (bucket_quantile(&m, 0.5), bucket_quantile(&m, 0.99));
    assert!(relay.terminate().await.success(), "{}", relay.logs());
    (lat, own, rss)
}

/// The broker's side of latency: the relay's producer alone, one record
/// every 1/`rate` s for `secs`, send → acknowledgement per record; with
/// `db_load`, while the same single-row inserts run against MariaDB (the
/// CPU competition the relay sees), without a relay.
async fn produce_latency(rate: u64, secs: u64, db_load: bool) -> Vec<Duration> {
    let f = Fixture::new("ackonly", MYSQL_PORT, &["Order"], 1).await;
    let cfg = Config::from_toml(
        &relay_config(&f, "latest", free_port()),
        Path::new("bench.toml"),
        &[("OUTBOX_RELAY_MYSQL_PASSWORD".into(), RELAY_PASSWORD.into())],
    )
    .expect("config");
    let sink = Arc::new(Sink::new(&cfg.kafka).expect("producer"));
    let load = db_load.then(|| {
        let pool = f.db.pool.clone();
        tokio::spawn(async move {
            let mut c = pool.get_conn().await.expect("connect");
            let t0 = Instant::now();
            for i in 0..rate * secs {
                tokio::time::sleep_until((t0 + Duration::from_micros(i * 1_000_000 / rate)).into()).await;
                c.exec_drop(
                    "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('Order', ?, 'Created', ?)",
                    (format!("l{}", i % 100), payload(i as usize)),
                )
                .await
                .expect("insert");
            }
        })
    });
    let t0 = Instant::now();
    let mut acks = Vec::new();
    for i in 0..rate * secs {
        tokio::time::sleep_until((t0 + Duration::from_micros(i * 1_000_000 / rate)).into()).await;
        let rec = Record {
            topic: f.topics[0].clone(),
            key: format!("k{}", i % 100).into_bytes(),
            value: Some(payload(i as usize).into_bytes()),
            headers: Default::default(),
            id: i.to_string(),
        };
        let sent = Instant::now();
        if let Sent::Queued(fut) = sink.send(&rec).await.expect("send") {
            acks.push(tokio::spawn(async move {
                fut.await.ok()?.ok()?;
                Some(sent.elapsed())
            }));
        }
    }
    let mut lat = Vec::new();
    for a in acks {
        if let Ok(Some(d)) = a.await {
            lat.push(d);
        }
    }
    if let Some(l) = load {
        l.await.expect("db load");
    }
    lat.sort();
    lat
}

fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    (s[0], s[s.len() / 2], s[s.len() - 1])
}

fn pct(v: &[Duration], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
    v[i].as_secs_f64() * 1000.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    services();
    let plan = plan();
    let profile = if cfg!(debug_assertions) {
        "smoke (debug build)"
    } else {
        "release"
    };
    println!(
        "relay benchmark, {profile}: {} rows × {} repetitions; latency {} rows/s for {} s",
        plan.rows, plan.reps, plan.latency_rate, plan.latency_secs
    );
    let mut runs = Vec::new();
    for r in 0..plan.reps {
        let d = drain_once(plan.rows).await;
        println!(
            "  drain {}: relay {:.0} ev/s, read-only {:.0}, produce-only {:.0}",
            r + 1,
            d.drain_eps,
            d.read_eps,
            d.produce_eps
        );
        runs.push(d);
    }
    let (lat, own, lat_rss) = latency(plan.latency_rate, plan.latency_secs).await;
    let broker = produce_latency(plan.latency_rate, plan.latency_secs.min(10), false).await;
    let loaded = produce_latency(plan.latency_rate, plan.latency_secs.min(10), true).await;
    let bin = relay_bin();
    let size = std::fs::metadata(&bin).map(|m| m.len()).unwrap_or(0);
    let failover = std::fs::read_to_string(root().join("target/bench/failover.txt")).ok();

    let col = |f: fn(&Drain) -> f64| stats(&runs.iter().map(f).collect::<Vec<_>>());
    fn mb(b: f64) -> f64 {
        b / 1_048_576.0
    }
    let mut rows: Vec<(String, (f64, f64, f64), String)> = vec![
        (
            "drain (events/s)".into(),
            col(|d| d.drain_eps),
            "≥ 100000".into(),
        ),
        (
            "read-only (events/s)".into(),
            col(|d| d.read_eps),
            String::new(),
        ),
        (
            "produce-only (events/s)".into(),
            col(|d| d.produce_eps),
            String::new(),
        ),
        (
            "drain / min(read, produce)".into(),
            col(|d| d.drain_eps / d.read_eps.min(d.produce_eps)),
            "≥ 0.8".into(),
        ),
        (
            "peak RSS during drain (MB)".into(),
            col(|d| mb(d.peak_rss as f64)),
            String::new(),
        ),
        (
            "RSS after drain (MB)".into(),
            col(|d| mb(d.steady_rss as f64)),
            String::new(),
        ),
        (
            "RSS idle (MB)".into(),
            col(|d| mb(d.idle_rss as f64)),
            "≤ 25".into(),
        ),
        (
            "CPU s per 100k events".into(),
            col(|d| d.cpu_per_100k),
            String::new(),
        ),
    ];
    let one = |v: f64| (v, v, v);
    rows.push((
        format!("latency p50 (ms), {} records", lat.len()),
        one(pct(&lat, 0.5)),
        String::new(),
    ));
    rows.push((
        "latency p99 (ms)".into(),
        one(pct(&lat, 0.99)),
        "≤ 10".into(),
    ));
    rows.push((
        "latency max (ms)".into(),
        one(pct(&lat, 1.0)),
        String::new(),
    ));
    rows.push((
        "relay read → ack p50 (ms, bucket bound)".into(),
        one(own.0),
        String::new(),
    ));
    rows.push((
        "relay read → ack p99 (ms, bucket bound)".into(),
        one(own.1),
        "≤ 10".into(),
    ));
    rows.push((
        "producer alone: send → ack p50 (ms)".into(),
        one(pct(&broker, 0.5)),
        String::new(),
    ));
    rows.push((
        "producer alone: send → ack p99 (ms)".into(),
        one(pct(&broker, 0.99)),
        String::new(),
    ));
    rows.push((
        "… with the same MariaDB inserts running: p50 (ms)".into(),
        one(pct(&loaded, 0.5)),
        String::new(),
    ));
    rows.push((
        "… with the same MariaDB inserts running: p99 (ms)".into(),
        one(pct(&loaded, 0.99)),
        String::new(),
    ));
    rows.push((
        "RSS at steady load (MB)".into(),
        one(mb(lat_rss as f64)),
        "≤ 25".into(),
    ));
    rows.push((
        "relay binary (MB)".into(),
        one(mb(size as f64)),
        String::new(),
    ));

    println!("\n| metric | min | median | max | target |\n|---|---:|---:|---:|---|");
    let mut csv = String::from("metric,min,median,max,target\n");
    for (name, (lo, mid, hi), target) in &rows {
        println!("| {name} | {lo:.2} | {mid:.2} | {hi:.2} | {target} |");
        csv.push_str(&format!(
            "\"{name}\",{lo:.3},{mid:.3},{hi:.3},\"{target}\"\n"
        ));
    }
    if let Some(f) = &failover {
        println!(
            "| failover (from tests/it/election.rs) | {} | | | ≤ 5 s |",
            f.trim()
        );
    }
    println!(
        "\nlatency = COMMIT returned to the writer → record read back by a consumer (long-polling, \
         BENCH_FETCH_WAIT_MS={wait}); relay read → ack = the relay's own histogram (row read from the \
         binlog → Kafka acknowledgement)",
        wait = std::env::var("BENCH_FETCH_WAIT_MS").unwrap_or_else(|_| "100".into())
    );
    let dir = root().join("target/bench");
    std::fs::create_dir_all(&dir).expect("target/bench");
    let name = if cfg!(debug_assertions) {
        "smoke"
    } else {
        "results"
    };
    std::fs::write(dir.join(format!("{name}.csv")), csv).expect("write csv");
    println!("written: target/bench/{name}.csv");
}
