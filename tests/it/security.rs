//! Secrets stay secret and TLS works for real: the relay run with known
//! secret values (debug logging on) never shows them in a log line, a metric
//! or its status, also when a password is wrong; TLS to MariaDB (`require`,
//! `verify-ca`, `verify-full`, a wrong CA) and to Redis (`rediss://` with
//! the test's own CA) against servers started with certificates the test
//! makes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::support::*;

/// The test's own certificate authority, and a server certificate it signed
/// for `127.0.0.1` / `localhost`.
pub struct Certs {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// A CA that signed nothing here.
    pub other_ca: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn make_certs(dir: &Path) -> Certs {
    std::fs::create_dir_all(dir).expect("cert dir");
    for ca in ["ca", "other-ca"] {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN=outbox-test-{ca}"),
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.pem"),
            ],
        );
    }
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .expect("san");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.pem",
        ],
    );
    Certs {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
        other_ca: dir.join("other-ca.pem"),
    }
}

/// A Redis of the test's own that speaks only TLS, with `certs`' server
/// certificate, and `extra` arguments.
pub fn tls_redis(dir: &Path, certs: &Certs, extra: &[&str]) -> PrivateRedis {
    let (cert, key, ca) = (
        certs.cert.display().to_string(),
        certs.key.display().to_string(),
        certs.ca.display().to_string(),
    );
    let mut args = vec![
        "--port",
        "0",
        "--tls-port",
        "{port}",
        "--tls-cert-file",
        &cert,
        "--tls-key-file",
        &key,
        "--tls-ca-cert-file",
        &ca,
        "--tls-auth-clients",
        "no",
    ];
    args.extend_from_slice(extra);
    PrivateRedis::start_with(dir, &args)
}

/// Creates a replication user with `password` on `db`'s server.
async fn create_user(db: &TestDb, user: &str, password: &str, require_ssl: bool) {
    let tls = if require_ssl { " REQUIRE SSL" } else { "" };
    db.exec(&format!(
        "CREATE USER '{user}'@'%' IDENTIFIED BY '{password}'{tls}"
    ))
    .await;
    db.exec(&format!(
        "GRANT REPLICATION SLAVE, REPLICATION CLIENT, BINLOG MONITOR, SELECT ON *.* TO '{user}'@'%'"
    ))
    .await;
}

