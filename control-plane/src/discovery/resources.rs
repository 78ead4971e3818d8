//! The mesh model as discovery resources: typed, named, versioned.

mod policy;

use std::collections::BTreeMap;
use std::sync::Arc;

use prost::Message;
use sha2::Digest;
use trellis_proto::discovery::v1 as pb;
use trellis_proto::discovery::v1::type_url;

use crate::model::{
    AppProtocol, MeshSnapshot, MtlsMode, PolicyScope, TargetPort, UnknownWorkload, WorkloadLookup,
};

/// All resources of one kind, by name; shared between streams.
pub type ResourceSet = BTreeMap<String, Arc<pb::Resource>>;

/// What one proxy is entitled to see, per type URL.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ProxyView {
    pub by_type: BTreeMap<&'static str, ResourceSet>,
}

pub const TYPE_URLS: [&str; 7] = [
    type_url::TRUST_BUNDLE,
    type_url::SERVICE,
    type_url::ENDPOINTS,
    type_url::ROUTE_TABLE,
    type_url::TRAFFIC_POLICY,
    type_url::AUTHORIZATION_POLICY,
    type_url::PEER_AUTHENTICATION,
];

/// The kinds every proxy is sent alike: built once per snapshot
/// ([`shared_resources`]) and shared by every stream.
pub const SHARED_TYPES: [&str; 4] = [
    type_url::TRUST_BUNDLE,
    type_url::SERVICE,
    type_url::ENDPOINTS,
    type_url::TRAFFIC_POLICY,
];

/// Builds the view for the proxy of `scope`. Every proxy sees every service, with its
/// routes and traffic policy, as Istio does without a `Sidecar` resource; the seam for
/// scoping is here. Security policy is the proxy's own: the AuthorizationPolicies
/// selecting its workload (or the fail-closed set, see [`PolicyScope`]) and one
/// PeerAuthentication, `<namespace>/effective`, with precedence already resolved.
///
/// The discovery server builds the same parts separately, the shared ones once per
/// snapshot; this is the whole view in one call.
pub fn view_for(
    snapshot: &MeshSnapshot,
    trust_domain: &str,
    roots_pem: &[String],
    scope: &PolicyScope<'_>,
) -> ProxyView {
    let mut view = ProxyView {
        by_type: shared_resources(snapshot, trust_domain, roots_pem),
    };
    let namespace = scope.identity().namespace();
    view.by_type
        .insert(type_url::ROUTE_TABLE, route_tables(snapshot, namespace));
    view.by_type.insert(
        type_url::AUTHORIZATION_POLICY,
        authorization_policies(snapshot, scope),
    );
    view.by_type.insert(
        type_url::PEER_AUTHENTICATION,
        peer_authentication(snapshot, scope),
    );
    view
}

