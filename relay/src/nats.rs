//! The NATS JetStream sink: every record published to its subject (the
//! outbox's topic template) in one configured stream, each publish awaited
//! for its JetStream acknowledgement in order.
//!
//! - **Deduplication.** `Nats-Msg-Id` = `<relay>/<table>/<id>`: after a crash
//!   the relay sends again from its checkpoint, and JetStream drops what it
//!   stored already within the stream's duplicate window.
//! - **Order.** A session is one connection that never reconnects: a
//!   connection can lose a publish only together with every later one, so
//!   after a loss the stream restarts at the last acknowledged commit on a
//!   new connection, and no record is stored after a lost one of its key.
//! - **Refusals.** A subject outside the stream, a header NATS cannot carry
//!   or a message above the server's `max_payload` is refused before it is
//!   sent: a bad row (stop, or the dead-letter subject).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind, stream};
use async_nats::{ConnectErrorKind, ConnectOptions, Event, HeaderMap};
use tokio::sync::Notify;
use tracing::info;

use crate::config::NatsConfig;
use crate::outbox::Record;
use crate::sink::{BoxFuture, DeliveryError, Sent, Sink, SinkError, CONNECT_TIMEOUT};

const SINK: &str = "nats";
/// Header carrying the record's key (NATS messages have none).
pub const KEY_HEADER: &str = "outbox.key";

fn unavailable(message: impl ToString) -> SinkError {
    SinkError::Unavailable {
        sink: SINK,
        message: message.to_string(),
    }
}

