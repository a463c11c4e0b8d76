//! Validation: an `OutboxRelay` → a `ValidatedRelay` the builders can use
//! without further checks, or one error naming the field. Pure.

use std::collections::BTreeMap;

use crate::crd::{BadRowPolicy, OutboxRelay, SecretKeyRef, TlsMode};

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
    RedisPassword,
    RedisCa,
    /// A librdkafka property, e.g. `sasl.password`.
    KafkaProperty(String),
}

/// The spec field that references the Secret key.
impl std::fmt::Display for SecretUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretUse::MysqlPassword => f.write_str("spec.mysql.passwordSecret"),
            SecretUse::MysqlCa => f.write_str("spec.mysql.tls.caSecret"),
            SecretUse::RedisPassword => f.write_str("spec.redis.passwordSecret"),
            SecretUse::RedisCa => f.write_str("spec.redis.caSecret"),
            SecretUse::KafkaProperty(p) => write!(f, "spec.kafka.secretProperties.{p}"),
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
    if s.mysql.outboxes.is_empty() {
        return Err(err(
            "mysql.outboxes",
            "at least one outbox table is required",
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, o) in s.mysql.outboxes.iter().enumerate() {
        let table = o.table.as_deref().unwrap_or("outbox");
        if o.database.is_empty() {
            return Err(err(
                format!("mysql.outboxes[{i}].database"),
                "must not be empty",
            ));
        }
        if !seen.insert((o.database.as_str(), table)) {
            return Err(err(
                format!("mysql.outboxes[{i}]"),
                format!("{}.{table} is listed twice", o.database),
            ));
        }
    }
    let mut secrets = vec![(
        SecretUse::MysqlPassword,
        checked_ref("mysql.passwordSecret", &s.mysql.password_secret)?,
    )];
    if let Some(tls) = &s.mysql.tls {
        match (&tls.mode, &tls.ca_secret) {
            (TlsMode::VerifyCa | TlsMode::VerifyFull, None) => {
                return Err(err(
                    "mysql.tls.caSecret",
                    "is required with mode verify-ca or verify-full",
                ))
            }
            (_, Some(ca)) => {
                secrets.push((SecretUse::MysqlCa, checked_ref("mysql.tls.caSecret", ca)?))
            }
            _ => {}
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
    for (prop, r) in s.kafka.secret_properties.iter().flatten() {
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
    for k in s.kafka.properties.iter().flat_map(BTreeMap::keys) {
        if is_secret_property(k) {
            return Err(err(
                format!("kafka.properties.{k}"),
                "looks secret: put it in kafka.secretProperties with a Secret reference",
            ));
        }
    }
    if s.kafka.bad_row_policy == Some(BadRowPolicy::DeadLetter)
        && s.kafka.dead_letter_topic.is_none()
    {
        return Err(err(
            "kafka.deadLetterTopic",
            "is required with badRowPolicy: DeadLetter",
        ));
    }
    Ok(ValidatedRelay {
        server_id: s
            .mysql
            .server_id
            .unwrap_or_else(|| server_id_from_uid(&uid)),
        name,
        namespace,
        uid,
        spec: s.clone(),
        secrets,
    })
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
