//! The `OutboxRelay` custom resource: types only. `crds/outboxrelays.yaml` is
//! generated from them (`outbox-operator crd`); a test diffs the two.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// An outbox relay: relay pods that stream the committed rows of outbox
/// tables — from the MySQL binlog or PostgreSQL logical replication — to
/// Kafka or NATS JetStream, one elected leader at a time, with their position
/// kept in Redis.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "outboxrelay.dev",
    version = "v1alpha1",
    kind = "OutboxRelay",
    namespaced,
    status = "OutboxRelayStatus",
    shortname = "obr",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Leader","type":"string","jsonPath":".status.leader.pod"}"#,
    printcolumn = r#"{"name":"Position","type":"string","jsonPath":".status.position.short"}"#,
    printcolumn = r#"{"name":"Lag","type":"integer","jsonPath":".status.lag.seconds"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.kafka) != has(self.nats)",
        "message": "set exactly one sink: spec.kafka or spec.nats"
    },
    {
        "rule": "has(self.mysql) != has(self.postgres)",
        "message": "set exactly one database: spec.mysql or spec.postgres"
    },
    {
        "rule": "!has(self.mysql) || (has(self.mysql.outboxes) && size(self.mysql.outboxes) > 0) || has(self.changes)",
        "message": "nothing to relay: list spec.mysql.outboxes or spec.changes.tables"
    },
    {
        "rule": "!has(self.changes) || has(self.mysql)",
        "message": "spec.changes reads the MySQL binlog; with spec.postgres, relay outbox tables and messages"
    }
]))]
pub struct OutboxRelaySpec {
    /// Relay pods: one leader streams, the others wait warm to take over.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 1, max = 5))]
    pub replicas: i32,
    /// Relay image; defaults to the operator's own version of the relay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// CPU and memory of the relay container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Node labels the relay pods must run on (the pod's `nodeSelector`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Taints the relay pods tolerate (the pod's `tolerations`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    /// Scheduling constraints of the relay pods. Unset, the operator spreads
    /// them across nodes (preferred pod anti-affinity on the host name), so
    /// one node failure does not take the leader and its standby together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Extra annotations on the relay pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_annotations: Option<BTreeMap<String, String>>,
    /// Extra labels on the relay pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_labels: Option<BTreeMap<String, String>>,
    /// Run the relay pods under this existing ServiceAccount instead of the
    /// one the operator creates (it then needs the same Lease and status rights).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// The MySQL/MariaDB server whose binlog the relay reads, and its outbox
    /// tables (exactly one of `mysql`, `postgres`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mysql: Option<MysqlSpec>,
    /// The PostgreSQL database the relay reads through logical replication
    /// (pgoutput), and its outbox tables (exactly one of `mysql`, `postgres`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<PostgresSpec>,
    /// The Kafka cluster the records go to (exactly one of `kafka`, `nats`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<KafkaSpec>,
    /// The NATS JetStream stream the records go to (exactly one of `kafka`,
    /// `nats`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats: Option<NatsSpec>,
    /// Change events from plain tables (ditto's table filter and topic map),
    /// beside or instead of the outbox tables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changes: Option<ChangesSpec>,
    /// The Redis that keeps the checkpoint (position and leadership epoch).
    pub redis: RedisSpec,
    /// Where to start when no checkpoint is stored: `latest`, `earliest`,
    /// `gtid:<gtid list or set>` or `file:<FILE>:<POS>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(latest|earliest|gtid:.+|file:.+:[0-9]+)$"))]
    pub start_from: Option<String>,
    /// How often the leader reports into the status; a relay silent for two
    /// intervals shows as Stalled. Duration like `5s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(ms|s|m)$"))]
    pub heartbeat_interval: Option<String>,
    /// Timing of the relays' leader election through their Lease. The
    /// defaults (1s / 750ms / 250ms) replace a dead leader in about one
    /// second, at 4 Lease writes a second by the leader (the standbys watch
    /// the Lease); longer ones cost the API server less and fail over more
    /// slowly.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub election: Option<ElectionSpec>,
    /// Ready turns False while the lag is above this many seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_lag_seconds: Option<u32>,
    /// What happens to the Redis checkpoint when the resource is deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_policy: Option<CheckpointPolicy>,
    /// Relay log level (tracing filter), e.g. `info` or `debug`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
}