/// Whether a TLS peer refused the other's certificate (rustls'
/// `InvalidCertificate`, anywhere in the error's chain): settings to fix,
/// not an outage to wait out.
fn certificate_refused(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(err) = next {
        let tls = err.downcast_ref::<rustls::Error>().or_else(|| {
            err.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if matches!(
            tls,
            Some(rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented)
        ) {
            return true;
        }
        next = err.source();
    }
    false
}

fn config_error(message: impl ToString) -> SinkError {
    SinkError::Config {
        sink: SINK,
        message: message.to_string(),
    }
}

/// Set when the session's connection is lost: later sends and pending
/// deliveries fail at once, and the stream restarts on a new session.
#[derive(Default)]
struct Broken {
    flag: AtomicBool,
    notify: Notify,
}

impl Broken {
    fn set(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    async fn wait(&self) {
        let notified = self.notify.notified();
        if self.is_set() {
            return;
        }
        notified.await;
    }
}

pub struct NatsSink {
    js: jetstream::Context,
    stream: String,
    /// The stream's subjects, to refuse a record that no subject matches.
    subjects: Vec<String>,
    relay: String,
    broken: Arc<Broken>,
    ack_timeout: Duration,
}

impl NatsSink {
    /// Connects (credentials, NKey, token, user/password, TLS as configured)
    /// and checks the stream, creating it when `create_stream` says so.
    pub async fn connect(cfg: &NatsConfig, relay: &str) -> Result<NatsSink, SinkError> {
        let broken = Arc::new(Broken::default());
        let mut opts = match &cfg.credentials_file {
            Some(path) => ConnectOptions::with_credentials_file(path)
                .await
                .map_err(|e| {
                    config_error(format!("nats.credentials_file {}: {e}", path.display()))
                })?,
            None => ConnectOptions::new(),
        };
        if let Some(seed) = &cfg.nkey {
            opts = opts.nkey(seed.expose().to_owned());
        }
        if let Some(token) = &cfg.token {
            opts = opts.token(token.expose().to_owned());
        }
        if let (Some(user), Some(pass)) = (&cfg.user, &cfg.password) {
            opts = opts.user_and_password(user.clone(), pass.expose().to_owned());
        }
        if let Some(ca) = &cfg.tls_ca_file {
            opts = opts.add_root_certificates(ca.clone());
        }
        let events = broken.clone();
        // The first connection is tried at once; a lost one is not tried
        // again (the callback also delays the first attempt).
        let connected = Arc::new(AtomicBool::new(false));
        let delay = connected.clone();
        opts = opts
            .name(format!("outbox-relay {relay}"))
            .require_tls(cfg.tls_required)
            .connection_timeout(CONNECT_TIMEOUT)
            // A session never reconnects (see the module's note on order).
            .reconnect_delay_callback(move |_| {
                if delay.load(Ordering::SeqCst) {
                    Duration::from_secs(24 * 3600)
                } else {
                    Duration::ZERO
                }
            })
            .event_callback(move |e| {
                let events = events.clone();
                async move {
                    if matches!(e, Event::Disconnected | Event::Closed) {
                        events.set();
                    }
                }
            });
        let client = opts.connect(cfg.url.as_str()).await.map_err(|e| {
            let what = format!("connecting to {}: {e}", redact(&cfg.url));
            // Refused for good: retrying cannot help, the settings must change.
            match e.kind() {
                kind if kind == ConnectErrorKind::Tls || certificate_refused(&e) => {
                    config_error(format!(
                        "{what}: check nats.tls_ca_file (the CA of the server's certificate) \
                         and that the URL's host is in the certificate"
                    ))
                }
                ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
                    config_error(format!(
                        "{what}: check nats.user and its password, or the token, NKey seed or \
                         credentials file"
                    ))
                }
                _ => unavailable(what),
            }
        })?;
        let mut js = jetstream::new(client);
        js.set_timeout(cfg.ack_timeout);
        let subjects = match js.get_stream(&cfg.stream).await {
            Ok(mut s) => s.info().await.map_err(unavailable)?.config.subjects.clone(),
            Err(e) if is_not_found(&e) => match &cfg.create_stream {
                Some(c) => {
                    let created = js
                        .create_stream(stream::Config {
                            name: cfg.stream.clone(),
                            subjects: c.subjects.clone(),
                            duplicate_window: c.duplicate_window,
                            num_replicas: c.replicas,
                            storage: stream::StorageType::File,
                            ..Default::default()
                        })
                        .await
                        .map_err(|e| {
                            config_error(format!("creating stream {}: {e}", cfg.stream))
                        })?;
                    info!(stream = %cfg.stream, subjects = ?c.subjects, "created the JetStream stream");
                    created.cached_info().config.subjects.clone()
                }
                None => {
                    return Err(config_error(format!(
                        "stream {} does not exist: create it, or set nats.create_stream",
                        cfg.stream
                    )))
                }
            },
            Err(e) => return Err(unavailable(format!("stream {}: {e}", cfg.stream))),
        };
        Ok(NatsSink {
            js,
            stream: cfg.stream.clone(),
            subjects,
            relay: relay.to_owned(),
            broken,
            ack_timeout: cfg.ack_timeout,
        })
    }

    async fn publish(&self, table: &str, rec: &Record) -> Result<Sent, SinkError> {
        if self.broken.is_set() {
            return Err(SinkError::SessionFailed {
                sink: SINK,
                message: "the connection was lost".into(),
            });
        }
        if !self.subjects.iter().any(|p| subject_matches(p, &rec.topic)) {
            return Ok(Sent::Refused(format!(
                "subject {} is not in stream {} (its subjects: {})",
                rec.topic,
                self.stream,
                self.subjects.join(", ")
            )));
        }
        let headers = match headers(rec, &self.relay, table, &self.stream) {
            Ok(h) => h,
            Err(reason) => return Ok(Sent::Refused(reason)),
        };
        let payload = rec.value.clone().unwrap_or_default().into();
        let ack = match self
            .js
            .publish_with_headers(rec.topic.clone(), headers, payload)
            .await
        {
            Ok(ack) => ack,
            Err(e) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
                return Ok(Sent::Refused(format!(
                    "record of {} bytes: {e}",
                    rec.size()
                )))
            }
            Err(e) => {
                return Err(SinkError::SessionFailed {
                    sink: SINK,
                    message: e.to_string(),
                })
            }
        };
        let broken = self.broken.clone();
        let timeout = self.ack_timeout;
        Ok(Sent::Queued(Box::pin(async move {
            tokio::select! {
                r = std::future::IntoFuture::into_future(ack) => match r {
                    Ok(_) => Ok(()),
                    Err(e) => Err(DeliveryError {
                        definite: definite(e.kind()),
                        message: e.to_string(),
                    }),
                },
                _ = broken.wait() => Err(DeliveryError {
                    message: format!("the connection was lost before the acknowledgement (timeout {timeout:?})"),
                    definite: false,
                }),
            }
        })))
    }
}

impl Sink for NatsSink {
    fn send<'a>(
        &'a self,
        table: &'a str,
        rec: &'a Record,
    ) -> BoxFuture<'a, Result<Sent, SinkError>> {
        Box::pin(self.publish(table, rec))
    }
}

impl Drop for NatsSink {
    fn drop(&mut self) {
        if !self.broken.is_set() {
            self.broken.set();
        }
    }
}

