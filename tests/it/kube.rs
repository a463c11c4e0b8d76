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

/// Applies the generated CRD (the API server must accept its structural
/// schema and CEL rules) and waits until it is established.
async fn install_crd(client: &Client) {
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
async fn operator_reconciles_the_samples_on_a_real_cluster() {
    let Some(client) = cluster("operator_reconciles_the_samples_on_a_real_cluster").await else {
        return;
    };
    install_crd(&client).await;

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

fn condition(r: &OutboxRelay, t: &str) -> Option<(String, String)> {
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
async fn status_tells_the_truth_on_a_real_cluster() {
    let Some(client) = cluster("status_tells_the_truth_on_a_real_cluster").await else {
        return;
    };
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
    let operator = tokio::spawn(outbox_operator::controller::run(
        client.clone(),
        Some(ns.name.clone()),
        "outbox-relay:e2e".into(),
        outbox_operator::metrics::Metrics::default(),
    ));

    let f = Fixture::new("kstatus", MYSQL_PORT, &["Order"], 3).await;
    let extra = format!(
        "[election]\nmode = \"kubernetes\"\nnamespace = \"{ns}\"\n\
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
async fn helm_install_gitops_and_uninstall_on_a_real_cluster() {
    use crate::chart::{helm, run};
    use std::process::Command;

    let Some(client) = cluster("helm_install_gitops_and_uninstall_on_a_real_cluster").await else {
        return;
    };
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
