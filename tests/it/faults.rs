//! Preflight refusals, a purged resume point and bad rows, against private
//! MariaDB instances where a test changes server state. (Restarts and
//! outages under a continuous writer: outages.rs.)

use std::time::Duration;

use outbox_relay::position::{BinlogPosition, FilePos, Gtid, MariaGtid};

use crate::support::*;

fn spec<'a>(name: &'a str, db: &'a str, port: u16, topic: &'a str) -> RelaySpec<'a> {
    RelaySpec {
        name,
        db,
        mysql_port: port,
        topic,
        extra_kafka: "",
        extra: "",
    }
}

async fn expect_refusal(dir: &std::path::Path, toml: &str, wanted: &[&str]) {
    Relay::start(dir, toml, 0, &[]).wait_failure(wanted).await;
}

/// Each server setting the relay needs, and the outbox table, is checked at
/// start with one clear error naming the setting; the process exits non-zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflight_refuses_wrong_server_settings_and_tables() {
    services();
    let dir = Scratch::new("preflight");
    let server = PrivateDb::start(&dir.0, &[]);
    let db = TestDb::new("preflight", server.port).await;
    let name = format!("preflight-{}", db.name);
    let topic = "t.{aggregate_type}";
    let s = spec(&name, &db.name, server.port, topic);
    for (set, reset, wanted) in [
        (
            "SET GLOBAL binlog_format = 'STATEMENT'",
            "SET GLOBAL binlog_format = 'ROW'",
            "server setting binlog_format is STATEMENT, the relay needs ROW",
        ),
        (
            "SET GLOBAL binlog_row_image = 'MINIMAL'",
            "SET GLOBAL binlog_row_image = 'FULL'",
            "server setting binlog_row_image is MINIMAL, the relay needs FULL",
        ),
        (
            "SET GLOBAL binlog_row_metadata = 'MINIMAL'",
            "SET GLOBAL binlog_row_metadata = 'FULL'",
            "server setting binlog_row_metadata is MINIMAL, the relay needs FULL",
        ),
    ] {
        db.exec(set).await;
        expect_refusal(&dir.0, &s.toml(free_port()), &["preflight:", wanted]).await;
        db.exec(reset).await;
    }
    // The outbox table and its mapped columns.
    let missing_table = RelaySpec {
        db: "no_such_db",
        ..spec(&name, &db.name, server.port, topic)
    };
    expect_refusal(
        &dir.0,
        &missing_table.toml(free_port()),
        &["preflight: outbox[0]: table no_such_db.outbox does not exist"],
    )
    .await;
    let toml = s.toml(free_port()).replace(
        "topic = \"t.{aggregate_type}\"",
        "topic = \"t.{aggregate_type}\"\ncolumns = { event_type = \"kind\" }",
    );
    expect_refusal(
        &dir.0,
        &toml,
        &["preflight: outbox[0].columns.event_type: column `kind` is not in"],
    )
    .await;
    // Binary logging off altogether.
    server.stop();
    let no_binlog = PrivateDb {
        dir: server.dir.clone(),
        port: server.port,
    };
    no_binlog.run("start-mariadb", &["--skip-log-bin"]);
    expect_refusal(
        &dir.0,
        &s.toml(free_port()),
        &["server setting log_bin is OFF, the relay needs ON"],
    )
    .await;
    // A wrong password: a clear, definite error that does not show it.
    let mut relay = Relay::start(
        &dir.0,
        &s.toml(free_port()),
        0,
        &[("OUTBOX_RELAY_MYSQL_PASSWORD", "wrong-secret-value")],
    );
    let status = relay.wait_exit(Duration::from_secs(60)).await;
    let logs = relay.logs();
    assert!(
        !status.success() && logs.contains("Access denied for user 'relay'"),
        "{logs}"
    );
    assert!(
        !logs.contains("wrong-secret-value"),
        "the password leaked: {logs}"
    );
    // The relay's own config: one error naming the field.
    let bad = s
        .toml(free_port())
        .replace("heartbeat = \"1s\"", "heartbeat = \"1s\"\nserver_idd = 4");
    expect_refusal(&dir.0, &bad, &["unknown field `server_idd`"]).await;
    drop(no_binlog);
}

