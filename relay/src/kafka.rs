//! The Kafka sink: an idempotent `FutureProducer` (acks=all, never times a
//! record out), backpressure on a full queue, topic creation.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};

use crate::config::KafkaConfig;
use crate::outage::SharedOutage;
use crate::outbox::Record;
use crate::sink::{BoxFuture, DeliveryError, Sent, Sink, SinkError};

const SINK: &str = "kafka";

fn config_error(message: impl ToString) -> SinkError {
    SinkError::Config {
        sink: SINK,
        message: message.to_string(),
    }
}

/// Properties the relay sets; the guarantee-critical ones cannot be overridden.
const DEFAULTS: &[(&str, &str)] = &[
    ("enable.idempotence", "true"),
    ("acks", "all"),
    // A record that fails for good must not be followed by later records of
    // its partition: the producer stops instead, the relay restarts the
    // stream at the last acknowledged commit, and per-key order holds.
    ("enable.gapless.guarantee", "true"),
    // Never drop a record on a timeout: a broker outage blocks (backpressure).
    ("message.timeout.ms", "0"),
    // Java-compatible key → partition hashing.
    ("partitioner", "murmur2_random"),
    ("linger.ms", "2"),
    // Back within a quarter second of a broker's return (librdkafka's own
    // default backs off to 10 s between reconnects); the first reconnect
    // after 10 ms (default 100), which is also how soon a new producer
    // connects to the broker it learns from the bootstrap address.
    ("reconnect.backoff.ms", "10"),
    ("reconnect.backoff.max.ms", "250"),
    ("queue.buffering.max.kbytes", "4096"),
    ("queue.buffering.max.messages", "100000"),
];

const PINNED: &[(&str, &str)] = &[("enable.idempotence", "true"), ("acks", "all")];

/// The librdkafka configuration: defaults, then user properties, then secret
/// properties from the environment. Refuses overrides that break ordering or
/// the no-loss guarantee.
pub fn client_config(cfg: &KafkaConfig) -> Result<ClientConfig, SinkError> {
    let mut cc = ClientConfig::new();
    for (k, v) in DEFAULTS {
        cc.set(*k, *v);
    }
    for (k, v) in &cfg.properties {
        if let Some((_, want)) = PINNED.iter().find(|(p, _)| p == k) {
            let ok = v == want || (*k == "acks" && (v == "-1"));
            if !ok {
                return Err(config_error(format!(
                    "kafka.properties.{k} = {v} would break the relay's guarantees (it needs {want})"
                )));
            }
        }
        cc.set(k, v);
    }
    cc.set("bootstrap.servers", &cfg.bootstrap_servers);
    for (k, v) in &cfg.secret_properties {
        cc.set(k, v.expose());
    }
    cc.set_log_level(rdkafka::config::RDKafkaLogLevel::Warning);
    Ok(cc)
}

/// librdkafka's log, in the relay's: at its own level, except the notice
/// that `enable.gapless.guarantee` is experimental — the relay sets it on
/// purpose (see `DEFAULTS`), so that notice is not a warning at every start —
/// and its errors (`AllBrokersDown`, failed connections, a fatal producer
/// error), logged once when a run of them begins and once when a delivery
/// succeeds again, not a line (or two) per reconnect attempt.
#[derive(Clone, Copy, Default)]
pub struct RelayContext;

/// The brokers' state, one for the process: a stream restart's new producer
/// continues the outage its predecessor began; a delivery ends it.
static KAFKA: SharedOutage = SharedOutage::new("kafka");

impl RelayContext {
    /// An error of the producer or a broker: the first of a run logged as a
    /// warning, the rest at debug level until a delivery succeeds again
    /// (the pipeline logs the stream restarts they cause).
    fn trouble(&self, error: &dyn std::fmt::Display) {
        KAFKA.failed("the Kafka producer reports errors", error);
    }
}

impl ClientContext for RelayContext {
    fn error(&self, error: KafkaError, reason: &str) {
        self.trouble(&format!("{error}: {reason}"));
    }

    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        use RDKafkaLogLevel as L;
        let expected = fac == "CONFWARN" && message.contains("enable.gapless.guarantee");
        match level {
            _ if expected => tracing::debug!(target: "librdkafka", "librdkafka: {fac} {message}"),
            // A broker connection failed, or worse: part of a run of errors.
            _ if fac == "FAIL" => self.trouble(&format_args!("{fac} {message}")),
            L::Emerg | L::Alert | L::Critical | L::Error => {
                self.trouble(&format_args!("{fac} {message}"))
            }
            // Configuration warnings stand alone; the others (a failed
            // producer-id request, ...) come in runs during an outage.
            L::Warning if fac == "CONFWARN" => {
                tracing::warn!(target: "librdkafka", "librdkafka: {fac} {message}")
            }
            L::Warning => self.trouble(&format_args!("{fac} {message}")),
            L::Notice | L::Info => {
                tracing::info!(target: "librdkafka", "librdkafka: {fac} {message}")
            }
            L::Debug => tracing::debug!(target: "librdkafka", "librdkafka: {fac} {message}"),
        }
    }
}

