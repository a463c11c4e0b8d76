//! Validation: an `OutboxRelay` → a `ValidatedRelay` the builders can use
//! without further checks, or one error naming the field. Pure.

use std::collections::BTreeMap;
use std::time::Duration;

use outbox_relay::election::Timing;

use crate::crd::{
    BadRowPolicy, ChangesSpec, ElectionSpec, KafkaSpec, NatsSpec, OutboxRelay, SecretKeyRef,
    ServerTls, TlsMode,
};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("spec.{field}: {message}")]
pub struct ValidationError {
    pub field: String,
    pub message: String,
}

fn err(field: impl Into<String>, message: impl Into<String>) -> ValidationError {
    ValidationError {
        field: field.into(),
        message: message.into(),
    }
}

/// Everything the builders need, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedRelay {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub spec: crate::crd::OutboxRelaySpec,
    /// Binlog replica server id: the spec's, or derived from the uid.
    pub server_id: u32,
    /// Every Secret key the relay pods read, by purpose.
    pub secrets: Vec<(SecretUse, SecretKeyRef)>,
}

/// What a referenced Secret key is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretUse {
    MysqlPassword,
    MysqlCa,
    PostgresPassword,
    PostgresCa,
    RedisPassword,
    RedisCa,
    /// A librdkafka property, e.g. `sasl.password`.
    KafkaProperty(String),
    NatsPassword,
    NatsToken,
    NatsNkey,
    NatsCredentials,
    NatsCa,
}

/// The spec field that references the Secret key.
impl std::fmt::Display for SecretUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretUse::MysqlPassword => f.write_str("spec.mysql.passwordSecret"),
            SecretUse::MysqlCa => f.write_str("spec.mysql.tls.caSecret"),
            SecretUse::PostgresPassword => f.write_str("spec.postgres.passwordSecret"),
            SecretUse::PostgresCa => f.write_str("spec.postgres.tls.caSecret"),
            SecretUse::RedisPassword => f.write_str("spec.redis.passwordSecret"),
            SecretUse::RedisCa => f.write_str("spec.redis.caSecret"),
            SecretUse::KafkaProperty(p) => write!(f, "spec.kafka.secretProperties.{p}"),
            SecretUse::NatsPassword => f.write_str("spec.nats.passwordSecret"),
            SecretUse::NatsToken => f.write_str("spec.nats.tokenSecret"),
            SecretUse::NatsNkey => f.write_str("spec.nats.nkeySecret"),
            SecretUse::NatsCredentials => f.write_str("spec.nats.credentialsSecret"),
            SecretUse::NatsCa => f.write_str("spec.nats.tls.caSecret"),
        }
    }
}

