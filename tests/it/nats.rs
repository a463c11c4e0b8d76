//! The NATS JetStream sink against a private `nats-server -js` (user and
//! password on): every event counted by id through SIGKILLs and a server
//! restart, duplicates counted, refusals as bad rows, no secret in the log.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer};
use futures_util::StreamExt;

use crate::support::*;

pub(crate) const USER: &str = "relay";
pub(crate) const PASSWORD: &str = "nats-s3cret-pw";

/// A JetStream server of the test's own, with a user and password.
pub(crate) struct PrivateNats {
    dir: std::path::PathBuf,
    pub(crate) port: u16,
    /// More nats-server arguments (TLS).
    extra: Vec<String>,
}

impl PrivateNats {
    pub(crate) fn start(dir: &std::path::Path) -> PrivateNats {
        PrivateNats::start_with(dir, &[])
    }

    pub(crate) fn start_with(dir: &std::path::Path, extra: &[&str]) -> PrivateNats {
        let n = PrivateNats {
            dir: dir.join("nats"),
            port: free_port(),
            extra: extra.iter().map(|a| a.to_string()).collect(),
        };
        n.up();
        n
    }

    fn up(&self) {
        let (dir, port) = (self.dir.to_string_lossy(), self.port.to_string());
        let mut args = vec![
            "start-nats",
            &dir,
            &port,
            "--user",
            USER,
            "--pass",
            PASSWORD,
        ];
        args.extend(self.extra.iter().map(String::as_str));
        services_sh(&args);
    }

    fn down(&self) {
        services_sh(&["stop-dir", &self.dir.to_string_lossy()]);
    }

    pub(crate) fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub(crate) async fn jetstream(&self) -> jetstream::Context {
        let client =
            async_nats::ConnectOptions::with_user_and_password(USER.into(), PASSWORD.into())
                .connect(self.url())
                .await
                .expect("connect to the test's nats-server");
        jetstream::new(client)
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        self.down();
    }
}

/// The relay's config for `f` with `[nats]` as its sink; `nats` is the
/// rest of that section.
pub(crate) fn nats_toml(f: &Fixture, http_port: u16, url: &str, nats: &str) -> String {
    let kafka = f.spec().toml(http_port);
    let start = kafka.find("[kafka]").expect("[kafka]");
    let end = kafka.find("[redis]").expect("[redis]");
    format!(
        "{}[nats]\nurl = \"{url}\"\n{nats}\n\n{}",
        &kafka[..start],
        &kafka[end..]
    )
}

pub(crate) fn start(f: &Fixture, url: &str, nats: &str) -> Relay {
    let port = free_port();
    Relay::start(
        &f.dir.0,
        &nats_toml(f, port, url, nats),
        port,
        &[("OUTBOX_RELAY_NATS_PASSWORD", PASSWORD)],
    )
}

