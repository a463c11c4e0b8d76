//! A plain PostgreSQL session (SQL, not replication): the relay's status
//! poll of the WAL head and the slot's retained WAL, and the operator's
//! drop of the slot and publication. Unlike the stream it takes no WAL
//! sender (`max_wal_senders`), only a connection (`max_connections`).
//! tokio-postgres, with native-tls (OpenSSL, already linked for Redis and
//! MySQL) for libpq's `sslmode`.

use std::time::Duration;

use postgres_native_tls::MakeTlsConnector;
use serde::{Deserialize, Serialize};
use tokio_postgres::config::SslMode;
use tokio_postgres::Client;

/// TLS to a database server, with libpq's `sslmode` meaning.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    #[default]
    Disabled,
    /// Encrypt, do not verify the certificate.
    Require,
    /// Encrypt and verify the chain against the CA, not the host name.
    VerifyCa,
    /// Encrypt and verify chain and host name.
    VerifyFull,
}

/// Where and as whom to connect.
pub struct Target<'a> {
    pub host: &'a str,
    pub port: u16,
    pub user: &'a str,
    pub password: &'a str,
    pub database: &'a str,
    /// Shown in `pg_stat_activity`.
    pub application_name: &'a str,
    pub tls: TlsMode,
    /// The CA (PEM) of the verifying modes, and the setting it came from
    /// (named when it is not a certificate).
    pub ca: Option<(&'a str, Vec<u8>)>,
    pub connect_timeout: Duration,
}

/// Connects; the connection's task runs until the client is dropped.
/// Errors name the server and carry its message, never the password.
pub async fn connect(t: &Target<'_>) -> Result<Client, String> {
    let at = format!("postgres {}:{}", t.host, t.port);
    let mut config = tokio_postgres::Config::new();
    config
        .host(t.host)
        .port(t.port)
        .user(t.user)
        .password(t.password.as_bytes())
        .dbname(t.database)
        .application_name(t.application_name)
        .connect_timeout(t.connect_timeout);
    // With `sslmode=disable` the connector is never used.
    config.ssl_mode(if t.tls == TlsMode::Disabled {
        SslMode::Disable
    } else {
        SslMode::Require
    });
    let tls = connector(t.tls, t.ca.as_ref()).map_err(|e| format!("{at}: {e}"))?;
    match tokio::time::timeout(t.connect_timeout, config.connect(tls)).await {
        Ok(Ok((client, conn))) => {
            tokio::spawn(conn);
            Ok(client)
        }
        Ok(Err(e)) => Err(format!("{at}: {}", error_text(&e))),
        Err(_) => Err(format!("{at}: no answer within {:?}", t.connect_timeout)),
    }
}

/// The server's message (tokio-postgres shows only "db error") or the
/// connection's cause.
pub fn error_text(e: &tokio_postgres::Error) -> String {
    match (e.as_db_error(), std::error::Error::source(e)) {
        (Some(db), _) => format!("{}: {}", db.severity(), db.message()),
        (None, Some(cause)) => format!("{e}: {cause}"),
        (None, None) => e.to_string(),
    }
}

/// A connector for `mode` (`require` encrypts without verifying;
/// `verify-ca` checks the chain, not the name).
fn connector(mode: TlsMode, ca: Option<&(&str, Vec<u8>)>) -> Result<MakeTlsConnector, String> {
    let mut b = native_tls::TlsConnector::builder();
    match mode {
        TlsMode::Disabled => {}
        TlsMode::Require => {
            b.danger_accept_invalid_certs(true)
                .danger_accept_invalid_hostnames(true);
        }
        TlsMode::VerifyCa | TlsMode::VerifyFull => {
            b.danger_accept_invalid_hostnames(mode == TlsMode::VerifyCa);
        }
    }
    if let Some((field, pem)) = ca {
        let cert = native_tls::Certificate::from_pem(pem)
            .map_err(|e| format!("{field} is not a PEM certificate: {e}"))?;
        b.add_root_certificate(cert);
    }
    b.build()
        .map(MakeTlsConnector::new)
        .map_err(|e| format!("TLS to PostgreSQL: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_ca_that_is_not_pem_is_named_before_connecting() {
        let e = connect(&Target {
            host: "127.0.0.1",
            // Nothing is dialled: the CA is read first.
            port: 1,
            user: "relay",
            password: "s3cret-pw",
            database: "shop",
            application_name: "test",
            tls: TlsMode::VerifyFull,
            ca: Some(("postgres.tls.ca_file", b"not a certificate".to_vec())),
            connect_timeout: Duration::from_secs(1),
        })
        .await
        .expect_err("not PEM");
        assert!(
            e.starts_with("postgres 127.0.0.1:1: postgres.tls.ca_file is not a PEM certificate"),
            "{e}"
        );
        assert!(!e.contains("s3cret-pw"), "{e}");
    }
}
