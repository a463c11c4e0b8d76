//! The Redis keys and PostgreSQL objects of one relay, shared with the
//! operator (which deletes them under `checkpointPolicy: Delete`).

/// `redis.key_prefix` when none is configured.
pub const DEFAULT_KEY_PREFIX: &str = "outbox-relay:";

/// The checkpoint hash (`epoch`, `position`, `updated_ms`).
pub fn checkpoint_key(prefix: &str, relay: &str) -> String {
    format!("{prefix}{relay}:checkpoint")
}

/// The Redis election's lock (`"<epoch> <identity>"`, with a TTL).
pub fn leader_key(prefix: &str, relay: &str) -> String {
    format!("{prefix}{relay}:leader")
}

/// The Redis election's epoch counter.
pub fn epoch_key(prefix: &str, relay: &str) -> String {
    format!("{prefix}{relay}:epoch")
}

/// Every key a relay may have written.
pub fn all_keys(prefix: &str, relay: &str) -> [String; 3] {
    [
        checkpoint_key(prefix, relay),
        leader_key(prefix, relay),
        epoch_key(prefix, relay),
    ]
}

/// The default name of a relay's PostgreSQL slot and publication:
/// `outbox_relay_<name>`, characters other than letters and digits as `_`.
pub fn pg_object_name(relay: &str) -> String {
    let clean: String = relay
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("outbox_relay_{clean}")
}

/// The comment on a publication the relay created (only such a one is
/// dropped with the relay).
pub fn publication_comment(relay: &str) -> String {
    format!("created by outbox-relay {relay}")
}
