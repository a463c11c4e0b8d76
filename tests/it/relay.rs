//! The relay against real MariaDB, Redis and broker: ordering, restarts and
//! crashes, server restarts, noise, preflight and bad rows, fencing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::*;

/// 10,000 rows over 500 aggregates in 200 transactions → exactly 10,000
/// records, per-key commit order, over 3 partitions, right topic/key/headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_ten_thousand_rows_in_commit_order_per_key() {
    let f = Fixture::new("order", mysql_port(), &["Order", "Customer"], 3).await;
    let (dir, db, ts, name) = (&f.dir, &f.db, &f.topics, &f.name);
    let spec = f.spec();
    let port = free_port();
    let mut relay = Relay::start(&dir.0, &spec.toml(port), port, &[]);
    relay.wait_ready().await;

    let t0 = std::time::Instant::now();
    let mut n = 0u64;
    for t in 0..200 {
        let evs: Vec<Ev> = (0..50)
            .map(|i| {
                n += 1;
                let agg: u64 = (t * 50 + i) % 500;
                let kind = if agg.is_multiple_of(2) {
                    "Order"
                } else {
                    "Customer"
                };
                let mut e = Ev::new(kind, &format!("agg-{agg}"), &format!("{{\"n\":{n}}}"));
                e.headers = Some(format!("{{\"trace\":\"t{n}\",\"seq\":{n}}}"));
                e
            })
            .collect();
        db.insert_txn(&evs).await;
    }
    let rows = db.rows().await;
    assert_eq!(rows.len(), 10_000);
    println!("inserted in {:?}", t0.elapsed());
    let recs = read_topics(ts, 10_000, Duration::from_secs(120)).await;
    println!("read back in {:?}", t0.elapsed());
    let report = check(&rows, &recs);
    report.assert_complete();
    assert_eq!(
        recs.len(),
        10_000,
        "exactly once without failures: {report:?}"
    );
    let partitions: std::collections::BTreeSet<(String, i32)> = recs
        .iter()
        .map(|r| (r.topic.clone(), r.partition))
        .collect();
    assert!(
        partitions.len() >= 6,
        "spread over 3 partitions per topic: {partitions:?}"
    );
    for r in &recs {
        let agg: u64 = r.key_str().trim_start_matches("agg-").parse().expect("key");
        let kind = if agg.is_multiple_of(2) {
            "Order"
        } else {
            "Customer"
        };
        assert_eq!(r.topic, format!("{}.{kind}", db.name));
        assert_eq!(r.header("event_type"), Some(&b"Created"[..]));
        let n = std::str::from_utf8(r.value.as_deref().unwrap())
            .unwrap()
            .to_owned();
        let seq = n.trim_start_matches("{\"n\":").trim_end_matches('}');
        assert_eq!(
            r.header("trace")
                .map(|h| String::from_utf8_lossy(h).into_owned()),
            Some(format!("t{seq}"))
        );
        assert_eq!(r.header("seq"), Some(seq.as_bytes()));
        assert!(r
            .header("outbox.gtid")
            .is_some_and(|g| g.starts_with(b"0-1-")));
        assert!(r
            .header("outbox.binlog")
            .is_some_and(|g| g.starts_with(b"mysql-bin.")));
        assert_eq!(r.header("outbox.epoch"), Some(&b"1"[..]));
    }
    // The checkpoint reaches the head once everything is acknowledged.
    wait_checkpoint_at_head(redis_url(), name, db, Duration::from_secs(60)).await;
    assert!(relay.terminate().await.success(), "{}", relay.logs());
}