fn default_replicas() -> i32 {
    2
}

/// A key of a Secret in the resource's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct SecretKeyRef {
    /// Secret name.
    #[schemars(length(min = 1))]
    pub name: String,
    /// Key in the Secret.
    #[schemars(length(min = 1))]
    pub key: String,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MysqlSpec {
    /// Server host name.
    #[schemars(length(min = 1))]
    pub host: String,
    /// Server port; default 3306.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
    /// Replication user (needs REPLICATION SLAVE, REPLICATION CLIENT, and
    /// SELECT on the outbox tables).
    #[schemars(length(min = 1))]
    pub user: String,
    /// The user's password.
    pub password_secret: SecretKeyRef,
    /// Replica server id; derived from the resource's uid when unset, so it
    /// stays the same across restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub server_id: Option<u32>,
    /// TLS to the server; default `mode: disabled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ServerTls>,
    /// The outbox tables and how their rows become records (may be empty
    /// with `spec.changes`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outboxes: Vec<OutboxTable>,
}

/// A PostgreSQL source: a logical replication slot (pgoutput) and a
/// publication of the outbox tables, both created when missing and named
/// `outbox_relay_<namespace>_<name>` unless set.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PostgresSpec {
    /// Server host name.
    #[schemars(length(min = 1))]
    pub host: String,
    /// Server port; default 5432.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
    /// The database of the outbox tables.
    #[schemars(length(min = 1))]
    pub database: String,
    /// Role with the REPLICATION attribute (Amazon RDS: `rds_replication`);
    /// to create the publication it must own the outbox tables (or be a
    /// member of their owner).
    #[schemars(length(min = 1))]
    pub user: String,
    /// The role's password.
    pub password_secret: SecretKeyRef,
    /// Replication slot name (lower-case letters, digits, `_`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9_]{1,63}$"))]
    pub slot: Option<String>,
    /// Publication name (lower-case letters, digits, `_`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9_]{1,63}$"))]
    pub publication: Option<String>,
    /// Create the slot and publication when missing; default true. With
    /// false, the relay's preflight names the statements to run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create: Option<bool>,
    /// `pg_logical_emit_message(true, prefix, json)` messages with this
    /// prefix are outbox events; default `outbox`, "" relays none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_prefix: Option<String>,
    /// Retained WAL (bytes) above which the status shows WalRetained;
    /// default 1 GiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_retained_wal_bytes: Option<i64>,
    /// TLS to the server (libpq's `sslmode`); default `mode: disabled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ServerTls>,
    /// The outbox tables (`database` is the table's schema, e.g. `public`).
    #[schemars(length(min = 1))]
    pub outboxes: Vec<OutboxTable>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self.mode in ['disabled', 'require'] || has(self.caSecret)",
    "message": "caSecret is required with mode verify-ca or verify-full"
}]))]
pub struct ServerTls {
    /// `disabled`, `require` (encrypted, not verified), `verify-ca` (the
    /// server's certificate signed by `caSecret`) or `verify-full` (and its
    /// name matches `host`).
    pub mode: TlsMode,
    /// PEM CA bundle to verify the server (required by verify-ca and verify-full).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret: Option<SecretKeyRef>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    Disabled,
    Require,
    VerifyCa,
    VerifyFull,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!(has(self.columns) && has(self.columnPreset))",
    "message": "set columns or columnPreset, not both"
}]))]
pub struct OutboxTable {
    /// Database (MySQL) or schema (PostgreSQL) of the outbox table.
    #[schemars(length(min = 1))]
    pub database: String,
    /// Table name; default `outbox`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    /// Column names, where they differ from the defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub columns: Option<Columns>,
    /// `Debezium`: the Debezium Outbox Event Router's column names (`id`,
    /// `aggregatetype`, `aggregateid`, `type`, `payload`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub column_preset: Option<ColumnPreset>,
    /// Topic template over the row: `{aggregate_type}`, `{event_type}`,
    /// `{database}`, `{table}`. Default `outbox.event.{aggregate_type}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// Explicit topic per aggregate type; wins over the template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic_map: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ColumnPreset {
    Debezium,
}

