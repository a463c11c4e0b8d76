//! Pure builders: a `ValidatedRelay` → the objects the operator applies. No
//! API calls; each object carries the common labels and, once applied, an
//! owner reference to the OutboxRelay.

pub mod config;
pub mod deployment;
pub mod rbac;
pub mod service;

use std::collections::BTreeMap;

use kube::api::ObjectMeta;

use crate::validate::ValidatedRelay;

/// Name of every child object of relay `r`.
pub fn child_name(r: &ValidatedRelay) -> String {
    format!("{}-relay", r.name)
}

/// Labels on every child object and on the relay pods.
pub fn labels(r: &ValidatedRelay) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "outbox-relay".to_string(),
        ),
        ("app.kubernetes.io/instance".to_string(), r.name.clone()),
        (
            "app.kubernetes.io/managed-by".to_string(),
            "outbox-operator".to_string(),
        ),
    ])
}

/// Name, namespace and labels of a child object.
pub fn child_meta(r: &ValidatedRelay) -> ObjectMeta {
    ObjectMeta {
        name: Some(child_name(r)),
        namespace: Some(r.namespace.clone()),
        labels: Some(labels(r)),
        ..ObjectMeta::default()
    }
}
