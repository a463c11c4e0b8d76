//! The relay's config file (TOML) and the ConfigMap that carries it. Only
//! non-secret settings: secrets reach the pod as `secretKeyRef` env variables
//! or mounted files, never through the ConfigMap.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use serde::Serialize;

use crate::cleanup::relay_name;
use crate::crd::{BadRowPolicy, TlsMode};
use crate::resources::child_meta;
use crate::resources::rbac::lease_name;
use crate::validate::{SecretUse, ValidatedRelay};

/// Where the ConfigMap is mounted in the relay container.
pub const CONFIG_DIR: &str = "/etc/outbox-relay";
pub const CONFIG_FILE: &str = "relay.toml";
/// Where the MySQL CA Secret is mounted.
pub const MYSQL_CA_DIR: &str = "/etc/outbox-relay/mysql-ca";
/// Where the Redis CA Secret is mounted.
pub const REDIS_CA_DIR: &str = "/etc/outbox-relay/redis-ca";
/// The relay's HTTP port (health, readiness, metrics).
pub const HTTP_PORT: i32 = 8080;

#[derive(Serialize)]
struct File<'a> {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    start_from: Option<&'a str>,
    mysql: Mysql<'a>,
    outbox: Vec<Outbox<'a>>,
    kafka: Kafka<'a>,
    redis: Redis<'a>,
    election: Election,
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
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    columns: BTreeMap<&'static str, &'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    topic: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    topic_map: Option<&'a BTreeMap<String, String>>,
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
struct Redis<'a> {
    url: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    ca_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_prefix: Option<&'a str>,
}

#[derive(Serialize)]
struct Election {
    mode: &'static str,
    lease_name: String,
    namespace: String,
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

/// The relay config file for `r`.
pub fn relay_toml(r: &ValidatedRelay) -> String {
    let s = &r.spec;
    let mounted = |use_: SecretUse, dir: &str| {
        r.secrets
            .iter()
            .find(|(u, _)| *u == use_)
            .map(|(_, k)| format!("{dir}/{}", k.key))
    };
    let ca = mounted(SecretUse::MysqlCa, MYSQL_CA_DIR);
    let file = File {
        // Unique per namespace: keys the checkpoint in a shared Redis.
        name: relay_name(&r.namespace, &r.name),
        start_from: s.start_from.as_deref(),
        mysql: Mysql {
            host: &s.mysql.host,
            port: s.mysql.port.unwrap_or(3306),
            user: &s.mysql.user,
            server_id: r.server_id,
            tls: s.mysql.tls.as_ref().map(|t| Tls {
                mode: match t.mode {
                    TlsMode::Disabled => "disabled",
                    TlsMode::Require => "require",
                    TlsMode::VerifyCa => "verify-ca",
                    TlsMode::VerifyFull => "verify-full",
                },
                ca_file: ca.clone(),
            }),
        },
        outbox: s
            .mysql
            .outboxes
            .iter()
            .map(|o| {
                let mut columns = BTreeMap::new();
                if let Some(c) = &o.columns {
                    for (k, v) in [
                        ("id", &c.id),
                        ("aggregate_type", &c.aggregate_type),
                        ("aggregate_id", &c.aggregate_id),
                        ("event_type", &c.event_type),
                        ("payload", &c.payload),
                        ("headers", &c.headers),
                    ] {
                        if let Some(v) = v {
                            columns.insert(k, v.as_str());
                        }
                    }
                }
                Outbox {
                    database: &o.database,
                    table: o.table.as_deref(),
                    columns,
                    topic: o.topic.as_deref(),
                    topic_map: o.topic_map.as_ref(),
                }
            })
            .collect(),
        kafka: Kafka {
            bootstrap_servers: &s.kafka.bootstrap_servers,
            properties: s.kafka.properties.as_ref(),
            bad_row_policy: match s.kafka.bad_row_policy {
                Some(BadRowPolicy::DeadLetter) => "dead_letter",
                _ => "stop",
            },
            dead_letter_topic: s.kafka.dead_letter_topic.as_deref(),
        },
        redis: Redis {
            url: &s.redis.url,
            ca_file: mounted(SecretUse::RedisCa, REDIS_CA_DIR),
            key_prefix: s.redis.key_prefix.as_deref(),
        },
        election: Election {
            mode: "kubernetes",
            lease_name: lease_name(r),
            namespace: r.namespace.clone(),
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
        assert_eq!(cm.metadata.name.as_deref(), Some("orders-relay"));
        assert_eq!(cm.metadata.namespace.as_deref(), Some("shop"));
    }
}
