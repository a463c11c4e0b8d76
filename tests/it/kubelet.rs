//! Test infrastructure, not a part of the product: a small kubelet for the
//! control plane of `../shared/k8s`, which has none (its Pods stay
//! Pending). It runs this project's pods as processes on this machine and
//! honours their spec, so that a wiring mistake in the chart or in the
//! operator's Deployment fails a test:
//!
//! - it watches the Pods of one namespace and runs each container's image
//!   (`outbox-operator` or `outbox-relay`: the workspace's built binaries)
//!   with the pod's command/args — or the image's entrypoint and CMD, as in
//!   the Dockerfile — and with exactly the pod's env: `value`,
//!   `secretKeyRef`, `configMapKeyRef` and `fieldRef` (name, namespace, uid,
//!   service account, pod IP) resolved, plus what a kubelet adds
//!   (`KUBERNETES_SERVICE_HOST/PORT`, `HOSTNAME`);
//! - each pod runs in its own mount and network namespace (`unshare`):
//!   ConfigMap, Secret, projected and emptyDir volumes are materialised in a
//!   scratch directory and bind-mounted at the pod's mount paths (read-only
//!   where asked), so the process reads exactly the paths its spec names;
//!   its loopback has the pod's own ports, and the ports of the API server
//!   and of the test's services are bridged to the host's (`socat` over Unix
//!   sockets, as `../shared/k8s/netns-run.sh` does);
//! - the ServiceAccount token is a TokenRequest for the pod's
//!   ServiceAccount, bound to the pod, mounted where the admission plugin's
//!   projected volume says (`/var/run/secrets/kubernetes.io/serviceaccount`):
//!   the process builds its in-cluster client from it and acts with exactly
//!   the RBAC that the chart or the operator granted — never as admin;
//! - the process runs as the securityContext's user and group, with no
//!   capabilities and `no_new_privs`; `runAsNonRoot` without a user is
//!   refused, as a kubelet refuses it;
//! - it reports the pod Running, its IP, and the Ready condition from the
//!   readiness probe (httpGet, honouring period, timeout and thresholds);
//!   a failing liveness probe or an exited process is restarted
//!   (`restartPolicy: Always`, 1 s back-off instead of a kubelet's 10 s) and
//!   counted in `restartCount`; a deleted pod's process gets SIGTERM, then
//!   SIGKILL after the grace period.
//!
//! Not a kubelet: no image pulls (two known images), no scheduler or Node
//! (pods stay unbound, so the API server deletes them at once and the
//! process is stopped afterwards), no cgroups, the root filesystem is the
//! host's (mount paths are created there as empty directories), no
//! `$(VAR)` expansion in command/args/env, volumes and tokens written once
//! per container start (a token lasts an hour, longer than any test).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Pod, Probe, Secret, ServiceAccount, Volume, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use crate::support::{operator_bin, relay_bin};

/// What the test can ask of a running pod.
#[derive(Default)]
struct PodState {
    pid: Option<u32>,
    restarts: u32,
}

type Pods = Arc<Mutex<HashMap<String, PodState>>>;
/// Per pod: the sender whose drop stops it.
type Stops = Arc<Mutex<HashMap<String, watch::Sender<()>>>>;

pub struct Kubelet {
    pods: Pods,
    sockets: PathBuf,
    held: Arc<Mutex<Vec<String>>>,
    dir: PathBuf,
    watch: tokio::task::JoinHandle<()>,
    stops: Stops,
    bridges: Vec<tokio::process::Child>,
}

/// Settings every pod of this kubelet shares.
struct Node {
    client: Client,
    namespace: String,
    dir: PathBuf,
    /// Unix sockets (a short path: sun_path holds 107 bytes).
    sockets: PathBuf,
    api: (String, u16),
    ca: String,
    bridged: Vec<u16>,
    pods: Pods,
    /// Name prefixes of pods not to run (their node is gone).
    held: Arc<Mutex<Vec<String>>>,
    images: Vec<Image>,
}

impl Node {
    /// The host's end of the bridge to its loopback port `p`.
    fn host_sock(&self, p: u16) -> PathBuf {
        self.sockets.join(format!("host-{p}.sock"))
    }

    /// The host's way to the pod's port `p` (probes).
    fn pod_sock(&self, ip: &str, p: i32) -> PathBuf {
        self.sockets.join(format!("{ip}-{p}.sock"))
    }

    fn held(&self, pod: &str) -> bool {
        self.held
            .lock()
            .expect("held")
            .iter()
            .any(|p| pod.starts_with(p))
    }
}

/// An image the harness can run: the binary it holds and its entrypoint/CMD.
struct Image {
    repository: &'static str,
    entrypoint: &'static str,
    cmd: &'static [&'static str],
    binary: PathBuf,
}