/// Outbox column names; unset ones keep their default name.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Columns {
    /// Event id column (the record's `id` header); default `id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Aggregate type column (the topic template's `{aggregate_type}`);
    /// default `aggregate_type`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregate_type: Option<String>,
    /// Aggregate id column (the record key: order per aggregate); default
    /// `aggregate_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregate_id: Option<String>,
    /// Event type column (the `event_type` header); default `event_type`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_type: Option<String>,
    /// Payload column (the record value); default `payload`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    /// JSON object column whose entries become headers; "" ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!has(self.badRowPolicy) || self.badRowPolicy != 'DeadLetter' || has(self.deadLetterTopic)",
    "message": "deadLetterTopic is required with badRowPolicy: DeadLetter"
}]))]
pub struct KafkaSpec {
    /// `host:port[,host:port...]`
    #[schemars(length(min = 1))]
    pub bootstrap_servers: String,
    /// Non-secret librdkafka properties (compression, security.protocol,
    /// sasl.mechanism...). Secret ones go in `secretProperties`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<BTreeMap<String, String>>,
    /// librdkafka properties read from Secrets, e.g. `sasl.password`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_properties: Option<BTreeMap<String, SecretKeyRef>>,
    /// What to do with a row that cannot become a record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bad_row_policy: Option<BadRowPolicy>,
    /// Topic for bad rows; required with `badRowPolicy: DeadLetter`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_topic: Option<String>,
}

/// NATS JetStream as the sink: every record is published to `stream` on the
/// subject its outbox's `topic` template gives, and awaits its JetStream
/// acknowledgement before the checkpoint passes it; `Nats-Msg-Id` is the
/// event id, so the stream's duplicate window drops replays.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.user) == has(self.passwordSecret)",
        "message": "user and passwordSecret go together"
    },
    {
        "rule": "[has(self.passwordSecret), has(self.tokenSecret), has(self.nkeySecret), has(self.credentialsSecret)].filter(x, x).size() <= 1",
        "message": "at most one of passwordSecret, tokenSecret, nkeySecret, credentialsSecret"
    },
    {
        "rule": "!has(self.badRowPolicy) || self.badRowPolicy != 'DeadLetter' || has(self.deadLetterSubject)",
        "message": "deadLetterSubject is required with badRowPolicy: DeadLetter"
    }
]))]
pub struct NatsSpec {
    /// Server URL(s), comma-separated: `nats://host:4222`, `tls://host:4222`.
    #[schemars(length(min = 1))]
    pub url: String,
    /// The JetStream stream the records go to; it must exist (checked at
    /// start) unless `createStream` is set.
    #[schemars(regex(pattern = r"^[^.*> ]+$"))]
    pub stream: String,
    /// Create `stream` at start when it does not exist (file storage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_stream: Option<NatsCreateStream>,
    /// User name, with `passwordSecret`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The user's password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret: Option<SecretKeyRef>,
    /// An authentication token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_secret: Option<SecretKeyRef>,
    /// An NKey seed (`SU...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nkey_secret: Option<SecretKeyRef>,
    /// A `.creds` file (JWT and NKey seed), mounted into the relay pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<SecretKeyRef>,
    /// TLS to the servers (also implied by `tls://` URLs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<NatsTls>,
    /// How long a publish waits for its acknowledgement before the stream
    /// restarts at the last acknowledged commit; default `10s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(ms|s|m)$"))]
    pub ack_timeout: Option<String>,
    /// What to do with a row that cannot become a message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bad_row_policy: Option<BadRowPolicy>,
    /// Subject for bad rows (in `stream`); required with `badRowPolicy: DeadLetter`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_subject: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NatsCreateStream {
    /// The stream's subjects, e.g. `outbox.>`.
    #[schemars(length(min = 1))]
    pub subjects: Vec<String>,
    /// JetStream drops a message whose `Nats-Msg-Id` it stored within this
    /// window (the replays after a crash); default `2m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(ms|s|m|h)$"))]
    pub duplicate_window: Option<String>,
    /// Stream replicas; default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 5))]
    pub replicas: Option<i32>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NatsTls {
    /// PEM CA that signed the servers' certificates (default: the system's
    /// trusted roots); mounted into the relay pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret: Option<SecretKeyRef>,
}

/// Change events from plain tables: every relayed insert, update or delete
/// as a JSON envelope (`id`, `schema`, `table`, `action`, `data`, `dataOld`,
/// `eventTime`), keyed by the row's primary key.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChangesSpec {
    /// Default topic (or subject) of a table: `<topicPrefix>.<database>.<table>`;
    /// default `cdc`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic_prefix: Option<String>,
    /// `database.table` → the actions relayed, e.g. `{"shop.trades": [insert, update]}`.
    #[schemars(extend("minProperties" = 1))]
    pub tables: BTreeMap<String, Vec<ChangeAction>>,
    /// `database.table` → its topic, instead of the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic_map: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ChangeAction {
    Insert,
    Update,
    Delete,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum BadRowPolicy {
    /// Stop the relay naming the row (default); the position stays before it.
    Stop,
    /// Send the row to the dead-letter topic (or subject) with the reason,
    /// and continue.
    DeadLetter,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum CheckpointPolicy {
    /// Keep the checkpoint in Redis (default): a re-created relay resumes.
    Retain,
    /// Delete the checkpoint with the resource.
    Delete,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!has(self.caSecret) || self.url.startsWith('rediss://')",
    "message": "caSecret is only used with TLS: url must start with rediss://"
}]))]
pub struct RedisSpec {
    /// `redis://host:port/db` or `rediss://...`, without a password.
    #[schemars(
        regex(pattern = r"^rediss?://[^:@/]+(:[0-9]+)?(/[0-9]+)?$"),
        length(max = 2048)
    )]
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret: Option<SecretKeyRef>,
    /// PEM CA that signed the server's certificate, for `rediss://` with a
    /// private CA (default: the system's trusted roots). Mounted into the
    /// relay pods; the operator reads it only to delete the checkpoint
    /// (`checkpointPolicy: Delete`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret: Option<SecretKeyRef>,
    /// Prefix of the checkpoint key; default `outbox-relay:`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_prefix: Option<String>,
}

