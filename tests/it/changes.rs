//! Change events from plain tables (ditto's job) to a private NATS
//! JetStream: every column type in the envelope, the action filter and the
//! topic map, composite keys; and every change counted by id through
//! SIGKILLs of the relay.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};

use crate::nats::{read_stream, start, PrivateNats, USER};
use crate::support::*;

/// The `[nats]` section (with a stream over `subjects`) and `[changes]`.
fn section(stream: &str, subjects: &[String], changes: &str) -> String {
    format!(
        "stream = \"{stream}\"\nuser = \"{USER}\"\n[nats.create_stream]\nsubjects = {subjects:?}\n\n{changes}"
    )
}

fn envelope(r: &Rec) -> Value {
    serde_json::from_slice(r.value.as_deref().expect("a value")).expect("the envelope is JSON")
}

/// ditto's example: `TABLE_FILTER={"trades":["insert","update"]}` and
/// `TOPIC_MAPPING={"trades":"transactions"}`, beside a table with every
/// column type and all three actions, and a table not captured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_table_changes_in_the_envelope_with_filter_and_topic_map() {
    let f = Fixture::new("changes", mysql_port(), &["Order"], 1).await;
    let nats = PrivateNats::start(&f.dir.0);
    let db = &f.db.name;
    f.db.exec(
        "CREATE TABLE items (id BIGINT UNSIGNED PRIMARY KEY, ti TINYINT, su SMALLINT UNSIGNED, \
         mi MEDIUMINT, i INT, bi BIGINT, fl FLOAT, d DOUBLE, amount DECIMAL(30,10), \
         dt DATETIME(6), ts TIMESTAMP(3) NULL, da DATE, t TIME(2), y YEAR, b BIT(12), \
         e ENUM('red','green','blue'), s SET('a','b','c'), c CHAR(3), vc VARCHAR(20), tx TEXT, \
         l1 VARCHAR(10) CHARACTER SET latin1, vb VARBINARY(8), bl BLOB, j JSON, g GEOMETRY NULL, \
         n INT NULL)",
    )
    .await;
    f.db.exec("CREATE TABLE trades (a INT, b VARCHAR(5), qty INT, PRIMARY KEY (a, b))")
        .await;
    f.db.exec("CREATE TABLE untouched (id INT PRIMARY KEY)")
        .await;
    let stream = format!("CDC_{}", unique());
    let changes = format!(
        "[changes]\ntopic_prefix = \"cdc\"\n\
         [changes.tables]\n\"{db}.items\" = [\"insert\", \"update\", \"delete\"]\n\
         \"{db}.trades\" = [\"insert\", \"update\"]\n\
         [changes.topic_map]\n\"{db}.trades\" = \"{db}.transactions\"\n"
    );
    let subjects = [format!("cdc.{db}.>"), format!("{db}.>")];
    let mut relay = start(&f, &nats.url(), &section(&stream, &subjects, &changes));
    relay.wait_ready().await;

    f.db.exec(
        "INSERT INTO items VALUES (18446744073709551615, -128, 65535, -8388608, 2147483647, \
         -9223372036854775808, 1.5, 0.1, '-12345678901234567890.0123456789', \
         '2026-12-02 03:04:05.000060', '2026-12-02 03:04:05.250', '1000-01-01', '-838:59:58.99', \
         2026, b'100000000001', 'green', 'a,c', 'ab', 'żółw 🐢', 'long text', 'café', x'00FF10', \
         x'DEADBEEF', '{\"k\": [1, 2.5, null]}', ST_GeomFromText('POINT(1 2)'), NULL)",
    )
    .await;
    f.db.exec("UPDATE items SET vc = 'changed', n = 7 WHERE id = 18446744073709551615")
        .await;
    f.db.exec("INSERT INTO trades VALUES (7, 'x', 1)").await;
    f.db.exec("UPDATE trades SET qty = 2 WHERE a = 7").await;
    f.db.exec("DELETE FROM trades WHERE a = 7").await;
    f.db.exec("INSERT INTO untouched VALUES (1)").await;
    f.db.exec("DELETE FROM items").await;
    f.db.insert_txn(&[Ev::new("Order", "o1", "{}")]).await;

    let js = nats.jetstream().await;
    let recs = read_stream(&js, &stream, 6).await;
    let got: Vec<(String, String, String)> = recs
        .iter()
        .map(|r| {
            let e = envelope(r);
            (
                r.topic.clone(),
                e["table"].as_str().unwrap_or("").into(),
                e["action"].as_str().unwrap_or("").into(),
            )
        })
        .collect();
    let items = format!("cdc.{db}.items");
    let trades = format!("{db}.transactions");
    assert_eq!(
        got,
        [
            (items.clone(), "items".into(), "insert".into()),
            (items.clone(), "items".into(), "update".into()),
            (trades.clone(), "trades".into(), "insert".into()),
            (trades.clone(), "trades".into(), "update".into()),
            (items.clone(), "items".into(), "delete".into()),
            (format!("{db}.Order"), "".into(), "".into()),
        ],
        "the trades delete is filtered out, the untouched table not captured; the outbox \
         row is an outbox record (its payload as is) beside the change events"
    );
    assert_eq!(recs[5].value.as_deref(), Some(&b"{}"[..]));

    let insert = envelope(&recs[0]);
    assert_eq!(insert["schema"], json!(db));
    assert_eq!(insert["dataOld"], Value::Null);
    let want = json!({
        "id": 18446744073709551615u64, "ti": -128, "su": 65535, "mi": -8388608,
        "i": 2147483647, "bi": -9223372036854775808i64, "fl": 1.5, "d": 0.1,
        "amount": "-12345678901234567890.0123456789",
        "dt": "2026-12-02T03:04:05.000060", "da": "1000-01-01", "t": "-838:59:58.990000",
        "y": 2026, "b": 2049, "e": "green", "s": "a,c", "c": "ab", "vc": "żółw 🐢",
        "tx": "long text", "l1": "café", "vb": "AP8Q", "bl": "3q2+7w==", "n": null,
    });
    for (k, v) in want.as_object().expect("object") {
        assert_eq!(&insert["data"][k], v, "column {k}: {}", insert["data"]);
    }
    // TIMESTAMP in UTC (the session's time zone is the server's); MariaDB's
    // JSON is text (MySQL's binary JSON would be the value); GEOMETRY bytes.
    assert!(
        insert["data"]["ts"]
            .as_str()
            .is_some_and(|s| s.ends_with(".25Z")),
        "{}",
        insert["data"]["ts"]
    );
    assert_eq!(insert["data"]["j"], json!("{\"k\": [1, 2.5, null]}"));
    assert!(insert["data"]["g"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(insert["eventTime"]
        .as_str()
        .is_some_and(|s| s.ends_with('Z')));
    assert_eq!(recs[0].key_str(), "18446744073709551615");
    assert_eq!(recs[0].header("event_type"), Some(&b"insert"[..]));

    let update = envelope(&recs[1]);
    assert_eq!(update["dataOld"]["vc"], json!("żółw 🐢"));
    assert_eq!(update["data"]["vc"], json!("changed"));
    assert_eq!(update["data"]["n"], json!(7));
    assert_eq!(
        recs[2].key_str(),
        "[7,\"x\"]",
        "a composite key is a JSON array"
    );
    let delete = envelope(&recs[4]);
    assert_eq!(delete["data"], Value::Null);
    assert_eq!(delete["dataOld"]["vc"], json!("changed"));
    let ids: std::collections::BTreeSet<&str> = recs
        .iter()
        .map(|r| std::str::from_utf8(r.header("id").expect("id")).expect("utf8"))
        .collect();
    assert_eq!(ids.len(), recs.len(), "ids are unique: {ids:?}");
    let metrics = http_get(relay.http_port, "/metrics")
        .await
        .expect("metrics")
        .1;
    assert!(
        metrics.contains(&format!(
            "ignored_rows_total{{table=\"{db}.trades\",kind=\"delete\"}} 1"
        )),
        "{metrics}"
    );
    assert!(relay.terminate().await.success(), "{}", relay.logs());
}

/// A writer inserting and updating plain-table rows; the relay SIGKILLed
/// twice: every change once in the stream (its id is stable across the
/// replays, so JetStream drops them), per key insert before update.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_change_survives_relay_kills() {
    let f = Fixture::new("changekill", mysql_port(), &["Order"], 1).await;
    let nats = PrivateNats::start(&f.dir.0);
    let db = f.db.name.clone();
    f.db.exec("CREATE TABLE accounts (id INT PRIMARY KEY, balance INT)")
        .await;
    let stream = format!("KILL_{}", unique());
    let changes =
        format!("[changes]\n[changes.tables]\n\"{db}.accounts\" = [\"insert\", \"update\"]\n");
    let subjects = [format!("cdc.{db}.>")];
    let cfg = section(&stream, &subjects, &changes);
    const N: i32 = 600;
    let writer = {
        let db = f.db.clone();
        tokio::spawn(async move {
            for i in 1..=N {
                db.exec(&format!(
                    "BEGIN; INSERT INTO accounts VALUES ({i}, 0); \
                     UPDATE accounts SET balance = {i} WHERE id = {i}; COMMIT"
                ))
                .await;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let mut relay = start(&f, &nats.url(), &cfg);
    for _ in 0..2 {
        relay.wait_events(150).await;
        relay.kill().await;
        relay = start(&f, &nats.url(), &cfg);
    }
    writer.await.expect("writer");
    let recs = read_stream(&nats.jetstream().await, &stream, 2 * N as usize).await;
    let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in &recs {
        let e = envelope(r);
        seen.entry(r.key_str())
            .or_default()
            .push(e["action"].as_str().unwrap_or("").to_owned());
    }
    assert_eq!(recs.len(), 2 * N as usize, "every change once");
    assert_eq!(seen.len(), N as usize);
    for (k, actions) in &seen {
        assert_eq!(actions, &["insert", "update"], "key {k}");
    }
    assert!(relay.terminate().await.success(), "{}", relay.logs());
}