fn is_not_found(e: &jetstream::context::GetStreamError) -> bool {
    use jetstream::context::GetStreamErrorKind as K;
    matches!(e.kind(), K::JetStream(j) if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}

/// Failures that sending again cannot fix. "No stream for the subject" is
/// not one: the stream was there when the session began (`connect` checks
/// it, and stops the relay when it is gone), so it is JetStream restarting —
/// a server shutting down answers "no responders" before it closes.
fn definite(kind: PublishErrorKind) -> bool {
    matches!(
        kind,
        PublishErrorKind::WrongLastMessageId
            | PublishErrorKind::WrongLastSequence
            | PublishErrorKind::MaxPayloadExceeded
    )
}

/// The record's headers, its key, `Nats-Msg-Id` and the expected stream;
/// Err names a header NATS cannot carry (not UTF-8, or a line break).
fn headers(rec: &Record, relay: &str, table: &str, stream: &str) -> Result<HeaderMap, String> {
    let mut h = HeaderMap::new();
    let text = |name: &str, v: &[u8]| -> Result<String, String> {
        let s = std::str::from_utf8(v)
            .map_err(|_| format!("header {name} is not UTF-8 text, which NATS headers need"))?;
        if s.contains(['\r', '\n']) {
            return Err(format!(
                "header {name} contains a line break, which NATS headers cannot carry"
            ));
        }
        Ok(s.to_owned())
    };
    for (k, v) in &rec.headers {
        if k.is_empty()
            || k.contains(|c: char| c == ':' || c.is_whitespace() || !c.is_ascii_graphic())
        {
            return Err(format!("header name {k:?} is not a NATS header name"));
        }
        h.append(k.as_ref(), text(k, v)?);
    }
    if !rec.key.is_empty() {
        h.insert(KEY_HEADER, text(KEY_HEADER, &rec.key)?);
    }
    if !rec.id.is_empty() {
        h.insert("Nats-Msg-Id", format!("{relay}/{table}/{}", rec.id));
    }
    h.insert("Nats-Expected-Stream", stream);
    Ok(h)
}

/// Whether `subject` matches the stream subject `pattern` (`*` one token,
/// `>` the rest).
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// The URL(s) without a user or password in them.
fn redact(urls: &str) -> String {
    urls.split(',')
        .map(|u| match (u.find("://"), u.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                format!("{}://***@{}", &u[..scheme], &u[at + 1..])
            }
            _ => u.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_match_like_nats() {
        assert!(subject_matches("outbox.>", "outbox.event.User"));
        assert!(subject_matches("outbox.*.User", "outbox.event.User"));
        assert!(subject_matches("outbox.event.User", "outbox.event.User"));
        assert!(!subject_matches("outbox.>", "outbox"));
        assert!(!subject_matches("outbox.*", "outbox.event.User"));
        assert!(!subject_matches("other.>", "outbox.event.User"));
    }

    #[test]
    fn headers_carry_key_id_and_refuse_what_nats_cannot() {
        let mut rec = Record {
            topic: "outbox.event.User".into(),
            key: b"u1".to_vec(),
            value: Some(b"{}".to_vec()),
            headers: vec![("event_type".into(), b"Created".to_vec())],
            id: "7".into(),
        };
        let h = headers(&rec, "shop", "shop.outbox", "OUTBOX").unwrap();
        assert_eq!(h.get("Nats-Msg-Id").unwrap().as_str(), "shop/shop.outbox/7");
        assert_eq!(h.get(KEY_HEADER).unwrap().as_str(), "u1");
        assert_eq!(h.get("event_type").unwrap().as_str(), "Created");
        assert_eq!(h.get("Nats-Expected-Stream").unwrap().as_str(), "OUTBOX");
        rec.headers.push(("trace".into(), b"a\r\nb".to_vec()));
        assert!(headers(&rec, "shop", "t", "S")
            .unwrap_err()
            .contains("line break"));
        rec.headers.pop();
        rec.headers.push(("bin".into(), vec![0xff]));
        assert!(headers(&rec, "shop", "t", "S")
            .unwrap_err()
            .contains("UTF-8"));
    }

    #[test]
    fn only_refusals_for_good_stop_the_relay() {
        // A server shutting down answers "no responders": retried.
        assert!(!definite(PublishErrorKind::StreamNotFound));
        assert!(!definite(PublishErrorKind::TimedOut));
        assert!(!definite(PublishErrorKind::BrokenPipe));
        assert!(definite(PublishErrorKind::MaxPayloadExceeded));
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact("nats://relay:s3cret@nats-1:4222,nats://nats-2:4222"),
            "nats://***@nats-1:4222,nats://nats-2:4222"
        );
    }
}