/// Every message of `stream`, read from the start as `Rec`s (subject as the
/// topic, stream sequence as the offset, `outbox.key` as the key): at
/// least `at_least`, then until a second passes without a new one.
pub(crate) async fn read_stream(
    js: &jetstream::Context,
    stream: &str,
    at_least: usize,
) -> Vec<Rec> {
    let s = js.get_stream(stream).await.expect("the stream");
    let c = s
        .create_consumer(consumer::pull::Config {
            deliver_policy: consumer::DeliverPolicy::All,
            ack_policy: consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .expect("a consumer");
    let mut msgs = c.messages().await.expect("messages");
    let mut recs = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let wait = if recs.len() >= at_least {
            Duration::from_secs(1)
        } else {
            deadline.saturating_duration_since(Instant::now())
        };
        match tokio::time::timeout(wait, msgs.next()).await {
            Ok(Some(Ok(m))) => {
                let info = m.info().expect("jetstream message");
                let headers: Vec<(String, Vec<u8>)> = m
                    .headers
                    .iter()
                    .flat_map(|h| h.iter())
                    .flat_map(|(k, vs)| {
                        vs.iter()
                            .map(move |v| (k.to_string(), v.as_str().as_bytes().to_vec()))
                    })
                    .collect();
                let key = headers
                    .iter()
                    .find(|(k, _)| k == "outbox.key")
                    .map(|(_, v)| v.clone());
                recs.push(Rec {
                    topic: m.subject.to_string(),
                    partition: 0,
                    offset: info.stream_sequence as i64,
                    key,
                    value: Some(m.payload.to_vec()),
                    headers,
                });
            }
            Ok(Some(Err(e))) => panic!("reading {stream}: {e}"),
            Ok(None) => break,
            Err(_) if recs.len() >= at_least => break,
            Err(_) => panic!(
                "{stream}: {} of {at_least} messages within 120 s",
                recs.len()
            ),
        }
    }
    recs
}

/// A writer under load; the relay SIGKILLed three times and the NATS server
/// restarted: every row in the stream once (JetStream drops the replays by
/// `Nats-Msg-Id`), per-key order kept, the password never logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_sink_keeps_every_event_through_kills_and_a_server_restart() {
    let f = Fixture::new("nats", mysql_port(), &["Order"], 1).await;
    let nats = PrivateNats::start(&f.dir.0);
    let stream = format!("OUTBOX_{}", unique());
    let section = format!(
        "stream = \"{stream}\"\nuser = \"{USER}\"\nack_timeout = \"5s\"\n\
         [nats.create_stream]\nsubjects = [\"{}.>\"]\n",
        f.db.name
    );
    let stop = Arc::new(AtomicBool::new(false));
    let writer = steady_writer(f.db.clone(), stop.clone(), 2, 20, Duration::from_millis(5));
    let mut relay = start(&f, &nats.url(), &section);
    let mut logs = String::new();
    for _ in 0..3 {
        relay.wait_events(200).await;
        relay.kill().await;
        logs += &relay.logs();
        relay = start(&f, &nats.url(), &section);
    }
    // The server restarts under the writer: the relay blocks, then resumes.
    relay.wait_events(200).await;
    nats.down();
    tokio::time::sleep(Duration::from_secs(2)).await;
    nats.up();
    let before = relay.events().await;
    wait_for(
        "the relay streaming again after the restart",
        Duration::from_secs(60),
        || async { (relay.events().await > before + 100).then_some(()) },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    writer.await.expect("writer");
    let rows = f.db.rows().await;
    let js = nats.jetstream().await;
    let recs = read_stream(&js, &stream, rows.len()).await;
    let report = check(&rows, &recs);
    println!(
        "{} rows through 3 kills and a NATS restart: {report:?}",
        rows.len()
    );
    report.assert_complete();
    assert_eq!(
        report.duplicates, 0,
        "JetStream should have dropped every replay"
    );
    assert!(relay.terminate().await.success(), "{}", relay.logs());
    logs += &relay.logs();
    assert!(
        !logs.contains(PASSWORD),
        "the NATS password in the relay's log"
    );
    assert!(
        logs.contains("restarting the stream"),
        "no stream restart seen:\n{logs}"
    );
}

/// A subject outside the stream is a bad row: the relay stops naming it, or
/// (dead_letter) sends it to the dead-letter subject and goes on. A missing
/// stream stops the relay with the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_refusals_are_bad_rows() {
    let f = Fixture::new("natsbad", mysql_port(), &["Order"], 1).await;
    let nats = PrivateNats::start(&f.dir.0);
    let url = nats.url();

    let missing = format!("stream = \"NOPE_{}\"\nuser = \"{USER}\"\n", unique());
    start(&f, &url, &missing)
        .wait_failure(&["does not exist: create it, or set nats.create_stream"])
        .await;

    let stream = format!("BAD_{}", unique());
    let db = &f.db.name;
    let base = format!(
        "stream = \"{stream}\"\nuser = \"{USER}\"\n\
         [nats.create_stream]\nsubjects = [\"{db}.Order\", \"{db}.dlq\"]\n"
    );
    f.db.insert_txn(&[Ev::new("Order", "o1", "{}")]).await;
    f.db.insert_txn(&[Ev::new("Other", "x1", "{}")]).await;
    f.db.insert_txn(&[Ev::new("Order", "o2", "{}")]).await;
    let logs = start(&f, &url, &base)
        .wait_failure(&[&format!("subject {db}.Other is not in stream {stream}")])
        .await;
    assert!(logs.contains("bad_row_policy"), "{logs}");

    let dlq = base.replace(
        "[nats.create_stream]",
        &format!("bad_row_policy = \"dead_letter\"\ndead_letter_subject = \"{db}.dlq\"\n[nats.create_stream]"),
    );
    let mut relay = start(&f, &url, &dlq);
    let js = nats.jetstream().await;
    let recs = read_stream(&js, &stream, 3).await;
    let subjects: Vec<String> = recs.iter().map(|r| r.topic.clone()).collect();
    assert_eq!(
        subjects,
        [
            format!("{db}.Order"),
            format!("{db}.dlq"),
            format!("{db}.Order")
        ],
        "{recs:?}"
    );
    let dead = &recs[1];
    let reason = String::from_utf8_lossy(dead.header("outbox.error").expect("reason"));
    assert!(reason.contains("not in stream"), "{reason}");
    assert!(relay.terminate().await.success(), "{}", relay.logs());
}
