//! What the pipeline asks of a database it reads, whichever it is: connect
//! and preflight, resume at a committed position, hand over committed rows
//! and commit positions in order, and learn which position is durable. The
//! MySQL/MariaDB binlog (`binlog`) and PostgreSQL logical replication (`pg`)
//! implement it; the pipeline, election and status do not know which runs.

use std::future::Future;
use std::sync::Arc;
use std::time::SystemTime;

use serde::Serialize;
use tokio::sync::watch;

use crate::config::Config;
use crate::election::Leadership;
use crate::metrics::Metrics;
use crate::outbox::{BadRow, Record};
use crate::position::{FilePos, Lsn, Position};

/// Errors of a source. Transient ones are retried by reconnecting at the
/// last commit; definite ones stop the relay with the message.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{0}")]
    Transient(String),
    #[error("{0}")]
    Definite(String),
}

impl SourceError {
    pub fn is_transient(&self) -> bool {
        matches!(self, SourceError::Transient(_))
    }
}

/// What a source hands to the pipeline.
#[derive(Debug)]
pub enum SourceEvent {
    /// An outbox row (or change event), mapped or bad. `at` is where its
    /// event sits in the server's log; the strings are shared by the rows of
    /// an event or transaction.
    Row {
        table: Arc<str>,
        result: Result<Record, BadRow>,
        at: Arc<str>,
        gtid: Option<Arc<str>>,
    },
    /// A transaction committed; resuming from `position` starts after it.
    /// `committed_at`: when the server committed it, where the source knows
    /// that to the microsecond (PostgreSQL; a binlog's timestamps are whole
    /// seconds) and the transaction had rows.
    Commit {
        position: Position,
        rows: usize,
        committed_at: Option<SystemTime>,
    },
}

/// A database the relay reads committed outbox rows from.
pub trait Source: Sized + Send + 'static {
    /// A connection that passed the preflight checks.
    type Opened: Send;
    /// A connection for polling the server's log head (status).
    type HeadConn: Send;
    /// Short name in logs and metrics (`mysql`, `postgres`).
    const NAME: &'static str;

    /// Connects and checks the server settings and outbox tables; each
    /// failure a definite error naming the setting and its fix.
    fn open(cfg: &Config) -> impl Future<Output = Result<Self::Opened, SourceError>> + Send;

    /// Begins a leadership term: resumes at `stored` (refused when the
    /// server no longer has it) or at `start_from`, and returns the stream
    /// and the position it starts at. Runs only while holding the lease.
    /// `term` is the leadership held (its epoch goes into every record; a
    /// source that takes a server-side resource from another reader does so
    /// only while it is valid). `durable` tells the last position stored in
    /// the checkpoint (every
    /// record before it acknowledged): the server may release what is
    /// before it.
    fn begin(
        cfg: Arc<Config>,
        opened: Self::Opened,
        stored: Option<Position>,
        term: Arc<Leadership>,
        metrics: Metrics,
        durable: watch::Receiver<Option<Position>>,
    ) -> impl Future<Output = Result<(Self, Position), SourceError>> + Send;

    /// The next event. Transient errors reconnect with backoff inside (one
    /// log line per outage); definite errors are returned.
    fn next(&mut self) -> impl Future<Output = Result<SourceEvent, SourceError>> + Send;

    /// The server's log head and, where the server keeps a log for the
    /// relay, how much of it is retained. `conn` is reopened when None.
    fn poll_head(
        cfg: &Config,
        conn: &mut Option<Self::HeadConn>,
    ) -> impl Future<Output = Result<ServerLog, SourceError>> + Send;
}

/// The server's log as the status sees it.
#[derive(Debug, Clone)]
pub enum ServerLog {
    /// `SHOW BINARY LOGS`: (file, size).
    Binlog(Vec<(String, u64)>),
    /// The current WAL location and the WAL bytes the relay's slot retains.
    Wal { current: Lsn, retained: Option<u64> },
}

/// The head in `/status`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Head {
    Binlog(FilePos),
    #[serde(rename_all = "camelCase")]
    Wal {
        lsn: Lsn,
        #[serde(skip_serializing_if = "Option::is_none")]
        retained_wal_bytes: Option<u64>,
    },
}

impl ServerLog {
    pub fn head(&self) -> Option<Head> {
        match self {
            ServerLog::Binlog(logs) => logs.last().map(|(f, size)| {
                Head::Binlog(FilePos {
                    file: f.clone(),
                    pos: *size,
                })
            }),
            ServerLog::Wal { current, retained } => Some(Head::Wal {
                lsn: *current,
                retained_wal_bytes: *retained,
            }),
        }
    }

    /// Log bytes between `at` and the head.
    pub fn behind(&self, at: &Position) -> Option<u64> {
        match (self, at) {
            (ServerLog::Binlog(logs), Position::Binlog(b)) => Some(bytes_behind(logs, &b.file)),
            (ServerLog::Wal { current, .. }, Position::Lsn(l)) => {
                Some(current.0.saturating_sub(l.lsn.0))
            }
            _ => None,
        }
    }

    /// WAL the server keeps for the relay's slot (PostgreSQL).
    pub fn retained(&self) -> Option<u64> {
        match self {
            ServerLog::Wal { retained, .. } => *retained,
            ServerLog::Binlog(_) => None,
        }
    }
}

/// Binlog bytes from `at` to the head, given `SHOW BINARY LOGS` (name, size):
/// the rest of `at`'s file plus every later file.
pub fn bytes_behind(logs: &[(String, u64)], at: &FilePos) -> u64 {
    logs.iter()
        .filter(|(name, _)| name.as_str() >= at.file.as_str())
        .map(|(_, size)| *size)
        .sum::<u64>()
        .saturating_sub(at.pos)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::position::LsnPosition;

    #[test]
    fn bytes_behind_spans_files() {
        let logs = vec![
            ("mysql-bin.000001".to_string(), 1_000),
            ("mysql-bin.000002".to_string(), 500),
            ("mysql-bin.000003".to_string(), 300),
        ];
        let at = |f: &str, pos| FilePos {
            file: f.into(),
            pos,
        };
        assert_eq!(bytes_behind(&logs, &at("mysql-bin.000003", 300)), 0);
        assert_eq!(bytes_behind(&logs, &at("mysql-bin.000003", 100)), 200);
        assert_eq!(bytes_behind(&logs, &at("mysql-bin.000002", 400)), 100 + 300);
        assert_eq!(bytes_behind(&logs, &at("mysql-bin.000001", 0)), 1_800);
    }

    #[test]
    fn wal_behind_and_head() {
        let log = ServerLog::Wal {
            current: Lsn(5_000),
            retained: Some(7_000),
        };
        let at = Position::Lsn(LsnPosition {
            lsn: Lsn(4_000),
            commit_ts: 0,
        });
        assert_eq!(log.behind(&at), Some(1_000));
        assert_eq!(log.retained(), Some(7_000));
        assert_eq!(
            serde_json::to_value(log.head()).unwrap(),
            serde_json::json!({"lsn": "0/1388", "retainedWalBytes": 7000})
        );
    }
}