/// The resume point purged while the relay was down: a definite error naming
/// the lost range and how to recover, never a silent jump.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purged_resume_point_is_refused_clearly() {
    services();
    let server_dir = Scratch::new("purge-server");
    let server = PrivateDb::start(&server_dir.0, &[]);
    let f = Fixture::new("purge", server.port, &["Order"], 1).await;
    let (dir, db, name, s) = (&f.dir, &f.db, &f.name, f.spec());
    let port = free_port();
    let mut relay = Relay::start(&dir.0, &s.toml(port), port, &[]);
    relay.wait_ready().await;
    db.insert_txn(&[Ev::new("Order", "a", "{}")]).await;
    relay.wait_events(1).await;
    assert!(relay.terminate().await.success());
    let (_, stored) = checkpoint(name).await.expect("checkpoint");

    // While the relay is down: more rows, then their binlogs are purged.
    db.insert_txn(&[Ev::new("Order", "a", "{\"lost\":true}")])
        .await;
    db.exec("FLUSH BINARY LOGS").await;
    db.exec("FLUSH BINARY LOGS").await;
    let (head_file, _) = db.head().await;
    // PURGE skips a file a (dying) binlog dump thread still has open.
    wait_for(
        "the old dump thread to end and the purge to take",
        Duration::from_secs(30),
        || async {
            use mysql_async::prelude::Queryable;
            db.exec(&format!("PURGE BINARY LOGS TO '{head_file}'"))
                .await;
            let mut c = db.pool.get_conn().await.ok()?;
            let first: Option<(String, u64)> = c.query_first("SHOW BINARY LOGS").await.ok()?;
            first.filter(|(f, _)| *f == head_file)
        },
    )
    .await;

    expect_refusal(
        &dir.0,
        &s.toml(free_port()),
        &[
            &format!(
                "resume point {} is no longer in the server's binlog",
                stored.short()
            ),
            "were purged",
            "start_from",
        ],
    )
    .await;
    assert_eq!(
        checkpoint(name).await.map(|c| c.1),
        Some(stored),
        "the checkpoint did not move"
    );
}

/// A restart on the server that wrote the checkpoint resumes at its binlog
/// offset (MariaDB's GTID lookup reads the current binlog file from its
/// start, ~0.75 ms per MB, before the first event): with a backlog, and
/// caught up at the head. Where the server does not prove the offset — a
/// checkpoint of another server id or of an earlier version, an offset inside
/// an event, a GTID that is not the one before the offset's — the relay
/// resumes by GTID; nothing is lost. After `RESET MASTER` it tries by GTID
/// too, and refuses clearly: the resume point is gone from the binlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_at_the_binlog_offset_only_where_the_server_proves_it() {
    services();
    let server_dir = Scratch::new("offset-server");
    let server = PrivateDb::start(&server_dir.0, &[]);
    let f = Fixture::new("offset", server.port, &["Order"], 1).await;
    let (dir, db, name, s) = (&f.dir, &f.db, &f.name, f.spec());
    // A relay run to the binlog head and stopped: how its stream opened.
    let run = || async {
        let port = free_port();
        let mut relay = Relay::start(&dir.0, &s.toml(port), port, &[]);
        relay.wait_ready().await;
        wait_checkpoint_at_head(redis_url(), name, db, Duration::from_secs(30)).await;
        assert!(relay.terminate().await.success(), "{}", relay.logs());
        let logs = relay.logs();
        let opened = logs
            .lines()
            .find(|l| l.contains("binlog stream opened"))
            .unwrap_or_else(|| panic!("no stream opened: {logs}"))
            .to_owned();
        let stored = checkpoint(name).await.expect("checkpoint").1;
        (opened, stored)
    };
    let n = std::sync::atomic::AtomicUsize::new(0);
    let insert = || async {
        let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        db.insert_txn(&[Ev::new("Order", "a", &format!("{{\"n\":{i}}}"))])
            .await;
    };
    let by = |opened: &str, how: &str| {
        assert!(
            opened.contains(&format!("by=\"{how}\"")),
            "expected by {how}: {opened}"
        );
    };

    insert().await;
    let (_, first) = run().await;
    let server_id = first.server_id.expect("the checkpoint names its server");
    // A backlog: the event at the offset is the next transaction's GTID.
    insert().await;
    let (opened, stored) = run().await;
    by(&opened, "offset");
    // Caught up: nothing at the offset, which is the head.
    let (opened, again) = run().await;
    assert_eq!(again, stored, "nothing was written meanwhile");
    by(&opened, "offset");

    let gtid_of = |p: &BinlogPosition| match &p.gtid {
        Some(Gtid::MariaDb(l)) => l.clone(),
        other => panic!("a MariaDB GTID: {other:?}"),
    };
    let behind = {
        let mut l = gtid_of(&stored);
        let g = l.iter().next().copied().expect("a domain");
        l.advance(MariaGtid {
            seq: g.seq - 1,
            ..g
        });
        l
    };
    let forged: [(&str, BinlogPosition, &str); 4] = [
        (
            "another server id",
            BinlogPosition {
                server_id: Some(server_id + 1),
                ..stored.clone()
            },
            "the checkpoint is of server id",
        ),
        (
            "an earlier version's checkpoint",
            BinlogPosition {
                server_id: None,
                ..stored.clone()
            },
            "does not name its server",
        ),
        (
            "an offset inside an event",
            BinlogPosition {
                file: FilePos {
                    pos: stored.file.pos - 1,
                    ..stored.file.clone()
                },
                ..stored.clone()
            },
            "no event at the offset",
        ),
        (
            "a GTID one transaction behind the offset",
            BinlogPosition {
                gtid: Some(Gtid::MariaDb(behind)),
                ..stored.clone()
            },
            "not the one after",
        ),
    ];
    for (what, pos, why) in forged {
        insert().await;
        put_checkpoint(name, &pos).await;
        let (opened, _) = run().await;
        by(&opened, "gtid");
        assert!(opened.contains(why), "{what}: {opened}");
    }

    let rows = db.rows().await;
    let recs = read_topics(&f.topics, rows.len(), Duration::from_secs(30)).await;
    check(&rows, &recs).assert_complete();

    // Binlogs reset: the offset is not this server's history any more, and
    // by GTID the server no longer has the resume point: a clear refusal.
    let (_, stored) = run().await;
    db.exec("RESET MASTER").await;
    insert().await;
    let logs = Relay::start(&dir.0, &s.toml(free_port()), 0, &[])
        .wait_failure(&["The resume point is no longer in the server's binlog"])
        .await;
    by(
        logs.lines()
            .find(|l| l.contains("binlog stream opened"))
            .unwrap_or_default(),
        "gtid",
    );
    assert_eq!(checkpoint(name).await.map(|c| c.1), Some(stored));
}

