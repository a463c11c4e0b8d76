//! `checkpointPolicy: Delete`: a finalizer that deletes the relay's keys in
//! Redis (checkpoint, Redis election lock and epoch) before the resource goes.

use std::time::Duration;

use outbox_relay::keys::{all_keys, DEFAULT_KEY_PREFIX};
use redis::IntoConnectionInfo;

pub const FINALIZER: &str = "outboxrelay.dev/delete-checkpoint";

/// The relay's name in its config, which keys its checkpoint (unique per
/// namespace in a shared Redis).
pub fn relay_name(namespace: &str, name: &str) -> String {
    format!("{namespace}.{name}")
}

/// How to reach the relay's Redis: `spec.redis` with its Secrets' values.
pub struct RedisTarget<'a> {
    pub url: &'a str,
    pub password: Option<String>,
    /// PEM CA of a `rediss://` server with a private CA.
    pub ca: Option<Vec<u8>>,
    pub key_prefix: Option<&'a str>,
}

/// Deletes the relay's keys; returns how many existed. Errors carry no
/// credentials (the password is never part of the URL).
pub async fn delete_checkpoint(target: RedisTarget<'_>, relay: &str) -> Result<usize, String> {
    let url = target.url;
    let mut info = url
        .into_connection_info()
        .map_err(|e| format!("spec.redis.url: {e}"))?;
    if let Some(p) = &target.password {
        let settings = info.redis_settings().clone().set_password(p);
        info = info.set_redis_settings(settings);
    }
    let client = match target.ca {
        Some(ca) => redis::Client::build_with_tls(
            info,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(ca),
            },
        )
        .map_err(|e| format!("spec.redis.caSecret: {e}"))?,
        None => redis::Client::open(info).map_err(|e| format!("spec.redis.url: {e}"))?,
    };
    let key_prefix = target.key_prefix;
    let keys = all_keys(key_prefix.unwrap_or(DEFAULT_KEY_PREFIX), relay);
    let work = async {
        let mut c = client.get_multiplexed_async_connection().await?;
        redis::cmd("DEL")
            .arg(&keys[..])
            .query_async::<usize>(&mut c)
            .await
    };
    match tokio::time::timeout(Duration::from_secs(10), work).await {
        Ok(Ok(n)) => Ok(n),
        Ok(Err(e)) => Err(format!("redis: {e}")),
        Err(_) => Err(format!("redis: no answer from {url} within 10s")),
    }
}
