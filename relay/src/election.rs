//! Leader election: among the processes of one relay (or of the operator)
//! exactly one leads at a time; the others wait warm and take over when the
//! leader's lease runs out.
//!
//! Backends: a Kubernetes `coordination.k8s.io/v1` Lease, or a Redis key
//! (`SET NX PX`) for relays outside Kubernetes. Every term has an **epoch**
//! that only grows (the Lease's `leaseTransitions`, or a Redis counter); the
//! relay fences its checkpoint with it and stamps it on every record.
//!
//! Timing is judged on each process's own monotonic clock, never by comparing
//! timestamps written by another machine, so clock skew between nodes does
//! not matter; only clock *rates* do, and the gap between `renew_deadline`
//! and `lease_duration` absorbs those:
//! - the leader counts its term from the moment it *sent* its last successful
//!   renewal and stops leading `renew_deadline` after it;
//! - a candidate counts from the moment it *saw* the record last change (or
//!   Redis expires the key, `lease_duration` after it received the renewal)
//!   and takes over only `lease_duration` after that.
//!
//! Since a renewal is seen after it was sent, the old leader has stopped
//! (`renew_deadline` < `lease_duration`) before anyone else may start.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::Api;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum ElectionError {
    /// The lock store is unreachable or busy: retry.
    #[error("{0}")]
    Unavailable(String),
    /// Retrying will not help (for example: not allowed to touch the Lease).
    #[error("{0}")]
    Definite(String),
}

/// Lease timing. With the defaults a standby takes over 0.75–1.25 s after
/// the leader died (a lease of 1 s, less the part of a renewal period since
/// its last renewal; a Kubernetes candidate that cannot watch the Lease sees
/// that renewal up to one period late), so a crash costs about one second of
/// streaming. Each leader renews 4 times a second: for a Kubernetes Lease
/// that is 4 writes a second, which the standbys' watches receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How long a candidate waits after the lease last changed before it
    /// takes over.
    pub lease_duration: Duration,
    /// How long the leader keeps leading after its last successful renewal
    /// was sent. Must be shorter than `lease_duration`.
    pub renew_deadline: Duration,
    /// How often the leader renews and a candidate tries to acquire.
    pub retry_period: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            lease_duration: Duration::from_secs(1),
            renew_deadline: Duration::from_millis(750),
            retry_period: Duration::from_millis(250),
        }
    }
}

impl Timing {
    /// The ordering that makes the timing safe, or which field breaks it.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.retry_period.is_zero() {
            return Err(("retry_period", "must be greater than 0".into()));
        }
        if self.renew_deadline <= self.retry_period {
            return Err((
                "renew_deadline",
                format!(
                    "must be longer than retry_period ({:?}) so a renewal can be retried",
                    self.retry_period
                ),
            ));
        }
        if self.lease_duration <= self.renew_deadline {
            return Err((
                "lease_duration",
                format!(
                    "must be longer than renew_deadline ({:?}): a leader stops before anyone may take over",
                    self.renew_deadline
                ),
            ));
        }
        Ok(())
    }
}

/// Outcome of one attempt to acquire the lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// This process leads now, with this epoch.
    Won(u64),
    /// Someone else holds it; it may be taken at the earliest this long from
    /// now (zero: try again at once, a race was lost).
    Held(Duration),
}

/// Outcome of one renewal attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewal {
    /// The store confirmed our claim.
    Renewed,
    /// Someone else holds the lock now, or a newer term began.
    Refused,
    /// No answer (store down, timeout, write conflict): try again.
    Failed,
}

/// The leader's own view of its term (pure; the clock is passed in).
#[derive(Debug, Clone, Copy)]
pub struct Claim {
    deadline: Instant,
    renew_deadline: Duration,
}

impl Claim {
    /// A term acquired by a request sent at `sent`.
    pub fn new(sent: Instant, timing: &Timing) -> Claim {
        Claim {
            deadline: sent + timing.renew_deadline,
            renew_deadline: timing.renew_deadline,
        }
    }

