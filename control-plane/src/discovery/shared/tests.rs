#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;

use trellis_identity::SpiffeId;
use trellis_proto::discovery::v1::type_url;

use super::SharedResources;
use crate::discovery::resources::{delta, view_for};
use crate::discovery::{SentVersions, TYPE_URLS, stream_delta};
use crate::model::{
    AppProtocol, Endpoint, MeshSnapshot, Service, ServiceKey, ServicePort, TargetPort,
};

const TD: &str = "cluster.local";

fn key(i: usize) -> ServiceKey {
    ServiceKey {
        namespace: "demo".to_owned(),
        name: format!("svc-{i}"),
    }
}

fn mesh(services: usize) -> MeshSnapshot {
    let mut snapshot = MeshSnapshot::default();
    for i in 0..services {
        snapshot.services.insert(
            key(i),
            Service {
                key: key(i),
                vips: vec![format!("10.96.0.{i}").parse().unwrap()],
                ports: vec![ServicePort {
                    name: "http".to_owned(),
                    port: 80,
                    target_port: TargetPort::Number(8080),
                    protocol: AppProtocol::Http,
                }],
                selector: BTreeMap::new(),
            },
        );
        snapshot.endpoints.insert(
            (key(i), 80),
            vec![Endpoint {
                address: format!("10.0.0.{i}").parse().unwrap(),
                port: 8080,
                identity: None,
                weight: 1,
                zone: String::new(),
                ready: true,
                mesh_address: None,
                sidecar: false,
            }],
        );
    }
    snapshot
}

fn proxy() -> SpiffeId {
    SpiffeId::new(TD, "demo", "client").unwrap()
}

fn build(snapshot: MeshSnapshot, previous: Option<&SharedResources>) -> SharedResources {
    SharedResources::build(Arc::new(snapshot), TD, &[], previous)
}

/// What a stream holds after being sent everything of `shared`, per type.
fn synced(shared: &SharedResources) -> BTreeMap<&'static str, BTreeMap<String, String>> {
    let id = proxy();
    let scope = shared.snapshot.policy_scope(&id, None);
    TYPE_URLS
        .iter()
        .map(|t| {
            let (resources, removed) = stream_delta(&BTreeMap::new(), shared, &scope, t, None);
            assert!(removed.is_empty());
            let held = resources.into_iter().map(|r| (r.name, r.version)).collect();
            (*t, held)
        })
        .collect()
}

#[test]
fn a_new_stream_gets_the_full_view() {
    let shared = build(mesh(3), None);
    let held = synced(&shared);
    let id = proxy();
    let whole = view_for(
        &shared.snapshot,
        TD,
        &[],
        &shared.snapshot.policy_scope(&id, None),
    );
    for type_url in TYPE_URLS {
        let expected: BTreeMap<String, String> = whole.by_type[type_url]
            .values()
            .map(|r| (r.name.clone(), r.version.clone()))
            .collect();
        assert_eq!(held[type_url], expected, "{type_url}");
    }
    assert_eq!(held[type_url::SERVICE].len(), 3);
    assert_eq!(held[type_url::ENDPOINTS].len(), 3);
}

#[test]
fn a_change_to_one_service_sends_only_that_service() {
    let first = build(mesh(3), None);
    let held = synced(&first);
    let mut next = mesh(3);
    next.endpoints.get_mut(&(key(1), 80)).unwrap()[0].ready = false;
    let second = build(next, Some(&first));
    assert_eq!(second.generation, first.generation + 1);
    let id = proxy();
    let scope = second.snapshot.policy_scope(&id, None);
    for type_url in TYPE_URLS {
        let (resources, removed) =
            stream_delta(&held[type_url], &second, &scope, type_url, Some(0));
        let names: Vec<&str> = resources.iter().map(|r| r.name.as_str()).collect();
        match type_url {
            type_url::ENDPOINTS => assert_eq!(names, ["svc-1.demo:80"]),
            _ => assert!(names.is_empty(), "{type_url}: {names:?}"),
        }
        assert!(removed.is_empty());
        // The same as comparing everything.
        let full = second
            .shared_set(type_url)
            .map(|set| delta(&held[type_url], set));
        if let Some((all, _)) = full {
            assert_eq!(all, resources, "{type_url}");
        }
    }
}