pub fn validate(r: &OutboxRelay) -> Result<ValidatedRelay, ValidationError> {
    let name = r
        .metadata
        .name
        .clone()
        .ok_or_else(|| err("metadata.name", "is required"))?;
    let namespace = r
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let uid = r.metadata.uid.clone().unwrap_or_default();
    let s = &r.spec;
    if !(1..=5).contains(&s.replicas) {
        return Err(err(
            "replicas",
            format!("{} is not between 1 and 5", s.replicas),
        ));
    }
    let mut secrets = Vec::new();
    let (section, outboxes) = match (&s.mysql, &s.postgres) {
        (Some(m), None) => {
            if m.outboxes.is_empty() && s.changes.is_none() {
                return Err(err(
                    "mysql.outboxes",
                    "at least one outbox table (or spec.changes.tables) is required",
                ));
            }
            secrets.push((
                SecretUse::MysqlPassword,
                checked_ref("mysql.passwordSecret", &m.password_secret)?,
            ));
            if let Some(ca) = server_ca("mysql", m.tls.as_ref())? {
                secrets.push((SecretUse::MysqlCa, ca));
            }
            ("mysql", &m.outboxes)
        }
        (None, Some(p)) => {
            if p.outboxes.is_empty() {
                return Err(err(
                    "postgres.outboxes",
                    "at least one outbox table is required",
                ));
            }
            if s.changes.is_some() {
                return Err(err(
                    "changes",
                    "reads the MySQL binlog; with spec.postgres, relay outbox tables and messages",
                ));
            }
            secrets.push((
                SecretUse::PostgresPassword,
                checked_ref("postgres.passwordSecret", &p.password_secret)?,
            ));
            if let Some(ca) = server_ca("postgres", p.tls.as_ref())? {
                secrets.push((SecretUse::PostgresCa, ca));
            }
            ("postgres", &p.outboxes)
        }
        (Some(_), Some(_)) => {
            return Err(err(
                "postgres",
                "set exactly one database: spec.mysql or spec.postgres, not both",
            ))
        }
        (None, None) => {
            return Err(err(
                "mysql",
                "a database is required: spec.mysql or spec.postgres",
            ))
        }
    };
    if let Some(c) = &s.changes {
        validate_changes(c)?;
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, o) in outboxes.iter().enumerate() {
        let table = o.table.as_deref().unwrap_or("outbox");
        if o.database.is_empty() {
            return Err(err(
                format!("{section}.outboxes[{i}].database"),
                "must not be empty",
            ));
        }
        if !seen.insert((o.database.as_str(), table)) {
            return Err(err(
                format!("{section}.outboxes[{i}]"),
                format!("{}.{table} is listed twice", o.database),
            ));
        }
    }
    if let Some(p) = &s.redis.password_secret {
        secrets.push((
            SecretUse::RedisPassword,
            checked_ref("redis.passwordSecret", p)?,
        ));
    }
    if let Some(ca) = &s.redis.ca_secret {
        if !s.redis.url.starts_with("rediss://") {
            return Err(err(
                "redis.caSecret",
                "is only used with TLS: spec.redis.url must start with rediss://",
            ));
        }
        secrets.push((SecretUse::RedisCa, checked_ref("redis.caSecret", ca)?));
    }
    match (&s.kafka, &s.nats) {
        (Some(kafka), None) => kafka_secrets(kafka, &mut secrets)?,
        (None, Some(nats)) => nats_secrets(nats, &mut secrets)?,
        (Some(_), Some(_)) => {
            return Err(err(
                "nats",
                "set exactly one sink: spec.kafka or spec.nats, not both",
            ))
        }
        (None, None) => return Err(err("kafka", "a sink is required: spec.kafka or spec.nats")),
    }
    if let Some(e) = &s.election {
        election_timing(e)?;
    }
    Ok(ValidatedRelay {
        server_id: s
            .mysql
            .as_ref()
            .and_then(|m| m.server_id)
            .unwrap_or_else(|| server_id_from_uid(&uid)),
        name,
        namespace,
        uid,
        spec: s.clone(),
        secrets,
    })
}

fn validate_changes(c: &ChangesSpec) -> Result<(), ValidationError> {
    if c.tables.is_empty() {
        return Err(err("changes.tables", "must name at least one table"));
    }
    for (name, actions) in &c.tables {
        let field = format!("changes.tables.{name}");
        match name.split_once('.') {
            Some((db, t)) if !db.is_empty() && !t.is_empty() && !t.contains('.') => {}
            _ => return Err(err(field, "must be `database.table`")),
        }
        if actions.is_empty() {
            return Err(err(field, "lists no action: give insert, update or delete"));
        }
    }
    if let Some(k) = c
        .topic_map
        .iter()
        .flat_map(BTreeMap::keys)
        .find(|k| !c.tables.contains_key(*k))
    {
        return Err(err(
            format!("changes.topicMap.{k}"),
            "is not in spec.changes.tables",
        ));
    }
    Ok(())
}

fn kafka_secrets(
    kafka: &KafkaSpec,
    secrets: &mut Vec<(SecretUse, SecretKeyRef)>,
) -> Result<(), ValidationError> {
    for (prop, r) in kafka.secret_properties.iter().flatten() {
        let field = format!("kafka.secretProperties.{prop}");
        if !prop
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_')
            || prop.is_empty()
        {
            return Err(err(field, "is not a librdkafka property name"));
        }
        secrets.push((
            SecretUse::KafkaProperty(prop.clone()),
            checked_ref(&field, r)?,
        ));
    }
    for k in kafka.properties.iter().flat_map(BTreeMap::keys) {
        if is_secret_property(k) {
            return Err(err(
                format!("kafka.properties.{k}"),
                "looks secret: put it in kafka.secretProperties with a Secret reference",
            ));
        }
    }
    if kafka.bad_row_policy == Some(BadRowPolicy::DeadLetter) && kafka.dead_letter_topic.is_none() {
        return Err(err(
            "kafka.deadLetterTopic",
            "is required with badRowPolicy: DeadLetter",
        ));
    }
    Ok(())
}

