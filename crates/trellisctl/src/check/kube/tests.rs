//! The Kubernetes checks on recorded objects (as the API server returns them).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use k8s_openapi::ByteString;
use serde_json::json;
use trellis_control::ca::CertificateAuthority;

use super::*;

fn from<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
    serde_json::from_value(value).unwrap()
}

fn info(minor: &str, git: &str) -> Info {
    from(
        json!({"major": "1", "minor": minor, "gitVersion": git, "gitCommit": "", "gitTreeState": "", "buildDate": "2026-01-01T00:00:00Z", "goVersion": "", "compiler": "", "platform": ""}),
    )
}

#[test]
fn versions() {
    assert_eq!(
        version_check(Ok(&info("34+", "v1.34.2-eks"))),
        Check::passed("Kubernetes API reachable (v1.34.2-eks)")
    );
    let old = version_check(Ok(&info("30", "v1.30.1")));
    assert!(!old.ok);
    assert_eq!(
        old.message,
        "Kubernetes v1.30.1 is not supported (1.33 or newer is)"
    );
    assert!(!version_check(Err("connection refused".into())).ok);
}

fn crd(name: &str, established: &str) -> CustomResourceDefinition {
    from(json!({
        "metadata": {"name": name},
        "spec": {"group": "trellis.io", "names": {"kind": "X", "plural": "xs"}, "scope": "Namespaced", "versions": []},
        "status": {"conditions": [{"type": "Established", "status": established}]}
    }))
}

#[test]
fn crds_must_exist_and_be_established() {
    let all = [
        (CRD_NAMES[0], Some(crd(CRD_NAMES[0], "True"))),
        (CRD_NAMES[1], Some(crd(CRD_NAMES[1], "True"))),
        (CRD_NAMES[2], Some(crd(CRD_NAMES[2], "True"))),
    ];
    assert_eq!(
        crds_check(&all),
        Check::passed("CRDs installed and Established (3)")
    );
    let broken = [
        (CRD_NAMES[0], Some(crd(CRD_NAMES[0], "True"))),
        (CRD_NAMES[1], Some(crd(CRD_NAMES[1], "False"))),
        (CRD_NAMES[2], None),
    ];
    let c = crds_check(&broken);
    assert!(!c.ok);
    assert_eq!(
        c.message,
        "CRDs: authorizationpolicies.trellis.io not Established, peerauthentications.trellis.io missing"
    );
}

#[test]
fn the_control_plane_must_be_ready() {
    let deployment = |replicas: i32, ready: i32| -> Deployment {
        from(
            json!({"metadata": {"name": "trellis-control"}, "spec": {"replicas": replicas, "selector": {}, "template": {}}, "status": {"readyReplicas": ready}}),
        )
    };
    assert_eq!(
        deployment_check("trellis-system", Some(&deployment(2, 2))),
        Check::passed("control plane ready (2/2 replicas)")
    );
    let c = deployment_check("trellis-system", Some(&deployment(2, 0)));
    assert_eq!(
        (c.ok, c.message.as_str()),
        (false, "control plane not ready (0/2 replicas)")
    );
    assert!(!deployment_check("trellis-system", None).ok);
}

#[test]
fn the_lease_must_be_held_and_fresh() {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let lease = |renewed_secs_ago: u64| -> Lease {
        let renewed =
            k8s_openapi::jiff::Timestamp::try_from(now - Duration::from_secs(renewed_secs_ago))
                .unwrap();
        from(
            json!({"metadata": {"name": "trellis-control"}, "spec": {"holderIdentity": "trellis-control-7d9f-abc", "leaseDurationSeconds": 15, "renewTime": renewed.to_string()}}),
        )
    };
    assert_eq!(
        lease_check("trellis-system", Some(&lease(3)), now),
        Check::passed(
            "leader elected (trellis-control-7d9f-abc holds Lease trellis-system/trellis-control)"
        )
    );
    let stale = lease_check("trellis-system", Some(&lease(60)), now);
    assert_eq!(
        (stale.ok, stale.message.as_str()),
        (
            false,
            "Lease trellis-system/trellis-control held by trellis-control-7d9f-abc but not renewed within 15s"
        )
    );
    assert!(!lease_check("trellis-system", None, now).ok);
}

