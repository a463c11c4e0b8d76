//! The operator and the relay agree: what the operator renders from the
//! samples is a config the relay accepts, with every secret from env.

use outbox_operator::crd::OutboxRelay;
use outbox_operator::resources::config::relay_toml;
use outbox_operator::resources::deployment::env_name;
use outbox_operator::validate::{election_timing, validate};

use crate::support::root;

fn sample(name: &str) -> OutboxRelay {
    let text = std::fs::read_to_string(root().join("config/samples").join(name)).expect("sample");
    let mut r: OutboxRelay =
        serde_saphyr::from_str(&text).expect("sample parses as an OutboxRelay");
    r.metadata.namespace = Some("shop".into());
    r.metadata.uid = Some("0b7e6c1e-8f4f-4b8e-9a55-2d1b0c1f3a77".into());
    r
}

#[test]
fn relay_accepts_the_config_the_operator_renders_from_the_samples() {
    for name in [
        "outboxrelay-minimal.yaml",
        "outboxrelay-full.yaml",
        "outboxrelay-nats.yaml",
        "outboxrelay-postgres.yaml",
    ] {
        let v = validate(&sample(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let toml = relay_toml(&v);
        // The pod gets each secret as the env variable the Deployment sets.
        let env: Vec<(String, String)> = v
            .secrets
            .iter()
            .filter_map(|(u, _)| Some((env_name(u)?, "from-a-secret".to_string())))
            .collect();
        let cfg = outbox_relay::config::Config::from_toml(&toml, std::path::Path::new(name), &env)
            .unwrap_or_else(|e| {
                panic!("{name}: the relay refuses the rendered config: {e}\n{toml}")
            });
        if cfg.mysql.is_some() {
            assert_eq!(cfg.server_id(), v.server_id);
        }
        let (password, outboxes) =
            match (&cfg.mysql, &cfg.postgres, &v.spec.mysql, &v.spec.postgres) {
                (Some(m), None, Some(spec), None) => (&m.password, spec.outboxes.len()),
                (None, Some(p), None, Some(spec)) => {
                    assert_eq!(p.database, spec.database);
                    (&p.password, spec.outboxes.len())
                }
                _ => panic!("{name}: the rendered database is not the spec's:\n{toml}"),
            };
        assert_eq!(password.expose(), "from-a-secret");
        // The Lease timing the relay runs with is the one the operator checked.
        let timing = v
            .spec
            .election
            .as_ref()
            .map_or_else(Default::default, |e| election_timing(e).expect("timing"));
        assert_eq!(cfg.election.timing(), timing, "{name}");
        assert_eq!(cfg.outboxes.len(), outboxes);
        assert_eq!(cfg.kafka.is_some(), v.spec.kafka.is_some(), "{name}");
        assert_eq!(cfg.changes.is_some(), v.spec.changes.is_some(), "{name}");
        assert_eq!(cfg.nats.is_some(), v.spec.nats.is_some(), "{name}");
        if let Some(n) = &cfg.nats {
            assert_eq!(
                n.password.as_ref().map(|p| p.expose()),
                Some("from-a-secret")
            );
            assert_eq!(
                n.tls_ca_file.as_deref(),
                Some(std::path::Path::new("/etc/outbox-relay/nats-ca/ca.crt"))
            );
            assert!(n.tls_required);
        }
    }
}

#[test]
fn operator_and_relay_agree_on_which_kafka_properties_are_secret() {
    for k in [
        "sasl.password",
        "ssl.key.password",
        "ssl.keystore.password",
        "SSL.KEY.PEM",
        "sasl.oauthbearer.config",
        "sasl.oauthbearer.client.secret",
        "sasl.username",
        "security.protocol",
        "ssl.ca.location",
        "compression.type",
    ] {
        assert_eq!(
            outbox_operator::validate::is_secret_property(k),
            outbox_relay::config::is_secret_property(k),
            "{k}"
        );
    }
}

/// `checkpointPolicy: Delete` deletes exactly the relay's keys in a real
/// Redis (checkpoint, election lock, epoch), nothing of another relay.
#[tokio::test]
async fn delete_policy_removes_exactly_the_relays_keys_from_redis() {
    use outbox_operator::cleanup::{delete_checkpoint, relay_name, RedisTarget};
    use outbox_relay::keys::all_keys;

    crate::support::services();
    let ns = format!("ns{}", crate::support::unique());
    let gone = relay_name(&ns, "orders");
    let kept = relay_name(&ns, "billing");
    let client = redis::Client::open(crate::support::redis_url()).expect("redis url");
    let mut c = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    for relay in [&gone, &kept] {
        for k in all_keys("test:", relay) {
            let _: () = redis::cmd("SET")
                .arg(&k)
                .arg("x")
                .query_async(&mut c)
                .await
                .expect("set");
        }
    }
    let target = |url| RedisTarget {
        url,
        password: None,
        ca: None,
        key_prefix: Some("test:"),
    };
    let n = delete_checkpoint(target(crate::support::redis_url()), &gone)
        .await
        .expect("delete");
    assert_eq!(n, 3);
    let count = |keys: [String; 3]| {
        let mut c = c.clone();
        async move {
            redis::cmd("EXISTS")
                .arg(&keys[..])
                .query_async::<usize>(&mut c)
                .await
                .expect("exists")
        }
    };
    assert_eq!(count(all_keys("test:", &gone)).await, 0);
    assert_eq!(count(all_keys("test:", &kept)).await, 3);
    // Unreachable Redis: a clear error, no panic.
    let unreachable = RedisTarget {
        password: Some("hunter2".into()),
        ..target("redis://127.0.0.1:1/0")
    };
    let e = delete_checkpoint(unreachable, &gone)
        .await
        .expect_err("unreachable");
    assert!(e.starts_with("redis:") && !e.contains("hunter2"), "{e}");

    // A TLS Redis with a private CA and a password, as `spec.redis.caSecret`
    // and `passwordSecret` describe it.
    let scratch = crate::support::Scratch::new("delete-tls");
    let certs = crate::security::make_certs(&scratch.0.join("certs"));
    let redis = crate::security::tls_redis(&scratch.0, &certs, &["--requirepass", "tls-pass"]);
    let url = format!("rediss://127.0.0.1:{}/0", redis.port);
    let seed = redis::Client::build_with_tls(
        format!("rediss://:tls-pass@127.0.0.1:{}/0", redis.port).as_str(),
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(std::fs::read(&certs.ca).expect("ca")),
        },
    )
    .expect("tls client");
    let mut tc = seed
        .get_multiplexed_async_connection()
        .await
        .expect("tls redis");
    for k in all_keys("test:", &gone) {
        let _: () = redis::cmd("SET")
            .arg(&k)
            .arg("x")
            .query_async(&mut tc)
            .await
            .expect("set");
    }
    let tls = RedisTarget {
        password: Some("tls-pass".into()),
        ca: Some(std::fs::read(&certs.ca).expect("ca")),
        ..target(&url)
    };
    assert_eq!(delete_checkpoint(tls, &gone).await, Ok(3));
    // The system's roots do not know the test's CA.
    let untrusted = RedisTarget {
        password: Some("tls-pass".into()),
        ..target(&url)
    };
    let e = delete_checkpoint(untrusted, &gone)
        .await
        .expect_err("untrusted");
    assert!(e.contains("certificate") && !e.contains("tls-pass"), "{e}");
}

/// What the relay writes into the status is exactly what the CRD's status
/// type holds (no field lost on the way), and none of it is the operator's.
#[test]
fn relay_status_fields_fit_the_crd_and_stay_off_the_operators() {
    use outbox_operator::crd::OutboxRelayStatus;
    use outbox_relay::position::{BinlogPosition, FilePos, Position};
    use outbox_relay::status::{status_fields, Progress};

    let p = Progress::default();
    p.set_leader("orders-relay-0", 9);
    p.set_position(&Position::Binlog(BinlogPosition {
        gtid: None,
        file: FilePos {
            file: "mysql-bin.000003".into(),
            pos: 1234,
        },
        commit_ts: 1_800_000_000,
        server_id: Some(1),
    }));
    p.add_published(10, 999);
    p.set_error("bad outbox row id=7");
    let fields = status_fields(&p.snapshot());
    let typed: OutboxRelayStatus = serde_json::from_value(fields.clone()).expect("fits");
    assert_eq!(serde_json::to_value(&typed).expect("json"), fields);
    assert!(typed.conditions.is_empty() && typed.observed_generation.is_none());
    assert_eq!(typed.leader.expect("leader").epoch, 9);
    assert_eq!(
        typed.position.expect("position").short,
        "mysql-bin.000003:1234"
    );
}
