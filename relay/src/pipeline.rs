//! The relay's data path: source (binlog, PostgreSQL) → sink (Kafka, NATS) →
//! acknowledgements in order → checkpoint in Redis at commit boundaries.
//!
//! One task reads the binlog and queues records with the producer (pipelined
//! across transactions); the acker task awaits deliveries in queue order, so
//! when it reaches a commit marker every record before it is acknowledged,
//! and only then may the checkpoint move there.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::checkpoint::{now_ms, CheckpointError, CheckpointStore};
use crate::config::{BadRowPolicy, Config, ElectionMode};
use crate::election::redis_lock::RedisLock;
use crate::election::{process_identity, Backend, Elector, Leadership, LeaseLock};
use crate::kafka;
use crate::metrics::{label, seconds_since, Metrics};
use crate::outage::{next_backoff, Outage, SharedOutage, RETRY_FIRST};
use crate::outbox::{BadRow, Record};
use crate::position::Position;
use crate::sink::{self, Delivery, Sent, SinkError};
use crate::source::{Source, SourceError, SourceEvent};
use crate::status::{Progress, Role};

/// Why the relay stopped. Every variant is definite: transient failures are
/// retried where they happen.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(
        "bad outbox row id={id} in {table} at {at}{gtid}: {reason}. The relay stopped before it \
         (bad_row_policy = \"stop\"); the checkpoint stays before its transaction. To get past it, \
         set bad_row_policy = \"dead_letter\" with a dead_letter_topic ([kafka]) or \
         dead_letter_subject ([nats])"
    )]
    BadRow {
        id: String,
        table: String,
        at: String,
        gtid: String,
        reason: String,
    },
    #[error(
        "leadership lost (epoch {epoch}): stopped at once without a final checkpoint; \
         exiting so that a restart rejoins as a standby"
    )]
    LostLeadership { epoch: u64 },
    #[error("leader election: {0}")]
    Election(String),
    #[error("the broker did not acknowledge record id={id} for {topic}: {message}")]
    Delivery {
        id: String,
        topic: String,
        message: String,
        /// Sending again may succeed (`DeliveryError::definite`): the term
        /// restarts its stream instead of stopping.
        transient: bool,
    },
}

impl RelayError {
    /// A sink failure that a new session (producer, connection), resuming
    /// at the last acknowledged commit, may get past.
    fn restarts_stream(&self) -> bool {
        matches!(
            self,
            RelayError::Delivery {
                transient: true,
                ..
            } | RelayError::Sink(SinkError::SessionFailed { .. })
        )
    }
}

/// Liveness and readiness, shared with the HTTP server.
#[derive(Debug, Default)]
pub struct Health {
    /// Streaming: binlog open and records flowing to Kafka.
    pub ready: AtomicBool,
    /// Waiting warm for leadership (preflight passed, Redis reachable).
    pub standby: AtomicBool,
    /// Set when the relay stopped on a definite error.
    pub failed: AtomicBool,
}

enum Inflight {
    Delivery {
        fut: Delivery,
        table: Arc<str>,
        topic: String,
        id: String,
        bytes: u64,
        dead_letter: bool,
        /// When the row was read from the binlog.
        read_at: Instant,
    },
    /// A commit: resuming from the position starts after it; the server's
    /// commit time where the source knows it precisely.
    Commit(Position, Option<SystemTime>),
}

/// How long a stop waits for the commit of a transaction being read.
const FINISH_TXN: Duration = Duration::from_secs(10);

/// Runs the relay until `shutdown` is cancelled (returns Ok after a final
/// checkpoint) or a definite error stops it. With an election, the process
/// first waits warm as a standby (preflight passed, Redis reachable) until
/// it leads.
pub async fn run<S: Source>(
    cfg: Arc<Config>,
    metrics: Metrics,
    health: Arc<Health>,
    progress: Arc<Progress>,
    shutdown: CancellationToken,
) -> Result<(), RelayError> {
    let outcome = run_relay::<S>(cfg, metrics, health.clone(), progress.clone(), shutdown).await;
    // Every definite error — preflight, Redis refusing the relay, a bad row,
    // fencing — reaches the log, /healthz and the reported `lastError`.
    if let Err(e) = &outcome {
        health.failed.store(true, Ordering::Relaxed);
        progress.set_error(&e.to_string());
        error!(error = %e, "relay stopped");
    }
    outcome
}

