use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use k8s_openapi::api::coordination::v1::Lease;
use outbox_operator::metrics::{self, Metrics};
use outbox_relay::election::{process_identity, Backend, Elector, LeaseLock, Timing};
use tokio_util::sync::CancellationToken;

/// The OutboxRelay operator.
#[derive(Parser)]
#[command(version)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the OutboxRelay CustomResourceDefinition (YAML).
    Crd,
    /// Reconcile OutboxRelays until SIGTERM (KUBECONFIG or in-cluster config).
    Run {
        /// Watch only this namespace (default: all).
        #[arg(long, env = "WATCH_NAMESPACE")]
        namespace: Option<String>,
        /// Relay image for resources that name none.
        #[arg(long, env = "RELAY_IMAGE", default_value = concat!("ghcr.io/outbox-relay-operator/outbox-relay:", env!("CARGO_PKG_VERSION")))]
        relay_image: String,
        /// Log format.
        #[arg(long, env = "LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
        log_format: String,
        /// Elect one active replica through a Lease (run 2 replicas for HA).
        #[arg(long, env = "LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
        leader_elect: bool,
        /// Name of the operator's own Lease.
        #[arg(long, env = "LEASE_NAME", default_value = "outbox-operator")]
        lease_name: String,
        /// Namespace of the Lease (default: POD_NAMESPACE, else the client's).
        #[arg(long, env = "POD_NAMESPACE")]
        lease_namespace: Option<String>,
        /// Address of /healthz, /readyz and /metrics.
        #[arg(long, env = "HTTP_LISTEN", default_value = "0.0.0.0:8080")]
        http_listen: std::net::SocketAddr,
    },
}

/// The operator's own Lease: client-go's timing (it is not in the data path:
/// a takeover within ~15 s is fine), so the leader renews 30 times a minute
/// instead of the relays' 120.
const OPERATOR_LEASE: Timing = Timing {
    lease_duration: std::time::Duration::from_secs(15),
    renew_deadline: std::time::Duration::from_secs(10),
    retry_period: std::time::Duration::from_secs(2),
};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outbox-operator: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let Command::Run {
        namespace,
        relay_image,
        log_format,
        leader_elect,
        lease_name,
        lease_namespace,
        http_listen,
    } = args.command
    else {
        print!("{}", outbox_operator::crd_yaml()?);
        return Ok(());
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only on a terminal: log files and collectors get plain text.
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    if log_format == "json" {
        b.json().init();
    } else {
        b.init();
    }
    outbox_relay::install_crypto_provider();
    let client = kube::Client::try_default().await?;
    let metrics = Metrics::default();
    let ready = Arc::new(AtomicBool::new(false));
    let shutdown = CancellationToken::new();
    let server = metrics::serve(
        http_listen,
        metrics.clone(),
        ready.clone(),
        shutdown.clone(),
    )
    .await
    .with_context(|| format!("--http-listen: cannot listen on {http_listen}"))?;
    tokio::spawn(stop_on_signal(shutdown.clone()));
    // A standby is healthy and ready: probes must not restart it.
    ready.store(true, Ordering::Relaxed);

    let elected = if leader_elect {
        let ns = lease_namespace.unwrap_or_else(|| client.default_namespace().to_owned());
        let timing = OPERATOR_LEASE;
        let identity = process_identity(None);
        let lock = LeaseLock::new(
            kube::Api::<Lease>::namespaced(client.clone(), &ns),
            &lease_name,
            &identity,
            &timing,
        );
        let elector = Elector::new(Backend::Lease(lock), timing, identity);
        match elector.campaign(0, &shutdown).await? {
            Some(lead) => Some((elector, lead)),
            None => return Ok(()),
        }
    } else {
        None
    };
    metrics.is_leader.set(1);
    let controller =
        outbox_operator::controller::run(client, namespace, relay_image, metrics.clone());
    let result = match &elected {
        Some((_, lead)) => tokio::select! {
            r = controller => r.map_err(anyhow::Error::from),
            _ = lead.lost().cancelled() => Err(anyhow::anyhow!(
                "leadership lost: exiting so that a restart rejoins as a standby"
            )),
        },
        None => controller.await.map_err(anyhow::Error::from),
    };
    metrics.is_leader.set(0);
    if let Some((elector, lead)) = &elected {
        elector.release(lead).await;
    }
    shutdown.cancel();
    let _ = server.await;
    result
}

async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    shutdown.cancel();
}
