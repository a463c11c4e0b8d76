//! The PostgreSQL source: logical replication with the built-in `pgoutput`
//! plugin, through a slot and a publication of the outbox tables (created
//! when missing, named from the relay). Inserted outbox rows and
//! `pg_logical_emit_message(true, prefix, json)` messages become records; a
//! transaction's commit (its end LSN) is the position. The slot's confirmed
//! position moves only to a position the checkpoint holds, so the server
//! keeps everything a restart may need and nothing more.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes};
use pgwire_replication::{
    Lsn as PgLsn, PgWireError, ReplicationClient, ReplicationConfig, ReplicationEvent,
    TlsConfig as PgTls,
};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::{Columns, Config, OutboxConfig, PostgresConfig, TlsConfig, TlsMode};
use crate::election::Leadership;
use crate::metrics::{seconds_since, Metrics};
use crate::outage::{next_backoff, Outage, RETRY_FIRST};
use crate::outbox::{header, Mapper, OutboxRow, RowContext, TableMapping};
use crate::pgsql;
use crate::position::{Lsn, LsnPosition, Position};
use crate::source::{self, ServerLog, SourceError, SourceEvent};

/// Seconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_SECS: i64 = 946_684_800;

/// Commits of transactions without outbox rows are reported at most this often.
const IDLE_COMMIT_EVERY: Duration = Duration::from_millis(200);

/// bytea's type OID: its text form (`\x…`) is decoded to the bytes.
const BYTEA: u32 = 17;

/// The `[postgres]` section (present when this source runs: the config's
/// validation demands exactly one database).
fn pg(cfg: &Config) -> Result<&PostgresConfig, SourceError> {
    cfg.postgres
        .as_ref()
        .ok_or_else(|| SourceError::Definite("[postgres] is not configured".into()))
}

/// Classifies a client error: refusals that a retry cannot fix are definite
/// and name the fix; network trouble and a server going away are not.
fn classify(context: &str, e: PgWireError, user: &str) -> SourceError {
    let text = e.to_string();
    let lower = text.to_ascii_lowercase();
    let definite = |fix: &str| SourceError::Definite(format!("{context}: {text}. {fix}"));
    match &e {
        // A certificate or setting a retry cannot change; a handshake cut
        // short by the network is retried.
        PgWireError::Tls(_)
            if lower.contains("certificate")
                || lower.contains("config error")
                || lower.contains("does not support tls")
                || lower.contains("sni") =>
        {
            definite("Check postgres.tls (mode, ca_file) against the server's ssl settings and certificate")
        }
        PgWireError::Auth(_) => definite(
            "Check postgres.user and the password (OUTBOX_RELAY_POSTGRES_PASSWORD or postgres.password_file)",
        ),
        _ if lower.contains("password authentication failed")
            || lower.contains("no pg_hba.conf entry")
            || lower.contains("pg_hba.conf rejects") =>
        {
            definite("Check postgres.user, the password (OUTBOX_RELAY_POSTGRES_PASSWORD or postgres.password_file), postgres.tls and pg_hba.conf")
        }
        _ if lower.contains("must be superuser or replication role")
            || lower.contains("permission denied to start wal sender")
            || lower.contains("replication role") =>
        {
            definite(&format!(
                "The relay's role needs the REPLICATION attribute: ALTER ROLE \"{user}\" REPLICATION; \
                 (Amazon RDS / Aurora: GRANT rds_replication TO \"{user}\"; Cloud SQL: \
                 cloudsql.logical_decoding = on and ALTER USER ... WITH REPLICATION)"
            ))
        }
        // Retried: a WAL sender of a relay gone away ends within
        // wal_sender_timeout.
        _ if lower.contains("max_wal_senders") => SourceError::Transient(format!(
            "{context}: {text}. Fix: raise max_wal_senders (ALTER SYSTEM SET max_wal_senders = ...; \
             restart the server) or end an unused WAL sender (SELECT pid, application_name FROM \
             pg_stat_replication; SELECT pg_terminate_backend(pid))"
        )),
        _ if lower.contains("does not exist") && lower.contains("database") => {
            definite("Check postgres.database")
        }
        _ => SourceError::Transient(format!("{context}: {text}")),
    }
}

fn replication_config(p: &PostgresConfig, relay: &str) -> ReplicationConfig {
    ReplicationConfig::new(
        p.host.clone(),
        p.user.clone(),
        p.password.expose().to_owned(),
        p.database.clone(),
        p.slot(relay),
        p.publication(relay),
    )
    .with_port(p.port)
    .with_tls(tls_config(&p.tls))
    .with_status_interval(Duration::from_secs(1))
    .with_application_name(format!("outbox-relay {relay}"))
}

/// `postgres.tls` as the client's `sslmode` (the CA file of the verifying
/// modes is demanded by the config's validation).
fn tls_config(t: &TlsConfig) -> PgTls {
    match t.mode {
        TlsMode::Disabled => PgTls::disabled(),
        TlsMode::Require => PgTls::require(),
        TlsMode::VerifyCa => PgTls::verify_ca(t.ca_file.clone()),
        TlsMode::VerifyFull => PgTls::verify_full(t.ca_file.clone()),
    }
}

/// A gated replication session (`replication=database`): SQL before
/// START_REPLICATION.
struct Session {
    client: ReplicationClient,
    user: String,
    timeout: Duration,
}