/// The resources of [`SHARED_TYPES`], by type.
pub fn shared_resources(
    snapshot: &MeshSnapshot,
    trust_domain: &str,
    roots_pem: &[String],
) -> BTreeMap<&'static str, ResourceSet> {
    let mut by_type: BTreeMap<&'static str, ResourceSet> = BTreeMap::new();
    let bundle = pb::TrustBundle {
        trust_domain: trust_domain.to_owned(),
        roots_pem: roots_pem.to_vec(),
    };
    insert(
        by_type.entry(type_url::TRUST_BUNDLE).or_default(),
        trust_domain.to_owned(),
        pb::resource::Kind::TrustBundle(bundle),
    );

    let services = by_type.entry(type_url::SERVICE).or_default();
    for service in snapshot.services.values() {
        let name = service.key.to_string();
        let resource = pb::Service {
            name: service.key.name.clone(),
            namespace: service.key.namespace.clone(),
            vips: service.vips.iter().map(ToString::to_string).collect(),
            ports: service
                .ports
                .iter()
                .map(|p| pb::ServicePort {
                    name: p.name.clone(),
                    port: u32::from(p.port),
                    target_port: match &p.target_port {
                        TargetPort::Number(n) => u32::from(*n),
                        TargetPort::Name(_) => 0,
                    },
                    protocol: protocol(p.protocol) as i32,
                })
                .collect(),
            hostnames: hostnames(&service.key.name, &service.key.namespace),
        };
        insert(services, name, pb::resource::Kind::Service(resource));
    }

    // The identity a meshed caller must see, or `None` to reach the endpoint in
    // plaintext: no workload known there, no sidecar, or a sidecar whose
    // PeerAuthentication for the port is DISABLE (it would take no mTLS).
    // PERMISSIVE takes both, so meshed callers still use mTLS there. An endpoint is
    // known by its identity only, so the strictest of that identity's workloads.
    // Once per identity, through an index: a scan of every workload per identity
    // made this quadratic in the mesh's size.
    let lookup = WorkloadLookup::new(&snapshot.workloads);
    let mut peer_modes = std::collections::HashMap::new();
    let mut identity_of = |e: &crate::model::Endpoint| {
        let identity = e.identity.as_ref().filter(|_| e.sidecar)?;
        let mode = peer_modes
            .entry(identity.clone())
            .or_insert_with(|| {
                let scope =
                    snapshot.identity_scope_in(&lookup, identity, UnknownWorkload::NotNamed);
                snapshot.peer_authentication_for(&scope)
            })
            .mode_for(e.port);
        (mode != MtlsMode::Disable).then(|| identity.to_string())
    };
    let endpoint_sets = by_type.entry(type_url::ENDPOINTS).or_default();
    for ((key, port), endpoints) in &snapshot.endpoints {
        let name = format!("{key}:{port}");
        let resource = pb::Endpoints {
            service: key.name.clone(),
            namespace: key.namespace.clone(),
            port: u32::from(*port),
            endpoints: endpoints
                .iter()
                .map(|e| {
                    let identity = identity_of(e);
                    let plaintext = identity.is_none();
                    pb::Endpoint {
                        address: e.address.to_string(),
                        port: u32::from(e.port),
                        identity: identity.unwrap_or_default(),
                        weight: e.weight,
                        zone: e.zone.clone(),
                        ready: e.ready,
                        mesh_address: match e.mesh_address {
                            Some(a) if !plaintext => a.to_string(),
                            _ => String::new(),
                        },
                        plaintext,
                    }
                })
                .collect(),
        };
        insert(endpoint_sets, name, pb::resource::Kind::Endpoints(resource));
    }
    let traffic = by_type.entry(type_url::TRAFFIC_POLICY).or_default();
    for (key, policy) in &snapshot.traffic_policies {
        let kind = pb::resource::Kind::TrafficPolicy(policy::traffic_policy(key, policy));
        insert(traffic, key.to_string(), kind);
    }
    by_type
}

/// The route tables a proxy in `namespace` is sent: consumer routes of its namespace
/// replace a service's producer routes. The same for every proxy of a namespace.
pub fn route_tables(snapshot: &MeshSnapshot, namespace: &str) -> ResourceSet {
    let mut set = ResourceSet::new();
    for (key, rules) in &snapshot.routes {
        if let Some(table) = policy::route_table(key, rules, namespace) {
            insert(
                &mut set,
                key.to_string(),
                pb::resource::Kind::RouteTable(table),
            );
        }
    }
    set
}

/// The AuthorizationPolicies the proxy of `scope` enforces.
pub fn authorization_policies(snapshot: &MeshSnapshot, scope: &PolicyScope<'_>) -> ResourceSet {
    let mut set = ResourceSet::new();
    for authz in snapshot.authorization_policies_for(scope) {
        let name = format!("{}/{}", authz.namespace, authz.name);
        let kind = pb::resource::Kind::AuthorizationPolicy(policy::authorization_policy(&authz));
        insert(&mut set, name, kind);
    }
    set
}