fn nats_secrets(
    nats: &NatsSpec,
    secrets: &mut Vec<(SecretUse, SecretKeyRef)>,
) -> Result<(), ValidationError> {
    if nats.url.trim().is_empty() {
        return Err(err("nats.url", "must not be empty"));
    }
    if nats.stream.is_empty() || nats.stream.contains(['.', '*', '>', ' ']) {
        return Err(err(
            "nats.stream",
            format!(
                "{:?} is not a stream name (no '.', '*', '>' or spaces)",
                nats.stream
            ),
        ));
    }
    if nats
        .create_stream
        .as_ref()
        .is_some_and(|c| c.subjects.is_empty())
    {
        return Err(err("nats.createStream.subjects", "must not be empty"));
    }
    match (&nats.user, &nats.password_secret) {
        (Some(_), None) => return Err(err("nats.passwordSecret", "is required with nats.user")),
        (None, Some(_)) => return Err(err("nats.user", "is required with nats.passwordSecret")),
        _ => {}
    }
    let auth = [
        (SecretUse::NatsPassword, &nats.password_secret),
        (SecretUse::NatsToken, &nats.token_secret),
        (SecretUse::NatsNkey, &nats.nkey_secret),
        (SecretUse::NatsCredentials, &nats.credentials_secret),
    ];
    let mut given = auth.iter().filter(|(_, r)| r.is_some());
    if let (Some((first, _)), Some((second, _))) = (given.next(), given.next()) {
        return Err(err(
            second.to_string().trim_start_matches("spec.").to_owned(),
            format!("only one way to authenticate: {first} is set too"),
        ));
    }
    for (use_, r) in auth {
        if let Some(r) = r {
            let field = use_.to_string();
            secrets.push((use_, checked_ref(&field["spec.".len()..], r)?));
        }
    }
    if let Some(ca) = nats.tls.as_ref().and_then(|t| t.ca_secret.as_ref()) {
        secrets.push((SecretUse::NatsCa, checked_ref("nats.tls.caSecret", ca)?));
    }
    if nats.bad_row_policy == Some(BadRowPolicy::DeadLetter) && nats.dead_letter_subject.is_none() {
        return Err(err(
            "nats.deadLetterSubject",
            "is required with badRowPolicy: DeadLetter",
        ));
    }
    Ok(())
}

/// librdkafka properties that carry secrets: they must come from a Secret,
/// never through the ConfigMap. The same rule as the relay's
/// `config::is_secret_property` (a cross-crate test keeps them equal).
pub fn is_secret_property(k: &str) -> bool {
    let k = k.to_ascii_lowercase();
    k.contains("password")
        || k.contains("secret")
        || k == "ssl.key.pem"
        || k == "sasl.oauthbearer.config"
}

/// The CA Secret of `spec.<section>.tls`, demanded by the verifying modes.
fn server_ca(
    section: &str,
    tls: Option<&ServerTls>,
) -> Result<Option<SecretKeyRef>, ValidationError> {
    match tls.map(|t| (t.mode, &t.ca_secret)) {
        Some((TlsMode::VerifyCa | TlsMode::VerifyFull, None)) => Err(err(
            format!("{section}.tls.caSecret"),
            "is required with mode verify-ca or verify-full",
        )),
        Some((_, Some(ca))) => checked_ref(&format!("{section}.tls.caSecret"), ca).map(Some),
        _ => Ok(None),
    }
}

/// `spec.election`, completed with the relay's defaults: each field in the
/// schema's form, the lease at least a second (a Lease counts whole
/// seconds), in the order the relay requires.
pub fn election_timing(e: &ElectionSpec) -> Result<Timing, ValidationError> {
    let d = Timing::default();
    let t = Timing {
        lease_duration: duration("election.leaseDuration", e.lease_duration.as_deref())?
            .unwrap_or(d.lease_duration),
        renew_deadline: duration("election.renewDeadline", e.renew_deadline.as_deref())?
            .unwrap_or(d.renew_deadline),
        retry_period: duration("election.retryPeriod", e.retry_period.as_deref())?
            .unwrap_or(d.retry_period),
    };
    if t.lease_duration < Duration::from_secs(1) {
        return Err(err(
            "election.leaseDuration",
            format!("{:?} is too short: at least 1s", t.lease_duration),
        ));
    }
    // The relay's own check, in the resource's field names.
    let camel = |s: &str| {
        s.replace("lease_duration", "leaseDuration")
            .replace("renew_deadline", "renewDeadline")
            .replace("retry_period", "retryPeriod")
    };
    t.check()
        .map_err(|(f, m)| err(format!("election.{}", camel(f)), camel(&m)))?;
    Ok(t)
}