/// Bad rows with `stop`: the relay stops naming the row, and the checkpoint
/// stays before its transaction. With `dead_letter`: each kind of bad row
/// goes to the dead-letter topic with the reason, and nothing after is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rows_stop_or_go_to_the_dead_letter_topic() {
    let f = Fixture::new("badrows", mysql_port(), &["Order", "dlq"], 1).await;
    let (dir, db, name) = (&f.dir, &f.db, &f.name);
    let (good_topic, dlq) = (f.topics[0].clone(), f.topics[1].clone());
    let stop_spec = RelaySpec {
        extra_kafka: "properties = { \"message.max.bytes\" = \"10000\" }",
        ..f.spec()
    };

    let port = free_port();
    let mut relay = Relay::start(&dir.0, &stop_spec.toml(port), port, &[]);
    relay.wait_ready().await;
    let before_first = db.head().await;
    let first = db.insert_txn(&[Ev::new("Order", "a", "{\"n\":1}")]).await[0];
    relay.wait_events(1).await;
    let mut null_key = Ev::new("Order", "x", "{\"n\":2}");
    null_key.aggregate_id = None;
    let pair = db
        .insert_txn(&[Ev::new("Order", "a", "{\"n\":1.5}"), null_key])
        .await;
    let bad_id = pair[1];
    let status = relay.wait_exit(Duration::from_secs(30)).await;
    assert!(!status.success());
    let logs = relay.logs();
    assert!(
        logs.contains(&format!("bad outbox row id={bad_id} in {}.outbox", db.name))
            && logs.contains("aggregate id (the record key) is NULL")
            && logs.contains("bad_row_policy"),
        "{logs}"
    );
    // The error names the bad row's binlog position (`at file:pos`).
    let at = logs
        .split(&format!("in {}.outbox at ", db.name))
        .nth(1)
        .and_then(|rest| rest.split([' ', '(']).next())
        .and_then(|fp| fp.rsplit_once(':'))
        .map(|(file, pos)| (file.to_owned(), pos.parse::<u64>().expect("pos")))
        .expect("the error names the position");
    // Other tests write to the same server meanwhile, so the checkpoint may
    // sit on one of their commits; it must include the first transaction
    // and stay before the bad row.
    let (_, stored) = checkpoint(name).await.expect("checkpoint");
    let stored_at = (stored.file.file.clone(), stored.file.pos);
    assert!(
        stored_at > (before_first.0.clone(), before_first.1) && stored_at < at,
        "the checkpoint {stored_at:?} must be after the first commit (> {before_first:?}) \
         and before the bad row ({at:?})"
    );

    // More bad rows of every kind, between good ones; then dead_letter.
    let mut headers_array = Ev::new("Order", "b", "{\"n\":3}");
    headers_array.headers = Some("[1,2]".into());
    let bad_topic = Ev::new("Order/Lines", "b", "{\"n\":4}");
    let empty_type = Ev::new("", "b", "{\"n\":5}");
    let mut too_big = Ev::new("Order", "b", "");
    too_big.payload = Some(vec![b'x'; 20_000]);
    let mut non_utf8 = Ev::new("Order", "b", "");
    non_utf8.payload = Some(vec![0xff, 0xfe, 0x00, 0x80]);
    let mut ids = Vec::new();
    for e in [headers_array, bad_topic, empty_type, too_big, non_utf8] {
        ids.extend(
            db.insert_txn(&[e, Ev::new("Order", "b", "{\"good\":true}")])
                .await,
        );
    }
    let dl_spec = RelaySpec {
        extra_kafka: &format!(
            "properties = {{ \"message.max.bytes\" = \"10000\" }}\nbad_row_policy = \"dead_letter\"\ndead_letter_topic = \"{dlq}\""
        ),
        ..f.spec()
    };
    let port = free_port();
    let mut relay = Relay::start(&dir.0, &dl_spec.toml(port), port, &[]);
    relay.wait_ready().await;
    db.exec("ALTER TABLE outbox DROP COLUMN event_type").await;
    {
        use mysql_async::prelude::Queryable;
        let mut c = db.pool.get_conn().await.unwrap();
        c.query_drop("INSERT INTO outbox (aggregate_type, aggregate_id, payload) VALUES ('Order', 'c', '{}')")
            .await
            .unwrap();
    }
    wait_checkpoint_at_head(redis_url(), name, db, Duration::from_secs(60)).await;
    let dead = read_topics(std::slice::from_ref(&dlq), 6, Duration::from_secs(30)).await;
    let reasons: Vec<(u64, String)> = dead
        .iter()
        .map(|r| {
            (
                r.id(),
                String::from_utf8_lossy(r.header("outbox.error").unwrap_or_default()).into_owned(),
            )
        })
        .collect();
    let expect = [
        (bad_id, "aggregate id (the record key) is NULL"),
        (ids[0], "headers column must be a JSON object, got an array"),
        (ids[2], "contains `/`"),
        (ids[4], "aggregate_type is empty"),
        (ids[6], "exceeds the producer's message.max.bytes (10000)"),
    ];
    for (id, why) in expect {
        assert!(
            reasons.iter().any(|(i, r)| *i == id && r.contains(why)),
            "dead letter for {id} with `{why}` in {reasons:?}"
        );
    }
    assert!(
        reasons
            .iter()
            .any(|(_, r)| r.contains("column `event_type` is not in")),
        "the row after the dropped column: {reasons:?}"
    );
    for r in &dead {
        assert!(r.header("outbox.binlog").is_some() && r.header("outbox.table").is_some());
    }
    // Every good row arrived, the non-UTF-8 payload unchanged.
    let good = read_topics(
        std::slice::from_ref(&good_topic),
        8,
        Duration::from_secs(30),
    )
    .await;
    let good_ids: Vec<u64> = good.iter().map(Rec::id).collect();
    let mut want = vec![first, pair[0]];
    want.extend([ids[1], ids[3], ids[5], ids[7], ids[8], ids[9]]);
    for id in &want {
        assert!(
            good_ids.contains(id),
            "good row {id} missing from {good_ids:?}"
        );
    }
    let raw = good
        .iter()
        .find(|r| r.id() == ids[8])
        .expect("non-UTF-8 row");
    assert_eq!(raw.value.as_deref(), Some(&[0xff, 0xfe, 0x00, 0x80][..]));
    assert!(relay.terminate().await.success(), "{}", relay.logs());
}
