//! Conditions from what the leading relay reports (pure; the clock is passed
//! in): `Ready` only while a leader reports within two heartbeat intervals,
//! without a reported error and with lag under `spec.maxLagSeconds`;
//! `Stalled` when no report came for two intervals, even with every relay
//! pod dead; the relay's last error for `Degraded`.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use crate::crd::OutboxRelayStatus;

/// One condition as the operator computes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cond {
    pub type_: &'static str,
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

/// What the relays' reports say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayHealth {
    pub ready: Cond,
    pub stalled: Cond,
    /// The error a relay stopped on, for `Degraded`.
    pub error: Option<String>,
    /// When to look again so a stall shows within two intervals.
    pub recheck: Duration,
}

/// How soon a Stalled relay is looked at again. Nothing that passes time
/// changes a stall (its message names the last report, not an age): only a
/// relay's report does, and that is a change of the resource the operator
/// watches. So a safety net, not a poll: 200 Stalled relays cost nothing.
pub const STALLED_RECHECK: Duration = Duration::from_secs(300);

/// Startup grace before a relay that never reported counts as stalled.
pub const STARTUP_GRACE: Duration = Duration::from_secs(60);

/// `spec.heartbeatInterval` (`500ms`, `5s`, `1m`; the schema checks the
/// form), default 5 s.
pub fn heartbeat_interval(spec: Option<&str>) -> Duration {
    let Some(s) = spec else {
        return Duration::from_secs(5);
    };
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().unwrap_or(5);
    match unit {
        "ms" => Duration::from_millis(n.max(100)),
        "m" => Duration::from_secs(n * 60),
        _ => Duration::from_secs(n.max(1)),
    }
}

fn since(now: Timestamp, t: Timestamp) -> Duration {
    let d = now.as_millisecond() - t.as_millisecond();
    Duration::from_millis(d.max(0) as u64)
}

/// PostgreSQL: the message of a `WalRetained` Degraded condition when the
/// replication slot retains more WAL than the limit the relay reports.
pub fn wal_retained(status: Option<&OutboxRelayStatus>) -> Option<String> {
    let w = status?.wal.as_ref()?;
    (w.retained_bytes > w.limit_bytes).then(|| {
        format!(
            "the replication slot retains {} bytes of WAL, above spec.postgres.maxRetainedWalBytes \
             ({}): the server keeps WAL until the relay confirms it, so a stopped or lagging relay \
             grows it until the disk fills",
            w.retained_bytes, w.limit_bytes
        )
    })
}

