//! The user's journey on a real cluster, as the README's install section
//! tells it: `helm install` → Secrets and an OutboxRelay applied → relay
//! pods stream → failover → Secret rotation → Stalled → delete → `helm
//! uninstall`; and the same with a Role missing a verb. On `../shared/k8s`
//! (no kubelet) the pods run under the test's kubelet (`kubelet.rs`), with
//! exactly their spec's env, files, ServiceAccount token and user.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, DeleteParams, ListParams};
use kube::Client;
use outbox_operator::crd::OutboxRelay;

use crate::kube::{apply, cluster, condition, TestNamespace};
use crate::kubelet::Kubelet;
use crate::support::*;

/// The port of a `host:port` or `scheme://host:port/...` address.
fn port_of(addr: &str) -> u16 {
    let rest = addr.rsplit("//").next().unwrap_or(addr);
    let hostport = rest.split('/').next().unwrap_or(rest);
    hostport
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {addr}"))
}

/// A command's stdout, or its stderr as the error; run off the runtime.
async fn sh(program: &str, args: &[&str]) -> Result<String, String> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .current_dir(root())
        .output()
        .await
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// What the journey runs on: the cluster, its namespace, the pods' kubelet
/// (none when the cluster has nodes of its own), the operator's release.
struct Stage {
    client: Client,
    ns: TestNamespace,
    kubelet: Kubelet,
    helm: String,
    release: String,
    /// The pods' files and logs (kept when a test fails).
    _dir: Scratch,
}

impl Stage {
    /// `release`: the Helm release, unique per test (its ClusterRole for
    /// reading the CRD is named after it).
    /// `ports`: test services the pods reach besides MySQL, Redis and the broker.
    async fn new(prefix: &str, release: &str, ports: &[u16]) -> Stage {
        let client = cluster().await;
        services();
        let nodes = Api::<Node>::all(client.clone())
            .list(&ListParams::default())
            .await
            .expect("list nodes");
        assert!(
            nodes.items.is_empty(),
            "this cluster has nodes: the journey runs its pods under the test's kubelet, \
             on a control plane without nodes (../shared/k8s)"
        );
        let ns = TestNamespace::create(&client, prefix).await;
        let dir = Scratch::new(prefix);
        let mut ports = ports.to_vec();
        ports.extend([mysql_port(), port_of(redis_url()), port_of(broker())]);
        let kubelet =
            Kubelet::start(client.clone(), &ns.name, &dir.0.join("kubelet"), &ports).await;
        let helm = crate::chart::helm().to_string_lossy().into_owned();
        Stage {
            client,
            ns,
            kubelet,
            helm,
            release: release.into(),
            _dir: dir,
        }
    }

    fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.ns.name)
    }

    /// Whether `name` is gone (None: the API server did not answer).
    async fn absent<K>(&self, name: &str) -> Option<bool>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + std::fmt::Debug
            + serde::de::DeserializeOwned,
        <K as kube::Resource>::DynamicType: Default,
    {
        Some(self.api::<K>().get_opt(name).await.ok()?.is_none())
    }

    /// The README's install step: `helm install` the chart, watching this
    /// namespace, and wait for the operator pods to be Ready (`--wait`:
    /// the kubelet reports their readiness probes).
    async fn helm_install(&self) {
        let ns = &self.ns.name;
        sh(
            &self.helm,
            &[
                "install",
                &self.release,
                "charts/outbox-operator",
                "--namespace",
                ns,
                "--set",
                &format!("watchNamespace={ns}"),
                // The other tests of this cluster applied the CRD first.
                "--take-ownership",
                "--wait",
                "--timeout",
                "120s",
            ],
        )
        .await
        .unwrap_or_else(|e| panic!("helm install: {e}\n{}", self.logs(&self.release)));
    }

    /// `helm uninstall --wait` of the release.
    async fn helm_uninstall(&self) {
        sh(
            &self.helm,
            &[
                "uninstall",
                &self.release,
                "--namespace",
                &self.ns.name,
                "--wait",
            ],
        )
        .await
        .unwrap_or_else(|e| panic!("helm uninstall: {e}"));
    }

    /// The operator's Lease holder: one of its pods.
    async fn operator_leader(&self) -> String {
        let leases: Api<Lease> = self.api();
        wait_for(
            "an operator pod holding the operator's Lease",
            Duration::from_secs(60),
            || async {
                let h = leases
                    .get_opt(&self.release)
                    .await
                    .ok()??
                    .spec?
                    .holder_identity?;
                self.kubelet
                    .running(&self.release)
                    .into_iter()
                    .find(|p| h.starts_with(&format!("{p}-")))
            },
        )
        .await
    }

    /// The relays' Lease holder (a running relay pod), other than `not`.
    async fn relay_leader(&self, within: Duration, not: &[String]) -> String {
        let leases: Api<Lease> = self.api();
        wait_for("a relay pod holding the relays' Lease", within, || async {
            let h = leases
                .get_opt("orders-relay-leader")
                .await
                .ok()??
                .spec?
                .holder_identity?;
            self.kubelet
                .running("orders-relay-")
                .into_iter()
                .find(|p| h.starts_with(&format!("{p}-")) && !not.contains(p))
        })
        .await
    }

    /// Waits for the two relay pods to run and one to hold the Lease: its name.
    async fn two_relay_pods_one_leads(&self) -> String {
        wait_for(
            "two relay pods running",
            Duration::from_secs(60),
            || async { (self.kubelet.running("orders-relay-").len() == 2).then_some(()) },
        )
        .await;
        self.relay_leader(Duration::from_secs(60), &[]).await
    }

    /// No relay pod's log holds `secret` or a panic; the relay ConfigMap
    /// configures `[section]`, not `[instead]`, and holds no `secret`.
    async fn secret_kept(&self, secret: &str, section: &str, instead: &str) {
        for p in self.kubelet.running("orders-relay-") {
            let logs = self.kubelet.logs(&p);
            assert!(!logs.contains(secret), "a secret in {p}'s log");
            assert!(!logs.contains("panicked"), "{p}:\n{logs}");
        }
        let cm = self
            .api::<ConfigMap>()
            .get("orders-relay")
            .await
            .expect("the relay ConfigMap");
        let toml = &cm.data.expect("data")["relay.toml"];
        assert!(
            toml.contains(&format!("[{section}]")) && !toml.contains(&format!("[{instead}]")),
            "{toml}"
        );
        assert!(!toml.contains(secret), "a secret in the ConfigMap");
    }

    /// Every pod's log, for a failure message.
    fn logs(&self, prefix: &str) -> String {
        self.kubelet
            .running(prefix)
            .iter()
            .map(|p| format!("--- {p}\n{}", self.kubelet.logs(p)))
            .collect()
    }

    /// `kubectl get outboxrelays`: (header, row of `orders`).
    async fn kubectl_get(&self) -> Option<(Vec<String>, Vec<String>)> {
        let out = sh("kubectl", &["get", "outboxrelays", "-n", &self.ns.name])
            .await
            .ok()?;
        let mut lines = out.lines();
        let split = |l: &str| l.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
        let header = split(lines.next()?);
        let row = split(lines.find(|l| l.starts_with("orders "))?);
        Some((header, row))
    }
}

/// A MySQL user of the test's own (its password is rotated).
async fn relay_user(db: &TestDb, user: &str, password: &str) {
    db.exec(&format!(
        "CREATE USER '{user}'@'%' IDENTIFIED BY '{password}'"
    ))
    .await;
    db.exec(&format!(
        "GRANT REPLICATION SLAVE, REPLICATION CLIENT, BINLOG MONITOR, SELECT ON *.* TO '{user}'@'%'"
    ))
    .await;
}

fn mysql_secret(password: &str) -> Secret {
    password_secret("orders-mysql", password)
}