    /// Applies the outcome of a renewal sent at `sent`, judged at `now`;
    /// false when the term is over.
    pub fn on_renewal(&mut self, sent: Instant, outcome: Renewal, now: Instant) -> bool {
        match outcome {
            Renewal::Renewed => {
                self.deadline = self.deadline.max(sent + self.renew_deadline);
                now < self.deadline
            }
            Renewal::Refused => false,
            Renewal::Failed => now < self.deadline,
        }
    }

    pub fn valid(&self, now: Instant) -> bool {
        now < self.deadline
    }

    pub fn deadline(&self) -> Instant {
        self.deadline
    }
}

/// A candidate's view of someone else's lease: expired once it has not
/// changed for `lease_duration` on *our* clock (pure; the clock is passed in).
#[derive(Debug, Default)]
pub struct Observer {
    seen: Option<(String, Instant)>,
}

impl Observer {
    /// How long until the lease may be taken, judged at `now`: zero once it
    /// has not changed for `lease_duration`. `version` identifies the
    /// record's content (resourceVersion); `holder` is None when nobody
    /// holds it (released).
    pub fn remaining(
        &mut self,
        version: &str,
        holder: Option<&str>,
        now: Instant,
        lease_duration: Duration,
    ) -> Duration {
        if holder.is_none_or(str::is_empty) {
            return Duration::ZERO;
        }
        match &self.seen {
            Some((v, _)) if v == version => {}
            _ => self.seen = Some((version.to_owned(), now)),
        }
        self.left(now, lease_duration)
    }

    /// The time left as of the last change seen (zero when none is known).
    pub fn left(&self, now: Instant, lease_duration: Duration) -> Duration {
        self.seen.as_ref().map_or(Duration::ZERO, |(_, at)| {
            (*at + lease_duration).saturating_duration_since(now)
        })
    }

    /// Released or deleted: nothing to wait for.
    pub fn forget(&mut self) {
        self.seen = None;
    }
}

/// The epoch of a new term: above the previous term's and above `floor` (the
/// newest epoch the checkpoint has seen, in case the Lease was recreated).
pub fn next_epoch(transitions: Option<i32>, floor: u64) -> u64 {
    let prev = transitions.map_or(0, |t| t.max(0) as u64);
    prev.max(floor) + 1
}

/// A held term, shared with the data path. `is_valid` is cheap enough to ask
/// before every record.
#[derive(Debug)]
pub struct Leadership {
    epoch: u64,
    base: Instant,
    /// Millis after `base` until which the term is valid.
    deadline_ms: AtomicU64,
    lost: CancellationToken,
    stop: CancellationToken,
    acquired: Instant,
}

impl Leadership {
    fn new(epoch: u64, deadline: Option<Instant>) -> Leadership {
        let base = Instant::now();
        let l = Leadership {
            epoch,
            base,
            deadline_ms: AtomicU64::new(u64::MAX),
            lost: CancellationToken::new(),
            stop: CancellationToken::new(),
            acquired: base,
        };
        if let Some(d) = deadline {
            l.set_deadline(d);
        }
        l
    }

    /// A term nobody contests (`election = none`).
    pub fn fixed(epoch: u64) -> Arc<Leadership> {
        Arc::new(Leadership::new(epoch, None))
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// When the term began.
    pub fn acquired(&self) -> Instant {
        self.acquired
    }

    fn set_deadline(&self, d: Instant) {
        let ms = d.saturating_duration_since(self.base).as_millis() as u64;
        self.deadline_ms.store(ms, Ordering::Release);
    }

    /// Still leading: not lost, and the renew deadline has not passed.
    pub fn is_valid(&self) -> bool {
        if self.lost.is_cancelled() {
            return false;
        }
        let now_ms = self.base.elapsed().as_millis() as u64;
        now_ms < self.deadline_ms.load(Ordering::Acquire)
    }

    /// Cancelled when the term ends involuntarily (refused, deadline passed,
    /// renewal task gone).
    pub fn lost(&self) -> &CancellationToken {
        &self.lost
    }
}

/// Where the lock lives.
pub enum Backend {
    Lease(LeaseLock),
    #[cfg(feature = "relay")]
    Redis(redis_lock::RedisLock),
}

impl Backend {
    async fn try_acquire(&self, floor: u64) -> Result<Attempt, ElectionError> {
        match self {
            Backend::Lease(l) => l.try_acquire(floor).await,
            #[cfg(feature = "relay")]
            Backend::Redis(r) => r.try_acquire().await,
        }
    }