fn webhook(bundle: Option<&str>) -> MutatingWebhookConfiguration {
    let mut config: MutatingWebhookConfiguration = from(json!({
        "metadata": {"name": "trellis-injector"},
        "webhooks": [{"name": "inject.trellis.io", "admissionReviewVersions": ["v1"], "sideEffects": "None",
                      "clientConfig": {"service": {"name": "trellis-control", "namespace": "trellis-system", "port": 15017}}}]
    }));
    if let (Some(bundle), Some(hooks)) = (bundle, config.webhooks.as_mut()) {
        hooks[0].client_config.ca_bundle = Some(ByteString(bundle.as_bytes().to_vec()));
    }
    config
}

fn root(dir: &std::path::Path) -> String {
    let ca = CertificateAuthority::load_or_create(dir, "cluster.local", Duration::from_secs(3600))
        .unwrap();
    ca.trust_bundle_pem().concat()
}

#[test]
fn the_webhook_needs_the_mesh_root_as_its_ca_bundle() {
    let now = SystemTime::now();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (root_a, root_b) = (root(a.path()), root(b.path()));
    assert_eq!(
        webhook_check(Some(&webhook(Some(&root_a))), Some(&root_a), now),
        Check::passed("webhook trellis-injector configured with a valid caBundle (1 webhooks)")
    );
    let other = webhook_check(Some(&webhook(Some(&root_b))), Some(&root_a), now);
    assert_eq!(
        (other.ok, other.message.as_str()),
        (
            false,
            "webhook inject.trellis.io: caBundle is not the mesh root that signs the webhook's certificate"
        )
    );
    let empty = webhook_check(Some(&webhook(None)), Some(&root_a), now);
    assert_eq!(empty.message, "webhook inject.trellis.io has no caBundle");
    let garbage = webhook_check(Some(&webhook(Some("hello"))), None, now);
    assert!(
        !garbage.ok
            && garbage
                .message
                .starts_with("webhook inject.trellis.io: caBundle is not PEM"),
        "{garbage:?}"
    );
    let later = now + Duration::from_secs(20 * 365 * 24 * 3600);
    let expired = webhook_check(Some(&webhook(Some(&root_a))), None, later);
    assert_eq!(
        expired.message,
        "webhook inject.trellis.io: caBundle has expired"
    );
    assert!(!webhook_check(None, None, now).ok);
}

fn pod(
    name: &str,
    containers: serde_json::Value,
    annotations: serde_json::Value,
    phase: &str,
) -> Pod {
    from(json!({
        "metadata": {"name": name, "annotations": annotations},
        "spec": {"containers": containers, "initContainers": []},
        "status": {"phase": phase}
    }))
}

#[test]
fn enabled_namespaces_flag_pods_without_the_sidecar() {
    let app = json!([{"name": "app", "image": "app"}]);
    let injected = pod("web-1", app.clone(), json!({}), "Running");
    let mut injected = injected;
    if let Some(spec) = injected.spec.as_mut() {
        spec.init_containers = Some(vec![from(
            json!({"name": "trellis-proxy", "image": "proxy"}),
        )]);
    }
    let pods = BTreeMap::from([(
        "shop".to_owned(),
        vec![
            injected.clone(),
            pod("legacy-1", app.clone(), json!({}), "Running"),
            pod(
                "opted-out",
                app.clone(),
                json!({"trellis.io/inject": "false"}),
                "Running",
            ),
            pod("job-done", app.clone(), json!({}), "Succeeded"),
        ],
    )]);
    let c = uninjected_check(&pods);
    assert_eq!(
        (c.ok, c.message.as_str()),
        (
            false,
            "1 pods in enabled namespaces run without the sidecar: shop/legacy-1"
        )
    );
    let good = BTreeMap::from([("shop".to_owned(), vec![injected])]);
    assert_eq!(
        uninjected_check(&good),
        Check::passed("every pod in the 1 enabled namespaces has the sidecar")
    );
}

#[test]
fn policies_not_accepted_fail() {
    let object = |name: &str, status: &str| -> DynamicObject {
        from(json!({
            "apiVersion": "trellis.io/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {},
            "status": {"conditions": [{"type": "Accepted", "status": status, "reason": "Invalid",
                        "message": "spec.rules[0].from[0].principals[0]: not a SPIFFE ID"}]}
        }))
    };
    let policies = [
        ("AuthorizationPolicy", object("good", "True")),
        ("AuthorizationPolicy", object("bad", "False")),
    ];
    let checks = policy_checks(&policies);
    assert_eq!(checks.len(), 1);
    assert_eq!(
        checks[0].message,
        "AuthorizationPolicy shop/bad not accepted: Invalid: spec.rules[0].from[0].principals[0]: not a SPIFFE ID"
    );
    assert_eq!(
        policy_checks(&policies[..1]),
        [Check::passed("1 policies accepted")]
    );
}
