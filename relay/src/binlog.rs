//! The binlog source: connect, preflight, resolve the start position, and
//! read committed outbox rows and commit positions from the binlog stream,
//! reconnecting (at the last commit) when the server goes away.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use mysql_async::binlog::events::{Event, EventData, OptionalMetadataField, RowsEventData};
use mysql_async::prelude::Queryable;
use mysql_async::{BinlogStream, BinlogStreamRequest, Conn, OptsBuilder, SslOpts};
use tokio::sync::watch;
use tracing::{debug, info};

use crate::changes::{ChangeContext, ChangeTable};
use crate::config::{Action, Config, MysqlConfig, OutboxConfig, TlsMode};
use crate::election::Leadership;
use crate::metrics::Metrics;
use crate::outage::{next_backoff, Outage, RETRY_FIRST};
use crate::outbox::{Mapper, RowContext, TableMapping};
use crate::position::{
    parse_mariadb_gtid_event, parse_mariadb_gtid_list_event, BinlogPosition, FilePos, Gtid,
    MariaGtid, MariaGtidList, MysqlGtidSet, Position, StartFrom,
};
use crate::rows::RowLayout;
use crate::source::{self, ServerLog, SourceError, SourceEvent};

/// Classifies a driver error: server-side refusals are definite, I/O is not.
fn classify(context: &str, e: mysql_async::Error) -> SourceError {
    use mysql_async::Error as E;
    match &e {
        E::Server(se) => match se.code {
            // Access denied, unknown database, no privilege.
            1044 | 1045 | 1049 | 1142 | 1227 | 1698 => {
                SourceError::Definite(format!("{context}: {e}"))
            }
            // Fatal error reading binlog: purged position, bad GTID state, ...
            1236 => SourceError::Definite(format!(
                "{context}: {e}. The resume point is no longer in the server's binlog; \
                 events after it may be lost. Set start_from to a position the server still \
                 has (`earliest`, `latest`, `gtid:...`, `file:...`) and delete the stored checkpoint \
                 to accept the gap, or restore the binlogs"
            )),
            // Server shutting down / connection killed: retry.
            _ => SourceError::Transient(format!("{context}: {e}")),
        },
        E::Io(mysql_async::IoError::Tls(_)) => SourceError::Definite(format!("{context}: {e}")),
        _ => SourceError::Transient(format!("{context}: {e}")),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    MariaDb,
    MySql,
}

/// What preflight learned of the server.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    pub flavor: Flavor,
    pub version: String,
    /// Events carry CRC32 checksums (the fake Rotate's name then has 4 extra bytes).
    pub checksum: bool,
    /// MySQL `gtid_mode=ON`; MariaDB always has GTIDs.
    pub gtid: bool,
    /// `@@server_id`: the server whose binlog offsets a checkpoint holds.
    pub server_id: u32,
}

pub fn mysql_opts(cfg: &MysqlConfig) -> Result<mysql_async::Opts, SourceError> {
    let mut b = OptsBuilder::default()
        .ip_or_hostname(cfg.host.clone())
        .tcp_port(cfg.port)
        .user(Some(cfg.user.clone()))
        .prefer_socket(false)
        .tcp_keepalive(Some(Duration::from_secs(30)))
        .stmt_cache_size(0);
    if !cfg.password.is_empty() {
        b = b.pass(Some(cfg.password.expose().to_owned()));
    }
    let ssl = match cfg.tls.mode {
        TlsMode::Disabled => None,
        TlsMode::Require => Some(
            SslOpts::default()
                .with_danger_accept_invalid_certs(true)
                .with_danger_skip_domain_validation(true),
        ),
        TlsMode::VerifyCa | TlsMode::VerifyFull => {
            let ca = cfg.tls.ca_file.clone().ok_or_else(|| {
                SourceError::Definite("mysql.tls.ca_file is required to verify the server".into())
            })?;
            Some(
                SslOpts::default()
                    .with_root_certs(vec![ca.into()])
                    .with_danger_skip_domain_validation(cfg.tls.mode == TlsMode::VerifyCa),
            )
        }
    };
    b = b.ssl_opts(ssl);
    Ok(b.into())
}

/// Connects with the configured timeout.
pub async fn connect(cfg: &MysqlConfig) -> Result<Conn, SourceError> {
    let opts = mysql_opts(cfg)?;
    let what = format!("connecting to MySQL at {}:{}", cfg.host, cfg.port);
    match tokio::time::timeout(cfg.connect_timeout, Conn::new(opts)).await {
        Ok(r) => r.map_err(|e| classify(&what, e)),
        Err(_) => Err(SourceError::Transient(format!(
            "{what}: no answer within {:?}",
            cfg.connect_timeout
        ))),
    }
}

async fn var(conn: &mut Conn, name: &str) -> Result<Option<String>, SourceError> {
    // SHOW VARIABLES answers with no row (not an error) for unknown variables.
    let q = format!("SHOW GLOBAL VARIABLES LIKE '{name}'");
    let row: Option<(String, String)> = conn
        .query_first(q)
        .await
        .map_err(|e| classify("reading server variables", e))?;
    Ok(row.map(|(_, v)| v))
}

