//! outbox-relay: streams committed rows of outbox tables — from the MySQL
//! binlog or PostgreSQL logical replication — to Kafka or NATS JetStream, in
//! commit order per key, with its position in Redis.
//!
//! Without the default `relay` feature only [`election`], [`keys`],
//! [`pgsql`] and [`position`] are built: the operator uses them without
//! linking the relay's clients.

#[cfg(feature = "relay")]
pub mod binlog;
#[cfg(feature = "relay")]
pub mod changes;
#[cfg(feature = "relay")]
pub mod checkpoint;
#[cfg(feature = "relay")]
pub mod config;
pub mod election;
#[cfg(feature = "relay")]
pub mod http;
#[cfg(feature = "relay")]
pub mod kafka;
pub mod keys;
#[cfg(feature = "relay")]
pub mod metrics;
#[cfg(feature = "relay")]
pub mod nats;
#[cfg(feature = "relay")]
pub mod outage;
#[cfg(feature = "relay")]
pub mod outbox;
#[cfg(feature = "relay")]
pub mod pg;
pub mod pgsql;
#[cfg(feature = "relay")]
pub mod pipeline;
pub mod position;
#[cfg(feature = "relay")]
mod rows;
#[cfg(feature = "relay")]
pub mod sink;
#[cfg(feature = "relay")]
pub mod source;
#[cfg(feature = "relay")]
pub mod status;
#[cfg(feature = "relay")]
pub mod telemetry;

/// Makes *ring* the process's rustls crypto provider: the TLS of the
/// Kubernetes client (operator and relay, Lease election and status). rustls
/// picks a provider from its crate features only when exactly one is
/// enabled, and panics at the first HTTPS request otherwise; installing it
/// explicitly keeps that choice if a dependency ever enables another.
/// Call it before the first client is built; later calls change nothing.
pub fn install_crypto_provider() {
    // Err only when a provider is already installed: the same one, or the
    // one an embedding program chose.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