impl Session {
    async fn connect(cfg: &Config, rc: ReplicationConfig) -> Result<Session, SourceError> {
        let p = pg(cfg)?;
        let client = ReplicationClient::connect_gated(rc)
            .await
            .map_err(|e| classify(&connecting(p), e, &p.user))?;
        let mut s = Session {
            client,
            user: p.user.clone(),
            timeout: p.connect_timeout,
        };
        // The first query tells whether connecting and authentication worked.
        s.query("SELECT 1").await.map_err(|e| match e {
            SourceError::Transient(m) => SourceError::Transient(format!("{}: {m}", connecting(p))),
            d => d,
        })?;
        Ok(s)
    }

    /// Rows of `sql` in text form.
    async fn query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, SourceError> {
        let rows = tokio::time::timeout(self.timeout, self.client.simple_query(sql))
            .await
            .map_err(|_| {
                SourceError::Transient(format!(
                    "PostgreSQL did not answer within {:?}",
                    self.timeout
                ))
            })?
            .map_err(|e| classify("PostgreSQL", e, &self.user))?;
        Ok(rows
            .into_iter()
            .map(|r| {
                r.into_iter()
                    .map(|c| c.map(|b| String::from_utf8_lossy(&b).into_owned()))
                    .collect()
            })
            .collect())
    }

    /// The first column of the first row.
    async fn value(&mut self, sql: &str) -> Result<Option<String>, SourceError> {
        Ok(self
            .query(sql)
            .await?
            .into_iter()
            .next()
            .and_then(|r| r.into_iter().next().flatten()))
    }
}

fn connecting(p: &PostgresConfig) -> String {
    format!("connecting to PostgreSQL at {}:{}", p.host, p.port)
}

/// A quoted SQL literal.
fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// A quoted SQL identifier.
fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Checks the server settings, the role and the outbox tables; each failure
/// names its fix.
async fn preflight(s: &mut Session, cfg: &Config) -> Result<String, SourceError> {
    let p = pg(cfg)?;
    let version = s.value("SHOW server_version").await?.unwrap_or_default();
    let major: u32 = version
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if major < 14 {
        return Err(SourceError::Definite(format!(
            "PostgreSQL {version} is too old: the relay needs 14 or later (pgoutput messages and empty-transaction skipping)"
        )));
    }
    let wal_level = s.value("SHOW wal_level").await?.unwrap_or_default();
    if wal_level != "logical" {
        return Err(SourceError::Definite(format!(
            "wal_level is `{wal_level}`; logical replication needs `wal_level = logical`. \
             Fix: ALTER SYSTEM SET wal_level = logical; then restart the server \
             (Amazon RDS: rds.logical_replication = 1 in the parameter group)"
        )));
    }
    let slot = p.slot(&cfg.name);
    let have_slot = s
        .value(&format!(
            "SELECT plugin || ' ' || database FROM pg_replication_slots WHERE slot_name = {}",
            lit(&slot)
        ))
        .await?;
    match have_slot.as_deref().map(|v| v.split_once(' ').unwrap_or((v, ""))) {
        Some(("pgoutput", db)) if db == p.database => {}
        Some((plugin, db)) => {
            return Err(SourceError::Definite(format!(
                "replication slot `{slot}` exists with plugin `{plugin}` in database `{db}`; the relay \
                 needs a pgoutput slot in `{}`. Set postgres.slot to another name, or drop it: \
                 SELECT pg_drop_replication_slot({})",
                p.database,
                lit(&slot)
            )))
        }
        None if !p.create => {
            return Err(SourceError::Definite(format!(
                "replication slot `{slot}` does not exist and postgres.create is false. Create it: \
                 SELECT pg_create_logical_replication_slot({}, 'pgoutput')",
                lit(&slot)
            )))
        }
        None => {
            let used: u64 = num(s.value("SELECT count(*) FROM pg_replication_slots").await?);
            let max: u64 = num(s.value("SHOW max_replication_slots").await?);
            if used >= max {
                return Err(SourceError::Definite(format!(
                    "no free replication slot to create `{slot}`: {used} of max_replication_slots = {max} \
                     are used. Fix: drop an abandoned slot (SELECT slot_name, active FROM pg_replication_slots) \
                     or raise max_replication_slots and restart the server"
                )));
            }
        }
    }
    // A leading relay holds one WAL sender (the stream; this session stands
    // for it); a standby taking over, or this relay reconnecting before its
    // broken stream's sender ends, needs one more until it ends the old one.
    let used: u64 = num(s
        .value("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender'")
        .await?);
    let max_senders: u64 = num(s.value("SHOW max_wal_senders").await?);
    if max_senders <= used {
        warn!(
            "{used} of max_wal_senders = {max_senders} WAL senders are in use (this relay's included): \
             none is free for a standby taking over or a reconnect, which need one until they end \
             the old stream's. Fix: raise max_wal_senders (ALTER SYSTEM SET max_wal_senders = {}; \
             restart the server)",
            used + 2
        );
    }
    for (i, o) in cfg.outboxes.iter().enumerate() {
        let name = format!("{}.{}", ident(&o.database), ident(&o.table));
        let exists = s
            .value(&format!("SELECT to_regclass({}) IS NOT NULL", lit(&name)))
            .await?;
        if exists.as_deref() != Some("t") {
            return Err(SourceError::Definite(format!(
                "outbox[{i}]: table {}.{} does not exist in database `{}` (outbox[{i}].database is its schema)",
                o.database, o.table, p.database
            )));
        }
    }
    let publication = p.publication(&cfg.name);
    let tables = table_list(&cfg.outboxes);
    // Twice: relays starting together may both find it missing.
    for attempt in 0..2 {
        let exists = s
            .value(&format!(
                "SELECT count(*) FROM pg_publication WHERE pubname = {}",
                lit(&publication)
            ))
            .await?;
        if num(exists) > 0 {
            let published: Vec<String> = s
                .query(&format!(
                    "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = {}",
                    lit(&publication)
                ))
                .await?
                .into_iter()
                .filter_map(|r| r.into_iter().next().flatten())
                .collect();
            if let Some(o) = cfg
                .outboxes
                .iter()
                .find(|o| !published.contains(&format!("{}.{}", o.database, o.table)))
            {
                return Err(SourceError::Definite(format!(
                    "publication `{publication}` does not include the outbox table {}.{}. Fix: \
                     ALTER PUBLICATION {} ADD TABLE {}.{}",
                    o.database,
                    o.table,
                    ident(&publication),
                    ident(&o.database),
                    ident(&o.table)
                )));
            }
            break;
        }
        let create = format!(
            "CREATE PUBLICATION {} FOR TABLE {tables} WITH (publish = 'insert')",
            ident(&publication)
        );
        if !p.create {
            return Err(SourceError::Definite(format!(
                "publication `{publication}` does not exist and postgres.create is false. Create it: {create}"
            )));
        }
        // Created at preflight, before the slot: a slot decodes with the
        // publication as it was when each change was written.
        match s.query(&create).await {
            Ok(_) => {
                // Marks it as the relay's: `checkpointPolicy: Delete` drops
                // only a publication the relay made.
                s.query(&format!(
                    "COMMENT ON PUBLICATION {} IS {}",
                    ident(&publication),
                    lit(&crate::keys::publication_comment(&cfg.name))
                ))
                .await?;
                info!(publication = %publication, tables = %tables, "publication created");
                break;
            }
            Err(e)
                if attempt == 0
                    && ["already exists", "duplicate key"]
                        .iter()
                        .any(|w| e.to_string().contains(w)) => {}
            Err(e) => {
                return Err(SourceError::Definite(format!(
                    "cannot create publication `{publication}`: {e}. Create it as the tables' owner: {create}"
                )))
            }
        }
    }
    Ok(version)
}

