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
}

fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Command::Crd => print!("{}", outbox_operator::crd_yaml()?),
    }
    Ok(())
}