/// Every place a secret could show: the log, `/metrics`, `/status`.
async fn assert_no_secret(relay: &Relay, secrets: &[&str], when: &str) {
    let mut seen = vec![("log", relay.logs())];
    if let Some((_, m)) = http_get(relay.http_port, "/metrics").await {
        seen.push(("metrics", m));
    }
    if let Some((_, s)) = http_get(relay.http_port, "/status").await {
        seen.push(("status", s));
    }
    for (place, text) in &seen {
        for s in secrets {
            assert!(
                !text.contains(s),
                "{when}: a secret value is in the relay's {place}:\n{text}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_values_never_reach_logs_metrics_or_status() {
    services();
    let n = unique();
    let (mysql_secret, redis_secret, kafka_secret) = (
        format!("mysql-S3cret-{n}"),
        format!("redis-S3cret-{n}"),
        format!("kafka-S3cret-{n}"),
    );
    let wrong = format!("wrong-S3cret-{n}");
    let secrets = [
        mysql_secret.as_str(),
        redis_secret.as_str(),
        kafka_secret.as_str(),
        wrong.as_str(),
    ];
    let scratch = Scratch::new("secrets");
    let redis = PrivateRedis::start_with(&scratch.0, &["--requirepass", &redis_secret]);
    let f = Fixture::new("secrets", mysql_port(), &["Order"], 1).await;
    let user = format!("sec{n}");
    create_user(&f.db, &user, &mysql_secret, false).await;
    // Debug logging everywhere (the clients' too) makes a leak most likely.
    let toml = f
        .spec()
        .toml(0)
        .replace("user = \"relay\"", &format!("user = \"{user}\""))
        + "\n[log]\nlevel = \"debug\"\n";
    let redis_url = format!("redis://127.0.0.1:{}/0", redis.port);
    let start = |mysql_pw: &str, redis_pw: &str| {
        let port = free_port();
        let toml = toml.replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
        Relay::start(
            &f.dir.0,
            &toml,
            port,
            &[
                ("OUTBOX_RELAY_MYSQL_PASSWORD", mysql_pw),
                ("OUTBOX_RELAY_REDIS_PASSWORD", redis_pw),
                ("OUTBOX_RELAY_REDIS_URL", &redis_url),
                ("OUTBOX_RELAY_KAFKA_SASL_PASSWORD", &kafka_secret),
            ],
        )
    };

    // Working: rows relayed, everything looked at.
    let mut relay = start(&mysql_secret, &redis_secret);
    relay.wait_ready().await;
    for i in 0..5 {
        f.db.insert_txn(&[Ev::new("Order", &format!("s{i}"), "{}")])
            .await;
    }
    relay.wait_events(5).await;
    assert_no_secret(&relay, &secrets, "streaming").await;
    assert!(relay.terminate().await.success(), "{}", relay.logs());
    assert_no_secret(&relay, &secrets, "after a graceful stop").await;

    // A wrong MySQL password: a definite error naming the user.
    let mut relay = start(&wrong, &redis_secret);
    relay.wait_failure(&["Access denied for user"]).await;
    assert_no_secret(&relay, &secrets, "wrong MySQL password").await;

    // A wrong Redis password: refused for good, not retried forever.
    let mut relay = start(&mysql_secret, &wrong);
    relay
        .wait_failure(&[
            "redis refused the connection",
            "OUTBOX_RELAY_REDIS_PASSWORD",
        ])
        .await;
    assert_no_secret(&relay, &secrets, "wrong Redis password").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_mariadb_require_verify_and_a_wrong_ca() {
    services();
    let scratch = Scratch::new("mysql-tls");
    let certs = make_certs(&scratch.0.join("certs"));
    let (ca, cert, key) = (
        format!("--ssl-ca={}", certs.ca.display()),
        format!("--ssl-cert={}", certs.cert.display()),
        format!("--ssl-key={}", certs.key.display()),
    );
    let server = PrivateDb::start(&scratch.0, &[&ca, &cert, &key]);
    let f = Fixture::new("mtls", server.port, &["Order"], 1).await;
    // A user that can only log in over TLS: a relay that reaches the server
    // with it proves the connection is encrypted.
    let user = format!("tls{}", unique());
    create_user(&f.db, &user, "tls-password", true).await;
    let toml = |tls: &str| {
        f.spec()
            .toml(0)
            .replace("user = \"relay\"", &format!("user = \"{user}\"\n{tls}"))
    };
    let run = |tls: String| {
        let port = free_port();
        let t = toml(&tls).replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
        Relay::start(
            &f.dir.0,
            &t,
            port,
            &[("OUTBOX_RELAY_MYSQL_PASSWORD", "tls-password")],
        )
    };
    let mut expected = 0;
    for tls in [
        "tls = { mode = \"require\" }".to_string(),
        format!(
            "tls = {{ mode = \"verify-ca\", ca_file = \"{}\" }}",
            certs.ca.display()
        ),
        format!(
            "tls = {{ mode = \"verify-full\", ca_file = \"{}\" }}",
            certs.ca.display()
        ),
    ] {
        let mut relay = run(tls.clone());
        relay.wait_ready().await;
        f.db.insert_txn(&[Ev::new("Order", "t", "{}")]).await;
        expected += 1;
        wait_checkpoint_at_head(redis_url(), &f.name, &f.db, Duration::from_secs(60)).await;
        assert!(relay.terminate().await.success(), "{tls}: {}", relay.logs());
    }
    let rows = f.db.rows().await;
    assert_eq!(rows.len(), expected);
    let recs = read_topics(&f.topics, rows.len(), Duration::from_secs(30)).await;
    check(&rows, &recs).assert_complete();

    // A CA that did not sign the server's certificate: a definite error.
    let mut relay = run(format!(
        "tls = {{ mode = \"verify-ca\", ca_file = \"{}\" }}",
        certs.other_ca.display()
    ));
    let logs = relay.wait_failure(&[]).await;
    assert!(
        logs.to_ascii_lowercase().contains("certificate"),
        "the error names the certificate problem: {logs}"
    );
    // Without TLS the TLS-only user is refused: the runs above were encrypted.
    run(String::new())
        .wait_failure(&["Access denied for user"])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_redis_with_the_test_ca() {
    services();
    let scratch = Scratch::new("redis-tls");
    let certs = make_certs(&scratch.0.join("certs"));
    let redis = tls_redis(&scratch.0, &certs, &[]);
    let url = format!("rediss://127.0.0.1:{}/0", redis.port);
    let f = Fixture::new("rtls", mysql_port(), &["Order"], 1).await;
    let run = |ca_file: Option<&Path>| {
        let port = free_port();
        let mut toml = f.spec().toml(port);
        if let Some(ca) = ca_file {
            toml = toml.replace(
                "key_prefix = \"test:\"",
                &format!("key_prefix = \"test:\"\nca_file = \"{}\"", ca.display()),
            );
        }
        Relay::start(&f.dir.0, &toml, port, &[("OUTBOX_RELAY_REDIS_URL", &url)])
    };

    let mut relay = run(Some(&certs.ca));
    relay.wait_ready().await;
    f.db.insert_txn(&[Ev::new("Order", "r", "{}")]).await;
    relay.wait_events(1).await;
    wait_for("a checkpoint over TLS", Duration::from_secs(30), || async {
        (relay.metric("outbox_relay_checkpoints_total").await > 0.0).then_some(())
    })
    .await;
    assert!(relay.terminate().await.success(), "{}", relay.logs());
    assert!(relay.logs().contains("final checkpoint stored"));

    // The system's roots do not know the test's CA: refused, clearly.
    run(None)
        .wait_failure(&["redis refused the connection", "redis.ca_file"])
        .await;
}

/// NATS over TLS with the test's own CA: records acknowledged over TLS; the
/// system's roots (no `tls_ca_file`) and a wrong password are refused for
/// good, each naming what to fix, and the password never logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_nats_with_the_test_ca() {
    use crate::nats::{start, PrivateNats, PASSWORD, USER};
    let f = Fixture::new("ntls", mysql_port(), &["Order"], 1).await;
    let certs = make_certs(&f.dir.0.join("certs"));
    let (cert, key) = (certs.cert.to_string_lossy(), certs.key.to_string_lossy());
    let server =
        PrivateNats::start_with(&f.dir.0, &["--tls", "--tlscert", &cert, "--tlskey", &key]);
    let port = server.port;
    let url = format!("tls://127.0.0.1:{port}");
    let stream = format!("TLS_{}", unique());
    let nats = |extra: &str| {
        format!(
            "stream = \"{stream}\"\nuser = \"{USER}\"\ntls_required = true\n{extra}\
             [nats.create_stream]\nsubjects = [\"{}.>\"]\n",
            f.db.name
        )
    };
    let ca = format!("tls_ca_file = \"{}\"\n", certs.ca.display());
    let mut relay = start(&f, &url, &nats(&ca));
    f.db.insert_txn(&[Ev::new("Order", "t1", "{}"), Ev::new("Order", "t2", "{}")])
        .await;
    relay.wait_events(2).await;
    assert!(relay.terminate().await.success(), "{}", relay.logs());

    let logs = start(&f, &url, &nats(""))
        .wait_failure(&["nats.tls_ca_file"])
        .await;
    assert!(!logs.contains(PASSWORD), "the NATS password in a log");
    let http = free_port();
    let logs = Relay::start(
        &f.dir.0,
        &crate::nats::nats_toml(&f, http, &url, &nats(&ca)),
        http,
        &[("OUTBOX_RELAY_NATS_PASSWORD", "not-the-password")],
    )
    .wait_failure(&["authorization violation", "nats.user"])
    .await;
    assert!(!logs.contains("not-the-password"), "a password in a log");
}
