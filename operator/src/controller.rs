//! The reconcile pipeline: fetch the referenced Secrets (I/O) → validate
//! (pure) → build the children (pure) → apply them (server-side apply, one
//! field manager, owner references) → status.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference, Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use k8s_openapi::NamespaceResourceScope;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::wait::{await_condition, conditions};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::cleanup::{self, relay_name, FINALIZER};
use crate::crd::{CheckpointPolicy, OutboxRelay, OutboxRelayStatus};
use crate::events::{EventType, Recorder};
use crate::guard::{Guarded, Malformed};
use crate::health::{assess, heartbeat_interval, wal_retained, Cond};
use crate::metrics::Metrics;
use crate::resources::config::{build_configmap, CONFIG_FILE};
use crate::resources::deployment::{build_deployment, config_hash};
use crate::resources::rbac::{build_lease, build_role, build_role_binding, build_service_account};
use crate::resources::service::{build_pdb, build_service};
use crate::validate::validate;

/// The one field manager of everything the operator writes.
pub const MANAGER: &str = "outbox-operator";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server failed or was unreachable: retried with backoff.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("the OutboxRelay has no uid or name yet")]
    NoOwner,
    #[error("waiting for the CRD: {0}")]
    Wait(String),
}

pub struct Context {
    pub client: Client,
    /// What was applied for each OutboxRelay, shared with the children's watches.
    pub applied: Arc<std::sync::Mutex<Applied>>,
    /// The referenced Secrets as last read, shared with the Secrets' watch.
    pub secrets: Arc<std::sync::Mutex<Secrets>>,
    /// Relay image when the spec does not name one.
    pub relay_image: String,
    pub recorder: Recorder,
    pub metrics: Metrics,
    /// The last leader (pod, epoch) seen per relay, for LeaderChanged Events.
    pub leaders: std::sync::Mutex<std::collections::HashMap<String, (String, u64)>>,
}

/// The children applied per OutboxRelay (by uid), and how many events of
/// its children the watches had seen then. Any child event since — a change
/// or a deletion by anyone, the controller-manager's status updates and
/// the operator's own applies included — makes the next reconcile apply
/// again (a no-op apply changes nothing, so it brings no further event).
#[derive(Default)]
pub struct Applied {
    events: std::collections::HashMap<String, u64>,
    done: std::collections::HashMap<String, (u64, u64, Deployment)>,
}

impl Applied {
    /// Events seen so far for the children of `uid`.
    fn child_events(&self, uid: &str) -> u64 {
        self.events.get(uid).copied().unwrap_or(0)
    }

    /// The Deployment as last applied, if `desired` was applied and no child
    /// event came since.
    fn current(&self, uid: &str, desired: u64, seen: u64) -> Option<Deployment> {
        match self.done.get(uid) {
            Some((hash, events, d)) if *hash == desired && *events == seen => Some(d.clone()),
            _ => None,
        }
    }

    fn record(&mut self, uid: &str, desired: u64, seen: u64, deployment: Deployment) {
        self.done.insert(uid.into(), (desired, seen, deployment));
    }

    /// The OutboxRelay is gone: nothing to remember.
    fn forget(&mut self, uid: &str) {
        self.events.remove(uid);
        self.done.remove(uid);
    }

    /// A child changed or went: its controlling OutboxRelay, to reconcile.
    /// `exists` says whether that OutboxRelay is still there: one deleted
    /// without a finalizer is never reconciled again, so its children's
    /// events (their garbage collection) are where it is forgotten.
    fn child_event<K: Resource>(
        &mut self,
        child: &K,
        exists: impl Fn(&ObjectRef<Guarded>) -> bool,
    ) -> Option<ObjectRef<Guarded>> {
        let owner = child
            .owner_references()
            .iter()
            .find(|o| o.controller == Some(true) && o.kind == "OutboxRelay")?;
        let relay = ObjectRef::new(&owner.name).within(&child.namespace()?);
        if exists(&relay) {
            *self.events.entry(owner.uid.clone()).or_default() += 1;
        } else {
            self.forget(&owner.uid);
        }
        Some(relay)
    }
}

impl Error {
    /// A short label for metrics.
    fn reason(&self) -> String {
        match self {
            Error::Kube(kube::Error::Api(s)) => {
                if s.reason.is_empty() {
                    format!("api_{}", s.code)
                } else {
                    s.reason.clone()
                }
            }
            Error::Kube(_) => "api_unreachable".into(),
            Error::NoOwner => "no_owner".into(),
            Error::Wait(_) => "crd_not_established".into(),
        }
    }
}

/// What the controller runs: a malformed object is reported, the others reconciled.
pub async fn reconcile_guarded(obj: Arc<Guarded>, ctx: Arc<Context>) -> Result<Action, Error> {
    match &obj.0 {
        Ok(r) => reconcile(Arc::new(r.clone()), ctx).await,
        Err(m) => reject_malformed(m, &ctx).await,
    }
}

/// An object that does not parse: `Ready=False`/`Degraded=True` with the
/// field and why, a Warning Event, and a wait for the user's next change.
async fn reject_malformed(m: &Malformed, ctx: &Context) -> Result<Action, Error> {
    let ns = m
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let relays: Api<OutboxRelay> = Api::namespaced(ctx.client.clone(), &ns);
    let message = format!(
        "the object does not fit the OutboxRelay schema: {}",
        m.error
    );
    let reference = ObjectReference {
        api_version: Some(OutboxRelay::api_version(&()).into_owned()),
        kind: Some(OutboxRelay::kind(&()).into_owned()),
        name: m.metadata.name.clone(),
        namespace: Some(ns.clone()),
        uid: m.metadata.uid.clone(),
        resource_version: m.metadata.resource_version.clone(),
        ..ObjectReference::default()
    };
    publish_to(ctx, &reference, EventType::Warning, "InvalidSpec", &message).await;
    // Nothing of the object is readable: the relays' reports neither.
    let not_evaluated = Cond {
        type_: "Stalled",
        status: false,
        reason: "InvalidSpec",
        message: "not evaluated: the object does not fit the schema".into(),
    };
    let conds = blocked("InvalidSpec", message, not_evaluated);
    apply_conditions(ctx, &relays, &m.metadata, None, &conds).await?;
    ctx.metrics.outcome("invalid_spec");
    Ok(Action::await_change())
}

pub async fn reconcile(obj: Arc<OutboxRelay>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = std::time::Instant::now();
    let result = reconcile_relay(&obj, &ctx).await;
    ctx.metrics
        .duration
        .observe(started.elapsed().as_secs_f64());
    match &result {
        Ok(_) => {}
        Err(e) => {
            ctx.metrics.outcome("error");
            ctx.metrics.failure(&e.reason());
        }
    }
    result
}

