//! The operator's Prometheus metrics and its `/healthz`, `/readyz`,
//! `/metrics` endpoints.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

pub type Labels = Vec<(String, String)>;

#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// Reconciles by outcome: applied, invalid_spec, missing_secret, error.
    pub reconciles: Family<Labels, Counter>,
    /// Failed reconciles (API errors) by reason.
    pub failures: Family<Labels, Counter>,
    pub duration: Histogram,
    /// Write requests sent to the API server (applies, status, finalizers,
    /// Events): none at steady state.
    pub writes: Counter,
    /// 1 while this operator replica leads.
    pub is_leader: Gauge,
    /// Each relay's conditions (1 = True) as last computed.
    pub relay_condition: Family<Labels, Gauge>,
    /// Each relay's reported lag in seconds.
    pub relay_lag: Family<Labels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut r = Registry::with_prefix("outbox_operator");
        let m = Metrics {
            registry: Arc::new(Registry::default()),
            reconciles: Family::default(),
            failures: Family::default(),
            duration: Histogram::new(exponential_buckets(0.005, 2.0, 12)),
            writes: Counter::default(),
            is_leader: Gauge::default(),
            relay_condition: Family::default(),
            relay_lag: Family::default(),
        };
        r.register("reconciles", "Reconciles by outcome", m.reconciles.clone());
        r.register(
            "reconcile_failures",
            "Failed reconciles by reason",
            m.failures.clone(),
        );
        r.register(
            "reconcile_duration_seconds",
            "Time of one reconcile",
            m.duration.clone(),
        );
        r.register(
            "api_writes",
            "Write requests sent to the API server (applies, status, finalizers, Events)",
            m.writes.clone(),
        );
        r.register(
            "is_leader",
            "1 while this replica leads",
            m.is_leader.clone(),
        );
        r.register(
            "relay_condition",
            "Conditions of each OutboxRelay (1 = True)",
            m.relay_condition.clone(),
        );
        r.register(
            "relay_lag_seconds",
            "Lag each OutboxRelay's leader reported",
            m.relay_lag.clone(),
        );
        Metrics {
            registry: Arc::new(r),
            ..m
        }
    }
}

impl Metrics {
    pub fn outcome(&self, outcome: &str) {
        self.reconciles
            .get_or_create(&vec![("outcome".into(), outcome.into())])
            .inc();
    }

    pub fn failure(&self, reason: &str) {
        self.failures
            .get_or_create(&vec![("reason".into(), reason.into())])
            .inc();
    }

    /// Mirrors one relay's conditions and lag.
    pub fn relay(
        &self,
        namespace: &str,
        name: &str,
        conds: &[crate::health::Cond],
        status: Option<&crate::crd::OutboxRelayStatus>,
    ) {
        let base = vec![
            ("namespace".to_string(), namespace.to_string()),
            ("name".to_string(), name.to_string()),
        ];
        for c in conds {
            let mut l = base.clone();
            l.push(("condition".into(), c.type_.into()));
            self.relay_condition
                .get_or_create(&l)
                .set(i64::from(c.status));
        }
        let lag = status.and_then(|s| s.lag.as_ref()).map_or(0, |l| l.seconds);
        self.relay_lag
            .get_or_create(&base)
            .set(i64::try_from(lag).unwrap_or(i64::MAX));
    }

    pub fn encode(&self) -> String {
        let mut s = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }
}

/// Ready once the process is up: watching as the leader, or waiting as a
/// standby (which must not be restarted by its probe either).
#[derive(Clone)]
struct AppState {
    metrics: Metrics,
    ready: Arc<AtomicBool>,
}

/// Serves the endpoints until `shutdown`. Binding errors are returned at once.
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    ready: Arc<AtomicBool>,
    shutdown: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AppState { metrics, ready });
    Ok(tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    }))
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    if s.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    }
}

async fn metrics_text(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}
