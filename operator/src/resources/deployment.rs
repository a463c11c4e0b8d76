//! The relay Deployment: secrets by `secretKeyRef` only, probes on the
//! relay's HTTP endpoints, a locked-down security context, and a config hash
//! annotation so a config or Secret change rolls the pods.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, ObjectFieldSelector, PodAffinityTerm, PodAntiAffinity, PodSecurityContext,
    PodSpec, PodTemplateSpec, Probe, SeccompProfile, SecretKeySelector, SecretVolumeSource,
    SecurityContext, Volume, VolumeMount, WeightedPodAffinityTerm,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::ObjectMeta;

use crate::resources::config::{
    CONFIG_DIR, CONFIG_FILE, HTTP_PORT, MYSQL_CA_DIR, NATS_CA_DIR, NATS_CREDS_DIR, POSTGRES_CA_DIR,
    REDIS_CA_DIR,
};
use crate::resources::{child_meta, child_name, labels};
use crate::validate::{SecretUse, ValidatedRelay};

/// Annotation whose change rolls the relay pods.
pub const CONFIG_HASH: &str = "outboxrelay.dev/config-hash";
/// Non-root user of the relay image.
const RELAY_UID: i64 = 65532;

/// Environment variable that carries a secret of `use_` into the relay;
/// None for CA certificates and NATS credentials, which are mounted files
/// (`mount_of`).
pub fn env_name(use_: &SecretUse) -> Option<String> {
    match use_ {
        SecretUse::MysqlPassword => Some("OUTBOX_RELAY_MYSQL_PASSWORD".into()),
        SecretUse::PostgresPassword => Some("OUTBOX_RELAY_POSTGRES_PASSWORD".into()),
        SecretUse::RedisPassword => Some("OUTBOX_RELAY_REDIS_PASSWORD".into()),
        SecretUse::KafkaProperty(p) => Some(format!(
            "OUTBOX_RELAY_KAFKA_{}",
            p.to_ascii_uppercase().replace('.', "_")
        )),
        SecretUse::NatsPassword => Some("OUTBOX_RELAY_NATS_PASSWORD".into()),
        SecretUse::NatsToken => Some("OUTBOX_RELAY_NATS_TOKEN".into()),
        SecretUse::NatsNkey => Some("OUTBOX_RELAY_NATS_NKEY".into()),
        SecretUse::MysqlCa
        | SecretUse::PostgresCa
        | SecretUse::RedisCa
        | SecretUse::NatsCa
        | SecretUse::NatsCredentials => None,
    }
}

/// CA certificates and NATS credentials are mounted files: (volume, mount
/// directory).
fn mount_of(use_: &SecretUse) -> Option<(&'static str, &'static str)> {
    match use_ {
        SecretUse::MysqlCa => Some(("mysql-ca", MYSQL_CA_DIR)),
        SecretUse::PostgresCa => Some(("postgres-ca", POSTGRES_CA_DIR)),
        SecretUse::RedisCa => Some(("redis-ca", REDIS_CA_DIR)),
        SecretUse::NatsCa => Some(("nats-ca", NATS_CA_DIR)),
        SecretUse::NatsCredentials => Some(("nats-creds", NATS_CREDS_DIR)),
        _ => None,
    }
}

