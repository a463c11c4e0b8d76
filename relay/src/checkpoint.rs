//! The binlog position in Redis, fenced by the leadership epoch: a Lua
//! compare-and-set refuses a writer whose epoch is older than the stored one.

use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{AsyncCommands, IntoConnectionInfo, Script};

use crate::config::RedisConfig;
use crate::keys::checkpoint_key;
use crate::position::Position;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Redis unreachable or failing: retry.
    #[error("redis: {0}")]
    Unavailable(String),
    /// Redis refused the relay for good: wrong password, or a TLS
    /// certificate it cannot verify. Retrying cannot help.
    #[error("redis refused the connection: {0}")]
    Refused(String),
    /// A newer leader wrote the checkpoint: this writer must stop.
    #[error("checkpoint write refused: epoch {ours} is older than the stored epoch {stored}; another relay leads now")]
    Fenced { ours: u64, stored: u64 },
    #[error("stored checkpoint at {key} is unreadable: {message}")]
    Corrupt { key: String, message: String },
    #[error("{0}")]
    Config(String),
}

fn unavailable(e: redis::RedisError) -> CheckpointError {
    // RedisError's text carries no credentials (the URL is not in it).
    let text = e.to_string();
    let auth = e.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(e.code(), Some("NOAUTH" | "WRONGPASS"));
    // A TLS handshake failure (native-tls) comes back as a client error.
    let tls = e.kind() == redis::ErrorKind::Client
        && ["certificate", "handshake", "ssl", "tls"]
            .iter()
            .any(|w| text.to_ascii_lowercase().contains(w));
    if auth {
        CheckpointError::Refused(format!(
            "{text} (check the password in OUTBOX_RELAY_REDIS_PASSWORD or redis.password_file)"
        ))
    } else if tls {
        CheckpointError::Refused(format!(
            "{text} (TLS: check redis.ca_file against the server's certificate)"
        ))
    } else {
        CheckpointError::Unavailable(text)
    }
}

/// KEYS[1] checkpoint hash; ARGV epoch, position JSON, updated-at millis.
/// Returns {1, stored_epoch} when written, {0, stored_epoch} when refused.
const CAS: &str = r#"
local stored = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0')
local ours = tonumber(ARGV[1])
if ours < stored then
  return {0, stored}
end
redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'position', ARGV[2], 'updated_ms', ARGV[3])
return {1, stored}
"#;

/// KEYS[1] checkpoint hash; ARGV epoch. Raises the stored epoch (never lowers
/// it) so an older writer is refused from now on, even before our first write.
const FENCE: &str = r#"
local stored = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0')
local ours = tonumber(ARGV[1])
if ours < stored then
  return {0, stored}
end
redis.call('HSET', KEYS[1], 'epoch', ARGV[1])
return {1, stored}
"#;

#[derive(Clone)]
pub struct CheckpointStore {
    conn: ConnectionManager,
    key: String,
    cas: Script,
    fence: Script,
}

/// Milliseconds since the epoch: a checkpoint's `updated_ms`.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A stored checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub epoch: u64,
    pub position: Option<Position>,
    pub updated_ms: u64,
}