/// A continuous writer while the relay is stopped with SIGTERM and restarted,
/// then SIGKILLed at three different points: nothing missing, duplicates only
/// after kills and identical to the first delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_and_crashes_lose_nothing() {
    let f = Fixture::new("crash", mysql_port(), &["Order"], 3).await;
    let (dir, db, ts) = (&f.dir, &f.db, &f.topics);
    let spec = f.spec();
    let stop = Arc::new(AtomicBool::new(false));
    // About 500 rows/s.
    let writer = steady_writer(db.clone(), stop.clone(), 5, 37, Duration::from_millis(10));

    let port = free_port();
    let mut relay = Relay::start(&dir.0, &spec.toml(port), port, &[]);
    relay.wait_ready().await;
    relay.wait_events(500).await;
    assert!(
        relay.terminate().await.success(),
        "graceful stop: {}",
        relay.logs()
    );
    assert!(
        relay.logs().contains("final checkpoint stored"),
        "{}",
        relay.logs()
    );
    // After a graceful stop the checkpoint covers everything delivered: the
    // restart sends none of it again.
    let before = read_topics(ts, 0, Duration::from_secs(10)).await;
    let rows = db.rows().await;
    let delivered: std::collections::BTreeSet<u64> = before.iter().map(Rec::id).collect();
    let covered: Vec<(u64, Option<String>)> = rows
        .into_iter()
        .filter(|(id, _)| delivered.contains(id))
        .collect();

    // SIGKILL at three points: right after start, and after 300 and 1,000
    // records of that process.
    for (i, after) in [0u64, 300, 1000].into_iter().enumerate() {
        let port = free_port();
        relay = Relay::start(&dir.0, &spec.toml(port), port, &[]);
        relay.wait_ready().await;
        if after > 0 {
            relay.wait_events(after).await;
        }
        if i == 1 {
            let recs = read_topics(ts, 0, Duration::from_secs(10)).await;
            let r = check(&covered, &recs);
            assert_eq!(r.duplicates, 0, "no replay after a graceful stop: {r:?}");
        }
        relay.kill().await;
    }
    let port = free_port();
    relay = Relay::start(&dir.0, &spec.toml(port), port, &[]);
    relay.wait_ready().await;
    stop.store(true, Ordering::Relaxed);
    writer.await.expect("writer");
    let rows = db.rows().await;
    let recs = read_topics(ts, rows.len(), Duration::from_secs(120)).await;
    let report = check(&rows, &recs);
    report.assert_complete();
    // The server that wrote the checkpoint: resumed at its binlog offset.
    assert!(relay.logs().contains("by=\"offset\""), "{}", relay.logs());
    println!(
        "crash test: {} rows, {} records, {} duplicates after 3 SIGKILLs",
        rows.len(),
        recs.len(),
        report.duplicates
    );
    assert!(relay.terminate().await.success(), "{}", relay.logs());
}

/// SIGKILLs while streaming at the writer's pace (~1,500-2,000 rows/s) with
/// the default checkpoint interval (100 ms): each kill costs at most the
/// records acknowledged since the last checkpoint write plus those in
/// flight — asserted at most 300 ms of the writer's traffic per kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_after_a_sigkill_are_bounded_by_the_checkpoint_interval() {
    const KILLS: usize = 4;
    let f = Fixture::new("dupbound", mysql_port(), &["Order"], 3).await;
    let toml = |port: u16| {
        f.spec()
            .toml(port)
            .replace("checkpoint_interval = \"200ms\"\n", "")
    };
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let writer = steady_writer(
        f.db.clone(),
        stop.clone(),
        20,
        200,
        Duration::from_millis(10),
    );
    let port = free_port();
    let mut relay = Relay::start(&f.dir.0, &toml(port), port, &[]);
    for _ in 0..KILLS {
        // Past the catch-up after the restart (whose in-flight tail is
        // bounded by `max_in_flight` instead): streaming at the writer's pace.
        relay.status_until("caught up", |s| lag(s).0 == 0).await;
        let n = relay.events().await;
        relay.wait_events(n + 2000).await;
        relay.kill().await;
        let port = free_port();
        relay = Relay::start(&f.dir.0, &toml(port), port, &[]);
    }
    relay.wait_events(1000).await;
    stop.store(true, Ordering::Relaxed);
    let written = writer.await.expect("writer");
    let rate = written as f64 / started.elapsed().as_secs_f64();
    let rows = f.db.rows().await;
    let recs = read_topics(&f.topics, rows.len(), Duration::from_secs(120)).await;
    let report = check(&rows, &recs);
    report.assert_complete();
    report.assert_duplicates_per_kill(KILLS, rate, 300);
    assert!(relay.terminate().await.success(), "{}", relay.logs());
}