fn table_list(outboxes: &[OutboxConfig]) -> String {
    outboxes
        .iter()
        .map(|o| format!("{}.{}", ident(&o.database), ident(&o.table)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn num(v: Option<String>) -> u64 {
    v.and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// The slot as the server has it: confirmed position and the backend
/// streaming from it.
struct SlotState {
    confirmed: Option<Lsn>,
    active_pid: Option<u32>,
}

async fn slot_state(s: &mut Session, slot: &str) -> Result<Option<SlotState>, SourceError> {
    let rows = s
        .query(&format!(
            "SELECT confirmed_flush_lsn, active_pid FROM pg_replication_slots WHERE slot_name = {}",
            lit(slot)
        ))
        .await?;
    Ok(rows.into_iter().next().map(|r| SlotState {
        confirmed: r.first().cloned().flatten().and_then(|v| v.parse().ok()),
        active_pid: r.get(1).cloned().flatten().and_then(|v| v.parse().ok()),
    }))
}

/// Ends the backend that still streams from the slot (an earlier leader's
/// walsender, which would otherwise hold the slot until
/// `wal_sender_timeout`). Only a process that holds the lease calls this.
async fn end_stale_backend(s: &mut Session, slot: &str) -> Result<(), SourceError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let Some(state) = slot_state(s, slot).await? else {
            return Ok(());
        };
        let Some(pid) = state.active_pid else {
            return Ok(());
        };
        warn!(
            slot,
            pid, "the replication slot is still streaming to an earlier relay; ending that backend"
        );
        s.query(&format!("SELECT pg_terminate_backend({pid})"))
            .await?;
        if Instant::now() > deadline {
            return Err(SourceError::Transient(format!(
                "replication slot `{slot}` is still held by backend {pid}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A preflighted session and the server version.
pub struct Opened {
    session: Session,
}

/// A configured relation as the stream describes it.
enum Relation {
    Outbox {
        mapping: TableMapping,
        mapper: usize,
        /// Column type OIDs, to decode bytea.
        types: Vec<u32>,
    },
    Other,
}

/// The transaction being read.
struct Txn {
    rows: usize,
}

/// Reads committed outbox rows from a replication slot; reconnects at the
/// last commit on transient errors.
pub struct PgSource {
    cfg: Arc<Config>,
    mappers: Vec<Mapper>,
    /// The mapping of `pg_logical_emit_message` contents.
    message: Option<(Mapper, TableMapping)>,
    epoch: String,
    /// The leadership this stream serves: a reconnect takes the slot from
    /// another backend only while it is valid.
    term: Arc<Leadership>,
    metrics: Metrics,
    client: Option<ReplicationClient>,
    relations: HashMap<u32, Arc<Relation>>,
    txn: Option<Txn>,
    /// Last commit read: where a reconnect resumes.
    committed: LsnPosition,
    /// The checkpoint's position: what the slot may confirm.
    durable: watch::Receiver<Option<Position>>,
    confirmed: Lsn,
    out: VecDeque<SourceEvent>,
    /// Rows of the interrupted transaction already emitted before a
    /// reconnect: skipped when it is read again.
    replay_skip: usize,
    last_idle_commit: Instant,
    at_text: Arc<str>,
    outage: Outage,
}

/// The message fields, in the order of the mapping's columns.
const MESSAGE_COLUMNS: [&str; 6] = [
    "id",
    "aggregate_type",
    "aggregate_id",
    "event_type",
    "payload",
    "headers",
];

impl PgSource {
    fn new(
        cfg: Arc<Config>,
        start: LsnPosition,
        term: Arc<Leadership>,
        metrics: Metrics,
        durable: watch::Receiver<Option<Position>>,
    ) -> Result<PgSource, SourceError> {
        let p = pg(&cfg)?;
        let max = cfg.max_message_bytes();
        let mappers = cfg
            .outboxes
            .iter()
            .map(|o| Mapper::new(o, max))
            .collect::<Result<Vec<_>, _>>()
            .map_err(SourceError::Definite)?;
        let message = if p.message_prefix.is_empty() {
            None
        } else {
            let o = OutboxConfig {
                database: p.database.clone(),
                table: p.message_prefix.clone(),
                columns: Columns::default(),
                topic: cfg.outboxes.first().map_or_else(
                    || "outbox.event.{aggregate_type}".into(),
                    |o| o.topic.clone(),
                ),
                topic_map: cfg
                    .outboxes
                    .first()
                    .map(|o| o.topic_map.clone())
                    .unwrap_or_default(),
            };
            let names: Vec<String> = MESSAGE_COLUMNS.iter().map(|c| c.to_string()).collect();
            let mut mapping = TableMapping::new(usize::MAX, &o, &names);
            mapping.name = Arc::from(format!("message:{}", p.message_prefix));
            Some((
                Mapper::new(&o, max).map_err(SourceError::Definite)?,
                mapping,
            ))
        };
        let confirmed = start.lsn;
        Ok(PgSource {
            at_text: Arc::from(start.lsn.to_string()),
            cfg,
            mappers,
            message,
            epoch: term.epoch().to_string(),
            term,
            metrics,
            client: None,
            relations: HashMap::new(),
            txn: None,
            committed: start,
            durable,
            confirmed,
            out: VecDeque::new(),
            replay_skip: 0,
            last_idle_commit: Instant::now(),
            outage: Outage::new("postgres"),
        })
    }

    async fn open_stream(&mut self) -> Result<ReplicationClient, SourceError> {
        let p = pg(&self.cfg)?;
        let rc = replication_config(p, &self.cfg.name)
            .with_start_lsn(PgLsn::from_u64(self.committed.lsn.0))
            .with_ack_lsn(PgLsn::from_u64(self.confirmed.0));
        let mut s = Session::connect(&self.cfg, rc).await?;
        // Another backend may hold the slot (our own from before a network
        // break, until `wal_sender_timeout`; a paused earlier leader): while
        // this process leads, it ends it. A process whose term is over
        // leaves it alone (the pipeline stops it).
        if !self.term.is_valid() {
            return Err(SourceError::Transient(
                "the leadership term is over: not taking the replication slot".into(),
            ));
        }
        end_stale_backend(&mut s, &p.slot(&self.cfg.name)).await?;
        let mut client = s.client;
        let user = p.user.clone();
        client
            .start()
            .await
            .map_err(|e| classify("starting replication", e, &user))?;
        tokio::time::timeout(p.connect_timeout, client.wait_started())
            .await
            .map_err(|_| {
                SourceError::Transient(format!(
                    "starting replication: no answer within {:?}",
                    p.connect_timeout
                ))
            })?
            .map_err(|e| classify("starting replication", e, &user))?;
        info!(position = %self.committed.lsn, slot = %p.slot(&self.cfg.name), "replication stream opened");
        Ok(client)
    }

    async fn read(&mut self) -> Result<SourceEvent, SourceError> {
        let mut backoff = RETRY_FIRST;
        loop {
            if let Some(ev) = self.out.pop_front() {
                return Ok(ev);
            }
            self.confirm_durable();
            if self.client.is_none() {
                match self.open_stream().await {
                    Ok(c) => {
                        self.metrics.streaming.set(1);
                        self.client = Some(c);
                        self.outage.recovered();
                        backoff = RETRY_FIRST;
                    }
                    Err(e) if e.is_transient() => {
                        self.outage.failed("cannot open the replication stream", &e);
                        self.metrics.errors.get_or_create(&kind()).inc();
                        tokio::time::sleep(backoff).await;
                        backoff = next_backoff(backoff);
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            let client = self.client.as_mut().expect("stream is open");
            let ev = tokio::select! {
                ev = client.recv() => ev,
                _ = self.durable.changed() => continue,
            };
            let result = match ev {
                Ok(Some(ev)) => self.handle(ev),
                Ok(None) => Err(SourceError::Transient(
                    "the server ended the replication stream".into(),
                )),
                Err(e) => Err(classify("reading the replication stream", e, "")),
            };
            match result {
                Ok(()) => {}
                Err(e) if e.is_transient() => {
                    self.metrics.streaming.set(0);
                    self.metrics.reconnects.inc();
                    self.metrics.errors.get_or_create(&kind()).inc();
                    if let Some(mut c) = self.client.take() {
                        c.abort();
                    }
                    let interrupted = self.txn.take().map_or(0, |t| t.rows);
                    self.replay_skip += interrupted;
                    let queued = self
                        .out
                        .iter()
                        .filter(|e| matches!(e, SourceEvent::Row { .. }))
                        .count();
                    self.replay_skip -= queued.min(self.replay_skip);
                    self.out.clear();
                    self.relations.clear();
                    self.outage.failed(
                        &format!(
                            "replication stream lost; reconnecting at {}",
                            self.committed.lsn
                        ),
                        &e,
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = next_backoff(backoff);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Lets the slot confirm what the checkpoint holds.
    fn confirm_durable(&mut self) {
        let lsn = match &*self.durable.borrow_and_update() {
            Some(Position::Lsn(l)) => l.lsn,
            _ => return,
        };
        if lsn > self.confirmed {
            self.confirmed = lsn;
            if let Some(c) = &self.client {
                c.update_applied_lsn(PgLsn::from_u64(lsn.0));
            }
        }
    }

    fn handle(&mut self, ev: ReplicationEvent) -> Result<(), SourceError> {
        match ev {
            ReplicationEvent::Begin { .. } => self.txn = Some(Txn { rows: 0 }),
            ReplicationEvent::XLogData { data, .. } => self.change(data)?,
            ReplicationEvent::Message {
                transactional,
                prefix,
                content,
                ..
            } => {
                let ours = self
                    .message
                    .as_ref()
                    .is_some_and(|(_, m)| m.name.strip_prefix("message:") == Some(prefix.as_str()));
                if ours && !transactional {
                    warn!(prefix = %prefix, "a non-transactional pg_logical_emit_message is not relayed: emit outbox messages with transactional = true");
                    self.metrics
                        .ignored
                        .get_or_create(&crate::metrics::label("table", &prefix))
                        .inc();
                } else if ours {
                    self.message(content);
                }
            }
            ReplicationEvent::Commit {
                end_lsn,
                commit_time_micros,
                ..
            } => {
                let rows = self.txn.take().map_or(0, |t| t.rows);
                let committed_at = (rows > 0).then(|| pg_system_time(commit_time_micros));
                if let Some(at) = committed_at {
                    self.metrics.commit_read_latency.observe(seconds_since(at));
                }
                self.replay_skip = 0;
                self.committed = LsnPosition {
                    lsn: Lsn(end_lsn.as_u64()),
                    commit_ts: unix_secs(commit_time_micros),
                };
                self.at_text = Arc::from(self.committed.lsn.to_string());
                if rows > 0 || self.last_idle_commit.elapsed() >= IDLE_COMMIT_EVERY {
                    self.last_idle_commit = Instant::now();
                    self.out.push_back(SourceEvent::Commit {
                        position: Position::Lsn(self.committed.clone()),
                        rows,
                        committed_at,
                    });
                }
            }
            ReplicationEvent::KeepAlive {
                wal_end,
                server_time_micros,
                ..
            } => {
                // Outside a transaction, every transaction that committed
                // before the keepalive's position was sent (pgoutput sends a
                // transaction at its commit; one still open commits later,
                // past it, and is sent then): an idle relay's position, and
                // the slot's, follow the server. At most every 200 ms.
                let end = Lsn(wal_end.as_u64());
                if self.txn.is_none()
                    && end > self.committed.lsn
                    && self.last_idle_commit.elapsed() >= IDLE_COMMIT_EVERY
                {
                    self.last_idle_commit = Instant::now();
                    self.committed = LsnPosition {
                        lsn: end,
                        commit_ts: unix_secs(server_time_micros),
                    };
                    self.out.push_back(SourceEvent::Commit {
                        position: Position::Lsn(self.committed.clone()),
                        rows: 0,
                        committed_at: None,
                    });
                }
            }
            ReplicationEvent::StoppedAt { .. } => {}
        }
        Ok(())
    }

    /// One pgoutput message other than Begin, Commit and Message.
    fn change(&mut self, data: Bytes) -> Result<(), SourceError> {
        let mut b = data;
        if b.is_empty() {
            return Ok(());
        }
        match b.get_u8() {
            b'R' => {
                let rel = parse_relation(&mut b).ok_or_else(|| {
                    SourceError::Transient("malformed pgoutput Relation message".into())
                })?;
                let found = self
                    .cfg
                    .outboxes
                    .iter()
                    .position(|o| o.database == rel.schema && o.table == rel.name);
                let r = match found {
                    Some(i) => Relation::Outbox {
                        mapping: TableMapping::new(i, &self.cfg.outboxes[i], &rel.columns),
                        mapper: i,
                        types: rel.types,
                    },
                    None => Relation::Other,
                };
                self.relations.insert(rel.id, Arc::new(r));
            }
            b'I' => {
                if b.remaining() < 5 {
                    return Err(SourceError::Transient(
                        "malformed pgoutput Insert message".into(),
                    ));
                }
                let id = b.get_u32();
                let _new = b.get_u8();
                let Some(rel) = self.relations.get(&id).cloned() else {
                    return Err(SourceError::Transient(format!(
                        "pgoutput Insert for relation {id} before its Relation message"
                    )));
                };
                let Relation::Outbox {
                    mapping,
                    mapper,
                    types,
                } = &*rel
                else {
                    return Ok(());
                };
                let values = parse_tuple(&mut b)
                    .ok_or_else(|| SourceError::Transient("malformed pgoutput tuple".into()))?;
                let row = TextRow { values, types };
                self.emit(mapping, *mapper, row);
            }
            // Type, Origin, Truncate, Update, Delete: nothing to relay.
            _ => {}
        }
        Ok(())
    }

    fn message(&mut self, content: Bytes) {
        let Some((mapper, mapping)) = &self.message else {
            return;
        };
        let values = message_values(&content);
        let txn = self.txn.get_or_insert(Txn { rows: 0 });
        txn.rows += 1;
        if self.replay_skip > 0 {
            self.replay_skip -= 1;
            return;
        }
        let result = match values {
            Ok(values) => mapper.map(
                mapping,
                TextRow { values, types: &[] },
                RowContext {
                    gtid: None,
                    at: &self.at_text,
                    at_header: header::LSN,
                    epoch: &self.epoch,
                },
            ),
            Err(reason) => Err(crate::outbox::BadRow {
                reason,
                id: None,
                key: None,
                value: Some(content.to_vec()),
            }),
        };
        self.out.push_back(SourceEvent::Row {
            table: mapping.name.clone(),
            result,
            at: self.at_text.clone(),
            gtid: None,
        });
    }

    fn emit(&mut self, mapping: &TableMapping, mapper: usize, row: TextRow<'_>) {
        if let Some(t) = self.txn.as_mut() {
            t.rows += 1;
        }
        if self.replay_skip > 0 {
            self.replay_skip -= 1;
            return;
        }
        let result = self.mappers[mapper].map(
            mapping,
            row,
            RowContext {
                gtid: None,
                at: &self.at_text,
                at_header: header::LSN,
                epoch: &self.epoch,
            },
        );
        self.out.push_back(SourceEvent::Row {
            table: mapping.name.clone(),
            result,
            at: self.at_text.clone(),
            gtid: None,
        });
    }
}

fn kind() -> Vec<(String, String)> {
    vec![("kind".to_string(), "postgres".to_string())]
}

/// A PostgreSQL timestamp (microseconds since 2000-01-01) as a time.
fn pg_system_time(pg_micros: i64) -> SystemTime {
    let unix = pg_micros + PG_EPOCH_SECS * 1_000_000;
    UNIX_EPOCH + Duration::from_micros(unix.max(0) as u64)
}

fn unix_secs(pg_micros: i64) -> u32 {
    (pg_micros / 1_000_000 + PG_EPOCH_SECS).clamp(0, u32::MAX as i64) as u32
}

/// A message's JSON object as the mapping's columns (`MESSAGE_COLUMNS`);
/// Debezium's names (`aggregatetype`, `aggregateid`, `type`) are accepted too.
fn message_values(content: &[u8]) -> Result<Vec<Option<Vec<u8>>>, String> {
    let v: serde_json::Value = serde_json::from_slice(content)
        .map_err(|e| format!("outbox message is not valid JSON: {e}"))?;
    let serde_json::Value::Object(mut m) = v else {
        return Err("outbox message must be a JSON object".into());
    };
    let aliases: [&[&str]; 6] = [
        &["id"],
        &["aggregate_type", "aggregatetype"],
        &["aggregate_id", "aggregateid"],
        &["event_type", "type"],
        &["payload"],
        &["headers"],
    ];
    Ok(aliases
        .iter()
        .map(|names| {
            names
                .iter()
                .find_map(|n| m.remove(*n))
                .and_then(|v| match v {
                    serde_json::Value::Null => None,
                    serde_json::Value::String(s) => Some(s.into_bytes()),
                    other => Some(other.to_string().into_bytes()),
                })
        })
        .collect())
}

/// A Relation message's parts.
struct RelationMsg {
    id: u32,
    schema: String,
    name: String,
    columns: Vec<String>,
    types: Vec<u32>,
}

fn cstr(b: &mut Bytes) -> Option<String> {
    let end = b.iter().position(|&c| c == 0)?;
    let s = String::from_utf8_lossy(&b[..end]).into_owned();
    b.advance(end + 1);
    Some(s)
}

fn parse_relation(b: &mut Bytes) -> Option<RelationMsg> {
    if b.remaining() < 4 {
        return None;
    }
    let id = b.get_u32();
    let schema = cstr(b)?;
    let name = cstr(b)?;
    if b.remaining() < 3 {
        return None;
    }
    let _identity = b.get_u8();
    let n = b.get_i16().max(0) as usize;
    let mut columns = Vec::with_capacity(n);
    let mut types = Vec::with_capacity(n);
    for _ in 0..n {
        if b.remaining() < 1 {
            return None;
        }
        let _flags = b.get_u8();
        columns.push(cstr(b)?);
        if b.remaining() < 8 {
            return None;
        }
        types.push(b.get_u32());
        let _typmod = b.get_i32();
    }
    Some(RelationMsg {
        id,
        schema,
        name,
        columns,
        types,
    })
}

/// TupleData in text form: NULL and unchanged TOAST values are None.
fn parse_tuple(b: &mut Bytes) -> Option<Vec<Option<Vec<u8>>>> {
    if b.remaining() < 2 {
        return None;
    }
    let n = b.get_i16().max(0) as usize;
    let mut values = Vec::with_capacity(n);
    for _ in 0..n {
        if b.remaining() < 1 {
            return None;
        }
        match b.get_u8() {
            b'n' | b'u' => values.push(None),
            b't' | b'b' => {
                if b.remaining() < 4 {
                    return None;
                }
                let len = b.get_i32().max(0) as usize;
                if b.remaining() < len {
                    return None;
                }
                values.push(Some(b.split_to(len).to_vec()));
            }
            _ => return None,
        }
    }
    Some(values)
}

/// A row in pgoutput's text form.
struct TextRow<'a> {
    values: Vec<Option<Vec<u8>>>,
    types: &'a [u32],
}

impl OutboxRow for TextRow<'_> {
    fn take_id(&mut self, i: usize) -> Option<String> {
        self.values
            .get_mut(i)?
            .take()
            .map(|v| String::from_utf8_lossy(&v).into_owned())
    }

    fn take_bytes(&mut self, i: usize) -> Option<Vec<u8>> {
        let v = self.values.get_mut(i)?.take()?;
        if self.types.get(i) == Some(&BYTEA) {
            return Some(decode_bytea(&v).unwrap_or(v));
        }
        Some(v)
    }
}

/// bytea's hex text form (`\x0aff…`) → bytes.
fn decode_bytea(text: &[u8]) -> Option<Vec<u8>> {
    let hex = text.strip_prefix(b"\\x")?;
    if hex.len() % 2 != 0 {
        return None;
    }
    hex.chunks(2)
        .map(|p| {
            let d = |c: u8| (c as char).to_digit(16);
            Some((d(p[0])? * 16 + d(p[1])?) as u8)
        })
        .collect()
}

impl source::Source for PgSource {
    type Opened = Opened;
    type HeadConn = tokio_postgres::Client;
    const NAME: &'static str = "postgres";

    async fn open(cfg: &Config) -> Result<Opened, SourceError> {
        let p = pg(cfg)?;
        let mut session = Session::connect(cfg, replication_config(p, &cfg.name)).await?;
        let version = preflight(&mut session, cfg).await?;
        info!(server = %version, slot = %p.slot(&cfg.name), publication = %p.publication(&cfg.name), "preflight passed");
        Ok(Opened { session })
    }

    async fn begin(
        cfg: Arc<Config>,
        opened: Opened,
        stored: Option<Position>,
        term: Arc<Leadership>,
        metrics: Metrics,
        durable: watch::Receiver<Option<Position>>,
    ) -> Result<(PgSource, Position), SourceError> {
        let p = pg(&cfg)?;
        let slot = p.slot(&cfg.name);
        let mut s = opened.session;
        if slot_state(&mut s, &slot).await?.is_none() {
            s.query(&format!(
                "SELECT pg_create_logical_replication_slot({}, 'pgoutput')",
                lit(&slot)
            ))
            .await
            .map_err(|e| {
                SourceError::Definite(format!("cannot create replication slot `{slot}`: {e}"))
            })?;
            info!(slot = %slot, "replication slot created");
        }
        end_stale_backend(&mut s, &slot).await?;
        let state = slot_state(&mut s, &slot)
            .await?
            .ok_or_else(|| SourceError::Transient(format!("replication slot `{slot}` vanished")))?;
        let confirmed = state.confirmed.unwrap_or_default();
        let start = match stored {
            Some(Position::Lsn(l)) => {
                if l.lsn < confirmed {
                    return Err(SourceError::Definite(format!(
                        "resume point {} is before replication slot `{slot}`'s confirmed position {confirmed}: \
                         the server released the transactions between (was the slot dropped and created again, \
                         or used by another consumer?). To accept the gap, delete the stored checkpoint",
                        l.lsn
                    )));
                }
                l
            }
            Some(other) => {
                return Err(SourceError::Definite(format!(
                "the stored checkpoint is a MySQL position ({}), and this relay reads PostgreSQL: \
                     relays of different databases need different names",
                other.short()
            )))
            }
            None => {
                info!(slot = %slot, position = %confirmed, "no checkpoint stored; starting at the slot's confirmed position");
                LsnPosition {
                    lsn: confirmed,
                    commit_ts: 0,
                }
            }
        };
        drop(s);
        let position = Position::Lsn(start.clone());
        let mut source = PgSource::new(cfg, start, term, metrics, durable)?;
        source.confirmed = confirmed;
        Ok((source, position))
    }

    async fn next(&mut self) -> Result<SourceEvent, SourceError> {
        self.read().await
    }

    async fn poll_head(
        cfg: &Config,
        conn: &mut Option<tokio_postgres::Client>,
    ) -> Result<ServerLog, SourceError> {
        let p = pg(cfg)?;
        if conn.as_ref().is_none_or(|c| c.is_closed()) {
            *conn = Some(status_session(cfg, p).await?);
        }
        let c = conn.as_ref().expect("connected above");
        let row = tokio::time::timeout(
            p.connect_timeout,
            c.query_one(
                "SELECT pg_current_wal_lsn()::text, (SELECT (pg_current_wal_lsn() - restart_lsn)::int8 \
                 FROM pg_replication_slots WHERE slot_name = $1)",
                &[&p.slot(&cfg.name)],
            ),
        )
        .await;
        let row = match row {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                *conn = None;
                return Err(SourceError::Transient(format!(
                    "PostgreSQL status query: {}",
                    pgsql::error_text(&e)
                )));
            }
            Err(_) => {
                *conn = None;
                return Err(SourceError::Transient(format!(
                    "PostgreSQL status query: no answer within {:?}",
                    p.connect_timeout
                )));
            }
        };
        let current = row
            .get::<_, Option<String>>(0)
            .and_then(|v| v.parse().ok())
            .unwrap_or_default();
        let retained = row.get::<_, Option<i64>>(1).map(|v| v.max(0) as u64);
        Ok(ServerLog::Wal { current, retained })
    }
}

/// A plain session for the status poll (no WAL sender), with the stream's
/// TLS settings.
async fn status_session(
    cfg: &Config,
    p: &PostgresConfig,
) -> Result<tokio_postgres::Client, SourceError> {
    let ca = match &p.tls.ca_file {
        Some(f) => Some((
            "postgres.tls.ca_file",
            std::fs::read(f).map_err(|e| {
                SourceError::Definite(format!("postgres.tls.ca_file {}: {e}", f.display()))
            })?,
        )),
        None => None,
    };
    pgsql::connect(&pgsql::Target {
        host: &p.host,
        port: p.port,
        user: &p.user,
        password: p.password.expose(),
        database: &p.database,
        application_name: &format!("outbox-relay {} status", cfg.name),
        tls: p.tls.mode,
        ca,
        connect_timeout: p.connect_timeout,
    })
    .await
    .map_err(SourceError::Transient)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytea_text_decodes() {
        assert_eq!(decode_bytea(b"\\x00ff41").unwrap(), vec![0, 255, b'A']);
        assert!(decode_bytea(b"\\x0").is_none());
        assert!(decode_bytea(b"plain").is_none());
    }

    #[test]
    fn relation_and_tuple_parse() {
        let mut r = Vec::new();
        r.extend_from_slice(&16384u32.to_be_bytes());
        r.extend_from_slice(b"public\0outbox\0");
        r.push(b'd');
        r.extend_from_slice(&2i16.to_be_bytes());
        for (name, oid) in [("id", 20u32), ("payload", BYTEA)] {
            r.push(1);
            r.extend_from_slice(name.as_bytes());
            r.push(0);
            r.extend_from_slice(&oid.to_be_bytes());
            r.extend_from_slice(&(-1i32).to_be_bytes());
        }
        let rel = parse_relation(&mut Bytes::from(r)).unwrap();
        assert_eq!(
            (rel.id, rel.schema.as_str(), rel.name.as_str()),
            (16384, "public", "outbox")
        );
        assert_eq!(rel.columns, ["id", "payload"]);
        assert_eq!(rel.types, [20, BYTEA]);

        let mut t = Vec::new();
        t.extend_from_slice(&3i16.to_be_bytes());
        t.push(b't');
        t.extend_from_slice(&2i32.to_be_bytes());
        t.extend_from_slice(b"42");
        t.push(b't');
        t.extend_from_slice(&4i32.to_be_bytes());
        t.extend_from_slice(b"\\x41");
        t.push(b'n');
        let values = parse_tuple(&mut Bytes::from(t.clone())).unwrap();
        let mut row = TextRow {
            values,
            types: &rel.types,
        };
        assert_eq!(row.take_id(0).as_deref(), Some("42"));
        assert_eq!(row.take_bytes(1), Some(b"A".to_vec()));
        assert_eq!(row.take_bytes(2), None);
        // Truncated input is refused, never a panic.
        for cut in 0..t.len() {
            let _ = parse_tuple(&mut Bytes::from(t[..cut].to_vec()));
        }
        assert!(parse_tuple(&mut Bytes::from(t[..t.len() - 2].to_vec())).is_none());
    }

    #[test]
    fn messages_take_our_names_and_debeziums() {
        let v = message_values(
            br#"{"id":"7","aggregatetype":"order","aggregateid":"o-1","type":"Created","payload":{"a":1}}"#,
        )
        .unwrap();
        assert_eq!(v[0].as_deref(), Some(&b"7"[..]));
        assert_eq!(v[1].as_deref(), Some(&b"order"[..]));
        assert_eq!(v[2].as_deref(), Some(&b"o-1"[..]));
        assert_eq!(v[3].as_deref(), Some(&b"Created"[..]));
        assert_eq!(v[4].as_deref(), Some(&br#"{"a":1}"#[..]));
        assert_eq!(v[5], None);
        assert!(message_values(b"[1]").unwrap_err().contains("JSON object"));
        assert!(message_values(b"{").unwrap_err().contains("not valid JSON"));
    }

    #[test]
    fn pg_time_is_unix_time() {
        // 2024-01-01T00:00:00.000250Z
        let pg = (1_704_067_200 - PG_EPOCH_SECS) * 1_000_000 + 250;
        assert_eq!(unix_secs(pg), 1_704_067_200);
        assert_eq!(
            pg_system_time(pg),
            UNIX_EPOCH + Duration::from_micros(1_704_067_200_000_250)
        );
    }

    #[test]
    fn commit_delay_is_measured_from_pg_time() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_micros() as i64
            - PG_EPOCH_SECS * 1_000_000;
        let d = seconds_since(pg_system_time(now - 2_000_000));
        assert!((2.0..2.5).contains(&d), "{d}");
        // A server clock ahead of the relay's gives 0, not a negative delay.
        assert_eq!(seconds_since(pg_system_time(now + 60_000_000)), 0.0);
    }
}
