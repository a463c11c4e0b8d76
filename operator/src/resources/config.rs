//! The relay's config file (TOML) and the ConfigMap that carries it. Only
//! non-secret settings: secrets reach the pod as `secretKeyRef` env variables
//! or mounted files, never through the ConfigMap.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use serde::Serialize;

use crate::cleanup::relay_name;
use crate::crd::{BadRowPolicy, ChangeAction, ColumnPreset, OutboxTable, ServerTls, TlsMode};
use crate::resources::child_meta;
use crate::resources::rbac::lease_name;
use crate::validate::{SecretUse, ValidatedRelay};

/// Where the ConfigMap is mounted in the relay container.
pub const CONFIG_DIR: &str = "/etc/outbox-relay";
pub const CONFIG_FILE: &str = "relay.toml";
/// Where the MySQL CA Secret is mounted.
pub const MYSQL_CA_DIR: &str = "/etc/outbox-relay/mysql-ca";
/// Where the PostgreSQL CA Secret is mounted.
pub const POSTGRES_CA_DIR: &str = "/etc/outbox-relay/postgres-ca";
/// Where the Redis CA Secret is mounted.
pub const REDIS_CA_DIR: &str = "/etc/outbox-relay/redis-ca";
/// Where the NATS CA Secret is mounted.
pub const NATS_CA_DIR: &str = "/etc/outbox-relay/nats-ca";
/// Where the NATS credentials (`.creds`) Secret is mounted.
pub const NATS_CREDS_DIR: &str = "/etc/outbox-relay/nats-creds";
/// The relay's HTTP port (health, readiness, metrics).
pub const HTTP_PORT: i32 = 8080;

#[derive(Serialize)]
struct File<'a> {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    start_from: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mysql: Option<Mysql<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    postgres: Option<Postgres<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    outbox: Vec<Outbox<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    changes: Option<Changes<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kafka: Option<Kafka<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    nats: Option<Nats<'a>>,
    redis: Redis<'a>,
    election: Election<'a>,
    status: Status<'a>,
    http: Http,
    log: Log<'a>,
}

#[derive(Serialize)]
struct Mysql<'a> {
    host: &'a str,
    port: i32,
    user: &'a str,
    server_id: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls: Option<Tls>,
}

#[derive(Serialize)]
struct Postgres<'a> {
    host: &'a str,
    port: i32,
    database: &'a str,
    user: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    slot: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    publication: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    create: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message_prefix: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_retained_wal_bytes: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls: Option<Tls>,
}

#[derive(Serialize)]
struct Tls {
    mode: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    ca_file: Option<String>,
}

#[derive(Serialize)]
struct Outbox<'a> {
    database: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    table: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    columns: Option<OutboxColumns<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    topic: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    topic_map: Option<&'a BTreeMap<String, String>>,
}

/// A table of column names, or a preset's name.
#[derive(Serialize)]
#[serde(untagged)]
enum OutboxColumns<'a> {
    Names(BTreeMap<&'static str, &'a str>),
    Preset(&'static str),
}

#[derive(Serialize)]
struct Kafka<'a> {
    bootstrap_servers: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    properties: Option<&'a BTreeMap<String, String>>,
    bad_row_policy: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    dead_letter_topic: Option<&'a str>,
}

#[derive(Serialize)]
struct Changes<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    topic_prefix: Option<&'a str>,
    tables: BTreeMap<&'a str, Vec<&'static str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    topic_map: Option<&'a BTreeMap<String, String>>,
}

#[derive(Serialize)]
struct Nats<'a> {
    url: &'a str,
    stream: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    credentials_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_ca_file: Option<String>,
    tls_required: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    ack_timeout: Option<&'a str>,
    bad_row_policy: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    dead_letter_subject: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    create_stream: Option<CreateStream<'a>>,
}

#[derive(Serialize)]
struct CreateStream<'a> {
    subjects: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    duplicate_window: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    replicas: Option<i32>,
}

fn policy(p: Option<BadRowPolicy>) -> &'static str {
    match p {
        Some(BadRowPolicy::DeadLetter) => "dead_letter",
        _ => "stop",
    }
}

#[derive(Serialize)]
struct Redis<'a> {
    url: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    ca_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_prefix: Option<&'a str>,
}

