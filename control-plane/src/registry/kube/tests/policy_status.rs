//! The Trellis policy CRDs through the whole loop against a scripted API server:
//! listed into the snapshot, judged, and their statuses written with a PATCH of
//! `/status` only when they differ and only while this replica leads.

use std::sync::Arc;
use std::time::Duration;

use http::Method;
use serde_json::{Value, json};
use tokio::sync::watch;

use super::super::fake_api::{FakeApi, Seen, WatchFeed, fixture_json};
use super::super::*;
use super::mock_api::{AUTHORIZATION_POLICIES, PEER_AUTHENTICATIONS, TRAFFIC_POLICIES, wait_for};
use crate::model::{MeshSnapshot, ServiceKey};

const TRELLIS: &str = "/apis/trellis.io/v1alpha1";

/// The recorded cluster: its core lists (watches left open and quiet), no
/// HTTPRoute CRD, and the three Trellis lists. Returns the policy watch feeds.
pub(super) fn cluster(api: &mut FakeApi) -> PolicyFeeds {
    cluster_with_routes(api, None)
}

/// [`cluster`], with the HTTPRoute CRD installed when `routes` (a list) is given.
fn cluster_with_routes(api: &mut FakeApi, routes: Option<Value>) -> PolicyFeeds {
    for (path, list) in [
        ("/api/v1/services", "services-list.json"),
        (
            "/apis/discovery.k8s.io/v1/endpointslices",
            "endpointslices-list.json",
        ),
        ("/api/v1/pods", "pods-list.json"),
        ("/api/v1/namespaces", "namespaces-list.json"),
        ("/api/v1/serviceaccounts", "serviceaccounts-list.json"),
    ] {
        api.list(path, fixture_json(list));
        std::mem::forget(api.watch(path, "1000"));
    }
    let http_routes = "/apis/gateway.networking.k8s.io/v1/httproutes";
    match routes {
        Some(list) => {
            api.list(http_routes, list);
            std::mem::forget(api.watch(http_routes, "1000"));
        }
        None => {
            api.reply(
                Method::GET,
                http_routes,
                404,
                fixture_json("httproutes-not-found.json"),
            );
        }
    }
    api.list(TRAFFIC_POLICIES, fixture_json("trafficpolicies-list.json"));
    api.list(
        AUTHORIZATION_POLICIES,
        fixture_json("authorizationpolicies-list.json"),
    );
    api.list(
        PEER_AUTHENTICATIONS,
        fixture_json("peerauthentications-list.json"),
    );
    PolicyFeeds {
        traffic: api.watch(TRAFFIC_POLICIES, "1000"),
        authorization: api.watch(AUTHORIZATION_POLICIES, "1000"),
        _peer: api.watch(PEER_AUTHENTICATIONS, "1000"),
    }
}

pub(super) struct PolicyFeeds {
    traffic: WatchFeed,
    authorization: WatchFeed,
    _peer: WatchFeed,
}

/// `…/namespaces/<ns>/<plural>/<name>/status`
fn status_path(plural: &str, ns: &str, name: &str) -> String {
    format!("{TRELLIS}/namespaces/{ns}/{plural}/{name}/status")
}

/// Answers a status PATCH as the API server does: with the object.
fn accept_patch(api: &mut FakeApi, kind: &str, plural: &str, ns: &str, name: &str) {
    let object = json!({
        "apiVersion": "trellis.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": name, "namespace": ns, "resourceVersion": "1001"},
    });
    api.reply(Method::PATCH, &status_path(plural, ns, name), 200, object);
}

/// Answers one status PATCH of each listed object whose status differs: all but
/// echo-readers.
pub(super) fn accept_listed_patches(api: &mut FakeApi) {
    for name in ["echo", "canary", "slow", "cart"] {
        accept_patch(api, "TrafficPolicy", "trafficpolicies", "default", name);
    }
    let (kind, plural) = ("PeerAuthentication", "peerauthentications");
    accept_patch(api, kind, plural, "trellis-system", "default");
}

/// The status PATCHes the fake saw: (path and query, body), in order.
fn patches(seen: &Seen) -> Vec<(String, Value)> {
    // Only PATCHes carry JSON bodies here.
    let requests: Vec<String> = seen
        .requests()
        .into_iter()
        .filter(|r| r.starts_with("PATCH "))
        .collect();
    requests.into_iter().zip(seen.bodies()).collect()
}

pub(super) async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let waited = tokio::time::timeout(Duration::from_secs(5), async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "timed out waiting for {what}");
}

struct Running {
    snapshots: watch::Receiver<Arc<MeshSnapshot>>,
    status: watch::Receiver<RegistryStatus>,
    progress: watch::Receiver<WriterProgress>,
    events: tokio::sync::mpsc::Receiver<crate::events::MeshEvent>,
    tasks: [tokio::task::JoinHandle<()>; 2],
}

