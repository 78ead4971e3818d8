//! Pods without the sidecar, from the recorded Pod list: their addresses are
//! endpoints without a sidecar, which discovery hands to meshed clients as plaintext
//! endpoints (see `discovery::resources`).

use k8s_openapi::List;
use k8s_openapi::api::core::v1::{Pod, Service as KubeService};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::*;
use crate::registry::kube::fake_api::fixture_json;

fn items<K>(name: &str) -> Vec<K>
where
    K: serde::de::DeserializeOwned + Clone + k8s_openapi::ListableResource,
{
    let list: List<K> = serde_json::from_value(fixture_json(name)).unwrap();
    list.items
}

/// The recorded cluster, with the sidecar taken out of the named Pods (as if
/// they were created before their namespace was enabled).
fn cluster_without_sidecar_in(pods: &[&str]) -> ClusterState {
    let mut listed = items::<Pod>("pods-list.json");
    for pod in &mut listed {
        if pods.contains(&pod.metadata.name.as_deref().unwrap()) {
            let spec = pod.spec.as_mut().unwrap();
            spec.init_containers = None;
            pod.metadata.annotations = None;
        }
    }
    ClusterState {
        services: KindStore::listed(items::<KubeService>("services-list.json")),
        endpoint_slices: KindStore::listed(items::<EndpointSlice>("endpointslices-list.json")),
        pods: KindStore::listed(listed),
        namespaces: KindStore::listed(items("namespaces-list.json")),
        service_accounts: KindStore::listed(items("serviceaccounts-list.json")),
        http_routes: KindStore::listed([]),
        traffic_policies: KindStore::listed([]),
        authorization_policies: KindStore::listed([]),
        peer_authentications: KindStore::listed([]),
    }
}

fn echo() -> ServiceKey {
    ServiceKey {
        namespace: "default".into(),
        name: "echo".into(),
    }
}

/// (address, has a sidecar) of echo's endpoints on port 80.
fn endpoints(snapshot: &MeshSnapshot) -> Vec<(String, bool)> {
    snapshot.endpoints[&(echo(), 80)]
        .iter()
        .map(|e| (e.address.to_string(), e.sidecar))
        .collect()
}

fn pair(address: &str, sidecar: bool) -> (String, bool) {
    (address.to_owned(), sidecar)
}

#[test]
fn the_recorded_pods_are_meshed() {
    let snapshot = snapshot_from(&cluster_without_sidecar_in(&[]), "cluster.local");
    assert_eq!(
        endpoints(&snapshot),
        [pair("10.244.1.5", true), pair("10.244.2.7", true)]
    );
}

#[test]
fn a_pod_without_the_sidecar_is_an_endpoint_without_one() {
    let state = cluster_without_sidecar_in(&["echo-6d8f7b9c5-fghij"]);
    let snapshot = snapshot_from(&state, "cluster.local");
    assert_eq!(
        endpoints(&snapshot),
        [pair("10.244.1.5", true), pair("10.244.2.7", false)]
    );
}

#[test]
fn a_service_with_no_meshed_pod_keeps_its_endpoints() {
    let state = cluster_without_sidecar_in(&["echo-6d8f7b9c5-abcde", "echo-6d8f7b9c5-fghij"]);
    let snapshot = snapshot_from(&state, "cluster.local");
    // Still a mesh service (routes and policies apply); every endpoint is reached
    // in plaintext.
    assert!(snapshot.services.contains_key(&echo()));
    assert_eq!(
        endpoints(&snapshot),
        [pair("10.244.1.5", false), pair("10.244.2.7", false)]
    );
    assert_eq!(snapshot.workloads.len(), 3);
}

#[test]
fn the_annotation_alone_does_not_make_a_pod_meshed() {
    let mut state = cluster_without_sidecar_in(&["echo-6d8f7b9c5-fghij"]);
    let mut pods: Vec<Pod> = state.pods.iter().map(|p| (*p).clone()).collect();
    for pod in &mut pods {
        pod.metadata.annotations =
            Some([("trellis.io/status".to_owned(), "injected".to_owned())].into());
    }
    state.pods = KindStore::listed(pods);
    let snapshot = snapshot_from(&state, "cluster.local");
    assert_eq!(
        endpoints(&snapshot),
        [pair("10.244.1.5", true), pair("10.244.2.7", false)]
    );
}

#[test]
fn a_sidecar_among_the_containers_counts_too() {
    // Injected by hand as a plain container (older manifests, other tooling).
    let mut state = cluster_without_sidecar_in(&["echo-6d8f7b9c5-fghij"]);
    let mut pods: Vec<Pod> = state.pods.iter().map(|p| (*p).clone()).collect();
    let pod = pods
        .iter_mut()
        .find(|p| p.metadata.name.as_deref() == Some("echo-6d8f7b9c5-fghij"))
        .unwrap();
    let spec = pod.spec.as_mut().unwrap();
    let mut proxy = spec.containers[0].clone();
    proxy.name = "trellis-proxy".into();
    proxy.ports = None;
    spec.containers.push(proxy);
    state.pods = KindStore::listed(pods);
    let snapshot = snapshot_from(&state, "cluster.local");
    assert_eq!(
        endpoints(&snapshot),
        [pair("10.244.1.5", true), pair("10.244.2.7", true)]
    );
}