/// `config_hash` covers the ConfigMap's data and the versions of the
/// referenced Secrets (the reconciler computes it).
pub fn build_deployment(r: &ValidatedRelay, image: &str, config_hash: &str) -> Deployment {
    let s = &r.spec;
    let labels = labels(r);
    let affinity = s.affinity.clone().unwrap_or_else(|| spread(&labels));
    let mut pod_labels = s.pod_labels.clone().unwrap_or_default();
    pod_labels.extend(labels.clone());
    let mut annotations = s.pod_annotations.clone().unwrap_or_default();
    annotations.insert(CONFIG_HASH.into(), config_hash.into());

    let mut env: Vec<EnvVar> = r
        .secrets
        .iter()
        .filter_map(|(u, k)| Some((env_name(u)?, k)))
        .map(|(name, k)| EnvVar {
            name,
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: k.name.clone(),
                    key: k.key.clone(),
                    optional: Some(false),
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        })
        .collect();
    env.push(EnvVar {
        name: "OUTBOX_RELAY_CONFIG".into(),
        value: Some(format!("{CONFIG_DIR}/{CONFIG_FILE}")),
        ..EnvVar::default()
    });
    // The pod's name is its identity in the leader-election Lease.
    for (name, path) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
    ] {
        env.push(EnvVar {
            name: name.into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: path.into(),
                    api_version: None,
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        });
    }

    let mut volumes = vec![Volume {
        name: "config".into(),
        config_map: Some(ConfigMapVolumeSource {
            name: child_name(r),
            ..ConfigMapVolumeSource::default()
        }),
        ..Volume::default()
    }];
    let mut mounts = vec![VolumeMount {
        name: "config".into(),
        mount_path: CONFIG_DIR.into(),
        read_only: Some(true),
        ..VolumeMount::default()
    }];
    for (use_, ca) in &r.secrets {
        let Some((volume, dir)) = mount_of(use_) else {
            continue;
        };
        volumes.push(Volume {
            name: volume.into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(ca.name.clone()),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name: volume.into(),
            mount_path: dir.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }

    let probe = |path: &str, period: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(3),
        ..Probe::default()
    };

    Deployment {
        metadata: child_meta(r),
        spec: Some(DeploymentSpec {
            replicas: Some(s.replicas),
            selector: LabelSelector {
                match_labels: Some(labels),
                ..LabelSelector::default()
            },
            // Never two generations streaming side by side beyond the lease.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                ..DeploymentStrategy::default()
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(
                        s.service_account_name
                            .clone()
                            .unwrap_or_else(|| child_name(r)),
                    ),
                    automount_service_account_token: Some(true),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(RELAY_UID),
                        run_as_group: Some(RELAY_UID),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..SeccompProfile::default()
                        }),
                        ..PodSecurityContext::default()
                    }),
                    node_selector: s.node_selector.clone(),
                    tolerations: s.tolerations.clone(),
                    affinity: Some(affinity),
                    containers: vec![Container {
                        name: "relay".into(),
                        image: Some(image.into()),
                        env: Some(env),
                        ports: Some(vec![ContainerPort {
                            name: Some("http".into()),
                            container_port: HTTP_PORT,
                            ..ContainerPort::default()
                        }]),
                        liveness_probe: Some(probe("/healthz", 10)),
                        readiness_probe: Some(probe("/readyz", 5)),
                        resources: s.resources.clone(),
                        volume_mounts: Some(mounts),
                        security_context: Some(SecurityContext {
                            allow_privilege_escalation: Some(false),
                            read_only_root_filesystem: Some(true),
                            run_as_non_root: Some(true),
                            capabilities: Some(Capabilities {
                                drop: Some(vec!["ALL".into()]),
                                ..Capabilities::default()
                            }),
                            ..SecurityContext::default()
                        }),
                        ..Container::default()
                    }],
                    volumes: Some(volumes),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

/// Hash of the relay config and the referenced Secrets' resource versions.
pub fn config_hash(config: &str, secret_versions: &BTreeMap<String, String>) -> String {
    let secrets = secret_versions
        .iter()
        .flat_map(|(k, v)| [k.as_bytes(), b"=", v.as_bytes()]);
    let h = crate::fnv1a(std::iter::once(config.as_bytes()).chain(secrets));
    format!("{h:016x}")
}