async fn reconcile_relay(obj: &Arc<OutboxRelay>, ctx: &Context) -> Result<Action, Error> {
    let ns = obj.namespace().unwrap_or_else(|| "default".into());
    let relays: Api<OutboxRelay> = Api::namespaced(ctx.client.clone(), &ns);

    // Deletion: the children go by garbage collection; only the Redis
    // checkpoint needs us, and only under `checkpointPolicy: Delete`.
    if obj.metadata.deletion_timestamp.is_some() {
        if let Some(uid) = obj.uid() {
            ctx.applied.lock().expect("applied lock").forget(&uid);
        }
        if has_finalizer(obj) {
            return delete_checkpoint(obj, ctx, &ns, &relays).await;
        }
        return Ok(Action::await_change());
    }
    let wants = obj.spec.checkpoint_policy == Some(CheckpointPolicy::Delete);
    if wants != has_finalizer(obj) {
        set_finalizer(ctx, &relays, obj, wants).await?;
    }

    let v = match validate(obj) {
        Ok(v) => v,
        Err(e) => {
            // A bad spec waits for the user: no retry loop, no crash.
            let message = e.to_string();
            if !already_degraded(obj, "InvalidSpec", &message) {
                publish(ctx, obj, EventType::Warning, "InvalidSpec", &message).await;
            }
            let conds = blocked("InvalidSpec", message, stalled(obj));
            patch_status(ctx, &relays, obj, &conds).await?;
            ctx.metrics.outcome("invalid_spec");
            return Ok(Action::await_change());
        }
    };

    // Fetch: every referenced Secret key must exist; their versions roll the pods.
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let mut versions = BTreeMap::new();
    for (use_, r) in &v.secrets {
        let known = ctx.secrets.lock().expect("secrets lock").get(&ns, &r.name);
        let found = match known {
            Some(k) => Some(k),
            None => {
                let seen = ctx.secrets.lock().expect("secrets lock").events;
                let read = secrets.get_opt(&r.name).await?.map(|s| SecretShape::of(&s));
                if let Some(k) = &read {
                    ctx.secrets.lock().expect("secrets lock").remember(
                        &ns,
                        &r.name,
                        seen,
                        k.clone(),
                    );
                }
                read
            }
        };
        let missing = match found {
            None => Some(format!("Secret {ns}/{} ({use_}) does not exist", r.name)),
            Some(k) if !k.keys.contains(&r.key) => Some(format!(
                "Secret {ns}/{} has no key `{}` ({use_})",
                r.name, r.key
            )),
            Some(k) => {
                versions.insert(r.name.clone(), k.version);
                None
            }
        };
        if let Some(message) = missing {
            if !already_degraded(obj, "MissingSecret", &message) {
                publish(ctx, obj, EventType::Warning, "MissingSecret", &message).await;
            }
            let conds = blocked("MissingSecret", message, stalled(obj));
            patch_status(ctx, &relays, obj, &conds).await?;
            ctx.metrics.outcome("missing_secret");
            // The Secret watch brings us back when it appears; poll too.
            return Ok(Action::requeue(Duration::from_secs(60)));
        }
    }

    // Build (pure), then apply.
    let owner = obj.controller_owner_ref(&()).ok_or(Error::NoOwner)?;
    let cm = build_configmap(&v);
    let config = cm
        .data
        .as_ref()
        .and_then(|d| d.get(CONFIG_FILE))
        .cloned()
        .unwrap_or_default();
    let image = v
        .spec
        .image
        .clone()
        .unwrap_or_else(|| ctx.relay_image.clone());
    let children = (
        build_service_account(&v),
        build_role(&v),
        build_role_binding(&v),
        build_lease(&v),
        cm,
        build_deployment(&v, &image, &config_hash(&config, &versions)),
        build_service(&v),
        build_pdb(&v),
    );
    // Nothing new since the last apply (no child changed or went, the same
    // desired objects): no request. A Stalled relay's rechecks and every
    // relay report land here.
    let uid = owner.uid.clone();
    let desired = crate::fnv1a([serde_json::to_vec(&children).unwrap_or_default().as_slice()]);
    let seen = ctx.applied.lock().expect("applied lock").child_events(&uid);
    let current = ctx
        .applied
        .lock()
        .expect("applied lock")
        .current(&uid, desired, seen);
    let deployment = match current {
        Some(d) => d,
        None => {
            let (sa, role, binding, lease, cm, deployment, service, pdb) = children;
            apply(ctx, &ns, sa, &owner).await?;
            apply(ctx, &ns, role, &owner).await?;
            apply(ctx, &ns, binding, &owner).await?;
            apply(ctx, &ns, lease, &owner).await?;
            apply(ctx, &ns, cm, &owner).await?;
            let deployment = apply(ctx, &ns, deployment, &owner).await?;
            apply(ctx, &ns, service, &owner).await?;
            apply(ctx, &ns, pdb, &owner).await?;
            ctx.applied.lock().expect("applied lock").record(
                &uid,
                desired,
                seen,
                deployment.clone(),
            );
            deployment
        }
    };

    // Conditions: the rollout from the Deployment, the rest from what the
    // leading relay reports (so a dead outbox never shows Ready).
    let health = assess(
        obj.status.as_ref(),
        heartbeat_interval(v.spec.heartbeat_interval.as_deref()),
        v.spec.max_lag_seconds,
        obj.metadata.creation_timestamp.as_ref().map(|t| t.0),
        Timestamp::now(),
    );
    let degraded = match (&health.error, wal_retained(obj.status.as_ref())) {
        (Some(e), _) => Cond {
            type_: "Degraded",
            status: true,
            reason: "RelayError",
            message: e.clone(),
        },
        (None, Some(message)) => Cond {
            type_: "Degraded",
            status: true,
            reason: "WalRetained",
            message,
        },
        (None, None) => Cond {
            type_: "Degraded",
            status: false,
            reason: "Reconciled",
            message: "children applied".into(),
        },
    };
    let conds = [
        health.ready.clone(),
        rollout_condition(&deployment, v.spec.replicas),
        degraded,
        health.stalled.clone(),
    ];
    announce(ctx, obj, &conds).await;
    ctx.metrics
        .relay(&ns, &obj.name_any(), &conds, obj.status.as_ref());
    patch_status(ctx, &relays, obj, &conds).await?;
    ctx.metrics.outcome("applied");
    Ok(Action::requeue(
        health.recheck.min(Duration::from_secs(300)),
    ))
}

/// Scales the relay Deployment to zero (its pods would stream from the slot,
/// or create it again) and tells whether no relay pod is left.
async fn relay_pods_stopped(obj: &OutboxRelay, ctx: &Context, ns: &str) -> Result<bool, Error> {
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
    let name = format!("{}-relay", obj.name_any());
    let Some(d) = deployments.get_opt(&name).await? else {
        return Ok(true);
    };
    if d.spec.as_ref().and_then(|s| s.replicas) != Some(0) {
        ctx.metrics.writes.inc();
        deployments
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"spec": {"replicas": 0}})),
            )
            .await?;
    }
    Ok(d.status.and_then(|s| s.replicas).unwrap_or(0) == 0
        && d.spec.and_then(|s| s.replicas) == Some(0))
}

fn has_finalizer(obj: &OutboxRelay) -> bool {
    obj.finalizers().iter().any(|f| f == FINALIZER)
}

