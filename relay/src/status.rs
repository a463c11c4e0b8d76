//! What the relay reports about itself: role, leader term, position, lag (in
//! seconds and in binlog bytes behind the server's head), totals and the last
//! error. Served at `/status` and, when configured, written by the leader into
//! its OutboxRelay's status (server-side apply under its own field manager,
//! so it never touches the operator's fields).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::config::{Config, StatusConfig};
use crate::metrics::Metrics;
use crate::position::Position;
use crate::source::{Head, ServerLog, Source};

/// The relay's field manager in the OutboxRelay status.
pub const MANAGER: &str = "outbox-relay";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    #[default]
    Starting,
    Standby,
    Leader,
    Stopped,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LeaderReport {
    pub pod: String,
    pub epoch: u64,
    /// RFC 3339 time the term began.
    pub since: String,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PositionReport {
    pub short: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gtid: Option<String>,
    /// Binlog file and offset (MySQL).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pos: Option<u64>,
    /// WAL location (PostgreSQL).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lsn: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commit_time: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LagReport {
    /// now − commit time of the oldest transaction read but not yet
    /// acknowledged by Kafka; 0 when caught up.
    pub seconds: u64,
    /// Log bytes (binlog, WAL) between the relayed position and the
    /// server's head.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct WalReport {
    /// WAL the server keeps for the relay's replication slot.
    pub retained_bytes: u64,
    /// `postgres.max_retained_wal_bytes`: above it the status warns.
    pub limit_bytes: u64,
}

/// One report. The fields other than `role` and `head` are what the leader
/// writes into the OutboxRelay status.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub role: Role,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leader: Option<LeaderReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<PositionReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lag: Option<LagReport>,
    /// PostgreSQL: the WAL the slot retains.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wal: Option<WalReport>,
    /// The server's head at the last poll.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub head: Option<Head>,
    /// Records and payload bytes acknowledged by Kafka since this process started.
    pub events: u64,
    pub bytes: u64,
    pub last_heartbeat_time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

#[derive(Default)]
struct Pending {
    commits: VecDeque<u32>,
    /// The oldest unacknowledged commit of a stream that was restarted: it
    /// is read again, and holds the lag up until the new stream acknowledges
    /// its first commit.
    held: Option<u32>,
}

#[derive(Default)]
struct State {
    role: Role,
    leader: Option<LeaderReport>,
    position: Option<Position>,
    events: u64,
    bytes: u64,
    last_error: Option<String>,
    /// `postgres.max_retained_wal_bytes`.
    wal_limit: Option<u64>,
    /// The server's log at the last poll.
    logs: Option<ServerLog>,
    latest: Option<Report>,
}

/// Shared between the data path (which updates it) and the reporter.
#[derive(Default)]
pub struct Progress {
    state: Mutex<State>,
    /// The last position stored in the checkpoint, for the source.
    durable: tokio::sync::watch::Sender<Option<Position>>,
    /// Commit times of transactions read but not yet acknowledged, oldest first.
    pending: Mutex<Pending>,
    changed: Notify,
}

fn rfc3339(secs: u64) -> String {
    Timestamp::from_second(secs as i64)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Progress {
    pub fn set_role(&self, role: Role) {
        self.state.lock().expect("status lock").role = role;
    }

    /// A term began: report it at once.
    pub fn set_leader(&self, pod: &str, epoch: u64) {
        {
            let mut s = self.state.lock().expect("status lock");
            s.role = Role::Leader;
            s.leader = Some(LeaderReport {
                pod: pod.to_owned(),
                epoch,
                since: rfc3339(now_secs()),
            });
        }
        self.changed.notify_one();
    }

    /// The last position stored in the checkpoint (every record before it
    /// acknowledged by the sink).
    pub fn set_position(&self, p: &Position) {
        self.state.lock().expect("status lock").position = Some(p.clone());
        self.durable.send_replace(Some(p.clone()));
    }

    /// Follows `set_position`.
    pub fn durable(&self) -> tokio::sync::watch::Receiver<Option<Position>> {
        self.durable.subscribe()
    }

    pub fn add_published(&self, events: u64, bytes: u64) {
        let mut s = self.state.lock().expect("status lock");
        s.events += events;
        s.bytes += bytes;
    }

    /// The relay stopped on this error (it carries no secrets: config
    /// errors name fields, never values).
    pub fn set_error(&self, e: &str) {
        let mut s = self.state.lock().expect("status lock");
        s.last_error = Some(e.to_owned());
        s.role = Role::Stopped;
    }

    /// The reader passed the commit of a transaction (committed at `ts`).
    pub fn read_commit(&self, ts: u32) {
        self.pending
            .lock()
            .expect("pending lock")
            .commits
            .push_back(ts);
    }

    /// Kafka acknowledged everything up to the oldest commit read.
    pub fn acked_commit(&self) {
        let mut p = self.pending.lock().expect("pending lock");
        p.commits.pop_front();
        p.held = None;
    }

    /// A new stream starts at the last acknowledged commit: what the old
    /// one read but never got acknowledged is read again, and the oldest of
    /// it keeps counting in the lag meanwhile.
    pub fn restart_stream(&self) {
        let mut p = self.pending.lock().expect("pending lock");
        let oldest = p.held.or(p.commits.front().copied());
        p.commits.clear();
        p.held = oldest;
    }

    /// Seconds behind: now − the oldest unacknowledged commit, 0 when none.
    pub fn lag_seconds(&self) -> u64 {
        let p = self.pending.lock().expect("pending lock");
        match p.held.or(p.commits.front().copied()) {
            Some(ts) if ts > 0 => now_secs().saturating_sub(ts as u64),
            _ => 0,
        }
    }

    /// The report as of now.
    pub fn snapshot(&self) -> Report {
        let lag_seconds = self.lag_seconds();
        let s = self.state.lock().expect("status lock");
        Report {
            role: s.role,
            leader: s.leader.clone(),
            position: s.position.as_ref().map(position_report),
            lag: s.position.as_ref().map(|p| LagReport {
                seconds: lag_seconds,
                bytes: s.logs.as_ref().and_then(|l| l.behind(p)),
            }),
            wal: s
                .logs
                .as_ref()
                .and_then(ServerLog::retained)
                .zip(s.wal_limit)
                .map(|(retained_bytes, limit_bytes)| WalReport {
                    retained_bytes,
                    limit_bytes,
                }),
            head: s.logs.as_ref().and_then(ServerLog::head),
            events: s.events,
            bytes: s.bytes,
            last_heartbeat_time: rfc3339(now_secs()),
            last_error: s.last_error.clone(),
        }
    }

    /// The last report the reporter made (what `/status` serves).
    pub fn latest(&self) -> Report {
        let s = self.state.lock().expect("status lock");
        match &s.latest {
            Some(r) => r.clone(),
            None => {
                drop(s);
                self.snapshot()
            }
        }
    }
}

fn position_report(p: &Position) -> PositionReport {
    let (gtid, file, pos, lsn) = match p {
        Position::Binlog(b) => (
            b.gtid.as_ref().map(|g| g.to_string()),
            Some(b.file.file.clone()),
            Some(b.file.pos),
            None,
        ),
        Position::Lsn(l) => (None, None, None, Some(l.lsn.to_string())),
    };
    let ts = p.commit_ts();
    PositionReport {
        short: p.short(),
        gtid,
        file,
        pos,
        lsn,
        commit_time: (ts > 0).then(|| rfc3339(ts as u64)),
    }
}

/// Polls the server's head, refreshes the report every `interval` (and at
/// once when a term begins), and writes it into the OutboxRelay status while
/// leading.
pub struct Reporter {
    progress: Arc<Progress>,
    target: Option<Api<DynamicObject>>,
    resource: String,
}

impl Reporter {
    pub async fn new(cfg: &Config, progress: Arc<Progress>) -> Reporter {
        let (target, resource) = match &cfg.status.resource {
            Some(name) => (kube_target(&cfg.status).await, name.clone()),
            None => (None, String::new()),
        };
        Reporter {
            progress,
            target,
            resource,
        }
    }

    pub async fn run<S: Source>(
        &self,
        cfg: Arc<Config>,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) {
        let mut conn = None;
        self.progress.state.lock().expect("status lock").wal_limit =
            cfg.postgres.as_ref().map(|p| p.max_retained_wal_bytes);
        loop {
            match S::poll_head(&cfg, &mut conn).await {
                Ok(log) => self.progress.state.lock().expect("status lock").logs = Some(log),
                Err(e) => {
                    debug!(error = %e, "cannot poll the server's log head; reconnecting next time")
                }
            }
            let report = self.progress.snapshot();
            metrics
                .lag_seconds
                .set(report.lag.as_ref().map_or(0, |l| l.seconds) as f64);
            if let Some(b) = report.lag.as_ref().and_then(|l| l.bytes) {
                metrics.lag_bytes.set(b as i64);
            }
            if let Some(w) = &report.wal {
                metrics.retained_wal_bytes.set(w.retained_bytes as i64);
            }
            if report.role == Role::Leader {
                self.push(&report).await;
            }
            self.progress.state.lock().expect("status lock").latest = Some(report);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.progress.changed.notified() => {}
                _ = tokio::time::sleep(cfg.status.interval) => {}
            }
        }
    }

    /// Writes the report into the OutboxRelay status (best effort: a failed
    /// write is retried at the next interval).
    pub async fn push(&self, report: &Report) {
        let Some(api) = &self.target else { return };
        let patch = serde_json::json!({
            "apiVersion": "outboxrelay.dev/v1alpha1",
            "kind": "OutboxRelay",
            "status": status_fields(report),
        });
        let (pp, patch) = (PatchParams::apply(MANAGER).force(), Patch::Apply(&patch));
        let write = api.patch_status(&self.resource, &pp, &patch);
        match tokio::time::timeout(Duration::from_secs(5), write).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!(error = %e, "cannot write the OutboxRelay status"),
            Err(_) => warn!("writing the OutboxRelay status timed out"),
        }
    }

    /// A last report after a definite error, from whatever role.
    pub async fn push_final(&self) {
        self.push(&self.progress.snapshot()).await;
    }
}

