//! Structured logs through tracing: text or JSON, level from config or `RUST_LOG`.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

pub fn init(level: &str, format: LogFormat) {
    let spec = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| EnvFilter::try_new(s).is_ok())
        .unwrap_or_else(|| level.to_owned());
    let mut filter = EnvFilter::try_new(&spec).unwrap_or_else(|_| EnvFilter::new("info"));
    // The PostgreSQL client logs each lost connection at ERROR, once per
    // reconnect attempt; the relay logs an outage once (dependency=postgres)
    // and its end once. Named in the filter, it is shown as asked.
    if !spec.contains("pgwire_replication") {
        filter = filter.add_directive("pgwire_replication=off".parse().expect("a valid directive"));
    }
    // Colour only on a terminal: log files and collectors get plain text.
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_target(false);
    // A second init (tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Json => b.json().flatten_event(true).try_init(),
        LogFormat::Text => b.try_init(),
    };
}
