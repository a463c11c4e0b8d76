use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing::info;

use outbox_relay::config::Config;
use outbox_relay::metrics::Metrics;
use outbox_relay::pipeline::{self, Health};
use outbox_relay::status::{Progress, Reporter};
use outbox_relay::{http, telemetry};

/// Records are allocated by the binlog reader and freed by the acknowledger
/// and librdkafka's threads: mimalloc's thread-local heaps avoid the arena
/// lock contention glibc shows there (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Streams committed outbox rows from the MySQL binlog to Kafka.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Relay config file (TOML).
    #[arg(long, short, env = "OUTBOX_RELAY_CONFIG")]
    config: PathBuf,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match run(args).await {
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
    let reporting = tokio::spawn({
        let (r, cfg, m, s) = (
            reporter.clone(),
            cfg.clone(),
            metrics.clone(),
            shutdown.clone(),
        );
        async move { r.run(cfg, m, s).await }
    });
    let result = pipeline::run(cfg, metrics, health, progress, shutdown.clone()).await;
    if result.is_err() {
        // The last error reaches the OutboxRelay status before the exit.
        reporter.push_final().await;
    }
    shutdown.cancel();
    let _ = reporting.await;
    signals.abort();
    let _ = server.await;
    result.map_err(anyhow::Error::from)
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