#[derive(Serialize)]
struct Election<'a> {
    mode: &'static str,
    lease_name: String,
    namespace: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    lease_duration: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    renew_deadline: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_period: Option<&'a str>,
}

#[derive(Serialize)]
struct Status<'a> {
    interval: &'a str,
    resource: &'a str,
    namespace: &'a str,
}

#[derive(Serialize)]
struct Http {
    listen: String,
}

#[derive(Serialize)]
struct Log<'a> {
    level: &'a str,
    format: &'static str,
}

fn outbox(o: &OutboxTable) -> Outbox<'_> {
    let columns = match (&o.columns, o.column_preset) {
        (_, Some(ColumnPreset::Debezium)) => Some(OutboxColumns::Preset("debezium")),
        (Some(c), None) => {
            let mut names = BTreeMap::new();
            for (k, v) in [
                ("id", &c.id),
                ("aggregate_type", &c.aggregate_type),
                ("aggregate_id", &c.aggregate_id),
                ("event_type", &c.event_type),
                ("payload", &c.payload),
                ("headers", &c.headers),
            ] {
                if let Some(v) = v {
                    names.insert(k, v.as_str());
                }
            }
            (!names.is_empty()).then_some(OutboxColumns::Names(names))
        }
        (None, None) => None,
    };
    Outbox {
        database: &o.database,
        table: o.table.as_deref(),
        columns,
        topic: o.topic.as_deref(),
        topic_map: o.topic_map.as_ref(),
    }
}

/// The relay config file for `r`.
pub fn relay_toml(r: &ValidatedRelay) -> String {
    let s = &r.spec;
    let election = s.election.as_ref();
    let mounted = |use_: SecretUse, dir: &str| {
        r.secrets
            .iter()
            .find(|(u, _)| *u == use_)
            .map(|(_, k)| format!("{dir}/{}", k.key))
    };
    let tls = |t: &ServerTls, ca: Option<String>| Tls {
        mode: match t.mode {
            TlsMode::Disabled => "disabled",
            TlsMode::Require => "require",
            TlsMode::VerifyCa => "verify-ca",
            TlsMode::VerifyFull => "verify-full",
        },
        ca_file: ca,
    };
    let file = File {
        // Unique per namespace: keys the checkpoint in a shared Redis.
        name: relay_name(&r.namespace, &r.name),
        start_from: s.start_from.as_deref(),
        mysql: s.mysql.as_ref().map(|m| Mysql {
            host: &m.host,
            port: m.port.unwrap_or(3306),
            user: &m.user,
            server_id: r.server_id,
            tls: m
                .tls
                .as_ref()
                .map(|t| tls(t, mounted(SecretUse::MysqlCa, MYSQL_CA_DIR))),
        }),
        postgres: s.postgres.as_ref().map(|p| Postgres {
            host: &p.host,
            port: p.port.unwrap_or(5432),
            database: &p.database,
            user: &p.user,
            slot: p.slot.as_deref(),
            publication: p.publication.as_deref(),
            create: p.create,
            message_prefix: p.message_prefix.as_deref(),
            max_retained_wal_bytes: p.max_retained_wal_bytes,
            tls: p
                .tls
                .as_ref()
                .map(|t| tls(t, mounted(SecretUse::PostgresCa, POSTGRES_CA_DIR))),
        }),
        outbox: s
            .mysql
            .as_ref()
            .map(|m| &m.outboxes)
            .or(s.postgres.as_ref().map(|p| &p.outboxes))
            .into_iter()
            .flatten()
            .map(outbox)
            .collect(),
        changes: s.changes.as_ref().map(|c| Changes {
            topic_prefix: c.topic_prefix.as_deref(),
            tables: c
                .tables
                .iter()
                .map(|(t, actions)| {
                    let actions = actions
                        .iter()
                        .map(|a| match a {
                            ChangeAction::Insert => "insert",
                            ChangeAction::Update => "update",
                            ChangeAction::Delete => "delete",
                        })
                        .collect();
                    (t.as_str(), actions)
                })
                .collect(),
            topic_map: c.topic_map.as_ref(),
        }),
        kafka: s.kafka.as_ref().map(|k| Kafka {
            bootstrap_servers: &k.bootstrap_servers,
            properties: k.properties.as_ref(),
            bad_row_policy: policy(k.bad_row_policy),
            dead_letter_topic: k.dead_letter_topic.as_deref(),
        }),
        nats: s.nats.as_ref().map(|n| Nats {
            url: &n.url,
            stream: &n.stream,
            user: n.user.as_deref(),
            credentials_file: mounted(SecretUse::NatsCredentials, NATS_CREDS_DIR),
            tls_ca_file: mounted(SecretUse::NatsCa, NATS_CA_DIR),
            tls_required: n.tls.is_some(),
            ack_timeout: n.ack_timeout.as_deref(),
            bad_row_policy: policy(n.bad_row_policy),
            dead_letter_subject: n.dead_letter_subject.as_deref(),
            create_stream: n.create_stream.as_ref().map(|c| CreateStream {
                subjects: &c.subjects,
                duplicate_window: c.duplicate_window.as_deref(),
                replicas: c.replicas,
            }),
        }),
        redis: Redis {
            url: &s.redis.url,
            ca_file: mounted(SecretUse::RedisCa, REDIS_CA_DIR),
            key_prefix: s.redis.key_prefix.as_deref(),
        },
        election: Election {
            mode: "kubernetes",
            lease_name: lease_name(r),
            namespace: r.namespace.clone(),
            lease_duration: election.and_then(|e| e.lease_duration.as_deref()),
            renew_deadline: election.and_then(|e| e.renew_deadline.as_deref()),
            retry_period: election.and_then(|e| e.retry_period.as_deref()),
        },
        // The leader reports into this resource's status.
        status: Status {
            interval: s.heartbeat_interval.as_deref().unwrap_or("5s"),
            resource: &r.name,
            namespace: &r.namespace,
        },
        http: Http {
            listen: format!("0.0.0.0:{HTTP_PORT}"),
        },
        log: Log {
            level: s.log_level.as_deref().unwrap_or("info"),
            format: "json",
        },
    };
    // Serializing plain structs of strings and numbers cannot fail.
    toml::to_string(&file).unwrap_or_default()
}

