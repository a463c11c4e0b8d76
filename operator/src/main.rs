use clap::{Parser, Subcommand};

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
    },
}

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
    match args.command {
        Command::Crd => print!("{}", outbox_operator::crd_yaml()?),
        Command::Run {
            namespace,
            relay_image,
            log_format,
        } => {
            let filter = tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
            let b = tracing_subscriber::fmt().with_env_filter(filter);
            if log_format == "json" {
                b.json().init();
            } else {
                b.init();
            }
            let client = kube::Client::try_default().await?;
            outbox_operator::controller::run(client, namespace, relay_image).await?;
        }
    }
    Ok(())
}
