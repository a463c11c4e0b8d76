//! Back after an outage (issue #18): how soon the relay streams again once
//! a dependency answers. Each dependency — MariaDB, PostgreSQL, the Kafka
//! broker, Redis — is reached through a TCP proxy that the benchmark cuts
//! (its connections closed, new ones refused: to a client, the server is
//! gone) for `OUTAGE`, then opens again. The figure is from the proxy
//! listening again to the relay's next record acknowledged (MariaDB,
//! PostgreSQL, Kafka) or its next checkpoint written (Redis), under a steady
//! writer; `reps` outages each, on one relay per dependency.
//!
//! A proxy, not a restart: a restarted server's own recovery is not the
//! relay's (the durable test broker writes the queued batches to sqlite one
//! after the other, BENCHMARKS.md), and the fault tests restart servers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::pg::Bench;
use crate::support::*;
use crate::{relay_config, stats};

/// How long each dependency stays away: past the retries' cap (250 ms).
const OUTAGE: Duration = Duration::from_secs(2);

/// A TCP proxy on a port of its own to `127.0.0.1:target`.
struct Proxy {
    port: u16,
    open: watch::Sender<bool>,
    listening: watch::Receiver<Option<Instant>>,
}

impl Proxy {
    async fn start(target: u16) -> Proxy {
        let port = free_port();
        let (open, rx) = watch::channel(true);
        let (tx, mut listening) = watch::channel(None);
        tokio::spawn(serve(port, target, rx, tx));
        listening
            .wait_for(Option::is_some)
            .await
            .expect("the proxy listens");
        Proxy {
            port,
            open,
            listening,
        }
    }

    /// Closes every connection and stops listening.
    async fn cut(&mut self) {
        self.open.send_replace(false);
        self.listening
            .wait_for(Option::is_none)
            .await
            .expect("the proxy stops listening");
    }

    /// Listens again; returns when it did.
    async fn restore(&mut self) -> Instant {
        self.open.send_replace(true);
        self.listening
            .wait_for(Option::is_some)
            .await
            .expect("the proxy listens again")
            .expect("listening")
    }
}

async fn serve(
    port: u16,
    target: u16,
    mut open: watch::Receiver<bool>,
    listening: watch::Sender<Option<Instant>>,
) {
    loop {
        if open.wait_for(|o| *o).await.is_err() {
            return;
        }
        // The port was ours a moment ago; nobody else binds it meanwhile.
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", port)).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        };
        listening.send_replace(Some(Instant::now()));
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((mut client, _)) = accepted else { continue };
                    let mut open = open.clone();
                    tokio::spawn(async move {
                        let Ok(mut server) = TcpStream::connect(("127.0.0.1", target)).await else {
                            return;
                        };
                        // Both sockets close when the outage begins.
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                            _ = open.wait_for(|o| !*o) => {}
                        }
                    });
                }
                changed = open.changed() => {
                    if changed.is_err() || !*open.borrow() {
                        break;
                    }
                }
            }
        }
        drop(listener);
        listening.send_replace(None);
    }
}