fn password_secret(name: &str, password: &str) -> Secret {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "stringData": {"password": password},
    }))
    .expect("secret")
}

/// The OutboxRelay of the README's quick start, pointed at the test's services.
fn orders(f: &Fixture, user: &str) -> OutboxRelay {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "outboxrelay.dev/v1alpha1",
        "kind": "OutboxRelay",
        "metadata": {"name": "orders"},
        "spec": {
            "replicas": 2,
            "heartbeatInterval": "1s",
            "checkpointPolicy": "Delete",
            "startFrom": "earliest",
            "mysql": {
                "host": "127.0.0.1",
                "port": f.mysql_port,
                "user": user,
                "passwordSecret": {"name": "orders-mysql", "key": "password"},
                "outboxes": [{"database": f.db.name, "topic": f.topic}],
            },
            "kafka": {"bootstrapServers": broker()},
            "redis": {"url": redis_url(), "keyPrefix": "test:"},
        },
    }))
    .expect("OutboxRelay")
}

/// helm install → Secrets + OutboxRelay → two relay pods, one leads →
/// records reach Kafka → `kubectl get` shows READY, LEADER, POSITION, LAG →
/// the leader's process SIGKILLed: the standby leads within 5 s → the MySQL
/// password rotated: the relays roll and resume → every relay process dead:
/// Stalled within two heartbeats → OutboxRelay deleted: children and
/// checkpoint gone → helm uninstall. Every event counted by id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kubernetes API server: scripts/test.sh runs it (../shared/k8s or KUBECONFIG)"]
async fn the_user_journey_on_a_real_cluster() {
    let stage = Stage::new("obr-journey", "outbox-operator", &[]).await;
    let ns = stage.ns.name.clone();
    stage.helm_install().await;
    let op = stage.operator_leader().await;
    println!("operator pod leading: {op}");

    // The user's database, Secret and OutboxRelay.
    let f = Fixture::new("journey", mysql_port(), &["Order"], 3).await;
    let user = format!("j{}", &f.db.name[f.db.name.len() - 8..]);
    relay_user(&f.db, &user, "first-password").await;
    let secrets: Api<Secret> = stage.api();
    apply(&secrets, &mysql_secret("first-password")).await;
    let relays: Api<OutboxRelay> = stage.api();
    apply(&relays, &orders(&f, &user)).await;

    // Two relay pods, one leads; a writer; records reach Kafka.
    let leader = stage.two_relay_pods_one_leads().await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = steady_writer(f.db.clone(), stop.clone(), 1, 20, Duration::from_millis(10));
    read_topics(&f.topics, 50, Duration::from_secs(60)).await;

    // What `kubectl get outboxrelays` shows.
    let (header, row) = wait_for(
        "kubectl get outboxrelays: READY True, LAG at most 5 s",
        Duration::from_secs(60),
        || async {
            // The lag is the age of the oldest unacknowledged commit: on a
            // loaded machine it may pass 5 s for a moment, so poll for the
            // caught-up relay rather than judge one sample.
            let (h, r) = stage.kubectl_get().await?;
            (r.len() == h.len() && r[1] == "True" && r[4].parse::<u64>().is_ok_and(|s| s <= 5))
                .then_some((h, r))
        },
    )
    .await;
    assert_eq!(
        header,
        ["NAME", "READY", "LEADER", "POSITION", "LAG", "AGE"]
    );
    println!("kubectl get outboxrelays:\n  {header:?}\n  {row:?}");
    assert!(
        row[2].starts_with(&leader),
        "LEADER {} is not {leader}",
        row[2]
    );
    assert!(
        !row[3].is_empty() && row[3] != "<none>",
        "POSITION {}",
        row[3]
    );
    // Both relay pods Ready (the standby too), as the Deployment counts them.
    let deployments: Api<Deployment> = stage.api();
    wait_for(
        "the relay Deployment available",
        Duration::from_secs(30),
        || async {
            let st = deployments.get("orders-relay").await.ok()?.status?;
            (st.available_replicas == Some(2)).then_some(())
        },
    )
    .await;

    // The leader's process dies: the standby leads within 5 s.
    stage.kubelet.kill(&leader);
    let killed = Instant::now();
    let next = stage
        .relay_leader(Duration::from_secs(5), std::slice::from_ref(&leader))
        .await;
    println!(
        "{next} leads {:?} after {leader} was SIGKILLed",
        killed.elapsed()
    );
    wait_for(
        "the killed relay restarted",
        Duration::from_secs(30),
        || async {
            (stage.kubelet.restarts(&leader) == 1 && stage.kubelet.pid(&leader).is_some())
                .then_some(())
        },
    )
    .await;

    // The MySQL password rotated: new pods with the new Secret, streaming.
    let old = stage.kubelet.running("orders-relay-");
    f.db.exec(&format!(
        "ALTER USER '{user}'@'%' IDENTIFIED BY 'second-password'"
    ))
    .await;
    apply(&secrets, &mysql_secret("second-password")).await;
    wait_for("the relays rolled", Duration::from_secs(120), || async {
        let now = stage.kubelet.running("orders-relay-");
        (now.len() == 2 && now.iter().all(|p| !old.contains(p))).then_some(())
    })
    .await;
    let rolled = stage.relay_leader(Duration::from_secs(30), &old).await;
    println!("after the rotation {rolled} leads");
    let at_roll = f.db.max_id().await;
    wait_for(
        "rows written after the roll",
        Duration::from_secs(30),
        || async { (f.db.max_id().await > at_roll + 100).then_some(()) },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    writer.await.expect("writer");
    let rows = f.db.rows().await;
    let recs = read_topics(&f.topics, rows.len(), Duration::from_secs(120)).await;
    let report = check(&rows, &recs);
    println!("{} rows: {report:?}", rows.len());
    report.assert_complete();
    stage
        .secret_kept("second-password", "mysql", "postgres")
        .await;

    // Every relay process dead and kept dead: Stalled within two heartbeats.
    stage.kubelet.hold("orders-relay-");
    let dead = Instant::now();
    wait_for("Stalled", Duration::from_secs(10), || async {
        let r = relays.get("orders").await.ok()?;
        (condition(&r, "Stalled").is_some_and(|c| c.0 == "True")
            && condition(&r, "Ready").is_some_and(|c| c.0 == "False"))
        .then_some(())
    })
    .await;
    let stalled = dead.elapsed();
    println!("Stalled {stalled:?} after the last relay died (heartbeat 1 s)");
    // Two heartbeats, and the operator's reaction to the last report.
    assert!(
        stalled <= Duration::from_millis(3_500),
        "Stalled only {stalled:?} after the last relay died (heartbeat 1 s)"
    );

    // Deleted: the children and the checkpoint (checkpointPolicy: Delete) go.
    let relay_name = format!("{ns}.orders");
    assert!(
        checkpoint(&relay_name).await.is_some(),
        "no checkpoint before the deletion"
    );
    relays
        .delete("orders", &DeleteParams::default())
        .await
        .expect("delete the OutboxRelay");
    wait_for(
        "the OutboxRelay and its children gone",
        Duration::from_secs(60),
        || async {
            let gone = relays.get_opt("orders").await.ok()?.is_none()
                && deployments.get_opt("orders-relay").await.ok()?.is_none()
                && stage.absent::<ConfigMap>("orders-relay").await?
                && stage.absent::<ServiceAccount>("orders-relay").await?
                && stage.absent::<Role>("orders-relay").await?
                && stage.absent::<RoleBinding>("orders-relay").await?
                && stage.absent::<Service>("orders-relay").await?
                && stage.absent::<Lease>("orders-relay-leader").await?;
            gone.then_some(())
        },
    )
    .await;
    assert!(
        checkpoint(&relay_name).await.is_none(),
        "the checkpoint outlived its OutboxRelay"
    );

    // helm uninstall: the operator's pods go.
    stage.helm_uninstall().await;
    wait_for(
        "the operator's processes gone",
        Duration::from_secs(60),
        || async {
            stage
                .kubelet
                .running(&stage.release)
                .is_empty()
                .then_some(())
        },
    )
    .await;
}

/// The relays' Role missing one verb (`update` on their Lease): the relay
/// says so in its log and in the OutboxRelay's status, restarts, and
/// recovers once the operator restores its Role — proof that the pods act
/// with exactly the RBAC they were given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kubernetes API server: scripts/test.sh runs it (../shared/k8s or KUBECONFIG)"]
async fn a_role_missing_a_verb_fails_clearly() {
    let stage = Stage::new("obr-rbac", "rbac-operator", &[]).await;
    let ns = stage.ns.name.clone();
    stage.helm_install().await;
    stage.operator_leader().await;
    // The relay pods wait until the Role is edited.
    stage.kubelet.hold("orders-relay-");
    let f = Fixture::new("rbacneg", mysql_port(), &["Order"], 1).await;
    let user = format!("r{}", &f.db.name[f.db.name.len() - 8..]);
    relay_user(&f.db, &user, "the-password").await;
    apply(&stage.api::<Secret>(), &mysql_secret("the-password")).await;
    let relays: Api<OutboxRelay> = stage.api();
    let mut cr = orders(&f, &user);
    cr.spec.checkpoint_policy = None;
    apply(&relays, &cr).await;
    let roles: Api<Role> = stage.api();
    wait_for("the relays' Role", Duration::from_secs(60), || async {
        roles.get_opt("orders-relay").await.ok()?
    })
    .await;

    // The operator stopped (it would restore its Role), then the edit.
    let scale = |n: &'static str| {
        let ns = ns.clone();
        let deployment = format!("deployment/{}", stage.release);
        async move {
            sh(
                "kubectl",
                &["scale", &deployment, "--replicas", n, "-n", &ns],
            )
            .await
            .unwrap_or_else(|e| panic!("kubectl scale: {e}"))
        }
    };
    scale("0").await;
    wait_for(
        "the operator's processes gone",
        Duration::from_secs(60),
        || async {
            stage
                .kubelet
                .running(&stage.release)
                .is_empty()
                .then_some(())
        },
    )
    .await;
    let mut role = roles.get("orders-relay").await.expect("role");
    for rule in role.rules.iter_mut().flatten() {
        if rule.resources.as_deref() == Some(&["leases".to_owned()][..]) {
            rule.verbs.retain(|v| v != "update");
        }
    }
    roles
        .replace("orders-relay", &Default::default(), &role)
        .await
        .expect("edit the Role");
    stage.kubelet.release("orders-relay-");

    // A clear error in the relay's log and in the status.
    let pod = wait_for(
        "a relay log naming the forbidden Lease update",
        Duration::from_secs(60),
        || async {
            stage
                .kubelet
                .running("orders-relay-")
                .into_iter()
                .find(|p| {
                    let logs = stage.kubelet.logs(p);
                    logs.contains("forbidden") && logs.contains("leases") && logs.contains("update")
                })
        },
    )
    .await;
    let line = stage
        .kubelet
        .logs(&pod)
        .lines()
        .find(|l| l.contains("forbidden"))
        .map(str::to_owned)
        .unwrap_or_default();
    println!("relay log: {line}");
    let last_error = wait_for(
        "the error in the status",
        Duration::from_secs(30),
        || async {
            relays
                .get("orders")
                .await
                .ok()?
                .status?
                .last_error
                .filter(|e| e.contains("forbidden") && e.contains("leases"))
        },
    )
    .await;
    println!("status.lastError: {last_error}");
    assert!(
        last_error.contains("check the Role"),
        "the error names no fix: {last_error}"
    );
    wait_for("the relay restarted", Duration::from_secs(30), || async {
        (stage.kubelet.restarts(&pod) >= 1).then_some(())
    })
    .await;

    // The operator back: it restores its Role and the relays recover.
    scale("1").await;
    wait_for(
        "Ready after the Role is restored",
        Duration::from_secs(90),
        || async {
            let r = relays.get("orders").await.ok()?;
            (condition(&r, "Ready").is_some_and(|c| c.0 == "True")).then_some(())
        },
    )
    .await;
    relays
        .delete("orders", &DeleteParams::default())
        .await
        .expect("delete the OutboxRelay");
    stage.helm_uninstall().await;
}