pub fn assess(
    status: Option<&OutboxRelayStatus>,
    interval: Duration,
    max_lag: Option<u32>,
    created: Option<Timestamp>,
    now: Timestamp,
) -> RelayHealth {
    let stale_after = interval * 2;
    let heartbeat = status
        .and_then(|s| s.last_heartbeat_time.as_deref())
        .and_then(|t| t.parse::<Timestamp>().ok());
    let error = status.and_then(|s| s.last_error.clone());
    let leader = status
        .and_then(|s| s.leader.as_ref())
        .map(|l| format!("{} (epoch {})", l.pod, l.epoch))
        .unwrap_or_else(|| "no leader".into());
    let cond = |type_, status, reason, message: String| Cond {
        type_,
        status,
        reason,
        message,
    };
    match heartbeat {
        Some(t) if since(now, t) <= stale_after => {
            let lag = status.and_then(|s| s.lag.as_ref()).map_or(0, |l| l.seconds);
            let positioned = status.is_some_and(|s| s.position.is_some());
            let ready = match (&error, max_lag) {
                (Some(e), _) => cond("Ready", false, "RelayError", e.clone()),
                // Ready means streaming from a known position: the leader
                // reports once before it has set its start position.
                (None, _) if !positioned => cond(
                    "Ready",
                    false,
                    "NoPosition",
                    format!("leader {leader} is reporting but has no position yet"),
                ),
                (None, Some(max)) if lag > max as u64 => cond(
                    "Ready",
                    false,
                    "LagTooHigh",
                    format!("lag {lag}s is above spec.maxLagSeconds ({max}s)"),
                ),
                (None, _) => cond(
                    "Ready",
                    true,
                    "Streaming",
                    format!("leader {leader} is reporting"),
                ),
            };
            RelayHealth {
                ready,
                stalled: cond(
                    "Stalled",
                    false,
                    "Reporting",
                    format!("leader {leader} is reporting"),
                ),
                error,
                recheck: stale_after.saturating_sub(since(now, t)) + Duration::from_secs(1),
            }
        }
        Some(t) => {
            let message = format!(
                "no relay report since {t} (more than two heartbeat intervals of {interval:?}): \
                 the relays are dead, blocked or cut off"
            );
            RelayHealth {
                ready: cond("Ready", false, "Stalled", message.clone()),
                stalled: cond("Stalled", true, "NoHeartbeat", message),
                error,
                recheck: STALLED_RECHECK,
            }
        }
        None => {
            // A resource without a creation time has only just been created.
            let age = created.map_or(Duration::ZERO, |c| since(now, c));
            let grace = stale_after + STARTUP_GRACE;
            let ready = cond(
                "Ready",
                false,
                "NoLeader",
                "no relay has reported yet".into(),
            );
            if age < grace {
                RelayHealth {
                    ready,
                    stalled: cond(
                        "Stalled",
                        false,
                        "Starting",
                        "waiting for the first relay report".into(),
                    ),
                    error,
                    recheck: grace - age + Duration::from_secs(1),
                }
            } else {
                RelayHealth {
                    ready,
                    stalled: cond(
                        "Stalled",
                        true,
                        "NoHeartbeat",
                        format!("no relay has reported since the resource was created (more than {grace:?} ago)"),
                    ),
                    error,
                    recheck: STALLED_RECHECK,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{LagStatus, LeaderStatus, PositionStatus, WalStatus};

    #[test]
    fn retained_wal_over_the_limit_is_named() {
        let status = |retained_bytes| OutboxRelayStatus {
            wal: Some(WalStatus {
                retained_bytes,
                limit_bytes: 1_000,
            }),
            ..Default::default()
        };
        assert_eq!(wal_retained(Some(&status(1_000))), None);
        let m = wal_retained(Some(&status(1_001))).expect("over the limit");
        assert!(
            m.contains("retains 1001 bytes") && m.contains("maxRetainedWalBytes (1000)"),
            "{m}"
        );
        assert_eq!(wal_retained(None), None);
    }

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).expect("time")
    }

    fn reported(hb: i64, lag: u64, error: Option<&str>) -> OutboxRelayStatus {
        OutboxRelayStatus {
            leader: Some(LeaderStatus {
                pod: "orders-relay-7d9-x".into(),
                epoch: 4,
                since: at(0).to_string(),
            }),
            lag: Some(LagStatus {
                seconds: lag,
                bytes: Some(0),
            }),
            position: Some(PositionStatus {
                short: "0-1-42".into(),
                gtid: Some("0-1-42".into()),
                file: Some("mysql-bin.000001".into()),
                pos: Some(4242),
                lsn: None,
                commit_time: None,
            }),
            last_heartbeat_time: Some(at(hb).to_string()),
            last_error: error.map(str::to_owned),
            ..OutboxRelayStatus::default()
        }
    }

    #[test]
    fn a_leader_without_a_position_is_not_ready() {
        let mut s = reported(100, 0, None);
        s.position = None;
        let h = assess(Some(&s), FIVE, None, Some(at(0)), at(101));
        assert!(!h.ready.status && !h.stalled.status, "{h:?}");
        assert_eq!(h.ready.reason, "NoPosition");
        assert!(h.ready.message.contains("orders-relay-7d9-x (epoch 4)"));
    }

    const FIVE: Duration = Duration::from_secs(5);

    #[test]
    fn fresh_heartbeat_is_ready_and_rechecks_before_it_goes_stale() {
        let s = reported(100, 0, None);
        let h = assess(Some(&s), FIVE, None, Some(at(0)), at(103));
        assert!(h.ready.status && !h.stalled.status, "{h:?}");
        assert_eq!(h.ready.reason, "Streaming");
        assert!(h.ready.message.contains("orders-relay-7d9-x (epoch 4)"));
        assert_eq!(h.recheck, Duration::from_secs(8));
        // Exactly two intervals old is still fresh.
        assert!(assess(Some(&s), FIVE, None, None, at(110)).ready.status);
    }

    #[test]
    fn stale_heartbeat_is_stalled_and_not_ready() {
        let s = reported(100, 0, None);
        let h = assess(Some(&s), FIVE, None, Some(at(0)), at(111));
        assert!(!h.ready.status && h.stalled.status, "{h:?}");
        assert_eq!(
            (h.stalled.reason, h.ready.reason),
            ("NoHeartbeat", "Stalled")
        );
        assert!(h.stalled.message.contains(&at(100).to_string()));
        assert_eq!(h.recheck, STALLED_RECHECK);
    }

    #[test]
    fn lag_over_the_threshold_is_not_ready_but_not_stalled() {
        let s = reported(100, 45, None);
        let h = assess(Some(&s), FIVE, Some(30), None, at(101));
        assert!(!h.ready.status && !h.stalled.status);
        assert_eq!(h.ready.reason, "LagTooHigh");
        assert!(h.ready.message.contains("45s") && h.ready.message.contains("30s"));
        assert!(assess(Some(&s), FIVE, Some(60), None, at(101)).ready.status);
        assert!(assess(Some(&s), FIVE, None, None, at(101)).ready.status);
    }

    #[test]
    fn reported_error_is_degraded_and_not_ready() {
        let s = reported(100, 0, Some("bad outbox row id=7 in shop.outbox"));
        let h = assess(Some(&s), FIVE, None, None, at(101));
        assert!(!h.ready.status);
        assert_eq!(h.ready.reason, "RelayError");
        assert_eq!(
            h.error.as_deref(),
            Some("bad outbox row id=7 in shop.outbox")
        );
    }

    #[test]
    fn no_leader_ever_is_starting_then_stalled() {
        let created = at(0);
        let h = assess(None, FIVE, None, Some(created), at(30));
        assert!(!h.ready.status && !h.stalled.status);
        assert_eq!((h.ready.reason, h.stalled.reason), ("NoLeader", "Starting"));
        assert_eq!(h.recheck, Duration::from_secs(41));
        let h = assess(None, FIVE, None, Some(created), at(71));
        assert!(h.stalled.status);
        assert_eq!(h.stalled.reason, "NoHeartbeat");
        let empty = OutboxRelayStatus::default();
        assert!(
            assess(Some(&empty), FIVE, None, Some(created), at(71))
                .stalled
                .status
        );
    }

    #[test]
    fn heartbeat_interval_parses_the_schema_forms() {
        assert_eq!(heartbeat_interval(None), FIVE);
        assert_eq!(heartbeat_interval(Some("2s")), Duration::from_secs(2));
        assert_eq!(
            heartbeat_interval(Some("500ms")),
            Duration::from_millis(500)
        );
        assert_eq!(heartbeat_interval(Some("1m")), Duration::from_secs(60));
    }
}