/// Adds or removes our finalizer (optimistic: the patch names the
/// resourceVersion it read, so it never drops someone else's finalizer).
async fn set_finalizer(
    ctx: &Context,
    api: &Api<OutboxRelay>,
    obj: &OutboxRelay,
    on: bool,
) -> Result<(), Error> {
    let mut finalizers: Vec<String> = obj
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    if on {
        finalizers.push(FINALIZER.into());
    }
    let patch = serde_json::json!({
        "metadata": {"finalizers": finalizers, "resourceVersion": obj.resource_version()}
    });
    ctx.metrics.writes.inc();
    api.patch(
        &obj.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

/// `checkpointPolicy: Delete` on deletion: delete the relay's Redis keys,
/// then let the resource go. While Redis cannot be reached the resource stays
/// (Degraded, reason `CheckpointDeleteFailed`) and the deletion is retried;
/// removing the finalizer by hand skips it.
async fn delete_checkpoint(
    obj: &OutboxRelay,
    ctx: &Context,
    ns: &str,
    relays: &Api<OutboxRelay>,
) -> Result<Action, Error> {
    let redis = &obj.spec.redis;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let password = secret_value(
        &secrets,
        ns,
        redis.password_secret.as_ref(),
        "spec.redis.passwordSecret",
    )
    .await?;
    let ca = secret_value(
        &secrets,
        ns,
        redis.ca_secret.as_ref(),
        "spec.redis.caSecret",
    )
    .await?;
    let relay = relay_name(ns, &obj.name_any());
    // PostgreSQL: the slot (and the publication the relay made) go first,
    // once no relay pod can stream from it or create it again.
    let dropped = match &obj.spec.postgres {
        None => Ok(None),
        Some(pg) => match relay_pods_stopped(obj, ctx, ns).await? {
            false => Err(
                "waiting for the relay pods to stop before dropping the replication slot"
                    .to_string(),
            ),
            true => match (
                secret_value(
                    &secrets,
                    ns,
                    Some(&pg.password_secret),
                    "spec.postgres.passwordSecret",
                )
                .await?,
                secret_value(
                    &secrets,
                    ns,
                    pg.tls.as_ref().and_then(|t| t.ca_secret.as_ref()),
                    "spec.postgres.tls.caSecret",
                )
                .await?,
            ) {
                (Err(e), _) | (_, Err(e)) => Err(e),
                (Ok(password), Ok(ca)) => {
                    let target = cleanup::PgTarget {
                        host: &pg.host,
                        port: pg.port.unwrap_or(5432) as u16,
                        user: &pg.user,
                        password: password
                            .map(|p| String::from_utf8_lossy(&p).into_owned())
                            .unwrap_or_default(),
                        database: &pg.database,
                        slot: pg.slot.as_deref(),
                        publication: pg.publication.as_deref(),
                        tls: pg.tls.as_ref().map(|t| t.mode),
                        ca,
                    };
                    cleanup::drop_pg_objects(target, &relay).await.map(Some)
                }
            },
        },
    };
    let outcome = match (dropped, password, ca) {
        (Ok(dropped), Ok(password), Ok(ca)) => {
            let target = cleanup::RedisTarget {
                url: &redis.url,
                password: password.map(|p| String::from_utf8_lossy(&p).into_owned()),
                ca,
                key_prefix: redis.key_prefix.as_deref(),
            };
            cleanup::delete_checkpoint(target, &relay)
                .await
                .map(|n| (n, dropped))
        }
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => Err(e),
    };
    match outcome {
        Ok((n, dropped)) => {
            let mut note = format!("deleted the relay's Redis checkpoint ({n} keys) for {relay}");
            if let Some(d) = dropped {
                note.push_str(&format!("; PostgreSQL {d}"));
            }
            publish(ctx, obj, EventType::Normal, "CheckpointDeleted", &note).await;
            set_finalizer(ctx, relays, obj, false).await?;
            ctx.metrics.outcome("checkpoint_deleted");
            Ok(Action::await_change())
        }
        Err(message) => {
            let message =
                format!("cannot delete the checkpoint (checkpointPolicy: Delete): {message}");
            publish(
                ctx,
                obj,
                EventType::Warning,
                "CheckpointDeleteFailed",
                &message,
            )
            .await;
            let conds = [Cond {
                type_: "Degraded",
                status: true,
                reason: "CheckpointDeleteFailed",
                message,
            }];
            patch_status(ctx, relays, obj, &conds).await?;
            ctx.metrics.outcome("checkpoint_delete_failed");
            Ok(Action::requeue(Duration::from_secs(30)))
        }
    }
}

/// The value of a referenced Secret key (None when nothing is referenced);
/// the inner error names the Secret, the key and the spec field, never a value.
async fn secret_value(
    secrets: &Api<Secret>,
    ns: &str,
    r: Option<&crate::crd::SecretKeyRef>,
    field: &str,
) -> Result<Result<Option<Vec<u8>>, String>, Error> {
    let Some(r) = r else { return Ok(Ok(None)) };
    Ok(match secrets.get_opt(&r.name).await? {
        None => Err(format!("Secret {ns}/{} ({field}) does not exist", r.name)),
        Some(s) => s
            .data
            .as_ref()
            .and_then(|d| d.get(&r.key))
            .map(|b| Some(b.0.clone()))
            .ok_or_else(|| format!("Secret {ns}/{} has no key `{}` ({field})", r.name, r.key)),
    })
}

/// A problem the user has to fix: `Ready=False` and `Degraded=True` for the
/// same reason and message, `Progressing=False` (the relay pods are not
/// updated until it is fixed) and `Stalled` as the relays' reports say.
/// Every condition type stays present.
fn blocked(reason: &'static str, message: String, stalled: Cond) -> [Cond; 4] {
    [
        Cond {
            type_: "Ready",
            status: false,
            reason,
            message: message.clone(),
        },
        Cond {
            type_: "Progressing",
            status: false,
            reason,
            message: format!("the relay pods are not updated until this is fixed: {message}"),
        },
        Cond {
            type_: "Degraded",
            status: true,
            reason,
            message,
        },
        stalled,
    ]
}

/// Does the status already say `Degraded` for this reason and message? Its
/// Event is then not recorded again: once per occurrence, not at every
/// reconcile (a poll, each relay report).
fn already_degraded(obj: &OutboxRelay, reason: &str, message: &str) -> bool {
    obj.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Degraded" && c.reason == reason && c.message == message)
    })
}

/// `Stalled` from the relays' reports (the other conditions left aside).
fn stalled(obj: &OutboxRelay) -> Cond {
    assess(
        obj.status.as_ref(),
        heartbeat_interval(obj.spec.heartbeat_interval.as_deref()),
        obj.spec.max_lag_seconds,
        obj.metadata.creation_timestamp.as_ref().map(|t| t.0),
        Timestamp::now(),
    )
    .stalled
}

/// API errors: retry with a short backoff.
pub fn error_policy(_obj: Arc<Guarded>, _err: &Error, _ctx: Arc<Context>) -> Action {
    Action::requeue(Duration::from_secs(5))
}

/// What the reconcile needs of a Secret: its version and key names, never
/// its values.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SecretShape {
    version: String,
    keys: std::collections::BTreeSet<String>,
}

impl SecretShape {
    fn of(s: &Secret) -> SecretShape {
        SecretShape {
            version: s.resource_version().unwrap_or_default(),
            keys: s
                .data
                .iter()
                .flat_map(|d| d.keys())
                .chain(s.string_data.iter().flat_map(|d| d.keys()))
                .cloned()
                .collect(),
        }
    }
}