impl Kubelet {
    /// Runs the pods of `namespace` from now on, writing their files and logs
    /// under `dir`; `ports` are the host's loopback ports (the test's
    /// services) that every pod reaches at the same address.
    pub async fn start(client: Client, namespace: &str, dir: &Path, ports: &[u16]) -> Kubelet {
        let (api, ca) = api_server();
        let images = vec![
            Image {
                repository: "outbox-operator",
                entrypoint: "/usr/local/bin/outbox-operator",
                cmd: &["run"],
                binary: operator_bin(),
            },
            Image {
                repository: "outbox-relay",
                entrypoint: "/usr/local/bin/outbox-relay",
                cmd: &[],
                binary: relay_bin(),
            },
        ];
        std::fs::create_dir_all(dir).expect("kubelet dir");
        let sockets = std::env::temp_dir().join(format!("kubelet-{}", crate::support::unique()));
        std::fs::create_dir_all(&sockets).expect("kubelet sockets dir");
        let mut bridged = vec![api.1];
        bridged.extend_from_slice(ports);
        // Host side of the bridges: one Unix socket per port, shared by the pods.
        let bridges = bridged
            .iter()
            .map(|p| {
                let sock = sockets.join(format!("host-{p}.sock"));
                tokio::process::Command::new("socat")
                    .arg(format!("UNIX-LISTEN:{},fork,unlink-early", sock.display()))
                    .arg(format!("TCP:127.0.0.1:{p}"))
                    .stderr(
                        std::fs::File::create(dir.join(format!("bridge-{p}.log")))
                            .expect("bridge log"),
                    )
                    .kill_on_drop(true)
                    .spawn()
                    .expect("socat (the kubelet's bridges need it)")
            })
            .collect();
        for p in &bridged {
            let sock = sockets.join(format!("host-{p}.sock"));
            crate::support::wait_for(
                "the kubelet's bridge sockets",
                Duration::from_secs(10),
                || async { sock.exists().then_some(()) },
            )
            .await;
        }
        let pods: Pods = Arc::default();
        let held: Arc<Mutex<Vec<String>>> = Arc::default();
        let stops: Stops = Arc::default();
        let node = Arc::new(Node {
            client: client.clone(),
            namespace: namespace.to_owned(),
            dir: dir.to_owned(),
            sockets,
            api,
            ca,
            bridged,
            pods: pods.clone(),
            held: held.clone(),
            images,
        });
        let sockets = node.sockets.clone();
        let watch = tokio::spawn(watch_pods(node, stops.clone()));
        Kubelet {
            pods,
            sockets,
            held,
            dir: dir.to_owned(),
            watch,
            stops,
            bridges,
        }
    }

    /// The running pods (name order) whose names start with `prefix`.
    pub fn running(&self, prefix: &str) -> Vec<String> {
        let pods = self.pods.lock().expect("pods");
        let mut v: Vec<String> = pods
            .iter()
            .filter(|(n, s)| n.starts_with(prefix) && s.pid.is_some())
            .map(|(n, _)| n.clone())
            .collect();
        v.sort();
        v
    }

    /// The pid of the pod's process, if it runs.
    pub fn pid(&self, pod: &str) -> Option<u32> {
        self.pods.lock().expect("pods").get(pod)?.pid
    }

    pub fn restarts(&self, pod: &str) -> u32 {
        self.pods
            .lock()
            .expect("pods")
            .get(pod)
            .map_or(0, |s| s.restarts)
    }

    /// SIGKILLs the pod's process (it is restarted, as a crashed container).
    pub fn kill(&self, pod: &str) {
        if let Some(pid) = self.pid(pod) {
            signal("KILL", &pid.to_string());
        }
    }

    /// Runs no pod whose name starts with `prefix`, from now on, until
    /// `release`: running ones are SIGKILLed and not restarted (their node
    /// is gone; the pods stay as they are).
    pub fn hold(&self, prefix: &str) {
        self.held.lock().expect("held").push(prefix.to_owned());
        for (name, s) in self.pods.lock().expect("pods").iter() {
            if let (true, Some(pid)) = (name.starts_with(prefix), s.pid) {
                signal("KILL", &pid.to_string());
            }
        }
    }

    /// Runs the pods `hold` kept from running.
    pub fn release(&self, prefix: &str) {
        self.held.lock().expect("held").retain(|p| p != prefix);
    }

    /// Everything the pod's container wrote, over all its restarts.
    pub fn logs(&self, pod: &str) -> String {
        std::fs::read_to_string(self.dir.join(pod).join("container.log")).unwrap_or_default()
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.watch.abort();
        // Dropping the senders stops the pods; kill what still runs.
        self.stops.lock().expect("stops").clear();
        for s in self.pods.lock().expect("pods").values() {
            if let Some(pid) = s.pid {
                signal("KILL", &format!("-{pid}"));
            }
        }
        for b in &mut self.bridges {
            let _ = b.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.sockets);
    }
}

