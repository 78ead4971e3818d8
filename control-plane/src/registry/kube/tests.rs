//! The kube registry: events → stores → snapshot without a client, then the whole
//! loop against a scripted API server (lists, watches, 404 for an optional CRD, 410).

mod mock_api;
mod policy_status;
mod single_writer;

use std::net::IpAddr;

use k8s_openapi::List;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::watcher::Event;

use super::fake_api::fixture_json;
use super::*;
use crate::model::{AppProtocol, ServiceKey, TargetPort};

fn items<K>(name: &str) -> Vec<K>
where
    K: serde::de::DeserializeOwned + Clone + k8s_openapi::ListableResource,
{
    let list: List<K> = serde_json::from_value(fixture_json(name)).unwrap();
    list.items
}

fn key(ns: &str, name: &str) -> ServiceKey {
    ServiceKey {
        namespace: ns.into(),
        name: name.into(),
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The cluster as the list fixtures describe it.
fn listed_state() -> ClusterState {
    ClusterState {
        services: KindStore::listed(items::<Service>("services-list.json")),
        endpoint_slices: KindStore::listed(items::<EndpointSlice>("endpointslices-list.json")),
        pods: KindStore::listed(items::<Pod>("pods-list.json")),
        namespaces: KindStore::listed(items("namespaces-list.json")),
        service_accounts: KindStore::listed(items("serviceaccounts-list.json")),
        http_routes: KindStore::listed([]),
        traffic_policies: KindStore::listed([]),
        authorization_policies: KindStore::listed([]),
        peer_authentications: KindStore::listed([]),
    }
}

#[test]
fn snapshot_from_listed_objects() {
    let snapshot = snapshot_from(&listed_state(), "cluster.local");

    // ExternalName is not a mesh service; UDP ports are not proxied.
    let names: Vec<_> = snapshot.services.keys().map(|k| k.to_string()).collect();
    assert_eq!(names, ["echo.default", "kubernetes.default"]);
    let echo = &snapshot.services[&key("default", "echo")];
    assert_eq!(echo.vips, [ip("10.96.10.20")]);
    assert_eq!(echo.ports.len(), 1);
    assert_eq!(echo.ports[0].port, 80);
    assert_eq!(echo.ports[0].protocol, AppProtocol::Http);
    assert_eq!(echo.ports[0].target_port, TargetPort::Name("http".into()));
    assert_eq!(echo.selector["app"], "echo");

    // Host-network Pods have no identity of their own.
    let workloads: Vec<_> = snapshot
        .workloads
        .iter()
        .map(|w| {
            (
                w.name.as_str(),
                w.address.to_string(),
                w.identity.to_string(),
            )
        })
        .collect();
    assert_eq!(
        workloads,
        [
            (
                "echo-6d8f7b9c5-abcde",
                "10.244.1.5".into(),
                "spiffe://cluster.local/ns/default/sa/echo".into()
            ),
            (
                "echo-6d8f7b9c5-fghij",
                "10.244.2.7".into(),
                "spiffe://cluster.local/ns/default/sa/echo".into()
            ),
            (
                "client-5c9d8f7b6-xyz12",
                "10.244.1.9".into(),
                "spiffe://cluster.local/ns/shop/sa/default".into()
            ),
        ]
    );
    assert_eq!(snapshot.workloads[0].ports["http"], 8080);

    let endpoints = &snapshot.endpoints[&(key("default", "echo"), 80)];
    let got: Vec<_> = endpoints
        .iter()
        .map(|e| (e.address, e.port, e.zone.as_str(), e.ready))
        .collect();
    assert_eq!(
        got,
        [
            (ip("10.244.1.5"), 8080, "zone-a", true),
            (ip("10.244.2.7"), 8080, "zone-b", true),
        ]
    );
    assert!(
        endpoints
            .iter()
            .all(|e| e.identity.as_ref().map(ToString::to_string).as_deref()
                == Some("spiffe://cluster.local/ns/default/sa/echo"))
    );
    // The API server's own endpoint is no Pod: no identity, no sidecar (discovery
    // makes it a plaintext endpoint).
    let api = &snapshot.endpoints[&(key("default", "kubernetes"), 443)];
    assert_eq!(api.len(), 1, "{api:?}");
    assert_eq!((api[0].identity.as_ref(), api[0].sidecar), (None, false));
}

#[test]
fn endpoint_without_target_ref_takes_the_identity_of_the_pod_with_its_ip() {
    let mut state = listed_state();
    let mut slice = items::<EndpointSlice>("endpointslices-list.json").remove(0);
    for e in &mut slice.endpoints {
        e.target_ref = None;
    }
    state.endpoint_slices = KindStore::listed([slice]);
    let snapshot = snapshot_from(&state, "cluster.local");
    let endpoints = &snapshot.endpoints[&(key("default", "echo"), 80)];
    assert_eq!(endpoints.len(), 2);
    assert_eq!(
        endpoints[0]
            .identity
            .as_ref()
            .map(ToString::to_string)
            .as_deref(),
        Some("spiffe://cluster.local/ns/default/sa/echo")
    );
}

#[test]
fn a_relist_replaces_the_store_whole_and_only_at_init_done() {
    let [a, b, c]: [Service; 3] = items::<Service>("services-list.json").try_into().unwrap();
    let mut store = KindStore::default();
    assert!(!store.apply(Event::Init));
    assert!(!store.apply(Event::InitApply(a.clone())));
    assert!(!store.is_listed(), "not listed before InitDone");
    assert!(store.is_empty(), "nothing visible before InitDone");
    assert!(store.apply(Event::InitDone));
    assert_eq!(store.len(), 1);
    assert!(store.apply(Event::Apply(b.clone())));
    assert_eq!(store.len(), 2);

    // A re-list (after 410 Gone) that no longer has `a`: the old view stays until
    // the list is done, then `a` is gone without a Delete event.
    store.apply(Event::Init);
    store.apply(Event::InitApply(b.clone()));
    store.apply(Event::InitApply(c.clone()));
    assert_eq!(store.len(), 2);
    assert!(store.get("default", "kubernetes").is_some());
    store.apply(Event::InitDone);
    assert_eq!(store.len(), 2);
    assert!(store.get("default", "kubernetes").is_none());
    assert!(store.get("default", "upstream-db").is_some());

    assert!(store.apply(Event::Delete(b)));
    assert!(!store.apply(Event::Delete(a)), "deleting what is not there");
    assert_eq!(store.len(), 1);
}

#[test]
fn the_state_is_complete_only_when_every_kind_has_listed() {
    let mut state = listed_state();
    assert!(state.is_complete());
    state.pods = KindStore::default();
    assert!(!state.is_complete());
    state.pods.apply(Event::Init);
    state.pods.apply(Event::InitDone);
    assert!(state.is_complete());
    state.http_routes = KindStore::default();
    assert!(!state.is_complete());
    state.http_routes.set_absent();
    assert!(state.is_complete());
}

#[test]
fn namespace_labels_are_exposed_for_the_injector() {
    let labels = listed_state().namespace_labels();
    assert_eq!(labels["default"]["trellis.io/inject"], "enabled");
    assert!(!labels["shop"].contains_key("trellis.io/inject"));
}

#[test]
fn pods_that_are_done_or_without_an_ip_are_no_workloads() {
    let mut pods = items::<Pod>("pods-list.json");
    pods[0].status.as_mut().unwrap().phase = Some("Succeeded".into());
    pods[1].status.as_mut().unwrap().pod_ip = None;
    let mut state = listed_state();
    state.pods = KindStore::listed(pods);
    let snapshot = snapshot_from(&state, "cluster.local");
    let names: Vec<_> = snapshot.workloads.iter().map(|w| w.name.as_str()).collect();
    assert_eq!(names, ["client-5c9d8f7b6-xyz12"]);
    assert!(snapshot.endpoints[&(key("default", "echo"), 80)].is_empty());
}

#[test]
fn watch_errors_are_classified() {
    let status = |code| {
        let mut s = kube::core::Status::failure("x", "y");
        s.code = code;
        s
    };
    assert!(is_gone(&watcher::Error::WatchError(status(410).boxed())));
    assert!(is_not_found(&watcher::Error::InitialListFailed(
        kube::Error::Api(status(404).boxed())
    )));
    assert!(!is_not_found(&watcher::Error::NoResourceVersion));
}

fn dynamic_items(name: &str) -> Vec<kube::api::DynamicObject> {
    serde_json::from_value(fixture_json(name)["items"].clone()).unwrap()
}

#[test]
fn http_rules_on_a_tcp_port_are_accepted_with_a_condition_saying_so() {
    let mut state = listed_state();
    state.authorization_policies =
        KindStore::listed(dynamic_items("authorizationpolicies-list.json"));
    let (snapshot, report) = evaluate(&state, "cluster.local", "trellis-system");
    assert_eq!(snapshot.authorization_policies.len(), 1);
    let judged = |report: &StatusReport| -> Vec<(&str, bool, String)> {
        report.targets[0]
            .judged
            .iter()
            .map(|c| (c.type_, c.status, c.message.clone()))
            .collect()
    };
    // echo's port is HTTP: the rule's method can be checked.
    assert_eq!(judged(&report), [(ACCEPTED, true, String::new())]);
    assert!(report.warnings().is_empty());

    // Declared tcp: still accepted (enforced, failing closed), and said so.
    let mut services = items::<Service>("services-list.json");
    let echo = services
        .iter_mut()
        .find(|s| s.metadata.name.as_deref() == Some("echo"))
        .unwrap();
    echo.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].app_protocol = Some("tcp".into());
    state.services = KindStore::listed(services);
    let (snapshot, report) = evaluate(&state, "cluster.local", "trellis-system");
    assert_eq!(snapshot.authorization_policies.len(), 1);
    let message = "rules with methods, paths or headers apply to port 8080 of \
                   default/echo-6d8f7b9c5-abcde, default/echo-6d8f7b9c5-fghij (Service \
                   echo.default port 80, tcp): the proxy cannot see HTTP on an opaque port, \
                   so they never match there: those callers are refused";
    assert_eq!(
        judged(&report),
        [
            (ACCEPTED, true, String::new()),
            (L7_RULES_ON_OPAQUE_PORT, true, message.to_owned())
        ]
    );
    let warnings = report.warnings();
    assert_eq!(warnings.len(), 1);
    assert_eq!(
        warnings[0].file,
        "kube:AuthorizationPolicy default/echo-readers"
    );
    assert_eq!(warnings[0].reason, message);
}

#[test]
fn a_policy_with_a_strange_status_or_shape_is_judged_not_dropped_silently() {
    let mut state = listed_state();
    let mut policies = dynamic_items("peerauthentications-list.json");
    // Someone else's malformed status does not make the object unreadable.
    policies[0].data["status"] = serde_json::json!({"conditions": [{"type": 1}]});
    let mut unknown_field = policies[0].clone();
    unknown_field.metadata.name = Some("typo".into());
    unknown_field.metadata.namespace = Some("default".into());
    unknown_field.data["spec"] = serde_json::json!({"mtls": {"mood": "STRICT"}});
    policies.push(unknown_field);
    state.peer_authentications = KindStore::listed(policies);
    let (snapshot, report) = evaluate(&state, "cluster.local", "trellis-system");
    let served: Vec<_> = snapshot
        .peer_authentications
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(served, ["default"]);
    let verdicts: Vec<_> = report
        .targets
        .iter()
        .map(|t| (t.name.as_str(), t.judged[0].status, t.judged[0].reason))
        .collect();
    assert_eq!(
        verdicts,
        [("typo", false, "Invalid"), ("default", true, "Accepted")]
    );
    assert!(
        report.targets[0].judged[0]
            .message
            .contains("unknown field `mood`"),
        "{:?}",
        report.targets[0].judged[0]
    );
}

#[test]
fn http_routes_are_served_through_the_same_path() {
    let route: kube::api::DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {
            "name": "echo-api", "namespace": "default", "generation": 1,
            "resourceVersion": "990", "creationTimestamp": "2025-05-01T09:50:00Z"
        },
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "echo", "port": 80}],
            "rules": [{
                "matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
                "backendRefs": [{"name": "echo", "port": 80}]
            }]
        },
        // Gateway API's status shape, not Trellis': never read.
        "status": {"parents": []}
    }))
    .unwrap();
    let mut state = listed_state();
    state.http_routes = KindStore::listed([route]);
    let (snapshot, report) = evaluate(&state, "cluster.local", "trellis-system");
    let rules = &snapshot.routes[&key("default", "echo")];
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0].origin.name, "echo-api");
    // The Service parent's status: accepted, by this controller.
    assert_eq!(report.targets.len(), 1);
    let parents = &report.targets[0].parents;
    assert_eq!(parents.len(), 1);
    assert_eq!(parents[0].parent_ref["name"], "echo");
    assert!(
        parents[0].conditions.iter().all(|c| c.status),
        "{parents:?}"
    );
    assert!(report.targets[0].judged.is_empty());

    // A route to a backend that is not there is not served, and says so.
    let mut broken = (*state.http_routes.iter().next().unwrap()).clone();
    broken.data["spec"]["rules"][0]["backendRefs"][0]["name"] = "nope".into();
    state.http_routes = KindStore::listed([broken]);
    let (snapshot, report) = evaluate(&state, "cluster.local", "trellis-system");
    assert!(!snapshot.routes.contains_key(&key("default", "echo")));
    let accepted = &report.targets[0].parents[0].conditions[0];
    assert_eq!(
        (accepted.type_, accepted.status, accepted.reason),
        (ACCEPTED, false, "BackendNotFound")
    );
    assert!(
        accepted.message.contains("nope.default does not exist"),
        "{accepted:?}"
    );
    let events = events_for(&report.targets[0]);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].regarding.kind.as_deref(), Some("HTTPRoute"));
    assert_eq!(events[0].reason, "BackendNotFound");
}

