//! From parsed objects to a [`MeshSnapshot`]: identities, VIPs, endpoints.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use trellis_identity::SpiffeId;

use super::types::{
    AddressType, BootstrapTokenObject, ClusterIp, EndpointSliceObject, IntOrString, ObjectMeta,
    ServiceObject, ServiceType, WorkloadEntryObject,
};
use super::{Object, Parsed, RegistryError};
use crate::model::{
    AppProtocol, BootstrapToken, Endpoint, MeshSnapshot, Service, ServiceKey, ServicePort,
    TargetPort, Workload,
};

const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Where an object was declared, for errors about it.
struct At<'a> {
    file: &'a Path,
    line: usize,
}

impl At<'_> {
    fn error(&self, reason: impl Into<String>) -> RegistryError {
        RegistryError::new(self.file, Some(self.line), reason)
    }
}

pub(super) fn build(
    objects: Vec<Parsed>,
    trust_domain: &str,
    errors: &mut Vec<RegistryError>,
    warnings: &mut Vec<RegistryError>,
) -> MeshSnapshot {
    let objects = drop_duplicates(objects, errors);
    let mut snapshot = MeshSnapshot::default();
    let (mut services, mut slices) = (Vec::new(), Vec::new());
    let mut token_owner: HashMap<[u8; 32], String> = HashMap::new();
    let mut token_at: HashMap<String, (PathBuf, usize)> = HashMap::new();
    let mut vip_owner: HashMap<IpAddr, ServiceKey> = HashMap::new();
    for p in &objects {
        let at = At {
            file: &p.file,
            line: p.line,
        };
        match &p.object {
            Object::WorkloadEntry(w) => match workload(w, trust_domain) {
                Ok(w) => snapshot.workloads.push(w),
                Err(reason) => errors.push(at.error(reason)),
            },
            Object::BootstrapToken(t) => match token(t, trust_domain) {
                Ok(t) => match token_owner.get(&t.token_sha256) {
                    Some(other) => errors.push(at.error(format!(
                        "BootstrapToken {} has the same token as BootstrapToken {other}",
                        t.name
                    ))),
                    None => {
                        token_owner.insert(t.token_sha256, t.name.clone());
                        token_at.insert(t.name.clone(), (p.file.clone(), p.line));
                        snapshot.bootstrap_tokens.push(t);
                    }
                },
                Err(reason) => errors.push(at.error(reason)),
            },
            Object::Service(s) => match service(s) {
                Ok(s) => {
                    for vip in &s.vips {
                        if let Some(other) = vip_owner.insert(*vip, s.key.clone()) {
                            let reason =
                                format!("cluster IP {vip} is also used by Service {other}");
                            errors.push(at.error(reason));
                        }
                    }
                    services.push(s);
                }
                Err(reason) => errors.push(at.error(reason)),
            },
            Object::EndpointSlice(s) => slices.push((at, s)),
            // After the Services: see `policy::add`.
            Object::HttpRoute(_)
            | Object::TrafficPolicy(_)
            | Object::AuthorizationPolicy(_)
            | Object::PeerAuthentication(_) => {}
        }
    }
    snapshot
        .workloads
        .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    snapshot
        .bootstrap_tokens
        .sort_by(|a, b| a.name.cmp(&b.name));
    drop_unbound_tokens(&mut snapshot, &token_at, errors);
    for s in services {
        for p in &s.ports {
            snapshot
                .endpoints
                .insert((s.key.clone(), p.port), Vec::new());
        }
        snapshot.services.insert(s.key.clone(), s);
    }

    let lookup = crate::model::WorkloadIndex::new(&snapshot.workloads);
    let mut endpoints: BTreeMap<(ServiceKey, u16), Vec<Endpoint>> = BTreeMap::new();
    for (at, slice) in slices {
        if let Err(reason) = slice_endpoints(slice, &snapshot.services, &lookup, &mut endpoints) {
            errors.extend(reason.into_iter().map(|r| at.error(r)));
        }
    }
    for s in snapshot.services.values() {
        selector_endpoints(s, &snapshot.workloads, &mut endpoints);
    }
    for (key, mut list) in endpoints {
        // Stable: of two entries for one address and port, the first (a slice's) stays.
        list.sort_by_key(|e| (e.address, e.port));
        list.dedup_by_key(|e| (e.address, e.port));
        snapshot.endpoints.insert(key, list);
    }
    super::policy::add(&objects, &mut snapshot, errors, warnings);
    snapshot
}

