//! The relay's configuration: a TOML file (`deny_unknown_fields`), a few
//! environment overrides, and secrets read from the environment or files.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::pgsql::TlsMode;
use crate::position::StartFrom;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config: `{field}`: {message}")]
    Invalid { field: String, message: String },
    #[error("config: cannot read secret for `{field}` from {path}: {source}")]
    SecretFile {
        field: String,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// A value that must never be printed: `Debug` and `Display` show `***`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Name of this relay: keys the checkpoint in Redis and seeds the default
    /// binlog server id. Relays reading the same outbox must share it.
    pub name: String,
    /// Leadership epoch used to fence checkpoint writes when `election.mode`
    /// is `none` (a single process). Raise it to take over from a stuck
    /// writer. Elected relays get theirs from the election.
    #[serde(default = "one")]
    pub epoch: u64,
    /// Where to start when no checkpoint is stored.
    #[serde(default)]
    pub start_from: StartFrom,
    /// Records (and commit markers) read but not yet acknowledged, at most.
    /// After a SIGKILL they are sent again (with `redis.checkpoint_interval`
    /// of acknowledged traffic); smaller bounds that tail during a catch-up
    /// or a Redis outage, larger lets a drain keep more in flight.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// The database: exactly one of `[mysql]` and `[postgres]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mysql: Option<MysqlConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<PostgresConfig>,
    #[serde(rename = "outbox", default)]
    pub outboxes: Vec<OutboxConfig>,
    /// Change events from plain tables (inserts, updates, deletes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changes: Option<ChangesConfig>,
    /// The sink: exactly one of `[kafka]` and `[nats]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats: Option<NatsConfig>,
    pub redis: RedisConfig,
    #[serde(default)]
    pub election: ElectionConfig,
    #[serde(default)]
    pub status: StatusConfig,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub log: LogConfig,
}

fn default_max_in_flight() -> usize {
    20_000
}

fn one() -> u64 {
    1
}

/// Change events from plain tables, as ditto's `TABLE_FILTER` and
/// `TOPIC_MAPPING`: `tables` maps `database.table` to the actions relayed.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ChangesConfig {
    /// Default topic (subject) of a table: `<topic_prefix>.<database>.<table>`.
    #[serde(default = "default_changes_prefix")]
    pub topic_prefix: String,
    /// `"database.table" = ["insert", "update", "delete"]`.
    pub tables: BTreeMap<String, Vec<Action>>,
    /// `"database.table" = "topic"`: instead of the default topic.
    #[serde(default)]
    pub topic_map: BTreeMap<String, String>,
}

fn default_changes_prefix() -> String {
    "cdc".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Insert,
    Update,
    Delete,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Insert => "insert",
            Action::Update => "update",
            Action::Delete => "delete",
        }
    }
}

impl ChangesConfig {
    /// The captured table `database`.`table`: its actions and topic.
    pub fn table(&self, database: &str, table: &str) -> Option<(&[Action], String)> {
        let name = format!("{database}.{table}");
        let actions = self.tables.get(&name)?;
        let topic = self
            .topic_map
            .get(&name)
            .cloned()
            .unwrap_or_else(|| format!("{}.{name}", self.topic_prefix));
        Some((actions, topic))
    }