/// The relay's own fields of the OutboxRelay status.
pub fn status_fields(r: &Report) -> serde_json::Value {
    let mut v = serde_json::to_value(r).unwrap_or_default();
    if let Some(m) = v.as_object_mut() {
        m.remove("role");
        m.remove("head");
    }
    v
}

async fn kube_target(cfg: &StatusConfig) -> Option<Api<DynamicObject>> {
    let client = match kube::Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "status.resource is set but there is no Kubernetes client configuration; reporting only at /status");
            return None;
        }
    };
    let ns = cfg
        .namespace
        .clone()
        .or_else(|| std::env::var("POD_NAMESPACE").ok())
        .unwrap_or_else(|| client.default_namespace().to_owned());
    let gvk = GroupVersionKind::gvk("outboxrelay.dev", "v1alpha1", "OutboxRelay");
    let ar = ApiResource::from_gvk_with_plural(&gvk, "outboxrelays");
    Some(Api::namespaced_with(client, &ns, &ar))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_leave_out_local_ones() {
        let p = Progress::default();
        p.set_leader("relay-0", 4);
        let v = status_fields(&p.snapshot());
        let keys: Vec<&str> = v
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys, ["bytes", "events", "lastHeartbeatTime", "leader"]);
        assert_eq!(v["leader"]["epoch"], 4);
    }

    #[test]
    fn lag_is_the_age_of_the_oldest_unacknowledged_commit() {
        let p = Progress::default();
        assert_eq!(p.lag_seconds(), 0);
        p.read_commit((now_secs() - 30) as u32);
        p.read_commit(now_secs() as u32);
        assert!((30..=31).contains(&p.lag_seconds()));
        p.acked_commit();
        assert!(p.lag_seconds() <= 1);
        p.acked_commit();
        assert_eq!(p.lag_seconds(), 0);
    }

    #[test]
    fn a_restarted_stream_keeps_the_lag_until_it_acknowledges() {
        let p = Progress::default();
        p.read_commit((now_secs() - 40) as u32);
        p.read_commit((now_secs() - 20) as u32);
        p.restart_stream();
        assert!(
            (40..=41).contains(&p.lag_seconds()),
            "held while nothing is read"
        );
        // Restarted again before anything was acknowledged: still the oldest.
        p.read_commit((now_secs() - 40) as u32);
        p.restart_stream();
        assert!((40..=41).contains(&p.lag_seconds()));
        // The new stream reads the same transactions again and gets them acknowledged.
        p.read_commit((now_secs() - 40) as u32);
        p.read_commit((now_secs() - 20) as u32);
        p.acked_commit();
        assert!((20..=21).contains(&p.lag_seconds()));
        p.acked_commit();
        assert_eq!(p.lag_seconds(), 0);
    }
}
