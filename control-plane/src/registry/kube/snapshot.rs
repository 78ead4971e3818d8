//! From the watched Kubernetes objects to a [`MeshSnapshot`]: pure, no client.
//!
//! - Service (not ExternalName) → [`Service`]: cluster IPs, TCP ports, protocol from
//!   `appProtocol` or the port name's prefix.
//! - Pod with an IP (not host-network, not finished) → [`Workload`] with identity
//!   `spiffe://<td>/ns/<namespace>/sa/<serviceAccountName>`.
//! - EndpointSlice (`kubernetes.io/service-name`) → [`Endpoint`]s; each address takes
//!   its identity from the Pod its `targetRef` names, else from the one Pod with that
//!   IP. An address with no Pod has no identity and is left out.
//! - Pods without the injected `trellis-proxy` container are outside the mesh: a
//!   meshed client would dial them with mTLS and fail, and the discovery contract
//!   has no plaintext endpoint, so their addresses are left out of the endpoints. A
//!   Service whose Pods are all outside the mesh is left out whole: meshed clients
//!   then pass its VIP through as plain TCP instead of finding no endpoint.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service as KubeService, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::DynamicObject;
use trellis_identity::SpiffeId;

use super::store::KindStore;
use crate::model::{
    AppProtocol, Endpoint, MeshSnapshot, Service, ServiceKey, ServicePort, TargetPort, Workload,
};

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Everything the kube registry watches.
#[derive(Clone, Debug, Default)]
pub struct ClusterState {
    pub services: KindStore<KubeService>,
    pub endpoint_slices: KindStore<EndpointSlice>,
    pub pods: KindStore<Pod>,
    pub namespaces: KindStore<Namespace>,
    pub service_accounts: KindStore<ServiceAccount>,
    /// Gateway API `HTTPRoute` (optional: absent CRD counts as listed and empty).
    pub http_routes: KindStore<DynamicObject>,
}

impl ClusterState {
    /// Every kind has completed its first list: a snapshot would be whole.
    pub fn is_complete(&self) -> bool {
        self.services.is_listed()
            && self.endpoint_slices.is_listed()
            && self.pods.is_listed()
            && self.namespaces.is_listed()
            && self.service_accounts.is_listed()
            && self.http_routes.is_listed()
    }

    /// Labels of each namespace, for the injector.
    pub fn namespace_labels(&self) -> BTreeMap<String, BTreeMap<String, String>> {
        self.namespaces
            .iter()
            .filter_map(|ns| {
                let name = ns.metadata.name.clone()?;
                Some((name, ns.metadata.labels.clone().unwrap_or_default()))
            })
            .collect()
    }
}

/// The mesh model for the cluster's current state.
pub fn snapshot_from(state: &ClusterState, trust_domain: &str) -> MeshSnapshot {
    let mut snapshot = MeshSnapshot::default();
    for s in state.services.iter() {
        if let Some(service) = service(s) {
            for p in &service.ports {
                snapshot
                    .endpoints
                    .insert((service.key.clone(), p.port), Vec::new());
            }
            snapshot.services.insert(service.key.clone(), service);
        }
    }
    snapshot.workloads = state
        .pods
        .iter()
        .filter_map(|p| workload(p, trust_domain))
        .collect();
    snapshot
        .workloads
        .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));

    let pods = crate::model::WorkloadIndex::new(&snapshot.workloads);
    let unmeshed = Unmeshed::of(state);
    let mut outside = BTreeSet::new();
    for slice in state.endpoint_slices.iter() {
        let to_unmeshed = slice_endpoints(
            slice,
            &snapshot.services,
            &pods,
            &unmeshed,
            &mut snapshot.endpoints,
        );
        outside.extend(to_unmeshed);
    }
    drop_services_outside_the_mesh(&mut snapshot, outside);
    for list in snapshot.endpoints.values_mut() {
        list.sort_by_key(|e| (e.address, e.port));
        list.dedup_by_key(|e| (e.address, e.port));
    }
    snapshot
}