impl Running {
    /// The Events recorded so far: (reason, namespace/name, note).
    fn events(&mut self) -> Vec<(String, String, String)> {
        let mut events = Vec::new();
        while let Ok(e) = self.events.try_recv() {
            assert!(e.warning, "{e:?}");
            let r = &e.regarding;
            let at = format!(
                "{}/{}",
                r.namespace.as_deref().unwrap_or_default(),
                r.name.as_deref().unwrap_or_default()
            );
            events.push((e.reason, at, e.note));
        }
        events.sort();
        events
    }
}

fn start(client: kube::Client, leader: watch::Receiver<bool>) -> Running {
    let (snapshots, snapshots_rx) = watch::channel(Arc::new(MeshSnapshot::default()));
    let (status, status_rx) = watch::channel(RegistryStatus::default());
    let (namespaces, _) = watch::channel(Arc::new(NamespaceLabels::default()));
    let (statuses, statuses_rx) = watch::channel(Arc::new(StatusReport::default()));
    let (progress, progress_rx) = watch::channel(WriterProgress::default());
    let out = Outputs {
        snapshots,
        status,
        namespaces,
        statuses,
    };
    let registry = tokio::spawn(watch_cluster(
        client.clone(),
        MeshNames {
            trust_domain: "cluster.local".into(),
            root_namespace: "trellis-system".into(),
            scope: NamespaceScope::all(),
        },
        Duration::from_millis(20),
        out,
    ));
    let (sink, events) = crate::events::EventSink::channel();
    let writer = tokio::spawn(write_statuses(client, statuses_rx, leader, progress, sink));
    Running {
        snapshots: snapshots_rx,
        status: status_rx,
        progress: progress_rx,
        events,
        tasks: [registry, writer],
    }
}

fn condition<'a>(body: &'a Value, type_: &str) -> &'a Value {
    body["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == type_))
        .unwrap_or_else(|| panic!("no {type_} condition in {body:#}"))
}

