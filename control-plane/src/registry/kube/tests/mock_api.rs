//! The whole registry loop against a scripted API server: recorded lists, watch
//! streams with ADDED/MODIFIED/DELETED/BOOKMARK, 404s for the Gateway API and Trellis
//! CRDs, and an ERROR 410 Gone that forces a re-list.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{oneshot, watch};

use super::super::fake_api::{FakeApi, fixture_json};
use super::super::*;
use crate::model::{MeshSnapshot, ServiceKey};

const SERVICES: &str = "/api/v1/services";
const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
const PODS: &str = "/api/v1/pods";
const NAMESPACES: &str = "/api/v1/namespaces";
const SERVICE_ACCOUNTS: &str = "/api/v1/serviceaccounts";
const HTTP_ROUTES: &str = "/apis/gateway.networking.k8s.io/v1/httproutes";
pub(super) const TRAFFIC_POLICIES: &str = "/apis/trellis.io/v1alpha1/trafficpolicies";
pub(super) const AUTHORIZATION_POLICIES: &str = "/apis/trellis.io/v1alpha1/authorizationpolicies";
pub(super) const PEER_AUTHENTICATIONS: &str = "/apis/trellis.io/v1alpha1/peerauthentications";

fn key(ns: &str, name: &str) -> ServiceKey {
    ServiceKey {
        namespace: ns.into(),
        name: name.into(),
    }
}

pub(super) async fn wait_for(
    rx: &mut watch::Receiver<Arc<MeshSnapshot>>,
    what: &str,
    done: impl FnMut(&Arc<MeshSnapshot>) -> bool,
) -> Arc<MeshSnapshot> {
    let found = match tokio::time::timeout(Duration::from_secs(5), rx.wait_for(done)).await {
        Ok(Ok(s)) => Some(s.clone()),
        _ => None,
    };
    found.unwrap_or_else(|| panic!("timed out waiting for {what}; last: {:#?}", rx.borrow()))
}

fn ready_endpoints(s: &MeshSnapshot, ns: &str, name: &str, port: u16) -> Vec<String> {
    s.endpoints
        .get(&(key(ns, name), port))
        .into_iter()
        .flatten()
        .filter(|e| e.ready)
        .map(|e| format!("{}:{}", e.address, e.port))
        .collect()
}

