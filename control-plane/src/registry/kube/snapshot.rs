//! From the watched Kubernetes objects to a [`MeshSnapshot`]: pure, no client.
//!
//! - Service (not ExternalName) → [`Service`]: cluster IPs, TCP ports, protocol from
//!   `appProtocol` or the port name's prefix.
//! - Pod with an IP (not host-network, not finished) → [`Workload`] with identity
//!   `spiffe://<td>/ns/<namespace>/sa/<serviceAccountName>`.
//! - EndpointSlice (`kubernetes.io/service-name`) → [`Endpoint`]s; each address takes
//!   its identity from the Pod its `targetRef` names, else from the one Pod with that
//!   IP. An address with no Pod has no identity and is left out.

use std::collections::BTreeMap;
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
    for slice in state.endpoint_slices.iter() {
        slice_endpoints(slice, &snapshot.services, &pods, &mut snapshot.endpoints);
    }
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
        sidecar: has_sidecar(p),
        weight: 1,
        zone: String::new(),
    })
}

/// Whether the Pod runs the Trellis proxy: as a native sidecar (an init container
/// that keeps running) or as a plain container.
fn has_sidecar(p: &Pod) -> bool {
    let proxy = crate::injector::sidecar::PROXY_CONTAINER;
    p.spec.as_ref().is_some_and(|spec| {
        spec.containers.iter().any(|c| c.name == proxy)
            || spec
                .init_containers
                .iter()
                .flatten()
                .any(|c| c.name == proxy)
    })
}

fn slice_endpoints(
    slice: &EndpointSlice,
    services: &BTreeMap<ServiceKey, Service>,
    pods: &crate::model::WorkloadIndex<'_>,
    out: &mut BTreeMap<(ServiceKey, u16), Vec<Endpoint>>,
) {
    let Some(namespace) = slice.metadata.namespace.as_deref() else {
        return;
    };
    let labels = slice.metadata.labels.as_ref();
    let Some(service_name) = labels.and_then(|l| l.get(SERVICE_NAME_LABEL)) else {
        return;
    };
    let key = ServiceKey {
        namespace: namespace.to_owned(),
        name: service_name.clone(),
    };
    let Some(service) = services.get(&key) else {
        return;
    };
    if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
        return;
    }
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
                        sidecar: w.sidecar,
                    });
            }
        }
    }
}
