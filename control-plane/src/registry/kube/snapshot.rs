//! From the watched Kubernetes objects to a [`MeshSnapshot`]: pure, no client.
//!
//! - Service (not ExternalName) → [`Service`]: cluster IPs, TCP ports, protocol from
//!   `appProtocol` or the port name's prefix.
//! - Pod with an IP (not host-network, not finished) → [`Workload`] with identity
//!   `spiffe://<td>/ns/<namespace>/sa/<serviceAccountName>`.
//! - EndpointSlice (`kubernetes.io/service-name`) → [`Endpoint`]s; each address takes
//!   its identity from the Pod its `targetRef` names, else from the one Pod with that
//!   IP. A Pod without the injected `trellis-proxy` container is a workload without
//!   a sidecar, and an address with no Pod (the API server's) has no identity:
//!   discovery hands both to meshed clients as plaintext endpoints. An address whose
//!   `targetRef` names a Pod not seen yet is left out until it is.
//! - HTTPRoute, TrafficPolicy, AuthorizationPolicy, PeerAuthentication → routes and
//!   policies through the path the file registry takes too
//!   ([`crate::registry::policies`]), oldest object first in a conflict; each gets
//!   a verdict for its status (an HTTPRoute one per Service parent).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service as KubeService, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::DynamicObject;
use trellis_identity::SpiffeId;