/// `reps` outages of `proxy` under a streaming relay: from each return to
/// `metric` moving again, in ms.
async fn outages(relay: &Relay, proxy: &mut Proxy, metric: &str, reps: usize) -> Vec<f64> {
    let mut back = Vec::new();
    for _ in 0..reps {
        let n = relay.metric(metric).await;
        wait_for("the relay streaming", Duration::from_secs(60), || async {
            (relay.metric(metric).await > n).then_some(())
        })
        .await;
        proxy.cut().await;
        // The outage itself: the relay's retries run meanwhile.
        tokio::time::sleep(OUTAGE).await;
        let n = relay.metric(metric).await;
        let up = proxy.restore().await;
        // Polled every 2 ms (`wait_for` looks every 50).
        while relay.metric(metric).await <= n {
            assert!(
                up.elapsed() < Duration::from_secs(30),
                "{metric} still at {n} 30 s after the outage; log:\n{}",
                relay.logs()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        back.push(up.elapsed().as_secs_f64() * 1000.0);
    }
    back
}

/// Per dependency: min / median / max ms from its return to the relay's
/// next acknowledged record (Redis: next checkpoint).
pub async fn measure(reps: usize) -> Vec<(&'static str, (f64, f64, f64))> {
    const EVENTS: &str = "outbox_relay_events_total";
    let mut out = Vec::new();

    // MariaDB and Redis: one relay, a proxy before each.
    let f = Fixture::new("back", mysql_port(), &["Order"], 3).await;
    let (file, pos) = f.db.head().await;
    let mut mysql = Proxy::start(f.mysql_port).await;
    let redis_port: u16 = redis_url()
        .trim_start_matches("redis://127.0.0.1:")
        .trim_end_matches("/0")
        .parse()
        .expect("the Redis port");
    let mut redis = Proxy::start(redis_port).await;
    let http = free_port();
    let toml = relay_config(&f, &format!("file:{file}:{pos}"), http)
        .replace(
            &format!("port = {}", f.mysql_port),
            &format!("port = {}", mysql.port),
        )
        .replace(redis_url(), &format!("redis://127.0.0.1:{}/0", redis.port))
        // A checkpoint soon after Redis answers, seen soon.
        .replace(
            "checkpoint_interval = \"200ms\"",
            "checkpoint_interval = \"20ms\"",
        );
    let stop = Arc::new(AtomicBool::new(false));
    let writer = steady_writer(f.db.clone(), stop.clone(), 1, 100, Duration::from_millis(2));
    let mut relay = Relay::start(&f.dir.0, &toml, http, &[]);
    relay.wait_ready().await;
    out.push((
        "MariaDB returns → next record acknowledged",
        stats(&outages(&relay, &mut mysql, EVENTS, reps).await),
    ));
    out.push((
        "Redis returns → next checkpoint written",
        stats(&outages(&relay, &mut redis, "outbox_relay_checkpoints_total", reps).await),
    ));
    drop(relay);

    // The broker: a private in-memory one that tells its clients the
    // proxy's address, so every connection goes through the proxy.
    let dir = f.dir.0.join("broker");
    let port = free_port();
    let mut kafka = Proxy::start(port).await;
    services_sh(&[
        "start-broker",
        &dir.to_string_lossy(),
        &port.to_string(),
        "memory",
        &kafka.port.to_string(),
    ]);
    let topic = format!("{}.Order", f.db.name);
    let http = free_port();
    let (file, pos) = f.db.head().await;
    let toml = relay_config(&f, &format!("file:{file}:{pos}"), http).replace(
        &format!("bootstrap_servers = \"{}\"", broker()),
        &format!(
            "bootstrap_servers = \"127.0.0.1:{}\"\ncreate_topics = {{ topics = [\"{topic}\"], partitions = 3 }}",
            kafka.port
        ),
    );
    let relay = Relay::start(&f.dir.0, &toml, http, &[]);
    out.push((
        "the broker returns → next record acknowledged",
        stats(&outages(&relay, &mut kafka, EVENTS, reps).await),
    ));
    drop(relay);
    services_sh(&["stop-dir", &dir.to_string_lossy()]);
    stop.store(true, Ordering::Relaxed);
    writer.await.expect("writer");

    // PostgreSQL.
    let b = Bench::new("pgback").await;
    let mut pg = Proxy::start(pg_port()).await;
    let http = free_port();
    let toml = b.toml(&b.name, http).replace(
        &format!("port = {}", pg_port()),
        &format!("port = {}", pg.port),
    );
    let mut relay = Relay::start(
        &b.dir.0,
        &toml,
        http,
        &[("OUTBOX_RELAY_POSTGRES_PASSWORD", RELAY_PASSWORD)],
    );
    relay.wait_ready().await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn({
        let (stop, db) = (stop.clone(), b.db.clone());
        async move {
            let c = pg_connect(pg_port(), "app", "app-password", &db).await;
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                c.batch_execute(&format!(
                    "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
                     VALUES ('Order', 'o{}', 'Created', '{{\"n\":{i}}}')",
                    i % 100
                ))
                .await
                .expect("insert");
                i += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    });
    out.push((
        "PostgreSQL returns → next record acknowledged",
        stats(&outages(&relay, &mut pg, EVENTS, reps).await),
    ));
    stop.store(true, Ordering::Relaxed);
    writer.await.expect("writer");
    assert!(relay.terminate().await.success(), "{}", relay.logs());
    b.drop_all().await;
    out
}