/// Unrelated tables (VARBINARY, latin1), UPDATE/DELETE on the outbox and a
/// rolled-back transaction change nothing of what is relayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noise_is_ignored() {
    let f = Fixture::new("noise", mysql_port(), &["Order"], 3).await;
    let (dir, db, ts, name) = (&f.dir, &f.db, &f.topics, &f.name);
    let spec = f.spec();
    db.exec("CREATE TABLE other (id INT PRIMARY KEY, b VARBINARY(32), l VARCHAR(32) CHARACTER SET latin1)").await;
    let port = free_port();
    let mut relay = Relay::start(&dir.0, &spec.toml(port), port, &[]);
    relay.wait_ready().await;

    db.exec("INSERT INTO other VALUES (1, 0xff00fe80, 'caf\u{e9}')")
        .await;
    let first = db.insert_txn(&[Ev::new("Order", "a", "{\"v\":1}")]).await;
    db.exec(&format!(
        "UPDATE outbox SET payload = 'changed' WHERE id = {}",
        first[0]
    ))
    .await;
    db.exec(&format!("DELETE FROM outbox WHERE id = {}", first[0]))
        .await;
    {
        use mysql_async::prelude::Queryable;
        let mut c = db.pool.get_conn().await.unwrap();
        let mut tx = c.start_transaction(Default::default()).await.unwrap();
        tx.query_drop("INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) VALUES ('Order', 'a', 'Created', 'rolled back')")
            .await
            .unwrap();
        tx.rollback().await.unwrap();
    }
    db.exec("UPDATE other SET b = 0x00, l = '\u{e0}' WHERE id = 1")
        .await;
    let second = db.insert_txn(&[Ev::new("Order", "a", "{\"v\":2}")]).await;
    // Quick commits elsewhere, then quiet: the checkpoint still reaches the
    // head (a commit held back by coalescing is reported at the heartbeat).
    for i in 2..6 {
        db.exec(&format!("INSERT INTO other VALUES ({i}, NULL, NULL)"))
            .await;
    }

    wait_checkpoint_at_head(redis_url(), name, db, Duration::from_secs(60)).await;
    let recs = read_topics(ts, 2, Duration::from_secs(30)).await;
    let ids: Vec<u64> = recs.iter().map(Rec::id).collect();
    assert_eq!(ids, vec![first[0], second[0]]);
    assert_eq!(
        recs[0].value.as_deref(),
        Some(&b"{\"v\":1}"[..]),
        "the insert as it was"
    );
    let metrics = http_get(port, "/metrics").await.expect("metrics").1;
    assert!(
        metrics.contains(&format!(
            "outbox_relay_ignored_rows_total{{table=\"{}.outbox\",kind=\"update\"}} 1",
            db.name
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "outbox_relay_ignored_rows_total{{table=\"{}.outbox\",kind=\"delete\"}} 1",
            db.name
        )),
        "{metrics}"
    );
    assert!(relay.terminate().await.success(), "{}", relay.logs());
}

/// A writer with a stale epoch cannot move the checkpoint: the relay refuses
/// to start, and a direct stale write is refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_epoch_cannot_move_the_checkpoint() {
    let f = Fixture::new("epoch", mysql_port(), &["Order"], 1).await;
    let (dir, db, ts, name) = (&f.dir, &f.db, &f.topics, &f.name);
    let spec = RelaySpec {
        extra: "epoch = 5",
        ..f.spec()
    };
    let port = free_port();
    let mut relay = Relay::start(&dir.0, &spec.toml(port), port, &[]);
    relay.wait_ready().await;
    db.insert_txn(&[Ev::new("Order", "a", "{}")]).await;
    read_topics(ts, 1, Duration::from_secs(30)).await;
    assert!(relay.terminate().await.success(), "{}", relay.logs());
    let (epoch, pos) = checkpoint(name).await.expect("checkpoint");
    assert_eq!(epoch, 5);

    // A relay of an older term refuses to start and writes nothing.
    let stale = RelaySpec {
        extra: "epoch = 4",
        ..spec
    };
    let port = free_port();
    let mut old = Relay::start(&dir.0, &stale.toml(port), port, &[]);
    let status = old.wait_exit(Duration::from_secs(30)).await;
    assert!(!status.success());
    assert!(
        old.logs()
            .contains("epoch 4 is older than the stored epoch 5"),
        "{}",
        old.logs()
    );
    assert_eq!(checkpoint(name).await, Some((5, pos.clone())));

    // The store itself refuses a stale compare-and-set.
    let cfg = outbox_relay::config::RedisConfig {
        url: redis_url().into(),
        password_file: None,
        ca_file: None,
        key_prefix: "test:".into(),
        checkpoint_interval: Duration::from_secs(1),
        password: Default::default(),
    };
    let store = outbox_relay::checkpoint::CheckpointStore::connect(&cfg, name)
        .await
        .expect("store");
    let mut moved = pos.clone();
    moved.file.pos += 1000;
    let e = store
        .save(3, &outbox_relay::position::Position::Binlog(moved.clone()))
        .await
        .expect_err("stale write refused");
    assert!(
        e.to_string()
            .contains("epoch 3 is older than the stored epoch 5"),
        "{e}"
    );
    assert_eq!(checkpoint(name).await, Some((5, pos)));
    store
        .save(6, &outbox_relay::position::Position::Binlog(moved.clone()))
        .await
        .expect("newer epoch writes");
    assert_eq!(checkpoint(name).await.map(|c| c.0), Some(6));
}