/// Checks the server settings the relay needs and the outbox tables. Each
/// failure is one definite error naming the setting and the fix.
pub async fn preflight(conn: &mut Conn, cfg: &Config) -> Result<ServerInfo, SourceError> {
    let version: String = conn
        .query_first("SELECT VERSION()")
        .await
        .map_err(|e| classify("reading server version", e))?
        .unwrap_or_default();
    let flavor = if version.to_ascii_lowercase().contains("mariadb") {
        Flavor::MariaDb
    } else {
        Flavor::MySql
    };
    let need = |name: &str, want: &str, got: Option<String>, fix: &str| {
        let got = got.unwrap_or_else(|| "<not set>".into());
        if got.eq_ignore_ascii_case(want) {
            Ok(())
        } else {
            Err(SourceError::Definite(format!(
                "preflight: server setting {name} is {got}, the relay needs {want}. {fix}"
            )))
        }
    };
    need(
        "log_bin",
        "ON",
        var(conn, "log_bin").await?,
        "Start the server with --log-bin.",
    )?;
    need(
        "binlog_format",
        "ROW",
        var(conn, "binlog_format").await?,
        "Set binlog_format=ROW (SET GLOBAL binlog_format='ROW' and in the server config).",
    )?;
    need(
        "binlog_row_image",
        "FULL",
        var(conn, "binlog_row_image").await?,
        "Set binlog_row_image=FULL.",
    )?;
    let meta = var(conn, "binlog_row_metadata").await?;
    if meta.is_none() {
        return Err(SourceError::Definite(format!(
            "preflight: server {version} has no binlog_row_metadata setting; the relay needs column \
             names in the binlog (MySQL 8.0.1+ or MariaDB 10.5+ with binlog_row_metadata=FULL)"
        )));
    }
    need(
        "binlog_row_metadata",
        "FULL",
        meta,
        "Set binlog_row_metadata=FULL so the binlog carries column names.",
    )?;
    if flavor == Flavor::MariaDb {
        need(
            "log_bin_compress",
            "OFF",
            var(conn, "log_bin_compress").await?.or(Some("OFF".into())),
            "Compressed binlog events cannot be decoded; set log_bin_compress=OFF.",
        )?;
    }
    let checksum = var(conn, "binlog_checksum")
        .await?
        .is_some_and(|v| !v.eq_ignore_ascii_case("NONE"));
    let gtid = match flavor {
        Flavor::MariaDb => true,
        Flavor::MySql => var(conn, "gtid_mode")
            .await?
            .is_some_and(|v| v.eq_ignore_ascii_case("ON")),
    };
    let server_id = var(conn, "server_id")
        .await?
        .and_then(|v| v.parse().ok())
        .unwrap_or_default();
    for (i, o) in cfg.outboxes.iter().enumerate() {
        check_table(conn, i, o).await?;
    }
    for name in cfg.changes.iter().flat_map(|c| c.tables.keys()) {
        let (db, table) = name.split_once('.').unwrap_or((name, ""));
        let found: Option<String> = conn
            .exec_first(
                "SELECT TABLE_NAME FROM information_schema.TABLES \
                 WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ?",
                (db, table),
            )
            .await
            .map_err(|e| classify("looking up the captured tables", e))?;
        if found.is_none() {
            return Err(SourceError::Definite(format!(
                "preflight: changes.tables.\"{name}\": table {name} does not exist (or the \
                 relay's user cannot see it: grant it SELECT on the table)"
            )));
        }
    }
    Ok(ServerInfo {
        flavor,
        version,
        checksum,
        gtid,
        server_id,
    })
}

async fn check_table(conn: &mut Conn, i: usize, o: &OutboxConfig) -> Result<(), SourceError> {
    let cols: Vec<String> = conn
        .exec(
            "SELECT COLUMN_NAME FROM information_schema.COLUMNS \
             WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION",
            (o.database.as_str(), o.table.as_str()),
        )
        .await
        .map_err(|e| classify("reading the outbox table's columns", e))?;
    if cols.is_empty() {
        return Err(SourceError::Definite(format!(
            "preflight: outbox[{i}]: table {}.{} does not exist (or the relay's user cannot see it: \
             grant it SELECT on the table)",
            o.database, o.table
        )));
    }
    let c = &o.columns;
    for (field, name) in [
        ("id", &c.id),
        ("aggregate_type", &c.aggregate_type),
        ("aggregate_id", &c.aggregate_id),
        ("event_type", &c.event_type),
        ("payload", &c.payload),
    ] {
        if !cols.iter().any(|x| x.eq_ignore_ascii_case(name)) {
            return Err(SourceError::Definite(format!(
                "preflight: outbox[{i}].columns.{field}: column `{name}` is not in {}.{} (its columns: {})",
                o.database,
                o.table,
                cols.join(", ")
            )));
        }
    }
    Ok(())
}

/// `SHOW MASTER STATUS`: the server's current binlog head.
pub async fn head(conn: &mut Conn) -> Result<FilePos, SourceError> {
    let row: Option<mysql_async::Row> = conn
        .query_first("SHOW MASTER STATUS")
        .await
        .map_err(|e| classify("reading SHOW MASTER STATUS", e))?;
    let row = row.ok_or_else(|| {
        SourceError::Definite("SHOW MASTER STATUS is empty: binary logging is off".into())
    })?;
    let file: String = row.get(0).unwrap_or_default();
    let pos: u64 = row.get(1).unwrap_or_default();
    Ok(FilePos { file, pos })
}

pub async fn binary_logs(conn: &mut Conn) -> Result<Vec<(String, u64)>, SourceError> {
    let rows: Vec<mysql_async::Row> = conn
        .query("SHOW BINARY LOGS")
        .await
        .map_err(|e| classify("reading SHOW BINARY LOGS", e))?;
    Ok(rows
        .into_iter()
        .map(|r| (r.get(0).unwrap_or_default(), r.get(1).unwrap_or_default()))
        .collect())
}

/// The GTID state at the start of the oldest binlog the server has (MariaDB:
/// its Gtid_list event): transactions before it are gone.
async fn mariadb_oldest_state(
    conn: &mut Conn,
    first_file: &str,
) -> Result<MariaGtidList, SourceError> {
    let rows: Vec<mysql_async::Row> = conn
        .query(format!("SHOW BINLOG EVENTS IN '{first_file}' LIMIT 4"))
        .await
        .map_err(|e| classify("reading SHOW BINLOG EVENTS", e))?;
    for r in rows {
        let kind: String = r.get(2).unwrap_or_default();
        if kind.eq_ignore_ascii_case("Gtid_list") {
            let info: String = r.get(5).unwrap_or_default();
            let list = info.trim().trim_start_matches('[').trim_end_matches(']');
            return list
                .parse()
                .map_err(|e| SourceError::Definite(format!("reading the oldest Gtid_list: {e}")));
        }
    }
    Ok(MariaGtidList::default())
}

