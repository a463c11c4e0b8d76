//! outbox-relay: streams committed rows of MySQL outbox tables from the
//! binlog to Kafka, in commit order per key, with its position in Redis.

pub mod binlog;
pub mod checkpoint;
pub mod config;
pub mod http;
pub mod kafka;
pub mod metrics;
pub mod outbox;
pub mod pipeline;
pub mod position;
pub mod telemetry;
