//! What discovery told the proxy, validated and indexed for the connection path.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use trellis_identity::{SpiffeId, TrustBundle};
use trellis_proto::discovery::v1::{self as pb, resource::Kind, type_url};

use crate::authz::{Authorizer, InboundPolicy, PeerAuth};
use crate::balance::EndpointSet;
use crate::http::policy::TrafficPolicy;
use crate::http::route::RouteTable;

/// Why a resource was refused (sent back in the NACK).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{name}: {reason}")]
pub struct InvalidResource {
    pub name: String,
    pub reason: String,
}

/// The raw resources held, per type: what was last accepted.
#[derive(Clone, Debug, Default)]
pub struct Resources {
    pub by_type: BTreeMap<String, BTreeMap<String, pb::Resource>>,
}

/// One port of a known service.
#[derive(Debug)]
pub struct ServicePort {
    /// `name.namespace`
    pub service: String,
    pub port: u16,
    pub protocol: pb::Protocol,
    pub endpoints: Arc<EndpointSet>,
}

/// The index the data path reads: built once per accepted update.
#[derive(Debug, Default)]
pub struct MeshState {
    pub resources: Resources,
    /// `(name.namespace, port)` -> service port.
    pub services: HashMap<(String, u16), Arc<ServicePort>>,
    /// The same, by name then port: looked up per request without allocating.
    pub ports_by_service: HashMap<String, Vec<Arc<ServicePort>>>,
    /// VIP:port -> service port (transparent outbound).
    pub vips: HashMap<SocketAddr, Arc<ServicePort>>,
    /// Pod address:port -> identity, for connections made straight to an endpoint.
    pub endpoint_identities: HashMap<SocketAddr, SpiffeId>,
    /// Pod address:port -> a service port it backs (the first by name when several
    /// do), for endpoints with an identity: a connection straight to a pod finds its
    /// service here instead of scanning every service's endpoints.
    pub endpoint_services: HashMap<SocketAddr, Arc<ServicePort>>,
    /// Endpoint address:port of Service ports declared `tcp` or `opaque`: inbound
    /// carries these as bytes without protocol detection.
    pub opaque_endpoints: HashSet<SocketAddr>,
    pub trust_bundle: Option<TrustBundle>,
    /// HTTP routes per service (`name.namespace`).
    pub routes: HashMap<String, Arc<RouteTable>>,
    /// Traffic policy per service (`name.namespace`).
    pub policies: HashMap<String, Arc<TrafficPolicy>>,
    /// Who may call this workload, and how.
    pub inbound_policy: InboundPolicy,
}

impl MeshState {
    /// Applies one response to a copy of the held resources and builds the index.
    /// Any invalid resource rejects the whole response; the caller keeps `self`.
    pub fn apply(
        &self,
        response: &pb::DeltaDiscoveryResponse,
    ) -> Result<MeshState, InvalidResource> {
        let mut resources = self.resources.clone();
        let held = resources
            .by_type
            .entry(response.type_url.clone())
            .or_default();
        for name in &response.removed_resources {
            held.remove(name);
        }
        for resource in &response.resources {
            validate(&response.type_url, resource)?;
            held.insert(resource.name.clone(), resource.clone());
        }
        let next = build(resources, self)?;
        if response.type_url == type_url::AUTHORIZATION_POLICY {
            for rejected in next.inbound_policy.authorizer.rejected() {
                tracing::warn!(
                    policy = rejected.name,
                    reason = rejected.reason,
                    ports = ?rejected.ports,
                    "authorization policy does not compile; denying the ports it governs"
                );
            }
        }
        Ok(next)
    }

    /// One port of a service, by `name.namespace` and port.
    pub fn service(&self, name: &str, port: u16) -> Option<&Arc<ServicePort>> {
        self.ports_by_service
            .get(name)
            .and_then(|ports| ports.iter().find(|p| p.port == port))
    }

    /// The policy for `service`, or the defaults.
    pub fn policy(&self, service: &str) -> Arc<TrafficPolicy> {
        static DEFAULT: std::sync::OnceLock<Arc<TrafficPolicy>> = std::sync::OnceLock::new();
        self.policies
            .get(service)
            .cloned()
            .unwrap_or_else(|| DEFAULT.get_or_init(Default::default).clone())
    }
}