/// Where to start when no checkpoint exists.
pub async fn resolve_start(
    conn: &mut Conn,
    info: &ServerInfo,
    start: &StartFrom,
) -> Result<BinlogPosition, SourceError> {
    match start {
        StartFrom::Latest => {
            let file = head(conn).await?;
            let gtid = current_gtid(conn, info).await?;
            Ok(BinlogPosition {
                gtid,
                file,
                commit_ts: 0,
                server_id: Some(info.server_id),
            })
        }
        StartFrom::Earliest => {
            let logs = binary_logs(conn).await?;
            let first = logs.first().ok_or_else(|| {
                SourceError::Definite("SHOW BINARY LOGS is empty: binary logging is off".into())
            })?;
            // Start by file; the GTID state is learned from the file's Gtid_list.
            Ok(BinlogPosition {
                gtid: None,
                file: FilePos {
                    file: first.0.clone(),
                    pos: 4,
                },
                commit_ts: 0,
                server_id: Some(info.server_id),
            })
        }
        StartFrom::Gtid(g) => Ok(BinlogPosition {
            gtid: Some(g.clone()),
            file: FilePos {
                file: String::new(),
                pos: 4,
            },
            commit_ts: 0,
            server_id: None,
        }),
        StartFrom::File(f) => Ok(BinlogPosition {
            gtid: None,
            file: f.clone(),
            commit_ts: 0,
            server_id: None,
        }),
    }
}

async fn current_gtid(conn: &mut Conn, info: &ServerInfo) -> Result<Option<Gtid>, SourceError> {
    match info.flavor {
        Flavor::MariaDb => {
            let v: Option<String> = conn
                .query_first("SELECT @@GLOBAL.gtid_binlog_pos")
                .await
                .map_err(|e| classify("reading gtid_binlog_pos", e))?;
            let l: MariaGtidList = v
                .unwrap_or_default()
                .parse()
                .map_err(|e| SourceError::Definite(format!("server's gtid_binlog_pos: {e}")))?;
            Ok(Some(Gtid::MariaDb(l)))
        }
        Flavor::MySql if info.gtid => {
            let v: Option<String> = conn
                .query_first("SELECT @@GLOBAL.gtid_executed")
                .await
                .map_err(|e| classify("reading gtid_executed", e))?;
            let s: MysqlGtidSet = v
                .unwrap_or_default()
                .replace('\n', "")
                .parse()
                .map_err(|e| SourceError::Definite(format!("server's gtid_executed: {e}")))?;
            Ok(Some(Gtid::MySql(s)))
        }
        Flavor::MySql => Ok(None),
    }
}

/// Refuses a resume point the server no longer has, naming the lost range.
pub async fn check_resume_point(
    conn: &mut Conn,
    info: &ServerInfo,
    pos: &BinlogPosition,
) -> Result<(), SourceError> {
    let recover = "To accept the gap, delete the stored checkpoint and set start_from \
                   (`earliest`, `latest`, `gtid:...`, `file:...`); to avoid it, restore the binlogs.";
    let logs = binary_logs(conn).await?;
    let Some(first) = logs.first() else {
        return Err(SourceError::Definite(
            "SHOW BINARY LOGS is empty: binary logging is off".into(),
        ));
    };
    match (&pos.gtid, info.flavor) {
        (Some(Gtid::MariaDb(ours)), Flavor::MariaDb) if !ours.is_empty() => {
            let oldest = mariadb_oldest_state(conn, &first.0).await?;
            // Every domain the server had before its oldest binlog must be
            // covered by our position, or transactions between are gone.
            for o in oldest.iter() {
                let have = ours.get(o.domain).map_or(0, |g| g.seq);
                if have < o.seq {
                    return Err(SourceError::Definite(format!(
                        "resume point {} is no longer in the server's binlog: transactions of \
                         domain {} after seq {} up to {} were purged (oldest binlog is {}). {recover}",
                        pos.short(),
                        o.domain,
                        have,
                        o.seq,
                        first.0
                    )));
                }
            }
            Ok(())
        }
        (Some(Gtid::MySql(_)), _) => {
            // MySQL answers a purged GTID request with error 1236, which is
            // reported as definite when the stream opens.
            Ok(())
        }
        _ => {
            if pos.file.file.is_empty() {
                return Ok(());
            }
            match logs.iter().find(|(f, _)| *f == pos.file.file) {
                Some((_, size)) if pos.file.pos <= *size => Ok(()),
                Some((_, size)) => Err(SourceError::Definite(format!(
                    "resume point {} is past the end of {} ({} bytes). {recover}",
                    pos.file, pos.file.file, size
                ))),
                None => Err(SourceError::Definite(format!(
                    "resume point {} is no longer in the server's binlog: {} was purged \
                     (oldest binlog is {}); events from {} to the start of {} are lost. {recover}",
                    pos.file, pos.file.file, first.0, pos.file, first.0
                ))),
            }
        }
    }
}

