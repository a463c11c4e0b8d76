use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing::info;

use outbox_relay::binlog::BinlogSource;
use outbox_relay::config::Config;
use outbox_relay::metrics::Metrics;
use outbox_relay::pg::PgSource;
use outbox_relay::pipeline::{self, Health, RelayError};
use outbox_relay::source::Source;
use outbox_relay::status::{Progress, Reporter};
use outbox_relay::{http, telemetry};

/// Records are allocated by the binlog reader and freed by the acknowledger
/// and librdkafka's threads: mimalloc (which also serves librdkafka's own
/// `malloc`, through the crate's `override` feature) avoids the arena lock
/// contention and most of the allocation cost glibc showed there
/// (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's defaults keep the memory of a drained backlog committed; with
/// these it goes back to the system within moments (peak and idle RSS in
/// BENCHMARKS.md). mimalloc reads them when the process starts.
const ALLOCATOR_ENV: [(&str, &str); 2] = [
    ("MIMALLOC_PURGE_DELAY", "0"),
    ("MIMALLOC_ARENA_EAGER_COMMIT", "0"),
];

/// Started without the allocator settings, the relay executes itself again
/// once with them (same process id and arguments; values already set win).
fn apply_allocator_settings() {
    use std::os::unix::process::CommandExt;
    if ALLOCATOR_ENV
        .iter()
        .all(|(k, _)| std::env::var_os(k).is_some())
    {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut args = std::env::args_os();
    let mut cmd = std::process::Command::new(exe);
    if let Some(arg0) = args.next() {
        cmd.arg0(arg0);
    }
    cmd.args(args);
    for (k, v) in ALLOCATOR_ENV {
        if std::env::var_os(k).is_none() {
            cmd.env(k, v);
        }
    }
    // Returns only if the execution failed.
    let err = cmd.exec();
    eprintln!("outbox-relay: running with mimalloc's default settings ({err})");
}

/// Streams committed outbox rows from the MySQL binlog or PostgreSQL logical
/// replication to Kafka or NATS JetStream.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Relay config file (TOML).
    #[arg(long, short, env = "OUTBOX_RELAY_CONFIG")]
    config: PathBuf,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    apply_allocator_settings();
    outbox_relay::install_crypto_provider();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("outbox-relay: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Also on stderr for a config error, before logging is set up.
            eprintln!("outbox-relay: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let cfg = Arc::new(Config::load(&args.config)?);
    telemetry::init(&cfg.log.level, cfg.log.format);
    info!(name = %cfg.name, version = env!("CARGO_PKG_VERSION"), "outbox-relay starting");
    let metrics = Metrics::new();
    let health = Arc::new(Health::default());
    let progress = Arc::new(Progress::default());
    let shutdown = CancellationToken::new();
    let addr = cfg.http.listen.parse().context("http.listen")?;
    let server = http::serve(
        addr,
        metrics.clone(),
        health.clone(),
        progress.clone(),
        shutdown.clone(),
    )
    .await
    .with_context(|| format!("http.listen: cannot listen on {addr}"))?;
    let signals = tokio::spawn(wait_for_signal(shutdown.clone()));
    let reporter = Arc::new(Reporter::new(&cfg, progress.clone()).await);
    let result = if cfg.postgres.is_some() {
        relay::<PgSource>(cfg, metrics, health, progress, &reporter, &shutdown).await
    } else {
        relay::<BinlogSource>(cfg, metrics, health, progress, &reporter, &shutdown).await
    };
    signals.abort();
    let _ = server.await;
    result.map_err(anyhow::Error::from)
}

/// The pipeline and the status reporter over the configured database.
async fn relay<S: Source>(
    cfg: Arc<Config>,
    metrics: Metrics,
    health: Arc<Health>,
    progress: Arc<Progress>,
    reporter: &Arc<Reporter>,
    shutdown: &CancellationToken,
) -> Result<(), RelayError> {
    let reporting = tokio::spawn({
        let (r, cfg, m, s) = (
            reporter.clone(),
            cfg.clone(),
            metrics.clone(),
            shutdown.clone(),
        );
        async move { r.run::<S>(cfg, m, s).await }
    });
    let result = pipeline::run::<S>(cfg, metrics, health, progress, shutdown.clone()).await;
    if result.is_err() {
        // The last error reaches the OutboxRelay status before the exit.
        reporter.push_final().await;
    }
    shutdown.cancel();
    let _ = reporting.await;
    result
}

async fn wait_for_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    info!("signal received");
    shutdown.cancel();
}
