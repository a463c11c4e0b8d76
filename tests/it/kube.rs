//! End-to-end tests against a real Kubernetes API server. `scripts/test.sh`
//! runs them (`--ignored`) against the control plane it starts from
//! `../shared/k8s`, or against the cluster `KUBECONFIG` points at (kind,
//! k3d, a dev cluster); a plain `cargo test` reports them as ignored, with
//! the reason, never as passed. Each works in a fresh namespace it deletes
//! after.
//!
//! - Relay processes elect their leader through a Lease: the failover
//!   scenario of `election.rs` with `election.mode = "kubernetes"`.
//! - The operator reconciles the samples: in-process (CRD accepted by the
//!   API server, children with owner references, conditions, rollouts on a
//!   spec change and on a Secret change, cleanup on deletion), and as the
//!   built binary with the chart's RBAC through a ServiceAccount token
//!   (start-up, TLS, RBAC and its own Lease election).

use std::path::Path;
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

/// A client for the cluster in `KUBECONFIG`, with the crypto provider the
/// binaries use. These tests run only when asked for (`--ignored`): without
/// a cluster that is a failure, not a pass.
pub(crate) async fn cluster() -> Client {
    outbox_relay::install_crypto_provider();
    assert!(
        std::env::var_os("KUBECONFIG").is_some(),
        "KUBECONFIG is not set: these tests need a real Kubernetes API server \
         (scripts/test.sh starts ../shared/k8s when it is there)"
    );
    Client::try_default()
        .await
        .expect("KUBECONFIG is set but no client could be built from it")
}

/// A namespace of the test's own, deleted when dropped (also on failure).
pub(crate) struct TestNamespace {
    pub(crate) name: String,
}