    async fn renew(&self, epoch: u64) -> Renewal {
        let r = match self {
            Backend::Lease(l) => l.renew(epoch).await,
            #[cfg(feature = "relay")]
            Backend::Redis(r) => r.renew(epoch).await,
        };
        match r {
            Ok(true) => Renewal::Renewed,
            Ok(false) => Renewal::Refused,
            Err(e) => {
                warn!(error = %e, "lease renewal failed; retrying");
                Renewal::Failed
            }
        }
    }

    async fn release(&self, epoch: u64) -> Result<(), ElectionError> {
        match self {
            Backend::Lease(l) => l.release(epoch).await,
            #[cfg(feature = "relay")]
            Backend::Redis(r) => r.release(epoch).await,
        }
    }

    fn describe(&self) -> String {
        match self {
            Backend::Lease(l) => format!("Lease {}", l.name),
            #[cfg(feature = "relay")]
            Backend::Redis(r) => format!("Redis key {}", r.key()),
        }
    }
}

/// The shortest wait between two attempts (a lost race is retried at once,
/// but never in a tight loop).
const MIN_WAIT: Duration = Duration::from_millis(2);

/// Campaigns for and keeps a term.
pub struct Elector {
    backend: Arc<Backend>,
    timing: Timing,
    identity: String,
}

impl Elector {
    pub fn new(backend: Backend, timing: Timing, identity: String) -> Elector {
        Elector {
            backend: Arc::new(backend),
            timing,
            identity,
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Waits until this process leads (None if `shutdown` comes first), then
    /// keeps renewing in a background task. `floor` is the newest epoch known
    /// elsewhere (the checkpoint's): the new epoch will be above it.
    pub async fn campaign(
        &self,
        floor: u64,
        shutdown: &CancellationToken,
    ) -> Result<Option<Arc<Leadership>>, ElectionError> {
        let what = self.backend.describe();
        info!(lock = %what, identity = %self.identity, "waiting for leadership (standby)");
        let mut logged = false;
        loop {
            let sent = Instant::now();
            let wait = match self.backend.try_acquire(floor).await {
                Ok(Attempt::Won(epoch)) => {
                    let claim = Claim::new(sent, &self.timing);
                    let lead = Arc::new(Leadership::new(epoch, Some(claim.deadline())));
                    info!(lock = %what, identity = %self.identity, epoch, "acquired leadership");
                    tokio::spawn(keep(self.backend.clone(), self.timing, claim, lead.clone()));
                    return Ok(Some(lead));
                }
                // Try again when the holder's lease runs out, not up to a
                // whole retry period later: a takeover starts the moment
                // the lock may be taken.
                Ok(Attempt::Held(left)) => {
                    logged = false;
                    left.min(self.timing.retry_period).max(MIN_WAIT)
                }
                Err(ElectionError::Unavailable(e)) => {
                    if !logged {
                        warn!(lock = %what, error = %e, "cannot reach the lock; retrying");
                        logged = true;
                    }
                    self.timing.retry_period
                }
                Err(e) => return Err(e),
            };
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Ends a term on purpose (graceful stop, after the final checkpoint) so
    /// a standby takes over at once instead of waiting for the lease to run out.
    pub async fn release(&self, lead: &Leadership) {
        lead.stop.cancel();
        if lead.lost.is_cancelled() {
            return;
        }
        match tokio::time::timeout(self.timing.renew_deadline, self.backend.release(lead.epoch))
            .await
        {
            Ok(Ok(())) => info!(epoch = lead.epoch, "leadership released"),
            Ok(Err(e)) => warn!(error = %e, "could not release leadership; it expires by itself"),
            Err(_) => warn!("releasing leadership timed out; it expires by itself"),
        }
    }
}

/// Renews every `retry_period` until released or lost. Any way out of this
/// task (including a panic) ends the term.
async fn keep(backend: Arc<Backend>, timing: Timing, mut claim: Claim, lead: Arc<Leadership>) {
    let guard = lead.lost.clone().drop_guard();
    loop {
        tokio::select! {
            _ = lead.stop.cancelled() => {
                // Released on purpose: not "lost".
                guard.disarm();
                return;
            }
            _ = tokio::time::sleep(timing.retry_period) => {}
        }
        let sent = Instant::now();
        let outcome = tokio::select! {
            r = backend.renew(lead.epoch) => r,
            _ = tokio::time::sleep_until(claim.deadline()) => Renewal::Failed,
        };
        let leading = claim.on_renewal(sent, outcome, Instant::now());
        lead.set_deadline(claim.deadline());
        if !leading {
            if lead.stop.is_cancelled() {
                guard.disarm();
                return;
            }
            warn!(
                epoch = lead.epoch,
                refused = outcome == Renewal::Refused,
                "leadership lost: stopping at once"
            );
            return;
        }
    }
}

/// An identity unique to this process: `<pod or host name>-<pid>-<random>`,
/// so a restarted process always begins a new term.
pub fn process_identity(base: Option<&str>) -> String {
    let host = base
        .map(str::to_owned)
        .or_else(|| std::env::var("POD_NAME").ok())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_owned())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "relay".into());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{host}-{}-{:08x}", std::process::id(), nanos)
}

/// A `coordination.k8s.io/v1` Lease, updated with optimistic concurrency:
/// a resourceVersion conflict means someone else wrote first, which is
/// normal traffic between candidates.
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    lease_duration: Duration,
    observer: Arc<Mutex<Observer>>,
    /// True while a watch of the Lease keeps `observer` current: a candidate
    /// then sees a renewal within milliseconds and reads nothing until the
    /// lease may have run out. Otherwise (the watch failed, or is refused to
    /// a ServiceAccount without `watch`) it reads the Lease at every look.
    watched: Arc<AtomicBool>,
    /// The Lease as the watch last delivered it: once it may be taken, a
    /// watching candidate replaces it at once (the replace is conditional on
    /// its resourceVersion) instead of reading it first.
    last_seen: Arc<Mutex<Option<Box<Lease>>>>,
    watcher: tokio::task::AbortHandle,
    /// The Lease as this process last wrote it: a renewal replaces it
    /// without reading it first (one request, not two); a conflict means
    /// someone else wrote, and the next renewal reads it again.
    written: Mutex<Option<Box<Lease>>>,
}

impl LeaseLock {
    /// Also starts watching the Lease (a task that ends with the lock).
    pub fn new(api: Api<Lease>, name: &str, identity: &str, timing: &Timing) -> LeaseLock {
        let observer = Arc::new(Mutex::new(Observer::default()));
        let watched = Arc::new(AtomicBool::new(false));
        let last_seen = Arc::new(Mutex::new(None));
        let watcher = tokio::spawn(watch_lease(
            api.clone(),
            name.to_owned(),
            timing.lease_duration,
            observer.clone(),
            watched.clone(),
            last_seen.clone(),
        ))
        .abort_handle();
        LeaseLock {
            api,
            name: name.to_owned(),
            identity: identity.to_owned(),
            lease_duration: timing.lease_duration,
            observer,
            watched,
            last_seen,
            watcher,
            written: Mutex::default(),
        }
    }