/// Several outbox tables in one relay, each with its own column names,
/// topic template and topic map.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_outbox_tables_each_with_its_mapping() {
    services();
    let dir = Scratch::new("tables");
    let db = TestDb::new("tables", mysql_port()).await;
    db.exec(
        "CREATE TABLE events (event_id CHAR(36) NOT NULL PRIMARY KEY, kind VARCHAR(64) NOT NULL, \
         entity VARCHAR(64) NOT NULL, name VARCHAR(64) NOT NULL, body TEXT NOT NULL)",
    )
    .await;
    let ts = vec![
        format!("{}.Order", db.name),
        format!("{}.billing", db.name),
        format!("{}.events.Shipped", db.name),
    ];
    create_topics(&ts, 1).await;
    let name = format!("tables-{}", db.name);
    let second = format!(
        r#"
[[outbox]]
database = "{db}"
table = "events"
topic = "{db}.{{table}}.{{event_type}}"
columns = {{ id = "event_id", aggregate_type = "kind", aggregate_id = "entity", event_type = "name", payload = "body", headers = "" }}
"#,
        db = db.name
    );
    let toml = RelaySpec {
        name: &name,
        db: &db.name,
        mysql_port: mysql_port(),
        topic: &format!("{}.{{aggregate_type}}", db.name),
        extra_kafka: "",
        extra: "",
    }
    .toml(0)
    .replace(
        "\n[kafka]",
        &format!(
            "topic_map = {{ Invoice = \"{}.billing\" }}\n{second}\n[kafka]",
            db.name
        ),
    );
    let port = free_port();
    let toml = toml.replace("127.0.0.1:0\"", &format!("127.0.0.1:{port}\""));
    let mut relay = Relay::start(&dir.0, &toml, port, &[]);
    relay.wait_ready().await;
    let ids = db
        .insert_txn(&[
            Ev::new("Order", "o1", "{\"a\":1}"),
            Ev::new("Invoice", "i1", "{\"b\":2}"),
        ])
        .await;
    db.exec(
        "INSERT INTO events VALUES ('6f1c2a4e-0000-4000-8000-000000000001', 'Parcel', 'p1', 'Shipped', 'parcel shipped')",
    )
    .await;
    relay.wait_events(3).await;
    let recs = read_topics(&ts, 3, Duration::from_secs(30)).await;
    let by_topic = |t: &str| recs.iter().find(|r| r.topic == t).cloned();
    let order = by_topic(&ts[0]).expect("order record");
    assert_eq!((order.id(), order.key_str()), (ids[0], "o1".to_string()));
    let invoice = by_topic(&ts[1]).expect("topic map");
    assert_eq!(invoice.id(), ids[1]);
    let shipped = by_topic(&ts[2]).expect("second table");
    assert_eq!(
        shipped.header("id"),
        Some(&b"6f1c2a4e-0000-4000-8000-000000000001"[..])
    );
    assert_eq!(shipped.key_str(), "p1");
    assert_eq!(shipped.value.as_deref(), Some(&b"parcel shipped"[..]));
    assert!(relay.terminate().await.success(), "{}", relay.logs());
    assert!(
        !relay.logs().contains(RELAY_PASSWORD),
        "the password leaked into the log"
    );
}