#[tokio::test]
async fn policies_are_served_and_their_statuses_written_once() {
    let mut api = FakeApi::new();
    let feeds = cluster(&mut api);
    accept_listed_patches(&mut api);
    accept_patch(&mut api, "TrafficPolicy", "trafficpolicies", "shop", "cart");
    let (client, seen) = api.start();
    let (_leader_tx, leader) = watch::channel(true);
    let mut running = start(client, leader);

    // The snapshot carries the policies as the file registry would.
    let s = wait_for(&mut running.snapshots, "the initial snapshot", |s| {
        !s.services.is_empty()
    })
    .await;
    let echo = ServiceKey {
        namespace: "default".into(),
        name: "echo".into(),
    };
    assert_eq!(
        s.traffic_policies.keys().collect::<Vec<_>>(),
        [&echo],
        "{:#?}",
        s.traffic_policies
    );
    // The oldest of two for one Service wins, though its name sorts later.
    assert_eq!(s.traffic_policies[&echo].source, "default/echo");
    assert_eq!(
        s.traffic_policies[&echo].retries.as_ref().unwrap().attempts,
        2
    );
    let authz: Vec<_> = s.authorization_policies.iter().map(|p| &p.name).collect();
    assert_eq!(authz, ["echo-readers"]);
    assert_eq!(s.authorization_policies[0].rules[0].methods, ["GET"]);
    let peer: Vec<_> = s
        .peer_authentications
        .iter()
        .map(|p| (p.namespace.as_str(), p.name.as_str(), p.mode))
        .collect();
    assert_eq!(
        peer,
        [("trellis-system", "default", crate::model::MtlsMode::Strict)]
    );
    assert_eq!(
        running.status.borrow().accepted["TrafficPolicy"],
        ["default/echo"]
    );

    // Five statuses differ from what the objects have; echo-readers' already matches.
    eventually("five status PATCHes", || seen.count("PATCH ") >= 5).await;
    let written = patches(&seen);
    let by_path = |path: &str| -> Vec<&Value> {
        written
            .iter()
            .filter(|(r, _)| r.starts_with(&format!("PATCH {path}?")))
            .map(|(_, body)| body)
            .collect()
    };
    for (r, _) in &written {
        assert!(
            r.split(['?', '&'])
                .any(|q| q == "fieldManager=trellis-control"),
            "{r}"
        );
    }
    let echo_body = by_path(&status_path("trafficpolicies", "default", "echo"));
    assert_eq!(echo_body.len(), 1, "{written:#?}");
    let accepted = condition(echo_body[0], "Accepted");
    assert_eq!(accepted["status"], "True");
    assert_eq!(accepted["reason"], "Accepted");
    assert_eq!(accepted["observedGeneration"], 2);
    assert!(accepted["lastTransitionTime"].is_string());
    // Conditional on the version judged.
    assert_eq!(echo_body[0]["metadata"]["resourceVersion"], "950");

    let rejected = |name: &str| {
        let bodies = by_path(&status_path("trafficpolicies", "default", name));
        assert_eq!(bodies.len(), 1, "{name}: {written:#?}");
        let c = condition(bodies[0], "Accepted");
        assert_eq!(c["status"], "False", "{name}: {c:#}");
        (
            c["reason"].as_str().unwrap().to_owned(),
            c["message"].as_str().unwrap().to_owned(),
            c["observedGeneration"].clone(),
        )
    };
    let (reason, message, generation) = rejected("slow");
    assert_eq!(reason, "Invalid");
    assert!(message.starts_with("spec.timeouts.request: "), "{message}");
    assert_eq!(generation, 3);
    assert_eq!(
        rejected("canary"),
        (
            "Conflicted".into(),
            "spec.targetRef: Service echo.default already has TrafficPolicy default/echo".into(),
            json!(1)
        )
    );
    assert_eq!(
        rejected("cart"),
        (
            "TargetNotFound".into(),
            "spec.targetRef: Service cart.default does not exist".into(),
            json!(1)
        )
    );
    let peer_body = by_path(&status_path(
        "peerauthentications",
        "trellis-system",
        "default",
    ));
    assert_eq!(condition(peer_body[0], "Accepted")["status"], "True");
    assert_eq!(
        by_path(&status_path(
            "authorizationpolicies",
            "default",
            "echo-readers"
        ))
        .len(),
        0,
        "a status that already matches is not written"
    );
    // Each refusal written is an Event on its object; what is accepted is not.
    tokio::time::timeout(
        Duration::from_secs(5),
        running.progress.wait_for(|p| p.patched >= 5),
    )
    .await
    .expect("timed out waiting for the writer's pass")
    .unwrap();
    let events = running.events();
    let reasons: Vec<_> = events
        .iter()
        .map(|(reason, at, _)| (reason.as_str(), at.as_str()))
        .collect();
    assert_eq!(
        reasons,
        [
            ("Conflicted", "default/canary"),
            ("Invalid", "default/slow"),
            ("TargetNotFound", "default/cart"),
        ]
    );
    assert!(
        events[2]
            .2
            .starts_with("TrafficPolicy default/cart is not served: spec.targetRef"),
        "{events:?}"
    );

    // The API server's echo of the write, then a new object in the same stream: its
    // status is written, echo's is not written again.
    let mut echo_object = fixture_json("trafficpolicies-list.json")["items"][0].clone();
    echo_object["metadata"]["resourceVersion"] = json!("1001");
    echo_object["status"] = echo_body[0]["status"].clone();
    feeds
        .traffic
        .send(&json!({"type": "MODIFIED", "object": echo_object}));
    let mut cart = fixture_json("trafficpolicies-list.json")["items"][3].clone();
    cart["metadata"]["namespace"] = json!("shop");
    cart["metadata"]["resourceVersion"] = json!("1002");
    feeds
        .traffic
        .send(&json!({"type": "ADDED", "object": cart}));
    eventually("shop/cart's status", || seen.count("PATCH ") >= 6).await;
    let written = patches(&seen);
    assert_eq!(
        written.last().unwrap().0,
        format!(
            "PATCH {}?&fieldManager=trellis-control",
            status_path("trafficpolicies", "shop", "cart")
        )
    );
    let echo_writes = written
        .iter()
        .filter(|(r, _)| r.contains("/default/trafficpolicies/echo/"))
        .count();
    assert_eq!(echo_writes, 1, "{written:#?}");

    // A deleted policy leaves the snapshot.
    let readers = fixture_json("authorizationpolicies-list.json")["items"][0].clone();
    feeds
        .authorization
        .send(&json!({"type": "DELETED", "object": readers}));
    wait_for(&mut running.snapshots, "echo-readers deleted", |s| {
        s.authorization_policies.is_empty()
    })
    .await;
    assert_eq!(running.progress.borrow().failed, 0);
    for task in running.tasks {
        task.abort();
    }
}