    fn validate(&self, outboxes: &[OutboxConfig]) -> Result<(), ConfigError> {
        if self.tables.is_empty() {
            return Err(invalid("changes.tables", "must name at least one table"));
        }
        for (name, actions) in &self.tables {
            let f = format!("changes.tables.\"{name}\"");
            let Some((db, table)) = name.split_once('.') else {
                return Err(invalid(f, "must be `database.table`"));
            };
            if db.is_empty() || table.is_empty() || table.contains('.') {
                return Err(invalid(f, "must be `database.table`"));
            }
            if actions.is_empty() {
                return Err(invalid(
                    f,
                    "lists no action: give one or more of insert, update, delete",
                ));
            }
            if outboxes
                .iter()
                .any(|o| o.database == db && o.table == table)
            {
                return Err(invalid(f, "is an [[outbox]] table too"));
            }
            let topic = self
                .topic_map
                .get(name)
                .cloned()
                .unwrap_or_else(|| format!("{}.{name}", self.topic_prefix));
            crate::outbox::validate_topic_name(&topic).map_err(|m| {
                invalid(
                    if self.topic_map.contains_key(name) {
                        format!("changes.topic_map.\"{name}\"")
                    } else {
                        "changes.topic_prefix".into()
                    },
                    m,
                )
            })?;
        }
        if let Some(k) = self
            .topic_map
            .keys()
            .find(|k| !self.tables.contains_key(*k))
        {
            return Err(invalid(
                format!("changes.topic_map.\"{k}\""),
                "is not in changes.tables",
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MysqlConfig {
    pub host: String,
    #[serde(default = "default_mysql_port")]
    pub port: u16,
    pub user: String,
    /// File holding the password (a mounted Secret). The environment variable
    /// `OUTBOX_RELAY_MYSQL_PASSWORD` takes precedence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Replica server id this relay registers with; must be unique among the
    /// server's replicas. Default: derived from `name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_id: Option<u32>,
    /// Heartbeat period asked of the server; the stream is considered dead
    /// after three periods without any event.
    #[serde(default = "default_heartbeat", with = "humantime_serde")]
    pub heartbeat: Duration,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(default)]
    pub tls: TlsConfig,
    #[serde(skip)]
    pub password: Secret,
}

/// A PostgreSQL source: logical replication with the built-in `pgoutput`
/// plugin through a slot and a publication of the outbox tables.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    pub host: String,
    #[serde(default = "default_postgres_port")]
    pub port: u16,
    pub user: String,
    /// The database holding the outbox tables (an outbox's `database` is
    /// its schema under `[postgres]`; `schema` is accepted as its name).
    pub database: String,
    /// File holding the password (a mounted Secret). The environment variable
    /// `OUTBOX_RELAY_POSTGRES_PASSWORD` takes precedence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Logical replication slot. Default: `outbox_relay_<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<String>,
    /// Publication of the outbox tables. Default: `outbox_relay_<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publication: Option<String>,
    /// Create the slot and the publication when they are missing (else
    /// preflight names the statements to run).
    #[serde(default = "yes")]
    pub create: bool,
    /// `pg_logical_emit_message(true, prefix, json)` messages with this
    /// prefix are outbox events too; "" relays no messages.
    #[serde(default = "default_message_prefix")]
    pub message_prefix: String,
    /// Retained WAL (bytes) above which the status warns: an abandoned slot
    /// keeps WAL until the disk fills.
    #[serde(default = "default_max_retained_wal")]
    pub max_retained_wal_bytes: u64,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// TLS to the server (`sslmode`); default `mode = "disabled"`.
    #[serde(default)]
    pub tls: TlsConfig,
    #[serde(skip)]
    pub password: Secret,
}

impl PostgresConfig {
    pub fn slot(&self, relay: &str) -> String {
        self.slot
            .clone()
            .unwrap_or_else(|| crate::keys::pg_object_name(relay))
    }
    pub fn publication(&self, relay: &str) -> String {
        self.publication
            .clone()
            .unwrap_or_else(|| crate::keys::pg_object_name(relay))
    }
}

/// A PostgreSQL slot name: lower-case letters, digits and `_`, at most 63.
fn is_slot_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn default_postgres_port() -> u16 {
    5432
}
fn yes() -> bool {
    true
}
fn default_message_prefix() -> String {
    "outbox".into()
}
fn default_max_retained_wal() -> u64 {
    1 << 30
}

fn default_mysql_port() -> u16 {
    3306
}
fn default_heartbeat() -> Duration {
    Duration::from_secs(5)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    #[serde(default)]
    pub mode: TlsMode,
    /// PEM CA bundle to verify the server with (`verify-ca`, `verify-full`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

impl TlsConfig {
    /// `section` names the config section in the error (`mysql`, `postgres`).
    fn validate(&self, section: &str) -> Result<(), ConfigError> {
        if matches!(self.mode, TlsMode::VerifyCa | TlsMode::VerifyFull) && self.ca_file.is_none() {
            return Err(invalid(
                format!("{section}.tls.ca_file"),
                "required with mode verify-ca or verify-full",
            ));
        }
        Ok(())
    }
}

/// One outbox table and how its rows become records.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxConfig {
    /// The database (MySQL) or schema (PostgreSQL) of the table.
    #[serde(alias = "schema")]
    pub database: String,
    #[serde(default = "default_table")]
    pub table: String,
    #[serde(default)]
    pub columns: Columns,
    /// Topic template over the row: `{aggregate_type}`, `{event_type}`,
    /// `{database}`, `{table}`.
    #[serde(default = "default_topic")]
    pub topic: String,
    /// Explicit topic per aggregate type; wins over the template.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub topic_map: BTreeMap<String, String>,
}

fn default_table() -> String {
    "outbox".into()
}
fn default_topic() -> String {
    "outbox.event.{aggregate_type}".into()
}

/// Column names of an outbox table: a table of names, or a preset:
/// `columns = "debezium"` for the Debezium Outbox Event Router's defaults
/// (`id`, `aggregatetype`, `aggregateid`, `type`, `payload`).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Columns {
    pub id: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    pub payload: String,
    /// JSON object column whose entries become record headers. Used when the
    /// table has it; set to "" to ignore such a column.
    pub headers: String,
}

/// The table form of `columns`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ColumnNames {
    id: String,
    aggregate_type: String,
    aggregate_id: String,
    event_type: String,
    payload: String,
    headers: String,
}

impl Default for ColumnNames {
    fn default() -> Self {
        let c = Columns::default();
        ColumnNames {
            id: c.id,
            aggregate_type: c.aggregate_type,
            aggregate_id: c.aggregate_id,
            event_type: c.event_type,
            payload: c.payload,
            headers: c.headers,
        }
    }
}

impl Columns {
    /// The Debezium Outbox Event Router's default column names.
    pub fn debezium() -> Columns {
        Columns {
            id: "id".into(),
            aggregate_type: "aggregatetype".into(),
            aggregate_id: "aggregateid".into(),
            event_type: "type".into(),
            payload: "payload".into(),
            headers: String::new(),
        }
    }
}

impl<'de> Deserialize<'de> for Columns {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Columns;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table of column names, or the preset \"debezium\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Columns, E> {
                match v {
                    "debezium" => Ok(Columns::debezium()),
                    "default" => Ok(Columns::default()),
                    other => Err(E::custom(format!(
                        "unknown column preset `{other}`: \"debezium\" or \"default\", or a table of names"
                    ))),
                }
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, m: A) -> Result<Columns, A::Error> {
                let n = ColumnNames::deserialize(serde::de::value::MapAccessDeserializer::new(m))?;
                Ok(Columns {
                    id: n.id,
                    aggregate_type: n.aggregate_type,
                    aggregate_id: n.aggregate_id,
                    event_type: n.event_type,
                    payload: n.payload,
                    headers: n.headers,
                })
            }
        }
        d.deserialize_any(V)
    }
}