fn invalid(name: &str, reason: impl Into<String>) -> InvalidResource {
    InvalidResource {
        name: name.to_owned(),
        reason: reason.into(),
    }
}

fn validate(type_url: &str, resource: &pb::Resource) -> Result<(), InvalidResource> {
    let name = &resource.name;
    match (type_url, &resource.kind) {
        (type_url::SERVICE, Some(Kind::Service(s))) => {
            for vip in &s.vips {
                vip.parse::<IpAddr>()
                    .map_err(|_| invalid(name, format!("VIP {vip:?} is not an IP address")))?;
            }
            for port in &s.ports {
                u16::try_from(port.port)
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| invalid(name, format!("port {} is out of range", port.port)))?;
            }
            Ok(())
        }
        (type_url::ENDPOINTS, Some(Kind::Endpoints(e))) => {
            for ep in &e.endpoints {
                endpoint(name, ep)?;
            }
            Ok(())
        }
        (type_url::TRUST_BUNDLE, Some(Kind::TrustBundle(b))) => {
            TrustBundle::from_pem(&b.trust_domain, &b.roots_pem)
                .map(|_| ())
                .map_err(|e| invalid(name, e.to_string()))
        }
        (type_url::ROUTE_TABLE, Some(Kind::RouteTable(t))) => RouteTable::compile(t)
            .map(|_| ())
            .map_err(|e| invalid(name, e.to_string())),
        (type_url::TRAFFIC_POLICY, Some(Kind::TrafficPolicy(p))) => TrafficPolicy::compile(p)
            .map(|_| ())
            .map_err(|e| invalid(name, e.to_string())),
        // A policy that does not compile is accepted and enforced as a denial (see
        // `Authorizer::compile_each`): refusing the response would leave the proxy
        // on its previous policies, which at start means none.
        (type_url::AUTHORIZATION_POLICY, Some(Kind::AuthorizationPolicy(_))) => Ok(()),
        (type_url::PEER_AUTHENTICATION, Some(Kind::PeerAuthentication(_))) => Ok(()),
        _ => Err(invalid(
            name,
            format!("resource kind does not match type {type_url}"),
        )),
    }
}

/// A validated endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub address: SocketAddr,
    /// The identity its sidecar must prove; `None`: the endpoint takes plaintext
    /// only (no sidecar, or mTLS DISABLE), so it is reached without TLS.
    pub identity: Option<SpiffeId>,
    /// Where to dial: for mTLS, the endpoint's own address when the peer redirects
    /// or its sidecar's; for plaintext, the app's.
    pub dial: SocketAddr,
    pub ready: bool,
    pub weight: u32,
    /// Its labels in request metrics, built once with the endpoint.
    pub workload: Arc<crate::request_metrics::Workload>,
}

fn endpoint(name: &str, ep: &pb::Endpoint) -> Result<Endpoint, InvalidResource> {
    let ip: IpAddr = ep.address.parse().map_err(|_| {
        invalid(
            name,
            format!("address {:?} is not an IP address", ep.address),
        )
    })?;
    let port = u16::try_from(ep.port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| invalid(name, format!("endpoint port {} is out of range", ep.port)))?;
    let identity = if ep.plaintext {
        if !ep.identity.is_empty() {
            return Err(invalid(
                name,
                format!("plaintext endpoint {} names an identity", ep.address),
            ));
        }
        None
    } else {
        let id: SpiffeId = ep
            .identity
            .parse()
            .map_err(|e| invalid(name, format!("identity {:?}: {e}", ep.identity)))?;
        Some(id)
    };
    let address = SocketAddr::new(ip, port);
    // A plaintext endpoint has no sidecar to take mesh traffic: dial the app.
    let dial = if ep.mesh_address.is_empty() || identity.is_none() {
        address
    } else {
        ep.mesh_address.parse().map_err(|_| {
            invalid(
                name,
                format!("mesh address {:?} is not host:port", ep.mesh_address),
            )
        })?
    };
    let workload = Arc::new(identity.as_ref().map_or_else(
        crate::request_metrics::Workload::unknown,
        crate::request_metrics::Workload::of,
    ));
    Ok(Endpoint {
        workload,
        address,
        identity,
        dial,
        ready: ep.ready,
        weight: ep.weight.max(1),
    })
}