#[tokio::test]
async fn statuses_are_written_only_while_leading() {
    let mut api = FakeApi::new();
    let _feeds = cluster(&mut api);
    accept_listed_patches(&mut api);
    let (client, seen) = api.start();
    let (leader_tx, leader) = watch::channel(false);
    let mut running = start(client, leader);

    // The writer has looked at the full report, as a follower: nothing written.
    let looked = running.progress.wait_for(|p| p.targets == 6 && !p.leader);
    tokio::time::timeout(Duration::from_secs(5), looked)
        .await
        .expect("timed out waiting for the writer")
        .unwrap();
    assert_eq!(seen.count("PATCH "), 0, "{:#?}", seen.requests());
    assert_eq!(running.progress.borrow().patched, 0);
    assert_eq!(running.events(), [], "a follower records no Events");

    // Leading now: the pending statuses are written.
    leader_tx.send(true).unwrap();
    eventually("the statuses", || seen.count("PATCH ") == 5).await;
    let progress = tokio::time::timeout(
        Duration::from_secs(5),
        running.progress.wait_for(|p| p.patched == 5),
    )
    .await
    .expect("timed out waiting for the writer to count its writes")
    .unwrap()
    .clone();
    assert!(progress.leader);
    assert_eq!(running.events().len(), 3);
    for task in running.tasks {
        task.abort();
    }
}

/// An HTTPRoute with a Service parent whose backend is missing, and a Gateway parent
/// another controller has written status for: one PATCH of `status.parents`, the
/// Gateway's entry first and untouched, ours saying why, conditional on the version
/// read; and an Event on the route.
#[tokio::test]
async fn a_route_status_is_written_per_service_parent_beside_others() {
    let gateway_entry = json!({
        "parentRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "public-gw"},
        "controllerName": "example.com/gateway",
        "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "",
                        "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1}]
    });
    let route = json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "to-nowhere", "namespace": "default", "uid": "r-1",
                     "generation": 2, "resourceVersion": "977",
                     "creationTimestamp": "2025-05-01T09:50:00Z"},
        "spec": {
            "parentRefs": [
                {"group": "", "kind": "Service", "name": "echo", "port": 80},
                {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "public-gw"}
            ],
            "rules": [{"backendRefs": [{"group": "", "kind": "Service", "name": "nowhere", "port": 80, "weight": 1}]}]
        },
        "status": {"parents": [gateway_entry]}
    });
    let list = json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRouteList",
        "metadata": {"resourceVersion": "1000"}, "items": [route]
    });
    let mut api = FakeApi::new();
    let _feeds = cluster_with_routes(&mut api, Some(list));
    accept_listed_patches(&mut api);
    let route_status =
        "/apis/gateway.networking.k8s.io/v1/namespaces/default/httproutes/to-nowhere/status";
    api.reply(
        Method::PATCH,
        route_status,
        200,
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "to-nowhere", "namespace": "default", "resourceVersion": "1001"}
        }),
    );
    let (client, seen) = api.start();
    let (_leader_tx, leader) = watch::channel(true);
    let mut running = start(client, leader);

    eventually("the route's status", || {
        seen.requests()
            .iter()
            .any(|r| r.starts_with(&format!("PATCH {route_status}?")))
    })
    .await;
    tokio::time::timeout(
        Duration::from_secs(5),
        running.progress.wait_for(|p| p.patched >= 6),
    )
    .await
    .expect("timed out waiting for the writer's pass")
    .unwrap();
    let written = patches(&seen);
    let (_, body) = written
        .iter()
        .find(|(r, _)| r.starts_with(&format!("PATCH {route_status}?")))
        .unwrap();
    assert_eq!(body["metadata"]["resourceVersion"], "977");
    let parents = body["status"]["parents"].as_array().unwrap();
    assert_eq!(parents.len(), 2, "{body:#}");
    assert_eq!(
        parents[0], gateway_entry,
        "the Gateway's entry is kept as it was"
    );
    let ours = &parents[1];
    assert_eq!(ours["controllerName"], "trellis.io/control-plane");
    assert_eq!(
        ours["parentRef"],
        json!({"group": "", "kind": "Service", "name": "echo", "port": 80})
    );
    let of_ours = |type_: &str| {
        ours["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == type_))
            .cloned()
            .unwrap_or_else(|| panic!("no {type_} in {ours:#}"))
    };
    let accepted = of_ours("Accepted");
    assert_eq!(accepted["status"], "False");
    assert_eq!(accepted["reason"], "BackendNotFound");
    assert_eq!(accepted["observedGeneration"], 2);
    assert!(
        accepted["message"]
            .as_str()
            .unwrap()
            .contains("nowhere.default does not exist"),
        "{accepted:#}"
    );
    assert_eq!(of_ours("ResolvedRefs")["reason"], "BackendNotFound");
    // The route's Event, beside the policies'.
    let events = running.events();
    assert!(
        events
            .iter()
            .any(|(reason, at, note)| reason == "BackendNotFound"
                && at == "default/to-nowhere"
                && note.contains("parent Service echo")),
        "{events:#?}"
    );
    for task in running.tasks {
        task.abort();
    }
}