/// The referenced Secrets as last read, so a reconcile with nothing new
/// (every relay report) reads none. Any watch event of a Secret (created,
/// changed, deleted) drops what was known of it, and a read that overlapped
/// any Secret event is not kept: it may predate the change.
#[derive(Default)]
pub struct Secrets {
    events: u64,
    known: std::collections::HashMap<(String, String), SecretShape>,
}

impl Secrets {
    fn get(&self, ns: &str, name: &str) -> Option<SecretShape> {
        self.known.get(&(ns.into(), name.into())).cloned()
    }

    fn remember(&mut self, ns: &str, name: &str, seen: u64, shape: SecretShape) {
        if self.events == seen {
            self.known.insert((ns.into(), name.into()), shape);
        }
    }

    fn forget(&mut self, ns: &str, name: &str) {
        self.events += 1;
        self.known.remove(&(ns.into(), name.into()));
    }
}

/// Progressing from the applied Deployment's status.
fn rollout_condition(d: &Deployment, desired: i32) -> Cond {
    let st = d.status.clone().unwrap_or_default();
    let available = st.available_replicas.unwrap_or(0);
    let updated = st.updated_replicas.unwrap_or(0);
    let current =
        st.observed_generation.is_some() && st.observed_generation == d.metadata.generation;
    // Complete when the new pods run, not when they merely exist.
    let rolled = current && updated >= desired && available >= desired;
    Cond {
        type_: "Progressing",
        status: !rolled,
        reason: if rolled {
            "RolloutComplete"
        } else {
            "RollingOut"
        },
        message: format!("{available} of {desired} relay pods available, {updated} updated"),
    }
}

/// Events on transitions: stalled, recovered, relay error, leader change.
async fn announce(ctx: &Context, obj: &OutboxRelay, conds: &[Cond]) {
    let old = obj
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let was = |t: &str| {
        old.iter()
            .find(|c| c.type_ == t)
            .map(|c| c.status == "True")
    };
    for c in conds {
        let before = was(c.type_);
        match (c.type_, before, c.status) {
            ("Stalled", Some(false) | None, true) => {
                publish(ctx, obj, EventType::Warning, "Stalled", &c.message).await
            }
            ("Stalled", Some(true), false) => {
                publish(ctx, obj, EventType::Normal, "Recovered", &c.message).await
            }
            ("Degraded", Some(false) | None, true) if c.reason == "RelayError" => {
                publish(ctx, obj, EventType::Warning, "RelayError", &c.message).await
            }
            _ => {}
        }
    }
    // Leader changes, as seen by this operator process.
    let Some(leader) = obj.status.as_ref().and_then(|s| s.leader.clone()) else {
        return;
    };
    let key = format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any());
    let previous = ctx
        .leaders
        .lock()
        .expect("leaders lock")
        .insert(key, (leader.pod.clone(), leader.epoch));
    if let Some((pod, epoch)) = previous {
        if epoch != leader.epoch {
            let note = format!(
                "leader is now {} (epoch {}), was {pod} (epoch {epoch})",
                leader.pod, leader.epoch
            );
            publish(ctx, obj, EventType::Normal, "LeaderChanged", &note).await;
        }
    }
}

async fn apply<K>(ctx: &Context, ns: &str, mut obj: K, owner: &OwnerReference) -> Result<K, Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned,
{
    obj.meta_mut().owner_references = Some(vec![owner.clone()]);
    let name = obj.name_any();
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    ctx.metrics.writes.inc();
    Ok(api
        .patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&obj),
        )
        .await?)
}

/// Server-side apply of the operator's status fields; a condition keeps its
/// transition time while its status does not change.
async fn patch_status(
    ctx: &Context,
    api: &Api<OutboxRelay>,
    obj: &OutboxRelay,
    conds: &[Cond],
) -> Result<(), Error> {
    apply_conditions(ctx, api, &obj.metadata, obj.status.as_ref(), conds).await
}