#[test]
fn dual_stack_pods_are_workloads_at_every_pod_ip() {
    use k8s_openapi::api::core::v1::PodIP;
    let mut pods = items::<Pod>("pods-list.json");
    let name = pods[0].metadata.name.clone().unwrap();
    let status = pods[0].status.as_mut().unwrap();
    let v4 = status.pod_ip.clone().unwrap();
    status.pod_ips = Some(vec![
        PodIP { ip: v4.clone() },
        PodIP {
            ip: "fd00:10:244::7".into(),
        },
    ]);
    let mut state = listed_state();
    state.pods = KindStore::listed(pods);
    let snapshot = snapshot_from(&state, "cluster.local");
    let w = snapshot.workloads.iter().find(|w| w.name == name).unwrap();
    assert_eq!(w.address, ip(&v4));
    assert_eq!(
        w.all_addresses().collect::<Vec<_>>(),
        [ip(&v4), ip("fd00:10:244::7")]
    );
    let index = crate::model::WorkloadIndex::new(&snapshot.workloads);
    let found = index
        .find(&w.namespace, None, ip("fd00:10:244::7"))
        .unwrap();
    assert_eq!(found.map(|f| &f.name), Some(&name));
}

#[test]
fn another_namespace_cannot_claim_or_downgrade_a_meshed_pod_address() {
    let mut state = listed_state();
    let mut services = items::<Service>("services-list.json");
    let echo_service = services
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some("echo"))
        .cloned()
        .unwrap();
    let mut mirror = echo_service;
    mirror.metadata.namespace = Some("shop".into());
    mirror.metadata.name = Some("mirror".into());
    services.push(mirror);
    state.services = KindStore::listed(services);

    let echo_slice = items::<EndpointSlice>("endpointslices-list.json").remove(0);
    // In shop, for shop/mirror: the first endpoint keeps its targetRef to default's
    // pod (cross-namespace), the second has none (a plaintext endpoint at a meshed
    // pod's address).
    let mut evil = echo_slice.clone();
    evil.metadata.namespace = Some("shop".into());
    evil.metadata.name = Some("mirror-1".into());
    let labels = evil.metadata.labels.get_or_insert_default();
    labels.insert("kubernetes.io/service-name".into(), "mirror".into());
    evil.endpoints[1].target_ref = None;
    // In default, a targetRef to one pod at the other pod's address.
    let mut swapped = echo_slice.clone();
    swapped.metadata.name = Some("echo-swapped".into());
    swapped.endpoints.truncate(1);
    swapped.endpoints[0].addresses = vec!["10.244.2.7".into()];
    state.endpoint_slices = KindStore::listed([evil, swapped]);

    let snapshot = snapshot_from(&state, "cluster.local");
    assert_eq!(
        snapshot.endpoints[&(key("shop", "mirror"), 80)],
        [],
        "neither endpoint may stand for a meshed pod of default"
    );
    assert_eq!(snapshot.endpoints[&(key("default", "echo"), 80)], []);
}

