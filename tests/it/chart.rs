//! The Helm chart (rendered with the official helm binary), the generated
//! CRD copies, the plain-manifest install, and the Dockerfile.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use serde_json::{json, Value};

use crate::support::root;

const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The helm binary (installed by scripts/services.sh when missing).
pub fn helm() -> PathBuf {
    let out = Command::new(root().join("scripts/services.sh"))
        .arg("helm")
        .output()
        .expect("services.sh helm");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

pub fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.current_dir(root()).output().expect("run");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn template(args: &[&str]) -> Result<String, String> {
    run(Command::new(helm())
        .args(["template", "outbox-operator", "charts/outbox-operator"])
        .args(["--namespace", "outbox-system"])
        .args(args))
}

fn objects(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(yaml)
        .expect("rendered YAML")
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

fn find<'a>(objs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objs.iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the chart"))
}

/// (apiGroup, resource) → verbs, one entry per rule resource.
fn verbs(role: &Value) -> BTreeMap<String, Vec<String>> {
    let mut m = BTreeMap::new();
    for rule in role["rules"].as_array().expect("rules") {
        for g in rule["apiGroups"].as_array().expect("groups") {
            for r in rule["resources"].as_array().expect("resources") {
                let names = rule["resourceNames"]
                    .as_array()
                    .map(|n| {
                        format!(
                            "/{}",
                            n.iter()
                                .filter_map(Value::as_str)
                                .collect::<Vec<_>>()
                                .join(",")
                        )
                    })
                    .unwrap_or_default();
                let key = format!(
                    "{}:{}{names}",
                    g.as_str().unwrap_or(""),
                    r.as_str().unwrap_or("")
                );
                let v: Vec<String> = rule["verbs"]
                    .as_array()
                    .expect("verbs")
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect();
                m.insert(key, v);
            }
        }
    }
    m
}

fn expected_manage_verbs() -> BTreeMap<String, Vec<String>> {
    let apply = ["get", "list", "watch", "create", "patch"];
    let mut m = BTreeMap::new();
    let mut put = |k: &str, v: &[&str]| {
        m.insert(k.to_string(), v.iter().map(|s| s.to_string()).collect());
    };
    put(
        "outboxrelay.dev:outboxrelays",
        &["get", "list", "watch", "patch"],
    );
    put("outboxrelay.dev:outboxrelays/status", &["get", "patch"]);
    put("outboxrelay.dev:outboxrelays/finalizers", &["update"]);
    put(":secrets", &["get", "list", "watch"]);
    for k in [
        ":configmaps",
        ":serviceaccounts",
        ":services",
        "apps:deployments",
        "rbac.authorization.k8s.io:roles",
        "rbac.authorization.k8s.io:rolebindings",
        "policy:poddisruptionbudgets",
    ] {
        put(k, &apply);
    }
    put(
        "coordination.k8s.io:leases",
        &["get", "list", "watch", "create", "patch", "update"],
    );
    put("events.k8s.io:events", &["create", "patch"]);
    m
}

#[test]
fn chart_lints_and_renders_least_privilege_secure_and_versioned() {
    run(Command::new(helm()).args(["lint", "--strict", "charts/outbox-operator"]))
        .unwrap_or_else(|e| panic!("helm lint: {e}"));
    let objs = objects(&template(&[]).expect("helm template"));

    // Chart, images and the operator's default relay image share one version.
    let chart: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(root().join("charts/outbox-operator/Chart.yaml"))
            .expect("Chart.yaml"),
    )
    .expect("Chart.yaml parses");
    assert_eq!(
        (chart["version"].as_str(), chart["appVersion"].as_str()),
        (Some(VERSION), Some(VERSION))
    );
    let d = find(&objs, "Deployment", "outbox-operator");
    let pod = &d["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(
        c["image"],
        format!("ghcr.io/outbox-relay-operator/outbox-operator:{VERSION}")
    );
    let env: BTreeMap<&str, &Value> = c["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| (e["name"].as_str().unwrap_or(""), e))
        .collect();
    let relay_image = format!("ghcr.io/outbox-relay-operator/outbox-relay:{VERSION}");
    assert_eq!(env["RELAY_IMAGE"]["value"], relay_image.as_str());
    assert!(!env.contains_key("WATCH_NAMESPACE"));
    let help =
        run(Command::new(root().join("target/debug/outbox-operator")).args(["run", "--help"]))
            .expect("outbox-operator run --help");
    assert!(
        help.contains(&relay_image),
        "the operator's default relay image: {help}"
    );
    assert_eq!(d["spec"]["replicas"], 2);

    // Security context: non-root, read-only root, no escalation, no capabilities.
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["runAsUser"], 65532);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");

    // RBAC: exactly what the operator needs.
    assert_eq!(
        verbs(find(&objs, "ClusterRole", "outbox-operator")),
        expected_manage_verbs()
    );
    let crd_read = verbs(find(&objs, "ClusterRole", "outbox-operator-crd"));
    assert_eq!(
        crd_read,
        BTreeMap::from([(
            "apiextensions.k8s.io:customresourcedefinitions/outboxrelays.outboxrelay.dev"
                .to_string(),
            vec!["get".to_string(), "list".to_string(), "watch".to_string()]
        )])
    );
    let leader = verbs(find(&objs, "Role", "outbox-operator-leader"));
    assert_eq!(
        leader["coordination.k8s.io:leases/outbox-operator"],
        ["get", "update", "watch"]
    );
    assert_eq!(leader["coordination.k8s.io:leases"], ["create"]);
    let sa = &find(&objs, "ClusterRoleBinding", "outbox-operator")["subjects"][0];
    assert_eq!(
        (sa["name"].as_str(), sa["namespace"].as_str()),
        (Some("outbox-operator"), Some("outbox-system"))
    );

    // The CRD: the generated one, kept on uninstall.
    let crd = find(
        &objs,
        "CustomResourceDefinition",
        "outboxrelays.outboxrelay.dev",
    );
    assert_eq!(
        crd["metadata"]["annotations"]["helm.sh/resource-policy"],
        "keep"
    );
    let generated: Value =
        serde_saphyr::from_str(&outbox_operator::crd_yaml().expect("crd")).expect("crd yaml");
    assert!(
        crd["spec"] == generated["spec"],
        "the chart's CRD differs from `outbox-operator crd`"
    );
    assert!(objs.iter().all(|o| o["kind"] != "ServiceMonitor"));
    find(&objs, "PodDisruptionBudget", "outbox-operator");
    find(&objs, "Service", "outbox-operator-metrics");
}

