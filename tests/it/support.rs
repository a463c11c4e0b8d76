//! Test harness: the services started by `scripts/services.sh`, a database per
//! test, relay processes, a Kafka reader and the checks every test shares.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use outbox_relay::position::BinlogPosition;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

/// The shared services' ports, from the variables `scripts/services.sh`
/// honours (so two checkouts can test side by side), with its defaults.
fn port(var: &str, default: u16) -> u16 {
    match std::env::var(var) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{var}={v:?} is not a port number")),
        Err(_) => default,
    }
}

/// The shared MariaDB: `OUTBOX_MYSQL_PORT`, default 3307.
pub fn mysql_port() -> u16 {
    port("OUTBOX_MYSQL_PORT", 3307)
}

/// The shared PostgreSQL: `OUTBOX_PG_PORT`, default 5433.
pub fn pg_port() -> u16 {
    port("OUTBOX_PG_PORT", 5433)
}

/// A PostgreSQL client of the server at `port` (its connection driven by a task).
pub async fn pg_connect(port: u16, user: &str, password: &str, db: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user={user} password={password} dbname={db}"),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap_or_else(|e| panic!("connect to PostgreSQL {port}/{db} as {user}: {e}"));
    tokio::spawn(conn);
    client
}

/// The shared Redis: `OUTBOX_REDIS_PORT`, default 6390.
pub fn redis_url() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| format!("redis://127.0.0.1:{}/0", port("OUTBOX_REDIS_PORT", 6390)))
}