fn service(s: &KubeService) -> Option<Service> {
    let key = ServiceKey {
        namespace: s.metadata.namespace.clone()?,
        name: s.metadata.name.clone()?,
    };
    let spec = s.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let mut vips: Vec<IpAddr> = Vec::new();
    let ips = spec.cluster_ips.iter().flatten().chain(&spec.cluster_ip);
    for ip in ips.filter_map(|ip| ip.parse().ok()) {
        if !vips.contains(&ip) {
            vips.push(ip);
        }
    }
    let ports = spec
        .ports
        .iter()
        .flatten()
        .filter(|p| matches!(p.protocol.as_deref(), None | Some("TCP")))
        .filter_map(|p| {
            let port = u16::try_from(p.port).ok()?;
            let name = p.name.clone().unwrap_or_default();
            let target_port = match &p.target_port {
                None => TargetPort::Number(port),
                Some(IntOrString::Int(n)) => TargetPort::Number(u16::try_from(*n).ok()?),
                Some(IntOrString::String(s)) => match s.parse() {
                    Ok(n) => TargetPort::Number(n),
                    Err(_) => TargetPort::Name(s.clone()),
                },
            };
            let protocol = app_protocol(p.app_protocol.as_deref(), &name);
            Some(ServicePort {
                name,
                port,
                target_port,
                protocol,
            })
        })
        .collect();
    Some(Service {
        key,
        vips,
        ports,
        selector: spec.selector.clone().unwrap_or_default(),
    })
}

/// `appProtocol`, or else the port name's prefix (`http-web`), as Istio reads them
/// (the same rule as the file registry).
fn app_protocol(app_protocol: Option<&str>, port_name: &str) -> AppProtocol {
    let from = |s: &str| match s {
        "http" | "kubernetes.io/http" => Some(AppProtocol::Http),
        "http2" | "kubernetes.io/h2c" => Some(AppProtocol::Http2),
        "grpc" => Some(AppProtocol::Grpc),
        "tcp" => Some(AppProtocol::Tcp),
        "opaque" => Some(AppProtocol::Opaque),
        _ => None,
    };
    match app_protocol {
        Some(p) => from(p).unwrap_or(AppProtocol::Unspecified),
        None => {
            let prefix = port_name.split_once('-').map_or(port_name, |(p, _)| p);
            match prefix {
                "http" | "http2" | "grpc" | "tcp" => from(prefix),
                _ => None,
            }
            .unwrap_or(AppProtocol::Unspecified)
        }
    }
}

fn workload(p: &Pod, trust_domain: &str) -> Option<Workload> {
    let namespace = p.metadata.namespace.clone()?;
    let name = p.metadata.name.clone()?;
    let spec = p.spec.as_ref()?;
    let status = p.status.as_ref()?;
    if spec.host_network == Some(true)
        || matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"))
    {
        return None;
    }
    let address: IpAddr = status.pod_ip.as_deref()?.parse().ok()?;
    let sa = spec
        .service_account_name
        .as_deref()
        .filter(|s| !s.is_empty())
        .unwrap_or("default");
    let identity = match SpiffeId::new(trust_domain, &namespace, sa) {
        Ok(id) => id,
        Err(e) => {
            tracing::debug!(pod = %format!("{namespace}/{name}"), error = %e, "pod has no valid identity");
            return None;
        }
    };
    let ports = spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|port| Some((port.name.clone()?, u16::try_from(port.container_port).ok()?)))
        .collect();
    Some(Workload {
        namespace,
        name,
        address,
        identity,
        labels: p.metadata.labels.clone().unwrap_or_default(),
        ports,
        sidecar_port: None,
        weight: 1,
        zone: String::new(),
    })
}

/// Pods without the Trellis sidecar, by namespace and name.
struct Unmeshed<'a>(HashSet<(&'a str, &'a str)>);