#[test]
fn chart_values_change_scope_images_and_extras_and_bad_values_fail_clearly() {
    let objs = objects(
        &template(&[
            "--set",
            "watchNamespace=shop",
            "--set",
            "crd.install=false",
            "--set",
            "image.tag=9.9.9",
            "--set",
            "relayImage.repository=registry.example/relay",
            "--set",
            "metrics.serviceMonitor.enabled=true",
            "--set",
            "podDisruptionBudget.enabled=false",
            "--set",
            "replicaCount=3",
        ])
        .expect("helm template"),
    );
    // One namespace: a Role there, no cluster-wide management rights.
    let role = find(&objs, "Role", "outbox-operator");
    assert_eq!(role["metadata"]["namespace"], "shop");
    assert_eq!(verbs(role), expected_manage_verbs());
    assert!(!objs
        .iter()
        .any(|o| o["kind"] == "ClusterRole" && o["metadata"]["name"] == "outbox-operator"));
    assert_eq!(
        find(&objs, "RoleBinding", "outbox-operator")["metadata"]["namespace"],
        "shop"
    );
    let d = find(&objs, "Deployment", "outbox-operator");
    let c = &d["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        c["image"],
        "ghcr.io/outbox-relay-operator/outbox-operator:9.9.9"
    );
    let env = c["env"].as_array().expect("env");
    let get = |n: &str| {
        env.iter()
            .find(|e| e["name"] == n)
            .map(|e| e["value"].clone())
    };
    assert_eq!(get("WATCH_NAMESPACE"), Some(json!("shop")));
    assert_eq!(
        get("RELAY_IMAGE"),
        Some(json!(format!("registry.example/relay:{VERSION}")))
    );
    assert_eq!(d["spec"]["replicas"], 3);
    assert!(objs.iter().all(|o| o["kind"] != "CustomResourceDefinition"));
    assert!(objs.iter().all(|o| o["kind"] != "PodDisruptionBudget"));
    find(&objs, "ServiceMonitor", "outbox-operator");

    // values.schema.json: a bad value fails at install, naming it.
    for (set, field) in [
        ("replicaCount=0", "/replicaCount"),
        ("logFormat=xml", "/logFormat"),
        ("watchNamespace=Not_A_Namespace", "/watchNamespace"),
        ("imagee.tag=1", "imagee"),
    ] {
        let e = template(&["--set", set]).expect_err(set);
        assert!(e.contains(field), "{set}: {e}");
    }
}