#[tokio::test]
async fn follows_the_api_from_list_through_changes_and_a_410_relist() {
    let mut api = FakeApi::new();
    api.list(SERVICES, fixture_json("services-list.json"));
    let services = api.watch(SERVICES, "1000");
    api.list(SLICES, fixture_json("endpointslices-list.json"));
    let slices = api.watch(SLICES, "1000");
    // After 410 Gone: a fresh list, and a watch from its resourceVersion.
    api.list(SLICES, fixture_json("endpointslices-relist.json"));
    let _slices_after_relist = api.watch(SLICES, "2000");
    let (release_pods, pods_gate) = oneshot::channel();
    api.list_gated(PODS, fixture_json("pods-list.json"), pods_gate);
    let _pods = api.watch(PODS, "1000");
    api.list(NAMESPACES, fixture_json("namespaces-list.json"));
    let _namespaces = api.watch(NAMESPACES, "1000");
    api.list(SERVICE_ACCOUNTS, fixture_json("serviceaccounts-list.json"));
    let _service_accounts = api.watch(SERVICE_ACCOUNTS, "1000");
    api.reply(
        http::Method::GET,
        HTTP_ROUTES,
        404,
        fixture_json("httproutes-not-found.json"),
    );
    // No Trellis CRDs installed either: the registry carries on without policies.
    for path in [
        TRAFFIC_POLICIES,
        AUTHORIZATION_POLICIES,
        PEER_AUTHENTICATIONS,
    ] {
        api.reply(
            http::Method::GET,
            path,
            404,
            fixture_json("crd-not-found.json"),
        );
    }
    let (client, seen) = api.start();

    let (snapshots, mut snapshot_rx) = watch::channel(Arc::new(MeshSnapshot::default()));
    let (status, status_rx) = watch::channel(RegistryStatus::default());
    let (namespaces, namespaces_rx) = watch::channel(Arc::new(NamespaceLabels::default()));
    let (statuses, _statuses_rx) = watch::channel(Arc::new(StatusReport::default()));
    let out = Outputs {
        snapshots,
        status,
        namespaces,
        statuses,
    };
    let registry = tokio::spawn(watch_cluster(
        client,
        MeshNames {
            trust_domain: "cluster.local".into(),
            root_namespace: "trellis-system".into(),
            scope: NamespaceScope::all(),
        },
        Duration::from_millis(20),
        out,
    ));

    // Everything but Pods has listed (and HTTPRoute is known to be absent): no
    // snapshot yet, since it would have endpoints without identities.
    let listed = async {
        while seen.count(&format!("GET {SERVICE_ACCOUNTS}?")) < 2
            || seen.count(&format!("GET {NAMESPACES}?")) < 2
            || seen.count(&format!("GET {HTTP_ROUTES}?")) < 1
            || seen.count(&format!("GET {TRAFFIC_POLICIES}?")) < 1
            || seen.count(&format!("GET {AUTHORIZATION_POLICIES}?")) < 1
            || seen.count(&format!("GET {PEER_AUTHENTICATIONS}?")) < 1
            || seen.count(&format!("GET {SLICES}?")) < 2
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), listed)
        .await
        .unwrap_or_else(|_| panic!("lists not requested: {:#?}", seen.requests()));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        status_rx.borrow().generation,
        0,
        "published a half-built view"
    );

    release_pods.send(()).unwrap();
    let s = wait_for(&mut snapshot_rx, "the initial snapshot", |s| {
        !s.services.is_empty()
    })
    .await;
    assert_eq!(status_rx.borrow().generation, 1);
    assert_eq!(s.services.len(), 2);
    assert_eq!(s.workloads.len(), 3);
    assert!(s.traffic_policies.is_empty() && s.authorization_policies.is_empty());
    assert!(s.peer_authentications.is_empty() && s.routes.is_empty());
    assert_eq!(
        ready_endpoints(&s, "default", "echo", 80),
        ["10.244.1.5:8080", "10.244.2.7:8080"]
    );
    let ids: Vec<_> = s.endpoints[&(key("default", "echo"), 80)]
        .iter()
        .map(|e| {
            e.identity
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default()
        })
        .collect();
    assert_eq!(ids, ["spiffe://cluster.local/ns/default/sa/echo"; 2]);
    assert_eq!(
        namespaces_rx.borrow()["default"]["trellis.io/inject"],
        "enabled"
    );

    // A Service is added, another modified, then the first deleted.
    services.send_line("services-watch.jsonl", 0);
    let s = wait_for(&mut snapshot_rx, "cart added", |s| {
        s.services.contains_key(&key("shop", "cart"))
    })
    .await;
    assert_eq!(
        s.services[&key("shop", "cart")].vips,
        ["10.96.20.30".parse::<std::net::IpAddr>().unwrap()]
    );
    services.send_line("services-watch.jsonl", 1);
    let s = wait_for(&mut snapshot_rx, "echo's second port", |s| {
        s.services[&key("default", "echo")].ports.len() == 2
    })
    .await;
    // No slice port for it yet: the port exists with no endpoints.
    assert!(ready_endpoints(&s, "default", "echo", 8081).is_empty());
    services.send_line("services-watch.jsonl", 2);
    wait_for(&mut snapshot_rx, "cart deleted", |s| {
        !s.services.contains_key(&key("shop", "cart"))
    })
    .await;
    // A bookmark moves the resourceVersion and changes nothing.
    let generation = status_rx.borrow().generation;
    services.send_line("services-watch.jsonl", 3);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(status_rx.borrow().generation, generation);

    // The EndpointSlice is modified: the second Pod is terminating.
    slices.send_line("endpointslices-watch.jsonl", 0);
    let s = wait_for(&mut snapshot_rx, "echo-2 not ready", |s| {
        ready_endpoints(s, "default", "echo", 80).len() == 1
    })
    .await;
    assert_eq!(
        ready_endpoints(&s, "default", "echo", 8081),
        ["10.244.1.5:8081"]
    );
    assert_eq!(s.endpoints[&(key("default", "echo"), 80)].len(), 2);

    // 410 Gone: the watcher lists again; the re-list no longer has the second
    // endpoint at all, and the snapshot follows without a DELETED event.
    slices.send_line("endpointslices-watch.jsonl", 1);
    let s = wait_for(&mut snapshot_rx, "the re-listed slice", |s| {
        s.endpoints[&(key("default", "echo"), 80)].len() == 1
    })
    .await;
    assert_eq!(
        ready_endpoints(&s, "default", "echo", 80),
        ["10.244.1.5:8080"]
    );
    assert_eq!(
        seen.count(&format!("GET {SLICES}?")),
        4,
        "{:#?}",
        seen.requests()
    );
    assert_eq!(s.services.len(), 2);
    assert!(status_rx.borrow().last_error.is_empty());

    registry.abort();
}