pub fn build_configmap(r: &ValidatedRelay) -> ConfigMap {
    ConfigMap {
        metadata: child_meta(r),
        data: Some(BTreeMap::from([(CONFIG_FILE.to_string(), relay_toml(r))])),
        ..ConfigMap::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::tests::{fixture, FULL};
    use crate::validate::validate;

    #[test]
    fn config_carries_settings_but_no_secret_material() {
        let v = validate(&fixture(FULL)).expect("valid");
        let cm = build_configmap(&v);
        let toml = &cm.data.as_ref().expect("data")[CONFIG_FILE];
        assert!(toml.contains("name = \"shop.orders\""), "{toml}");
        assert!(
            toml.contains(&format!("server_id = {}", v.server_id)),
            "{toml}"
        );
        assert!(
            toml.contains("ca_file = \"/etc/outbox-relay/mysql-ca/ca.pem\""),
            "{toml}"
        );
        assert!(toml.contains("bad_row_policy = \"dead_letter\""), "{toml}");
        assert!(toml.contains("format = \"json\""), "{toml}");
        assert!(
            toml.contains("[election]\nmode = \"kubernetes\"\nlease_name = \"orders-relay-leader\"\nnamespace = \"shop\""),
            "{toml}"
        );
        assert!(
            toml.contains(
                "[status]\ninterval = \"5s\"\nresource = \"orders\"\nnamespace = \"shop\""
            ),
            "{toml}"
        );
        for secret_ref in ["mysql-relay", "kafka-user", "sasl.password", "password"] {
            assert!(
                !toml.contains(secret_ref),
                "`{secret_ref}` in the ConfigMap:\n{toml}"
            );
        }
        assert!(!toml.contains("[nats]"), "{toml}");
        // The relay's own timing defaults apply unless the spec sets one.
        assert!(!toml.contains("lease_duration"), "{toml}");
        let timed = format!(
            "{FULL}election: {{leaseDuration: 15s, retryPeriod: 2s, renewDeadline: 10s}}\n"
        );
        let v2 = validate(&fixture(&timed)).expect("valid");
        let toml2 = relay_toml(&v2);
        assert!(
            toml2.contains("namespace = \"shop\"\nlease_duration = \"15s\"\nrenew_deadline = \"10s\"\nretry_period = \"2s\"\n"),
            "{toml2}"
        );
        assert_eq!(cm.metadata.name.as_deref(), Some("orders-relay"));
        assert_eq!(cm.metadata.namespace.as_deref(), Some("shop"));
    }

    #[test]
    fn nats_section_instead_of_kafka() {
        let v = validate(&fixture(&crate::validate::tests::nats_spec())).expect("valid");
        let toml = relay_toml(&v);
        assert!(!toml.contains("[kafka]"), "{toml}");
        for line in [
            "[nats]\nurl = \"tls://nats-0.nats:4222,tls://nats-1.nats:4222\"\nstream = \"OUTBOX\"\nuser = \"outbox\"\n",
            "tls_ca_file = \"/etc/outbox-relay/nats-ca/ca.crt\"\ntls_required = true\n",
            "bad_row_policy = \"dead_letter\"\ndead_letter_subject = \"outbox.dlq\"\n",
            "[nats.create_stream]\nsubjects = [\"outbox.>\"]\nduplicate_window = \"5m\"\n",
        ] {
            assert!(toml.contains(line), "{line} not in:\n{toml}");
        }
        assert!(
            !toml.contains("nats-relay"),
            "a Secret name in the config:\n{toml}"
        );
    }

    #[test]
    fn postgres_section_with_its_tls_ca_mounted() {
        let start = FULL.find("mysql:\n").expect("mysql");
        let end = FULL.find("kafka:\n").expect("kafka");
        let pg = r#"postgres:
  host: pg.shop.svc
  database: shop
  user: relay
  passwordSecret: {name: pg-relay, key: password}
  tls: {mode: verify-full, caSecret: {name: pg-ca, key: ca.crt}}
  outboxes:
    - database: public
      columnPreset: Debezium
"#;
        let yaml = format!("{}{pg}{}", &FULL[..start], &FULL[end..]);
        let v = validate(&fixture(&yaml)).expect("valid");
        let toml = relay_toml(&v);
        assert!(
            toml.contains("[postgres.tls]\nmode = \"verify-full\"\nca_file = \"/etc/outbox-relay/postgres-ca/ca.crt\"\n"),
            "{toml}"
        );
        assert!(
            !toml.contains("pg-ca") && !toml.contains("pg-relay"),
            "{toml}"
        );
        let d = crate::resources::deployment::build_deployment(&v, "relay:1", "h");
        let pod = d.spec.expect("spec").template.spec.expect("pod");
        let volume = pod
            .volumes
            .expect("volumes")
            .into_iter()
            .find(|v| v.name == "postgres-ca");
        assert_eq!(
            volume
                .and_then(|v| v.secret)
                .and_then(|s| s.secret_name)
                .as_deref(),
            Some("pg-ca")
        );
        let mounted = pod.containers[0].volume_mounts.iter().flatten().any(|m| {
            m.name == "postgres-ca" && m.mount_path == POSTGRES_CA_DIR && m.read_only == Some(true)
        });
        assert!(mounted, "the CA is mounted read-only at {POSTGRES_CA_DIR}");

        let no_ca = yaml.replace(", caSecret: {name: pg-ca, key: ca.crt}", "");
        let e = validate(&fixture(&no_ca)).expect_err("verify-full without a CA");
        assert_eq!(e.field, "postgres.tls.caSecret", "{e:?}");
    }

    #[test]
    fn changes_section_from_spec_changes() {
        let yaml = format!(
            "{}changes:\n  topicPrefix: cdc\n  tables: {{shop.trades: [insert, update]}}\n  topicMap: {{shop.trades: transactions}}\n",
            crate::validate::tests::FULL
        );
        let toml = relay_toml(&validate(&fixture(&yaml)).expect("valid"));
        assert!(
            toml.contains("[changes]\ntopic_prefix = \"cdc\"\n\n[changes.tables]\n\"shop.trades\" = [\"insert\", \"update\"]\n\n[changes.topic_map]\n\"shop.trades\" = \"transactions\"\n"),
            "{toml}"
        );
    }
}