impl Default for Columns {
    fn default() -> Self {
        Columns {
            id: "id".into(),
            aggregate_type: "aggregate_type".into(),
            aggregate_id: "aggregate_id".into(),
            event_type: "event_type".into(),
            payload: "payload".into(),
            headers: "headers".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BadRowPolicy {
    /// Stop the relay with an error naming the row; the position stays before it.
    #[default]
    Stop,
    /// Send the row to `dead_letter_topic` with the reason in headers, continue.
    DeadLetter,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    pub bootstrap_servers: String,
    /// librdkafka properties passed through (compression, TLS, SASL...).
    /// Secret ones come from `OUTBOX_RELAY_KAFKA_<PROPERTY>` env variables
    /// (`sasl.password` ← `OUTBOX_RELAY_KAFKA_SASL_PASSWORD`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub properties: BTreeMap<String, String>,
    #[serde(default)]
    pub bad_row_policy: BadRowPolicy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_topic: Option<String>,
    /// Create missing topics at start (local use). Production topics are
    /// expected to exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_topics: Option<CreateTopics>,
    #[serde(skip)]
    pub secret_properties: BTreeMap<String, Secret>,
}

/// NATS JetStream as the sink. Secrets come from the environment:
/// `OUTBOX_RELAY_NATS_PASSWORD` (with `user`), `OUTBOX_RELAY_NATS_TOKEN`,
/// `OUTBOX_RELAY_NATS_NKEY` (an NKey seed), or a `credentials_file`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated: `nats://host:4222`, `tls://host:4222`.
    pub url: String,
    /// The JetStream stream every record goes to (checked at start).
    pub stream: String,
    /// Create `stream` at start when it does not exist (file storage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_stream: Option<CreateStream>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_file: Option<PathBuf>,
    /// CA of the server's certificate (PEM), for a private CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<PathBuf>,
    #[serde(default)]
    pub tls_required: bool,
    /// How long a publish waits for its JetStream acknowledgement before the
    /// stream restarts at the last acknowledged commit.
    #[serde(default = "default_ack_timeout", with = "humantime_serde")]
    pub ack_timeout: Duration,
    /// The server's `max_payload` (NATS' default 1 MiB): larger rows are bad rows.
    #[serde(default = "default_max_payload")]
    pub max_payload: usize,
    #[serde(default)]
    pub bad_row_policy: BadRowPolicy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_subject: Option<String>,
    #[serde(skip)]
    pub password: Option<Secret>,
    #[serde(skip)]
    pub token: Option<Secret>,
    #[serde(skip)]
    pub nkey: Option<Secret>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CreateStream {
    pub subjects: Vec<String>,
    /// JetStream drops a message whose `Nats-Msg-Id` it stored within this
    /// window: the replays after a crash.
    #[serde(default = "default_duplicate_window", with = "humantime_serde")]
    pub duplicate_window: Duration,
    #[serde(default = "one_replica")]
    pub replicas: usize,
}

fn default_ack_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_max_payload() -> usize {
    1024 * 1024
}

fn default_duplicate_window() -> Duration {
    Duration::from_secs(120)
}

fn one_replica() -> usize {
    1
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTopics {
    pub topics: Vec<String>,
    #[serde(default = "default_partitions")]
    pub partitions: i32,
}

fn default_partitions() -> i32 {
    3
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port/db` (or `rediss://`), without the password; the
    /// password comes from `OUTBOX_RELAY_REDIS_PASSWORD` or `password_file`.
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// PEM CA bundle that signed the server's certificate (`rediss://`);
    /// default: the system's trusted roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    /// Longest time an acknowledged commit waits before its checkpoint write.
    #[serde(default = "default_checkpoint_interval", with = "humantime_serde")]
    pub checkpoint_interval: Duration,
    #[serde(skip)]
    pub password: Secret,
}

fn default_key_prefix() -> String {
    crate::keys::DEFAULT_KEY_PREFIX.into()
}
fn default_checkpoint_interval() -> Duration {
    Duration::from_millis(100)
}

/// How the relays sharing a `name` pick the one that streams.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ElectionMode {
    /// A single process: it always leads, with the configured `epoch`.
    #[default]
    None,
    /// A key in the checkpoint's Redis (`SET NX PX`): HA outside Kubernetes.
    Redis,
    /// A `coordination.k8s.io/v1` Lease (what the operator configures).
    Kubernetes,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ElectionConfig {
    #[serde(default)]
    pub mode: ElectionMode,
    /// A candidate takes over when the lease has not been renewed for this long.
    #[serde(default = "default_lease_duration", with = "humantime_serde")]
    pub lease_duration: Duration,
    /// The leader stops streaming when it could not renew for this long.
    #[serde(default = "default_renew_deadline", with = "humantime_serde")]
    pub renew_deadline: Duration,
    /// How often the leader renews and a standby tries to acquire.
    #[serde(default = "default_retry_period", with = "humantime_serde")]
    pub retry_period: Duration,
    /// Kubernetes: the Lease's name (default `<name>-relay-leader`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_name: Option<String>,
    /// Kubernetes: the Lease's namespace (default: `POD_NAMESPACE`, else the
    /// client's default namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// This process's name in the lock (default: `POD_NAME` or the host
    /// name); a per-process suffix is always added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

impl ElectionConfig {
    /// The Lease's name for the relay `name`: `lease_name`, or
    /// `<name>-relay-leader`.
    pub fn lease_name(&self, name: &str) -> String {
        self.lease_name
            .clone()
            .unwrap_or_else(|| format!("{name}-relay-leader"))
    }
}

/// A Kubernetes object name (RFC 1123 subdomain): at most 253 lowercase
/// letters, digits, '-' and '.', starting and ending with a letter or digit.
fn is_dns_subdomain(s: &str) -> bool {
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    s.len() <= 253
        && edge(s.chars().next())
        && edge(s.chars().last())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
}

impl Default for ElectionConfig {
    fn default() -> Self {
        let t = crate::election::Timing::default();
        ElectionConfig {
            mode: ElectionMode::None,
            lease_duration: t.lease_duration,
            renew_deadline: t.renew_deadline,
            retry_period: t.retry_period,
            lease_name: None,
            namespace: None,
            identity: None,
        }
    }
}

impl ElectionConfig {
    pub fn timing(&self) -> crate::election::Timing {
        crate::election::Timing {
            lease_duration: self.lease_duration,
            renew_deadline: self.renew_deadline,
            retry_period: self.retry_period,
        }
    }
}

fn default_lease_duration() -> Duration {
    crate::election::Timing::default().lease_duration
}
fn default_renew_deadline() -> Duration {
    crate::election::Timing::default().renew_deadline
}
fn default_retry_period() -> Duration {
    crate::election::Timing::default().retry_period
}

/// The relay's report (`/status`, and the OutboxRelay status when set).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StatusConfig {
    /// How often the report is refreshed (binlog head polled) and, while
    /// leading, written into the OutboxRelay status.
    #[serde(default = "default_status_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// The OutboxRelay whose status the leader writes (Kubernetes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    /// Its namespace (default: `POD_NAMESPACE`, else the client's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

impl Default for StatusConfig {
    fn default() -> Self {
        StatusConfig {
            interval: default_status_interval(),
            resource: None,
            namespace: None,
        }
    }
}

fn default_status_interval() -> Duration {
    Duration::from_secs(5)
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    #[serde(default = "default_listen")]
    pub listen: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: default_listen(),
        }
    }
}

fn default_listen() -> String {
    "0.0.0.0:8080".into()
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default = "default_level")]
    pub level: String,
    #[serde(default)]
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: default_level(),
            format: LogFormat::Text,
        }
    }
}