fn build(resources: Resources, previous: &MeshState) -> Result<MeshState, InvalidResource> {
    let mut state = MeshState::default();
    let empty = BTreeMap::new();
    let by_type = |t: &str| resources.by_type.get(t).unwrap_or(&empty);

    let mut endpoints: HashMap<(String, u16), Vec<Endpoint>> = HashMap::new();
    for resource in by_type(type_url::ENDPOINTS).values() {
        if let Some(Kind::Endpoints(e)) = &resource.kind {
            let service = format!("{}.{}", e.service, e.namespace);
            let port =
                u16::try_from(e.port).map_err(|_| invalid(&resource.name, "port out of range"))?;
            let list = endpoints.entry((service, port)).or_default();
            for ep in &e.endpoints {
                let ep = endpoint(&resource.name, ep)?;
                if let Some(identity) = &ep.identity {
                    state
                        .endpoint_identities
                        .insert(ep.address, identity.clone());
                }
                list.push(ep);
            }
        }
    }
    for resource in by_type(type_url::SERVICE).values() {
        if let Some(Kind::Service(s)) = &resource.kind {
            let service = format!("{}.{}", s.name, s.namespace);
            for port in &s.ports {
                let Ok(number) = u16::try_from(port.port) else {
                    continue;
                };
                let eps = endpoints
                    .remove(&(service.clone(), number))
                    .unwrap_or_default();
                let protocol =
                    pb::Protocol::try_from(port.protocol).unwrap_or(pb::Protocol::Unspecified);
                if matches!(protocol, pb::Protocol::Tcp | pb::Protocol::Opaque) {
                    state
                        .opaque_endpoints
                        .extend(eps.iter().map(|ep| ep.address));
                }
                let entry = Arc::new(ServicePort {
                    service: service.clone(),
                    port: number,
                    protocol,
                    endpoints: Arc::new(EndpointSet::new(
                        eps,
                        previous
                            .services
                            .get(&(service.clone(), number))
                            .map(|s| &*s.endpoints),
                    )),
                });
                for vip in &s.vips {
                    if let Ok(ip) = vip.parse::<IpAddr>() {
                        state
                            .vips
                            .insert(SocketAddr::new(ip, number), entry.clone());
                    }
                }
                for ep in entry.endpoints.all() {
                    if ep.identity.is_some() {
                        state
                            .endpoint_services
                            .entry(ep.address)
                            .or_insert_with(|| entry.clone());
                    }
                }
                state
                    .ports_by_service
                    .entry(service.clone())
                    .or_default()
                    .push(entry.clone());
                state.services.insert((service.clone(), number), entry);
            }
        }
    }
    if let Some(Kind::TrustBundle(b)) = by_type(type_url::TRUST_BUNDLE)
        .values()
        .next()
        .and_then(|r| r.kind.as_ref())
    {
        state.trust_bundle = TrustBundle::from_pem(&b.trust_domain, &b.roots_pem).ok();
    }
    for resource in by_type(type_url::ROUTE_TABLE).values() {
        if let Some(Kind::RouteTable(t)) = &resource.kind {
            let table =
                RouteTable::compile(t).map_err(|e| invalid(&resource.name, e.to_string()))?;
            state
                .routes
                .insert(format!("{}.{}", t.service, t.namespace), Arc::new(table));
        }
    }
    for resource in by_type(type_url::TRAFFIC_POLICY).values() {
        if let Some(Kind::TrafficPolicy(p)) = &resource.kind {
            let service = format!("{}.{}", p.service, p.namespace);
            // An unchanged policy keeps its state (the retry budget above all): an
            // update elsewhere must not refill the budget.
            let unchanged = previous
                .resources
                .by_type
                .get(type_url::TRAFFIC_POLICY)
                .and_then(|held| held.get(&resource.name))
                .is_some_and(|old| old.version == resource.version);
            let policy = match previous.policies.get(&service) {
                Some(kept) if unchanged => kept.clone(),
                _ => Arc::new(
                    TrafficPolicy::compile(p)
                        .map_err(|e| invalid(&resource.name, e.to_string()))?,
                ),
            };
            state.policies.insert(service, policy);
        }
    }
    let authorization = by_type(type_url::AUTHORIZATION_POLICY)
        .values()
        .filter_map(|r| match &r.kind {
            Some(Kind::AuthorizationPolicy(p)) => Some(p),
            _ => None,
        });
    state.inbound_policy.authorizer = Arc::new(Authorizer::compile_each(authorization));
    state.inbound_policy.accepted = resources
        .by_type
        .contains_key(type_url::AUTHORIZATION_POLICY)
        && resources
            .by_type
            .contains_key(type_url::PEER_AUTHENTICATION);
    // The control plane sends the one effective PeerAuthentication for this workload.
    if let Some(Kind::PeerAuthentication(p)) = by_type(type_url::PEER_AUTHENTICATION)
        .values()
        .next()
        .and_then(|r| r.kind.as_ref())
    {
        state.inbound_policy.peer_auth = PeerAuth::compile(p);
    }
    state.resources = resources;
    Ok(state)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::discovery) fn service(name: &str, vip: &str) -> pb::Resource {
        pb::Resource {
            name: format!("{name}.default"),
            version: vip.to_owned(),
            kind: Some(Kind::Service(pb::Service {
                name: name.to_owned(),
                namespace: "default".to_owned(),
                vips: vec![vip.to_owned()],
                ports: vec![pb::ServicePort {
                    name: "http".to_owned(),
                    port: 80,
                    target_port: 8080,
                    protocol: pb::Protocol::Http as i32,
                }],
                hostnames: vec![],
            })),
        }
    }

    pub(in crate::discovery) fn response(
        resources: Vec<pb::Resource>,
        removed: Vec<String>,
    ) -> pb::DeltaDiscoveryResponse {
        pb::DeltaDiscoveryResponse {
            type_url: type_url::SERVICE.to_owned(),
            system_version_info: String::new(),
            resources,
            removed_resources: removed,
            nonce: "1".to_owned(),
        }
    }

    #[test]
    fn applies_changes_and_removals() {
        let state = MeshState::default()
            .apply(&response(
                vec![service("a", "10.96.0.1"), service("b", "10.96.0.2")],
                vec![],
            ))
            .unwrap();
        assert!(state.vips.contains_key(&"10.96.0.1:80".parse().unwrap()));
        let state = state
            .apply(&response(vec![], vec!["a.default".to_owned()]))
            .unwrap();
        assert!(!state.services.contains_key(&("a.default".to_owned(), 80)));
        assert!(state.services.contains_key(&("b.default".to_owned(), 80)));
    }

    #[test]
    fn an_invalid_resource_rejects_the_whole_response() {
        let good = MeshState::default()
            .apply(&response(vec![service("a", "10.96.0.1")], vec![]))
            .unwrap();
        let err = good
            .apply(&response(
                vec![service("b", "10.96.0.2"), service("c", "not-an-ip")],
                vec!["a.default".to_owned()],
            ))
            .unwrap_err();
        assert_eq!(err.name, "c.default");
        assert!(err.reason.contains("not-an-ip"), "{err}");
        // The caller keeps `good`, untouched by the half-applied response.
        assert!(good.services.contains_key(&("a.default".to_owned(), 80)));
        assert!(!good.services.contains_key(&("b.default".to_owned(), 80)));
    }

    fn bundle(version: &str, roots_pem: Vec<String>) -> pb::DeltaDiscoveryResponse {
        typed(
            type_url::TRUST_BUNDLE,
            vec![pb::Resource {
                name: "cluster.local".to_owned(),
                version: version.to_owned(),
                kind: Some(Kind::TrustBundle(pb::TrustBundle {
                    trust_domain: "cluster.local".to_owned(),
                    roots_pem,
                })),
            }],
        )
    }

    fn root_pem() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().pem()
    }

    /// A root rotation's bundle holds two roots; one that holds none is refused, so
    /// an update can never leave a proxy trusting nothing.
    #[test]
    fn a_bundle_of_two_roots_is_taken_and_an_empty_one_refused() {
        let two = MeshState::default()
            .apply(&bundle("1", vec![root_pem(), root_pem()]))
            .unwrap();
        let held = two.trust_bundle.clone().unwrap();
        assert_eq!(held.roots.len(), 2);
        let err = two.apply(&bundle("2", vec![])).unwrap_err();
        assert!(err.reason.contains("empty"), "{err}");
        let err = two
            .apply(&bundle("3", vec!["not PEM".to_owned()]))
            .unwrap_err();
        assert!(err.reason.contains("trust bundle"), "{err}");
        assert_eq!(two.trust_bundle, Some(held), "the last good bundle stays");
    }

    #[test]
    fn endpoints_with_a_bad_identity_are_refused() {
        let bad = pb::Resource {
            name: "a.default:80".to_owned(),
            version: "1".to_owned(),
            kind: Some(Kind::Endpoints(pb::Endpoints {
                service: "a".to_owned(),
                namespace: "default".to_owned(),
                port: 80,
                endpoints: vec![pb::Endpoint {
                    address: "10.244.0.2".to_owned(),
                    port: 8080,
                    identity: "spiffe://cluster.local/ns/x".to_owned(),
                    ready: true,
                    ..Default::default()
                }],
            })),
        };
        let mut r = response(vec![bad], vec![]);
        r.type_url = type_url::ENDPOINTS.to_owned();
        assert!(MeshState::default().apply(&r).is_err());
    }

    #[test]
    fn endpoints_of_tcp_ports_are_known_as_opaque() {
        let mut tcp = service("a", "10.96.0.1");
        if let Some(Kind::Service(s)) = &mut tcp.kind {
            s.ports[0].protocol = pb::Protocol::Tcp as i32;
        }
        let endpoints = |service: &str| pb::Resource {
            name: format!("{service}.default:80"),
            version: "1".to_owned(),
            kind: Some(Kind::Endpoints(pb::Endpoints {
                service: service.to_owned(),
                namespace: "default".to_owned(),
                port: 80,
                endpoints: vec![pb::Endpoint {
                    address: if service == "a" {
                        "10.244.0.2"
                    } else {
                        "10.244.0.3"
                    }
                    .to_owned(),
                    port: 8080,
                    identity: "spiffe://cluster.local/ns/default/sa/a".to_owned(),
                    ready: true,
                    ..Default::default()
                }],
            })),
        };
        let mut eps = response(vec![endpoints("a"), endpoints("b")], vec![]);
        eps.type_url = type_url::ENDPOINTS.to_owned();
        let state = MeshState::default()
            .apply(&eps)
            .unwrap()
            .apply(&response(vec![tcp, service("b", "10.96.0.2")], vec![]))
            .unwrap();
        let opaque: Vec<_> = state.opaque_endpoints.iter().copied().collect();
        assert_eq!(
            opaque,
            ["10.244.0.2:8080".parse().unwrap()],
            "only the tcp port's endpoint"
        );
    }

    #[test]
    fn pod_addresses_are_indexed_to_their_service_and_leave_with_it() {
        let endpoints = |service: &str, address: &str| pb::Resource {
            name: format!("{service}.default:80"),
            version: "1".to_owned(),
            kind: Some(Kind::Endpoints(pb::Endpoints {
                service: service.to_owned(),
                namespace: "default".to_owned(),
                port: 80,
                endpoints: vec![pb::Endpoint {
                    address: address.to_owned(),
                    port: 8080,
                    identity: format!("spiffe://cluster.local/ns/default/sa/{service}"),
                    ready: true,
                    ..Default::default()
                }],
            })),
        };
        let eps = typed(
            type_url::ENDPOINTS,
            vec![endpoints("a", "10.244.0.2"), endpoints("b", "10.244.0.3")],
        );
        let state = MeshState::default()
            .apply(&eps)
            .unwrap()
            .apply(&response(
                vec![service("a", "10.96.0.1"), service("b", "10.96.0.2")],
                vec![],
            ))
            .unwrap();
        let of = |state: &MeshState, addr: &str| {
            state
                .endpoint_services
                .get(&addr.parse().unwrap())
                .map(|s| s.service.clone())
        };
        assert_eq!(of(&state, "10.244.0.2:8080").as_deref(), Some("a.default"));
        assert_eq!(of(&state, "10.244.0.3:8080").as_deref(), Some("b.default"));
        assert_eq!(of(&state, "10.244.0.3:9999"), None, "another port");
        let state = state
            .apply(&response(vec![], vec!["b.default".to_owned()]))
            .unwrap();
        assert_eq!(of(&state, "10.244.0.3:8080"), None, "its service is gone");
        assert_eq!(of(&state, "10.244.0.2:8080").as_deref(), Some("a.default"));
    }

    #[test]
    fn plaintext_endpoints_carry_no_identity_and_dial_the_app() {
        let endpoints = |ep: pb::Endpoint| {
            let mut r = response(
                vec![pb::Resource {
                    name: "a.default:80".to_owned(),
                    version: "1".to_owned(),
                    kind: Some(Kind::Endpoints(pb::Endpoints {
                        service: "a".to_owned(),
                        namespace: "default".to_owned(),
                        port: 80,
                        endpoints: vec![ep],
                    })),
                }],
                vec![],
            );
            r.type_url = type_url::ENDPOINTS.to_owned();
            r
        };
        let plain = pb::Endpoint {
            address: "10.244.0.2".to_owned(),
            port: 8080,
            ready: true,
            plaintext: true,
            mesh_address: "127.0.0.1:15106".to_owned(),
            ..Default::default()
        };
        let ep = endpoint("a.default:80", &plain).unwrap();
        assert_eq!(ep.identity, None);
        assert_eq!(ep.dial, "10.244.0.2:8080".parse().unwrap());
        let state = MeshState::default()
            .apply(&endpoints(plain.clone()))
            .unwrap();
        assert!(state.endpoint_identities.is_empty());
        // Plaintext and an identity contradict each other; no identity without
        // plaintext is just as invalid: nothing falls back to plaintext silently.
        let both = pb::Endpoint {
            identity: "spiffe://cluster.local/ns/a/sa/b".to_owned(),
            ..plain.clone()
        };
        assert!(MeshState::default().apply(&endpoints(both)).is_err());
        let neither = pb::Endpoint {
            plaintext: false,
            ..plain
        };
        assert!(MeshState::default().apply(&endpoints(neither)).is_err());
    }

    fn typed(type_url: &str, resources: Vec<pb::Resource>) -> pb::DeltaDiscoveryResponse {
        let mut r = response(resources, vec![]);
        r.type_url = type_url.to_owned();
        r
    }

    fn authorization(name: &str, principal: &str) -> pb::Resource {
        pb::Resource {
            name: format!("{name}.default"),
            version: "1".to_owned(),
            kind: Some(Kind::AuthorizationPolicy(pb::AuthorizationPolicy {
                name: name.to_owned(),
                namespace: "default".to_owned(),
                action: pb::authorization_policy::Action::Allow as i32,
                rules: vec![pb::AuthorizationRule {
                    principals: vec![principal.to_owned()],
                    ..Default::default()
                }],
            })),
        }
    }

    #[test]
    fn inbound_policy_is_accepted_only_once_both_policy_types_are() {
        let state = MeshState::default();
        assert!(!state.inbound_policy.accepted, "fail closed from the start");
        let state = state
            .apply(&typed(type_url::AUTHORIZATION_POLICY, vec![]))
            .unwrap();
        assert!(!state.inbound_policy.accepted);
        // Other kinds do not count.
        let state = state.apply(&response(vec![], vec![])).unwrap();
        assert!(!state.inbound_policy.accepted);
        let state = state
            .apply(&typed(type_url::PEER_AUTHENTICATION, vec![]))
            .unwrap();
        assert!(state.inbound_policy.accepted);
    }

    #[test]
    fn a_policy_that_does_not_compile_is_accepted_as_a_denial() {
        let state = MeshState::default()
            .apply(&typed(
                type_url::AUTHORIZATION_POLICY,
                vec![
                    authorization("good", "*/sa/a"),
                    authorization("bad", "*/sa/*"),
                ],
            ))
            .unwrap();
        let authz = &state.inbound_policy.authorizer;
        let names: Vec<_> = authz.rejected().iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["default/bad"]);
        let a = SpiffeId::new("cluster.local", "default", "a").unwrap();
        let decision = authz.decide(&crate::authz::RequestInfo {
            peer: Some(&a),
            port: 8080,
            http: None,
        });
        assert!(
            matches!(&decision, crate::authz::Decision::Deny { policy } if policy.contains("default/bad")),
            "{decision:?}"
        );
    }
}
