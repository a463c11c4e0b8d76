//! End-to-end tests against a real Kubernetes API server. They run when
//! `KUBECONFIG` points at a cluster (kind, k3d, a dev cluster) and print a
//! skip notice otherwise. Each works in a fresh namespace it deletes after.
//!
//! - Relays elect their leader through a Lease: the failover scenario of
//!   `election.rs` with `election.mode = "kubernetes"`.
//! - The operator (in-process) reconciles the samples: CRD accepted by the
//!   API server, children with owner references, conditions, rollouts on a
//!   spec change and on a Secret change, cleanup on deletion.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, ResourceExt};
use outbox_operator::crd::OutboxRelay;

use crate::election::failover_rounds;
use crate::support::*;

/// A client for the cluster in `KUBECONFIG`, or None (with a notice) without one.
async fn cluster(test: &str) -> Option<Client> {
    if std::env::var_os("KUBECONFIG").is_none() {
        println!(
            "SKIPPED {test}: KUBECONFIG is not set (this test needs a real Kubernetes API server)"
        );
        return None;
    }
    Some(
        Client::try_default()
            .await
            .expect("KUBECONFIG is set but no client could be built from it"),
    )
}

/// A namespace of the test's own, deleted when dropped (also on failure).
struct TestNamespace {
    name: String,
}

impl TestNamespace {
    async fn create(client: &Client, prefix: &str) -> TestNamespace {
        let name = format!("{prefix}-{}", unique().to_lowercase());
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {"outboxrelay.dev/e2e": "true"}}
        }))
        .expect("namespace");
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("create the test namespace");
        TestNamespace { name }
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop cannot await: delete from a runtime of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                if let Ok(c) = Client::try_default().await {
                    let _ = Api::<Namespace>::all(c)
                        .delete(&name, &DeleteParams::default())
                        .await;
                }
            });
        })
        .join();
    }
}

/// Relays on the host elect through a Lease in a fresh namespace; SIGKILL
/// the leader five times under ~1,000 rows/s: nothing missing, order kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_elect_through_a_kubernetes_lease() {
    let Some(client) = cluster("relays_elect_through_a_kubernetes_lease").await else {
        return;
    };
    let ns = TestNamespace::create(&client, "obr-lease").await;
    let election = format!(
        "[election]\nmode = \"kubernetes\"\nnamespace = \"{}\"\n",
        ns.name
    );
    let times = failover_rounds("klease", &election, 5).await;
    println!("Lease takeover times: {times:?}");
    assert!(
        times.iter().all(|t| *t < Duration::from_secs(10)),
        "{times:?}"
    );
    // The Lease counted every term: the first, five takeovers, the hand-overs
    // of the graceful stops at the end.
    let leases = Api::<Lease>::namespaced(client, &ns.name)
        .list(&ListParams::default())
        .await
        .expect("list leases");
    assert_eq!(leases.items.len(), 1, "{:?}", leases.items);
    let spec = leases.items[0].spec.clone().expect("lease spec");
    assert!(spec.lease_transitions.unwrap_or(0) >= 6, "{spec:?}");
}

async fn apply<K>(api: &Api<K>, obj: &K)
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::Serialize + serde::de::DeserializeOwned,
{
    api.patch(
        &obj.name_any(),
        &PatchParams::apply("outbox-e2e").force(),
        &Patch::Apply(obj),
    )
    .await
    .unwrap_or_else(|e| panic!("apply {}: {e}", obj.name_any()));
}

fn sample<T: serde::de::DeserializeOwned>(file: &str) -> Vec<T> {
    let text = std::fs::read_to_string(root().join("config/samples").join(file)).expect("sample");
    serde_saphyr::from_multiple(&text).expect("sample YAML")
}

fn config_hash(d: &Deployment) -> String {
    d.spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get("outboxrelay.dev/config-hash"))
        .cloned()
        .unwrap_or_default()
}