fn default_level() -> String {
    "info".into()
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Environment variable prefix for Kafka properties (secret or not).
pub const KAFKA_ENV_PREFIX: &str = "OUTBOX_RELAY_KAFKA_";

impl Config {
    /// Reads the file, applies environment overrides and secrets, validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let env: Vec<(String, String)> = std::env::vars().collect();
        Config::from_toml(&text, path, &env)
    }

    /// Parses and validates; `env` is the process environment (a parameter so
    /// tests need not mutate the real one).
    pub fn from_toml(
        text: &str,
        path: &Path,
        env: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        cfg.apply_env(env)?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn apply_env(&mut self, env: &[(String, String)]) -> Result<(), ConfigError> {
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let port = |k: &str, v: String| {
            v.parse()
                .map_err(|_| invalid(k, format!("`{v}` is not a port")))
        };
        if let Some(m) = &mut self.mysql {
            if let Some(v) = get("OUTBOX_RELAY_MYSQL_HOST") {
                m.host = v;
            }
            if let Some(v) = get("OUTBOX_RELAY_MYSQL_PORT") {
                m.port = port("OUTBOX_RELAY_MYSQL_PORT", v)?;
            }
            if let Some(v) = get("OUTBOX_RELAY_MYSQL_USER") {
                m.user = v;
            }
            m.password = secret_from(
                "mysql.password",
                get("OUTBOX_RELAY_MYSQL_PASSWORD"),
                m.password_file.as_deref(),
            )?;
        }
        if let Some(p) = &mut self.postgres {
            if let Some(v) = get("OUTBOX_RELAY_POSTGRES_HOST") {
                p.host = v;
            }
            if let Some(v) = get("OUTBOX_RELAY_POSTGRES_PORT") {
                p.port = port("OUTBOX_RELAY_POSTGRES_PORT", v)?;
            }
            if let Some(v) = get("OUTBOX_RELAY_POSTGRES_USER") {
                p.user = v;
            }
            p.password = secret_from(
                "postgres.password",
                get("OUTBOX_RELAY_POSTGRES_PASSWORD"),
                p.password_file.as_deref(),
            )?;
        }
        if let (Some(v), Some(k)) = (get("OUTBOX_RELAY_KAFKA_BOOTSTRAP_SERVERS"), &mut self.kafka) {
            k.bootstrap_servers = v;
        }
        if let Some(n) = &mut self.nats {
            if let Some(v) = get("OUTBOX_RELAY_NATS_URL") {
                n.url = v;
            }
            n.password = get("OUTBOX_RELAY_NATS_PASSWORD").map(Secret::new);
            n.token = get("OUTBOX_RELAY_NATS_TOKEN").map(Secret::new);
            n.nkey = get("OUTBOX_RELAY_NATS_NKEY").map(Secret::new);
        }
        if let Some(v) = get("OUTBOX_RELAY_REDIS_URL") {
            self.redis.url = v;
        }
        if let Some(v) = get("OUTBOX_RELAY_EPOCH") {
            self.epoch = v
                .parse()
                .map_err(|_| invalid("OUTBOX_RELAY_EPOCH", format!("`{v}` is not a number")))?;
        }
        if let Some(v) = get("OUTBOX_RELAY_LOG_LEVEL") {
            self.log.level = v;
        }
        self.redis.password = secret_from(
            "redis.password",
            get("OUTBOX_RELAY_REDIS_PASSWORD"),
            self.redis.password_file.as_deref(),
        )?;
        for (k, v) in env {
            if k == "OUTBOX_RELAY_KAFKA_BOOTSTRAP_SERVERS" {
                continue;
            }
            if let (Some(prop), Some(kafka)) = (k.strip_prefix(KAFKA_ENV_PREFIX), &mut self.kafka) {
                let prop = prop.to_ascii_lowercase().replace('_', ".");
                kafka.secret_properties.insert(prop, Secret::new(v));
            }
        }
        Ok(())
    }

    /// The sink's name in logs and metrics: `kafka` or `nats`.
    pub fn sink_kind(&self) -> &'static str {
        if self.nats.is_some() {
            "nats"
        } else {
            "kafka"
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.name.trim().is_empty() {
            return Err(invalid("name", "must not be empty"));
        }
        if self.epoch == 0 {
            return Err(invalid("epoch", "must be at least 1"));
        }
        match (&self.mysql, &self.postgres) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "postgres",
                    "[mysql] and [postgres] are both set: a relay reads one database",
                ))
            }
            (None, None) => {
                return Err(invalid(
                    "mysql",
                    "a database is required: [mysql] or [postgres]",
                ))
            }
            (Some(m), None) => m.validate()?,
            (None, Some(p)) => {
                p.validate(&self.name)?;
                if self.changes.is_some() {
                    return Err(invalid(
                        "changes",
                        "change events of plain tables are read from the MySQL binlog only; \
                         with [postgres], relay outbox tables and messages",
                    ));
                }
            }
        }
        if self.max_in_flight < 100 {
            return Err(invalid(
                "max_in_flight",
                format!("{} is too small: at least 100", self.max_in_flight),
            ));
        }
        if self.outboxes.is_empty() && self.changes.is_none() {
            return Err(invalid(
                "outbox",
                "at least one [[outbox]] table (or [changes] tables) is required",
            ));
        }
        if let Some(c) = &self.changes {
            c.validate(&self.outboxes)?;
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, o) in self.outboxes.iter().enumerate() {
            let f = |n: &str| format!("outbox[{i}].{n}");
            if o.database.is_empty() {
                return Err(invalid(f("database"), "must not be empty"));
            }
            if o.table.is_empty() {
                return Err(invalid(f("table"), "must not be empty"));
            }
            if !seen.insert((o.database.clone(), o.table.clone())) {
                return Err(invalid(
                    f("table"),
                    format!("{}.{} is listed twice", o.database, o.table),
                ));
            }
            let c = &o.columns;
            for (name, v) in [
                ("id", &c.id),
                ("aggregate_type", &c.aggregate_type),
                ("aggregate_id", &c.aggregate_id),
                ("event_type", &c.event_type),
                ("payload", &c.payload),
            ] {
                if v.is_empty() {
                    return Err(invalid(f(&format!("columns.{name}")), "must not be empty"));
                }
            }
            crate::outbox::TopicTemplate::parse(&o.topic).map_err(|m| invalid(f("topic"), m))?;
            for (k, t) in &o.topic_map {
                crate::outbox::validate_topic_name(t)
                    .map_err(|m| invalid(f(&format!("topic_map.{k}")), m))?;
            }
        }
        match (&self.kafka, &self.nats) {
            (Some(_), Some(_)) => {
                return Err(invalid("nats", "set either [kafka] or [nats], not both"))
            }
            (None, None) => {
                return Err(invalid(
                    "kafka",
                    "required (or [nats]): where the records go",
                ))
            }
            (None, Some(n)) => n.validate()?,
            (Some(kafka), None) => {
                if kafka.bootstrap_servers.is_empty() {
                    return Err(invalid("kafka.bootstrap_servers", "must not be empty"));
                }
                match (&kafka.bad_row_policy, &kafka.dead_letter_topic) {
                    (BadRowPolicy::DeadLetter, None) => {
                        return Err(invalid(
                            "kafka.dead_letter_topic",
                            "required with bad_row_policy = \"dead_letter\"",
                        ))
                    }
                    (_, Some(t)) => crate::outbox::validate_topic_name(t)
                        .map_err(|m| invalid("kafka.dead_letter_topic", m))?,
                    _ => {}
                }
                for k in kafka.properties.keys() {
                    if is_secret_property(k) {
                        return Err(invalid(
                        format!("kafka.properties.{k}"),
                        format!(
                            "secret properties must not be in the config file; set {KAFKA_ENV_PREFIX}{}",
                            k.to_ascii_uppercase().replace('.', "_")
                        ),
                    ));
                    }
                }
                if let Some(ct) = &kafka.create_topics {
                    if ct.partitions < 1 {
                        return Err(invalid(
                            "kafka.create_topics.partitions",
                            "must be at least 1",
                        ));
                    }
                }
            }
        }
        if !(self.redis.url.starts_with("redis://") || self.redis.url.starts_with("rediss://")) {
            return Err(invalid(
                "redis.url",
                "must start with redis:// or rediss://",
            ));
        }
        if self.redis.ca_file.is_some() && !self.redis.url.starts_with("rediss://") {
            return Err(invalid(
                "redis.ca_file",
                "is only used with TLS: the url must start with rediss://",
            ));
        }
        if url_has_password(&self.redis.url) {
            return Err(invalid(
                "redis.url",
                "must not contain a password; use OUTBOX_RELAY_REDIS_PASSWORD or redis.password_file",
            ));
        }
        if self.redis.checkpoint_interval.is_zero() {
            return Err(invalid(
                "redis.checkpoint_interval",
                "must be greater than 0",
            ));
        }
        self.election
            .timing()
            .check()
            .map_err(|(field, m)| invalid(format!("election.{field}"), m))?;
        if self.election.mode == ElectionMode::Kubernetes
            && self.election.lease_duration < Duration::from_secs(1)
        {
            return Err(invalid(
                "election.lease_duration",
                "must be at least 1s with mode = \"kubernetes\" (a Lease counts whole seconds)",
            ));
        }
        if self.election.mode == ElectionMode::Kubernetes {
            let lease = self.election.lease_name(&self.name);
            if !is_dns_subdomain(&lease) {
                let what = match &self.election.lease_name {
                    Some(_) => format!("{lease:?}"),
                    None => format!("the default {lease:?} (from `name`)"),
                };
                return Err(invalid(
                    "election.lease_name",
                    format!(
                        "{what} is not a valid Kubernetes object name: lowercase letters, \
                         digits, '-' and '.', at most 253, starting and ending with a letter or digit"
                    ),
                ));
            }
        }
        if self.status.interval < Duration::from_millis(100) {
            return Err(invalid("status.interval", "must be at least 100ms"));
        }
        if self.http.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                "http.listen",
                format!("`{}` is not an address like 0.0.0.0:8080", self.http.listen),
            ));
        }
        Ok(())
    }

    /// The binlog replica server id: configured, or a stable hash of `name`
    /// in 1_000_000..u32::MAX (away from the small ids people give servers).
    pub fn server_id(&self) -> u32 {
        self.mysql
            .as_ref()
            .and_then(|m| m.server_id)
            .unwrap_or_else(|| {
                let h = fnv1a(self.name.as_bytes());
                1_000_000 + (h % (u32::MAX as u64 - 1_000_000)) as u32
            })
    }
}