/// Whether a MariaDB checkpoint may resume at its binlog offset instead of
/// its GTID, whose lookup reads the current binlog file from its start
/// (~0.75 ms per MB on MariaDB 10.11, before the first event). The offset is
/// trusted only where this server proves it: the checkpoint was taken on this
/// server id, and the event at the offset is the GTID of the transaction that
/// follows the checkpoint's in its domain — or nothing follows yet, the offset
/// is this server's binlog head and its GTID state is the checkpoint's. Any
/// doubt (another server, binlogs reset or purged, an offset inside an event)
/// is a reason to resume by GTID.
async fn offset_proven(
    conn: &mut Conn,
    info: &ServerInfo,
    pos: &BinlogPosition,
    ours: &MariaGtidList,
) -> Result<(), String> {
    if pos.server_id != Some(info.server_id) {
        return Err(match pos.server_id {
            Some(id) => format!(
                "the checkpoint is of server id {id}, this server is {}",
                info.server_id
            ),
            None => "the checkpoint does not name its server".into(),
        });
    }
    let file = &pos.file.file;
    if file.is_empty()
        || !file
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    {
        return Err(format!("binlog file name `{file}` is not one to look up"));
    }
    let rows: Vec<mysql_async::Row> = conn
        .query(format!(
            "SHOW BINLOG EVENTS IN '{file}' FROM {} LIMIT 3",
            pos.file.pos
        ))
        .await
        .map_err(|e| format!("no event at the offset: {e}"))?;
    let next = rows.iter().find_map(|r| {
        let kind: String = r.get(2).unwrap_or_default();
        (!kind.eq_ignore_ascii_case("Binlog_checkpoint"))
            .then(|| (kind, r.get::<String, _>(5).unwrap_or_default()))
    });
    if let Some((kind, text)) = next {
        if !kind.eq_ignore_ascii_case("Gtid") {
            return Err(format!("the event at the offset is {kind}, not a GTID"));
        }
        let gtid: MariaGtid = text
            .split_whitespace()
            .last()
            .unwrap_or_default()
            .parse()
            .map_err(|e| format!("the GTID event at the offset: {e}"))?;
        return match ours.get(gtid.domain) {
            Some(o) if o.seq.checked_add(1) == Some(gtid.seq) => Ok(()),
            _ => Err(format!(
                "the transaction at the offset is {gtid}, not the one after {ours}"
            )),
        };
    }
    let head = head(conn).await.map_err(|e| e.to_string())?;
    if head != pos.file {
        return Err(format!(
            "nothing at the offset, and the binlog head is {head}"
        ));
    }
    match current_gtid(conn, info).await.map_err(|e| e.to_string())? {
        Some(Gtid::MariaDb(state)) if state == *ours => Ok(()),
        other => Err(format!(
            "the binlog head's GTID state is {}, not {ours}",
            other.map(|g| g.to_string()).unwrap_or_default()
        )),
    }
}

#[derive(Debug, Default)]
struct Txn {
    /// Header text of the transaction's GTID (shared by its rows).
    gtid_text: Option<Arc<str>>,
    maria: Option<MariaGtid>,
    mysql: Option<([u8; 16], u64)>,
    /// Inside BEGIN ... COMMIT/XID (a MariaDB GTID opens it unless standalone);
    /// a statement outside is a group of its own (DDL).
    open: bool,
    /// Outbox rows emitted so far.
    rows: usize,
}

// MariaDB event types mysql_common does not know.
const MARIA_ANNOTATE_ROWS: u8 = 160;
const MARIA_BINLOG_CHECKPOINT: u8 = 161;
const MARIA_GTID: u8 = 162;
const MARIA_GTID_LIST: u8 = 163;
const MARIA_START_ENCRYPTION: u8 = 164;
const MARIA_QUERY_COMPRESSED: u8 = 165;
const MARIA_ROWS_COMPRESSED_FIRST: u8 = 166;
const MARIA_ROWS_COMPRESSED_LAST: u8 = 171;

/// A configured table as the binlog describes it.
enum Captured {
    /// An outbox table: inserted rows become records.
    Outbox {
        mapping: TableMapping,
        layout: RowLayout,
    },
    /// A plain table: its changes become change events.
    Changes(ChangeTable),
}

/// An open binlog stream and the transaction being read.
struct Reader {
    stream: BinlogStream,
    file: String,
    gtid: Option<Gtid>,
    txn: Option<Txn>,
    tables: HashMap<u64, Option<Arc<Captured>>>,
    checksum: bool,
    seen_fde: bool,
}

/// Reads committed outbox rows; reconnects at the last commit on transient errors.
pub struct BinlogSource {
    cfg: Arc<Config>,
    info: ServerInfo,
    mappers: Vec<Mapper>,
    epoch: String,
    metrics: Metrics,
    /// Last commit read: where a reconnect resumes.
    committed: BinlogPosition,
    reader: Option<Reader>,
    out: VecDeque<SourceEvent>,
    /// Rows of the interrupted transaction already emitted before a reconnect:
    /// skipped when it is read again, so a reconnect adds no duplicates.
    replay_skip: usize,
    /// Commits of transactions without outbox rows are reported at most this
    /// often; one held back is reported at the next heartbeat.
    last_idle_commit: Instant,
    unreported_commit: bool,
    /// The server's availability, logged once per change.
    outage: Outage,
}

const IDLE_COMMIT_EVERY: Duration = Duration::from_millis(200);

impl BinlogSource {
    pub fn new(
        cfg: Arc<Config>,
        info: ServerInfo,
        start: BinlogPosition,
        epoch: u64,
        metrics: Metrics,
    ) -> Result<BinlogSource, SourceError> {
        let max = cfg.max_message_bytes();
        let mappers = cfg
            .outboxes
            .iter()
            .map(|o| Mapper::new(o, max))
            .collect::<Result<Vec<_>, _>>()
            .map_err(SourceError::Definite)?;
        Ok(BinlogSource {
            cfg,
            info,
            mappers,
            epoch: epoch.to_string(),
            metrics,
            committed: start,
            reader: None,
            out: VecDeque::new(),
            replay_skip: 0,
            last_idle_commit: Instant::now(),
            unreported_commit: false,
            outage: Outage::new("mysql"),
        })
    }