async fn run_relay<S: Source>(
    cfg: Arc<Config>,
    metrics: Metrics,
    health: Arc<Health>,
    progress: Arc<Progress>,
    shutdown: CancellationToken,
) -> Result<(), RelayError> {
    let Some(opened) = open::<S>(&cfg, &shutdown).await? else {
        return Ok(());
    };
    let store = retry("redis", "connect to Redis", &shutdown, || {
        CheckpointStore::connect(&cfg.redis, &cfg.name)
    })
    .await?;
    let Some(store) = store else { return Ok(()) };
    let Some(stored) = retry("redis", "load the checkpoint", &shutdown, || store.load()).await?
    else {
        return Ok(());
    };
    let elector = elector(&cfg, &store).await?;
    // A standby waits with its sink connected (Kafka: the idempotent
    // producer has its id by then), so its first record after winning is not
    // held up by the producer's start (~0.5 s). If it cannot connect now, the
    // term connects (and reports why) when it begins.
    let mut warm = None;
    let (lead, opened) = match &elector {
        None => (Leadership::fixed(cfg.epoch), opened),
        Some(el) => {
            // A standby holds no database connection; it reconnects on taking over.
            drop(opened);
            warm = sink::connect(&cfg).await.ok();
            health.standby.store(true, Ordering::Relaxed);
            progress.set_role(Role::Standby);
            let won = el.campaign(stored.epoch, &shutdown).await;
            health.standby.store(false, Ordering::Relaxed);
            let Some(lead) = won.map_err(|e| RelayError::Election(e.to_string()))? else {
                return Ok(());
            };
            metrics.leadership_changes.inc();
            let Some(opened) = open::<S>(&cfg, &shutdown).await? else {
                el.release(&lead).await;
                return Ok(());
            };
            (lead, opened)
        }
    };
    metrics.is_leader.set(1);
    metrics.epoch.set(lead.epoch() as i64);
    progress.set_leader(&leader_name(&cfg), lead.epoch());
    if let Some((k, ct)) = cfg
        .kafka
        .as_ref()
        .and_then(|k| Some((k, k.create_topics.as_ref()?)))
    {
        let created = retry("kafka", "create the configured topics", &shutdown, || {
            kafka::create_topics(k, &ct.topics, ct.partitions)
        })
        .await;
        match created {
            Ok(Some(())) => {}
            Ok(None) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
    let mut opened = Some(opened);
    let sink_outage = Arc::new(SharedOutage::new(if cfg.nats.is_some() {
        "the NATS stream"
    } else {
        "the Kafka stream"
    }));
    let mut backoff = RETRY_FIRST;
    let outcome = loop {
        let opened = match opened.take() {
            Some(c) => c,
            None => match open::<S>(&cfg, &shutdown).await {
                Ok(Some(c)) => c,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            },
        };
        match lead_term::<S>(
            &cfg,
            &metrics,
            &health,
            &progress,
            &shutdown,
            &store,
            opened,
            &lead,
            &sink_outage,
            warm.take(),
        )
        .await
        {
            Err(e) if e.restarts_stream() && lead.is_valid() && !shutdown.is_cancelled() => {
                sink_outage.failed(
                    "restarting the stream at the last acknowledged commit with a new producer",
                    &e,
                );
                metrics.stream_restarts.inc();
                tokio::select! {
                    _ = shutdown.cancelled() => break Ok(()),
                    _ = lead.lost().cancelled() => break Err(RelayError::LostLeadership { epoch: lead.epoch() }),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = next_backoff(backoff);
            }
            other => break other,
        }
    };
    metrics.is_leader.set(0);
    progress.set_role(Role::Stopped);
    if let Some(el) = &elector {
        // A standby takes over at once instead of waiting out the lease.
        el.release(&lead).await;
    }
    outcome
}

/// How the leader is named in the status: the pod, else the configured
/// identity, else the host.
fn leader_name(cfg: &Config) -> String {
    std::env::var("POD_NAME")
        .ok()
        .or_else(|| cfg.election.identity.clone())
        .unwrap_or_else(|| process_identity(None))
}

/// Connects to the database and runs the preflight checks (None on shutdown).
async fn open<S: Source>(
    cfg: &Config,
    shutdown: &CancellationToken,
) -> Result<Option<S::Opened>, RelayError> {
    let what = format!("connect to {} and run the preflight checks", S::NAME);
    Ok(retry(S::NAME, &what, shutdown, || S::open(cfg)).await?)
}

/// The configured election, or None for a single process.
async fn elector(cfg: &Config, store: &CheckpointStore) -> Result<Option<Elector>, RelayError> {
    let e = &cfg.election;
    let identity = process_identity(e.identity.as_deref());
    let backend = match e.mode {
        ElectionMode::None => return Ok(None),
        ElectionMode::Redis => Backend::Redis(RedisLock::new(
            store.connection(),
            &cfg.redis.key_prefix,
            &cfg.name,
            &identity,
            e.lease_duration,
        )),
        ElectionMode::Kubernetes => {
            let client = kube::Client::try_default().await.map_err(|err| {
                RelayError::Election(format!(
                    "election.mode = \"kubernetes\": no Kubernetes client configuration: {err}"
                ))
            })?;
            let ns = e
                .namespace
                .clone()
                .or_else(|| std::env::var("POD_NAMESPACE").ok())
                .unwrap_or_else(|| client.default_namespace().to_owned());
            let name = e.lease_name(&cfg.name);
            info!(namespace = %ns, lease = %name, "leader election through a Kubernetes Lease");
            Backend::Lease(LeaseLock::new(
                kube::Api::namespaced(client, &ns),
                &name,
                &identity,
                &e.timing(),
            ))
        }
    };
    Ok(Some(Elector::new(backend, e.timing(), identity)))
}

/// One leadership term: fence the checkpoint with the term's epoch, resume
/// from it and stream until shutdown, a definite error or the term's end.
#[allow(clippy::too_many_arguments)]
async fn lead_term<S: Source>(
    cfg: &Arc<Config>,
    metrics: &Metrics,
    health: &Health,
    progress: &Arc<Progress>,
    shutdown: &CancellationToken,
    store: &CheckpointStore,
    opened: S::Opened,
    lead: &Arc<Leadership>,
    sink_outage: &Arc<SharedOutage>,
    warm: Option<Box<dyn sink::Sink>>,
) -> Result<(), RelayError> {
    let epoch = lead.epoch();
    // What a previous stream of this process read but never got
    // acknowledged is read again by this one.
    progress.restart_stream();
    // Claim the term: from now on an older writer is refused. Then read the
    // checkpoint, which includes everything an older writer saved before.
    store.fence(epoch).await?;
    let Some(stored) = retry("redis", "load the checkpoint", shutdown, || store.load()).await?
    else {
        return Ok(());
    };
    if let Some(p) = &stored.position {
        // What was sent after this checkpoint by an earlier run that did
        // not stop gracefully is sent again (at-least-once): its age
        // bounds that tail.
        let age = now_ms().saturating_sub(stored.updated_ms) as f64 / 1000.0;
        metrics.resumed_checkpoint_age.set(age);
        info!(position = %p.short(), at = %p.location(), key = store.key(), epoch, checkpoint_age_seconds = age,
            "resuming from the stored checkpoint; records an earlier run sent after it are sent again");
    }
    let (mut source, start) = S::begin(
        cfg.clone(),
        opened,
        stored.position,
        lead.clone(),
        metrics.clone(),
        progress.durable(),
    )
    .await?;
    progress.set_position(&start);

    let sink = match warm {
        Some(s) => s,
        None => {
            let Some(s) = retry(cfg.sink_kind(), "connect to the sink", shutdown, || {
                sink::connect(cfg)
            })
            .await?
            else {
                return Ok(());
            };
            s
        }
    };
    let shutdown = shutdown.clone();
    let metrics = metrics.clone();

    // How much in-flight work (records + commit markers) may be queued
    // between the reader and the acker. The producer's own queue is bounded too.
    let (tx, rx) = mpsc::channel::<Inflight>(cfg.max_in_flight);
    let acker = tokio::spawn(ack_loop(
        rx,
        store.clone(),
        lead.clone(),
        cfg.redis.checkpoint_interval,
        metrics.clone(),
        progress.clone(),
        shutdown.clone(),
        cfg.sink_kind(),
        sink_outage.clone(),
    ));
    let mut acker = std::pin::pin!(acker);
    health.ready.store(true, Ordering::Relaxed);
    metrics
        .takeover_seconds
        .set(lead.acquired().elapsed().as_secs_f64());
    let epoch_text = epoch.to_string();
    let max_bytes = cfg.max_message_bytes();

    let mut result: Result<(), RelayError> = Ok(());
    let mut acker_done = None;
    // Rows read since the last commit: a stop waits for their commit (up to
    // FINISH_TXN), so a graceful stop leaves nothing to send again.
    let mut open_rows = 0usize;
    let mut stop_by: Option<tokio::time::Instant> = None;
    loop {
        if stop_by.is_none() && shutdown.is_cancelled() {
            info!("shutting down: finish the open transaction, flush, final checkpoint");
            stop_by = Some(tokio::time::Instant::now() + FINISH_TXN);
        }
        if stop_by.is_some() && open_rows == 0 {
            break;
        }
        let deadline = stop_by.unwrap_or_else(|| tokio::time::Instant::now() + FINISH_TXN * 1000);
        let ev = tokio::select! {
            biased;
            _ = lead.lost().cancelled() => {
                result = Err(RelayError::LostLeadership { epoch });
                break;
            }
            _ = shutdown.cancelled(), if stop_by.is_none() => continue,
            _ = tokio::time::sleep_until(deadline), if stop_by.is_some() => {
                warn!(rows = open_rows, "stopping inside a transaction; its rows are sent again after a restart");
                break;
            }
            r = &mut acker => {
                acker_done = Some(r);
                break;
            }
            ev = source.next() => ev,
        };
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                result = Err(e.into());
                break;
            }
        };
        // Not one more record once the term is over (the renew deadline
        // passed even if the renewal task has not noticed yet).
        if !lead.is_valid() {
            result = Err(RelayError::LostLeadership { epoch });
            break;
        }
        let item = match ev {
            SourceEvent::Commit {
                position,
                committed_at,
                ..
            } => {
                open_rows = 0;
                progress.read_commit(position.commit_ts());
                Inflight::Commit(position, committed_at)
            }
            SourceEvent::Row {
                table,
                result: row,
                at,
                gtid,
            } => {
                open_rows += 1;
                let outcome = match row {
                    Ok(rec) => match sink.send(&table, &rec).await {
                        Ok(Sent::Queued(fut)) => Ok(delivery(fut, table.clone(), rec, false)),
                        Ok(Sent::Refused(reason)) => Err(BadRow {
                            reason,
                            id: Some(rec.id),
                            key: Some(rec.key),
                            value: rec.value,
                        }),
                        Err(e) => {
                            result = Err(e.into());
                            break;
                        }
                    },
                    Err(bad) => Err(bad),
                };
                match outcome {
                    Ok(item) => item,
                    Err(bad) => {
                        metrics
                            .errors
                            .get_or_create(&label("kind", "bad_row"))
                            .inc();
                        match cfg.bad_rows() {
                            (BadRowPolicy::DeadLetter, Some(dlq)) => {
                                warn!(id = bad.id.as_deref().unwrap_or("?"), table = %table, at = %at, reason = %bad.reason, topic = %dlq, "bad outbox row sent to the dead-letter topic");
                                let rec = sink::dead_letter(
                                    dlq,
                                    &bad,
                                    &table,
                                    &at,
                                    gtid.as_deref(),
                                    &epoch_text,
                                    max_bytes,
                                );
                                match sink.send(&table, &rec).await {
                                    Ok(Sent::Queued(fut)) => delivery(fut, table, rec, true),
                                    Ok(Sent::Refused(reason)) => {
                                        // Even the reason-only record is too big: give up clearly.
                                        result = Err(bad_row_error(&bad, &table, &at, gtid.as_deref(), &format!("{}; its dead-letter record was refused too: {reason}", bad.reason)));
                                        break;
                                    }
                                    Err(e) => {
                                        result = Err(e.into());
                                        break;
                                    }
                                }
                            }
                            _ => {
                                result = Err(bad_row_error(
                                    &bad,
                                    &table,
                                    &at,
                                    gtid.as_deref(),
                                    &bad.reason,
                                ));
                                break;
                            }
                        }
                    }
                }
            }
        };
        if tx.send(item).await.is_err() {
            // The acker stopped; its result says why.
            break;
        }
    }
    health.ready.store(false, Ordering::Relaxed);
    metrics.streaming.set(0);
    drop(tx);
    drop(source);
    if !lead.is_valid() {
        // Flush nothing further and write no final checkpoint: the next
        // leader resumes from the last checkpoint written in this term.
        acker.abort();
    }
    let acked = match acker_done {
        Some(r) => r,
        None => acker.await,
    };
    let acked = acked.unwrap_or_else(|e| {
        if e.is_cancelled() {
            Err(RelayError::LostLeadership { epoch })
        } else {
            Err(RelayError::Sink(SinkError::Failed {
                sink: "sink",
                message: format!("acknowledgement task failed: {e}"),
            }))
        }
    });
    // Report the first cause: a reader error explains an acker that stopped,
    // except a producer that failed after a delivery: the acker knows which.
    match (result, acked) {
        (Err(RelayError::Sink(SinkError::SessionFailed { .. })), Err(delivery)) => Err(delivery),
        (result, acked) => result.and(acked),
    }
}

fn bad_row_error(
    bad: &BadRow,
    table: &str,
    at: &str,
    gtid: Option<&str>,
    reason: &str,
) -> RelayError {
    RelayError::BadRow {
        id: bad.id.clone().unwrap_or_else(|| "?".into()),
        table: table.to_owned(),
        at: at.to_owned(),
        gtid: gtid.map(|g| format!(" (gtid {g})")).unwrap_or_default(),
        reason: reason.to_owned(),
    }
}

fn delivery(fut: Delivery, table: Arc<str>, rec: Record, dead_letter: bool) -> Inflight {
    Inflight::Delivery {
        fut,
        table,
        bytes: rec.value.as_ref().map_or(0, |v| v.len() as u64),
        topic: rec.topic,
        id: rec.id,
        dead_letter,
        read_at: Instant::now(),
    }
}

/// Awaits deliveries in queue order; at each commit marker the position is
/// acknowledged and, at most every `interval`, written to Redis.
#[allow(clippy::too_many_arguments)]
async fn ack_loop(
    mut rx: mpsc::Receiver<Inflight>,
    store: CheckpointStore,
    lead: Arc<Leadership>,
    interval: Duration,
    metrics: Metrics,
    progress: Arc<Progress>,
    shutdown: CancellationToken,
    sink_kind: &'static str,
    sink_outage: Arc<SharedOutage>,
) -> Result<(), RelayError> {
    let mut acked: Option<Position> = None;
    let mut redis = Outage::new("redis");
    let mut dirty = false;
    let mut last_write = Instant::now();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Counts per (table, topic), flushed into metrics at each commit.
    let mut counts: HashMap<(Arc<str>, String), (u64, u64)> = HashMap::new();
    let mut dead: HashMap<Arc<str>, u64> = HashMap::new();
    loop {
        tokio::select! {
            item = rx.recv() => match item {
                None => break,
                Some(Inflight::Delivery { fut, table, topic, id, bytes, dead_letter, read_at }) => {
                    match fut.await {
                        Ok(()) => {
                            sink_outage.recovered();
                            metrics.ack_latency.observe(read_at.elapsed().as_secs_f64());
                            if dead_letter {
                                *dead.entry(table).or_default() += 1;
                            } else {
                                let c = counts.entry((table, topic)).or_default();
                                c.0 += 1;
                                c.1 += bytes;
                            }
                        }
                        Err(e) => {
                            metrics.errors.get_or_create(&label("kind", sink_kind)).inc();
                            // Everything before the last commit marker is
                            // acknowledged: store it, so what follows is all
                            // that is sent again.
                            if dirty {
                                if let Err(w) = write(&mut redis, &store, &lead, &progress, acked.as_ref(), &metrics, &shutdown, true).await {
                                    warn!(error = %w, "cannot store the last acknowledged commit");
                                }
                            }
                            return Err(RelayError::Delivery { id, topic, message: e.message, transient: !e.definite });
                        }
                    }
                }
                Some(Inflight::Commit(p, committed_at)) => {
                    progress.acked_commit();
                    if let Some(t) = committed_at {
                        metrics.commit_ack_latency.observe(seconds_since(t));
                    }
                    for ((table, topic), (n, b)) in counts.drain() {
                        progress.add_published(n, b);
                        let l = vec![("table".to_string(), table.to_string()), ("topic".to_string(), topic)];
                        metrics.events.get_or_create(&l).inc_by(n);
                        metrics.bytes.get_or_create(&label("table", &table)).inc_by(b);
                    }
                    for (table, n) in dead.drain() {
                        metrics.dead_letters.get_or_create(&label("table", &table)).inc_by(n);
                    }
                    acked = Some(p);
                    dirty = true;
                    if last_write.elapsed() >= interval {
                        write(&mut redis, &store, &lead, &progress, acked.as_ref(), &metrics, &shutdown, false).await?;
                        dirty = false;
                        last_write = Instant::now();
                    }
                }
            },
            _ = tick.tick() => {
                if dirty {
                    write(&mut redis, &store, &lead, &progress, acked.as_ref(), &metrics, &shutdown, false).await?;
                    dirty = false;
                    last_write = Instant::now();
                }
            }
        }
        update_checkpoint_age(&metrics, acked.as_ref(), last_write);
    }
    if dirty {
        write(
            &mut redis,
            &store,
            &lead,
            &progress,
            acked.as_ref(),
            &metrics,
            &shutdown,
            true,
        )
        .await?;
    }
    // Only a term that is still valid ends with a final checkpoint; a lost
    // one stops at once (its last periodic write stands).
    if let Some(p) = acked.as_ref().filter(|_| lead.is_valid()) {
        info!(position = %p.short(), at = %p.location(), "final checkpoint stored");
    }
    Ok(())
}

/// The lag itself is measured by the status reporter (also while this loop
/// waits on Kafka).
fn update_checkpoint_age(metrics: &Metrics, acked: Option<&Position>, last_write: Instant) {
    metrics
        .checkpoint_age
        .set(last_write.elapsed().as_secs_f64());
    if let Some(p) = acked {
        metrics.checkpoint_commit_time.set(p.commit_ts() as i64);
    }
}

/// Writes the checkpoint, retrying while Redis is unavailable (the pipeline
/// pauses meanwhile: the in-flight queue fills and the reader waits). On the
/// final write during shutdown, gives up after 30 s: nothing is lost, the
/// unsaved tail is sent again after a restart.
#[allow(clippy::too_many_arguments)]
async fn write(
    redis: &mut Outage,
    store: &CheckpointStore,
    lead: &Leadership,
    progress: &Progress,
    pos: Option<&Position>,
    metrics: &Metrics,
    shutdown: &CancellationToken,
    last: bool,
) -> Result<(), RelayError> {
    let Some(pos) = pos else { return Ok(()) };
    let epoch = lead.epoch();
    let started = Instant::now();
    let mut backoff = RETRY_FIRST;
    loop {
        // Re-check the claim right before writing; the epoch fence in Redis
        // refuses the write anyway if a newer term has begun.
        if !lead.is_valid() {
            return Err(RelayError::LostLeadership { epoch });
        }
        match store.save(epoch, pos).await {
            Ok(()) => {
                redis.recovered();
                progress.set_position(pos);
                metrics.checkpoints.inc();
                metrics.checkpoint_offset.set(pos.offset() as i64);
                return Ok(());
            }
            Err(CheckpointError::Unavailable(e)) => {
                metrics.errors.get_or_create(&label("kind", "redis")).inc();
                if (last || shutdown.is_cancelled()) && started.elapsed() > Duration::from_secs(30)
                {
                    return Err(CheckpointError::Unavailable(format!(
                        "{e}; final checkpoint at {} not written (the tail after the previous checkpoint will be sent again)",
                        pos.short()
                    ))
                    .into());
                }
                redis.failed(&format!("checkpoint write failed; holding the checkpoint in memory until Redis answers (at {}; reading pauses once max_in_flight records are in flight)", pos.short()), &e);
                tokio::time::sleep(backoff).await;
                backoff = next_backoff(backoff);
            }
            Err(e) => {
                if matches!(e, CheckpointError::Fenced { .. }) {
                    metrics.errors.get_or_create(&label("kind", "fenced")).inc();
                }
                return Err(e.into());
            }
        }
    }
}

/// Errors that say whether retrying may help.
trait Transient: std::fmt::Display {
    fn is_transient(&self) -> bool;
}

impl Transient for SourceError {
    fn is_transient(&self) -> bool {
        SourceError::is_transient(self)
    }
}

impl Transient for SinkError {
    fn is_transient(&self) -> bool {
        matches!(self, SinkError::Unavailable { .. })
    }
}

impl Transient for CheckpointError {
    fn is_transient(&self) -> bool {
        matches!(self, CheckpointError::Unavailable(_))
    }
}

/// Retries a start-up step with backoff while its error is transient, until
/// it works, a definite error comes, or shutdown (→ None).
async fn retry<T, E, F, Fut>(
    dependency: &'static str,
    what: &str,
    shutdown: &CancellationToken,
    mut f: F,
) -> Result<Option<T>, E>
where
    E: Transient,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut backoff = RETRY_FIRST;
    let mut outage = Outage::new(dependency);
    loop {
        match f().await {
            Ok(v) => {
                outage.recovered();
                return Ok(Some(v));
            }
            Err(e) if e.is_transient() => outage.failed(&format!("cannot {what}"), &e),
            Err(e) => return Err(e),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = next_backoff(backoff);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_kafka_failures_restart_the_stream() {
        let delivery = |transient| RelayError::Delivery {
            id: "7".into(),
            topic: "t".into(),
            message: "m".into(),
            transient,
        };
        assert!(delivery(true).restarts_stream());
        assert!(RelayError::Sink(SinkError::SessionFailed {
            sink: "kafka",
            message: "fatal".into()
        })
        .restarts_stream());
        // A record refused for good, or anything else, stops the relay.
        assert!(!delivery(false).restarts_stream());
        assert!(!RelayError::Sink(SinkError::Rejected {
            sink: "kafka",
            id: "7".into(),
            message: "unknown topic".into()
        })
        .restarts_stream());
        assert!(!RelayError::LostLeadership { epoch: 3 }.restarts_stream());
    }
}