/// The Kafka sink: one idempotent producer per session.
#[derive(Clone)]
pub struct KafkaSink {
    producer: FutureProducer<RelayContext>,
    /// Stops the warm-up's metadata requests when the last clone goes.
    _warm_up: Arc<WarmUp>,
}

/// Set when the sink is dropped: its warm-up thread stops asking.
struct WarmUp(Arc<AtomicBool>);

impl Drop for WarmUp {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// How long `connect` waits for the warm-up (see [`KafkaSink::connect`]).
const WARM_UP: Duration = Duration::from_secs(1);
/// One metadata request's wait while no broker answers.
const ASK_EVERY: Duration = Duration::from_millis(250);

impl KafkaSink {
    /// A new producer, warmed up so that its first record is acknowledged
    /// ~20 ms after it starts instead of ~0.5 s. librdkafka (2.12) asks for
    /// an idempotent producer's id when a metadata answer arrives from a
    /// broker it keeps, else on a 500 ms timer (and, for a producer created
    /// while no broker answers, only after its next metadata refresh: ~1 s
    /// after the broker is back); the first metadata answer comes from the
    /// bootstrap address, which it then drops for the broker it learned. So
    /// two metadata answers: the second comes from that broker and the
    /// producer id follows at once. `connect` waits up to a second for them;
    /// while the broker does not answer (a producer made during an outage),
    /// a thread of the sink's own goes on asking until it does, so the id is
    /// requested as soon as the broker is back, not a refresh later.
    pub async fn connect(cfg: &KafkaConfig) -> Result<KafkaSink, SinkError> {
        let producer: FutureProducer<RelayContext> = client_config(cfg)?
            .create_with_context(RelayContext)
            .map_err(config_error)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (answered, warm) = tokio::sync::oneshot::channel();
        let (p, s) = (producer.clone(), stop.clone());
        if let Err(e) = std::thread::Builder::new()
            .name("kafka-warm-up".into())
            .spawn(move || warm_up(&p, &s, answered))
        {
            tracing::debug!(error = %e, "kafka: no warm-up thread; sending anyway");
        }
        if !matches!(tokio::time::timeout(WARM_UP, warm).await, Ok(Ok(()))) {
            tracing::debug!("kafka: no metadata within {WARM_UP:?} of the producer's start; sending anyway, asking until the broker answers");
        }
        Ok(KafkaSink {
            producer,
            _warm_up: Arc::new(WarmUp(stop)),
        })
    }

    async fn queue(&self, rec: &Record) -> Result<Sent, SinkError> {
        let mut headers = OwnedHeaders::new_with_capacity(rec.headers.len());
        for (k, v) in &rec.headers {
            headers = headers.insert(Header {
                key: k.as_ref(),
                value: Some(v.as_slice()),
            });
        }
        let mut fr: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&rec.topic)
            .key(rec.key.as_slice())
            .headers(headers);
        if let Some(v) = &rec.value {
            fr = fr.payload(v.as_slice());
        }
        let mut wait = Duration::from_millis(1);
        loop {
            match self.producer.send_result(fr) {
                Ok(f) => {
                    return Ok(Sent::Queued(Box::pin(delivery(f))));
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    fr = back;
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_millis(5));
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge), _)) => {
                    return Ok(Sent::Refused(format!(
                        "record of {} bytes exceeds the producer's message.max.bytes",
                        rec.size()
                    )))
                }
                Err((e @ KafkaError::MessageProduction(RDKafkaErrorCode::Fatal), _)) => {
                    return Err(SinkError::SessionFailed {
                        sink: SINK,
                        message: e.to_string(),
                    })
                }
                Err((e, _)) => {
                    return Err(SinkError::Rejected {
                        sink: SINK,
                        id: rec.id.clone(),
                        message: e.to_string(),
                    })
                }
            }
        }
    }
}

impl Sink for KafkaSink {
    fn send<'a>(
        &'a self,
        _table: &'a str,
        rec: &'a Record,
    ) -> BoxFuture<'a, Result<Sent, SinkError>> {
        Box::pin(self.queue(rec))
    }
}

/// A librdkafka delivery as the pipeline awaits it.
/// Asks for metadata until two answers came (then reports it) or `stop`.
fn warm_up(
    p: &FutureProducer<RelayContext>,
    stop: &AtomicBool,
    answered: tokio::sync::oneshot::Sender<()>,
) {
    let mut answers = 0;
    while answers < 2 {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let asked = Instant::now();
        match p.client().fetch_metadata(None, ASK_EVERY) {
            Ok(_) => answers += 1,
            // An error without a wait (no broker at all): pause a little.
            Err(_) => std::thread::sleep(Duration::from_millis(50).saturating_sub(asked.elapsed())),
        }
    }
    let _ = answered.send(());
}

