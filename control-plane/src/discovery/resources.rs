//! The mesh model as discovery resources: typed, named, versioned.

use std::collections::BTreeMap;

use prost::Message;
use sha2::Digest;
use trellis_identity::SpiffeId;
use trellis_proto::discovery::v1 as pb;
use trellis_proto::discovery::v1::type_url;

use crate::model::{AppProtocol, MeshSnapshot, TargetPort};

/// All resources of one kind, by name.
pub type ResourceSet = BTreeMap<String, pb::Resource>;

/// What one proxy is entitled to see, per type URL.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ProxyView {
    pub by_type: BTreeMap<&'static str, ResourceSet>,
}

pub const TYPE_URLS: [&str; 3] = [
    type_url::TRUST_BUNDLE,
    type_url::SERVICE,
    type_url::ENDPOINTS,
];

/// Builds the view for the proxy of `_proxy`. Every proxy sees every service for now,
/// as Istio does without a `Sidecar` resource; the seam for scoping is here.
pub fn view_for(
    snapshot: &MeshSnapshot,
    trust_domain: &str,
    roots_pem: &[String],
    _proxy: &SpiffeId,
) -> ProxyView {
    let mut view = ProxyView::default();

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

    for ((key, port), endpoints) in &snapshot.endpoints {
        let name = format!("{key}:{port}");
        let resource = pb::Endpoints {
            service: key.name.clone(),
            namespace: key.namespace.clone(),
            port: u32::from(*port),
            endpoints: endpoints
                .iter()
                .map(|e| pb::Endpoint {
                    address: e.address.to_string(),
                    port: u32::from(e.port),
                    identity: e.identity.to_string(),
                    weight: e.weight,
                    zone: e.zone.clone(),
                    ready: e.ready,
                    mesh_address: e.mesh_address.map(|a| a.to_string()).unwrap_or_default(),
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