/// Reports and drops objects declared twice (same kind, namespace and name).
fn drop_duplicates(objects: Vec<Parsed>, errors: &mut Vec<RegistryError>) -> Vec<Parsed> {
    let mut seen: HashMap<(&'static str, String, String), (PathBuf, usize)> = HashMap::new();
    let mut kept = Vec::with_capacity(objects.len());
    for p in objects {
        let own = |kind, meta: &ObjectMeta| (kind, meta.namespace().to_owned(), meta.name.clone());
        let api = |kind, meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
            let name = meta.name.clone().unwrap_or_default();
            (kind, crate::api::namespace_of(meta).to_owned(), name)
        };
        let key = match &p.object {
            Object::Service(o) => own("Service", &o.metadata),
            Object::EndpointSlice(o) => own("EndpointSlice", &o.metadata),
            Object::WorkloadEntry(o) => own("WorkloadEntry", &o.metadata),
            Object::BootstrapToken(o) => own("BootstrapToken", &o.metadata),
            Object::HttpRoute(o) => api("HTTPRoute", &o.metadata),
            Object::TrafficPolicy(o) => api("TrafficPolicy", &o.metadata),
            Object::AuthorizationPolicy(o) => api("AuthorizationPolicy", &o.metadata),
            Object::PeerAuthentication(o) => api("PeerAuthentication", &o.metadata),
        };
        let kind = key.0;
        if let Some((file, line)) = seen.get(&key) {
            let reason = format!(
                "duplicate {kind} {}/{}: first declared at {}:{line}",
                key.1,
                key.2,
                file.display()
            );
            errors.push(RegistryError::new(&p.file, Some(p.line), reason));
            continue;
        }
        seen.insert(key, (p.file.clone(), p.line));
        kept.push(p);
    }
    kept
}

fn identity(trust_domain: &str, namespace: &str, sa: &str) -> Result<SpiffeId, String> {
    SpiffeId::new(trust_domain, namespace, sa).map_err(|e| {
        format!("no valid identity for namespace {namespace:?}, service account {sa:?}: {e}")
    })
}

fn workload(o: &WorkloadEntryObject, trust_domain: &str) -> Result<Workload, String> {
    let (meta, spec) = (&o.metadata, &o.spec);
    let namespace = meta.namespace().to_owned();
    let identity = identity(trust_domain, &namespace, &spec.service_account)?;
    let weight = spec.weight.unwrap_or(1);
    if weight == 0 {
        return Err("weight must be at least 1".into());
    }
    let zone = match (&spec.locality, &spec.zone) {
        (Some(l), Some(z)) if l != z => return Err("set locality or zone, not both".into()),
        (Some(z), _) | (None, Some(z)) => z.clone(),
        (None, None) => String::new(),
    };
    let sidecar = spec.sidecar.unwrap_or(true);
    if !sidecar && spec.sidecar_port.is_some() {
        return Err("sidecarPort is set but sidecar is false".into());
    }
    let mut labels = meta.labels.clone();
    labels.extend(spec.labels.clone());
    let addresses: Vec<IpAddr> = spec.addresses.iter().map(|a| a.0).collect();
    let Some(address) = spec
        .address
        .as_ref()
        .map(|a| a.0)
        .or(addresses.first().copied())
    else {
        return Err("give address or addresses".into());
    };
    Ok(Workload {
        namespace,
        name: meta.name.clone(),
        address,
        addresses,
        identity,
        labels,
        ports: spec
            .ports
            .iter()
            .map(|(k, v)| (k.clone(), v.get()))
            .collect(),
        sidecar_port: spec.sidecar_port.map(|p| p.get()),
        sidecar,
        weight,
        zone,
    })
}

fn token(o: &BootstrapTokenObject, trust_domain: &str) -> Result<BootstrapToken, String> {
    let (meta, spec) = (&o.metadata, &o.spec);
    let namespace = meta.namespace();
    let identity = identity(trust_domain, namespace, &spec.service_account)?;
    let token_sha256: [u8; 32] = match (&spec.token, &spec.token_sha256) {
        (Some(t), None) if !t.is_empty() => Sha256::digest(t.as_bytes()).into(),
        (Some(_), None) => return Err("token is empty".into()),
        (None, Some(h)) => hex::decode(h)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or("tokenSha256 must be 64 hex digits")?,
        _ => return Err("set exactly one of token and tokenSha256".into()),
    };
    Ok(BootstrapToken {
        name: format!("{namespace}/{}", meta.name),
        token_sha256,
        identity,
        workload: spec.workload.clone(),
    })
}