impl TestNamespace {
    pub(crate) async fn create(client: &Client, prefix: &str) -> TestNamespace {
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
#[ignore = "needs a Kubernetes API server: scripts/test.sh runs it (../shared/k8s or KUBECONFIG)"]
async fn relays_elect_through_a_kubernetes_lease() {
    let client = cluster().await;
    let ns = TestNamespace::create(&client, "obr-lease").await;
    let election = format!(
        "[election]\nmode = \"kubernetes\"\nnamespace = \"{}\"\nlease_name = \"relay-leader\"\n",
        ns.name
    );
    let times = failover_rounds("klease", "kubernetes", &election).await;
    // The Lease counted every term: the first, the takeovers, the hand-overs
    // of the graceful stops at the end.
    let leases = Api::<Lease>::namespaced(client, &ns.name)
        .list(&ListParams::default())
        .await
        .expect("list leases");
    assert_eq!(leases.items.len(), 1, "{:?}", leases.items);
    let spec = leases.items[0].spec.clone().expect("lease spec");
    assert!(
        spec.lease_transitions.unwrap_or(0) > times.len() as i32,
        "{spec:?}"
    );
}

pub(crate) async fn apply<K>(api: &Api<K>, obj: &K)
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

pub(crate) fn sample<T: serde::de::DeserializeOwned>(file: &str) -> Vec<T> {
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

/// Applies the generated CRD (the API server must accept its structural
/// schema and CEL rules, without a warning) and waits until it is established.
async fn install_crd(client: &Client) {
    let out = std::process::Command::new("kubectl")
        .args([
            "apply",
            "--server-side",
            "--force-conflicts",
            "--dry-run=server",
            "-f",
            "crds/outboxrelays.yaml",
        ])
        .current_dir(root())
        .output()
        .expect("run kubectl");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kubectl apply the CRD: {stderr}");
    assert!(
        !stderr.contains("Warning"),
        "the API server warned about the CRD: {stderr}"
    );
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
}

/// The operator reconciles the samples on a real API server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kubernetes API server: scripts/test.sh runs it (../shared/k8s or KUBECONFIG)"]
async fn operator_reconciles_the_samples_on_a_real_cluster() {
    let client = cluster().await;
    install_crd(&client).await;

    let ns = TestNamespace::create(&client, "obr-operator").await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    for s in sample::<Secret>("secrets.yaml") {
        apply(&secrets, &s).await;
    }
    let relays: Api<OutboxRelay> = Api::namespaced(client.clone(), &ns.name);
    for file in [
        "outboxrelay-minimal.yaml",
        "outboxrelay-full.yaml",
        "outboxrelay-nats.yaml",
        "outboxrelay-postgres.yaml",
    ] {
        for r in sample::<OutboxRelay>(file) {
            apply(&relays, &r).await;
        }
    }
    let metrics = outbox_operator::metrics::Metrics::default();
    let operator = tokio::spawn(outbox_operator::controller::run(
        client.clone(),
        Some(ns.name.clone()),
        "outbox-relay:e2e".into(),
        metrics.clone(),
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

    // The Lease, the one child not watched through the controller (its
    // holder renews it), deleted: back at the next reconcile, which a relay
    // report (here: a change of the resource) brings.
    // From steady state: the operator has written nothing for 2 s.
    let mut last = (metrics.writes.get(), std::time::Instant::now());
    wait_for("the operator quiet", Duration::from_secs(60), || {
        let now = (metrics.writes.get(), std::time::Instant::now());
        let quiet = if now.0 == last.0 {
            last.1.elapsed() >= Duration::from_secs(2)
        } else {
            last = now;
            false
        };
        async move { quiet.then_some(()) }
    })
    .await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    leases
        .delete("orders-relay-leader", &DeleteParams::default())
        .await
        .expect("delete the Lease");
    let touches = std::sync::atomic::AtomicU32::new(0);
    wait_for("the Lease recreated", Duration::from_secs(30), || async {
        let n = touches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let touch = serde_json::json!({"metadata": {"annotations": {"e2e/touch": n.to_string()}}});
        relays
            .patch("orders", &PatchParams::default(), &Patch::Merge(touch))
            .await
            .ok()?;
        leases
            .get_opt("orders-relay-leader")
            .await
            .ok()?
            .map(|_| ())
    })
    .await;

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
    // No kubelet here: the pods exist but never run, so the rollout is not
    // complete (it was counted complete once the pods were merely updated).
    let progressing = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Progressing")
        .expect("Progressing");
    assert_eq!(
        (progressing.status.as_str(), progressing.reason.as_str()),
        ("True", "RollingOut"),
        "{progressing:?}"
    );
    assert!(
        progressing
            .message
            .starts_with("0 of 2 relay pods available"),
        "{}",
        progressing.message
    );
    // The API server took the default spreading of the relay pods.
    let spread = d
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.affinity.as_ref())
        .and_then(|a| a.pod_anti_affinity.as_ref())
        .and_then(|a| {
            a.preferred_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .expect("default pod anti-affinity");
    assert_eq!(
        spread[0].pod_affinity_term.topology_key,
        "kubernetes.io/hostname"
    );

    malformed_resources_are_refused_naming_the_field(&client, &ns.name).await;

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
    let billing = wait_for(
        "billing Degraded=MissingSecret",
        Duration::from_secs(90),
        || async {
            let r = relays.get("billing").await.ok()?;
            let st = r.status?;
            st.conditions
                .iter()
                .any(|c| c.type_ == "Degraded" && c.status == "True" && c.reason == "MissingSecret")
                .then_some(st)
        },
    )
    .await;
    // Every condition type stays present, with its current truth.
    let mut types: Vec<&str> = billing
        .conditions
        .iter()
        .map(|c| c.type_.as_str())
        .collect();
    types.sort_unstable();
    assert_eq!(
        types,
        ["Degraded", "Progressing", "Ready", "Stalled"],
        "{billing:?}"
    );
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

/// Merges `change` into `into` (objects key by key, anything else replaced).
fn merge(into: &mut serde_json::Value, change: &serde_json::Value) {
    match (into, change) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k.clone()).or_insert(serde_json::Value::Null), v);
            }
        }
        (a, b) => *a = b.clone(),
    }
}

/// What the API server refuses (schema types, unknown fields with strict
/// field validation, patterns, lengths, CEL rules), each error naming the
/// field; and what it accepts but the operator's validation refuses, shown
/// as `Ready=False`, reason `InvalidSpec`, naming the field.
async fn malformed_resources_are_refused_naming_the_field(client: &Client, ns: &str) {
    use kube::api::{ApiResource, DynamicObject, ValidationDirective};
    let ar = ApiResource::erase::<OutboxRelay>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
    let text = std::fs::read_to_string(root().join("config/samples/outboxrelay-minimal.yaml"))
        .expect("sample");
    let minimal: serde_json::Value = serde_saphyr::from_str(&text).expect("sample YAML");
    let strict = PatchParams {
        field_validation: Some(ValidationDirective::Strict),
        ..PatchParams::apply("outbox-e2e").force()
    };
    let object = |name: &str, change: serde_json::Value| {
        let mut o = minimal.clone();
        o["metadata"] = serde_json::json!({"name": name, "namespace": ns});
        merge(&mut o["spec"], &change);
        serde_json::from_value::<DynamicObject>(o).expect("object")
    };
    // Names every child could not carry (a Service name is a DNS-1035
    // label): refused by the CRD's rule on metadata.name.
    for name in ["orders.v2", "9orders", &"o".repeat(58)] {
        let e = api
            .patch(
                name,
                &strict,
                &Patch::Apply(object(name, serde_json::json!({}))),
            )
            .await
            .expect_err(&format!("the API server must refuse the name {name}"));
        let msg = match &e {
            kube::Error::Api(s) => s.message.clone(),
            other => other.to_string(),
        };
        assert!(
            msg.contains("metadata.name must be at most 57"),
            "{name}: {msg}"
        );
    }
    let longest = "o".repeat(57);
    api.patch(
        &longest,
        &strict,
        &Patch::Apply(object(&longest, serde_json::json!({}))),
    )
    .await
    .expect("the longest name is accepted");
    api.delete(&longest, &DeleteParams::default())
        .await
        .expect("delete");
    for (change, field) in [
        (serde_json::json!({"replicas": "two"}), "spec.replicas"),
        (serde_json::json!({"replicaz": 2}), "replicaz"),
        (
            serde_json::json!({"heartbeatInterval": "-5s"}),
            "spec.heartbeatInterval",
        ),
        (
            serde_json::json!({"mysql": {"passwordSecret": {"key": ""}}}),
            "spec.mysql.passwordSecret.key",
        ),
        (
            serde_json::json!({"kafka": {"badRowPolicy": "DeadLetter"}}),
            "deadLetterTopic is required with badRowPolicy: DeadLetter",
        ),
        (
            serde_json::json!({"redis": {"caSecret": {"name": "ca", "key": "ca.crt"}}}),
            "url must start with rediss://",
        ),
        (
            serde_json::json!({"mysql": {"outboxes": []}}),
            "nothing to relay: list spec.mysql.outboxes or spec.changes.tables",
        ),
        (
            serde_json::json!({"changes": {"tables": {}}}),
            "spec.changes.tables",
        ),
        // Beside the sample's mysql: two databases; and PostgreSQL's rules.
        (
            serde_json::json!({"postgres": {"host": "pg", "database": "shop", "user": "relay",
                "passwordSecret": {"name": "p", "key": "password"},
                "outboxes": [{"database": "public"}]}}),
            "set exactly one database: spec.mysql or spec.postgres",
        ),
        (
            serde_json::json!({"postgres": {"host": "pg", "database": "shop", "user": "relay",
                "passwordSecret": {"name": "p", "key": "password"}, "slot": "Bad-Slot",
                "outboxes": [{"database": "public"}]}}),
            "spec.postgres.slot",
        ),
        (
            serde_json::json!({"mysql": {"outboxes": [{"database": "shop", "columnPreset": "Debezium",
                "columns": {"id": "event_id"}}]}}),
            "set columns or columnPreset, not both",
        ),
        // Beside the sample's kafka: two sinks (and each NATS rule).
        (
            serde_json::json!({"nats": {"url": "nats://nats:4222", "stream": "OUTBOX"}}),
            "set exactly one sink: spec.kafka or spec.nats",
        ),
        (
            serde_json::json!({"nats": {"url": "nats://nats:4222", "stream": "OUT.BOX"}}),
            "spec.nats.stream",
        ),
        (
            serde_json::json!({"nats": {"url": "nats://nats:4222", "stream": "OUTBOX", "user": "relay"}}),
            "user and passwordSecret go together",
        ),
        (
            serde_json::json!({"nats": {"url": "nats://nats:4222", "stream": "OUTBOX",
                "tokenSecret": {"name": "n", "key": "token"},
                "nkeySecret": {"name": "n", "key": "seed"}}}),
            "at most one of passwordSecret, tokenSecret, nkeySecret, credentialsSecret",
        ),
    ] {
        let e = api
            .patch(
                "malformed",
                &strict,
                &Patch::Apply(object("malformed", change.clone())),
            )
            .await
            .expect_err(&format!("the API server must refuse {change}"));
        let msg = match &e {
            kube::Error::Api(s) => s.message.clone(),
            other => other.to_string(),
        };
        assert!(
            msg.contains(field),
            "refusing {change}: `{field}` not in: {msg}"
        );
    }
    // Accepted by the schema, refused by the operator's validation.
    let twice =
        serde_json::json!({"mysql": {"outboxes": [{"database": "shop"}, {"database": "shop"}]}});
    api.patch("twice", &strict, &Patch::Apply(object("twice", twice)))
        .await
        .expect("the schema accepts it");
    let relays: Api<OutboxRelay> = Api::namespaced(client.clone(), ns);
    let ready = wait_for(
        "twice: Ready=False, InvalidSpec",
        Duration::from_secs(60),
        || async {
            let r = relays.get("twice").await.ok()?;
            r.status?
                .conditions
                .into_iter()
                .find(|c| c.type_ == "Ready" && c.status == "False" && c.reason == "InvalidSpec")
        },
    )
    .await;
    assert!(
        ready.message.contains("spec.mysql.outboxes[1]"),
        "{}",
        ready.message
    );
    api.delete("twice", &DeleteParams::default())
        .await
        .expect("delete");
}

pub(crate) fn condition(r: &OutboxRelay, t: &str) -> Option<(String, String)> {
    r.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == t)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

/// What `kubectl get outboxrelays` prints: the server-side Table.
async fn table(client: &Client, ns: &str) -> serde_json::Value {
    let req = http::Request::get(format!(
        "/apis/outboxrelay.dev/v1alpha1/namespaces/{ns}/outboxrelays"
    ))
    .header("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
    .body(Vec::new())
    .expect("request");
    client.request(req).await.expect("table")
}

/// The operator in-process and two relay processes on the host: the status
/// shows the leader, an advancing position and lag ≈ 0 under load; both
/// relays killed → Stalled within two intervals; one restarted → Ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kubernetes API server: scripts/test.sh runs it (../shared/k8s or KUBECONFIG)"]
async fn status_tells_the_truth_on_a_real_cluster() {
    let client = cluster().await;
    install_crd(&client).await;
    let ns = TestNamespace::create(&client, "obr-status").await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    for s in sample::<Secret>("secrets.yaml") {
        apply(&secrets, &s).await;
    }
    let relays: Api<OutboxRelay> = Api::namespaced(client.clone(), &ns.name);
    let mut cr = sample::<OutboxRelay>("outboxrelay-minimal.yaml").remove(0);
    cr.spec.heartbeat_interval = Some("1s".into());
    apply(&relays, &cr).await;
    let metrics = outbox_operator::metrics::Metrics::default();
    let operator = tokio::spawn(outbox_operator::controller::run(
        client.clone(),
        Some(ns.name.clone()),
        "outbox-relay:e2e".into(),
        metrics.clone(),
    ));

    let f = Fixture::new("kstatus", mysql_port(), &["Order"], 3).await;
    let extra = format!(
        "[election]\nmode = \"kubernetes\"\nnamespace = \"{ns}\"\nlease_name = \"orders-relay-leader\"\n\
         [status]\ninterval = \"1s\"\nresource = \"orders\"\nnamespace = \"{ns}\"\n",
        ns = ns.name
    );
    let mut spec = f.spec();
    spec.extra = &extra;
    let start = |f: &Fixture| {
        let p = free_port();
        Relay::start(&f.dir.0, &spec.toml(p), p, &[])
    };
    let mut a = start(&f);
    let mut b = start(&f);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (db, stop) = (f.db.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                db.insert_txn(&[Ev::new("Order", &format!("o{}", n % 20), "{}")])
                    .await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    // Leader, advancing position, lag ≈ 0, Ready.
    let first = wait_for("Ready with a leader", Duration::from_secs(90), || async {
        let r = relays.get("orders").await.ok()?;
        (condition(&r, "Ready") == Some(("True".into(), "Streaming".into()))).then_some(r)
    })
    .await;
    let st = first.status.clone().expect("status");
    assert!(st.leader.as_ref().is_some_and(|l| l.epoch >= 1), "{st:?}");
    let pos0 = st.position.clone().expect("position").pos;
    let later = wait_for(
        "the position advancing",
        Duration::from_secs(30),
        || async {
            let r = relays.get("orders").await.ok()?;
            let s = r.status?;
            (s.position.as_ref()?.pos > pos0).then_some(s)
        },
    )
    .await;
    assert!(
        later.lag.as_ref().is_some_and(|l| l.seconds <= 2),
        "{later:?}"
    );
    let t = table(&client, &ns.name).await;
    let columns: Vec<&str> = t["columnDefinitions"]
        .as_array()
        .expect("columns")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(
        columns,
        ["Name", "Ready", "Leader", "Position", "Lag", "Age"]
    );
    let cells = &t["rows"][0]["cells"];
    assert_eq!(cells[0], "orders");
    assert_eq!(cells[1], "True");
    assert!(cells[2].as_str().is_some_and(|l| !l.is_empty()), "{cells}");
    assert!(cells[3].as_str().is_some_and(|p| !p.is_empty()), "{cells}");

    // Every relay dead: Stalled within two intervals (+ the operator's reaction).
    a.kill().await;
    b.kill().await;
    let killed = std::time::Instant::now();
    wait_for(
        "Stalled after the relays died",
        Duration::from_secs(10),
        || async {
            let r = relays.get("orders").await.ok()?;
            (condition(&r, "Stalled") == Some(("True".into(), "NoHeartbeat".into()))
                && condition(&r, "Ready").is_some_and(|c| c.0 == "False"))
            .then_some(())
        },
    )
    .await;
    println!(
        "Stalled shown {:?} after the last relay died",
        killed.elapsed()
    );
    // Steady state while Stalled (rechecked every second): the operator
    // writes nothing — no child, no status, no Event.
    let settled = metrics.writes.get();
    let window = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < window {
        assert_eq!(
            metrics.writes.get(),
            settled,
            "the operator wrote at steady state"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // One relay back: Ready again.
    a = start(&f);
    wait_for("Ready again", Duration::from_secs(60), || async {
        let r = relays.get("orders").await.ok()?;
        (condition(&r, "Ready") == Some(("True".into(), "Streaming".into()))
            && condition(&r, "Stalled").is_some_and(|c| c.0 == "False"))
        .then_some(())
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.expect("writer");
    assert!(a.terminate().await.success(), "{}", a.logs());
    operator.abort();
}

/// `helm install` into a fresh namespace on a real cluster: the operator
/// Deployment exists, the CRD is served, the samples are accepted, applying
/// them (and the rendered chart) again changes nothing, and `helm uninstall`
/// leaves the CRD.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kubernetes API server: scripts/test.sh runs it (../shared/k8s or KUBECONFIG)"]
async fn helm_install_gitops_and_uninstall_on_a_real_cluster() {
    use crate::chart::{helm, run};
    use std::process::Command;

    let client = cluster().await;
    let ns = TestNamespace::create(&client, "obr-helm").await;
    let release = format!("obr-{}", unique().to_lowercase());
    let (helm, chart) = (helm(), "charts/outbox-operator");
    run(Command::new(&helm).args([
        "install",
        &release,
        chart,
        "--namespace",
        &ns.name,
        "--take-ownership",
    ]))
    .unwrap_or_else(|e| panic!("helm install: {e}"));
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let d = deployments
        .get(&release)
        .await
        .expect("the operator Deployment");
    assert_eq!(d.spec.and_then(|s| s.replicas), Some(2));
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    tokio::time::timeout(
        Duration::from_secs(60),
        await_condition(
            crds.clone(),
            "outboxrelays.outboxrelay.dev",
            conditions::is_crd_established(),
        ),
    )
    .await
    .expect("CRD established in time")
    .expect("watch the CRD");

    // The samples are accepted, and applying them again changes nothing.
    let kubectl = |args: &[&str]| {
        run(Command::new("kubectl")
            .args(args)
            .args(["--namespace", &ns.name]))
    };
    kubectl(&["apply", "--server-side", "-f", "config/samples/"])
        .unwrap_or_else(|e| panic!("kubectl apply the samples: {e}"));
    kubectl(&["apply", "--server-side", "-f", "config/samples/"]).expect("apply again");
    kubectl(&["diff", "--server-side", "-f", "config/samples/"])
        .unwrap_or_else(|d| panic!("a second apply would change the samples: {d}"));
    // The rendered chart applied twice by a GitOps tool: no diff after.
    // (Without the CRD, which helm installed: this test's cleanup must not
    // delete it under other OutboxRelays.)
    let rendered = run(Command::new(&helm).args([
        "template",
        &release,
        chart,
        "--namespace",
        &ns.name,
        "--set",
        "crd.install=false",
    ]))
    .expect("helm template");
    let file = std::env::temp_dir().join(format!("{release}.yaml"));
    std::fs::write(&file, rendered).expect("write rendered chart");
    let file = file.to_string_lossy().into_owned();
    let ssa = [
        "--server-side",
        "--force-conflicts",
        "--field-manager",
        "gitops",
        "-f",
    ];
    for _ in 0..2 {
        kubectl(&[&["apply"][..], &ssa[..], &[file.as_str()][..]].concat())
            .unwrap_or_else(|e| panic!("apply the rendered chart: {e}"));
    }
    kubectl(&[&["diff"][..], &ssa[..], &[file.as_str()][..]].concat())
        .unwrap_or_else(|d| panic!("the rendered chart differs after two applies: {d}"));

    run(Command::new(&helm).args(["uninstall", &release, "--namespace", &ns.name]))
        .unwrap_or_else(|e| panic!("helm uninstall: {e}"));
    assert!(
        crds.get_opt("outboxrelays.outboxrelay.dev")
            .await
            .expect("get crd")
            .is_some(),
        "helm uninstall removed the CRD"
    );
    // The GitOps apply's cluster-scoped objects (ClusterRoles) outlive the namespace.
    let _ = Command::new("kubectl")
        .args(["delete", "--ignore-not-found", "-f", &file])
        .output();
}

/// The current context's cluster of `KUBECONFIG` (its name, server and CA).
pub(crate) fn current_cluster() -> kube::config::NamedCluster {
    let config = kube::config::Kubeconfig::read().expect("read KUBECONFIG");
    let context = config
        .contexts
        .iter()
        .find(|c| Some(&c.name) == config.current_context.as_ref())
        .and_then(|c| c.context.clone())
        .expect("KUBECONFIG's current context");
    config
        .clusters
        .into_iter()
        .find(|c| c.name == context.cluster)
        .expect("KUBECONFIG's current cluster")
}

/// A kubeconfig for `sa` in `ns` with a token from the TokenRequest API, for
/// the cluster of `KUBECONFIG`: a process given it acts with exactly the
/// RBAC granted to that ServiceAccount, as in a pod.
async fn service_account_kubeconfig(client: &Client, ns: &str, sa: &str, file: &Path) {
    use k8s_openapi::api::authentication::v1::TokenRequest;
    let request: TokenRequest = serde_json::from_value(serde_json::json!({
        "spec": {"audiences": [], "expirationSeconds": 3600}
    }))
    .expect("token request");
    let token = Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create_token_request(sa, &PostParams::default(), &request)
        .await
        .unwrap_or_else(|e| panic!("TokenRequest for {ns}/{sa}: {e}"))
        .status
        .expect("token status")
        .token;
    let cluster = current_cluster();
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [cluster],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": sa, "context": {"cluster": cluster.name, "user": sa, "namespace": ns}}],
        "current-context": sa,
    });
    std::fs::write(file, config.to_string()).expect("write the kubeconfig");
}

/// The built `outbox-operator run`, as the chart runs it: its environment,
/// the chart's RBAC (namespaced) through a ServiceAccount token, never
/// admin. Two replicas elect through the operator's Lease; the leader
/// reconciles a sample into its children and writes status; SIGKILLed, the
/// standby takes the Lease and reconciles the next change; SIGTERM exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kubernetes API server: scripts/test.sh runs it (../shared/k8s or KUBECONFIG)"]
async fn operator_binary_runs_with_the_charts_rbac() {
    use crate::chart::{helm, run};
    use std::process::Command;

    let client = cluster().await;
    install_crd(&client).await;
    let ns = TestNamespace::create(&client, "obr-opbin").await;
    let release = format!("obr-op-{}", unique().to_lowercase());
    // The chart's ServiceAccount and RBAC, for this namespace only.
    let rendered = run(Command::new(helm()).args([
        "template",
        &release,
        "charts/outbox-operator",
        "--namespace",
        &ns.name,
        "--set",
        &format!("watchNamespace={}", ns.name),
        "--show-only",
        "templates/serviceaccount.yaml",
        "--show-only",
        "templates/rbac.yaml",
    ]))
    .expect("helm template");
    let dir = Scratch::new("opbin");
    let rbac = dir.0.join("rbac.yaml");
    std::fs::write(&rbac, rendered).expect("write the chart's RBAC");
    let rbac = rbac.to_string_lossy().into_owned();
    run(Command::new("kubectl").args(["apply", "--namespace", &ns.name, "-f", &rbac]))
        .unwrap_or_else(|e| panic!("apply the chart's RBAC: {e}"));
    let kubeconfig = dir.0.join("operator.kubeconfig");
    service_account_kubeconfig(&client, &ns.name, &release, &kubeconfig).await;

    let start = |replica: usize| {
        let port = free_port();
        let mut cmd = Command::new(operator_bin());
        cmd.arg("run")
            .env("KUBECONFIG", &kubeconfig)
            .env("WATCH_NAMESPACE", &ns.name)
            .env("POD_NAMESPACE", &ns.name)
            .env("POD_NAME", format!("{release}-{replica}"))
            .env("LEASE_NAME", &release)
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .env("HTTP_LISTEN", format!("127.0.0.1:{port}"));
        Relay::spawn(cmd, dir.0.join(format!("operator-{replica}.log")), port)
    };
    let mut operators = [start(0), start(1)];
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    let holder = || async {
        leases
            .get_opt(&release)
            .await
            .ok()
            .flatten()?
            .spec?
            .holder_identity
            .filter(|h| !h.is_empty())
    };
    let first = wait_for(
        "an operator holding its Lease",
        Duration::from_secs(60),
        holder,
    )
    .await;
    let leader = usize::from(first.starts_with(&format!("{release}-1-")));
    assert!(
        first.starts_with(&format!("{release}-{leader}-")),
        "holder {first}"
    );
    // Both ready (a standby too: probes must not restart it); one leads.
    for (i, o) in operators.iter().enumerate() {
        let leading = f64::from(u8::from(i == leader));
        wait_for(
            &format!("replica {i} ready, is_leader {leading}"),
            Duration::from_secs(30),
            || async {
                (http_get(o.http_port, "/readyz").await?.0 == 200
                    && o.metric("outbox_operator_is_leader").await == leading)
                    .then_some(())
            },
        )
        .await;
    }

    // The leader reconciles a sample: children and status, as itself.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    for s in sample::<Secret>("secrets.yaml") {
        apply(&secrets, &s).await;
    }
    let relays: Api<OutboxRelay> = Api::namespaced(client.clone(), &ns.name);
    apply(
        &relays,
        &sample::<OutboxRelay>("outboxrelay-minimal.yaml").remove(0),
    )
    .await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let reconciled = |replicas: i32| {
        let (relays, deployments) = (relays.clone(), deployments.clone());
        move || {
            let (relays, deployments) = (relays.clone(), deployments.clone());
            async move {
                let r = relays.get("orders").await.ok()?;
                let st = r.status?;
                let d = deployments.get_opt("orders-relay").await.ok()??;
                (st.observed_generation == r.metadata.generation
                    && d.spec?.replicas == Some(replicas)
                    && st.conditions.iter().any(|c| {
                        c.type_ == "Degraded" && c.status == "False" && c.reason == "Reconciled"
                    }))
                .then_some(())
            }
        }
    };
    wait_for(
        "the operator process to reconcile orders",
        Duration::from_secs(60),
        reconciled(2),
    )
    .await;

    // The leader dies: the standby takes the Lease and reconciles.
    operators[leader].kill().await;
    let standby = 1 - leader;
    wait_for(
        "the standby holding the Lease",
        Duration::from_secs(30),
        || async {
            holder()
                .await
                .filter(|h| h.starts_with(&format!("{release}-{standby}-")))
        },
    )
    .await;
    relays
        .patch(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"replicas": 3}})),
        )
        .await
        .expect("patch spec");
    wait_for(
        "the new leader to reconcile the change",
        Duration::from_secs(60),
        reconciled(3),
    )
    .await;
    assert_eq!(
        operators[standby].metric("outbox_operator_is_leader").await,
        1.0
    );

    // SIGTERM: a clean exit that hands the Lease back.
    let status = operators[standby].terminate().await;
    let logs = operators[standby].logs();
    assert!(status.success(), "exit {status:?}; log:\n{logs}");
    for o in &operators {
        let logs = o.logs();
        assert!(!logs.contains("panicked"), "{logs}");
        assert!(!logs.contains("\"level\":\"ERROR\""), "{logs}");
    }
    wait_for("the Lease released", Duration::from_secs(10), || async {
        holder().await.is_none().then_some(())
    })
    .await;
    // The chart's cluster-scoped RBAC outlives the namespace.
    let _ = Command::new("kubectl")
        .args(["delete", "--ignore-not-found", "-f", &rbac])
        .output();
}

/// `kubectl describe` shows the latest message: an occurrence with a new
/// note is an Event of its own; the same note again joins its series.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kubernetes API server: scripts/test.sh runs it (../shared/k8s or KUBECONFIG)"]
async fn events_carry_the_latest_message() {
    use k8s_openapi::api::events::v1::Event;
    use kube::Resource;
    use outbox_operator::events::{EventType, Recorder};

    let client = cluster().await;
    install_crd(&client).await;
    let ns = TestNamespace::create(&client, "obr-events").await;
    let relays: Api<OutboxRelay> = Api::namespaced(client.clone(), &ns.name);
    let mut cr = sample::<OutboxRelay>("outboxrelay-minimal.yaml").remove(0);
    cr.metadata.namespace = Some(ns.name.clone());
    apply(&relays, &cr).await;
    let reference = relays.get("orders").await.expect("orders").object_ref(&());
    let recorder = Recorder::new(client.clone(), "outbox-operator", None);
    for note in ["no relay report since 10:00", "no relay report since 10:05"] {
        for _ in 0..2 {
            recorder
                .publish(&reference, EventType::Warning, "Stalled", "Reconcile", note)
                .await
                .expect("publish");
        }
    }
    let events = Api::<Event>::namespaced(client, &ns.name)
        .list(&ListParams::default())
        .await
        .expect("list events");
    let mut seen: Vec<(String, i32)> = events
        .items
        .iter()
        .filter(|e| e.reason.as_deref() == Some("Stalled"))
        .map(|e| {
            (
                e.note.clone().unwrap_or_default(),
                e.series.as_ref().map_or(1, |s| s.count),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("no relay report since 10:00".to_string(), 2),
            ("no relay report since 10:05".to_string(), 2)
        ]
    );
}

/// `checkpointPolicy: Delete` with `spec.postgres`: deleting the resource
/// scales the relay pods to zero, then the operator drops the relay's slot
/// and the publication it created, and the Redis keys; the resource goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kubernetes API server: scripts/test.sh runs it (../shared/k8s or KUBECONFIG)"]
async fn deleting_a_postgres_relay_drops_its_slot() {
    use outbox_relay::keys::{pg_object_name, publication_comment};
    services();
    let client = cluster().await;
    install_crd(&client).await;
    let ns = TestNamespace::create(&client, "obr-pgdrop").await;
    let port = pg_port();
    let db = format!("kdrop_{}", unique());
    let admin = pg_connect(port, "app", "app-password", "postgres").await;
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .expect("database");
    let app = pg_connect(port, "app", "app-password", &db).await;
    let relay = outbox_operator::cleanup::relay_name(&ns.name, "users");
    let name = pg_object_name(&relay);
    app.batch_execute(&format!(
        "CREATE TABLE outbox (id bigserial PRIMARY KEY, aggregatetype text, aggregateid text, type text, payload jsonb);
         CREATE PUBLICATION {name} FOR TABLE outbox;
         COMMENT ON PUBLICATION {name} IS '{}'",
        publication_comment(&relay)
    ))
    .await
    .expect("outbox and publication");
    // The slot as the relay makes it (REPLICATION: the relay's role).
    pg_connect(port, "relay", RELAY_PASSWORD, &db)
        .await
        .batch_execute(&format!(
            "SELECT pg_create_logical_replication_slot('{name}', 'pgoutput')"
        ))
        .await
        .expect("slot");

    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "users-postgres"},
        "stringData": {"password": RELAY_PASSWORD}
    }))
    .expect("secret");
    apply(&secrets, &secret).await;
    let relays: Api<OutboxRelay> = Api::namespaced(client.clone(), &ns.name);
    let mut cr = sample::<OutboxRelay>("outboxrelay-postgres.yaml").remove(0);
    let pg = cr.spec.postgres.as_mut().expect("spec.postgres");
    pg.host = "127.0.0.1".into();
    pg.port = Some(port as i32);
    pg.database = db.clone();
    cr.spec.redis.url = redis_url().into();
    cr.spec.redis.key_prefix = Some("test:".into());
    apply(&relays, &cr).await;
    let operator = tokio::spawn(outbox_operator::controller::run(
        client.clone(),
        Some(ns.name.clone()),
        "outbox-relay:e2e".into(),
        outbox_operator::metrics::Metrics::default(),
    ));
    wait_for("the finalizer", Duration::from_secs(60), || async {
        let r = relays.get("users").await.ok()?;
        (!r.metadata.finalizers.unwrap_or_default().is_empty()).then_some(())
    })
    .await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    wait_for("the relay Deployment", Duration::from_secs(60), || async {
        deployments.get_opt("users-relay").await.ok().flatten()
    })
    .await;

    relays
        .delete("users", &DeleteParams::default())
        .await
        .expect("delete");
    wait_for("the resource gone", Duration::from_secs(120), || async {
        relays.get_opt("users").await.ok()?.is_none().then_some(())
    })
    .await;
    let left = |sql: &'static str| {
        let app = &app;
        let name = name.clone();
        async move { app.query_opt(sql, &[&name]).await.expect("query").is_some() }
    };
    assert!(
        !left("SELECT 1 FROM pg_replication_slots WHERE slot_name = $1").await,
        "the slot is left"
    );
    assert!(
        !left("SELECT 1 FROM pg_publication WHERE pubname = $1").await,
        "the publication is left"
    );
    operator.abort();
    drop(app);
    let _ = admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .await;
}