impl MysqlConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.host.is_empty() {
            return Err(invalid("mysql.host", "must not be empty"));
        }
        if self.user.is_empty() {
            return Err(invalid("mysql.user", "must not be empty"));
        }
        if self.server_id == Some(0) {
            return Err(invalid("mysql.server_id", "must not be 0"));
        }
        if self.heartbeat.is_zero() {
            return Err(invalid("mysql.heartbeat", "must be greater than 0"));
        }
        self.tls.validate("mysql")
    }
}

impl PostgresConfig {
    fn validate(&self, relay: &str) -> Result<(), ConfigError> {
        for (field, v) in [
            ("postgres.host", &self.host),
            ("postgres.user", &self.user),
            ("postgres.database", &self.database),
        ] {
            if v.is_empty() {
                return Err(invalid(field, "must not be empty"));
            }
        }
        for (field, v) in [
            ("postgres.slot", self.slot(relay)),
            ("postgres.publication", self.publication(relay)),
        ] {
            if !is_slot_name(&v) {
                return Err(invalid(
                    field,
                    format!(
                        "`{v}` is not a valid name: lower-case letters, digits and `_`, at most 63"
                    ),
                ));
            }
        }
        self.tls.validate("postgres")
    }
}

fn fnv1a(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ x as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// librdkafka properties that carry secrets.
pub fn is_secret_property(k: &str) -> bool {
    let k = k.to_ascii_lowercase();
    k.contains("password")
        || k.contains("secret")
        || k == "ssl.key.pem"
        || k == "sasl.oauthbearer.config"
}

fn url_has_password(url: &str) -> bool {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let authority = rest.split('/').next().unwrap_or_default();
    authority
        .rsplit_once('@')
        .is_some_and(|(userinfo, _)| userinfo.contains(':'))
}

impl NatsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.url.trim().is_empty() {
            return Err(invalid("nats.url", "must not be empty"));
        }
        if self.stream.is_empty() || self.stream.contains(['.', ' ', '*', '>']) {
            return Err(invalid(
                "nats.stream",
                "must be a stream name: no spaces, '.', '*' or '>'",
            ));
        }
        if let Some(c) = &self.create_stream {
            if c.subjects.is_empty() {
                return Err(invalid("nats.create_stream.subjects", "must not be empty"));
            }
        }
        match (&self.bad_row_policy, &self.dead_letter_subject) {
            (BadRowPolicy::DeadLetter, None) => {
                return Err(invalid(
                    "nats.dead_letter_subject",
                    "required with bad_row_policy = \"dead_letter\"",
                ))
            }
            (_, Some(s)) if s.is_empty() || s.contains([' ', '*', '>']) => {
                return Err(invalid(
                    "nats.dead_letter_subject",
                    "must be a subject without spaces or wildcards",
                ))
            }
            _ => {}
        }
        match (&self.user, &self.password) {
            (None, Some(_)) => {
                return Err(invalid(
                    "nats.user",
                    "required with OUTBOX_RELAY_NATS_PASSWORD",
                ))
            }
            (Some(_), None) => {
                return Err(invalid(
                    "nats.user",
                    "needs its password in OUTBOX_RELAY_NATS_PASSWORD",
                ))
            }
            _ => {}
        }
        Ok(())
    }
}