/// Without an `affinity` of the user's: the relay pods preferably on
/// different nodes (preferred, so a one-node cluster still runs them all),
/// so one node failure does not take the leader and its standby together.
fn spread(labels: &BTreeMap<String, String>) -> Affinity {
    Affinity {
        pod_anti_affinity: Some(PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![
                WeightedPodAffinityTerm {
                    weight: 100,
                    pod_affinity_term: PodAffinityTerm {
                        topology_key: "kubernetes.io/hostname".into(),
                        label_selector: Some(LabelSelector {
                            match_labels: Some(labels.clone()),
                            ..LabelSelector::default()
                        }),
                        ..PodAffinityTerm::default()
                    },
                },
            ]),
            ..PodAntiAffinity::default()
        }),
        ..Affinity::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::tests::{fixture, FULL};
    use crate::validate::validate;

    fn deployment() -> Deployment {
        let v = validate(&fixture(FULL)).expect("valid");
        build_deployment(&v, "ghcr.io/example/outbox-relay:0.1.0", "abc")
    }

    #[test]
    fn relay_pods_spread_across_nodes_unless_the_user_says_otherwise() {
        let d = deployment();
        let pod = d.spec.unwrap().template.spec.unwrap();
        let terms = pod
            .affinity
            .and_then(|a| a.pod_anti_affinity)
            .and_then(|p| p.preferred_during_scheduling_ignored_during_execution)
            .expect("default anti-affinity");
        assert_eq!(
            terms[0].pod_affinity_term.topology_key,
            "kubernetes.io/hostname"
        );
        let selected = terms[0].pod_affinity_term.label_selector.clone().unwrap();
        assert_eq!(
            selected.match_labels.unwrap()["app.kubernetes.io/instance"],
            "orders"
        );
        // The user's own affinity replaces it.
        let mut r = fixture(FULL);
        r.spec.affinity = Some(Affinity::default());
        let v = validate(&r).expect("valid");
        let pod = build_deployment(&v, "img", "abc")
            .spec
            .unwrap()
            .template
            .spec
            .unwrap();
        assert_eq!(pod.affinity, Some(Affinity::default()));
    }

    #[test]
    fn secrets_only_by_secret_key_ref() {
        let d = deployment();
        let pod = d.spec.expect("spec").template.spec.expect("pod");
        let c = &pod.containers[0];
        let env = c.env.as_ref().expect("env");
        for e in env {
            if e.name == "OUTBOX_RELAY_CONFIG" {
                assert_eq!(e.value.as_deref(), Some("/etc/outbox-relay/relay.toml"));
                continue;
            }
            if e.name.starts_with("POD_") {
                let f = e.value_from.as_ref().and_then(|v| v.field_ref.as_ref());
                assert!(f.is_some(), "{} is not from the downward API", e.name);
                continue;
            }
            assert!(e.value.is_none(), "{} has a literal value", e.name);
            let r = e
                .value_from
                .as_ref()
                .and_then(|v| v.secret_key_ref.as_ref());
            assert!(r.is_some(), "{} is not from a Secret", e.name);
        }
        let names: Vec<&str> = env.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "OUTBOX_RELAY_MYSQL_PASSWORD",
                "OUTBOX_RELAY_REDIS_PASSWORD",
                "OUTBOX_RELAY_KAFKA_SASL_PASSWORD",
                "OUTBOX_RELAY_KAFKA_SASL_USERNAME",
                "OUTBOX_RELAY_CONFIG",
                "POD_NAME",
                "POD_NAMESPACE"
            ]
        );
        let ca = pod
            .volumes
            .expect("volumes")
            .into_iter()
            .find(|v| v.name == "mysql-ca");
        assert_eq!(
            ca.and_then(|v| v.secret)
                .and_then(|s| s.secret_name)
                .as_deref(),
            Some("mysql-ca")
        );
    }

    #[test]
    fn nats_secrets_by_secret_key_ref_and_mounted_files() {
        let pod_of = |v: &ValidatedRelay| {
            build_deployment(v, "relay:1", "abc")
                .spec
                .expect("spec")
                .template
                .spec
                .expect("pod")
        };
        let v = validate(&fixture(&crate::validate::tests::nats_spec())).expect("valid");
        let pod = pod_of(&v);
        let env: Vec<(String, Option<String>)> = pod.containers[0]
            .env
            .iter()
            .flatten()
            .filter(|e| e.name.contains("NATS"))
            .map(|e| {
                let r = e
                    .value_from
                    .as_ref()
                    .and_then(|v| v.secret_key_ref.as_ref());
                (e.name.clone(), r.map(|r| format!("{}/{}", r.name, r.key)))
            })
            .collect();
        assert_eq!(
            env,
            [(
                "OUTBOX_RELAY_NATS_PASSWORD".to_string(),
                Some("nats-relay/password".to_string())
            )]
        );
        let volumes: Vec<(String, Option<String>)> = pod
            .volumes
            .expect("volumes")
            .into_iter()
            .map(|v| (v.name, v.secret.and_then(|s| s.secret_name)))
            .collect();
        assert!(
            volumes.contains(&("nats-ca".to_string(), Some("nats-ca".to_string()))),
            "{volumes:?}"
        );
        // A .creds file is a mounted file too, named in the config.
        let yaml = crate::validate::tests::nats_spec()
            .replace("  user: outbox\n", "")
            .replace(
                "passwordSecret: {name: nats-relay, key: password}",
                "credentialsSecret: {name: nats-creds, key: relay.creds}",
            );
        let v = validate(&fixture(&yaml)).expect("valid");
        let pod = pod_of(&v);
        let c = &pod.containers[0];
        assert!(
            c.env.iter().flatten().all(|e| !e.name.contains("NATS")),
            "credentials went into the environment"
        );
        assert!(
            c.volume_mounts
                .iter()
                .flatten()
                .any(|m| m.name == "nats-creds" && m.mount_path == NATS_CREDS_DIR),
            "{:?}",
            c.volume_mounts
        );
        let toml = crate::resources::config::relay_toml(&v);
        assert!(
            toml.contains("credentials_file = \"/etc/outbox-relay/nats-creds/relay.creds\""),
            "{toml}"
        );
    }

    #[test]
    fn ca_certificates_are_mounted_files_and_named_in_the_config() {
        let yaml = FULL.replace(
            "  url: redis://redis.shop.svc:6379/0\n",
            "  url: rediss://redis.shop.svc:6380/0\n  caSecret: {name: redis-tls, key: ca.crt}\n",
        );
        let v = validate(&fixture(&yaml)).expect("valid");
        let d = build_deployment(&v, "relay:1", "abc");
        let pod = d.spec.expect("spec").template.spec.expect("pod");
        let volumes: Vec<(String, Option<String>)> = pod
            .volumes
            .expect("volumes")
            .into_iter()
            .map(|v| (v.name, v.secret.and_then(|s| s.secret_name)))
            .collect();
        assert_eq!(
            volumes,
            [
                ("config".to_string(), None),
                ("mysql-ca".to_string(), Some("mysql-ca".to_string())),
                ("redis-ca".to_string(), Some("redis-tls".to_string())),
            ]
        );
        let c = &pod.containers[0];
        let mounts: Vec<(&str, &str, Option<bool>)> = c
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| (m.name.as_str(), m.mount_path.as_str(), m.read_only))
            .collect();
        assert!(
            mounts.contains(&("redis-ca", REDIS_CA_DIR, Some(true))),
            "{mounts:?}"
        );
        assert!(
            c.env.iter().flatten().all(|e| !e.name.contains("CA")),
            "a CA went into the environment"
        );
        let toml = crate::resources::config::relay_toml(&v);
        assert!(
            toml.contains("ca_file = \"/etc/outbox-relay/redis-ca/ca.crt\""),
            "{toml}"
        );
    }

    #[test]
    fn locked_down_security_context_and_probes() {
        let d = deployment();
        let spec = d.spec.expect("spec");
        assert_eq!(spec.replicas, Some(3));
        let pod = spec.template.spec.expect("pod");
        let psc = pod.security_context.expect("pod security context");
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(
            psc.seccomp_profile.map(|s| s.type_).as_deref(),
            Some("RuntimeDefault")
        );
        let c = &pod.containers[0];
        let sc = c
            .security_context
            .as_ref()
            .expect("container security context");
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(
            sc.capabilities.as_ref().and_then(|c| c.drop.clone()),
            Some(vec!["ALL".to_string()])
        );
        let path = |p: &Option<Probe>| {
            p.as_ref()
                .and_then(|p| p.http_get.as_ref())
                .and_then(|h| h.path.clone())
        };
        assert_eq!(path(&c.liveness_probe).as_deref(), Some("/healthz"));
        assert_eq!(path(&c.readiness_probe).as_deref(), Some("/readyz"));
        assert_eq!(pod.service_account_name.as_deref(), Some("orders-relay"));
        let ann = spec
            .template
            .metadata
            .and_then(|m| m.annotations)
            .expect("annotations");
        assert_eq!(ann[CONFIG_HASH], "abc");
    }

    #[test]
    fn config_hash_follows_config_and_secret_versions() {
        let secrets = BTreeMap::from([("mysql-relay".to_string(), "41".to_string())]);
        let a = config_hash("x = 1", &secrets);
        assert_eq!(a, config_hash("x = 1", &secrets));
        assert_ne!(a, config_hash("x = 2", &secrets));
        let rotated = BTreeMap::from([("mysql-relay".to_string(), "42".to_string())]);
        assert_ne!(a, config_hash("x = 1", &rotated));
    }
}