impl CheckpointStore {
    /// Connects (lazily reconnecting afterwards). `relay` names the checkpoint.
    pub async fn connect(
        cfg: &RedisConfig,
        relay: &str,
    ) -> Result<CheckpointStore, CheckpointError> {
        let mut info = cfg
            .url
            .as_str()
            .into_connection_info()
            .map_err(|e| CheckpointError::Config(format!("redis.url: {e}")))?;
        if !cfg.password.is_empty() {
            let settings = info
                .redis_settings()
                .clone()
                .set_password(cfg.password.expose());
            info = info.set_redis_settings(settings);
        }
        let client = match &cfg.ca_file {
            Some(path) => {
                let ca = std::fs::read(path).map_err(|e| {
                    CheckpointError::Config(format!(
                        "redis.ca_file: cannot read {}: {e}",
                        path.display()
                    ))
                })?;
                let certs = redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(ca),
                };
                redis::Client::build_with_tls(info, certs)
                    .map_err(|e| CheckpointError::Config(format!("redis.ca_file: {e}")))?
            }
            None => redis::Client::open(info)
                .map_err(|e| CheckpointError::Config(format!("redis.url: {e}")))?,
        };
        let mcfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            // Its reconnects wait at most as long as the relay's own retries,
            // so a returning server is seen within `outage::RETRY_MAX`.
            .set_min_delay(crate::outage::RETRY_FIRST)
            .set_max_delay(crate::outage::RETRY_MAX)
            .set_number_of_retries(1);
        let conn = ConnectionManager::new_with_config(client, mcfg)
            .await
            .map_err(unavailable)?;
        Ok(CheckpointStore {
            conn,
            key: checkpoint_key(&cfg.key_prefix, relay),
            cas: Script::new(CAS),
            fence: Script::new(FENCE),
        })
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// The shared connection (the Redis leader lock uses it too).
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// Runs `op` on the connection; when it fails because the connection
    /// is gone, once more at once. After an outage the ConnectionManager
    /// answers the first command with the old connection's error and only
    /// then reconnects: the second attempt waits for that reconnect, so a
    /// returning Redis is used at the relay's next retry, not one retry
    /// (up to `outage::RETRY_MAX`) later. Every command here may run twice:
    /// a read, and scripts that accept their own epoch again.
    async fn run<T, F, Fut>(&self, op: F) -> Result<T, CheckpointError>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        match op(self.conn.clone()).await {
            Err(e) if e.is_connection_dropped() || e.is_io_error() || e.is_connection_refusal() => {
                op(self.conn.clone()).await
            }
            r => r,
        }
        .map_err(unavailable)
    }

    pub async fn load(&self) -> Result<Stored, CheckpointError> {
        let (epoch, pos, updated): (Option<u64>, Option<String>, Option<u64>) = self
            .run(|mut c| async move {
                redis::cmd("HMGET")
                    .arg(&self.key)
                    .arg("epoch")
                    .arg("position")
                    .arg("updated_ms")
                    .query_async(&mut c)
                    .await
            })
            .await?;
        let position = match pos {
            Some(p) => Some(
                serde_json::from_str(&p).map_err(|e| CheckpointError::Corrupt {
                    key: self.key.clone(),
                    message: e.to_string(),
                })?,
            ),
            None => None,
        };
        Ok(Stored {
            epoch: epoch.unwrap_or(0),
            position,
            updated_ms: updated.unwrap_or(0),
        })
    }

    /// Raises the stored epoch to `epoch` (a new term begins).
    pub async fn fence(&self, epoch: u64) -> Result<(), CheckpointError> {
        let (ok, stored): (i64, u64) = self
            .run(|mut c| async move {
                self.fence
                    .key(&self.key)
                    .arg(epoch)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        if ok == 1 {
            Ok(())
        } else {
            Err(CheckpointError::Fenced {
                ours: epoch,
                stored,
            })
        }
    }

    /// Compare-and-set write of `position` under `epoch`.
    pub async fn save(&self, epoch: u64, position: &Position) -> Result<(), CheckpointError> {
        let json = serde_json::to_string(position).map_err(|e| CheckpointError::Corrupt {
            key: self.key.clone(),
            message: e.to_string(),
        })?;
        let (json, updated) = (&json, now_ms());
        let (ok, stored): (i64, u64) = self
            .run(|mut c| async move {
                self.cas
                    .key(&self.key)
                    .arg(epoch)
                    .arg(json)
                    .arg(updated)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        if ok == 1 {
            Ok(())
        } else {
            Err(CheckpointError::Fenced {
                ours: epoch,
                stored,
            })
        }
    }

    /// Deletes the checkpoint (used by tests and the operator's Delete policy).
    pub async fn delete(&self) -> Result<(), CheckpointError> {
        let _: i64 = self
            .run(|mut c| async move { c.del(&self.key).await })
            .await?;
        Ok(())
    }
}
