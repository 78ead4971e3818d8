//! The mesh model as discovery resources: typed, named, versioned.

mod policy;

use std::collections::BTreeMap;

use prost::Message;
use sha2::Digest;
use trellis_proto::discovery::v1 as pb;
use trellis_proto::discovery::v1::type_url;

use crate::model::{AppProtocol, MeshSnapshot, MtlsMode, PolicyScope, TargetPort, UnknownWorkload};

/// All resources of one kind, by name.
pub type ResourceSet = BTreeMap<String, pb::Resource>;

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

/// Builds the view for the proxy of `scope`. Every proxy sees every service, with its
/// routes and traffic policy, as Istio does without a `Sidecar` resource; the seam for
/// scoping is here. Security policy is the proxy's own: the AuthorizationPolicies
/// selecting its workload (or the fail-closed set, see [`PolicyScope`]) and one
/// PeerAuthentication, `<namespace>/effective`, with precedence already resolved.
pub fn view_for(
    snapshot: &MeshSnapshot,
    trust_domain: &str,
    roots_pem: &[String],
    scope: &PolicyScope<'_>,
) -> ProxyView {
    let mut view = ProxyView::default();
    let proxy = scope.identity();

    let bundle = pb::TrustBundle {
        trust_domain: trust_domain.to_owned(),
        roots_pem: roots_pem.to_vec(),
    };
    insert(
        &mut view,
        type_url::TRUST_BUNDLE,
        trust_domain.to_owned(),
        pb::resource::Kind::TrustBundle(bundle),
    );

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
        insert(
            &mut view,
            type_url::SERVICE,
            name,
            pb::resource::Kind::Service(resource),
        );
    }

    // The identity a meshed caller must see, or `None` to reach the endpoint in
    // plaintext: no workload known there, no sidecar, or a sidecar whose
    // PeerAuthentication for the port is DISABLE (it would take no mTLS).
    // PERMISSIVE takes both, so meshed callers still use mTLS there. An endpoint is
    // known by its identity only, so the strictest of that identity's workloads.
    let mut peer_modes = std::collections::HashMap::new();
    let mut identity_of = |e: &crate::model::Endpoint| {
        let identity = e.identity.as_ref().filter(|_| e.sidecar)?;
        let mode = peer_modes
            .entry(identity.clone())
            .or_insert_with(|| {
                let scope = snapshot.identity_scope(identity, UnknownWorkload::NotNamed);
                snapshot.peer_authentication_for(&scope)
            })
            .mode_for(e.port);
        (mode != MtlsMode::Disable).then(|| identity.to_string())
    };
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
        insert(
            &mut view,
            type_url::ENDPOINTS,
            name,
            pb::resource::Kind::Endpoints(resource),
        );
    }
    for (key, rules) in &snapshot.routes {
        if let Some(table) = policy::route_table(key, rules, proxy.namespace()) {
            let kind = pb::resource::Kind::RouteTable(table);
            insert(&mut view, type_url::ROUTE_TABLE, key.to_string(), kind);
        }
    }
    for (key, traffic) in &snapshot.traffic_policies {
        let kind = pb::resource::Kind::TrafficPolicy(policy::traffic_policy(key, traffic));
        insert(&mut view, type_url::TRAFFIC_POLICY, key.to_string(), kind);
    }
    for authz in snapshot.authorization_policies_for(scope) {
        let name = format!("{}/{}", authz.namespace, authz.name);
        let kind = pb::resource::Kind::AuthorizationPolicy(policy::authorization_policy(&authz));
        insert(&mut view, type_url::AUTHORIZATION_POLICY, name, kind);
    }
    let peer = snapshot.peer_authentication_for(scope);
    let peer = policy::peer_authentication(proxy.namespace(), &peer);
    let name = format!("{}/{}", peer.namespace, peer.name);
    let kind = pb::resource::Kind::PeerAuthentication(peer);
    insert(&mut view, type_url::PEER_AUTHENTICATION, name, kind);

    for type_url in TYPE_URLS {
        view.by_type.entry(type_url).or_default();
    }
    view
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
fn insert(view: &mut ProxyView, type_url: &'static str, name: String, kind: pb::resource::Kind) {
    let mut resource = pb::Resource {
        name: name.clone(),
        version: String::new(),
        kind: Some(kind),
    };
    let digest = sha2::Sha256::digest(resource.encode_to_vec());
    resource.version = hex::encode(&digest[..8]);
    view.by_type
        .entry(type_url)
        .or_default()
        .insert(name, resource);
}

/// The delta from what a proxy holds (`sent`: name -> version) to `current`.
pub fn delta(
    sent: &BTreeMap<String, String>,
    current: &ResourceSet,
) -> (Vec<pb::Resource>, Vec<String>) {
    let changed = current
        .values()
        .filter(|r| sent.get(&r.name) != Some(&r.version))
        .cloned()
        .collect();
    let removed = sent
        .keys()
        .filter(|name| !current.contains_key(*name))
        .cloned()
        .collect();
    (changed, removed)
}

#[cfg(test)]
mod tests;