/// The chart's CRD copy and the plain install manifests are generated; a
/// stale copy fails here (regenerate with scripts/generate.sh).
#[test]
fn generated_copies_are_current() {
    let crd = outbox_operator::crd_yaml().expect("crd");
    for f in [
        "crds/outboxrelays.yaml",
        "charts/outbox-operator/files/outboxrelays.yaml",
    ] {
        let text = std::fs::read_to_string(root().join(f)).expect(f);
        assert!(text == crd, "{f} is stale: run scripts/generate.sh");
    }
    let rendered = template(&[]).expect("helm template");
    let install = std::fs::read_to_string(root().join("config/install/outbox-operator.yaml"))
        .expect("install manifest");
    assert!(
        install == rendered,
        "config/install/outbox-operator.yaml is stale: run scripts/generate.sh"
    );
    let out = run(Command::new("kubectl").args(["kustomize", "config/install"]))
        .unwrap_or_else(|e| panic!("kubectl kustomize config/install: {e}"));
    let objs = objects(&out);
    assert!(objs
        .iter()
        .any(|o| o["kind"] == "Namespace" && o["metadata"]["name"] == "outbox-system"));
    find(&objs, "Deployment", "outbox-operator");
}

/// The Dockerfile builds both binaries in a release stage and ships each in
/// a minimal non-root runtime with its entrypoint.
#[test]
fn dockerfile_has_the_expected_stages_user_and_entrypoints() {
    let text = std::fs::read_to_string(root().join("Dockerfile")).expect("Dockerfile");
    let mut stages: Vec<(String, Vec<String>)> = Vec::new();
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        if let Some(rest) = line.strip_prefix("FROM ") {
            let name = rest.rsplit(" AS ").next().unwrap_or(rest).to_string();
            stages.push((name, vec![rest.to_string()]));
        } else if let Some((_, lines)) = stages.last_mut() {
            lines.push(line.to_string());
        }
    }
    let names: Vec<&str> = stages.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["build", "runtime", "relay", "operator"]);
    let stage = |n: &str| {
        stages
            .iter()
            .find(|(s, _)| s == n)
            .map(|(_, l)| l.join("\n"))
            .unwrap_or_default()
    };
    let build = stage("build");
    assert!(
        build.contains("cargo build --release --locked --bin outbox-relay --bin outbox-operator"),
        "{build}"
    );
    let runtime = stage("runtime");
    assert!(
        runtime.starts_with("debian:bookworm-slim AS runtime")
            && runtime.contains("USER 65532:65532"),
        "{runtime}"
    );
    assert!(stage("relay").starts_with("runtime AS relay"));
    assert!(stage("relay").contains(r#"ENTRYPOINT ["/usr/local/bin/outbox-relay"]"#));
    assert!(stage("operator").starts_with("runtime AS operator"));
    assert!(stage("operator").contains(r#"ENTRYPOINT ["/usr/local/bin/outbox-operator"]"#));
    assert!(stage("operator").contains(r#"CMD ["run"]"#));
    // The toolchain the image builds with is the one CI tests.
    let rustc = run(Command::new("rustc").arg("--version")).expect("rustc");
    let minor = rustc
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.rsplit_once('.'))
        .map(|(mm, _)| mm.to_string())
        .expect("version");
    assert!(
        build.starts_with(&format!("rust:{minor}-bookworm AS build")),
        "{build} vs {rustc}"
    );
}

/// Every field of the OutboxRelay spec (down to three levels; the standard
/// Kubernetes types only by name) is in README's reference table.
#[test]
fn readme_reference_lists_every_crd_field() {
    const STANDARD: [&str; 4] = ["affinity", "tolerations", "resources", "nodeSelector"];
    fn walk(path: &str, node: &Value, depth: usize, out: &mut Vec<String>) {
        let props = if node["type"] == "array" {
            &node["items"]["properties"]
        } else {
            &node["properties"]
        };
        let Some(props) = props.as_object() else {
            return;
        };
        if depth >= 3 {
            return;
        }
        for (k, v) in props {
            let p = format!("{path}.{k}");
            if !STANDARD.contains(&k.as_str())
                && !(path.ends_with("Secret")
                    || k == "columns"
                    || k == "topicMap"
                    || k == "properties"
                    || k == "secretProperties"
                    || k == "podAnnotations"
                    || k == "podLabels")
            {
                walk(&p, v, depth + 1, out);
            }
            out.push(p);
        }
    }
    let crd: Value =
        serde_saphyr::from_str(&outbox_operator::crd_yaml().expect("crd")).expect("yaml");
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let mut fields = Vec::new();
    walk("spec", spec, 0, &mut fields);
    assert!(fields.len() > 30, "{fields:?}");
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README");
    let missing: Vec<&String> = fields
        .iter()
        .filter(|f| !readme.contains(&format!("`{f}`")))
        .filter(|f| {
            // A parent listed through its children (`spec.mysql` via `spec.mysql.host`).
            !readme.contains(&format!("`{f}."))
        })
        .collect();
    assert!(
        missing.is_empty(),
        "README's OutboxRelay reference misses {missing:?}"
    );
}
