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

/// Deletes the relay's keys; returns how many existed. Errors carry no
/// credentials (the password is never part of the URL).
pub async fn delete_checkpoint(
    url: &str,
    password: Option<&str>,
    key_prefix: Option<&str>,
    relay: &str,
) -> Result<usize, String> {
    let mut info = url
        .into_connection_info()
        .map_err(|e| format!("spec.redis.url: {e}"))?;
    if let Some(p) = password {
        let settings = info.redis_settings().clone().set_password(p);
        info = info.set_redis_settings(settings);
    }
    let client = redis::Client::open(info).map_err(|e| format!("spec.redis.url: {e}"))?;
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