/// Writes the conditions unless the status already says exactly that (no
/// write at steady state: a reconcile that finds nothing new sends nothing).
async fn apply_conditions(
    ctx: &Context,
    api: &Api<OutboxRelay>,
    meta: &ObjectMeta,
    old: Option<&OutboxRelayStatus>,
    conds: &[Cond],
) -> Result<(), Error> {
    let generation = meta.generation;
    if old.is_some_and(|o| says(o, generation, conds)) {
        return Ok(());
    }
    let old = old.map(|s| s.conditions.as_slice()).unwrap_or_default();
    let now = Time(Timestamp::now());
    let conditions: Vec<Condition> = conds
        .iter()
        .map(|c| {
            let status = if c.status { "True" } else { "False" };
            let since = old
                .iter()
                .find(|o| o.type_ == c.type_ && o.status == status)
                .map_or_else(|| now.clone(), |o| o.last_transition_time.clone());
            Condition {
                type_: c.type_.into(),
                status: status.into(),
                reason: c.reason.into(),
                message: c.message.clone(),
                last_transition_time: since,
                observed_generation: generation,
            }
        })
        .collect();
    ctx.metrics.writes.inc();
    let patch = serde_json::json!({
        "apiVersion": "outboxrelay.dev/v1alpha1",
        "kind": "OutboxRelay",
        "status": {
            "observedGeneration": generation,
            "conditions": conditions,
        }
    });
    api.patch_status(
        meta.name.as_deref().unwrap_or_default(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// Does `status` already hold exactly these conditions for `generation`?
fn says(status: &OutboxRelayStatus, generation: Option<i64>, conds: &[Cond]) -> bool {
    status.observed_generation == generation
        && status.conditions.len() == conds.len()
        && conds.iter().all(|c| {
            status.conditions.iter().any(|o| {
                o.type_ == c.type_
                    && o.status == if c.status { "True" } else { "False" }
                    && o.reason == c.reason
                    && o.message == c.message
                    && o.observed_generation == generation
            })
        })
}

/// Records a Kubernetes Event; failing to record one never fails a reconcile.
async fn publish(ctx: &Context, obj: &OutboxRelay, type_: EventType, reason: &str, note: &str) {
    publish_to(ctx, &obj.object_ref(&()), type_, reason, note).await;
}

async fn publish_to(
    ctx: &Context,
    reference: &ObjectReference,
    type_: EventType,
    reason: &str,
    note: &str,
) {
    ctx.metrics.writes.inc();
    if let Err(e) = ctx
        .recorder
        .publish(reference, type_, reason, "Reconcile", note)
        .await
    {
        tracing::warn!(error = %e, "cannot record an Event");
    }
}

/// Watches OutboxRelays (in `namespace`, or all) and their children and
/// referenced Secrets, until SIGTERM/SIGINT. Waits for the CRD to be
/// established instead of crash-looping.
pub async fn run(
    client: Client,
    namespace: Option<String>,
    relay_image: String,
    metrics: Metrics,
) -> Result<(), Error> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd_name = "outboxrelays.outboxrelay.dev";
    tracing::info!(crd = crd_name, "waiting for the CRD to be established");
    await_condition(crds, crd_name, conditions::is_crd_established())
        .await
        .map_err(|e| Error::Wait(e.to_string()))?;

    fn api<K>(client: &Client, ns: &Option<String>) -> Api<K>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
    {
        match ns {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let children =
        watcher::Config::default().labels("app.kubernetes.io/managed-by=outbox-operator");
    // Guarded: one malformed object must not break the watch of the others.
    let controller = Controller::new(
        api::<Guarded>(&client, &namespace),
        watcher::Config::default(),
    );
    let store = controller.store();
    let recorder = Recorder::new(client.clone(), MANAGER, std::env::var("POD_NAME").ok());
    let applied = Arc::<std::sync::Mutex<Applied>>::default();
    let known_secrets = Arc::<std::sync::Mutex<Secrets>>::default();
    let ctx = Arc::new(Context {
        client: client.clone(),
        applied: applied.clone(),
        secrets: known_secrets.clone(),
        relay_image,
        recorder,
        metrics,
        leaders: Default::default(),
    });
    // The Lease is not watched through the controller: its holder renews it
    // every retry period. Only its deletion matters — the relays may not
    // create it — and makes the next reconcile of its OutboxRelay (a relay
    // report, the recheck) apply the children again.
    let lease_deletions = {
        let applied = applied.clone();
        tokio::spawn(
            watcher(api::<Lease>(&client, &namespace), children.clone())
                .default_backoff()
                .for_each(move |e| {
                    if let Ok(watcher::Event::Delete(lease)) = e {
                        applied
                            .lock()
                            .expect("applied lock")
                            .child_event(&lease, |_| true);
                    }
                    std::future::ready(())
                }),
        )
    };
    // The other children, as `owns` would, counting their events for `Applied`.
    fn child<K>(
        applied: &Arc<std::sync::Mutex<Applied>>,
        relays: &kube::runtime::reflector::Store<Guarded>,
    ) -> impl Fn(K) -> Option<ObjectRef<Guarded>>
    where
        K: Resource,
    {
        let (applied, relays) = (applied.clone(), relays.clone());
        move |obj| {
            applied
                .lock()
                .expect("applied lock")
                .child_event(&obj, |r| relays.get(r).is_some())
        }
    }
    controller
        .watches(
            api::<Deployment>(&client, &namespace),
            children.clone(),
            child(&applied, &store),
        )
        .watches(
            api::<ConfigMap>(&client, &namespace),
            children.clone(),
            child(&applied, &store),
        )
        .watches(
            api::<ServiceAccount>(&client, &namespace),
            children.clone(),
            child(&applied, &store),
        )
        .watches(
            api::<Role>(&client, &namespace),
            children.clone(),
            child(&applied, &store),
        )
        .watches(
            api::<RoleBinding>(&client, &namespace),
            children.clone(),
            child(&applied, &store),
        )
        .watches(
            api::<Service>(&client, &namespace),
            children.clone(),
            child(&applied, &store),
        )
        .watches(
            api::<PodDisruptionBudget>(&client, &namespace),
            children,
            child(&applied, &store),
        )
        // A created, changed or deleted Secret reconciles the relays that
        // reference it by name (it rolls their pods through the config hash).
        .watches(
            api::<Secret>(&client, &namespace),
            watcher::Config::default(),
            move |secret| {
                let ns = secret.namespace();
                let name = secret.name_any();
                known_secrets
                    .lock()
                    .expect("secrets lock")
                    .forget(ns.as_deref().unwrap_or_default(), &name);
                store
                    .state()
                    .into_iter()
                    .filter(|g| {
                        g.namespace() == ns && g.0.as_ref().is_ok_and(|r| references(r, &name))
                    })
                    .map(|g| ObjectRef::from_obj(&*g))
                    .collect::<Vec<_>>()
            },
        )
        .shutdown_on_signal()
        .run(reconcile_guarded, error_policy, ctx)
        .for_each(|res| async move {
            match res {
                Ok((obj, _)) => tracing::debug!(relay = %obj, "reconciled"),
                Err(e) => tracing::warn!(error = %e, "reconcile failed"),
            }
        })
        .await;
    lease_deletions.abort();
    Ok(())
}

/// Does the relay reference Secret `name`? (A relay that does not validate
/// waits for its own change, not for a Secret's.)
fn references(r: &OutboxRelay, name: &str) -> bool {
    crate::validate::validate(r).is_ok_and(|v| v.secrets.iter().any(|(_, k)| k.name == name))
}

#[cfg(test)]
mod tests {
    //! Reconciles against an in-process fake API server (tower-test): it
    //! answers Secret reads from a fixture, echoes applies, and records every
    //! request so the tests assert on what the operator wrote.

    use std::sync::Mutex;

    use http::{Request, Response, StatusCode};
    use kube::client::Body;
    use serde_json::{json, Value};

    use super::*;
    use crate::validate::tests::{fixture, FULL};

    type Requests = Arc<Mutex<Vec<(String, String, Value)>>>;

    fn secret(name: &str, keys: &[&str]) -> Value {
        let data: serde_json::Map<String, Value> = keys
            .iter()
            .map(|k| (k.to_string(), json!("c2VjcmV0")))
            .collect();
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": name, "namespace": "shop", "resourceVersion": "7"},
               "data": data})
    }

    fn all_secrets() -> BTreeMap<String, Value> {
        [
            ("mysql-relay", vec!["password"]),
            ("mysql-ca", vec!["ca.pem"]),
            ("redis", vec!["password"]),
            ("kafka-user", vec!["username", "password"]),
        ]
        .into_iter()
        .map(|(n, k)| (n.to_string(), secret(n, &k)))
        .collect()
    }

    /// Runs the fake API server; returns the context and the request log.
    /// A status patch is answered with `relay` and the patched status, as the
    /// real API server answers with the whole object.
    fn fake(secrets: BTreeMap<String, Value>, relay: &OutboxRelay) -> (Arc<Context>, Requests) {
        let relay = serde_json::to_value(relay).expect("relay json");
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let log: Requests = Arc::default();
        let seen = log.clone();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let method = req.method().to_string();
                let uri = req.uri().to_string();
                let body = req.into_body().collect_bytes().await.unwrap_or_default();
                let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                seen.lock()
                    .expect("log")
                    .push((method.clone(), uri.clone(), body.clone()));
                let path = uri.split('?').next().unwrap_or_default().to_string();
                let (code, reply) = if method == "GET" && path.contains("/secrets/") {
                    let name = path.rsplit('/').next().unwrap_or_default();
                    match secrets.get(name) {
                        Some(s) => (StatusCode::OK, s.clone()),
                        None => (
                            StatusCode::NOT_FOUND,
                            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                   "reason": "NotFound", "code": 404,
                                   "message": format!("secrets \"{name}\" not found")}),
                        ),
                    }
                } else if path.ends_with("/status") {
                    let mut whole = relay.clone();
                    whole["status"] = body["status"].clone();
                    (StatusCode::OK, whole)
                } else if path.contains("/outboxrelays/") {
                    // A merge patch of the finalizers.
                    let mut whole = relay.clone();
                    whole["metadata"]["finalizers"] = body["metadata"]["finalizers"].clone();
                    (StatusCode::OK, whole)
                } else {
                    // Applies and creates: the object as written.
                    let mut echo = body.clone();
                    echo["metadata"]["resourceVersion"] = json!("1");
                    if echo["metadata"]["name"].is_null() {
                        echo["metadata"]["name"] = json!("orders");
                    }
                    (StatusCode::OK, echo)
                };
                let resp = Response::builder()
                    .status(code)
                    .body(Body::from(serde_json::to_vec(&reply).unwrap_or_default()))
                    .expect("response");
                send.send_response(resp);
            }
        });
        let client = Client::new(service, "default");
        let recorder = Recorder::new(client.clone(), MANAGER, None);
        let ctx = Context {
            client,
            applied: Default::default(),
            secrets: Default::default(),
            relay_image: "outbox-relay:test".into(),
            recorder,
            metrics: Metrics::default(),
            leaders: Default::default(),
        };
        (Arc::new(ctx), log)
    }

    fn relay(yaml: &str) -> Arc<OutboxRelay> {
        Arc::new(fixture(yaml))
    }

    fn patches(log: &Requests) -> Vec<(String, Value)> {
        log.lock()
            .expect("log")
            .iter()
            .filter(|(m, _, _)| m == "PATCH")
            .map(|(_, u, b)| (u.clone(), b.clone()))
            .collect()
    }

    fn condition<'a>(status_patch: &'a Value, type_: &str) -> &'a Value {
        status_patch["status"]["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
            .unwrap_or(&Value::Null)
    }

    #[test]
    fn a_rollout_is_complete_when_the_new_pods_are_available() {
        let deployment = |updated: i32, available: i32| -> Deployment {
            serde_json::from_value(json!({
                "metadata": {"name": "orders-relay", "generation": 3},
                "status": {"observedGeneration": 3, "updatedReplicas": updated,
                           "availableReplicas": available}
            }))
            .unwrap()
        };
        let c = rollout_condition(&deployment(2, 0), 2);
        assert_eq!((c.status, c.reason), (true, "RollingOut"));
        assert_eq!(c.message, "0 of 2 relay pods available, 2 updated");
        let c = rollout_condition(&deployment(2, 1), 2);
        assert_eq!((c.status, c.reason), (true, "RollingOut"));
        let c = rollout_condition(&deployment(2, 2), 2);
        assert_eq!((c.status, c.reason), (false, "RolloutComplete"));
    }

    #[test]
    fn secrets_are_matched_to_relays_by_name() {
        let r = fixture(FULL);
        for name in ["mysql-relay", "mysql-ca", "redis", "kafka-user"] {
            assert!(references(&r, name), "{name}");
        }
        assert!(!references(&r, "unrelated"));
    }

    #[tokio::test]
    async fn create_applies_every_child_with_owner_and_field_manager() {
        let r = relay(FULL);
        let (ctx, log) = fake(all_secrets(), &r);
        let action = reconcile(r, ctx).await.expect("reconcile");
        // Back before the startup grace ends, to show Stalled if no relay reports.
        assert_eq!(action, Action::requeue(Duration::from_secs(71)));
        let p = patches(&log);
        let kinds: Vec<String> = p
            .iter()
            .filter(|(u, _)| !u.contains("/status"))
            .map(|(_, b)| b["kind"].as_str().unwrap_or_default().to_string())
            .collect();
        assert_eq!(
            kinds,
            [
                "ServiceAccount",
                "Role",
                "RoleBinding",
                "Lease",
                "ConfigMap",
                "Deployment",
                "Service",
                "PodDisruptionBudget"
            ]
        );
        for (uri, body) in &p {
            assert!(
                uri.contains("fieldManager=outbox-operator") && uri.contains("force=true"),
                "{uri}"
            );
            if !uri.contains("/status") {
                let owner = &body["metadata"]["ownerReferences"][0];
                assert_eq!(
                    (owner["kind"].as_str(), owner["name"].as_str()),
                    (Some("OutboxRelay"), Some("orders"))
                );
                assert_eq!(owner["controller"], json!(true));
                assert!(
                    uri.starts_with("/api") && uri.contains("/namespaces/shop/"),
                    "{uri}"
                );
            }
        }
        let status = &p.last().expect("status patch").1;
        assert_eq!(status["status"]["observedGeneration"], json!(3));
        assert_eq!(condition(status, "Degraded")["status"], "False");
        // No relay has reported yet: not Ready, not yet Stalled, rolling out.
        assert_eq!(condition(status, "Ready")["reason"], "NoLeader");
        assert_eq!(condition(status, "Stalled")["status"], "False");
        assert_eq!(condition(status, "Progressing")["status"], "True");
    }

    #[tokio::test]
    async fn spec_change_updates_the_deployment_and_secret_versions_roll_it() {
        let (ctx, log) = fake(all_secrets(), &relay(FULL));
        reconcile(relay(FULL), ctx.clone()).await.expect("first");
        reconcile(relay(&FULL.replace("replicas: 3", "replicas: 4")), ctx)
            .await
            .expect("second");
        let deployments: Vec<Value> = patches(&log)
            .into_iter()
            .filter(|(_, b)| b["kind"] == "Deployment")
            .map(|(_, b)| b)
            .collect();
        assert_eq!(deployments.len(), 2);
        assert_eq!(deployments[0]["spec"]["replicas"], json!(3));
        assert_eq!(deployments[1]["spec"]["replicas"], json!(4));

        let mut rotated = all_secrets();
        rotated.get_mut("mysql-relay").expect("secret")["metadata"]["resourceVersion"] = json!("8");
        let (ctx2, log2) = fake(rotated, &relay(FULL));
        reconcile(relay(FULL), ctx2).await.expect("after rotation");
        let hash = |log: &Requests| {
            patches(log)
                .into_iter()
                .find(|(_, b)| b["kind"] == "Deployment")
                .map(|(_, b)| {
                    b["spec"]["template"]["metadata"]["annotations"]["outboxrelay.dev/config-hash"]
                        .clone()
                })
        };
        assert_ne!(
            hash(&log),
            hash(&log2),
            "a changed Secret must roll the pods"
        );
    }

    /// Steady state: a reconcile that finds nothing new (a recheck, a relay
    /// report) sends nothing — no child, no status, not even a Secret read.
    #[tokio::test]
    async fn a_reconcile_with_nothing_new_writes_nothing() {
        let r = relay(FULL);
        let (ctx, log) = fake(all_secrets(), &r);
        reconcile(r.clone(), ctx.clone()).await.expect("reconcile");
        let writes = ctx.metrics.writes.get();
        assert_eq!(writes, 9, "8 children and the status");
        let status = patches(&log).last().expect("status").1["status"].clone();
        let mut again = (*r).clone();
        again.status = Some(serde_json::from_value(status).expect("status"));
        let before = log.lock().expect("log").len();
        reconcile(Arc::new(again.clone()), ctx.clone())
            .await
            .expect("reconcile");
        let sent = log.lock().expect("log")[before..].to_vec();
        assert!(sent.is_empty(), "{sent:?}");
        assert_eq!(ctx.metrics.writes.get(), writes);
        // A Secret event (here: the password's): read again, nothing written.
        ctx.secrets.lock().unwrap().forget("shop", "mysql-relay");
        reconcile(Arc::new(again.clone()), ctx.clone())
            .await
            .expect("reconcile");
        let sent: Vec<(String, String)> = log.lock().expect("log")[before..]
            .iter()
            .map(|(m, u, _)| {
                (
                    m.clone(),
                    u.split('?').next().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        assert_eq!(
            sent,
            [(
                "GET".to_string(),
                "/api/v1/namespaces/shop/secrets/mysql-relay".to_string()
            )]
        );
        // A child changed (its watch saw an event): applied again.
        let changed: ConfigMap = serde_json::from_value(json!({"metadata": {
            "name": "orders-relay", "namespace": "shop",
            "ownerReferences": [{"apiVersion": "outboxrelay.dev/v1alpha1", "kind": "OutboxRelay",
                                 "name": "orders", "uid": r.uid().unwrap(), "controller": true}]}}))
        .unwrap();
        let to = ctx.applied.lock().unwrap().child_event(&changed, |_| true);
        assert_eq!(to, Some(ObjectRef::new("orders").within("shop")));
        reconcile(Arc::new(again), ctx.clone())
            .await
            .expect("reconcile");
        assert_eq!(ctx.metrics.writes.get(), writes + 8);
        // The OutboxRelay went (no finalizer: never reconciled again): its
        // children's garbage collection forgets it.
        let mut applied = ctx.applied.lock().unwrap();
        let uid = r.uid().unwrap();
        assert!(applied.done.contains_key(&uid));
        applied.child_event(&changed, |_| false);
        assert!(!applied.done.contains_key(&uid) && !applied.events.contains_key(&uid));
    }

    #[tokio::test]
    async fn missing_secret_degrades_without_applying_anything() {
        let mut secrets = all_secrets();
        secrets.remove("kafka-user");
        let (ctx, log) = fake(secrets, &relay(FULL));
        let action = reconcile(relay(FULL), ctx).await.expect("no crash");
        assert_eq!(action, Action::requeue(Duration::from_secs(60)));
        let p = patches(&log);
        assert_eq!(p.len(), 1, "only the status: {p:?}");
        let degraded = condition(&p[0].1, "Degraded");
        assert_eq!(degraded["status"], "True");
        assert_eq!(degraded["reason"], "MissingSecret");
        // Every condition type stays present, with its current truth.
        for (t, status, reason) in [
            ("Ready", "False", "MissingSecret"),
            ("Progressing", "False", "MissingSecret"),
            ("Stalled", "False", "Starting"),
        ] {
            let c = condition(&p[0].1, t);
            assert_eq!(
                (c["status"].as_str(), c["reason"].as_str()),
                (Some(status), Some(reason)),
                "{t}"
            );
        }
        let msg = degraded["message"].as_str().unwrap_or_default();
        assert!(
            msg.contains("shop/kafka-user") && msg.contains("spec.kafka.secretProperties"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn invalid_spec_sets_ready_false_records_an_event_and_waits() {
        let bad = FULL.replace("  deadLetterTopic: outbox.dlq\n", "");
        let (ctx, log) = fake(all_secrets(), &relay(&bad));
        let action = reconcile(relay(&bad), ctx.clone()).await.expect("no crash");
        assert_eq!(action, Action::await_change());
        let requests = log.lock().expect("log").clone();
        let event = requests
            .iter()
            .find(|(m, u, _)| m == "POST" && u.contains("/events"))
            .expect("an Event");
        assert_eq!(event.2["reason"], "InvalidSpec");
        let p = patches(&log);
        assert_eq!(p.len(), 1, "only the status: {p:?}");
        let ready = condition(&p[0].1, "Ready");
        assert_eq!(
            (ready["status"].as_str(), ready["reason"].as_str()),
            (Some("False"), Some("InvalidSpec"))
        );
        assert!(ready["message"]
            .as_str()
            .unwrap_or_default()
            .contains("spec.kafka.deadLetterTopic"));
        // Reconciled again (a relay report) with that status: no second
        // Event, no status write.
        let mut again = (*relay(&bad)).clone();
        again.status = Some(serde_json::from_value(p[0].1["status"].clone()).expect("status"));
        let before = log.lock().expect("log").len();
        reconcile(Arc::new(again), ctx).await.expect("no crash");
        let sent = log.lock().expect("log")[before..].to_vec();
        assert!(sent.is_empty(), "{sent:?}");
    }

    #[tokio::test]
    async fn delete_policy_adds_the_finalizer_and_retain_removes_it() {
        let r = relay(&format!("{FULL}checkpointPolicy: Delete\n"));
        let (ctx, log) = fake(all_secrets(), &r);
        reconcile(r, ctx).await.expect("reconcile");
        let p = patches(&log);
        let (uri, body) = &p[0];
        assert!(
            uri.contains("/outboxrelays/orders") && !uri.contains("/status"),
            "{uri}"
        );
        assert_eq!(body["metadata"]["finalizers"], json!([FINALIZER]));
        assert_eq!(p.len(), 10, "then the children and the status: {p:?}");

        let mut r = fixture(FULL);
        r.metadata.finalizers = Some(vec!["other/keep".into(), FINALIZER.into()]);
        let r = Arc::new(r);
        let (ctx, log) = fake(all_secrets(), &r);
        reconcile(r, ctx).await.expect("reconcile");
        let p = patches(&log);
        assert_eq!(p[0].1["metadata"]["finalizers"], json!(["other/keep"]));
    }

    #[tokio::test]
    async fn deletion_keeps_the_finalizer_while_redis_is_unreachable() {
        let mut r = fixture(&format!("{FULL}checkpointPolicy: Delete\n"));
        r.spec.redis.url = "redis://127.0.0.1:1/0".into();
        r.metadata.finalizers = Some(vec![FINALIZER.into()]);
        r.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
        let r = Arc::new(r);
        let (ctx, log) = fake(all_secrets(), &r);
        let action = reconcile(r, ctx).await.expect("no crash");
        assert_eq!(action, Action::requeue(Duration::from_secs(30)));
        let p = patches(&log);
        assert_eq!(p.len(), 1, "only the status; the finalizer stays: {p:?}");
        let degraded = condition(&p[0].1, "Degraded");
        assert_eq!(degraded["reason"], "CheckpointDeleteFailed");
        let msg = degraded["message"].as_str().unwrap_or_default();
        assert!(msg.contains("redis"), "{msg}");
        assert!(!msg.contains("secret"), "the password leaked: {msg}");
        let requests = log.lock().expect("log").clone();
        assert!(requests.iter().any(|(m, u, b)| m == "POST"
            && u.contains("/events")
            && b["reason"] == "CheckpointDeleteFailed"));
    }

    #[tokio::test]
    async fn a_malformed_object_is_reported_naming_the_field_and_waits() {
        let mut raw = serde_json::to_value(fixture(FULL)).expect("json");
        raw["spec"]["mysql"]["port"] = json!("3306");
        let guarded: Guarded = serde_json::from_value(raw).expect("guarded");
        assert!(guarded.0.is_err());
        let (ctx, log) = fake(all_secrets(), &fixture(FULL));
        let action = reconcile_guarded(Arc::new(guarded), ctx)
            .await
            .expect("no crash");
        assert_eq!(action, Action::await_change());
        let requests = log.lock().expect("log").clone();
        let event = requests
            .iter()
            .find(|(m, u, _)| m == "POST" && u.contains("/events"))
            .expect("an Event");
        assert_eq!(event.2["reason"], "InvalidSpec");
        assert_eq!(event.2["regarding"]["name"], "orders");
        let p = patches(&log);
        assert_eq!(p.len(), 1, "only the status: {p:?}");
        assert!(p[0]
            .0
            .contains("/namespaces/shop/outboxrelays/orders/status"));
        let ready = condition(&p[0].1, "Ready");
        assert_eq!(ready["reason"], "InvalidSpec");
        let msg = ready["message"].as_str().unwrap_or_default();
        assert!(msg.contains("spec.mysql.port: invalid type"), "{msg}");
    }

    /// Every request the operator makes, in one text: paths, bodies, Events,
    /// status patches, applied children.
    fn everything_sent(log: &Requests) -> String {
        log.lock()
            .expect("log")
            .iter()
            .map(|(m, u, b)| format!("{m} {u} {b}\n"))
            .collect()
    }

    /// Everything this test binary logs, at debug level (the operator and
    /// its clients): one process-wide subscriber, set once.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("log buffer").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn captured_logs() -> Captured {
        static LOGS: std::sync::OnceLock<Captured> = std::sync::OnceLock::new();
        LOGS.get_or_init(|| {
            let logs = Captured::default();
            let writer = logs.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_env_filter("debug")
                .with_writer(move || writer.clone())
                .finish();
            tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");
            logs
        })
        .clone()
    }

    #[tokio::test]
    async fn secret_values_never_leave_the_secrets() {
        use base64::Engine as _;
        let values = [
            ("mysql-relay", "password", "Mysql-S3cret-9f1"),
            (
                "mysql-ca",
                "ca.pem",
                "-----BEGIN CERTIFICATE----- Ca-S3cret-77",
            ),
            ("redis", "password", "Redis-S3cret-4a2"),
            ("kafka-user", "username", "Kafka-User-S3cret-1"),
            ("kafka-user", "password", "Kafka-S3cret-b07"),
        ];
        let mut secrets = all_secrets();
        for (name, key, value) in values {
            secrets.get_mut(name).expect("secret")["data"][key] =
                json!(base64::engine::general_purpose::STANDARD.encode(value));
        }
        let logs = captured_logs();
        let leaks = |sent: &str, when: &str| {
            for (_, _, v) in values {
                let b64 = base64::engine::general_purpose::STANDARD.encode(v);
                assert!(
                    !sent.contains(v) && !sent.contains(&b64),
                    "{when}: a secret value was sent to the API server:\n{sent}"
                );
            }
        };
        // Created, reconciled with a relay report, a key gone missing, and
        // deleted with `checkpointPolicy: Delete` while Redis is unreachable
        // (the operator reads the Redis password for that).
        let (ctx, log) = fake(secrets.clone(), &relay(FULL));
        reconcile(reported(1), ctx.clone()).await.expect("create");
        leaks(&everything_sent(&log), "create");
        let mut missing = secrets.clone();
        missing.get_mut("kafka-user").expect("secret")["data"]
            .as_object_mut()
            .expect("data")
            .remove("password");
        let (ctx, log) = fake(missing, &relay(FULL));
        reconcile(relay(FULL), ctx).await.expect("missing key");
        leaks(&everything_sent(&log), "missing key");
        let mut r = fixture(&format!("{FULL}checkpointPolicy: Delete\n"));
        r.spec.redis.url = "redis://127.0.0.1:1/0".into();
        r.metadata.finalizers = Some(vec![FINALIZER.into()]);
        r.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
        let r = Arc::new(r);
        let (ctx, log) = fake(secrets, &r);
        reconcile(r, ctx.clone()).await.expect("delete");
        leaks(&everything_sent(&log), "deletion");
        leaks(&ctx.metrics.encode(), "metrics");
        let logged = String::from_utf8_lossy(&logs.0.lock().expect("log buffer")).into_owned();
        assert!(
            logged.contains("request"),
            "the capture sees the client's debug logging: {logged}"
        );
        leaks(&logged, "logs");
    }

    /// A relay with what its leader reported `age_s` seconds ago.
    fn reported(age_s: i64) -> Arc<OutboxRelay> {
        let mut r = fixture(FULL);
        let hb = Timestamp::from_second(Timestamp::now().as_second() - age_s).expect("time");
        r.status = Some(
            serde_json::from_value(json!({
                "leader": {"pod": "orders-relay-0", "epoch": 7, "since": hb.to_string()},
                "position": {"short": "0-1-42", "gtid": "0-1-42", "file": "mysql-bin.000001", "pos": 420},
                "lag": {"seconds": 0, "bytes": 0},
                "events": 42, "bytes": 4200,
                "lastHeartbeatTime": hb.to_string(),
            }))
            .expect("relay status"),
        );
        Arc::new(r)
    }

    #[tokio::test]
    async fn relay_reported_fields_and_operator_conditions_do_not_overlap() {
        let r = reported(1);
        let (ctx, log) = fake(all_secrets(), &r);
        reconcile(r, ctx).await.expect("reconcile");
        let p = patches(&log);
        let (uri, status) = p.last().expect("status patch");
        assert!(uri.contains("/status") && uri.contains("fieldManager=outbox-operator"));
        // The operator applies only its own fields: the relay's (leader,
        // position, lag, events, bytes, lastHeartbeatTime, lastError) stay
        // owned by the relay's field manager.
        let keys: Vec<&String> = status["status"]
            .as_object()
            .expect("status")
            .keys()
            .collect();
        assert_eq!(keys, ["conditions", "observedGeneration"]);
        let ready = condition(status, "Ready");
        assert_eq!(
            (ready["status"].as_str(), ready["reason"].as_str()),
            (Some("True"), Some("Streaming"))
        );
        assert!(ready["message"]
            .as_str()
            .unwrap_or_default()
            .contains("orders-relay-0 (epoch 7)"));
        assert_eq!(condition(status, "Stalled")["status"], "False");
    }

    #[tokio::test]
    async fn silent_relays_are_stalled_with_an_event_and_no_polling() {
        let r = reported(11);
        let (ctx, log) = fake(all_secrets(), &r);
        let action = reconcile(r, ctx).await.expect("reconcile");
        // Only a relay's report can end the stall, and that is a watch event.
        assert_eq!(action, Action::requeue(crate::health::STALLED_RECHECK));
        let p = patches(&log);
        let status = &p.last().expect("status").1;
        let stalled = condition(status, "Stalled");
        assert_eq!(
            (stalled["status"].as_str(), stalled["reason"].as_str()),
            (Some("True"), Some("NoHeartbeat"))
        );
        assert_eq!(condition(status, "Ready")["status"], "False");
        let requests = log.lock().expect("log").clone();
        assert!(requests
            .iter()
            .any(|(m, u, b)| m == "POST" && u.contains("/events") && b["reason"] == "Stalled"));
    }
}
