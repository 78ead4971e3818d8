//! The whole kube control plane (`server::start_kube`) against a scripted API
//! server: status (and the mesh root ConfigMaps) are written only once this
//! replica holds the Lease.

use http::Method;
use serde_json::Value;
use tokio::sync::oneshot;

use super::super::fake_api::{FakeApi, fixture_json};
use super::policy_status::{accept_listed_patches, cluster, eventually};
use crate::registry::kube::NamespaceScope;
use crate::server::{ControlConfig, KubeOptions, start_kube};

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/trellis-system/leases";
const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/trellis-system/leases/trellis-control";
const SECRET: &str = "/api/v1/namespaces/trellis-system/secrets/trellis-ca-root";
const ME: &str = "trellis-control-7d9f8c6b5-q2w3e";

fn lease_held_by(holder: &str) -> Value {
    let mut lease = fixture_json("lease-held.json");
    lease["spec"]["holderIdentity"] = holder.into();
    lease
}

fn config() -> ControlConfig {
    ControlConfig {
        registry_dir: Default::default(),
        state_dir: Default::default(),
        trust_domain: "cluster.local".into(),
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        cert_ttl: std::time::Duration::from_secs(3600),
        server_names: vec!["localhost".into()],
    }
}

/// Another replica holds the Lease at first: this one serves, but writes no status
/// until the Lease is free and it has taken it.
#[tokio::test]
async fn only_the_lease_holder_writes_status() {
    let mut api = FakeApi::new();
    let _feeds = cluster(&mut api);
    accept_listed_patches(&mut api);
    api.reply(
        Method::GET,
        SECRET,
        200,
        fixture_json("secret-ca-root.json"),
    );
    // First round: held by someone else. Second round (only when the test says):
    // the Lease is gone, so this replica creates it and leads.
    let other = fixture_json("lease-held.json");
    api.reply(Method::GET, LEASE, 200, other);
    let (free_the_lease, lease_gate) = oneshot::channel();
    api.reply_gated(
        Method::GET,
        LEASE,
        404,
        fixture_json("lease-not-found.json"),
        lease_gate,
    );
    api.reply(Method::POST, LEASES, 201, lease_held_by(ME));
    let (client, seen) = api.start();

    let running = start_kube(
        config(),
        KubeOptions {
            client,
            namespace: "trellis-system".into(),
            root_namespace: "trellis-system".into(),
            discovery_scope: NamespaceScope::all(),
            identity: ME.into(),
            webhook: None,
        },
    )
    .await
    .unwrap();
    // The second round has begun (one renew interval after the first): a writer
    // not tied to the Lease has long had the report and written it.
    eventually("the second Lease round", || {
        seen.count(&format!("GET {LEASE}?")) == 2
    })
    .await;
    assert!(!*running.leading.borrow());
    assert_eq!(
        seen.count("PATCH "),
        0,
        "status written without the Lease: {:#?}",
        seen.requests()
    );

    free_the_lease.send(()).unwrap();
    eventually("the statuses, once leading", || {
        seen.count("PATCH /apis/trellis.io/") == 5
    })
    .await;
    assert!(*running.leading.borrow());
    let requests = seen.requests();
    let took_lease = requests
        .iter()
        .position(|r| r.starts_with(&format!("POST {LEASES}")))
        .unwrap();
    let first_patch = requests
        .iter()
        .position(|r| r.starts_with("PATCH "))
        .unwrap();
    assert!(took_lease < first_patch, "{requests:#?}");
    // Dropped, not stopped: releasing the Lease would wait on an unscripted read.
    drop(running);
}