fn signal(sig: &str, target: &str) {
    let _ = std::process::Command::new("kill")
        .args([&format!("-{sig}"), "--", target])
        .stderr(std::process::Stdio::null())
        .status();
}

/// The API server of `KUBECONFIG`: (host, port) and its CA (PEM).
fn api_server() -> ((String, u16), String) {
    let cluster = crate::kube::current_cluster()
        .cluster
        .expect("KUBECONFIG's current cluster");
    let server: http::Uri = cluster
        .server
        .as_deref()
        .expect("cluster server")
        .parse()
        .expect("server URL");
    let host = server.host().expect("server host").to_owned();
    assert!(
        host == "127.0.0.1",
        "the kubelet harness serves a control plane on this machine's loopback, not {host}"
    );
    let ca = match (
        &cluster.certificate_authority_data,
        &cluster.certificate_authority,
    ) {
        (Some(data), _) => String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(data.trim())
                .expect("certificate-authority-data is base64"),
        )
        .expect("certificate-authority-data is PEM"),
        (None, Some(file)) => std::fs::read_to_string(file).expect("certificate-authority file"),
        (None, None) => panic!("KUBECONFIG's cluster has no CA"),
    };
    ((host, server.port_u16().unwrap_or(443)), ca)
}

async fn watch_pods(node: Arc<Node>, stops: Stops) {
    let pods: Api<Pod> = Api::namespaced(node.client.clone(), &node.namespace);
    let mut events = watcher(pods, watcher::Config::default()).boxed();
    let mut next_ip = 10u8;
    // The pods of a (re)list: those not in it were deleted meanwhile.
    let mut listed: Vec<String> = Vec::new();
    while let Some(event) = events.next().await {
        let pod = match event {
            Ok(watcher::Event::Init) => {
                listed.clear();
                continue;
            }
            Ok(watcher::Event::InitDone) => {
                stops
                    .lock()
                    .expect("stops")
                    .retain(|name, _| listed.contains(name));
                continue;
            }
            Ok(watcher::Event::InitApply(p)) => {
                listed.push(p.name_any());
                p
            }
            Ok(watcher::Event::Apply(p)) => p,
            Ok(watcher::Event::Delete(p)) => {
                stops.lock().expect("stops").remove(&p.name_any());
                continue;
            }
            Err(e) => {
                eprintln!("kubelet: watch: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let name = pod.name_any();
        let mut stops = stops.lock().expect("stops");
        if pod.metadata.deletion_timestamp.is_some() {
            stops.remove(&name);
        } else if !stops.contains_key(&name) {
            let (tx, rx) = watch::channel(());
            stops.insert(name.clone(), tx);
            next_ip = next_ip.wrapping_add(1).max(10);
            let ip = format!("10.244.0.{next_ip}");
            node.pods
                .lock()
                .expect("pods")
                .insert(name, PodState::default());
            tokio::spawn(run_pod(node.clone(), pod, ip, rx));
        }
    }
}

/// What the pod's status says about its one container.
#[derive(Default, Clone)]
struct Shown {
    started: Option<Time>,
    ready: bool,
    restarts: u32,
    waiting: Option<(String, String)>,
    last_exit: Option<i32>,
}

async fn report(node: &Node, pod: &Pod, c: &Container, ip: &str, s: &Shown) {
    let now = Time(Timestamp::now());
    let ready = if s.ready { "True" } else { "False" };
    let cond =
        |t: &str, v: &str| serde_json::json!({"type": t, "status": v, "lastTransitionTime": now});
    let state = match (&s.waiting, &s.started) {
        (Some((reason, message)), _) => {
            serde_json::json!({"waiting": {"reason": reason, "message": message}})
        }
        (None, Some(t)) => serde_json::json!({"running": {"startedAt": t}}),
        (None, None) => serde_json::json!({"waiting": {"reason": "ContainerCreating"}}),
    };
    let last = s.last_exit.map_or(
        serde_json::json!({}),
        |code| serde_json::json!({"terminated": {"exitCode": code, "finishedAt": now}}),
    );
    let patch = serde_json::json!({"status": {
        "phase": if s.started.is_some() { "Running" } else { "Pending" },
        "hostIP": "127.0.0.1",
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "startTime": now,
        "conditions": [
            cond("PodScheduled", "True"),
            cond("Initialized", "True"),
            cond("ContainersReady", ready),
            cond("Ready", ready),
        ],
        "containerStatuses": [{
            "name": c.name,
            "image": c.image,
            "imageID": "",
            "ready": s.ready,
            "started": s.started.is_some() && s.waiting.is_none(),
            "restartCount": s.restarts,
            "state": state,
            "lastState": last,
        }],
    }});
    let pods: Api<Pod> = Api::namespaced(node.client.clone(), &node.namespace);
    let _ = pods
        .patch_status(
            &pod.name_any(),
            &PatchParams::default(),
            &Patch::Merge(patch),
        )
        .await;
}

/// Runs one pod until it is deleted (its stop sender dropped).
async fn run_pod(node: Arc<Node>, pod: Pod, ip: String, mut stop: watch::Receiver<()>) {
    let name = pod.name_any();
    let spec = pod.spec.clone().expect("pod spec");
    let [c] = &spec.containers[..] else {
        panic!(
            "kubelet harness: pod {name} has {} containers; this project's pods have one",
            spec.containers.len()
        );
    };
    let dir = node.dir.join(&name);
    std::fs::create_dir_all(&dir).expect("pod dir");
    let log = dir.join("container.log");
    let mut shown = Shown::default();
    let grace = spec.termination_grace_period_seconds.unwrap_or(30) as u64;
    loop {
        if stop.has_changed().is_err() {
            break;
        }
        if node.held(&name) {
            if tokio::time::timeout(Duration::from_millis(200), stop.changed())
                .await
                .is_ok()
            {
                break;
            }
            continue;
        }
        // Everything the container needs, or a Waiting reason (retried, as a kubelet does).
        let prepared = prepare(&node, &pod, c, &ip, &dir).await;
        let (script, env) = match prepared {
            Ok(p) => p,
            Err((reason, message)) => {
                append(&log, &format!("kubelet: {reason}: {message}\n"));
                shown.waiting = Some((reason, message));
                report(&node, &pod, c, &ip, &shown).await;
                if tokio::time::timeout(Duration::from_secs(1), stop.changed())
                    .await
                    .is_ok()
                {
                    break;
                }
                continue;
            }
        };
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("container log");
        let mut child = tokio::process::Command::new("unshare")
            .args([
                "--mount",
                "--net",
                "--propagation",
                "private",
                "--",
                "bash",
                "-c",
            ])
            .arg(&script)
            .arg(&name)
            .env_clear()
            .envs(env)
            .current_dir("/")
            .process_group(0)
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone().expect("log fd"))
            .stderr(out)
            .spawn()
            .expect("unshare");
        let pid = child.id().expect("pid");
        node.pods
            .lock()
            .expect("pods")
            .entry(name.clone())
            .or_default()
            .pid = Some(pid);
        shown.started = Some(Time(Timestamp::now()));
        shown.waiting = None;
        shown.ready = false;
        report(&node, &pod, c, &ip, &shown).await;

        let probes = tokio::spawn(probe(
            node.clone(),
            pod.clone(),
            c.clone(),
            ip.clone(),
            dir.clone(),
            pid,
            shown.clone(),
        ));
        let stopped = tokio::select! {
            status = child.wait() => {
                use std::os::unix::process::ExitStatusExt;
                // As a container runtime reports it: 128 + the signal.
                let code = status.ok().and_then(|s| s.code().or(s.signal().map(|n| 128 + n)));
                let code = code.unwrap_or(-1);
                shown.last_exit = Some(code);
                false
            }
            _ = stop.changed() => true,
        };
        probes.abort();
        if stopped {
            // Deleted: SIGTERM, the grace period, then SIGKILL.
            signal("TERM", &pid.to_string());
            if tokio::time::timeout(Duration::from_secs(grace), child.wait())
                .await
                .is_err()
            {
                signal("KILL", &pid.to_string());
                let _ = child.wait().await;
            }
        }
        // The bridges and whatever else the pod started.
        signal("KILL", &format!("-{pid}"));
        {
            let mut pods = node.pods.lock().expect("pods");
            let s = pods.entry(name.clone()).or_default();
            s.pid = None;
            if !stopped {
                s.restarts += 1;
            }
            shown.restarts = s.restarts;
        }
        if stopped {
            break;
        }
        shown.ready = false;
        shown.waiting = Some((
            "CrashLoopBackOff".into(),
            format!("exited with {}", shown.last_exit.unwrap_or_default()),
        ));
        report(&node, &pod, c, &ip, &shown).await;
        if tokio::time::timeout(Duration::from_secs(1), stop.changed())
            .await
            .is_ok()
        {
            break;
        }
    }
    node.pods.lock().expect("pods").remove(&name);
}

fn append(file: &Path, line: &str) {
    use std::io::Write;
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
    {
        let _ = f.write_all(line.as_bytes());
    }
}

/// The readiness and liveness probes of a running container: Ready
/// reported on each change; a failed liveness probe kills the process
/// (`run_pod` restarts it).
async fn probe(
    node: Arc<Node>,
    pod: Pod,
    c: Container,
    ip: String,
    dir: PathBuf,
    pid: u32,
    mut shown: Shown,
) {
    let ports = ports(&c);
    let (mut ready_ok, mut ready_fail, mut live_fail) = (0, 0, 0);
    let mut t = 0u64;
    loop {
        if let Some(p) = &c.readiness_probe {
            if t >= initial(p) && (t - initial(p)).is_multiple_of(period(p)) {
                if http_probe(&node, &ip, &ports, p).await {
                    ready_ok += 1;
                    ready_fail = 0;
                } else {
                    ready_fail += 1;
                    ready_ok = 0;
                }
                let ready = if shown.ready {
                    ready_fail < p.failure_threshold.unwrap_or(3)
                } else {
                    ready_ok >= p.success_threshold.unwrap_or(1)
                };
                if ready != shown.ready {
                    shown.ready = ready;
                    report(&node, &pod, &c, &ip, &shown).await;
                }
            }
        }
        if let Some(p) = &c.liveness_probe {
            if t >= initial(p) && (t - initial(p)).is_multiple_of(period(p)) {
                if http_probe(&node, &ip, &ports, p).await {
                    live_fail = 0;
                } else {
                    live_fail += 1;
                    if live_fail >= p.failure_threshold.unwrap_or(3) {
                        append(
                            &dir.join("container.log"),
                            "kubelet: liveness probe failed: restarting\n",
                        );
                        signal("KILL", &pid.to_string());
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        t += 1;
    }
}

fn period(p: &Probe) -> u64 {
    p.period_seconds.unwrap_or(10).max(1) as u64
}

fn initial(p: &Probe) -> u64 {
    p.initial_delay_seconds.unwrap_or(0).max(0) as u64
}

/// The container's ports: number by name (for probes naming a port).
fn ports(c: &Container) -> Vec<(Option<String>, i32)> {
    c.ports
        .iter()
        .flatten()
        .map(|p| (p.name.clone(), p.container_port))
        .collect()
}

/// An httpGet probe through the pod's port socket; 200-399 passes.
async fn http_probe(node: &Node, ip: &str, ports: &[(Option<String>, i32)], p: &Probe) -> bool {
    let Some(get) = &p.http_get else {
        return false;
    };
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let port = match &get.port {
        IntOrString::Int(n) => Some(*n),
        IntOrString::String(s) => ports
            .iter()
            .find(|(n, _)| n.as_deref() == Some(s))
            .map(|(_, n)| *n),
    };
    let Some(port) = port else {
        return false;
    };
    let sock = node.pod_sock(ip, port);
    let path = get.path.clone().unwrap_or_else(|| "/".into());
    let timeout = Duration::from_secs(p.timeout_seconds.unwrap_or(1).max(1) as u64);
    let attempt = async {
        let mut s = tokio::net::UnixStream::connect(&sock).await.ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost:{port}\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head).await.ok()?;
        let code: u16 = std::str::from_utf8(&head[9..12]).ok()?.parse().ok()?;
        Some((200..400).contains(&code))
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

type Waiting = (String, String);

/// The container's start script (run in fresh mount and network
/// namespaces) and its environment, or why it cannot start yet.
async fn prepare(
    node: &Node,
    pod: &Pod,
    c: &Container,
    ip: &str,
    dir: &Path,
) -> Result<(String, Vec<(String, String)>), Waiting> {
    let spec = pod.spec.as_ref().expect("pod spec");
    let image = c.image.clone().unwrap_or_default();
    let repository = image
        .rsplit_once(':')
        .filter(|(r, tag)| !tag.contains('/') && !r.is_empty())
        .map_or(image.as_str(), |(r, _)| r);
    let img = node
        .images
        .iter()
        .find(|i| repository.rsplit('/').next() == Some(i.repository))
        .ok_or_else(|| {
            (
                "ErrImagePull".to_owned(),
                format!("the kubelet harness runs only outbox-operator and outbox-relay images, not {image}"),
            )
        })?;
    // Kubernetes' rules: command replaces the entrypoint (and drops CMD), args replace CMD.
    let cmd: Vec<String> = img.cmd.iter().map(|s| s.to_string()).collect();
    let argv: Vec<String> = match (&c.command, &c.args) {
        (Some(command), args) => command
            .iter()
            .chain(args.iter().flatten())
            .cloned()
            .collect(),
        (None, Some(args)) => std::iter::once(img.entrypoint.to_owned())
            .chain(args.iter().cloned())
            .collect(),
        (None, None) => std::iter::once(img.entrypoint.to_owned())
            .chain(cmd)
            .collect(),
    };
    if argv[0] != img.entrypoint {
        return Err((
            "RunContainerError".into(),
            format!(
                "{} is not in the image {image} (it has {})",
                argv[0], img.entrypoint
            ),
        ));
    }

    // User and group, as the kubelet sets them.
    let psc = spec.security_context.clone().unwrap_or_default();
    let csc = c.security_context.clone().unwrap_or_default();
    let uid = csc.run_as_user.or(psc.run_as_user);
    let gid = csc.run_as_group.or(psc.run_as_group).or(uid);
    let non_root = csc.run_as_non_root.or(psc.run_as_non_root).unwrap_or(false);
    if non_root && uid.is_none_or(|u| u == 0) {
        return Err((
            "CreateContainerConfigError".into(),
            "container has runAsNonRoot and image will run as root".into(),
        ));
    }
    let (uid, gid) = (uid.unwrap_or(0), gid.unwrap_or(0));

    let env = env(node, pod, c, ip).await?;
    let volumes = volumes(node, pod, dir, uid).await?;

    // The start script: loopback, bridges, mounts, then exec as the pod's user.
    let q = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let bridges = dir.join("bridges.log");
    let mut script = String::from("set -e\nip link set lo up\n");
    script += &format!("ip addr add {ip}/32 dev lo\n");
    for p in &node.bridged {
        let sock = node.host_sock(*p);
        script += &format!(
            "socat TCP-LISTEN:{p},bind=127.0.0.1,fork,reuseaddr UNIX-CONNECT:{} 2>>{} &\n",
            q(&sock.to_string_lossy()),
            q(&bridges.to_string_lossy())
        );
    }
    for (_, p) in ports(c) {
        let sock = node.pod_sock(ip, p);
        script += &format!(
            "socat UNIX-LISTEN:{},fork,unlink-early TCP:127.0.0.1:{p} 2>>{} &\n",
            q(&sock.to_string_lossy()),
            q(&bridges.to_string_lossy())
        );
    }
    for p in &node.bridged {
        script += &format!(
            "for i in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/{p}) 2>/dev/null && break; sleep 0.02; done\n"
        );
    }
    let mut mounts: Vec<_> = c.volume_mounts.iter().flatten().collect();
    mounts.sort_by_key(|m| m.mount_path.len());
    for m in &mounts {
        if m.sub_path.is_some() || m.sub_path_expr.is_some() {
            return Err((
                "CreateContainerConfigError".into(),
                format!(
                    "volume mount {}: subPath is not supported by the kubelet harness",
                    m.name
                ),
            ));
        }
        let src = volumes.get(&m.name).ok_or_else(|| {
            (
                "CreateContainerConfigError".into(),
                format!("volume mount {} names no volume of the pod", m.name),
            )
        })?;
        let (src, dst) = (q(&src.to_string_lossy()), q(&m.mount_path));
        script += &format!("mkdir -p {dst}\nmount --bind {src} {dst}\n");
    }
    for m in mounts.iter().rev().filter(|m| m.read_only == Some(true)) {
        script += &format!("mount -o remount,bind,ro {}\n", q(&m.mount_path));
    }
    script += &format!(
        "exec setpriv --reuid {uid} --regid {gid} --clear-groups --no-new-privs --inh-caps=-all --bounding-set=-all -- {} {}\n",
        q(&img.binary.to_string_lossy()),
        argv[1..].iter().map(|a| q(a)).collect::<Vec<_>>().join(" ")
    );
    Ok((script, env))
}

/// The container's environment, as the kubelet builds it.
async fn env(
    node: &Node,
    pod: &Pod,
    c: &Container,
    ip: &str,
) -> Result<Vec<(String, String)>, Waiting> {
    let ns = &node.namespace;
    let mut env = vec![
        (
            "PATH".to_owned(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_owned(),
        ),
        ("HOSTNAME".to_owned(), pod.name_any()),
        ("KUBERNETES_SERVICE_HOST".to_owned(), node.api.0.clone()),
        ("KUBERNETES_SERVICE_PORT".to_owned(), node.api.1.to_string()),
    ];
    let config_error = |m: String| ("CreateContainerConfigError".to_owned(), m);
    if c.env_from.is_some() {
        return Err(config_error(
            "envFrom is not supported by the kubelet harness".into(),
        ));
    }
    for e in c.env.iter().flatten() {
        let value = match (&e.value, &e.value_from) {
            (_, Some(from)) => {
                if let Some(k) = &from.secret_key_ref {
                    let s = Api::<Secret>::namespaced(node.client.clone(), ns)
                        .get_opt(&k.name)
                        .await
                        .map_err(|err| config_error(format!("secret {}: {err}", k.name)))?;
                    let v = s
                        .as_ref()
                        .and_then(|s| s.data.as_ref()?.get(&k.key).map(|b| b.0.clone()));
                    match v {
                        Some(v) => Some(String::from_utf8_lossy(&v).into_owned()),
                        None if k.optional == Some(true) => None,
                        None => {
                            return Err(config_error(format!(
                                "env {}: key {} of secret {} not found",
                                e.name, k.key, k.name
                            )))
                        }
                    }
                } else if let Some(k) = &from.config_map_key_ref {
                    let m = Api::<ConfigMap>::namespaced(node.client.clone(), ns)
                        .get_opt(&k.name)
                        .await
                        .map_err(|err| config_error(format!("configmap {}: {err}", k.name)))?;
                    match m
                        .as_ref()
                        .and_then(|m| m.data.as_ref()?.get(&k.key).cloned())
                    {
                        Some(v) => Some(v),
                        None if k.optional == Some(true) => None,
                        None => {
                            return Err(config_error(format!(
                                "env {}: key {} of configmap {} not found",
                                e.name, k.key, k.name
                            )))
                        }
                    }
                } else if let Some(f) = &from.field_ref {
                    Some(field(pod, &f.field_path, ip).ok_or_else(|| {
                        config_error(format!(
                            "env {}: fieldRef {} is not supported",
                            e.name, f.field_path
                        ))
                    })?)
                } else {
                    return Err(config_error(format!(
                        "env {}: unsupported valueFrom",
                        e.name
                    )));
                }
            }
            (Some(v), None) => Some(v.clone()),
            (None, None) => Some(String::new()),
        };
        if let Some(v) = value {
            env.retain(|(k, _)| k != &e.name);
            env.push((e.name.clone(), v));
        }
    }
    Ok(env)
}

/// A downward-API field of the pod.
fn field(pod: &Pod, path: &str, ip: &str) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    Some(match path {
        "metadata.name" => pod.name_any(),
        "metadata.namespace" => pod.namespace()?,
        "metadata.uid" => pod.uid()?,
        "spec.serviceAccountName" => spec
            .service_account_name
            .clone()
            .unwrap_or_else(|| "default".into()),
        "spec.nodeName" => spec.node_name.clone().unwrap_or_default(),
        "status.podIP" => ip.to_owned(),
        "status.hostIP" => "127.0.0.1".to_owned(),
        _ => return None,
    })
}

/// Materialises the pod's volumes under `dir/volumes/<name>`: (name → dir).
async fn volumes(
    node: &Node,
    pod: &Pod,
    dir: &Path,
    uid: i64,
) -> Result<HashMap<String, PathBuf>, Waiting> {
    let spec = pod.spec.as_ref().expect("pod spec");
    let mut out = HashMap::new();
    for v in spec.volumes.iter().flatten() {
        let vdir = dir.join("volumes").join(&v.name);
        let _ = std::fs::remove_dir_all(&vdir);
        std::fs::create_dir_all(&vdir).expect("volume dir");
        let files = volume_files(node, pod, v, uid).await?;
        for (path, (content, mode, owner)) in files {
            let file = vdir.join(&path);
            if let Some(parent) = file.parent() {
                std::fs::create_dir_all(parent).expect("volume subdir");
            }
            std::fs::write(&file, content).expect("volume file");
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode))
                .expect("file mode");
            if let Some(u) = owner {
                std::os::unix::fs::chown(&file, Some(u), None).expect("chown");
            }
        }
        if v.empty_dir.is_some() {
            std::os::unix::fs::chown(&vdir, Some(uid as u32), None).expect("chown");
        }
        out.insert(v.name.clone(), vdir);
    }
    Ok(out)
}

type Files = BTreeMap<String, (Vec<u8>, u32, Option<u32>)>;

async fn volume_files(node: &Node, pod: &Pod, v: &Volume, uid: i64) -> Result<Files, Waiting> {
    let mut files = Files::new();
    let missing = |what: String| ("ContainerCreating".to_owned(), what);
    if let Some(cm) = &v.config_map {
        let data = config_map(node, &cm.name).await;
        let Some(data) = data.or_else(|| cm.optional.filter(|o| *o).map(|_| BTreeMap::new()))
        else {
            return Err(missing(format!(
                "volume {}: configmap {} not found",
                v.name, cm.name
            )));
        };
        pick(
            &mut files,
            data,
            cm.items.as_deref(),
            cm.default_mode.unwrap_or(0o644),
            &v.name,
        )?;
    } else if let Some(s) = &v.secret {
        let name = s.secret_name.clone().unwrap_or_default();
        let data = secret(node, &name).await;
        let Some(data) = data.or_else(|| s.optional.filter(|o| *o).map(|_| BTreeMap::new())) else {
            return Err(missing(format!(
                "volume {}: secret {name} not found",
                v.name
            )));
        };
        pick(
            &mut files,
            data,
            s.items.as_deref(),
            s.default_mode.unwrap_or(0o644),
            &v.name,
        )?;
    } else if let Some(p) = &v.projected {
        let mode = p.default_mode.unwrap_or(0o644);
        for src in p.sources.iter().flatten() {
            projection(node, pod, v, src, mode, uid, &mut files).await?;
        }
    } else if v.empty_dir.is_none() {
        return Err((
            "CreateContainerConfigError".into(),
            format!("volume {}: only configMap, secret, projected and emptyDir volumes are supported by the kubelet harness", v.name),
        ));
    }
    Ok(files)
}

async fn projection(
    node: &Node,
    pod: &Pod,
    v: &Volume,
    src: &VolumeProjection,
    mode: i32,
    uid: i64,
    files: &mut Files,
) -> Result<(), Waiting> {
    let missing = |what: String| ("ContainerCreating".to_owned(), what);
    if let Some(t) = &src.service_account_token {
        let sa = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into());
        let request: k8s_openapi::api::authentication::v1::TokenRequest =
            serde_json::from_value(serde_json::json!({"spec": {
                "audiences": t.audience.iter().collect::<Vec<_>>(),
                "expirationSeconds": t.expiration_seconds.unwrap_or(3607),
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": pod.name_any(), "uid": pod.uid()},
            }}))
            .expect("token request");
        let token = Api::<ServiceAccount>::namespaced(node.client.clone(), &node.namespace)
            .create_token_request(&sa, &PostParams::default(), &request)
            .await
            .map_err(|e| {
                missing(format!(
                    "volume {}: token for serviceaccount {sa}: {e}",
                    v.name
                ))
            })?
            .status
            .map(|s| s.token)
            .unwrap_or_default();
        // As a kubelet does for a pod with runAsUser: the token is that user's, 0600.
        files.insert(
            t.path.clone(),
            (token.into_bytes(), 0o600, Some(uid as u32)),
        );
    }
    if let Some(cm) = &src.config_map {
        // kube-root-ca.crt: the cluster's CA, which the controller-manager publishes.
        let data = config_map(node, &cm.name).await.or_else(|| {
            (cm.name == "kube-root-ca.crt")
                .then(|| BTreeMap::from([("ca.crt".to_owned(), node.ca.clone().into_bytes())]))
        });
        let Some(data) = data.or_else(|| cm.optional.filter(|o| *o).map(|_| BTreeMap::new()))
        else {
            return Err(missing(format!(
                "volume {}: configmap {} not found",
                v.name, cm.name
            )));
        };
        pick(files, data, cm.items.as_deref(), mode, &v.name)?;
    }
    if let Some(s) = &src.secret {
        let data = secret(node, &s.name).await;
        let Some(data) = data.or_else(|| s.optional.filter(|o| *o).map(|_| BTreeMap::new())) else {
            return Err(missing(format!(
                "volume {}: secret {} not found",
                v.name, s.name
            )));
        };
        pick(files, data, s.items.as_deref(), mode, &v.name)?;
    }
    if let Some(d) = &src.downward_api {
        for item in d.items.iter().flatten() {
            let value = item
                .field_ref
                .as_ref()
                .and_then(|f| field(pod, &f.field_path, ""))
                .ok_or_else(|| {
                    (
                        "CreateContainerConfigError".to_owned(),
                        format!(
                            "volume {}: downwardAPI item {} is not supported",
                            v.name, item.path
                        ),
                    )
                })?;
            files.insert(
                item.path.clone(),
                (value.into_bytes(), item.mode.unwrap_or(mode) as u32, None),
            );
        }
    }
    if src.cluster_trust_bundle.is_some() {
        return Err((
            "CreateContainerConfigError".into(),
            format!(
                "volume {}: this projection is not supported by the kubelet harness",
                v.name
            ),
        ));
    }
    Ok(())
}

async fn config_map(node: &Node, name: &str) -> Option<BTreeMap<String, Vec<u8>>> {
    let m = Api::<ConfigMap>::namespaced(node.client.clone(), &node.namespace)
        .get_opt(name)
        .await
        .ok()??;
    let mut data: BTreeMap<String, Vec<u8>> = m
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.into_bytes()))
        .collect();
    data.extend(
        m.binary_data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0)),
    );
    Some(data)
}

async fn secret(node: &Node, name: &str) -> Option<BTreeMap<String, Vec<u8>>> {
    let s = Api::<Secret>::namespaced(node.client.clone(), &node.namespace)
        .get_opt(name)
        .await
        .ok()??;
    Some(
        s.data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect(),
    )
}

/// The files of a ConfigMap/Secret source: every key, or the listed items.
fn pick(
    files: &mut Files,
    data: BTreeMap<String, Vec<u8>>,
    items: Option<&[k8s_openapi::api::core::v1::KeyToPath]>,
    mode: i32,
    volume: &str,
) -> Result<(), Waiting> {
    match items {
        None => {
            for (k, v) in data {
                files.insert(k, (v, mode as u32, None));
            }
        }
        Some(items) => {
            for i in items {
                let v = data.get(&i.key).cloned().ok_or_else(|| {
                    (
                        "ContainerCreating".to_owned(),
                        format!("volume {volume}: key {} not found", i.key),
                    )
                })?;
                files.insert(i.path.clone(), (v, i.mode.unwrap_or(mode) as u32, None));
            }
        }
    }
    Ok(())
}