    fn spec(&self, epoch: u64, acquire: bool, old: Option<&LeaseSpec>) -> LeaseSpec {
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.lease_duration.as_secs_f64().ceil().max(1.0) as i32),
            lease_transitions: Some(i32::try_from(epoch).unwrap_or(i32::MAX)),
            acquire_time: if acquire {
                Some(now.clone())
            } else {
                old.and_then(|s| s.acquire_time.clone())
            },
            renew_time: Some(now),
            ..LeaseSpec::default()
        }
    }

    fn remember(&self, lease: Lease) {
        *self.written.lock().expect("lease cache") = Some(Box::new(lease));
    }

    async fn try_acquire(&self, floor: u64) -> Result<Attempt, ElectionError> {
        let watched = self.watched.load(Ordering::Relaxed);
        if watched {
            let left = self
                .observer
                .lock()
                .expect("observer lock")
                .left(Instant::now(), self.lease_duration);
            if !left.is_zero() {
                return Ok(Attempt::Held(left));
            }
        }
        let now = Instant::now();
        let seen = watched
            .then(|| self.last_seen.lock().expect("lease seen").clone())
            .flatten();
        let current = match seen {
            Some(l) => Some(*l),
            None => self.api.get_opt(&self.name).await.map_err(kube_error)?,
        };
        let Some(mut lease) = current else {
            let epoch = next_epoch(None, floor);
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(epoch, true, None)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(l) => {
                    self.remember(l);
                    Ok(Attempt::Won(epoch))
                }
                Err(e) if is_conflict(&e) => Ok(Attempt::Held(Duration::ZERO)),
                Err(e) => Err(kube_error(e)),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        let left = self.observer.lock().expect("observer lock").remaining(
            &version,
            spec.holder_identity.as_deref(),
            now,
            self.lease_duration,
        );
        if !left.is_zero() {
            return Ok(Attempt::Held(left));
        }
        let epoch = next_epoch(spec.lease_transitions, floor);
        lease.spec = Some(self.spec(epoch, true, Some(&spec)));
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(l) => {
                self.remember(l);
                Ok(Attempt::Won(epoch))
            }
            // Someone wrote it first, or (a Lease the watch delivered) it
            // was deleted since: look again.
            Err(e) if is_conflict(&e) || is_not_found(&e) => Ok(Attempt::Held(Duration::ZERO)),
            Err(e) => Err(kube_error(e)),
        }
    }