/// The install with NATS JetStream as the sink: `spec.nats` with its password
/// from a Secret, and `spec.changes` capturing a plain table → two relay
/// pods, one leads and creates the stream → a writer → the leader's process
/// SIGKILLed, the standby leads → every row in the stream once (JetStream
/// drops the replays by `Nats-Msg-Id`), per-key order kept, the plain
/// table's insert and update as change events on their mapped subject →
/// the password in no pod's log and not in the ConfigMap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kubernetes API server: scripts/test.sh runs it (../shared/k8s or KUBECONFIG)"]
async fn a_nats_relay_on_a_real_cluster() {
    use crate::nats::{read_stream, PrivateNats, PASSWORD, USER};
    let servers = Scratch::new("obr-nats-server");
    let nats = PrivateNats::start(&servers.0);
    let stage = Stage::new("obr-nats", "nats-operator", &[nats.port]).await;
    stage.helm_install().await;
    stage.operator_leader().await;
    let f = Fixture::new("natsjourney", mysql_port(), &["Order"], 1).await;
    let user = format!("n{}", &f.db.name[f.db.name.len() - 8..]);
    relay_user(&f.db, &user, "the-password").await;
    f.db.exec("CREATE TABLE trades (id INT PRIMARY KEY, qty INT)")
        .await;
    let secrets: Api<Secret> = stage.api();
    apply(&secrets, &mysql_secret("the-password")).await;
    apply(&secrets, &password_secret("orders-nats", PASSWORD)).await;
    let stream = format!("ORDERS_{}", unique());
    let mut cr = orders(&f, &user);
    cr.spec.kafka = None;
    cr.spec.nats = Some(
        serde_json::from_value(serde_json::json!({
            "url": nats.url(),
            "stream": stream,
            "createStream": {"subjects": [format!("{}.>", f.db.name)]},
            "user": USER,
            "passwordSecret": {"name": "orders-nats", "key": "password"},
        }))
        .expect("spec.nats"),
    );
    let trades = format!("{}.trades", f.db.name);
    let transactions = format!("{}.transactions", f.db.name);
    cr.spec.changes = Some(
        serde_json::from_value(serde_json::json!({
            "tables": {&trades: ["insert", "update"]},
            "topicMap": {&trades: &transactions},
        }))
        .expect("spec.changes"),
    );
    let relays: Api<OutboxRelay> = stage.api();
    apply(&relays, &cr).await;

    let leader = stage.two_relay_pods_one_leads().await;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = steady_writer(f.db.clone(), stop.clone(), 1, 20, Duration::from_millis(10));
    let events = |min: u64| {
        let relays = relays.clone();
        async move {
            wait_for(
                "events acknowledged by JetStream, in the status",
                Duration::from_secs(60),
                || async {
                    let st = relays.get("orders").await.ok()?.status?;
                    st.events.filter(|n| *n >= min).map(|_| ())
                },
            )
            .await
        }
    };
    events(100).await;

    stage.kubelet.kill(&leader);
    let next = stage
        .relay_leader(Duration::from_secs(10), std::slice::from_ref(&leader))
        .await;
    println!("{next} leads after {leader} was SIGKILLed");
    let at_kill = f.db.max_id().await;
    wait_for(
        "rows written after the failover",
        Duration::from_secs(30),
        || async { (f.db.max_id().await > at_kill + 100).then_some(()) },
    )
    .await;
    f.db.exec("INSERT INTO trades VALUES (1, 5)").await;
    f.db.exec("UPDATE trades SET qty = 6 WHERE id = 1").await;
    stop.store(true, Ordering::Relaxed);
    writer.await.expect("writer");
    let rows = f.db.rows().await;
    let all = read_stream(&nats.jetstream().await, &stream, rows.len() + 2).await;
    let (changes, recs): (Vec<Rec>, Vec<Rec>) =
        all.into_iter().partition(|r| r.topic == transactions);
    let actions: Vec<String> = changes
        .iter()
        .map(|r| {
            let e: serde_json::Value =
                serde_json::from_slice(r.value.as_deref().unwrap_or_default()).expect("envelope");
            format!("{} {}", e["action"], e["data"]["qty"])
        })
        .collect();
    assert_eq!(
        actions,
        ["\"insert\" 5", "\"update\" 6"],
        "change events of trades"
    );
    let report = check(&rows, &recs);
    println!("{} rows through NATS: {report:?}", rows.len());
    report.assert_complete();
    assert_eq!(
        report.duplicates, 0,
        "JetStream should have dropped every replay"
    );

    stage.secret_kept(PASSWORD, "nats", "kafka").await;

    relays
        .delete("orders", &DeleteParams::default())
        .await
        .expect("delete the OutboxRelay");
    stage.helm_uninstall().await;
}