impl<'a> Unmeshed<'a> {
    fn of(state: &'a ClusterState) -> Self {
        use crate::injector::sidecar::PROXY_CONTAINER;
        let pods = state.pods.iter().filter(|p| {
            // The container, not the `trellis.io/status` annotation: the annotation
            // alone says nothing about a proxy being there to terminate mTLS.
            let mut containers = p.spec.iter().flat_map(|s| {
                let inits = s.init_containers.iter().flatten();
                inits.chain(&s.containers)
            });
            !containers.any(|c| c.name == PROXY_CONTAINER)
        });
        Unmeshed(
            pods.filter_map(|p| {
                Some((
                    p.metadata.namespace.as_deref()?,
                    p.metadata.name.as_deref()?,
                ))
            })
            .collect(),
        )
    }

    fn contains(&self, w: &crate::model::Workload) -> bool {
        self.0.contains(&(w.namespace.as_str(), w.name.as_str()))
    }
}

/// Removes the Services in `outside` (those with an unmeshed backend) that have no
/// meshed endpoint left on any port.
fn drop_services_outside_the_mesh(snapshot: &mut MeshSnapshot, outside: BTreeSet<ServiceKey>) {
    for key in outside {
        let Some(service) = snapshot.services.get(&key) else {
            continue;
        };
        let ports: Vec<u16> = service.ports.iter().map(|p| p.port).collect();
        let meshed = ports.iter().any(|port| {
            snapshot
                .endpoints
                .get(&(key.clone(), *port))
                .is_some_and(|list| !list.is_empty())
        });
        if meshed {
            continue;
        }
        tracing::debug!(service = %key, "no backend has the Trellis sidecar: left to plain TCP");
        snapshot.services.remove(&key);
        for port in ports {
            snapshot.endpoints.remove(&(key.clone(), port));
        }
    }
}

/// Adds the slice's endpoints to `out`; returns the Service if it left out an
/// address because its Pod has no sidecar.
fn slice_endpoints(
    slice: &EndpointSlice,
    services: &BTreeMap<ServiceKey, Service>,
    pods: &crate::model::WorkloadIndex<'_>,
    unmeshed: &Unmeshed<'_>,
    out: &mut BTreeMap<(ServiceKey, u16), Vec<Endpoint>>,
) -> Option<ServiceKey> {
    let namespace = slice.metadata.namespace.as_deref()?;
    let labels = slice.metadata.labels.as_ref();
    let service_name = labels.and_then(|l| l.get(SERVICE_NAME_LABEL))?;
    let key = ServiceKey {
        namespace: namespace.to_owned(),
        name: service_name.clone(),
    };
    let service = services.get(&key)?;
    if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
        return None;
    }
    let mut left_out_unmeshed = false;
    // (service port, endpoint port): Kubernetes matches them by port name.
    let ports: Vec<(u16, u16)> = slice
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            let name = p.name.as_deref().unwrap_or("");
            let sp = service.ports.iter().find(|sp| sp.name == name)?;
            Some((sp.port, u16::try_from(p.port?).ok()?))
        })
        .collect();
    for e in &slice.endpoints {
        let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
        let target = e.target_ref.as_ref().and_then(|r| {
            (r.kind.as_deref() == Some("Pod")).then_some(())?;
            Some((
                r.namespace.as_deref().unwrap_or(namespace),
                r.name.as_deref()?,
            ))
        });
        for address in e.addresses.iter().filter_map(|a| a.parse::<IpAddr>().ok()) {
            let Some(w) = pods.find(namespace, target, address) else {
                tracing::debug!(service = %key, %address, "endpoint without a known Pod left out");
                continue;
            };
            if unmeshed.contains(w) {
                tracing::debug!(service = %key, %address, pod = %w.name, "endpoint without the Trellis sidecar left out");
                left_out_unmeshed = true;
                continue;
            }
            for &(service_port, port) in &ports {
                out.entry((key.clone(), service_port))
                    .or_default()
                    .push(Endpoint {
                        address,
                        port,
                        identity: w.identity.clone(),
                        weight: w.weight,
                        zone: e.zone.clone().unwrap_or_default(),
                        ready,
                        mesh_address: None,
                    });
            }
        }
    }
    left_out_unmeshed.then_some(key)
}

#[cfg(test)]
mod tests;
