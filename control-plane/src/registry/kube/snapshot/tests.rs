//! Pods without the sidecar, from the recorded Pod list: their addresses are no
//! mTLS endpoints, and a Service backed only by them is left to plain TCP.

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
    }
}

fn echo() -> ServiceKey {
    ServiceKey {
        namespace: "default".into(),
        name: "echo".into(),
    }
}

fn addresses(snapshot: &MeshSnapshot) -> Vec<String> {
    snapshot.endpoints[&(echo(), 80)]
        .iter()
        .map(|e| e.address.to_string())
        .collect()
}

#[test]
fn the_recorded_pods_are_meshed() {
    let snapshot = snapshot_from(&cluster_without_sidecar_in(&[]), "cluster.local");
    assert_eq!(addresses(&snapshot), ["10.244.1.5", "10.244.2.7"]);
}

#[test]
fn a_pod_without_the_sidecar_is_no_mtls_endpoint() {
    let state = cluster_without_sidecar_in(&["echo-6d8f7b9c5-fghij"]);
    let snapshot = snapshot_from(&state, "cluster.local");
    assert_eq!(addresses(&snapshot), ["10.244.1.5"]);
    assert!(snapshot.services.contains_key(&echo()));
}

#[test]
fn a_service_with_no_meshed_pod_is_left_to_plain_tcp() {
    let state = cluster_without_sidecar_in(&["echo-6d8f7b9c5-abcde", "echo-6d8f7b9c5-fghij"]);
    let snapshot = snapshot_from(&state, "cluster.local");
    // Not a mesh service: a meshed client's proxy passes its VIP through.
    assert!(!snapshot.services.contains_key(&echo()));
    assert!(!snapshot.endpoints.contains_key(&(echo(), 80)));
    // Others are untouched; the Pods are still known (for policy and the CA).
    let names: Vec<_> = snapshot.services.keys().map(|k| k.to_string()).collect();
    assert_eq!(names, ["kubernetes.default"]);
    assert_eq!(snapshot.workloads.len(), 3);
}

#[test]
fn the_annotation_alone_does_not_make_a_pod_meshed() {
    let mut state = cluster_without_sidecar_in(&["echo-6d8f7b9c5-fghij"]);
    let mut pods: Vec<Pod> = state.pods.iter().cloned().collect();
    for pod in &mut pods {
        pod.metadata.annotations =
            Some([("trellis.io/status".to_owned(), "injected".to_owned())].into());
    }
    state.pods = KindStore::listed(pods);
    let snapshot = snapshot_from(&state, "cluster.local");
    assert_eq!(addresses(&snapshot), ["10.244.1.5"]);
}

#[test]
fn a_sidecar_among_the_containers_counts_too() {
    // Injected by hand as a plain container (older manifests, other tooling).
    let mut state = cluster_without_sidecar_in(&["echo-6d8f7b9c5-fghij"]);
    let mut pods: Vec<Pod> = state.pods.iter().cloned().collect();
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
    assert_eq!(addresses(&snapshot), ["10.244.1.5", "10.244.2.7"]);
}
