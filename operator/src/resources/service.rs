//! The metrics Service and the PodDisruptionBudget of the relay pods.

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::resources::config::HTTP_PORT;
use crate::resources::{child_meta, labels};
use crate::validate::ValidatedRelay;

/// `<name>-relay:8080` in front of every relay pod (metrics are per pod).
pub fn build_service(r: &ValidatedRelay) -> Service {
    Service {
        metadata: child_meta(r),
        spec: Some(ServiceSpec {
            selector: Some(labels(r)),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: HTTP_PORT,
                target_port: Some(IntOrString::String("http".into())),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// At most one relay pod voluntarily down at a time, so a drain never takes
/// the leader and its standby together.
pub fn build_pdb(r: &ValidatedRelay) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: child_meta(r),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(labels(r)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::tests::{fixture, FULL};
    use crate::validate::validate;

    #[test]
    fn service_and_pdb_select_the_relay_pods() {
        let v = validate(&fixture(FULL)).expect("valid");
        let svc = build_service(&v).spec.expect("spec");
        assert_eq!(svc.selector, Some(labels(&v)));
        assert_eq!(svc.ports.expect("ports")[0].port, 8080);
        let pdb = build_pdb(&v).spec.expect("spec");
        assert_eq!(pdb.max_unavailable, Some(IntOrString::Int(1)));
        assert_eq!(pdb.selector.and_then(|s| s.match_labels), Some(labels(&v)));
    }
}