#[test]
fn discovery_selectors_keep_other_namespaces_services_and_policies_out() {
    let mut state = listed_state();
    state.authorization_policies =
        KindStore::listed(dynamic_items("authorizationpolicies-list.json"));
    let everything = evaluate(&state, "cluster.local", "trellis-system").0;
    assert_eq!(everything.services.len(), 2);
    assert_eq!(everything.authorization_policies.len(), 1);

    // `default` carries no discovery label: its Services, endpoints and policy stay
    // out; its Pods stay in (the CA still needs them).
    let scope = NamespaceScope::parse(&["trellis.io/discovery=enabled"]).unwrap();
    let (scoped, _) = evaluate_in(&state, "cluster.local", "trellis-system", &scope);
    assert!(scoped.services.is_empty(), "{:?}", scoped.services.keys());
    assert!(scoped.endpoints.is_empty());
    assert!(scoped.authorization_policies.is_empty());
    assert_eq!(scoped.workloads, everything.workloads);

    // Labelling the namespace brings all of it in, with no re-list.
    let mut namespaces = items::<k8s_openapi::api::core::v1::Namespace>("namespaces-list.json");
    for ns in &mut namespaces {
        if ns.metadata.name.as_deref() == Some("default") {
            ns.metadata
                .labels
                .get_or_insert_default()
                .insert("trellis.io/discovery".into(), "enabled".into());
        }
    }
    state.namespaces = KindStore::listed(namespaces);
    let (labelled, _) = evaluate_in(&state, "cluster.local", "trellis-system", &scope);
    assert_eq!(labelled, everything);

    // The root namespace is always in, selected or not.
    let (rooted, _) = evaluate_in(
        &state,
        "cluster.local",
        "default",
        &NamespaceScope::parse(&["team=none"]).unwrap(),
    );
    assert_eq!(rooted.services.len(), 2);
}

#[test]
fn every_watched_object_loses_managed_fields_and_the_last_applied_copy() {
    let mut service = items::<Service>("services-list.json").remove(0);
    service.metadata.managed_fields = Some(vec![Default::default()]);
    service.metadata.annotations = Some(
        [
            (LAST_APPLIED.to_owned(), "{\"big\": \"copy\"}".to_owned()),
            ("keep".to_owned(), "me".to_owned()),
        ]
        .into(),
    );
    slim_metadata(&mut service);
    assert!(service.metadata.managed_fields.is_none());
    let annotations = service.metadata.annotations.unwrap();
    assert_eq!(annotations.keys().collect::<Vec<_>>(), ["keep"]);
}
