//! The relay's ServiceAccount, and a Role with exactly what a relay needs:
//! its own Lease (leader election) and its own OutboxRelay's status.

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};

use crate::resources::{child_meta, child_name};
use crate::validate::ValidatedRelay;

/// Name of the relay's leader-election Lease.
pub fn lease_name(r: &ValidatedRelay) -> String {
    format!("{}-leader", child_name(r))
}

/// The Lease the relays elect their leader with. The operator creates it
/// (so the relays need no `create` right) and owns only its metadata: the
/// relays own its spec.
pub fn build_lease(r: &ValidatedRelay) -> Lease {
    let mut metadata = child_meta(r);
    metadata.name = Some(lease_name(r));
    Lease {
        metadata,
        spec: None,
    }
}

pub fn build_service_account(r: &ValidatedRelay) -> ServiceAccount {
    ServiceAccount {
        metadata: child_meta(r),
        automount_service_account_token: Some(true),
        ..ServiceAccount::default()
    }
}

pub fn build_role(r: &ValidatedRelay) -> Role {
    let rule = |group: &str, resource: &str, name: String, verbs: &[&str]| PolicyRule {
        api_groups: Some(vec![group.into()]),
        resources: Some(vec![resource.into()]),
        resource_names: Some(vec![name]),
        verbs: verbs.iter().map(|v| v.to_string()).collect(),
        ..PolicyRule::default()
    };
    Role {
        metadata: child_meta(r),
        rules: Some(vec![
            rule(
                "coordination.k8s.io",
                "leases",
                lease_name(r),
                // watch: a standby sees each renewal as it happens.
                &["get", "update", "watch"],
            ),
            rule(
                "outboxrelay.dev",
                "outboxrelays/status",
                r.name.clone(),
                &["get", "patch"],
            ),
        ]),
    }
}

pub fn build_role_binding(r: &ValidatedRelay) -> RoleBinding {
    RoleBinding {
        metadata: child_meta(r),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: child_name(r),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: r
                .spec
                .service_account_name
                .clone()
                .unwrap_or_else(|| child_name(r)),
            namespace: Some(r.namespace.clone()),
            ..Subject::default()
        }]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::tests::{fixture, FULL};
    use crate::validate::validate;

    #[test]
    fn role_grants_exactly_the_lease_and_own_status() {
        let v = validate(&fixture(FULL)).expect("valid");
        let rules = build_role(&v).rules.expect("rules");
        let flat: Vec<(String, String, Vec<String>, Vec<String>)> = rules
            .into_iter()
            .map(|r| {
                (
                    r.api_groups.unwrap_or_default().join(","),
                    r.resources.unwrap_or_default().join(","),
                    r.resource_names.unwrap_or_default(),
                    r.verbs,
                )
            })
            .collect();
        assert_eq!(
            flat,
            vec![
                (
                    "coordination.k8s.io".to_string(),
                    "leases".to_string(),
                    vec!["orders-relay-leader".to_string()],
                    vec!["get".to_string(), "update".to_string(), "watch".to_string()]
                ),
                (
                    "outboxrelay.dev".to_string(),
                    "outboxrelays/status".to_string(),
                    vec!["orders".to_string()],
                    vec!["get".to_string(), "patch".to_string()]
                ),
            ]
        );
        let lease = build_lease(&v);
        assert_eq!(lease.metadata.name.as_deref(), Some("orders-relay-leader"));
        assert!(lease.spec.is_none(), "the relays own the Lease's spec");
        let rb = build_role_binding(&v);
        assert_eq!(rb.role_ref.name, "orders-relay");
        let subject = &rb.subjects.expect("subjects")[0];
        assert_eq!(
            (subject.name.as_str(), subject.namespace.as_deref()),
            ("orders-relay", Some("shop"))
        );
    }
}
