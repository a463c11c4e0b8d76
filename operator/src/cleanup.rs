//! `checkpointPolicy: Delete`: a finalizer that deletes the relay's keys in
//! Redis (checkpoint, Redis election lock and epoch), and with PostgreSQL its
//! replication slot and publication, before the resource goes.

use std::time::Duration;

use outbox_relay::keys::{all_keys, DEFAULT_KEY_PREFIX};
use outbox_relay::pgsql;
use redis::IntoConnectionInfo;
use tokio_postgres::error::SqlState;

use crate::crd::TlsMode;

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

/// How to reach the relay's PostgreSQL: `spec.postgres` with its password.
pub struct PgTarget<'a> {
    pub host: &'a str,
    pub port: u16,
    pub user: &'a str,
    pub password: String,
    pub database: &'a str,
    /// `spec.postgres.slot` / `.publication`, else the relay's defaults.
    pub slot: Option<&'a str>,
    pub publication: Option<&'a str>,
    /// `spec.postgres.tls.mode` and its CA (PEM).
    pub tls: Option<TlsMode>,
    pub ca: Option<Vec<u8>>,
}

/// Drops the relay's replication slot (ending a backend still streaming
/// from it) and its publication if the relay created it (its comment says
/// so); returns what it dropped. Errors carry no credentials.
pub async fn drop_pg_objects(target: PgTarget<'_>, relay: &str) -> Result<String, String> {
    let default = outbox_relay::keys::pg_object_name(relay);
    let slot = target.slot.unwrap_or(&default);
    let publication = target.publication.unwrap_or(&default);
    let at = format!("postgres {}:{}", target.host, target.port);
    let client = pgsql::connect(&pgsql::Target {
        host: target.host,
        port: target.port,
        user: target.user,
        password: &target.password,
        database: target.database,
        application_name: "outbox-operator",
        tls: match target.tls {
            None | Some(TlsMode::Disabled) => pgsql::TlsMode::Disabled,
            Some(TlsMode::Require) => pgsql::TlsMode::Require,
            Some(TlsMode::VerifyCa) => pgsql::TlsMode::VerifyCa,
            Some(TlsMode::VerifyFull) => pgsql::TlsMode::VerifyFull,
        },
        ca: target.ca.map(|pem| ("spec.postgres.tls.caSecret", pem)),
        connect_timeout: Duration::from_secs(10),
    })
    .await?;
    let work = async {
        // A backend still streaming from the slot (a relay pod gone from a
        // lost node, whose walsender lives until wal_sender_timeout) is
        // ended and waited for (up to 5 s), then the slot dropped. Should a
        // zombie take the slot again in between, both are repeated.
        let mut dropped = 0;
        for attempt in 1.. {
            client
                .execute(
                    "SELECT pg_terminate_backend(active_pid, 5000) FROM pg_replication_slots \
                     WHERE slot_name = $1 AND active_pid IS NOT NULL",
                    &[&slot],
                )
                .await?;
            match client
                .execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                     WHERE slot_name = $1",
                    &[&slot],
                )
                .await
            {
                Ok(n) => {
                    dropped = n;
                    break;
                }
                Err(e) if e.code() == Some(&SqlState::OBJECT_IN_USE) && attempt < 20 => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Err(e) => return Err(e),
            }
        }
        let ours = client
            .query_opt(
                "SELECT 1 FROM pg_publication WHERE pubname = $1 \
                 AND obj_description(oid, 'pg_publication') = $2",
                &[
                    &publication,
                    &outbox_relay::keys::publication_comment(relay),
                ],
            )
            .await?
            .is_some();
        if ours {
            client
                .batch_execute(&format!(
                    "DROP PUBLICATION \"{}\"",
                    publication.replace('"', "\"\"")
                ))
                .await?;
        }
        Ok::<_, tokio_postgres::Error>(format!(
            "replication slot {slot}: {}; publication {publication}: {}",
            if dropped > 0 {
                "dropped"
            } else {
                "not present"
            },
            if ours {
                "dropped"
            } else {
                "kept (not created by the relay, or not present)"
            }
        ))
    };
    match tokio::time::timeout(Duration::from_secs(30), work).await {
        Ok(Ok(note)) => Ok(note),
        Ok(Err(e)) => Err(format!("{at}: {}", pgsql::error_text(&e))),
        Err(_) => Err(format!("{at}: no answer within 30s")),
    }
}