/// The one effective PeerAuthentication of the proxy of `scope`.
pub fn peer_authentication(snapshot: &MeshSnapshot, scope: &PolicyScope<'_>) -> ResourceSet {
    let mut set = ResourceSet::new();
    let peer = snapshot.peer_authentication_for(scope);
    let peer = policy::peer_authentication(scope.identity().namespace(), &peer);
    let name = format!("{}/{}", peer.namespace, peer.name);
    insert(&mut set, name, pb::resource::Kind::PeerAuthentication(peer));
    set
}

fn hostnames(name: &str, namespace: &str) -> Vec<String> {
    vec![
        format!("{name}.{namespace}.svc.cluster.local"),
        format!("{name}.{namespace}.svc"),
        format!("{name}.{namespace}"),
    ]
}

fn protocol(p: AppProtocol) -> pb::Protocol {
    match p {
        AppProtocol::Unspecified => pb::Protocol::Unspecified,
        AppProtocol::Tcp => pb::Protocol::Tcp,
        AppProtocol::Http => pb::Protocol::Http,
        AppProtocol::Http2 => pb::Protocol::Http2,
        AppProtocol::Grpc => pb::Protocol::Grpc,
        AppProtocol::Opaque => pb::Protocol::Opaque,
    }
}

/// Versions are a digest of the content, so they are stable across restarts and a
/// reconnecting proxy is not resent what it already holds.
fn insert(set: &mut ResourceSet, name: String, kind: pb::resource::Kind) {
    let mut resource = pb::Resource {
        name: name.clone(),
        version: String::new(),
        kind: Some(kind),
    };
    let digest = sha2::Sha256::digest(resource.encode_to_vec());
    resource.version = hex::encode(&digest[..8]);
    set.insert(name, Arc::new(resource));
}

/// The delta from what a proxy holds (`sent`: name -> version) to `current`.
pub fn delta(
    sent: &BTreeMap<String, String>,
    current: &ResourceSet,
) -> (Vec<pb::Resource>, Vec<String>) {
    let changed = current
        .values()
        .filter(|r| sent.get(&r.name) != Some(&r.version))
        .map(|r| (**r).clone())
        .collect();
    let removed = sent
        .keys()
        .filter(|name| !current.contains_key(*name))
        .cloned()
        .collect();
    (changed, removed)
}

/// [`delta`] looking only at `names`: the proxy is known to hold the rest of
/// `current` already.
pub fn delta_of<'a>(
    sent: &BTreeMap<String, String>,
    current: &ResourceSet,
    names: impl IntoIterator<Item = &'a String>,
) -> (Vec<pb::Resource>, Vec<String>) {
    let mut changed = Vec::new();
    let mut removed = Vec::new();
    for name in names {
        match current.get(name) {
            Some(r) if sent.get(name) != Some(&r.version) => changed.push((**r).clone()),
            Some(_) => {}
            None if sent.contains_key(name) => removed.push(name.clone()),
            None => {}
        }
    }
    (changed, removed)
}

/// The delta from `old` to `new`, looking only at `names` when given (the names
/// known to differ between the two).
pub fn delta_sets(
    old: &ResourceSet,
    new: &ResourceSet,
    names: Option<&std::collections::BTreeSet<String>>,
) -> (Vec<pb::Resource>, Vec<String>) {
    let Some(names) = names else {
        let changed = new
            .iter()
            .filter(|(name, r)| old.get(*name).map(|o| &o.version) != Some(&r.version))
            .map(|(_, r)| (**r).clone())
            .collect();
        let removed = old
            .keys()
            .filter(|name| !new.contains_key(*name))
            .cloned()
            .collect();
        return (changed, removed);
    };
    let mut changed = Vec::new();
    let mut removed = Vec::new();
    for name in names {
        match (old.get(name), new.get(name)) {
            (Some(o), Some(n)) if o.version == n.version => {}
            (_, Some(n)) => changed.push((**n).clone()),
            (Some(_), None) => removed.push(name.clone()),
            (None, None) => {}
        }
    }
    (changed, removed)
}

#[cfg(test)]
mod tests;
