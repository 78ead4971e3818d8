//! The mesh root ConfigMaps against a scripted API server.

use std::sync::Arc;
use std::time::Duration;

use http::Method;
use serde_json::json;
use tokio::sync::watch;

use super::*;
use crate::registry::kube::fake_api::FakeApi;

const ROOT: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

fn path(ns: &str) -> String {
    format!("/api/v1/namespaces/{ns}/configmaps/trellis-ca-root")
}

fn labels(names: &[&str]) -> Arc<NamespaceLabels> {
    Arc::new(
        names
            .iter()
            .map(|n| (n.to_string(), BTreeMap::new()))
            .collect(),
    )
}

async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let waited = tokio::time::timeout(Duration::from_secs(5), async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "timed out waiting for {what}");
}

/// Only the leader writes; every namespace but Kubernetes' own gets the root, a
/// new namespace too, and each is written once.
#[tokio::test]
async fn the_leader_writes_the_root_into_every_namespace() {
    let mut api = FakeApi::new();
    api.reply(
        Method::GET,
        "/api/v1/namespaces/trellis-system",
        200,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "trellis-system", "uid": "ns-uid-1"}}),
    );
    for ns in ["shop", "trellis-system", "billing"] {
        api.reply(Method::PATCH, &path(ns), 200, json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "trellis-ca-root", "namespace": ns}}));
    }
    let (client, seen) = api.start();
    let (namespaces_tx, namespaces) =
        watch::channel(labels(&["shop", "trellis-system", "kube-system"]));
    let (leading_tx, leading) = watch::channel(false);
    let task = tokio::spawn(publish_ca_root(
        client,
        ROOT.into(),
        "trellis-system".into(),
        namespaces,
        leading,
    ));

    // A follower: a namespace change wakes it, and it writes nothing.
    namespaces_tx
        .send(labels(&[
            "shop",
            "trellis-system",
            "kube-system",
            "kube-public",
        ]))
        .unwrap();
    // One thread: these yields let the publisher and the fake run to quiet.
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert_eq!(seen.count("PATCH "), 0, "{:#?}", seen.requests());

    leading_tx.send(true).unwrap();
    eventually("the ConfigMaps", || seen.count("PATCH ") == 2).await;
    namespaces_tx
        .send(labels(&[
            "shop",
            "trellis-system",
            "kube-system",
            "billing",
        ]))
        .unwrap();
    eventually("the new namespace's ConfigMap", || {
        seen.count("PATCH ") == 3
    })
    .await;
    let requests: Vec<String> = seen
        .requests()
        .into_iter()
        .filter(|r| r.starts_with("PATCH "))
        .collect();
    let query = "&force=true&fieldManager=trellis-control";
    for (i, ns) in ["shop", "trellis-system", "billing"].iter().enumerate() {
        assert_eq!(requests[i], format!("PATCH {}?{query}", path(ns)));
    }
    // The control plane's namespace is read once, as the owner of every copy.
    assert_eq!(seen.count("GET /api/v1/namespaces/trellis-system"), 1);
    let bodies: Vec<_> = seen
        .bodies()
        .into_iter()
        .filter(|b| b["kind"] == "ConfigMap")
        .collect();
    let body = &bodies[0];
    assert_eq!(
        body["metadata"]["ownerReferences"],
        json!([{"apiVersion": "v1", "kind": "Namespace", "name": "trellis-system", "uid": "ns-uid-1"}])
    );
    assert_eq!(body["kind"], "ConfigMap");
    assert_eq!(body["metadata"]["name"], "trellis-ca-root");
    assert_eq!(body["data"]["root-cert.pem"], ROOT);
    task.abort();
}