/// A token bound to a workload must name a WorkloadEntry of its namespace that runs as
/// its identity; otherwise it proves nothing and is dropped with an error.
fn drop_unbound_tokens(
    snapshot: &mut MeshSnapshot,
    token_at: &HashMap<String, (PathBuf, usize)>,
    errors: &mut Vec<RegistryError>,
) {
    let workloads = &snapshot.workloads;
    snapshot.bootstrap_tokens.retain(|t| {
        let Some(name) = &t.workload else {
            return true;
        };
        let namespace = t.identity.namespace();
        let reason = match workloads
            .iter()
            .find(|w| w.namespace == namespace && &w.name == name)
        {
            Some(w) if w.identity == t.identity => return true,
            Some(w) => format!(
                "BootstrapToken {} is for {}, but WorkloadEntry {namespace}/{name} runs as {}",
                t.name, t.identity, w.identity
            ),
            None => format!(
                "BootstrapToken {} names WorkloadEntry {namespace}/{name}, which does not exist",
                t.name
            ),
        };
        let (file, line) = token_at
            .get(&t.name)
            .map_or((Path::new(""), None), |(f, l)| (f.as_path(), Some(*l)));
        errors.push(RegistryError::new(file, line, reason));
        false
    });
}

fn service(o: &ServiceObject) -> Result<Service, String> {
    let (meta, spec) = (&o.metadata, &o.spec);
    let key = ServiceKey {
        namespace: meta.namespace().to_owned(),
        name: meta.name.clone(),
    };
    if matches!(spec.type_, Some(ServiceType::ExternalName)) {
        return Err("Services of type ExternalName are not supported".into());
    }
    let mut vips = Vec::new();
    let mut headless = false;
    for ip in spec.cluster_ip.iter().chain(&spec.cluster_ips) {
        match ip {
            ClusterIp::Unset => {}
            ClusterIp::Headless => headless = true,
            ClusterIp::Ip(ip) if !vips.contains(ip) => vips.push(*ip),
            ClusterIp::Ip(_) => {}
        }
    }
    if headless && !vips.is_empty() {
        return Err("cluster IP \"None\" (headless) given together with addresses".into());
    }
    let mut ports: Vec<ServicePort> = Vec::new();
    for p in &spec.ports {
        let port = p.port.get();
        let name = p.name.clone().unwrap_or_default();
        if name.is_empty() && spec.ports.len() > 1 {
            return Err(format!(
                "port {port} needs a name: a Service with several ports names each"
            ));
        }
        if ports.iter().any(|q| q.port == port) {
            return Err(format!("port {port} is declared twice"));
        }
        if ports.iter().any(|q| q.name == name) {
            return Err(format!("port name {name:?} is declared twice"));
        }
        let target_port = match &p.target_port {
            None => TargetPort::Number(port),
            Some(IntOrString::Int(n)) => TargetPort::Number(n.get()),
            Some(IntOrString::String(s)) => TargetPort::Name(s.clone()),
        };
        let protocol = app_protocol(p.app_protocol.as_deref(), &name);
        ports.push(ServicePort {
            name,
            port,
            target_port,
            protocol,
        });
    }
    Ok(Service {
        key,
        vips,
        ports,
        selector: spec.selector.clone(),
    })
}