    /// Ours and still this term: renew. Someone else's or a newer term: false.
    async fn renew(&self, epoch: u64) -> Result<bool, ElectionError> {
        let cached = self.written.lock().expect("lease cache").take();
        let mut lease = match cached {
            Some(l) => *l,
            None => self.api.get(&self.name).await.map_err(kube_error)?,
        };
        let spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(&self.identity)
            || spec.lease_transitions.map(|t| t as u64) != Some(epoch)
        {
            return Ok(false);
        }
        lease.spec = Some(self.spec(epoch, false, Some(&spec)));
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(l) => {
                self.remember(l);
                Ok(true)
            }
            // Someone wrote in between: look again next round.
            Err(e) if is_conflict(&e) => Err(ElectionError::Unavailable(
                "lease changed while renewing".into(),
            )),
            Err(e) => Err(kube_error(e)),
        }
    }

    async fn release(&self, epoch: u64) -> Result<(), ElectionError> {
        let mut lease = self.api.get(&self.name).await.map_err(kube_error)?;
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(&self.identity)
            || spec.lease_transitions.map(|t| t as u64) != Some(epoch)
        {
            return Ok(());
        }
        spec.holder_identity = None;
        lease.spec = Some(spec);
        self.api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
            .map(|_| ())
            .map_err(kube_error)
    }
}