#[test]
fn a_removed_service_is_removed_and_a_stream_further_behind_compares_everything() {
    let first = build(mesh(3), None);
    let held = synced(&first);
    let mut fewer = mesh(3);
    fewer.services.remove(&key(2));
    fewer.endpoints.remove(&(key(2), 80));
    let second = build(fewer.clone(), Some(&first));
    let id = proxy();
    let scope = second.snapshot.policy_scope(&id, None);
    let (resources, removed) = stream_delta(
        &held[type_url::SERVICE],
        &second,
        &scope,
        type_url::SERVICE,
        Some(0),
    );
    assert!(resources.is_empty());
    assert_eq!(removed, ["svc-2.demo"]);

    // A third change, to another service: a stream still at generation 0 missed
    // the removal, so the changed names alone would not do.
    let mut third_mesh = fewer;
    third_mesh.endpoints.get_mut(&(key(0), 80)).unwrap()[0].weight = 7;
    let third = build(third_mesh, Some(&second));
    assert!(third.changed_since(Some(0), type_url::ENDPOINTS).is_none());
    assert_eq!(
        third
            .changed_since(Some(1), type_url::ENDPOINTS)
            .map(|n| n.len()),
        Some(1)
    );
    let scope = third.snapshot.policy_scope(&id, None);
    let (resources, removed) = stream_delta(
        &held[type_url::ENDPOINTS],
        &third,
        &scope,
        type_url::ENDPOINTS,
        Some(0),
    );
    let names: Vec<&str> = resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["svc-0.demo:80"]);
    assert_eq!(removed, ["svc-2.demo:80"]);
}

#[test]
fn the_sent_digest_follows_content_not_order() {
    let mut a = SentVersions::default();
    a.insert("x", "1");
    a.insert("y", "2");
    let mut b = SentVersions::from_held([("y".into(), "2".into())].into());
    b.insert("x", "0");
    assert_ne!(a.digest(), b.digest());
    b.insert("x", "1");
    assert_eq!(a.digest(), b.digest());
    b.remove("y");
    a.remove("y");
    assert_eq!(a.digest(), b.digest());
    assert_eq!(a.len(), 1);
}

#[test]
fn a_synced_stream_is_sent_only_what_changed_between_generations() {
    let first = build(mesh(3), None);
    let mut next = mesh(3);
    next.endpoints.get_mut(&(key(2), 80)).unwrap()[0].ready = false;
    next.services.remove(&key(0));
    let second = build(next, Some(&first));
    let (resources, removed) =
        crate::discovery::shared_delta(&first, &second, type_url::ENDPOINTS, "demo");
    let names: Vec<&str> = resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["svc-2.demo:80"]);
    assert!(removed.is_empty());
    let (resources, removed) =
        crate::discovery::shared_delta(&first, &second, type_url::SERVICE, "demo");
    assert!(resources.is_empty());
    assert_eq!(removed, ["svc-0.demo"]);
    // Nothing between a generation and itself.
    let (resources, removed) =
        crate::discovery::shared_delta(&second, &second, type_url::ENDPOINTS, "demo");
    assert!(resources.is_empty() && removed.is_empty());
    // Two generations apart: everything is compared, with the same result as
    // comparing the sets whole.
    let mut third_mesh = (*second.snapshot).clone();
    third_mesh.endpoints.get_mut(&(key(1), 80)).unwrap()[0].weight = 3;
    let third = build(third_mesh, Some(&second));
    let (resources, _) =
        crate::discovery::shared_delta(&first, &third, type_url::ENDPOINTS, "demo");
    let names: Vec<&str> = resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["svc-1.demo:80", "svc-2.demo:80"]);
}