/// Lease timing of the relays' leader election; each a duration like
/// `750ms`, `1s`, `1m`, in the order retryPeriod < renewDeadline <
/// leaseDuration.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ElectionSpec {
    /// A standby takes over when the Lease has not changed for this long
    /// (at least 1s; default 1s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(ms|s|m)$"))]
    pub lease_duration: Option<String>,
    /// The leader stops streaming when it could not renew for this long
    /// (default 750ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(ms|s|m)$"))]
    pub renew_deadline: Option<String>,
    /// How often the leader renews and a standby looks (default 250ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(ms|s|m)$"))]
    pub retry_period: Option<String>,
}

/// What the operator and the leading relay report.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutboxRelayStatus {
    /// The generation the operator last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Progressing, Degraded, Stalled.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The leading relay pod and its term.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<LeaderStatus>,
    /// The last position whose every record the sink acknowledged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<PositionStatus>,
    /// How far the leader is behind the server's log head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<LagStatus>,
    /// PostgreSQL: the WAL the replication slot retains.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wal: Option<WalStatus>,
    /// Records acknowledged by the sink since the leading relay process started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<u64>,
    /// Payload bytes acknowledged by the sink since that process started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// RFC 3339 time of the leading relay's last report; older than two
    /// heartbeat intervals means Stalled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_time: Option<String>,
    /// The definite error a relay stopped on (never secrets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LeaderStatus {
    /// Name of the leading relay pod.
    pub pod: String,
    /// Leadership term; only grows.
    pub epoch: u64,
    /// RFC 3339 time the term began.
    pub since: String,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PositionStatus {
    /// MySQL: the GTID when the server has one, else `file:pos`;
    /// PostgreSQL: the LSN.
    pub short: String,
    /// GTID set (or MariaDB GTID list) up to and including that commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gtid: Option<String>,
    /// Binlog file of that commit (MySQL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// Offset in `file` just after that commit (MySQL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pos: Option<u64>,
    /// WAL location just after that commit (PostgreSQL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lsn: Option<String>,
    /// RFC 3339 commit time of the last relayed transaction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_time: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LagStatus {
    /// Seconds between now and the commit time of the last relayed
    /// transaction, 0 when nothing is waiting.
    pub seconds: u64,
    /// Log bytes (binlog, WAL) behind the server's head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WalStatus {
    /// WAL bytes the server keeps for the relay's replication slot: what an
    /// abandoned slot grows until the disk is full.
    pub retained_bytes: u64,
    /// `spec.postgres.maxRetainedWalBytes`.
    pub limit_bytes: u64,
}