/// The operator reconciles the samples on a real API server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_reconciles_the_samples_on_a_real_cluster() {
    let Some(client) = cluster("operator_reconciles_the_samples_on_a_real_cluster").await else {
        return;
    };
    // The generated CRD must be accepted (structural schema, CEL rules).
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd: CustomResourceDefinition =
        serde_saphyr::from_str(&outbox_operator::crd_yaml().expect("crd yaml")).expect("crd");
    apply(&crds, &crd).await;
    tokio::time::timeout(
        Duration::from_secs(60),
        await_condition(crds, &crd.name_any(), conditions::is_crd_established()),
    )
    .await
    .expect("CRD established in time")
    .expect("watch the CRD");

    let ns = TestNamespace::create(&client, "obr-operator").await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    for s in sample::<Secret>("secrets.yaml") {
        apply(&secrets, &s).await;
    }
    let relays: Api<OutboxRelay> = Api::namespaced(client.clone(), &ns.name);
    for file in ["outboxrelay-minimal.yaml", "outboxrelay-full.yaml"] {
        for r in sample::<OutboxRelay>(file) {
            apply(&relays, &r).await;
        }
    }
    let operator = tokio::spawn(outbox_operator::controller::run(
        client.clone(),
        Some(ns.name.clone()),
        "outbox-relay:e2e".into(),
        outbox_operator::metrics::Metrics::default(),
    ));

    // Every child, owned by its OutboxRelay.
    let orders = relays.get("orders").await.expect("orders");
    let uid = orders.uid().expect("uid");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let d = wait_for("the orders Deployment", Duration::from_secs(60), || async {
        deployments.get_opt("orders-relay").await.ok().flatten()
    })
    .await;
    let owned =
        |refs: Option<Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>>| {
            refs.unwrap_or_default()
                .iter()
                .any(|o| o.uid == uid && o.controller == Some(true))
        };
    assert!(owned(d.metadata.owner_references.clone()));
    macro_rules! child {
        ($k:ty, $name:expr) => {{
            let api: Api<$k> = Api::namespaced(client.clone(), &ns.name);
            let o = wait_for(
                concat!("child ", stringify!($k)),
                Duration::from_secs(30),
                || async { api.get_opt($name).await.ok().flatten() },
            )
            .await;
            assert!(
                owned(o.metadata.owner_references.clone()),
                "{} not owned",
                stringify!($k)
            );
        }};
    }
    child!(ConfigMap, "orders-relay");
    child!(ServiceAccount, "orders-relay");
    child!(Role, "orders-relay");
    child!(RoleBinding, "orders-relay");
    child!(Lease, "orders-relay-leader");
    child!(Service, "orders-relay");
    child!(PodDisruptionBudget, "orders-relay");

    // Conditions for the current generation.
    let status = wait_for("orders status", Duration::from_secs(60), || async {
        let r = relays.get("orders").await.ok()?;
        let st = r.status.clone()?;
        (st.observed_generation == r.metadata.generation
            && st.conditions.iter().any(|c| c.type_ == "Degraded"))
        .then_some(st)
    })
    .await;
    let degraded = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .expect("Degraded");
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("False", "Reconciled")
    );
    for t in ["Ready", "Progressing"] {
        assert!(
            status.conditions.iter().any(|c| c.type_ == t),
            "{t}: {status:?}"
        );
    }

    // A spec change rolls the pods (new config hash) and scales.
    let before = config_hash(&d);
    relays
        .patch(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"replicas": 3, "logLevel": "debug"}})),
        )
        .await
        .expect("patch spec");
    let d2 = wait_for(
        "the Deployment to follow the spec",
        Duration::from_secs(60),
        || async {
            let d = deployments.get("orders-relay").await.ok()?;
            (d.spec.as_ref()?.replicas == Some(3) && config_hash(&d) != before).then_some(d)
        },
    )
    .await;
    // A change of a referenced Secret rolls them too.
    let before = config_hash(&d2);
    secrets
        .patch(
            "orders-mysql",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"stringData": {"password": "rotated"}})),
        )
        .await
        .expect("rotate the secret");
    wait_for(
        "a rollout after the Secret changed",
        Duration::from_secs(60),
        || async {
            let d = deployments.get("orders-relay").await.ok()?;
            (config_hash(&d) != before).then_some(())
        },
    )
    .await;
    // A missing Secret: Degraded with the reason, no crash.
    secrets
        .delete("billing-redis", &DeleteParams::default())
        .await
        .expect("delete a secret");
    wait_for(
        "billing Degraded=MissingSecret",
        Duration::from_secs(90),
        || async {
            let r = relays.get("billing").await.ok()?;
            r.status?
                .conditions
                .iter()
                .any(|c| c.type_ == "Degraded" && c.status == "True" && c.reason == "MissingSecret")
                .then_some(())
        },
    )
    .await;
    assert!(!operator.is_finished(), "the operator stopped");

    // Deleting the OutboxRelay removes every child (garbage collection).
    relays
        .delete("orders", &DeleteParams::foreground())
        .await
        .expect("delete");
    wait_for(
        "children garbage-collected",
        Duration::from_secs(120),
        || async {
            let gone = deployments.get_opt("orders-relay").await.ok()?.is_none()
                && Api::<ConfigMap>::namespaced(client.clone(), &ns.name)
                    .get_opt("orders-relay")
                    .await
                    .ok()?
                    .is_none();
            gone.then_some(())
        },
    )
    .await;
    operator.abort();
}
