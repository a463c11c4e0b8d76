//! One log line per state change of a dependency: the first failure of an
//! outage (WARN, with its error) and its end (INFO, with how long it lasted
//! and how many attempts failed), not a line per retry; the retries in
//! between are at debug level. Retries are capped at `RETRY_MAX`, so the
//! relay is back within that long of a server's return.

use std::fmt::Display;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

/// The longest wait between two attempts to reach a dependency.
pub const RETRY_MAX: Duration = Duration::from_millis(250);
/// The first wait.
pub const RETRY_FIRST: Duration = Duration::from_millis(50);

/// The next wait after `d`: doubling, capped at `RETRY_MAX`.
pub fn next_backoff(d: Duration) -> Duration {
    (d * 2).min(RETRY_MAX)
}

/// The state of one dependency (`mysql`, `redis`, `kafka`, `nats`...).
#[derive(Debug)]
pub struct Outage {
    what: &'static str,
    since: Option<Instant>,
    failures: u64,
}

impl Outage {
    pub const fn new(what: &'static str) -> Outage {
        Outage {
            what,
            since: None,
            failures: 0,
        }
    }

    /// A failed attempt: the first of an outage is logged as a warning with
    /// `message`, later ones at debug level.
    pub fn failed(&mut self, message: &str, error: &dyn Display) {
        self.failures += 1;
        if self.since.is_none() {
            self.since = Some(Instant::now());
            warn!(dependency = self.what, error = %error, "{message}; retrying every {} ms at most, logging when it is back", RETRY_MAX.as_millis());
        } else {
            debug!(dependency = self.what, error = %error, failures = self.failures, "{message}");
        }
    }

    /// A successful attempt: ends an outage, logging how long it lasted.
    pub fn recovered(&mut self) {
        if let Some(since) = self.since.take() {
            info!(
                dependency = self.what,
                down_seconds = format!("{:.3}", since.elapsed().as_secs_f64()),
                failed_attempts = self.failures,
                "{} is back",
                self.what
            );
        }
        self.failures = 0;
    }
}

/// An outage seen to begin in one task and to end in another: `recovered`
/// costs one atomic load while nothing is down.
#[derive(Debug)]
pub struct SharedOutage {
    down: AtomicBool,
    inner: Mutex<Outage>,
}

impl SharedOutage {
    pub const fn new(what: &'static str) -> SharedOutage {
        SharedOutage {
            down: AtomicBool::new(false),
            inner: Mutex::new(Outage::new(what)),
        }
    }

    pub fn failed(&self, message: &str, error: &dyn Display) {
        if let Ok(mut o) = self.inner.lock() {
            o.failed(message, error);
        }
        self.down.store(true, Ordering::Relaxed);
    }

    pub fn recovered(&self) {
        // Called per acknowledged record: a load, no write, while all is well.
        if self.down.load(Ordering::Relaxed) && self.down.swap(false, Ordering::Relaxed) {
            if let Ok(mut o) = self.inner.lock() {
                o.recovered();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap() {
        let mut d = RETRY_FIRST;
        let mut waits = vec![d];
        for _ in 0..5 {
            d = next_backoff(d);
            waits.push(d);
        }
        assert_eq!(
            waits.iter().map(Duration::as_millis).collect::<Vec<_>>(),
            [50, 100, 200, 250, 250, 250]
        );
    }

    #[test]
    fn an_outage_begins_at_the_first_failure_and_ends_at_a_success() {
        let mut o = Outage::new("redis");
        assert!(o.since.is_none());
        o.failed("checkpoint write failed", &"connection refused");
        o.failed("checkpoint write failed", &"connection refused");
        assert!(o.since.is_some());
        assert_eq!(o.failures, 2);
        o.recovered();
        assert!(o.since.is_none());
        assert_eq!(o.failures, 0);
    }
}