    /// The next event. Transient errors reconnect with backoff (forever,
    /// logging the outage's start and end); definite errors are returned.
    async fn read(&mut self) -> Result<SourceEvent, SourceError> {
        let mut backoff = RETRY_FIRST;
        loop {
            if let Some(ev) = self.out.pop_front() {
                return Ok(ev);
            }
            if self.reader.is_none() {
                match self.open().await {
                    Ok(r) => {
                        self.metrics.streaming.set(1);
                        self.reader = Some(r);
                        self.outage.recovered();
                        backoff = RETRY_FIRST;
                    }
                    Err(e) if e.is_transient() => {
                        self.outage.failed("cannot open the binlog stream", &e);
                        self.metrics.errors.get_or_create(&kind("mysql")).inc();
                        tokio::time::sleep(backoff).await;
                        backoff = next_backoff(backoff);
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            match self.step().await {
                Ok(()) => {}
                Err(e) if e.is_transient() => {
                    self.metrics.streaming.set(0);
                    self.metrics.reconnects.inc();
                    self.metrics.errors.get_or_create(&kind("mysql")).inc();
                    let interrupted = self.reader.take().and_then(|r| r.txn).map_or(0, |t| t.rows);
                    self.replay_skip += interrupted;
                    // Rows already queued in `out` were emitted to nobody yet:
                    // drop them, they are read again.
                    let queued_rows = self
                        .out
                        .iter()
                        .filter(|e| matches!(e, SourceEvent::Row { .. }))
                        .count();
                    self.replay_skip -= queued_rows.min(self.replay_skip);
                    self.out.clear();
                    self.outage.failed(
                        &format!(
                            "binlog stream lost; reconnecting at {}",
                            self.committed.short()
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

    async fn open(&mut self) -> Result<Reader, SourceError> {
        let mysql = mysql(&self.cfg)?;
        let mut conn = connect(mysql).await?;
        let heartbeat_ns = mysql.heartbeat.as_nanos().min(u64::MAX as u128) as u64;
        let mut setup = vec![format!("SET @master_heartbeat_period = {heartbeat_ns}")];
        let pos = &self.committed;
        // Why a MariaDB GTID position is not resumed at its offset.
        let mut offset_refused = None;
        let mariadb_gtid = match (&pos.gtid, self.info.flavor) {
            (Some(Gtid::MariaDb(l)), Flavor::MariaDb) => {
                match offset_proven(&mut conn, &self.info, pos, l).await {
                    Ok(()) => None,
                    Err(why) => {
                        offset_refused = Some(why);
                        Some(l.to_string())
                    }
                }
            }
            _ => None,
        };
        if self.info.flavor == Flavor::MariaDb {
            setup.push("SET @mariadb_slave_capability = 4".into());
            if let Some(state) = &mariadb_gtid {
                setup.push(format!("SET @slave_connect_state = '{state}'"));
                setup.push("SET @slave_gtid_strict_mode = 0".into());
                setup.push("SET @slave_gtid_ignore_duplicates = 0".into());
            }
        }
        for q in setup {
            conn.query_drop(q)
                .await
                .map_err(|e| classify("preparing the binlog stream", e))?;
        }
        let server_id = self.cfg.server_id();
        let file = pos.file.file.clone();
        let stream = match (&pos.gtid, &mariadb_gtid) {
            (_, Some(_)) => {
                conn.get_binlog_stream(BinlogStreamRequest::new(server_id))
                    .await
            }
            (Some(Gtid::MySql(set)), None) if !set.is_empty() => {
                let sids = mysql_sids(set);
                conn.get_binlog_stream(
                    BinlogStreamRequest::new(server_id)
                        .with_gtid()
                        .with_gtid_set(sids),
                )
                .await
            }
            _ => {
                conn.get_binlog_stream(
                    BinlogStreamRequest::new(server_id)
                        .with_filename(file.as_bytes())
                        .with_pos(pos.file.pos),
                )
                .await
            }
        }
        .map_err(|e| classify("requesting the binlog stream", e))?;
        let by = match &pos.gtid {
            Some(Gtid::MySql(set)) if !set.is_empty() => "gtid",
            _ if mariadb_gtid.is_some() => "gtid",
            _ => "offset",
        };
        info!(
            position = %pos.short(),
            file = %pos.file,
            by,
            offset_refused = offset_refused.as_deref(),
            server_id,
            "binlog stream opened"
        );
        Ok(Reader {
            stream,
            file: pos.file.file.clone(),
            gtid: pos.gtid.clone(),
            txn: None,
            tables: HashMap::new(),
            checksum: self.info.checksum,
            seen_fde: false,
        })
    }

    /// Reads one binlog event and queues what it produced.
    async fn step(&mut self) -> Result<(), SourceError> {
        let timeout = mysql(&self.cfg)?.heartbeat * 3;
        let reader = self.reader.as_mut().expect("reader is open");
        let ev = match tokio::time::timeout(timeout, reader.stream.next()).await {
            Err(_) => {
                return Err(SourceError::Transient(format!(
                    "no binlog event or heartbeat for {timeout:?}"
                )))
            }
            Ok(None) => {
                return Err(SourceError::Transient(
                    "the server closed the binlog stream (restart?)".into(),
                ))
            }
            Ok(Some(Err(e))) => return Err(classify("reading the binlog", e)),
            Ok(Some(Ok(ev))) => ev,
        };
        self.handle(ev)
    }

    fn handle(&mut self, ev: Event) -> Result<(), SourceError> {
        let header = ev.header();
        let raw_type = header.event_type_raw();
        let log_pos = header.log_pos() as u64;
        let data = ev.read_data().map_err(|e| {
            SourceError::Definite(format!(
                "cannot decode binlog event {raw_type} at {}:{log_pos}: {e}",
                self.reader_file()
            ))
        })?;
        let Some(data) = data else {
            return self.handle_unknown(raw_type, &ev, log_pos);
        };
        match data {
            EventData::RotateEvent(r) => {
                let reader = self.reader.as_mut().expect("reader is open");
                let mut name = r.name_raw().to_vec();
                // The artificial Rotate (log_pos 0) that opens a stream precedes
                // the format description, so its checksum was not stripped.
                if log_pos == 0 && !reader.seen_fde && reader.checksum && name.len() > 4 {
                    name.truncate(name.len() - 4);
                }
                reader.file = String::from_utf8_lossy(&name).into_owned();
                debug!(file = %reader.file, pos = r.position(), log_pos, seen_fde = reader.seen_fde, checksum = reader.checksum, "rotate");
            }
            EventData::FormatDescriptionEvent(_) => {
                self.reader.as_mut().expect("reader is open").seen_fde = true;
            }
            EventData::GtidEvent(g) => {
                let uuid = g.sid();
                let gno = g.gno();
                let reader = self.reader.as_mut().expect("reader is open");
                reader.txn = Some(Txn {
                    gtid_text: Some(Arc::from(format!(
                        "{}:{gno}",
                        crate::position::format_uuid(&uuid)
                    ))),
                    mysql: Some((uuid, gno)),
                    ..Txn::default()
                });
            }
            EventData::QueryEvent(q) => {
                let query = q.query();
                let trimmed = query.trim();
                let reader = self.reader.as_mut().expect("reader is open");
                if trimmed.eq_ignore_ascii_case("BEGIN") {
                    reader.txn.get_or_insert_with(Txn::default).open = true;
                } else if trimmed.eq_ignore_ascii_case("COMMIT") {
                    self.commit(log_pos, header.timestamp());
                } else {
                    // DDL and other statements: a group of its own. Table ids
                    // may change after DDL; the next table map rebuilds them.
                    if !reader.txn.as_ref().is_some_and(|t| t.open) {
                        self.commit(log_pos, header.timestamp());
                    }
                }
            }
            EventData::TableMapEvent(tme) => {
                let mapping = self.mapping_for(&tme)?;
                let reader = self.reader.as_mut().expect("reader is open");
                reader.tables.insert(tme.table_id(), mapping);
            }
            EventData::RowsEvent(rows) => self.handle_rows(rows, log_pos, header.timestamp())?,
            EventData::XidEvent(_) => self.commit(log_pos, header.timestamp()),
            // The server is idle: report a commit held back by coalescing, so
            // the checkpoint reaches the head.
            EventData::HeartbeatEvent if self.unreported_commit => {
                self.unreported_commit = false;
                self.last_idle_commit = Instant::now();
                self.out.push_back(SourceEvent::Commit {
                    position: Position::Binlog(self.committed.clone()),
                    rows: 0,
                    committed_at: None,
                });
            }
            EventData::TransactionPayloadEvent(_) => {
                // MySQL compressed transaction: the stream yields its events next.
            }
            _ => {}
        }
        Ok(())
    }

    fn reader_file(&self) -> &str {
        self.reader.as_ref().map_or("", |r| r.file.as_str())
    }

    fn handle_unknown(
        &mut self,
        raw_type: u8,
        ev: &Event,
        log_pos: u64,
    ) -> Result<(), SourceError> {
        let file = self.reader_file().to_owned();
        let reader = self.reader.as_mut().expect("reader is open");
        match raw_type {
            MARIA_GTID => {
                let (g, flags) = parse_mariadb_gtid_event(ev.data(), ev.header().server_id())
                    .ok_or_else(|| {
                        SourceError::Definite(format!(
                            "malformed MariaDB GTID event at {file}:{log_pos}"
                        ))
                    })?;
                reader.txn = Some(Txn {
                    gtid_text: Some(Arc::from(g.to_string())),
                    maria: Some(g),
                    // FL_STANDALONE: a DDL statement without BEGIN/COMMIT.
                    open: flags & 1 == 0,
                    ..Txn::default()
                });
            }
            MARIA_GTID_LIST => {
                // The GTID state at this point of the binlog (start of a file):
                // learn it when we started by file position.
                if reader.txn.is_none() {
                    if let Some(list) = parse_mariadb_gtid_list_event(ev.data()) {
                        let mut merged = match reader.gtid.take() {
                            Some(Gtid::MariaDb(l)) => l,
                            _ => MariaGtidList::default(),
                        };
                        for g in list.iter() {
                            if merged.get(g.domain).is_none_or(|m| m.seq < g.seq) {
                                merged.advance(*g);
                            }
                        }
                        reader.gtid = Some(Gtid::MariaDb(merged));
                    }
                }
            }
            MARIA_ANNOTATE_ROWS | MARIA_BINLOG_CHECKPOINT | MARIA_START_ENCRYPTION => {}
            MARIA_QUERY_COMPRESSED => {
                // A compressed DDL statement: ends a standalone group.
                if !reader.txn.as_ref().is_some_and(|t| t.open) {
                    self.commit(log_pos, ev.header().timestamp());
                }
            }
            MARIA_ROWS_COMPRESSED_FIRST..=MARIA_ROWS_COMPRESSED_LAST => {
                return Err(SourceError::Definite(format!(
                    "compressed row event (type {raw_type}) at {file}:{log_pos}: the server writes \
                     compressed binlog events (log_bin_compress=ON), which the relay cannot decode. \
                     Set log_bin_compress=OFF; rows in compressed events must be re-sent by hand"
                )));
            }
            other if reader.txn.is_some() => {
                return Err(SourceError::Definite(format!(
                    "unknown binlog event type {other} inside a transaction at {file}:{log_pos}; \
                     refusing to skip it"
                )));
            }
            other => debug!(
                event_type = other,
                "ignoring unknown binlog event outside a transaction"
            ),
        }
        Ok(())
    }

    fn mapping_for(
        &self,
        tme: &mysql_async::binlog::events::TableMapEvent<'_>,
    ) -> Result<Option<Arc<Captured>>, SourceError> {
        let db = tme.database_name();
        let table = tme.table_name();
        let outbox = self
            .cfg
            .outboxes
            .iter()
            .position(|o| o.database == db && o.table == table);
        let changes = self
            .cfg
            .changes
            .as_ref()
            .filter(|c| outbox.is_none() && c.table(&db, &table).is_some());
        if outbox.is_none() && changes.is_none() {
            return Ok(None);
        }
        let mut names = Vec::new();
        for field in tme.iter_optional_meta() {
            if let Ok(OptionalMetadataField::ColumnName(cn)) = field {
                for n in cn.iter_names() {
                    let n = n.map_err(|e| {
                        SourceError::Definite(format!(
                            "cannot read column names of {db}.{table}: {e}"
                        ))
                    })?;
                    names.push(n.name().into_owned());
                }
            }
        }
        if names.is_empty() {
            return Err(SourceError::Definite(format!(
                "the binlog has no column names for {db}.{table}: the server's binlog_row_metadata \
                 is not FULL (it was changed after start?). Set binlog_row_metadata=FULL"
            )));
        }
        let Some(idx) = outbox else {
            let max = self.cfg.max_message_bytes();
            return changes
                .and_then(|c| ChangeTable::new(tme, &names, c, max).transpose())
                .transpose()
                .map(|t| t.map(|t| Arc::new(Captured::Changes(t))))
                .map_err(|e| {
                    SourceError::Definite(format!(
                        "the table map of {db}.{table} is unreadable: {e}"
                    ))
                });
        };
        let mapping = TableMapping::new(idx, &self.cfg.outboxes[idx], &names);
        let layout = RowLayout::new(tme, &names, |i| mapping.uses(i)).map_err(|e| {
            SourceError::Definite(format!("the table map of {db}.{table} is unreadable: {e}"))
        })?;
        Ok(Some(Arc::new(Captured::Outbox { mapping, layout })))
    }

    fn handle_rows(
        &mut self,
        rows: RowsEventData<'_>,
        log_pos: u64,
        time: u32,
    ) -> Result<(), SourceError> {
        let reader = self.reader.as_mut().expect("reader is open");
        let table_id = rows.table_id();
        let Some(Some(captured)) = reader.tables.get(&table_id).cloned() else {
            return Ok(());
        };
        let (mapping, layout) = match captured.as_ref() {
            Captured::Outbox { mapping, layout } => (mapping, layout),
            Captured::Changes(t) => return self.handle_changes(t, rows, log_pos, time),
        };
        let kind = match &rows {
            RowsEventData::WriteRowsEvent(_) | RowsEventData::WriteRowsEventV1(_) => None,
            RowsEventData::UpdateRowsEvent(_)
            | RowsEventData::UpdateRowsEventV1(_)
            | RowsEventData::PartialUpdateRowsEvent(_) => Some("update"),
            RowsEventData::DeleteRowsEvent(_) | RowsEventData::DeleteRowsEventV1(_) => {
                Some("delete")
            }
        };
        if let Some(kind) = kind {
            // Rare: counted, not relayed (mysql_common decodes them).
            let Some(tme) = reader.stream.get_tme(table_id) else {
                return Err(SourceError::Definite(format!(
                    "rows event for table id {table_id} without its table map at {}:{log_pos}",
                    reader.file
                )));
            };
            let n = rows.rows(tme).count() as u64;
            self.metrics
                .ignored
                .get_or_create(&vec![
                    ("table".to_string(), mapping.name.to_string()),
                    ("kind".to_string(), kind.to_string()),
                ])
                .inc_by(n);
            return Ok(());
        }
        let txn = reader.txn.get_or_insert_with(Txn::default);
        let at: Arc<str> = Arc::from(format!("{}:{log_pos}", reader.file));
        let ctx_gtid = txn.gtid_text.clone();
        let mapper = &self.mappers[mapping.outbox];
        for after in layout.after_images(&rows) {
            let after = after.map_err(|e| {
                SourceError::Definite(format!(
                    "cannot decode a row of {} at {at}: {e}",
                    mapping.name
                ))
            })?;
            txn.rows += 1;
            if self.replay_skip > 0 {
                self.replay_skip -= 1;
                continue;
            }
            let result = mapper.map(
                mapping,
                after,
                RowContext {
                    gtid: ctx_gtid.as_deref(),
                    at: &at,
                    at_header: crate::outbox::header::BINLOG,
                    epoch: &self.epoch,
                },
            );
            self.out.push_back(SourceEvent::Row {
                table: mapping.name.clone(),
                result,
                at: at.clone(),
                gtid: ctx_gtid.clone(),
            });
        }
        Ok(())
    }

    /// The rows of a captured plain table whose action it relays, as change
    /// events; the others counted in `ignored_rows_total`.
    fn handle_changes(
        &mut self,
        table: &ChangeTable,
        rows: RowsEventData<'_>,
        log_pos: u64,
        time: u32,
    ) -> Result<(), SourceError> {
        let reader = self.reader.as_mut().expect("reader is open");
        let action = match &rows {
            RowsEventData::WriteRowsEvent(_) | RowsEventData::WriteRowsEventV1(_) => Action::Insert,
            RowsEventData::UpdateRowsEvent(_)
            | RowsEventData::UpdateRowsEventV1(_)
            | RowsEventData::PartialUpdateRowsEvent(_) => Action::Update,
            RowsEventData::DeleteRowsEvent(_) | RowsEventData::DeleteRowsEventV1(_) => {
                Action::Delete
            }
        };
        let at: Arc<str> = Arc::from(format!("{}:{log_pos}", reader.file));
        let decode = |e: std::io::Error| {
            SourceError::Definite(format!(
                "cannot decode a row of {} at {at}: {e}",
                table.name
            ))
        };
        let images = table.layout.images(&rows).map_err(decode)?;
        if !table.wants(action) {
            let n = images.count() as u64;
            self.metrics
                .ignored
                .get_or_create(&vec![
                    ("table".to_string(), table.name.to_string()),
                    ("kind".to_string(), action.as_str().to_string()),
                ])
                .inc_by(n);
            return Ok(());
        }
        let txn = reader.txn.get_or_insert_with(Txn::default);
        let gtid = txn.gtid_text.clone();
        for (i, row) in images.enumerate() {
            let (before, after) = row.map_err(decode)?;
            txn.rows += 1;
            if self.replay_skip > 0 {
                self.replay_skip -= 1;
                continue;
            }
            // Stable across replays: the GTID survives a primary failover.
            let id = match &gtid {
                Some(g) => format!("{g}/{}", txn.rows),
                None => format!("{at}/{i}"),
            };
            let result = table.map(
                action,
                before,
                after,
                ChangeContext {
                    id: &id,
                    at: RowContext {
                        gtid: gtid.as_deref(),
                        at: &at,
                        at_header: crate::outbox::header::BINLOG,
                        epoch: &self.epoch,
                    },
                    time,
                },
            );
            self.out.push_back(SourceEvent::Row {
                table: table.name.clone(),
                result,
                at: at.clone(),
                gtid: gtid.clone(),
            });
        }
        Ok(())
    }

    /// A transaction ended at `log_pos`: advance the committed position.
    fn commit(&mut self, log_pos: u64, ts: u32) {
        let reader = self.reader.as_mut().expect("reader is open");
        let txn = reader.txn.take().unwrap_or_default();
        if let Some(g) = txn.maria {
            let mut l = match reader.gtid.take() {
                Some(Gtid::MariaDb(l)) => l,
                _ => MariaGtidList::default(),
            };
            l.advance(g);
            reader.gtid = Some(Gtid::MariaDb(l));
        }
        if let Some((uuid, gno)) = txn.mysql {
            let mut s = match reader.gtid.take() {
                Some(Gtid::MySql(s)) => s,
                _ => MysqlGtidSet::default(),
            };
            s.add(&crate::position::format_uuid(&uuid), gno);
            reader.gtid = Some(Gtid::MySql(s));
        }
        if log_pos == 0 {
            // Artificial events (log_pos 0) do not move the file position.
            return;
        }
        self.replay_skip = 0;
        self.committed = BinlogPosition {
            gtid: reader.gtid.clone(),
            file: FilePos {
                file: reader.file.clone(),
                pos: log_pos,
            },
            commit_ts: ts,
            server_id: Some(self.info.server_id),
        };
        if txn.rows > 0 || self.last_idle_commit.elapsed() >= IDLE_COMMIT_EVERY {
            self.last_idle_commit = Instant::now();
            self.unreported_commit = false;
            self.out.push_back(SourceEvent::Commit {
                position: Position::Binlog(self.committed.clone()),
                rows: txn.rows,
                committed_at: None,
            });
        } else {
            self.unreported_commit = true;
        }
    }
}

impl source::Source for BinlogSource {
    type Opened = (Conn, ServerInfo);
    type HeadConn = Conn;
    const NAME: &'static str = "mysql";

    async fn open(cfg: &Config) -> Result<(Conn, ServerInfo), SourceError> {
        let mut conn = connect(mysql(cfg)?).await?;
        let info = preflight(&mut conn, cfg).await?;
        info!(server = %info.version, gtid = info.gtid, "preflight passed");
        Ok((conn, info))
    }

    async fn begin(
        cfg: Arc<Config>,
        (mut conn, info): (Conn, ServerInfo),
        stored: Option<Position>,
        term: Arc<Leadership>,
        metrics: Metrics,
        // The server keeps its binlogs by its own expiry, not by readers.
        _durable: watch::Receiver<Option<Position>>,
    ) -> Result<(BinlogSource, Position), SourceError> {
        let start = match stored {
            Some(Position::Binlog(p)) => p,
            Some(other) => {
                return Err(SourceError::Definite(format!(
                    "the stored checkpoint is a PostgreSQL position ({}), and this relay reads \
                     MySQL: relays of different databases need different names",
                    other.short()
                )))
            }
            None => {
                let p = resolve_start(&mut conn, &info, &cfg.start_from).await?;
                info!(start_from = %cfg.start_from, position = %p.short(), file = %p.file, "no checkpoint stored; starting");
                p
            }
        };
        check_resume_point(&mut conn, &info, &start).await?;
        drop(conn);
        let position = Position::Binlog(start.clone());
        Ok((
            BinlogSource::new(cfg, info, start, term.epoch(), metrics)?,
            position,
        ))
    }

    async fn next(&mut self) -> Result<SourceEvent, SourceError> {
        self.read().await
    }

    async fn poll_head(cfg: &Config, conn: &mut Option<Conn>) -> Result<ServerLog, SourceError> {
        if conn.is_none() {
            *conn = Some(connect(mysql(cfg)?).await?);
        }
        let c = conn.as_mut().expect("connected above");
        match binary_logs(c).await {
            Ok(logs) => Ok(ServerLog::Binlog(logs)),
            Err(e) => {
                *conn = None;
                Err(e)
            }
        }
    }
}

/// The `[mysql]` section (present when this source runs: the config's
/// validation demands exactly one database).
fn mysql(cfg: &Config) -> Result<&MysqlConfig, SourceError> {
    cfg.mysql
        .as_ref()
        .ok_or_else(|| SourceError::Definite("[mysql] is not configured".into()))
}

fn kind(k: &str) -> Vec<(String, String)> {
    vec![("kind".to_string(), k.to_string())]
}

fn mysql_sids(set: &MysqlGtidSet) -> Vec<mysql_async::Sid<'static>> {
    set.iter()
        .filter_map(|(uuid, ivs)| {
            let hex: String = uuid.chars().filter(|c| *c != '-').collect();
            let mut bytes = [0u8; 16];
            for (i, b) in bytes.iter_mut().enumerate() {
                *b = u8::from_str_radix(hex.get(i * 2..i * 2 + 2)?, 16).ok()?;
            }
            Some(
                mysql_async::Sid::new(bytes).with_intervals(
                    ivs.iter()
                        .map(|(a, b)| mysql_async::GnoInterval::new(*a, b.saturating_add(1)))
                        .collect(),
                ),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mysql_sids_use_exclusive_ends() {
        let set: MysqlGtidSet = "3e11fa47-71ca-11e1-9e33-c80aa9429562:1-5:7"
            .parse()
            .unwrap();
        let sids = mysql_sids(&set);
        assert_eq!(sids.len(), 1);
        let ivs: Vec<(u64, u64)> = sids[0]
            .intervals()
            .iter()
            .map(|i| (i.start(), i.end()))
            .collect();
        assert_eq!(ivs, vec![(1, 6), (7, 8)]);
        assert_eq!(sids[0].uuid()[0], 0x3e);
    }
}