/// The PostgreSQL install, from the sample (`spec.postgres` with the
/// Debezium column preset, password from a Secret): two relay pods, one
/// leads and creates the slot and publication → the Debezium demo's flow
/// under a writer (a user and its outbox row in one transaction, every third
/// with a `pg_logical_emit_message` outbox event) → `kubectl get` shows the
/// LSN, the status the slot's retained WAL → the leader's process SIGKILLed:
/// the standby takes the slot and leads → every event by id → the password
/// in no pod's log and not in the ConfigMap → the OutboxRelay deleted: the
/// operator's pod drops the slot and the publication (`checkpointPolicy:
/// Delete`, with the chart's RBAC) → helm uninstall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a Kubernetes API server: scripts/test.sh runs it (../shared/k8s or KUBECONFIG)"]
async fn a_postgres_relay_on_a_real_cluster() {
    use crate::postgres::{writer, PgDb};
    let port = pg_port();
    let stage = Stage::new("obr-pg", "pg-operator", &[port]).await;
    let ns = stage.ns.name.clone();
    stage.helm_install().await;
    stage.operator_leader().await;
    let db = Arc::new(PgDb::new("pgjourney", port).await);
    let topics = vec![format!("{}.User", db.name)];
    create_topics(&topics, 3).await;
    let secrets: Api<Secret> = stage.api();
    apply(&secrets, &password_secret("users-postgres", RELAY_PASSWORD)).await;
    let mut cr = crate::kube::sample::<OutboxRelay>("outboxrelay-postgres.yaml").remove(0);
    cr.metadata.name = Some("orders".into());
    cr.spec.replicas = 2;
    cr.spec.heartbeat_interval = Some("1s".into());
    let pg = cr.spec.postgres.as_mut().expect("spec.postgres");
    pg.host = "127.0.0.1".into();
    pg.port = Some(port as i32);
    pg.database = db.name.clone();
    pg.outboxes[0].topic = Some(format!("{}.{{aggregate_type}}", db.name));
    cr.spec
        .kafka
        .as_mut()
        .expect("spec.kafka")
        .bootstrap_servers = broker().into();
    cr.spec.redis.url = redis_url().into();
    cr.spec.redis.key_prefix = Some("test:".into());
    let relays: Api<OutboxRelay> = stage.api();
    apply(&relays, &cr).await;

    let leader = stage.two_relay_pods_one_leads().await;
    // The leader's slot starts the stream: what commits before it exists is
    // not relayed (README, "Objects it creates").
    let slot =
        outbox_relay::keys::pg_object_name(&outbox_operator::cleanup::relay_name(&ns, "orders"));
    let exists = |sql: &'static str| {
        let (db, slot) = (db.clone(), slot.clone());
        async move {
            pg_connect(port, "app", "app-password", &db.name)
                .await
                .query_opt(sql, &[&slot])
                .await
                .expect("query")
                .is_some()
        }
    };
    let slot_sql = "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1";
    let publication_sql = "SELECT 1 FROM pg_publication WHERE pubname = $1";
    wait_for("the leader's slot", Duration::from_secs(60), || async {
        exists(slot_sql).await.then_some(())
    })
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let writing = writer(db.clone(), stop.clone());
    let (header, row) = wait_for(
        "kubectl get outboxrelays: READY True, an LSN, LAG at most 5 s",
        Duration::from_secs(60),
        || async {
            let (h, r) = stage.kubectl_get().await?;
            (r.len() == h.len()
                && r[1] == "True"
                && r[3].contains('/')
                && r[4].parse::<u64>().is_ok_and(|s| s <= 5))
            .then_some((h, r))
        },
    )
    .await;
    println!("kubectl get outboxrelays:\n  {header:?}\n  {row:?}");
    assert!(
        row[2].starts_with(&leader),
        "LEADER {} is not {leader}",
        row[2]
    );
    let status = wait_for(
        "events and the slot's retained WAL in the status",
        Duration::from_secs(60),
        || async {
            let st = relays.get("orders").await.ok()?.status?;
            (st.events? >= 100 && st.wal.is_some()).then_some(st)
        },
    )
    .await;
    let wal = status.wal.expect("status.wal");
    assert_eq!(wal.limit_bytes, 2_147_483_648, "the sample's limit");
    assert!(
        status.position.and_then(|p| p.lsn).is_some(),
        "status.position.lsn"
    );

    // The leader's process dies: the standby takes the slot and leads.
    stage.kubelet.kill(&leader);
    let next = stage
        .relay_leader(Duration::from_secs(10), std::slice::from_ref(&leader))
        .await;
    println!("{next} leads after {leader} was SIGKILLed");
    wait_for(
        "events acknowledged by the new leader (its own count)",
        Duration::from_secs(60),
        || async {
            let st = relays.get("orders").await.ok()?.status?;
            (st.leader?.pod.starts_with(&next) && st.events? >= 200).then_some(())
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let rows = writing.await.expect("writer");
    let recs = read_topics(&topics, rows.len(), Duration::from_secs(120)).await;
    let report = check(&rows, &recs);
    println!("{} events from PostgreSQL: {report:?}", rows.len());
    report.assert_complete();
    assert!(
        rows.iter().any(|(id, _)| *id >= 1_000_000),
        "no pg_logical_emit_message event written"
    );

    stage.secret_kept(RELAY_PASSWORD, "postgres", "mysql").await;

    // Deleted: the operator's pod drops the slot and the publication.
    assert!(exists(slot_sql).await, "the relay's slot {slot}");
    assert!(
        exists(publication_sql).await,
        "the relay's publication {slot}"
    );
    relays
        .delete("orders", &DeleteParams::default())
        .await
        .expect("delete the OutboxRelay");
    wait_for("the OutboxRelay gone", Duration::from_secs(120), || async {
        relays.get_opt("orders").await.ok()?.is_none().then_some(())
    })
    .await;
    assert!(!exists(slot_sql).await, "the slot outlived its OutboxRelay");
    assert!(
        !exists(publication_sql).await,
        "the publication outlived its OutboxRelay"
    );
    stage.helm_uninstall().await;
    let db = Arc::try_unwrap(db).unwrap_or_else(|_| panic!("db still shared"));
    db.drop_all(&slot).await;
}
