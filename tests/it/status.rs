//! The relay's own report (`/status`) against real servers: lag in seconds
//! grows while the broker is down and returns to 0 after it is back; bytes
//! behind match the server's head within one poll. A private MariaDB (no
//! other writers, so the head is exact) and a private durable broker.

use std::time::Duration;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reported_lag_grows_while_the_broker_is_down_and_returns_to_zero() {
    services();
    let scratch = Scratch::new("lag-servers");
    let server = PrivateDb::start(&scratch.0, &[]);
    let broker = PrivateBroker::start(&scratch.0);
    let f = Fixture::new("lag", server.port, &["Order"], 1).await;
    let mut relay = start_on_broker(&f, &broker, 1).await;
    let addr = broker.addr();
    for i in 0..5 {
        f.db.insert_txn(&[Ev::new("Order", &format!("o{i}"), "{}")])
            .await;
    }
    // Caught up: no lag, and the position is the server's head exactly.
    let head = f.db.head().await;
    let s = relay
        .status_until("caught up", |s| {
            lag(s) == (0, Some(0)) && s["position"]["pos"].as_u64() == Some(head.1)
        })
        .await;
    assert_eq!(s["role"], "leader");
    assert_eq!(s["head"]["file"], head.0.as_str());
    assert!(s["events"].as_u64() >= Some(5), "{s}");

    // Broker down: the relay reads on, nothing is acknowledged, lag grows.
    broker.down();
    for i in 0..10 {
        f.db.insert_txn(&[Ev::new("Order", &format!("p{i}"), "{}")])
            .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let head = f.db.head().await;
    let first = relay
        .status_until("lag of at least 3 s", |s| lag(s).0 >= 3)
        .await;
    let later = relay
        .status_until("a growing lag", |s| lag(s).0 > lag(&first).0)
        .await;
    // Bytes behind = head − relayed position, within one poll (500 ms).
    let s = relay
        .status_until("bytes behind the head", |s| {
            s["head"]["pos"].as_u64() == Some(head.1)
        })
        .await;
    let pos = s["position"]["pos"].as_u64().expect("position");
    assert!(pos < head.1, "{s}");
    assert_eq!(lag(&s).1, Some(head.1 - pos), "{s}");
    println!(
        "broker down: lag {}s then {}s, {} bytes behind",
        lag(&first).0,
        lag(&later).0,
        head.1 - pos
    );

    // Broker back: everything is delivered and the lag returns to 0.
    broker.up();
    relay
        .status_until("caught up again", |s| lag(s) == (0, Some(0)))
        .await;
    let rows = f.db.rows().await;
    let recs = read_topics_from(&addr, &f.topics, rows.len(), Duration::from_secs(60)).await;
    let report = check(&rows, &recs);
    println!("after the broker outage: {report:?}");
    report.assert_complete();
    assert!(relay.terminate().await.success(), "{}", relay.logs());
}