async fn delivery(f: DeliveryFuture) -> Result<(), DeliveryError> {
    match f.await {
        Ok(Ok(_)) => {
            KAFKA.recovered();
            Ok(())
        }
        Ok(Err((e, _))) => Err(DeliveryError {
            definite: is_definite(&e),
            message: e.to_string(),
        }),
        Err(_) => Err(DeliveryError {
            message: "the producer was dropped".into(),
            definite: false,
        }),
    }
}

pub fn is_definite(e: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::MessageSizeTooLarge
                | C::InvalidMessageSize
                | C::MessageBatchTooLarge
                | C::InvalidMessage
                | C::InvalidRecord
                | C::InvalidTopic
                | C::UnknownTopic
                | C::UnknownPartition
                | C::UnknownTopicOrPartition
                | C::TopicAuthorizationFailed
                | C::ClusterAuthorizationFailed
                | C::SaslAuthenticationFailed
                | C::Authentication
                | C::PolicyViolation
                | C::UnsupportedForMessageFormat
                | C::InvalidRequiredAcks
        )
    )
}

/// The dead-letter record of a bad row: its key and payload as far as known,
/// the reason and the source position in headers. A payload that would make
/// the record larger than `max_bytes` is left out (header
/// `outbox.payload_omitted` gives its size); the row stays in the outbox table.
pub async fn create_topics(
    cfg: &KafkaConfig,
    topics: &[String],
    partitions: i32,
) -> Result<(), SinkError> {
    let admin: AdminClient<DefaultClientContext> =
        client_config(cfg)?.create().map_err(config_error)?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1)))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin
        .create_topics(&new, &opts)
        .await
        .map_err(|e| SinkError::Unavailable {
            sink: SINK,
            message: format!("creating topics: {e}"),
        })?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, code)) => {
                return Err(SinkError::Failed {
                    sink: SINK,
                    message: format!("creating topic {t}: {code}"),
                })
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;
    use std::collections::BTreeMap;

    fn kcfg(props: &[(&str, &str)]) -> KafkaConfig {
        KafkaConfig {
            bootstrap_servers: "127.0.0.1:9092".into(),
            properties: props
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            bad_row_policy: Default::default(),
            dead_letter_topic: None,
            create_topics: None,
            secret_properties: BTreeMap::new(),
        }
    }

    #[test]
    fn defaults_keep_the_guarantees_and_pass_properties_through() {
        let mut k = kcfg(&[
            ("compression.type", "lz4"),
            ("security.protocol", "SASL_SSL"),
        ]);
        k.secret_properties
            .insert("sasl.password".into(), Secret::new("pw"));
        let cc = client_config(&k).unwrap();
        assert_eq!(cc.get("enable.idempotence"), Some("true"));
        assert_eq!(cc.get("acks"), Some("all"));
        assert_eq!(cc.get("message.timeout.ms"), Some("0"));
        assert_eq!(cc.get("compression.type"), Some("lz4"));
        assert_eq!(cc.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(cc.get("sasl.password"), Some("pw"));
        assert_eq!(cc.get("bootstrap.servers"), Some("127.0.0.1:9092"));
    }

    #[test]
    fn delivery_errors_split_into_definite_and_retried() {
        let e = |c| KafkaError::MessageProduction(c);
        for c in [
            RDKafkaErrorCode::MessageSizeTooLarge,
            RDKafkaErrorCode::TopicAuthorizationFailed,
            RDKafkaErrorCode::UnknownTopic,
        ] {
            assert!(is_definite(&e(c)), "{c:?}");
        }
        // A broker answering "unknown error" while it shuts down, a fenced
        // idempotent producer, a purge: start again from the last commit.
        for c in [
            RDKafkaErrorCode::Unknown,
            RDKafkaErrorCode::Fatal,
            RDKafkaErrorCode::OutOfOrderSequenceNumber,
            RDKafkaErrorCode::PurgeInflight,
            RDKafkaErrorCode::NotEnoughReplicas,
        ] {
            assert!(!is_definite(&e(c)), "{c:?}");
        }
    }

    #[test]
    fn overrides_that_break_guarantees_are_refused_by_name() {
        let e = client_config(&kcfg(&[("acks", "1")]))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("kafka.properties.acks"), "{e}");
        let e = client_config(&kcfg(&[("enable.idempotence", "false")]))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("enable.idempotence"), "{e}");
        assert!(client_config(&kcfg(&[("acks", "-1")])).is_ok());
    }
}
