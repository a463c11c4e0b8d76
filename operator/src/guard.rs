//! One malformed `OutboxRelay` must not stop the operator from watching all
//! the others. The controller watches [`Guarded`] objects: a stored object
//! that does not fit the Rust types (written under an older CRD, or a value
//! the schema lets through) keeps its metadata and an error naming the field,
//! instead of failing the whole list.

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::NamespaceResourceScope;
use kube::Resource;
use serde::{Deserialize, Deserializer};

use crate::crd::OutboxRelay;

/// An OutboxRelay as the API server holds it: parsed, or why not.
#[derive(Debug, Clone)]
pub struct Guarded(pub Result<OutboxRelay, Malformed>);

/// An object that does not parse as an OutboxRelay.
#[derive(Debug, Clone, PartialEq)]
pub struct Malformed {
    pub metadata: ObjectMeta,
    /// The parse error, prefixed with the field's path (`spec.replicas: ...`).
    pub error: String,
}

impl<'de> Deserialize<'de> for Guarded {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(d)?;
        match serde_path_to_error::deserialize::<_, OutboxRelay>(&value) {
            Ok(r) => Ok(Guarded(Ok(r))),
            Err(e) => {
                // Without readable metadata the object cannot even be named:
                // that one is an error of the whole answer.
                let metadata = ObjectMeta::deserialize(&value["metadata"])
                    .map_err(serde::de::Error::custom)?;
                let error = format!("{}: {}", e.path(), e.inner());
                Ok(Guarded(Err(Malformed { metadata, error })))
            }
        }
    }
}

impl Resource for Guarded {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(dt: &()) -> Cow<'_, str> {
        OutboxRelay::kind(dt)
    }
    fn group(dt: &()) -> Cow<'_, str> {
        OutboxRelay::group(dt)
    }
    fn version(dt: &()) -> Cow<'_, str> {
        OutboxRelay::version(dt)
    }
    fn plural(dt: &()) -> Cow<'_, str> {
        OutboxRelay::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        match &self.0 {
            Ok(r) => r.meta(),
            Err(m) => &m.metadata,
        }
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        match &mut self.0 {
            Ok(r) => r.meta_mut(),
            Err(m) => &mut m.metadata,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(spec: serde_json::Value) -> serde_json::Value {
        json!({
            "apiVersion": "outboxrelay.dev/v1alpha1", "kind": "OutboxRelay",
            "metadata": {"name": "orders", "namespace": "shop", "uid": "u-1"},
            "spec": spec,
        })
    }

    fn minimal() -> serde_json::Value {
        json!({
            "mysql": {"host": "db", "user": "relay",
                      "passwordSecret": {"name": "db", "key": "password"},
                      "outboxes": [{"database": "shop"}]},
            "kafka": {"bootstrapServers": "kafka:9092"},
            "redis": {"url": "redis://redis:6379/0"}
        })
    }

    #[test]
    fn a_good_object_parses() {
        let g: Guarded = serde_json::from_value(object(minimal())).expect("guarded");
        assert_eq!(g.0.expect("parsed").spec.replicas, 2);
    }

    #[test]
    fn a_malformed_object_keeps_its_name_and_the_field_in_error() {
        let mut spec = minimal();
        spec["replicas"] = json!("two");
        let g: Guarded = serde_json::from_value(object(spec)).expect("guarded");
        let m = g.0.expect_err("malformed");
        assert_eq!(m.metadata.name.as_deref(), Some("orders"));
        assert!(
            m.error
                .starts_with("spec.replicas: invalid type: string \"two\""),
            "{}",
            m.error
        );
        let mut spec = minimal();
        spec["mysql"]["outboxes"][0]["topicMap"] = json!({"Order": 7});
        let g: Guarded = serde_json::from_value(object(spec)).expect("guarded");
        let e = g.0.expect_err("malformed").error;
        assert!(
            e.starts_with("spec.mysql.outboxes[0].topicMap.Order: invalid type"),
            "{e}"
        );
        let mut spec = minimal();
        spec["kafka"]["badRowPolicy"] = json!("Skip");
        let g: Guarded = serde_json::from_value(object(spec)).expect("guarded");
        let e = g.0.expect_err("malformed").error;
        assert!(
            e.starts_with("spec.kafka.badRowPolicy: unknown variant `Skip`"),
            "{e}"
        );
    }

    #[test]
    fn a_list_with_one_malformed_item_still_yields_the_others() {
        let mut bad = minimal();
        bad["mysql"]["port"] = json!("3306");
        let list: Vec<Guarded> =
            serde_json::from_value(json!([object(minimal()), object(bad)])).expect("list");
        assert!(list[0].0.is_ok());
        assert!(list[1].0.is_err());
    }
}