/// `appProtocol`, or else the port name's prefix (`http-web`), as Istio reads them.
pub(super) fn app_protocol(app_protocol: Option<&str>, port_name: &str) -> AppProtocol {
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

/// Adds a slice's endpoints; returns the reasons it was (partly) rejected.
fn slice_endpoints(
    slice: &EndpointSliceObject,
    services: &BTreeMap<ServiceKey, Service>,
    workloads: &crate::model::WorkloadIndex<'_>,
    out: &mut BTreeMap<(ServiceKey, u16), Vec<Endpoint>>,
) -> Result<(), Vec<String>> {
    let namespace = slice.metadata.namespace();
    let mut errors = Vec::new();
    let Some(service_name) = slice.metadata.labels.get(SERVICE_NAME_LABEL) else {
        return Err(vec![format!(
            "EndpointSlice has no label {SERVICE_NAME_LABEL}"
        )]);
    };
    let key = ServiceKey {
        namespace: namespace.to_owned(),
        name: service_name.clone(),
    };
    let Some(service) = services.get(&key) else {
        return Err(vec![format!(
            "EndpointSlice refers to Service {namespace}/{service_name}, which does not exist"
        )]);
    };
    let want_v4 = match slice.address_type {
        AddressType::IPv4 => true,
        AddressType::IPv6 => false,
        AddressType::Fqdn => return Err(vec!["addressType FQDN is not supported".into()]),
    };
    // (service port, target port)
    let mut ports = Vec::new();
    for p in &slice.ports {
        let name = p.name.as_deref().unwrap_or("");
        match service.ports.iter().find(|sp| sp.name == name) {
            Some(sp) => ports.push((sp.port, p.port.get())),
            None => errors.push(format!(
                "EndpointSlice port {name:?} matches no port of Service {namespace}/{service_name}"
            )),
        }
    }
    for e in &slice.endpoints {
        let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
        let target = e.target_ref.as_ref().and_then(|r| {
            let kind_ok = matches!(r.kind.as_deref(), Some("WorkloadEntry" | "Pod"));
            let ns = r.namespace.as_deref().unwrap_or(namespace);
            kind_ok.then_some((ns, r.name.as_deref()?))
        });
        for address in e.addresses.iter().map(|a| a.0) {
            if address.is_ipv4() != want_v4 {
                errors.push(format!(
                    "endpoint address {address} does not match addressType {}",
                    if want_v4 { "IPv4" } else { "IPv6" }
                ));
                continue;
            }
            let w = match workloads.find(namespace, target, address) {
                Ok(Some(w)) => w,
                Ok(None) => {
                    errors.push(format!(
                        "no WorkloadEntry for endpoint address {address}: give a targetRef, or \
                         declare exactly one WorkloadEntry with that address in namespace {namespace}"
                    ));
                    continue;
                }
                Err(refused) => {
                    errors.push(format!("endpoint address {address} refused: {refused}"));
                    continue;
                }
            };
            let zone = e.zone.as_deref().filter(|z| !z.is_empty());
            for &(service_port, port) in &ports {
                out.entry((key.clone(), service_port))
                    .or_default()
                    .push(endpoint(w, address, port, ready, zone));
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// Adds the endpoints of the workloads a Service's selector picks.
fn selector_endpoints(
    service: &Service,
    workloads: &[Workload],
    out: &mut BTreeMap<(ServiceKey, u16), Vec<Endpoint>>,
) {
    if service.selector.is_empty() {
        return;
    }
    let selected = workloads.iter().filter(|w| {
        w.namespace == service.key.namespace
            && service
                .selector
                .iter()
                .all(|(k, v)| w.labels.get(k) == Some(v))
    });
    // A dual-stack Service (an IPv6 VIP too) reaches its workloads at every address,
    // so a direct call to a pod's IPv6 address still finds its identity; a
    // single-family one only at addresses of its family (headless: every address).
    let serves = |a: &IpAddr| {
        service.vips.is_empty() || service.vips.iter().any(|v| v.is_ipv4() == a.is_ipv4())
    };
    for w in selected {
        for sp in &service.ports {
            let port = match &sp.target_port {
                TargetPort::Number(n) => *n,
                TargetPort::Name(name) => match w.ports.get(name) {
                    Some(n) => *n,
                    None => continue,
                },
            };
            let list = out.entry((service.key.clone(), sp.port)).or_default();
            for address in w.all_addresses().filter(serves) {
                list.push(endpoint(w, address, port, true, None));
            }
        }
    }
}

fn endpoint(w: &Workload, address: IpAddr, port: u16, ready: bool, zone: Option<&str>) -> Endpoint {
    Endpoint {
        address,
        port,
        identity: Some(w.identity.clone()),
        weight: w.weight,
        zone: zone.unwrap_or(&w.zone).to_owned(),
        ready,
        mesh_address: w.sidecar_port.map(|p| SocketAddr::new(address, p)),
        sidecar: w.sidecar,
    }
}