impl Config {
    /// The sink's bad-row policy and dead-letter topic or subject.
    pub fn bad_rows(&self) -> (BadRowPolicy, Option<&str>) {
        match (&self.kafka, &self.nats) {
            (Some(k), _) => (k.bad_row_policy, k.dead_letter_topic.as_deref()),
            (None, Some(n)) => (n.bad_row_policy, n.dead_letter_subject.as_deref()),
            (None, None) => (BadRowPolicy::Stop, None),
        }
    }

    /// The largest record the sink takes: Kafka's `message.max.bytes`
    /// (librdkafka's default otherwise), NATS' `max_payload`.
    pub fn max_message_bytes(&self) -> usize {
        match (&self.kafka, &self.nats) {
            (Some(k), _) => k
                .properties
                .get("message.max.bytes")
                .and_then(|v| v.parse().ok())
                .unwrap_or(1_000_000),
            (None, Some(n)) => n.max_payload,
            (None, None) => 1_000_000,
        }
    }
}

fn secret_from(
    field: &str,
    env: Option<String>,
    file: Option<&Path>,
) -> Result<Secret, ConfigError> {
    if let Some(v) = env {
        return Ok(Secret::new(v));
    }
    match file {
        Some(p) => {
            let s = std::fs::read_to_string(p).map_err(|source| ConfigError::SecretFile {
                field: field.into(),
                path: p.to_owned(),
                source,
            })?;
            Ok(Secret::new(s.trim_end_matches(['\n', '\r'])))
        }
        None => Ok(Secret::default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
name = "orders"
[mysql]
host = "127.0.0.1"
user = "relay"
[[outbox]]
database = "shop"
[kafka]
bootstrap_servers = "127.0.0.1:9092"
[redis]
url = "redis://127.0.0.1:6379/0"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("relay.toml"), &[])
    }

    #[test]
    fn changes_reproduce_dittos_filter_and_topic_map() {
        // TABLE_FILTER={"trades":["insert","update"]}, TOPIC_MAPPING={"trades":"transactions"}
        let changes = "[changes]\n[changes.tables]\n\"shop.trades\" = [\"insert\", \"update\"]\n\
                       \"shop.users\" = [\"insert\", \"update\", \"delete\"]\n\
                       [changes.topic_map]\n\"shop.trades\" = \"transactions\"\n";
        let c = parse(&format!("{MINIMAL}{changes}")).expect("valid");
        let ch = c.changes.as_ref().expect("[changes]");
        assert_eq!(
            ch.table("shop", "trades"),
            Some((
                &[Action::Insert, Action::Update][..],
                "transactions".to_string()
            ))
        );
        assert_eq!(
            ch.table("shop", "users").map(|t| t.1),
            Some("cdc.shop.users".into())
        );
        assert_eq!(ch.table("shop", "other"), None);
        // Only plain tables: no [[outbox]] needed.
        let only = MINIMAL.replace("[[outbox]]\ndatabase = \"shop\"\n", "");
        assert!(parse(&format!("{only}{changes}")).is_ok());
        assert!(parse(&only)
            .unwrap_err()
            .to_string()
            .contains("at least one [[outbox]] table"));
    }

    #[test]
    fn bad_changes_name_the_field() {
        for (changes, field) in [
            ("[changes]\ntables = {}\n", "changes.tables"),
            ("[changes.tables]\n\"trades\" = [\"insert\"]\n", "changes.tables.\"trades\""),
            ("[changes.tables]\n\"shop.t\" = []\n", "lists no action"),
            ("[changes.tables]\n\"shop.t\" = [\"upsert\"]\n", "unknown variant `upsert`"),
            ("[changes.tables]\n\"shop.outbox\" = [\"insert\"]\n", "is an [[outbox]] table too"),
            (
                "[changes.tables]\n\"shop.t\" = [\"insert\"]\n[changes.topic_map]\n\"shop.u\" = \"x\"\n",
                "is not in changes.tables",
            ),
            (
                "[changes.tables]\n\"shop.t\" = [\"insert\"]\n[changes.topic_map]\n\"shop.t\" = \"a b\"\n",
                "changes.topic_map.\"shop.t\"",
            ),
        ] {
            let e = parse(&format!("{MINIMAL}{changes}")).expect_err(field).to_string();
            assert!(e.contains(field), "{e} does not name {field}");
        }
    }

    #[test]
    fn a_verifying_tls_mode_needs_its_ca_file() {
        let pg = MINIMAL.replace(
            "[mysql]\nhost = \"127.0.0.1\"\nuser = \"relay\"",
            "[postgres]\nhost = \"127.0.0.1\"\nuser = \"relay\"\ndatabase = \"shop\"",
        );
        for (db, text) in [("mysql", MINIMAL), ("postgres", pg.as_str())] {
            let verify = text.replace(
                "user = \"relay\"",
                "user = \"relay\"\ntls = { mode = \"verify-full\" }",
            );
            let e = parse(&verify).expect_err(db).to_string();
            assert!(e.contains(&format!("{db}.tls.ca_file")), "{e}");
            let require = verify.replace("verify-full", "require");
            let c = parse(&require).expect(db);
            let mode = c
                .mysql
                .map(|m| m.tls.mode)
                .or(c.postgres.map(|p| p.tls.mode));
            assert_eq!(mode, Some(TlsMode::Require));
        }
    }

    #[test]
    fn nats_is_the_other_sink_with_its_secrets_from_the_environment() {
        let nats = MINIMAL.replace(
            "[kafka]\nbootstrap_servers = \"127.0.0.1:9092\"",
            "[nats]\nurl = \"nats://127.0.0.1:4222\"\nstream = \"OUTBOX\"\nuser = \"relay\"",
        );
        let env = |k: &str, v: &str| vec![(k.to_owned(), v.to_owned())];
        let c = Config::from_toml(
            &nats,
            Path::new("relay.toml"),
            &env("OUTBOX_RELAY_NATS_PASSWORD", "pw"),
        )
        .unwrap();
        let n = c.nats.as_ref().unwrap();
        assert!(c.kafka.is_none());
        assert_eq!(n.password.as_ref().unwrap().expose(), "pw");
        assert_eq!(n.ack_timeout, Duration::from_secs(10));
        assert_eq!(c.max_message_bytes(), 1024 * 1024);
        assert_eq!(c.bad_rows(), (BadRowPolicy::Stop, None));
        // The password is never in the config's Debug output.
        assert!(!format!("{c:?}").contains("\"pw\""));
        let err = |text: &str, env: &[(String, String)]| {
            Config::from_toml(text, Path::new("relay.toml"), env)
                .unwrap_err()
                .to_string()
        };
        assert!(err(&nats, &[]).contains("nats.user"));
        let both = format!("{MINIMAL}\n[nats]\nurl = \"nats://n:4222\"\nstream = \"S\"\n");
        assert!(err(&both, &[]).contains("either [kafka] or [nats], not both"));
        let neither = MINIMAL.replace("[kafka]\nbootstrap_servers = \"127.0.0.1:9092\"", "");
        assert!(err(&neither, &[]).contains("kafka"));
        let dotted = nats.replace("stream = \"OUTBOX\"", "stream = \"OUT.BOX\"");
        assert!(err(&dotted, &env("OUTBOX_RELAY_NATS_PASSWORD", "pw")).contains("nats.stream"));
        let dlq = nats.replace(
            "stream = \"OUTBOX\"",
            "stream = \"OUTBOX\"\nbad_row_policy = \"dead_letter\"",
        );
        assert!(err(&dlq, &env("OUTBOX_RELAY_NATS_PASSWORD", "pw"))
            .contains("nats.dead_letter_subject"));
    }

    #[test]
    fn minimal_config_gets_sensible_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.epoch, 1);
        assert_eq!(c.start_from, StartFrom::Latest);
        assert_eq!(c.mysql.as_ref().unwrap().port, 3306);
        assert_eq!(c.outboxes[0].table, "outbox");
        assert_eq!(c.outboxes[0].topic, "outbox.event.{aggregate_type}");
        assert_eq!(c.outboxes[0].columns, Columns::default());
        assert_eq!(c.bad_rows().0, BadRowPolicy::Stop);
        assert_eq!(c.redis.checkpoint_interval, Duration::from_millis(100));
        assert_eq!(c.max_in_flight, 20_000);
        assert_eq!(c.mysql.as_ref().unwrap().heartbeat, Duration::from_secs(5));
        // Stable default server id, not the server's own small ids.
        assert_eq!(c.server_id(), parse(MINIMAL).unwrap().server_id());
        assert!(c.server_id() >= 1_000_000);
    }

    #[test]
    fn election_defaults_and_bad_timing_name_the_field() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.election.mode, ElectionMode::None);
        assert_eq!(c.election.timing(), crate::election::Timing::default());
        let c = parse(&format!("{MINIMAL}[election]\nmode = \"redis\"\n")).unwrap();
        assert_eq!(c.election.mode, ElectionMode::Redis);
        let e = parse(&format!(
            "{MINIMAL}[election]\nmode = \"redis\"\nrenew_deadline = \"5s\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("`election.lease_duration`"), "{e}");
        let e = parse(&format!(
            "{MINIMAL}[election]\nmode = \"kubernetes\"\nlease_duration = \"900ms\"\nrenew_deadline = \"600ms\"\nretry_period = \"100ms\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("whole seconds"), "{e}");
        let e = parse(&format!("{MINIMAL}[election]\nmode = \"zookeeper\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("zookeeper"), "{e}");
    }

    #[test]
    fn an_invalid_lease_name_is_refused_at_load() {
        let kube = "[election]\nmode = \"kubernetes\"\n";
        let c = parse(&format!("{MINIMAL}{kube}")).unwrap();
        assert_eq!(
            c.election.lease_name(&c.name),
            format!("{}-relay-leader", c.name)
        );
        for (extra, shown) in [
            ("lease_name = \"Orders_Leader\"\n", "\"Orders_Leader\""),
            ("lease_name = \"-x\"\n", "\"-x\""),
            ("lease_name = \"\"\n", "\"\""),
        ] {
            let e = parse(&format!("{MINIMAL}{kube}{extra}"))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("`election.lease_name`") && e.contains(shown),
                "{e}"
            );
        }
        let e = parse(&format!(
            "name = \"shop_orders\"\n{}{kube}",
            MINIMAL.replacen("name = ", "# name = ", 1)
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("the default \"shop_orders-relay-leader\""),
            "{e}"
        );
        // Only the Kubernetes mode names a Lease.
        parse(&format!(
            "name = \"shop_orders\"\n{}",
            MINIMAL.replacen("name = ", "# name = ", 1)
        ))
        .unwrap();
    }

    #[test]
    fn unknown_field_is_named() {
        let e = parse(&MINIMAL.replace("[kafka]", "[kafka]\nbootstrap = \"x\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `bootstrap`"), "{e}");
    }

    #[test]
    fn wrong_type_and_bad_duration_are_named() {
        let e = parse(&MINIMAL.replace("user = \"relay\"", "user = \"relay\"\nport = \"x\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("port"), "{e}");
        let e =
            parse(&MINIMAL.replace("user = \"relay\"", "user = \"relay\"\nheartbeat = \"-5s\""))
                .unwrap_err()
                .to_string();
        assert!(e.contains("heartbeat"), "{e}");
    }

    #[test]
    fn dead_letter_policy_needs_a_topic() {
        let e = parse(&MINIMAL.replace("[kafka]", "[kafka]\nbad_row_policy = \"dead_letter\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("kafka.dead_letter_topic"), "{e}");
    }

    #[test]
    fn secrets_come_from_env_not_the_file() {
        let env = vec![
            (
                "OUTBOX_RELAY_MYSQL_PASSWORD".to_string(),
                "s3cr3t".to_string(),
            ),
            (
                "OUTBOX_RELAY_KAFKA_SASL_PASSWORD".to_string(),
                "k4fk4".to_string(),
            ),
        ];
        let c = Config::from_toml(MINIMAL, Path::new("r.toml"), &env).unwrap();
        assert_eq!(c.mysql.as_ref().unwrap().password.expose(), "s3cr3t");
        assert_eq!(
            c.kafka.as_ref().unwrap().secret_properties["sasl.password"].expose(),
            "k4fk4"
        );
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("s3cr3t") && !dbg.contains("k4fk4"), "{dbg}");

        let e = parse(&MINIMAL.replace(
            "[kafka]",
            "[kafka]\nproperties = { \"sasl.password\" = \"x\" }",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("kafka.properties.sasl.password"), "{e}");
        assert!(e.contains("OUTBOX_RELAY_KAFKA_SASL_PASSWORD"), "{e}");

        let e = parse(&MINIMAL.replace("redis://127.0.0.1", "redis://:pw@127.0.0.1"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("redis.url") && !e.contains("pw@"), "{e}");
    }

    #[test]
    fn bad_topic_template_is_named() {
        let e = parse(&MINIMAL.replace(
            "database = \"shop\"",
            "database = \"shop\"\ntopic = \"events.{nope}\"",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("outbox[0].topic") && e.contains("{nope}"), "{e}");
    }

    #[test]
    fn same_table_twice_is_refused() {
        let e = parse(&MINIMAL.replace(
            "[[outbox]]\ndatabase = \"shop\"",
            "[[outbox]]\ndatabase = \"shop\"\n[[outbox]]\ndatabase = \"shop\"",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("listed twice"), "{e}");
    }
}
