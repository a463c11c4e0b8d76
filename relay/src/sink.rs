//! Where records go, behind one small trait: Kafka (`kafka.rs`) or NATS
//! JetStream (`nats.rs`). The pipeline queues records in order with `send`
//! and awaits their deliveries in the same order; only a delivery the
//! broker acknowledged lets the checkpoint pass its commit.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::config::Config;
use crate::outbox::{header, BadRow, Headers, Record};

/// A boxed future of a sink.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The broker's acknowledgement of one record, awaited in queue order.
pub type Delivery = BoxFuture<'static, Result<(), DeliveryError>>;

/// A record the broker did not acknowledge.
#[derive(Debug, Clone)]
pub struct DeliveryError {
    pub message: String,
    /// Sending again cannot help (unknown topic/subject, refused for good):
    /// the relay stops. Otherwise the stream restarts at the last
    /// acknowledged commit with a new session.
    pub definite: bool,
}

/// What `send` hands back: the delivery to await, or a record the sink
/// refused up front (too large), which is a bad row.
pub enum Sent {
    Queued(Delivery),
    Refused(String),
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("{sink} config: {message}")]
    Config { sink: &'static str, message: String },
    /// The sink refused the record for good.
    #[error("{sink} refused record {id}: {message}")]
    Rejected {
        sink: &'static str,
        id: String,
        message: String,
    },
    #[error("{sink}: {message}")]
    Failed { sink: &'static str, message: String },
    /// The broker did not answer: retried.
    #[error("{sink}: {message}")]
    Unavailable { sink: &'static str, message: String },
    /// The session (Kafka producer, NATS connection) stopped for good after
    /// a failure: the stream restarts with a new one at the last
    /// acknowledged commit, so nothing after a lost record is kept before it.
    #[error("{sink} session failed: {message}")]
    SessionFailed { sink: &'static str, message: String },
}

/// A sink: records queued in order, acknowledged in order.
pub trait Sink: Send + Sync {
    /// Queues `rec` (read from `table`) after every record queued before.
    fn send<'a>(
        &'a self,
        table: &'a str,
        rec: &'a Record,
    ) -> BoxFuture<'a, Result<Sent, SinkError>>;
}

/// A new session with the configured broker (a Kafka producer, a NATS
/// connection), ready to send.
pub async fn connect(cfg: &Config) -> Result<Box<dyn Sink>, SinkError> {
    match (&cfg.kafka, &cfg.nats) {
        (Some(k), _) => Ok(Box::new(crate::kafka::KafkaSink::connect(k).await?)),
        (None, Some(n)) => Ok(Box::new(
            crate::nats::NatsSink::connect(n, &cfg.name).await?,
        )),
        (None, None) => Err(SinkError::Config {
            sink: "sink",
            message: "neither [kafka] nor [nats] is configured".into(),
        }),
    }
}

/// How long a session may take to connect before it is retried.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The dead-letter record of a bad row: its key and payload as read, the
/// reason and its origin in headers; the payload is left out when the
/// record would exceed `max_bytes`.
pub fn dead_letter(
    topic: &str,
    bad: &BadRow,
    table: &str,
    at: &str,
    gtid: Option<&str>,
    epoch: &str,
    max_bytes: usize,
) -> Record {
    let mut headers: Headers = vec![
        (header::ERROR.into(), bad.reason.clone().into_bytes()),
        (header::TABLE.into(), table.as_bytes().to_vec()),
        (header::BINLOG.into(), at.as_bytes().to_vec()),
        (header::EPOCH.into(), epoch.as_bytes().to_vec()),
    ];
    if let Some(id) = &bad.id {
        headers.push((header::ID.into(), id.clone().into_bytes()));
    }
    if let Some(g) = gtid {
        headers.push((header::GTID.into(), g.as_bytes().to_vec()));
    }
    let mut rec = Record {
        topic: topic.to_owned(),
        key: bad.key.clone().unwrap_or_default(),
        value: bad.value.clone(),
        headers,
        id: bad.id.clone().unwrap_or_default(),
    };
    if rec.size() > max_bytes {
        let size = rec.value.take().map_or(0, |v| v.len());
        rec.headers.push((
            header::PAYLOAD_OMITTED.into(),
            size.to_string().into_bytes(),
        ));
    }
    rec
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letter_record_carries_reason_and_position() {
        let bad = BadRow {
            reason: "aggregate id (the record key) is NULL".into(),
            id: Some("7".into()),
            key: None,
            value: Some(b"{}".to_vec()),
        };
        let r = dead_letter(
            "dlq",
            &bad,
            "shop.outbox",
            "mysql-bin.000001:99",
            Some("0-1-5"),
            "2",
            1000,
        );
        assert_eq!(r.topic, "dlq");
        let h = |k: &str| {
            r.headers
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(h("outbox.error").unwrap(), bad.reason.as_bytes());
        assert_eq!(h("id").unwrap(), b"7");
        assert_eq!(h("outbox.table").unwrap(), b"shop.outbox");
        assert_eq!(h("outbox.binlog").unwrap(), b"mysql-bin.000001:99");
        assert_eq!(h("outbox.gtid").unwrap(), b"0-1-5");
        assert_eq!(r.value.as_deref(), Some(&b"{}"[..]));

        let big = BadRow {
            value: Some(vec![b'x'; 5000]),
            ..bad
        };
        let r = dead_letter("dlq", &big, "shop.outbox", "f:4", None, "2", 1000);
        assert_eq!(r.value, None);
        assert_eq!(
            r.headers
                .iter()
                .find(|(n, _)| n == "outbox.payload_omitted")
                .map(|(_, v)| v.as_slice()),
            Some(&b"5000"[..])
        );
    }
}