/// The shared broker: `OUTBOX_BROKER_PORT`, default 9092.
pub fn broker() -> &'static str {
    static ADDR: OnceLock<String> = OnceLock::new();
    ADDR.get_or_init(|| format!("127.0.0.1:{}", port("OUTBOX_BROKER_PORT", 9092)))
}
pub const RELAY_PASSWORD: &str = "relay-password";

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// Starts MariaDB, Redis and the broker once per test binary (a no-op when
/// they already run).
pub fn services() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let out = Command::new(root().join("scripts/services.sh"))
            .arg("start")
            .output()
            .expect("run scripts/services.sh");
        assert!(
            out.status.success(),
            "scripts/services.sh start failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

/// A scratch directory under target/, removed on drop unless the test failed.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = root()
            .join("target/test-scratch")
            .join(format!("{name}-{}", unique()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

pub fn unique() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() % 1_000_000_000)
        .unwrap_or(0);
    format!(
        "{}{t}{}",
        std::process::id() % 1000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Polls `f` until it returns Some, or panics naming `what` at the deadline.
pub async fn wait_for<T, F, Fut>(what: &str, within: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub const OUTBOX_DDL: &str = "CREATE TABLE outbox (
    id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    aggregate_type VARCHAR(255) NOT NULL,
    aggregate_id VARCHAR(255) NULL,
    event_type VARCHAR(255) NOT NULL,
    payload LONGBLOB NULL,
    headers TEXT NULL,
    created_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)
) ENGINE=InnoDB";

/// One event written to the outbox.
#[derive(Debug, Clone)]
pub struct Ev {
    pub aggregate_type: String,
    pub aggregate_id: Option<String>,
    pub event_type: String,
    pub payload: Option<Vec<u8>>,
    pub headers: Option<String>,
}

impl Ev {
    pub fn new(agg_type: &str, agg_id: &str, payload: &str) -> Ev {
        Ev {
            aggregate_type: agg_type.into(),
            aggregate_id: Some(agg_id.into()),
            event_type: "Created".into(),
            payload: Some(payload.as_bytes().to_vec()),
            headers: None,
        }
    }
}

/// A database of its own on a MariaDB server, with an outbox table.
pub struct TestDb {
    pub pool: mysql_async::Pool,
    pub name: String,
}

impl TestDb {
    pub async fn new(prefix: &str, port: u16) -> TestDb {
        let name = format!("{prefix}_{}", unique());
        let opts = mysql_async::OptsBuilder::default()
            .ip_or_hostname("127.0.0.1")
            .tcp_port(port)
            .user(Some("app"))
            .pass(Some("app-password"))
            .prefer_socket(false);
        let admin = mysql_async::Pool::new(opts.clone());
        let mut c = admin.get_conn().await.expect("connect to MariaDB");
        c.query_drop(format!("CREATE DATABASE {name} CHARACTER SET utf8mb4"))
            .await
            .expect("create database");
        drop(c);
        admin.disconnect().await.ok();
        let pool = mysql_async::Pool::new(opts.db_name(Some(name.clone())));
        let db = TestDb { pool, name };
        db.exec(OUTBOX_DDL).await;
        db
    }

    pub async fn exec(&self, sql: &str) {
        let mut c = self.pool.get_conn().await.expect("connect");
        c.query_drop(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// Inserts the events in one transaction; returns their ids in order.
    pub async fn insert_txn(&self, evs: &[Ev]) -> Vec<u64> {
        self.try_insert_txn(evs).await.expect("insert transaction")
    }

    /// `insert_txn` that reports a failure (the server restarting) instead
    /// of panicking.
    pub async fn try_insert_txn(&self, evs: &[Ev]) -> Result<Vec<u64>, mysql_async::Error> {
        let mut c = self.pool.get_conn().await?;
        let mut tx = c.start_transaction(mysql_async::TxOpts::default()).await?;
        let mut ids = Vec::with_capacity(evs.len());
        for e in evs {
            tx.exec_drop(
                "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload, headers) VALUES (?, ?, ?, ?, ?)",
                (&e.aggregate_type, &e.aggregate_id, &e.event_type, &e.payload, &e.headers),
            )
            .await?;
            ids.push(tx.last_insert_id().unwrap_or_default());
        }
        tx.commit().await?;
        Ok(ids)
    }

    /// The largest outbox id so far (0 when empty).
    pub async fn max_id(&self) -> u64 {
        let mut c = self.pool.get_conn().await.expect("connect");
        let v: Option<Option<u64>> = c
            .query_first("SELECT MAX(id) FROM outbox")
            .await
            .expect("max id");
        v.flatten().unwrap_or(0)
    }

    /// `(id, aggregate_id)` of every outbox row, in id order.
    pub async fn rows(&self) -> Vec<(u64, Option<String>)> {
        let mut c = self.pool.get_conn().await.expect("connect");
        c.query("SELECT id, aggregate_id FROM outbox ORDER BY id")
            .await
            .expect("select outbox")
    }

    /// The server's binlog head (`SHOW MASTER STATUS`).
    pub async fn head(&self) -> (String, u64) {
        let mut c = self.pool.get_conn().await.expect("connect");
        let r: Option<mysql_async::Row> = c.query_first("SHOW MASTER STATUS").await.expect("head");
        let r = r.expect("binlog on");
        (r.get(0).unwrap_or_default(), r.get(1).unwrap_or_default())
    }
}

/// A continuous writer: transactions of `per_txn` rows over `keys`
/// aggregates (type `Order`), `pause` between them, until `stop`. A failed
/// transaction (a server restarting under it) is retried after 100 ms; what
/// committed is read back from the table at the end, so an ambiguous commit
/// cannot skew a count. Returns the rows it saw committed.
pub fn steady_writer(
    db: std::sync::Arc<TestDb>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    per_txn: usize,
    keys: usize,
    pause: Duration,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let (mut n, mut committed) = (0usize, 0u64);
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let evs: Vec<Ev> = (n..n + per_txn)
                .map(|i| {
                    Ev::new(
                        "Order",
                        &format!("o{}", i % keys),
                        &format!("{{\"n\":{i}}}"),
                    )
                })
                .collect();
            match db.try_insert_txn(&evs).await {
                Ok(_) => {
                    n += per_txn;
                    committed += per_txn as u64;
                    tokio::time::sleep(pause).await;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        committed
    })
}

/// What most tests start from: the services, a scratch directory, a database
/// with an outbox table, topics `<db>.<type>` created, and a relay named for it
/// whose topic template is `<db>.{aggregate_type}`.
pub struct Fixture {
    pub dir: Scratch,
    pub db: std::sync::Arc<TestDb>,
    pub topics: Vec<String>,
    pub topic: String,
    pub name: String,
    pub mysql_port: u16,
}

impl Fixture {
    pub async fn new(prefix: &str, mysql_port: u16, types: &[&str], partitions: i32) -> Fixture {
        services();
        let dir = Scratch::new(prefix);
        let db = TestDb::new(prefix, mysql_port).await;
        let topics: Vec<String> = types.iter().map(|t| format!("{}.{t}", db.name)).collect();
        create_topics(&topics, partitions).await;
        Fixture {
            dir,
            topic: format!("{}.{{aggregate_type}}", db.name),
            name: format!("{prefix}-{}", db.name),
            db: std::sync::Arc::new(db),
            topics,
            mysql_port,
        }
    }

    pub fn spec(&self) -> RelaySpec<'_> {
        RelaySpec {
            name: &self.name,
            db: &self.db.name,
            mysql_port: self.mysql_port,
            topic: &self.topic,
            extra_kafka: "",
            extra: "",
        }
    }
}

/// Everything a relay config needs; `extra` is appended TOML.
pub struct RelaySpec<'a> {
    pub name: &'a str,
    pub db: &'a str,
    pub mysql_port: u16,
    pub topic: &'a str,
    pub extra_kafka: &'a str,
    pub extra: &'a str,
}

impl RelaySpec<'_> {
    pub fn toml(&self, http_port: u16) -> String {
        format!(
            r#"name = "{name}"
start_from = "earliest"
{extra}

[mysql]
host = "127.0.0.1"
port = {port}
user = "relay"
heartbeat = "1s"

[[outbox]]
database = "{db}"
topic = "{topic}"

[kafka]
bootstrap_servers = "{broker}"
{extra_kafka}

[redis]
url = "{redis}"
key_prefix = "test:"
checkpoint_interval = "200ms"

[http]
listen = "127.0.0.1:{http_port}"
"#,
            name = self.name,
            db = self.db,
            port = self.mysql_port,
            topic = self.topic,
            broker = broker(),
            redis = redis_url(),
            extra = self.extra,
            extra_kafka = self.extra_kafka,
        )
    }
}

/// The relay binary, built once per test run so a test never runs a stale one.
pub fn relay_bin() -> PathBuf {
    workspace_bin("outbox-relay")
}

/// The operator binary, built once per test run like the relay's.
pub fn operator_bin() -> PathBuf {
    workspace_bin("outbox-operator")
}

/// A binary of the workspace (package and binary share its name), built once
/// per test run so a test never runs a stale one.
fn workspace_bin(name: &str) -> PathBuf {
    static BUILT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !built.iter().any(|b| b == name) {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        // The benchmark (release profile) runs the release binary.
        let profile: &[&str] = if cfg!(debug_assertions) {
            &[]
        } else {
            &["--release"]
        };
        let status = Command::new(cargo)
            .args(["build", "--quiet", "-p", name, "--bin", name])
            .args(profile)
            .current_dir(root())
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building {name} failed");
        built.push(name.to_owned());
    }
    // target/<profile>/deps/integration-xxxx → target/<profile>/<name>
    let exe = std::env::current_exe().expect("test exe");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join(name);
    assert!(
        bin.exists(),
        "{} is missing: build it first (`cargo build --workspace --bins`, as scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// A relay process (or the operator's) with its log captured in a file.
pub struct Relay {
    pub child: Child,
    pub log: PathBuf,
    pub http_port: u16,
}

impl Relay {
    pub fn start(dir: &Path, config: &str, http_port: u16, env: &[(&str, &str)]) -> Relay {
        let n = unique();
        let cfg = dir.join(format!("relay-{n}.toml"));
        std::fs::write(&cfg, config).expect("write config");
        let log = dir.join(format!("relay-{n}.log"));
        let mut cmd = Command::new(relay_bin());
        cmd.arg("--config")
            .arg(&cfg)
            .env("OUTBOX_RELAY_MYSQL_PASSWORD", RELAY_PASSWORD)
            .env_remove("RUST_LOG");
        for (k, v) in env {
            cmd.env(k, v);
        }
        Relay::spawn(cmd, log, http_port)
    }

    /// Any process of this workspace (the operator too), its output in `log`
    /// and its HTTP server on `http_port`.
    pub fn spawn(mut cmd: Command, log: PathBuf, http_port: u16) -> Relay {
        let out = std::fs::File::create(&log).expect("log file");
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone().expect("log fd"))
            .stderr(out);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {:?}: {e}", cmd.get_program()));
        Relay {
            child,
            log,
            http_port,
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status();
    }

    /// Waits for the process to exit.
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let log = self.log.clone();
        let child = &mut self.child;
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = child.try_wait().expect("try_wait") {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "the process did not exit within {within:?}; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM and wait: a graceful stop.
    pub async fn terminate(&mut self) -> ExitStatus {
        self.signal("TERM");
        self.wait_exit(Duration::from_secs(60)).await
    }

    pub async fn kill(&mut self) {
        self.signal("KILL");
        self.wait_exit(Duration::from_secs(10)).await;
    }

    /// Records this process got acknowledged (its `/metrics`).
    pub async fn events(&self) -> u64 {
        let Some((_, text)) = http_get(self.http_port, "/metrics").await else {
            return 0;
        };
        text.lines()
            .filter(|l| l.starts_with("outbox_relay_events_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// Until this process got at least `n` records acknowledged.
    pub async fn wait_events(&mut self, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.events().await < n {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                panic!("relay exited ({s}); log:\n{}", self.logs());
            }
            assert!(
                Instant::now() < deadline,
                "relay did not relay {n} records; log:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What `/readyz` says: `streaming`, `standby`, or None when not ready.
    pub async fn role(&self) -> Option<String> {
        match http_get(self.http_port, "/readyz").await {
            Some((200, body)) => Some(body.trim().to_owned()),
            _ => None,
        }
    }

    /// Until `/readyz` says `streaming` (the leader's binlog stream is open).
    pub async fn wait_ready(&mut self) {
        self.wait_role("streaming", Duration::from_secs(60)).await;
    }

    /// Until `/readyz` says `role`; panics with the log if the process exits.
    pub async fn wait_role(&mut self, role: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if self.role().await.as_deref() == Some(role) {
                return;
            }
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                panic!(
                    "relay exited ({s}) before it was {role}; log:\n{}",
                    self.logs()
                );
            }
            assert!(
                Instant::now() < deadline,
                "relay not {role} within {within:?}; log:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The relay's report (`/status`), when it answers.
    pub async fn status(&self) -> Option<serde_json::Value> {
        let (code, body) = http_get(self.http_port, "/status").await?;
        (code == 200).then(|| serde_json::from_str(&body).expect("status json"))
    }

    /// Polls `/status` until `ok` holds for it (60 s).
    pub async fn status_until(
        &self,
        what: &str,
        ok: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        wait_for(what, Duration::from_secs(60), || async {
            self.status().await.filter(|s| ok(s))
        })
        .await
    }

    /// Waits for the process to exit on an error: a non-zero status and a
    /// log naming each of `wanted`. Returns the log.
    pub async fn wait_failure(&mut self, wanted: &[&str]) -> String {
        let status = self.wait_exit(Duration::from_secs(60)).await;
        let logs = self.logs();
        assert!(
            !status.success(),
            "the relay must exit non-zero; log:\n{logs}"
        );
        for w in wanted {
            assert!(logs.contains(w), "expected `{w}` in:\n{logs}");
        }
        logs
    }

    /// Whether the process still runs.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// A gauge or counter of this process's `/metrics` (0 when absent).
    pub async fn metric(&self, name: &str) -> f64 {
        let Some((_, text)) = http_get(self.http_port, "/metrics").await else {
            return 0.0;
        };
        text.lines()
            .filter(|l| l.split([' ', '{']).next() == Some(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// When the first line of `logs` containing `what` was written, as time since
/// the Unix epoch (the relay's text log starts each line with an RFC 3339
/// UTC timestamp, `2026-12-03T19:56:36.474601Z`).
pub fn logged_at(logs: &str, what: &str) -> Option<Duration> {
    let line = logs.lines().find(|l| l.contains(what))?;
    let ts = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.split('-').map(|v| v.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    // Days from 1970-01-01 to the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let mut t = time.split(':');
    let (h, min) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let sec: f64 = t.next()?.parse().ok()?;
    let whole = days * 86_400 + h * 3_600 + min * 60;
    Some(Duration::from_secs(u64::try_from(whole).ok()?) + Duration::from_secs_f64(sec))
}

/// Time since the Unix epoch, to compare with [`logged_at`].
pub fn since_epoch() -> Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
}

/// A minimal HTTP/1.0 GET: (status, body).
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((code, body))
}

pub async fn create_topics(topics: &[String], partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", broker())
        .create()
        .expect("admin client");
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1)))
        .collect();
    let res = admin
        .create_topics(&new, &AdminOptions::new())
        .await
        .expect("create topics");
    for r in res {
        if let Err((t, e)) = r {
            assert!(
                e == rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists,
                "create topic {t}: {e}"
            );
        }
    }
}

/// A record read back from Kafka.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rec {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Rec {
    pub fn header(&self, k: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_slice())
    }
    pub fn id(&self) -> u64 {
        let raw = self.header("id").expect("id header");
        std::str::from_utf8(raw)
            .ok()
            .and_then(|s| s.parse().ok())
            .expect("numeric id header")
    }
    pub fn key_str(&self) -> String {
        String::from_utf8_lossy(self.key.as_deref().unwrap_or_default()).into_owned()
    }
}

/// Reads every record of `topics` from the beginning: waits until at least
/// `at_least` records are read, then until no new record came for a second
/// (tansu's high watermarks lag behind its data, so they cannot tell the end).
pub async fn read_topics(topics: &[String], at_least: usize, within: Duration) -> Vec<Rec> {
    read_topics_from(broker(), topics, at_least, within).await
}

/// `read_topics` from the broker at `broker`.
pub async fn read_topics_from(
    broker: &str,
    topics: &[String],
    at_least: usize,
    within: Duration,
) -> Vec<Rec> {
    let topics = topics.to_vec();
    let broker = broker.to_owned();
    tokio::task::spawn_blocking(move || read_blocking(&broker, &topics, at_least, within))
        .await
        .expect("reader thread")
}

fn consumer_for_read(broker: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", broker)
        .set("group.id", format!("test-{}", unique()))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", "20")
        .create()
        .expect("consumer")
}

fn read_blocking(broker: &str, topics: &[String], at_least: usize, within: Duration) -> Vec<Rec> {
    let probe = consumer_for_read(broker);
    let deadline = Instant::now() + within;
    let mut consumers = Vec::new();
    for t in topics {
        let md = probe
            .fetch_metadata(Some(t), Duration::from_secs(10))
            .expect("metadata");
        for p in md.topics().iter().flat_map(|mt| mt.partitions()) {
            // One consumer per partition: tansu answers a multi-partition
            // fetch for one partition only.
            let c = consumer_for_read(broker);
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(t, p.id(), Offset::Offset(0))
                .expect("assign offset");
            c.assign(&tpl).expect("assign");
            consumers.push(c);
        }
    }
    let mut out = Vec::new();
    let mut last_new = Instant::now();
    loop {
        let mut got = false;
        for c in &consumers {
            while let Some(m) = c.poll(Duration::from_millis(10)) {
                let m = m.expect("consume");
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|x| (x.key.to_owned(), x.value.unwrap_or_default().to_vec()))
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(Rec {
                    topic: m.topic().to_owned(),
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    value: m.payload().map(<[u8]>::to_vec),
                    headers,
                });
                got = true;
            }
        }
        if got {
            last_new = Instant::now();
        }
        let quiet = last_new.elapsed() > Duration::from_secs(1);
        if (quiet && out.len() >= at_least) || Instant::now() >= deadline {
            return out;
        }
    }
}

/// The stored checkpoint of relay `name` (key prefix `test:`).
pub async fn checkpoint(name: &str) -> Option<(u64, BinlogPosition)> {
    checkpoint_at(redis_url(), name).await
}

/// Replaces the position in relay `name`'s checkpoint (its epoch kept): a
/// checkpoint as another server or version would have left it.
pub async fn put_checkpoint(name: &str, pos: &BinlogPosition) {
    let client = redis::Client::open(redis_url()).expect("redis url");
    let mut c = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let json = serde_json::to_string(&outbox_relay::position::Position::Binlog(pos.clone()))
        .expect("json");
    let _: i64 = redis::cmd("HSET")
        .arg(format!("test:{name}:checkpoint"))
        .arg("position")
        .arg(json)
        .query_async(&mut c)
        .await
        .expect("HSET checkpoint");
}

/// `checkpoint` in the Redis at `url` (waiting out a restarted server's
/// loading of its dataset).
pub async fn checkpoint_at(url: &str, name: &str) -> Option<(u64, BinlogPosition)> {
    checkpoint_as(url, name).await
}

/// The checkpoint of relay `name`, as whichever position type the test reads.
pub async fn checkpoint_as<P: serde::de::DeserializeOwned>(
    url: &str,
    name: &str,
) -> Option<(u64, P)> {
    let client = redis::Client::open(url).expect("redis url");
    let mut c = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let deadline = Instant::now() + Duration::from_secs(30);
    let (epoch, pos): (Option<u64>, Option<String>) = loop {
        match redis::cmd("HMGET")
            .arg(format!("test:{name}:checkpoint"))
            .arg("epoch")
            .arg("position")
            .query_async(&mut c)
            .await
        {
            Ok(v) => break v,
            Err(e)
                if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::BusyLoading)
                    && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("hmget: {e}"),
        }
    };
    Some((
        epoch?,
        serde_json::from_str(&pos?).expect("checkpoint json"),
    ))
}

/// `(lag seconds, lag bytes)` of a `/status` report.
pub fn lag(s: &serde_json::Value) -> (u64, Option<u64>) {
    (
        s["lag"]["seconds"].as_u64().unwrap_or(u64::MAX),
        s["lag"]["bytes"].as_u64(),
    )
}

/// Until the checkpoint of relay `name` in the Redis at `url` reaches the
/// binlog head `db`'s server has now: everything committed so far is
/// acknowledged by Kafka.
pub async fn wait_checkpoint_at_head(
    url: &str,
    name: &str,
    db: &TestDb,
    within: Duration,
) -> BinlogPosition {
    let head = db.head().await;
    wait_for("the checkpoint at the binlog head", within, || async {
        checkpoint_at(url, name)
            .await
            .map(|c| c.1)
            .filter(|p| (&p.file.file, p.file.pos) >= (&head.0, head.1))
    })
    .await
}

/// What a delivery check found.
#[derive(Default)]
pub struct Report {
    pub delivered_unique: usize,
    pub duplicates: usize,
    pub missing: Vec<u64>,
    pub unexpected: Vec<u64>,
    /// Keys whose first deliveries are out of commit order, or split over partitions.
    pub order_violations: Vec<String>,
    /// Duplicates whose content differs from the first delivery.
    pub inconsistent_duplicates: Vec<u64>,
}

impl std::fmt::Debug for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        fn head<T: std::fmt::Debug>(v: &[T]) -> String {
            format!(
                "{} {:?}{}",
                v.len(),
                &v[..v.len().min(10)],
                if v.len() > 10 { "..." } else { "" }
            )
        }
        f.debug_struct("Report")
            .field("delivered_unique", &self.delivered_unique)
            .field("duplicates", &self.duplicates)
            .field("missing", &head(&self.missing))
            .field("unexpected", &head(&self.unexpected))
            .field("order_violations", &head(&self.order_violations))
            .field(
                "inconsistent_duplicates",
                &head(&self.inconsistent_duplicates),
            )
            .finish()
    }
}

impl Report {
    pub fn assert_complete(&self) {
        assert!(
            self.missing.is_empty()
                && self.unexpected.is_empty()
                && self.order_violations.is_empty()
                && self.inconsistent_duplicates.is_empty(),
            "delivery check failed: {self:#?}"
        );
    }

    /// The duplicates of `kills` SIGKILLs under a writer at `rate` rows/s,
    /// printed and asserted at most `max_ms` of its traffic per kill.
    pub fn assert_duplicates_per_kill(&self, kills: usize, rate: f64, max_ms: u32) {
        let per_kill = self.duplicates as f64 / kills as f64;
        println!(
            "{kills} SIGKILLs at {rate:.0} rows/s: {} duplicates, {per_kill:.0} per kill = {:.0} ms of traffic",
            self.duplicates,
            per_kill / rate * 1000.0
        );
        assert!(
            per_kill <= rate * f64::from(max_ms) / 1000.0,
            "{per_kill:.0} duplicates per kill at {rate:.0} rows/s: more than {max_ms} ms of traffic"
        );
    }
}

/// Checks records against the outbox rows `(id, key)` in commit order: every
/// row delivered, nothing else, per-key first deliveries in commit order in
/// one partition, duplicates identical to the first delivery.
pub fn check(rows: &[(u64, Option<String>)], recs: &[Rec]) -> Report {
    let expected: BTreeMap<u64, Option<String>> = rows.iter().cloned().collect();
    let mut first: HashMap<u64, &Rec> = HashMap::new();
    let mut report = Report::default();
    // Records in partition order.
    let mut sorted: Vec<&Rec> = recs.iter().collect();
    sorted
        .sort_by(|a, b| (&a.topic, a.partition, a.offset).cmp(&(&b.topic, b.partition, b.offset)));
    let mut per_key: HashMap<String, Vec<(u64, String, i32)>> = HashMap::new();
    for r in sorted {
        let id = r.id();
        if !expected.contains_key(&id) {
            report.unexpected.push(id);
            continue;
        }
        match first.get(&id) {
            Some(f) => {
                report.duplicates += 1;
                if f.key != r.key || f.value != r.value || f.topic != r.topic {
                    report.inconsistent_duplicates.push(id);
                }
            }
            None => {
                first.insert(id, r);
                per_key
                    .entry(r.key_str())
                    .or_default()
                    .push((id, r.topic.clone(), r.partition));
            }
        }
    }
    report.delivered_unique = first.len();
    report.missing = expected
        .keys()
        .filter(|id| !first.contains_key(id))
        .copied()
        .collect();
    for (key, seq) in per_key {
        let (_, t0, p0) = &seq[0];
        if seq.iter().any(|(_, t, p)| t != t0 || p != p0) {
            report
                .order_violations
                .push(format!("{key}: split over partitions"));
        }
        if seq.windows(2).any(|w| w[0].0 >= w[1].0) {
            report.order_violations.push(format!(
                "{key}: {:?}",
                seq.iter().map(|s| s.0).collect::<Vec<_>>()
            ));
        }
    }
    report
}

/// A MariaDB of the test's own (binlog on, users created) in `dir`.
pub struct PrivateDb {
    pub dir: std::path::PathBuf,
    pub port: u16,
}

impl PrivateDb {
    pub fn start(dir: &std::path::Path, extra: &[&str]) -> PrivateDb {
        let port = free_port();
        let db = PrivateDb {
            dir: dir.join("mariadb"),
            port,
        };
        db.run("start-mariadb", extra);
        db
    }

    pub fn run(&self, verb: &str, extra: &[&str]) {
        let dir = self.dir.to_string_lossy();
        let port = self.port.to_string();
        let mut args = vec![verb, &dir];
        if verb == "start-mariadb" {
            args.push(&port);
        }
        args.extend_from_slice(extra);
        services_sh(&args);
    }

    pub fn stop(&self) {
        self.run("stop-dir", &[]);
    }

    pub fn restart(&self) {
        self.stop();
        self.run("start-mariadb", &[]);
    }
}

impl Drop for PrivateDb {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A tansu broker of the test's own with durable (sqlite) storage, so it can
/// be stopped and started again without losing records.
pub struct PrivateBroker {
    pub dir: PathBuf,
    pub port: u16,
}

impl PrivateBroker {
    pub fn start(dir: &Path) -> PrivateBroker {
        let b = PrivateBroker {
            dir: dir.join("broker"),
            port: free_port(),
        };
        b.up();
        b
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn up(&self) {
        services_sh(&[
            "start-broker",
            &self.dir.to_string_lossy(),
            &self.port.to_string(),
            "sqlite",
        ]);
    }

    pub fn down(&self) {
        services_sh(&["stop-dir", &self.dir.to_string_lossy()]);
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        self.down();
    }
}

/// A relay for fixture `f` producing to `broker` (where it creates the
/// fixture's topics with `partitions`), reporting every 500 ms; ready.
pub async fn start_on_broker(f: &Fixture, broker: &PrivateBroker, partitions: i32) -> Relay {
    let topics: Vec<String> = f.topics.iter().map(|t| format!("\"{t}\"")).collect();
    let create = format!(
        "create_topics = {{ topics = [{}], partitions = {partitions} }}",
        topics.join(", ")
    );
    let spec = RelaySpec {
        extra_kafka: &create,
        extra: "[status]\ninterval = \"500ms\"\n",
        ..f.spec()
    };
    let port = free_port();
    let addr = broker.addr();
    let mut relay = Relay::start(
        &f.dir.0,
        &spec.toml(port),
        port,
        &[("OUTBOX_RELAY_KAFKA_BOOTSTRAP_SERVERS", addr.as_str())],
    );
    relay.wait_ready().await;
    relay
}

/// A Redis of the test's own that keeps its data across restarts (AOF), like
/// a production Redis, so it can be stopped and started again.
pub struct PrivateRedis {
    pub dir: PathBuf,
    pub port: u16,
    /// Extra `redis-server` arguments (a password, TLS).
    pub extra: Vec<String>,
}

impl PrivateRedis {
    pub fn start(dir: &Path) -> PrivateRedis {
        PrivateRedis::start_with(dir, &[])
    }

    /// `start` with extra `redis-server` arguments; `{port}` in them is
    /// replaced by the instance's port.
    pub fn start_with(dir: &Path, extra: &[&str]) -> PrivateRedis {
        let port = free_port();
        let r = PrivateRedis {
            dir: dir.join("redis"),
            port,
            extra: extra
                .iter()
                .map(|a| a.replace("{port}", &port.to_string()))
                .collect(),
        };
        r.up();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn up(&self) {
        let (dir, port) = (self.dir.to_string_lossy(), self.port.to_string());
        let mut args = vec![
            "start-redis",
            &dir,
            &port,
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
        ];
        args.extend(self.extra.iter().map(String::as_str));
        services_sh(&args);
    }

    pub fn down(&self) {
        services_sh(&["stop-dir", &self.dir.to_string_lossy()]);
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.down();
    }
}

/// Peak resident memory of process `pid` (VmHWM), in bytes.
pub fn peak_rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

pub fn services_sh(args: &[&str]) {
    let out = Command::new(root().join("scripts/services.sh"))
        .args(args)
        .output()
        .expect("services.sh");
    assert!(
        out.status.success(),
        "services.sh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