/// A duration in the schema's form: `250ms`, `5s`, `1m`.
fn duration(field: &str, s: Option<&str>) -> Result<Option<Duration>, ValidationError> {
    let Some(s) = s else { return Ok(None) };
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(digits);
    let n: u64 = num.parse().map_err(|_| {
        err(
            field,
            format!("{s:?} is not a duration like 250ms, 5s or 1m"),
        )
    })?;
    match unit {
        "ms" => Ok(Some(Duration::from_millis(n))),
        "s" => Ok(Some(Duration::from_secs(n))),
        "m" => Ok(Some(Duration::from_secs(n.saturating_mul(60)))),
        _ => Err(err(
            field,
            format!("{s:?} is not a duration like 250ms, 5s or 1m"),
        )),
    }
}

fn checked_ref(field: &str, r: &SecretKeyRef) -> Result<SecretKeyRef, ValidationError> {
    if r.name.is_empty() {
        return Err(err(format!("{field}.name"), "must not be empty"));
    }
    if r.key.is_empty() {
        return Err(err(format!("{field}.key"), "must not be empty"));
    }
    Ok(r.clone())
}

/// A stable replica server id from the resource's uid, in
/// 1_000_000..u32::MAX (away from the small ids people give servers).
pub fn server_id_from_uid(uid: &str) -> u32 {
    let h = crate::fnv1a([uid.as_bytes()]);
    1_000_000 + (h % (u32::MAX as u64 - 1_000_000)) as u32
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The full sample as a test fixture.
    pub(crate) fn fixture(yaml_spec: &str) -> OutboxRelay {
        let spec: serde_json::Value = serde_saphyr::from_str(yaml_spec).expect("fixture yaml");
        serde_json::from_value(serde_json::json!({
            "apiVersion": "outboxrelay.dev/v1alpha1",
            "kind": "OutboxRelay",
            "metadata": {"name": "orders", "namespace": "shop", "uid": "5f0c-11", "generation": 3},
            "spec": spec,
        }))
        .expect("fixture")
    }

    pub(crate) const FULL: &str = r#"
replicas: 3
mysql:
  host: mysql.shop.svc
  port: 3306
  user: relay
  passwordSecret: {name: mysql-relay, key: password}
  tls: {mode: verify-ca, caSecret: {name: mysql-ca, key: ca.pem}}
  outboxes:
    - database: shop
    - database: billing
      table: events
      columns: {id: event_id, payload: body}
      topic: "billing.{event_type}"
      topicMap: {Invoice: invoices}
kafka:
  bootstrapServers: kafka-0:9093,kafka-1:9093
  properties: {security.protocol: SASL_SSL, sasl.mechanism: SCRAM-SHA-512}
  secretProperties:
    sasl.username: {name: kafka-user, key: username}
    sasl.password: {name: kafka-user, key: password}
  badRowPolicy: DeadLetter
  deadLetterTopic: outbox.dlq
redis:
  url: redis://redis.shop.svc:6379/0
  passwordSecret: {name: redis, key: password}
  keyPrefix: "shop:"
startFrom: earliest
heartbeatInterval: 5s
"#;

    /// FULL with NATS (user and password, TLS CA) as its sink instead of Kafka.
    pub(crate) fn nats_spec() -> String {
        let start = FULL.find("kafka:\n").expect("kafka");
        let end = FULL.find("redis:\n").expect("redis");
        format!(
            "{}{}{}",
            &FULL[..start],
            r#"nats:
  url: tls://nats-0.nats:4222,tls://nats-1.nats:4222
  stream: OUTBOX
  createStream: {subjects: ["outbox.>"], duplicateWindow: 5m}
  user: outbox
  passwordSecret: {name: nats-relay, key: password}
  tls: {caSecret: {name: nats-ca, key: ca.crt}}
  badRowPolicy: DeadLetter
  deadLetterSubject: outbox.dlq
"#,
            &FULL[end..]
        )
    }

    #[test]
    fn nats_spec_validates_with_its_secrets_listed() {
        let v = validate(&fixture(&nats_spec())).expect("valid");
        let uses: Vec<String> = v.secrets.iter().map(|(u, _)| u.to_string()).collect();
        assert_eq!(
            uses,
            [
                "spec.mysql.passwordSecret",
                "spec.mysql.tls.caSecret",
                "spec.redis.passwordSecret",
                "spec.nats.passwordSecret",
                "spec.nats.tls.caSecret",
            ]
        );
        // A token, an NKey seed or a .creds file instead of the password.
        for (field, use_) in [
            ("tokenSecret", SecretUse::NatsToken),
            ("nkeySecret", SecretUse::NatsNkey),
            ("credentialsSecret", SecretUse::NatsCredentials),
        ] {
            let yaml = nats_spec().replace("  user: outbox\n", "").replace(
                "passwordSecret: {name: nats-relay, key: password}",
                &format!("{field}: {{name: nats-relay, key: k}}"),
            );
            let v = validate(&fixture(&yaml)).expect(field);
            assert!(v.secrets.iter().any(|(u, _)| *u == use_), "{field}");
        }
    }

    #[test]
    fn election_timing_is_completed_with_defaults_and_ordered() {
        let with = |yaml: &str| validate(&fixture(&format!("{FULL}election: {yaml}\n")));
        let t = election_timing(&ElectionSpec {
            lease_duration: Some("15s".into()),
            renew_deadline: Some("10s".into()),
            retry_period: Some("2s".into()),
        })
        .expect("client-go's timing");
        assert_eq!(t.lease_duration, Duration::from_secs(15));
        assert!(with("{leaseDuration: 3s}").is_ok());
        assert_eq!(
            election_timing(&ElectionSpec::default()).expect("defaults"),
            Timing::default()
        );
        for (yaml, want) in [
            (
                "{leaseDuration: 900ms}",
                "spec.election.leaseDuration: 900ms is too short: at least 1s",
            ),
            (
                "{renewDeadline: 2s}",
                "spec.election.leaseDuration: must be longer than renewDeadline (2s)",
            ),
            (
                "{retryPeriod: 1s}",
                "spec.election.renewDeadline: must be longer than retryPeriod (1s)",
            ),
            (
                "{retryPeriod: 1h}",
                "spec.election.retryPeriod: \"1h\" is not a duration like 250ms, 5s or 1m",
            ),
        ] {
            let e = with(yaml).expect_err(yaml).to_string();
            assert!(e.starts_with(want), "{yaml}: {e}");
        }
    }

    #[test]
    fn sink_errors_name_the_field() {
        let nats = nats_spec();
        let cases = [
            (
                nats.replace("redis:\n", &format!("{}redis:\n", &FULL[FULL.find("kafka:\n").unwrap()..FULL.find("redis:\n").unwrap()])),
                "spec.nats: set exactly one sink",
            ),
            (
                FULL[..FULL.find("kafka:\n").unwrap()].to_string() + &FULL[FULL.find("redis:\n").unwrap()..],
                "spec.kafka: a sink is required",
            ),
            (
                nats.replace("  user: outbox\n", ""),
                "spec.nats.user: is required with nats.passwordSecret",
            ),
            (
                nats.replace("  passwordSecret: {name: nats-relay, key: password}\n", ""),
                "spec.nats.passwordSecret: is required with nats.user",
            ),
            (
                nats.replace(
                    "  user: outbox\n",
                    "  user: outbox\n  tokenSecret: {name: nats-relay, key: token}\n",
                ),
                "spec.nats.tokenSecret: only one way to authenticate: spec.nats.passwordSecret is set too",
            ),
            (
                nats.replace("  deadLetterSubject: outbox.dlq\n", ""),
                "spec.nats.deadLetterSubject: is required",
            ),
            (
                nats.replace("stream: OUTBOX", "stream: OUT.BOX"),
                "spec.nats.stream: \"OUT.BOX\" is not a stream name",
            ),
            (
                nats.replace("subjects: [\"outbox.>\"]", "subjects: []"),
                "spec.nats.createStream.subjects: must not be empty",
            ),
            (
                nats.replace("{name: nats-relay, key: password}", "{name: nats-relay, key: \"\"}"),
                "spec.nats.passwordSecret.key: must not be empty",
            ),
        ];
        for (yaml, want) in cases {
            let e = validate(&fixture(&yaml)).expect_err(want).to_string();
            assert!(e.starts_with(want), "{e} does not start with {want}");
        }
    }

    #[test]
    fn changes_are_checked_and_may_replace_the_outboxes() {
        let changes = "changes:\n  tables: {shop.trades: [insert, update]}\n  topicMap: {shop.trades: transactions}\n";
        let only = FULL.replace(
            &FULL[FULL.find("  outboxes:\n").unwrap()..FULL.find("kafka:\n").unwrap()],
            "",
        ) + changes;
        let v = validate(&fixture(&only)).expect("changes without outboxes");
        assert!(v.spec.mysql.as_ref().unwrap().outboxes.is_empty());
        for (bad, want) in [
            (
                changes.replace("shop.trades: [insert, update]", "trades: [insert]"),
                "spec.changes.tables.trades: must be `database.table`",
            ),
            (
                changes.replace("[insert, update]", "[]"),
                "spec.changes.tables.shop.trades: lists no action",
            ),
            (
                changes.replace("topicMap: {shop.trades", "topicMap: {shop.users"),
                "spec.changes.topicMap.shop.users: is not in spec.changes.tables",
            ),
        ] {
            let yaml = format!("{FULL}{bad}");
            let e = validate(&fixture(&yaml)).expect_err(want).to_string();
            assert!(e.starts_with(want), "{e} does not start with {want}");
        }
        let none = FULL.replace(
            &FULL[FULL.find("  outboxes:\n").unwrap()..FULL.find("kafka:\n").unwrap()],
            "",
        );
        let e = validate(&fixture(&none))
            .expect_err("nothing to relay")
            .to_string();
        assert!(e.starts_with("spec.mysql.outboxes: at least one"), "{e}");
    }

    #[test]
    fn full_spec_validates_with_every_secret_listed() {
        let v = validate(&fixture(FULL)).expect("valid");
        assert_eq!(v.namespace, "shop");
        assert_eq!(v.server_id, server_id_from_uid("5f0c-11"));
        let uses: Vec<&SecretUse> = v.secrets.iter().map(|(u, _)| u).collect();
        assert_eq!(
            uses,
            [
                &SecretUse::MysqlPassword,
                &SecretUse::MysqlCa,
                &SecretUse::RedisPassword,
                &SecretUse::KafkaProperty("sasl.password".into()),
                &SecretUse::KafkaProperty("sasl.username".into()),
            ]
        );
    }

    #[test]
    fn server_id_is_stable_and_large() {
        assert_eq!(server_id_from_uid("abc"), server_id_from_uid("abc"));
        assert_ne!(server_id_from_uid("abc"), server_id_from_uid("abd"));
        assert!(server_id_from_uid("abc") >= 1_000_000);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                FULL.replace("replicas: 3", "replicas: 9"),
                "spec.replicas: 9 is not between 1 and 5",
            ),
            (
                FULL.replace(
                    "caSecret: {name: mysql-ca, key: ca.pem}",
                    "caSecret: {name: mysql-ca, key: \"\"}",
                ),
                "spec.mysql.tls.caSecret.key: must not be empty",
            ),
            (
                FULL.replace(", caSecret: {name: mysql-ca, key: ca.pem}", ""),
                "spec.mysql.tls.caSecret: is required",
            ),
            (
                FULL.replace("  deadLetterTopic: outbox.dlq\n", ""),
                "spec.kafka.deadLetterTopic: is required",
            ),
            (
                FULL.replace(
                    "  keyPrefix: \"shop:\"\n",
                    "  keyPrefix: \"shop:\"\n  caSecret: {name: redis-tls, key: ca.crt}\n",
                ),
                "spec.redis.caSecret: is only used with TLS",
            ),
            (
                FULL.replace("sasl.mechanism: SCRAM-SHA-512", "sasl.password: hunter2"),
                "spec.kafka.properties.sasl.password: looks secret",
            ),
            (
                FULL.replace("sasl.mechanism: SCRAM-SHA-512", "ssl.key.pem: hunter2"),
                "spec.kafka.properties.ssl.key.pem: looks secret",
            ),
            (
                FULL.replace(
                    "    - database: billing\n      table: events",
                    "    - database: shop\n      table: outbox",
                ),
                "spec.mysql.outboxes[1]: shop.outbox is listed twice",
            ),
        ];
        for (yaml, want) in cases {
            let e = validate(&fixture(&yaml)).expect_err(want).to_string();
            assert!(e.starts_with(want), "{e} does not start with {want}");
            assert!(!e.contains("hunter2"), "a secret value in an error: {e}");
        }
    }
}