impl Drop for LeaseLock {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

/// Keeps `observer` and `last_seen` current from a watch of the Lease
/// `name` (a read, then a watch from its version; again when it ends, after
/// an error 250 ms later doubling to 30 s, so a refused watch costs little).
/// `watched` is true only while that watch is up.
async fn watch_lease(
    api: Api<Lease>,
    name: String,
    lease_duration: Duration,
    observer: Arc<Mutex<Observer>>,
    watched: Arc<AtomicBool>,
    last_seen: Arc<Mutex<Option<Box<Lease>>>>,
) {
    use futures_util::StreamExt;
    use kube::api::{WatchEvent, WatchParams};
    let see = |l: &Lease| {
        *last_seen.lock().expect("lease seen") = Some(Box::new(l.clone()));
        let mut o = observer.lock().expect("observer lock");
        let holder = l.spec.as_ref().and_then(|s| s.holder_identity.as_deref());
        let version = l.metadata.resource_version.as_deref().unwrap_or_default();
        if o.remaining(version, holder, Instant::now(), lease_duration)
            .is_zero()
        {
            o.forget();
        }
    };
    let mut logged = false;
    let mut backoff = Duration::from_millis(250);
    loop {
        let outcome: Result<(), kube::Error> = async {
            let Some(current) = api.get_opt(&name).await? else {
                return Ok(());
            };
            see(&current);
            let version = current
                .metadata
                .resource_version
                .clone()
                .unwrap_or_default();
            let params = WatchParams::default().fields(&format!("metadata.name={name}"));
            let mut events = api.watch(&params, &version).await?.boxed();
            watched.store(true, Ordering::Relaxed);
            while let Some(ev) = events.next().await {
                match ev? {
                    WatchEvent::Added(l) | WatchEvent::Modified(l) => see(&l),
                    WatchEvent::Deleted(_) | WatchEvent::Error(_) => return Ok(()),
                    WatchEvent::Bookmark(_) => {}
                }
            }
            Ok(())
        }
        .await;
        let was_up = watched.swap(false, Ordering::Relaxed);
        *last_seen.lock().expect("lease seen") = None;
        match outcome {
            Err(e) => {
                if !logged {
                    info!(lease = %name, error = %e, "cannot watch the Lease; reading it at every look instead");
                    logged = true;
                }
                if was_up {
                    backoff = Duration::from_millis(250);
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
            Ok(()) => {
                backoff = Duration::from_millis(250);
                tokio::time::sleep(backoff).await;
            }
        }
    }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

fn kube_error(e: kube::Error) -> ElectionError {
    match &e {
        kube::Error::Api(s) if s.code == 401 || s.code == 403 || s.code == 404 => {
            ElectionError::Definite(format!(
                "lease: {} (check the Role allows get/create/update on leases)",
                s.message
            ))
        }
        _ => ElectionError::Unavailable(format!("lease: {e}")),
    }
}

#[cfg(feature = "relay")]
pub mod redis_lock {
    //! The lock as a Redis key `<prefix><name>:leader` holding
    //! `"<epoch> <identity>"` with a TTL of `lease_duration`; the epoch
    //! counter `<prefix><name>:epoch` never goes below the checkpoint's.

    use std::time::Duration;

    use redis::aio::ConnectionManager;
    use redis::Script;

    use super::{Attempt, ElectionError};
    use crate::keys;

    /// KEYS leader, epoch counter, checkpoint; ARGV identity, ttl ms.
    /// Returns {1, epoch} when acquired, else {0, ms until the key expires}.
    const ACQUIRE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return {0, redis.call('PTTL', KEYS[1])} end
local e = tonumber(redis.call('GET', KEYS[2]) or '0')
local c = tonumber(redis.call('HGET', KEYS[3], 'epoch') or '0')
if c > e then e = c end
e = e + 1
redis.call('SET', KEYS[2], e)
redis.call('SET', KEYS[1], e .. ' ' .. ARGV[1], 'PX', ARGV[2])
return {1, e}
"#;

    /// KEYS leader; ARGV value, ttl ms.
    const RENEW: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"#;

    /// KEYS leader; ARGV value.
    const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

    pub struct RedisLock {
        conn: ConnectionManager,
        leader: String,
        counter: String,
        checkpoint: String,
        identity: String,
        ttl_ms: u64,
        acquire: Script,
        renew: Script,
        release: Script,
    }

    fn unavailable(e: redis::RedisError) -> ElectionError {
        ElectionError::Unavailable(format!("redis: {e}"))
    }

    impl RedisLock {
        /// The lock of relay `relay` under `prefix` (see [`crate::keys`]).
        pub fn new(
            conn: ConnectionManager,
            prefix: &str,
            relay: &str,
            identity: &str,
            lease_duration: Duration,
        ) -> RedisLock {
            RedisLock {
                conn,
                leader: keys::leader_key(prefix, relay),
                counter: keys::epoch_key(prefix, relay),
                checkpoint: keys::checkpoint_key(prefix, relay),
                identity: identity.to_owned(),
                ttl_ms: lease_duration.as_millis().max(1) as u64,
                acquire: Script::new(ACQUIRE),
                renew: Script::new(RENEW),
                release: Script::new(RELEASE),
            }
        }

        pub fn key(&self) -> &str {
            &self.leader
        }

        fn value(&self, epoch: u64) -> String {
            format!("{epoch} {}", self.identity)
        }

        pub(super) async fn try_acquire(&self) -> Result<Attempt, ElectionError> {
            let mut c = self.conn.clone();
            let (ok, v): (i64, i64) = self
                .acquire
                .key(&self.leader)
                .key(&self.counter)
                .key(&self.checkpoint)
                .arg(&self.identity)
                .arg(self.ttl_ms)
                .invoke_async(&mut c)
                .await
                .map_err(unavailable)?;
            if ok == 1 {
                return u64::try_from(v)
                    .map(Attempt::Won)
                    .map_err(|_| ElectionError::Definite(format!("redis: bad epoch `{v}`")));
            }
            // PTTL is -1 for a key without expiry (not written by a relay):
            // look again at the usual period.
            Ok(Attempt::Held(
                u64::try_from(v).map_or(Duration::MAX, Duration::from_millis),
            ))
        }

        pub(super) async fn renew(&self, epoch: u64) -> Result<bool, ElectionError> {
            let mut c = self.conn.clone();
            let ok: i64 = self
                .renew
                .key(&self.leader)
                .arg(self.value(epoch))
                .arg(self.ttl_ms)
                .invoke_async(&mut c)
                .await
                .map_err(unavailable)?;
            Ok(ok == 1)
        }

        pub(super) async fn release(&self, epoch: u64) -> Result<(), ElectionError> {
            let mut c = self.conn.clone();
            let _: i64 = self
                .release
                .key(&self.leader)
                .arg(self.value(epoch))
                .invoke_async(&mut c)
                .await
                .map_err(unavailable)?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The timing these tests' figures are written for (not the defaults).
    fn t() -> Timing {
        Timing {
            lease_duration: Duration::from_secs(3),
            renew_deadline: Duration::from_secs(2),
            retry_period: Duration::from_millis(500),
        }
    }

    #[test]
    fn timing_must_leave_a_gap() {
        assert!(t().check().is_ok());
        let bad = Timing {
            renew_deadline: Duration::from_secs(3),
            ..t()
        };
        assert_eq!(bad.check().unwrap_err().0, "lease_duration");
        let bad = Timing {
            retry_period: Duration::from_secs(2),
            ..t()
        };
        assert_eq!(bad.check().unwrap_err().0, "renew_deadline");
        let bad = Timing {
            retry_period: Duration::ZERO,
            ..t()
        };
        assert_eq!(bad.check().unwrap_err().0, "retry_period");
    }

    #[test]
    fn leader_renews_and_keeps_its_term() {
        let t0 = Instant::now();
        let s = |ms| t0 + Duration::from_millis(ms);
        let mut c = Claim::new(t0, &t());
        assert!(c.valid(s(1_999)) && !c.valid(s(2_000)));
        // Renewed at 500 ms (answered at 600): valid until 2.5 s.
        assert!(c.on_renewal(s(500), Renewal::Renewed, s(600)));
        assert!(c.valid(s(2_499)) && !c.valid(s(2_500)));
        // A slow answer that arrives after the deadline does not revive it.
        assert!(!c.on_renewal(s(900), Renewal::Renewed, s(2_950)));
        // An older renewal answered late never moves the deadline back.
        let mut c = Claim::new(t0, &t());
        c.on_renewal(s(1_000), Renewal::Renewed, s(1_010));
        c.on_renewal(s(500), Renewal::Renewed, s(1_020));
        assert_eq!(c.deadline(), s(3_000));
    }

    #[test]
    fn leader_loses_on_refusal_or_after_the_renew_deadline() {
        let t0 = Instant::now();
        let s = |ms| t0 + Duration::from_millis(ms);
        let mut c = Claim::new(t0, &t());
        assert!(!c.on_renewal(s(500), Renewal::Refused, s(510)), "refused");
        let mut c = Claim::new(t0, &t());
        assert!(
            c.on_renewal(s(500), Renewal::Failed, s(1_000)),
            "one failure"
        );
        assert!(c.on_renewal(s(1_000), Renewal::Failed, s(1_999)));
        assert!(
            !c.on_renewal(s(1_500), Renewal::Failed, s(2_000)),
            "deadline"
        );
    }

    #[test]
    fn candidate_waits_a_full_lease_after_the_last_change_it_saw() {
        let t0 = Instant::now();
        let s = |ms| t0 + Duration::from_millis(ms);
        let d = t().lease_duration;
        let ms = Duration::from_millis;
        let mut o = Observer::default();
        // First sight starts the clock, however old the lease looks.
        assert_eq!(o.remaining("1", Some("a"), s(0), d), ms(3_000));
        assert_eq!(o.remaining("1", Some("a"), s(2_999), d), ms(1));
        // A renewal (new resourceVersion) restarts it.
        assert_eq!(o.remaining("2", Some("a"), s(2_000), d), ms(3_000));
        assert_eq!(o.remaining("2", Some("a"), s(4_999), d), ms(1));
        assert!(o.remaining("2", Some("a"), s(5_000), d).is_zero());
        assert!(o.remaining("2", Some("a"), s(9_000), d).is_zero());
        // What a watch keeps current: the time left without a new look,
        // nothing to wait for once released.
        assert_eq!(o.left(s(4_000), d), ms(1_000));
        o.forget();
        assert!(o.left(s(4_000), d).is_zero());
        // Released or never held: take it now.
        assert!(Observer::default().remaining("3", None, s(0), d).is_zero());
        assert!(Observer::default()
            .remaining("3", Some(""), s(0), d)
            .is_zero());
    }

    #[test]
    fn clock_skew_between_nodes_does_not_shorten_a_term() {
        // Neither side reads the other's timestamps: the candidate's clock
        // starts when it sees a change, which is after the leader sent it.
        // With any skew, the leader's deadline (sent + 2 s) comes before the
        // candidate's earliest takeover (seen + 3 s), with 1 s to spare for
        // clocks running at different rates.
        let t0 = Instant::now();
        let timing = t();
        for delay_ms in [0u64, 1, 250, 1_999] {
            let sent = t0 + Duration::from_millis(100);
            let seen = sent + Duration::from_millis(delay_ms);
            let mut c = Claim::new(t0, &timing);
            c.on_renewal(sent, Renewal::Renewed, seen);
            let mut o = Observer::default();
            assert!(!o
                .remaining("7", Some("leader"), seen, timing.lease_duration)
                .is_zero());
            let takeover = seen + timing.lease_duration;
            assert!(c.deadline() + Duration::from_secs(1) <= takeover);
            assert!(
                !c.valid(takeover)
                    && o.remaining("7", Some("leader"), takeover, timing.lease_duration)
                        .is_zero()
            );
        }
    }

    #[test]
    fn epochs_only_grow() {
        assert_eq!(next_epoch(None, 0), 1);
        assert_eq!(next_epoch(Some(4), 0), 5);
        // The Lease was recreated but the checkpoint saw epoch 9.
        assert_eq!(next_epoch(Some(0), 9), 10);
        assert_eq!(next_epoch(Some(-3), 0), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn leadership_handle_expires_with_its_deadline() {
        let l = Leadership::new(3, Some(Instant::now() + Duration::from_secs(2)));
        assert!(l.is_valid());
        assert_eq!(l.epoch(), 3);
        tokio::time::advance(Duration::from_millis(2_001)).await;
        assert!(!l.is_valid());
        let f = Leadership::fixed(1);
        assert!(f.is_valid());
        f.lost().cancel();
        assert!(!f.is_valid());
    }
}