use super::Kind;
use super::route_status::{self, RouteRefs};
use super::scope::NamespaceScope;
use super::status::{PolicyKind, StatusReport, StatusTarget};
use super::store::KindStore;
use crate::api::{self, FieldError};
use crate::model::{
    AppProtocol, Endpoint, MeshSnapshot, Service, ServiceKey, ServicePort, TargetPort, Workload,
};
use crate::registry::policies::{self, Declared, PolicyObject, Rejection, Verdict};

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Everything the kube registry watches.
#[derive(Debug, Default)]
pub struct ClusterState {
    pub services: KindStore<KubeService>,
    pub endpoint_slices: KindStore<EndpointSlice>,
    pub pods: KindStore<Pod>,
    pub namespaces: KindStore<Namespace>,
    pub service_accounts: KindStore<ServiceAccount>,
    /// Gateway API `HTTPRoute` (optional: absent CRD counts as listed and empty).
    pub http_routes: KindStore<DynamicObject>,
    /// The Trellis policy CRDs (optional as well).
    pub traffic_policies: KindStore<DynamicObject>,
    pub authorization_policies: KindStore<DynamicObject>,
    pub peer_authentications: KindStore<DynamicObject>,
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
            && self.traffic_policies.is_listed()
            && self.authorization_policies.is_listed()
            && self.peer_authentications.is_listed()
    }

    /// The store of a kind read untyped.
    pub fn custom_mut(&mut self, kind: Kind) -> Option<&mut KindStore<DynamicObject>> {
        match kind {
            Kind::HttpRoute => Some(&mut self.http_routes),
            Kind::TrafficPolicy => Some(&mut self.traffic_policies),
            Kind::AuthorizationPolicy => Some(&mut self.authorization_policies),
            Kind::PeerAuthentication => Some(&mut self.peer_authentications),
            Kind::Service
            | Kind::EndpointSlice
            | Kind::Pod
            | Kind::Namespace
            | Kind::ServiceAccount => None,
        }
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

/// The mesh model for the cluster's current state, with the default root namespace.
pub fn snapshot_from(state: &ClusterState, trust_domain: &str) -> MeshSnapshot {
    evaluate(state, trust_domain, crate::model::DEFAULT_ROOT_NAMESPACE).0
}

/// The mesh model for the cluster's current state, and the status each route and
/// policy object should have. Policies in `root_namespace` span the mesh.
pub fn evaluate(
    state: &ClusterState,
    trust_domain: &str,
    root_namespace: &str,
) -> (MeshSnapshot, StatusReport) {
    evaluate_in(state, trust_domain, root_namespace, &NamespaceScope::all())
}

/// [`evaluate`] with only the namespaces `scope` selects (and the root namespace)
/// contributing Services, endpoints, routes and policies; Pods count everywhere.
pub fn evaluate_in(
    state: &ClusterState,
    trust_domain: &str,
    root_namespace: &str,
    scope: &NamespaceScope,
) -> (MeshSnapshot, StatusReport) {
    let selected: Option<BTreeSet<String>> = (!scope.selects_all()).then(|| {
        state
            .namespaces
            .iter()
            .filter(|ns| scope.selects(ns.metadata.labels.as_ref().unwrap_or(&BTreeMap::new())))
            .filter_map(|ns| ns.metadata.name.clone())
            .chain([root_namespace.to_owned()])
            .collect()
    });
    let in_scope = |namespace: Option<&String>| match &selected {
        None => true,
        Some(set) => namespace.is_some_and(|n| set.contains(n)),
    };
    let mut snapshot = MeshSnapshot {
        root_namespace: root_namespace.to_owned(),
        ..MeshSnapshot::default()
    };
    for s in state.services.iter() {
        if !in_scope(s.metadata.namespace.as_ref()) {
            continue;
        }
        if let Some(service) = service(&s) {
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
        .filter_map(|p| workload(&p, trust_domain))
        .collect();
    snapshot
        .workloads
        .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));

    let pods = crate::model::WorkloadIndex::new(&snapshot.workloads);
    for slice in state.endpoint_slices.iter() {
        if !in_scope(slice.metadata.namespace.as_ref()) {
            continue;
        }
        slice_endpoints(&slice, &snapshot.services, &pods, &mut snapshot.endpoints);
    }
    for list in snapshot.endpoints.values_mut() {
        list.sort_by_key(|e| (e.address, e.port));
        list.dedup_by_key(|e| (e.address, e.port));
    }
    let report = add_policies(state, &mut snapshot, &in_scope);
    (snapshot, report)
}

/// One route or policy object read into its Rust type, with what its status needs.
struct Read {
    target: StatusTarget,
    created: Option<k8s_openapi::jiff::Timestamp>,
    object: Result<Typed, FieldError>,
    /// HTTPRoute: its references as written, for its parents' status.
    route_refs: RouteRefs,
}

enum Typed {
    HttpRoute(Box<api::HttpRoute>),
    TrafficPolicy(Box<api::TrafficPolicy>),
    AuthorizationPolicy(Box<api::AuthorizationPolicy>),
    PeerAuthentication(Box<api::PeerAuthentication>),
}

fn add_policies(
    state: &ClusterState,
    snapshot: &mut MeshSnapshot,
    in_scope: &dyn Fn(Option<&String>) -> bool,
) -> StatusReport {
    let stores = [
        (PolicyKind::HttpRoute, &state.http_routes),
        (PolicyKind::TrafficPolicy, &state.traffic_policies),
        (
            PolicyKind::AuthorizationPolicy,
            &state.authorization_policies,
        ),
        (PolicyKind::PeerAuthentication, &state.peer_authentications),
    ];
    let mut read: Vec<Read> = stores
        .into_iter()
        .flat_map(|(kind, store)| {
            store
                .iter()
                .filter(|o| in_scope(o.metadata.namespace.as_ref()))
                .map(move |o| read_object(kind, &o))
        })
        .collect();
    // Of two objects in conflict the older wins, as in Gateway API; then by name.
    read.sort_by(|a, b| {
        let key = |r: &Read| (r.created, r.target.namespace.clone(), r.target.name.clone());
        key(a).cmp(&key(b))
    });
    let mut verdicts = Vec::with_capacity(read.len());
    let mut declared = Vec::with_capacity(read.len());
    for (i, r) in read.iter().enumerate() {
        let object = match &r.object {
            Ok(Typed::HttpRoute(o)) => PolicyObject::HttpRoute(o),
            Ok(Typed::TrafficPolicy(o)) => PolicyObject::TrafficPolicy(o),
            Ok(Typed::AuthorizationPolicy(o)) => PolicyObject::AuthorizationPolicy(o),
            Ok(Typed::PeerAuthentication(o)) => PolicyObject::PeerAuthentication(o),
            Err(e) => {
                let mut verdict = Verdict::new(i);
                verdict.rejected = Some((Rejection::Invalid, vec![e.clone()]));
                verdicts.push(verdict);
                continue;
            }
        };
        declared.push(Declared {
            source: i,
            location: None,
            object,
        });
    }
    verdicts.extend(policies::add(declared, snapshot));
    let mut report = StatusReport::default();
    for verdict in verdicts {
        let r = &read[verdict.source];
        let mut target = r.target.clone();
        if target.kind == PolicyKind::HttpRoute {
            target.parents = route_status::judge_parents(
                &r.route_refs,
                &target.namespace,
                &verdict,
                &snapshot.services,
            );
        }
        for note in &verdict.notes {
            tracing::debug!(kind = target.kind.as_str(), namespace = %target.namespace, name = %target.name, %note, "part of a route does not apply");
        }
        report.push(target, &verdict);
    }
    report.sort();
    report
}

fn read_object(kind: PolicyKind, o: &DynamicObject) -> Read {
    let meta = &o.metadata;
    let target = StatusTarget {
        kind,
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
        generation: meta.generation,
        resource_version: meta.resource_version.clone(),
        uid: meta.uid.clone(),
        current: super::status::current_conditions(o),
        judged: Vec::new(),
        current_parents: route_status::current_parents(o.data.get("status")),
        parents: Vec::new(),
    };
    let route_refs = match kind {
        PolicyKind::HttpRoute => RouteRefs::of(o.data.get("spec")),
        _ => RouteRefs::default(),
    };
    let created = meta.creation_timestamp.as_ref().map(|t| t.0);
    // The status is the control plane's own output and may hold anything: only the
    // rest is read, so a strange status never rejects a good object.
    let mut value = match serde_json::to_value(o) {
        Ok(v) => v,
        Err(e) => return unreadable(target, created, route_refs, e),
    };
    if let Some(fields) = value.as_object_mut() {
        fields.remove("status");
    }
    let object = match kind {
        PolicyKind::HttpRoute => {
            serde_json::from_value(value).map(|o| Typed::HttpRoute(Box::new(o)))
        }
        PolicyKind::TrafficPolicy => {
            serde_json::from_value(value).map(|o| Typed::TrafficPolicy(Box::new(o)))
        }
        PolicyKind::AuthorizationPolicy => {
            serde_json::from_value(value).map(|o| Typed::AuthorizationPolicy(Box::new(o)))
        }
        PolicyKind::PeerAuthentication => {
            serde_json::from_value(value).map(|o| Typed::PeerAuthentication(Box::new(o)))
        }
    };
    match object {
        Ok(object) => Read {
            target,
            created,
            object: Ok(object),
            route_refs,
        },
        Err(e) => unreadable(target, created, route_refs, e),
    }
}

/// An object whose shape the CRD schema should have refused.
fn unreadable(
    target: StatusTarget,
    created: Option<k8s_openapi::jiff::Timestamp>,
    route_refs: RouteRefs,
    e: serde_json::Error,
) -> Read {
    Read {
        target,
        created,
        route_refs,
        object: Err(FieldError {
            field: "spec".to_owned(),
            reason: e.to_string(),
        }),
    }
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
    // Dual-stack: podIPs holds podIP and the other family's address.
    let addresses: Vec<IpAddr> = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|ip| ip.ip.parse().ok())
        .collect();
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
        addresses,
        identity,
        labels: p.metadata.labels.clone().unwrap_or_default(),
        ports,
        sidecar_port: None,
        sidecar: crate::injector::sidecar::has_proxy(spec),
        weight: 1,
        zone: String::new(),
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
            let (identity, weight, sidecar) = match pods.find(namespace, target, address) {
                Ok(Some(w)) => (Some(w.identity.clone()), w.weight, w.sidecar),
                Err(refused) => {
                    tracing::warn!(service = %key, %address, reason = %refused, "endpoint dropped");
                    continue;
                }
                // Names a Pod not seen yet: it may be meshed, so it is no plaintext
                // endpoint; the next snapshot has it.
                Ok(None) if target.is_some() => {
                    tracing::debug!(service = %key, %address, "endpoint of a Pod not seen yet left out");
                    continue;
                }
                // No Pod at all (the API server, an address managed by hand):
                // nothing there runs a sidecar.
                Ok(None) => (None, 1, false),
            };
            for &(service_port, port) in &ports {
                out.entry((key.clone(), service_port))
                    .or_default()
                    .push(Endpoint {
                        address,
                        port,
                        identity: identity.clone(),
                        weight,
                        zone: e.zone.clone().unwrap_or_default(),
                        ready,
                        mesh_address: None,
                        sidecar,
                    });
            }
        }
    }
}

#[cfg(test)]
mod tests;
